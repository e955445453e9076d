//! Daemon benchmarks (`just bench`): deploy latency against the MQTT round trip of a message of the
//! same size through the same broker (p50, p99, ratio), and the agent's RSS idle and with the
//! example modules running. A private mosquitto on a loopback port and the release `edge-agent`
//! binary, as a device would run it.

#![allow(clippy::unwrap_used, clippy::cast_precision_loss)]

use std::io::Write as _;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edge_agent::core::bundle::{self, DEFAULT_MAX_BUNDLE_BYTES};
use edge_agent::core::keys;
use edge_agent::core::manifest::Manifest;
use edge_agent::core::protocol::{self, Status};
use rumqttc::{Client, Connection, Event, MqttOptions, Packet, QoS};

const DEVICE: &str = "bench-pi";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn client(port: u16, id: &str) -> (Client, Connection) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_max_packet_size(
        DEFAULT_MAX_BUNDLE_BYTES + 4096,
        DEFAULT_MAX_BUNDLE_BYTES + 4096,
    );
    let (c, mut conn) = Client::new(o, 64);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    conn.eventloop.set_network_options(net);
    (c, conn)
}

/// Next incoming publish, within `limit`.
fn next_publish(conn: &mut Connection, limit: Duration) -> rumqttc::Publish {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match conn.recv_timeout(left) {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => return p,
            Ok(Ok(_)) => {}
            other => panic!("waiting for a message: {other:?}"),
        }
    }
}

fn percentiles(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[(v.len() * 99 / 100).min(v.len() - 1)])
}

fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// fsync and fdatasync calls per second of process `pid` (all its threads) over `secs` seconds,
/// counted by strace; `None` without strace.
fn fsyncs_per_second(pid: u32, secs: u64) -> Option<f64> {
    let out = Command::new("timeout")
        .args(["-s", "INT", &secs.to_string()])
        .args(["strace", "-f", "-c", "-e", "trace=fsync,fdatasync", "-p"])
        .arg(pid.to_string())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stderr);
    if !text.contains("% time") {
        return None;
    }
    let calls: u64 = text
        .lines()
        .filter(|l| l.ends_with(" fsync") || l.ends_with(" fdatasync"))
        .filter_map(|l| l.split_whitespace().nth(3)?.parse::<u64>().ok())
        .sum();
    Some(calls as f64 / secs as f64)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let agent_bin = repo().join("target/release/edge-agent");
    assert!(
        agent_bin.exists(),
        "build the agent first: cargo build --release -p edge-agent (just bench does)"
    );
    let modules = repo().join("target/modules");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    std::fs::write(
        dir.path().join("mosquitto.conf"),
        format!("listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\npersistence false\nmessage_size_limit 0\n"),
    )
    .unwrap();
    let _broker = Killed(
        Command::new("mosquitto")
            .arg("-c")
            .arg(dir.path().join("mosquitto.conf"))
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (apt-get install mosquitto)"),
    );
    wait_port(port);

    let key = edge_agent::cli::common::generate_key().unwrap();
    std::fs::write(
        dir.path().join("ops.pub"),
        keys::public_key_pem(&key.verifying_key()),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("agent.toml"),
        format!(
            "device_id = \"{DEVICE}\"\nstate_dir = \"state\"\ntrusted_keys = [\"ops.pub\"]\n[mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\n[agent]\nprobation_ticks = 1\nstatus_interval_s = 3600\n"
        ),
    )
    .unwrap();
    let agent = Killed(
        Command::new(&agent_bin)
            .arg("--config")
            .arg(dir.path().join("agent.toml"))
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = agent.0.id();

    let (observer, mut obs) = client(port, "bench-observer");
    observer
        .subscribe(format!("edge/{DEVICE}/status"), QoS::AtLeastOnce)
        .unwrap();
    // The agent's first status: it is up.
    let _ = next_publish(&mut obs, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));
    let idle = rss(pid);

    let sign = |name: &str, seq: u64, tick_ms: u64| {
        let mut m = Manifest::from_toml(
            &std::fs::read_to_string(modules.join(format!("{name}.toml"))).unwrap(),
        )
        .unwrap();
        m.seq = seq;
        if m.limits.tick_interval_ms > 0 {
            m.limits.tick_interval_ms = tick_ms;
        }
        let wasm = std::fs::read(modules.join(format!("{name}.wasm"))).unwrap();
        bundle::sign(m, Some(&wasm), &key, DEFAULT_MAX_BUNDLE_BYTES).unwrap()
    };
    let (operator, mut op) = client(port, "bench-operator");
    std::thread::spawn(move || for _ in op.iter() {});

    // Deploy latency: publish a new heartbeat version, until the status shows it running (off
    // probation: init and one tick done).
    let runs = 40;
    let mut deploy = Vec::new();
    let mut size = 0;
    for seq in 1..=runs {
        let b = sign("heartbeat", seq, 10);
        size = b.len();
        let t = Instant::now();
        operator
            .publish(
                format!("edge/{DEVICE}/desired/heartbeat"),
                QoS::AtLeastOnce,
                true,
                b,
            )
            .unwrap();
        loop {
            let p = next_publish(&mut obs, Duration::from_secs(30));
            let s: Status = protocol::from_cbor(&p.payload).unwrap();
            if s.modules
                .iter()
                .any(|m| m.name == "heartbeat" && m.seq == seq && m.detail.is_none())
            {
                break;
            }
        }
        deploy.push(t.elapsed());
    }

    // The same-size round trip through the same broker: publish, receive on a subscriber.
    let (rt_client, mut rt) = client(port, "bench-roundtrip");
    rt_client.subscribe("bench/rt", QoS::AtLeastOnce).unwrap();
    loop {
        if let Ok(Ok(Event::Incoming(Packet::SubAck(_)))) = rt.recv_timeout(Duration::from_secs(5))
        {
            break;
        }
    }
    let mut round = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        operator
            .publish("bench/rt", QoS::AtLeastOnce, false, vec![7u8; size])
            .unwrap();
        let _ = next_publish(&mut rt, Duration::from_secs(10));
        round.push(t.elapsed());
    }

    // RSS with the example modules running.
    for (name, tick) in [("kv-counter", 100), ("echo", 0)] {
        operator
            .publish(
                format!("edge/{DEVICE}/desired/{name}"),
                QoS::AtLeastOnce,
                true,
                sign(name, 1, tick),
            )
            .unwrap();
    }
    std::thread::sleep(Duration::from_secs(3));
    let busy = rss(pid);

    // Key-value durability: each guest call that wrote waits for a flush that covers it; one
    // flush (and its fsyncs) serves every module that wrote meanwhile, at most one per
    // agent.kv_commit_interval_ms (50 ms). Counted with strace over five seconds, with one and
    // with eight kv-counter modules ticking every 50 ms (each tick a write).
    let mut durability = Vec::new();
    for modules in [1usize, 8] {
        for i in 0..modules {
            let mut m = Manifest::from_toml(
                &std::fs::read_to_string(repo().join("target/modules/kv-counter.toml")).unwrap(),
            )
            .unwrap();
            m.name = format!("kv-{i}");
            m.seq = 1;
            m.limits.tick_interval_ms = 50;
            let wasm = std::fs::read(repo().join("target/modules/kv-counter.wasm")).unwrap();
            let b = bundle::sign(m, Some(&wasm), &key, DEFAULT_MAX_BUNDLE_BYTES).unwrap();
            operator
                .publish(
                    format!("edge/{DEVICE}/desired/kv-{i}"),
                    QoS::AtLeastOnce,
                    true,
                    b,
                )
                .unwrap();
        }
        std::thread::sleep(Duration::from_secs(2));
        durability.push((modules, fsyncs_per_second(pid, 5)));
    }

    let (d50, d99) = percentiles(deploy);
    let (r50, r99) = percentiles(round);
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "edge-agent daemon benchmarks (mosquitto on loopback, release edge-agent)\n"
    )
    .unwrap();
    writeln!(out, "deploy latency: publish a {size}-byte heartbeat bundle -> status shows it running (init + 1 tick), {runs} runs").unwrap();
    writeln!(
        out,
        "  deploy     p50 {:>8.2} ms  p99 {:>8.2} ms",
        ms(d50),
        ms(d99)
    )
    .unwrap();
    writeln!(
        out,
        "  round trip p50 {:>8.2} ms  p99 {:>8.2} ms  (same size, same broker, QoS 1)",
        ms(r50),
        ms(r99)
    )
    .unwrap();
    writeln!(
        out,
        "  ratio      p50 {:>8.1}x    p99 {:>8.1}x",
        d50.as_secs_f64() / r50.as_secs_f64(),
        d99.as_secs_f64() / r99.as_secs_f64()
    )
    .unwrap();
    writeln!(
        out,
        "\nkey-value durability: fsync calls per second, kv-counter modules ticking every 50 ms"
    )
    .unwrap();
    for (modules, rate) in durability {
        match rate {
            Some(rate) => writeln!(
                out,
                "  {modules} module(s), {:>4} writes/s     {rate:>6.1} fsyncs/s (bound: 20 flushes/s, each an fsync of the log and of each changed side file)",
                modules * 20
            )
            .unwrap(),
            None => writeln!(out, "  {modules} module(s): not measured (strace is missing)").unwrap(),
        }
    }
    writeln!(out, "\nagent RSS").unwrap();
    writeln!(
        out,
        "  idle (no modules)                         {:>7.2} MiB",
        idle as f64 / 1048576.0
    )
    .unwrap();
    writeln!(
        out,
        "  heartbeat, kv-counter, echo running        {:>7.2} MiB",
        busy as f64 / 1048576.0
    )
    .unwrap();
    drop(agent);
}
