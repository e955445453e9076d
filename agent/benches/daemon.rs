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

    // Deploy latency: publish a new heartbeat version; the deploy is done when its `init` has
    // returned (its one log line, "heartbeat: started", arrives; the runner starts only after the
    // install is durably stored); the status first naming the new seq marks it stored. Probation
    // (one 10 ms tick here, a policy) ends when the status shows it running without a detail.
    observer
        .subscribe(format!("edge/{DEVICE}/logs/heartbeat"), QoS::AtLeastOnce)
        .unwrap();
    let runs = 40;
    let (mut stored, mut deploy, mut probation) = (Vec::new(), Vec::new(), Vec::new());
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
        let (mut t_stored, mut t_init) = (None, None);
        loop {
            let p = next_publish(&mut obs, Duration::from_secs(30));
            if p.topic.ends_with("/logs/heartbeat") {
                let line: protocol::LogRecord = protocol::from_cbor(&p.payload).unwrap();
                if line.text.contains("started") && t_init.is_none() {
                    t_init = Some(t.elapsed());
                }
                continue;
            }
            let s: Status = protocol::from_cbor(&p.payload).unwrap();
            let new = s
                .modules
                .iter()
                .find(|m| m.name == "heartbeat" && m.seq == seq);
            if new.is_some() && t_stored.is_none() {
                t_stored = Some(t.elapsed());
            }
            if new.is_some_and(|m| m.detail.is_none()) {
                let done = t.elapsed();
                // The log line may trail the status on the wire by a little.
                while t_init.is_none() {
                    let p = next_publish(&mut obs, Duration::from_secs(10));
                    if p.topic.ends_with("/logs/heartbeat") {
                        t_init = Some(t.elapsed());
                    }
                }
                let init = t_init.unwrap();
                stored.push(t_stored.unwrap_or(init));
                deploy.push(init);
                probation.push(done.saturating_sub(init));
                break;
            }
        }
    }

    // fsyncs per install: the same deploys again under strace (which slows them, so untimed).
    let fsyncs_per_install = {
        let tracer = Command::new("strace")
            .args(["-f", "-c", "-e", "trace=fsync,fdatasync", "-p"])
            .arg(pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .ok();
        tracer.map(|tracer| {
            std::thread::sleep(Duration::from_millis(500));
            let n = 10;
            for seq in runs + 1..=runs + n {
                operator
                    .publish(
                        format!("edge/{DEVICE}/desired/heartbeat"),
                        QoS::AtLeastOnce,
                        true,
                        sign("heartbeat", seq, 10),
                    )
                    .unwrap();
                loop {
                    let p = next_publish(&mut obs, Duration::from_secs(60));
                    if p.topic.ends_with("/status") {
                        let s: Status = protocol::from_cbor(&p.payload).unwrap();
                        if s.modules
                            .iter()
                            .any(|m| m.name == "heartbeat" && m.seq == seq && m.detail.is_none())
                        {
                            break;
                        }
                    }
                }
            }
            // strace prints its summary on SIGINT.
            let _ = Command::new("kill")
                .args(["-INT", &tracer.id().to_string()])
                .status();
            let out = tracer.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stderr);
            let calls: u64 = text
                .lines()
                .filter(|l| l.ends_with(" fsync") || l.ends_with(" fdatasync"))
                .filter_map(|l| l.split_whitespace().nth(3)?.parse::<u64>().ok())
                .sum();
            calls as f64 / n as f64
        })
    };
    let runs = usize::try_from(runs).unwrap();

    // Floors, measured here: one fsync of a 16 KiB append on the state directory's file system,
    // and the cold start of the same module in this process (from checked bytes to its first
    // tick).
    let fsync = {
        let path = dir.path().join("fsync-probe");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![1u8; 16 << 10];
        let mut t = Vec::new();
        for _ in 0..runs {
            f.write_all(&block).unwrap();
            let start = Instant::now();
            f.sync_all().unwrap();
            t.push(start.elapsed());
        }
        percentiles(t).0
    };
    let cold_start = {
        let rt = edge_agent::runtime::Runtime::new(edge_agent::runtime::RuntimeConfig::default());
        let m =
            Manifest::from_toml(&std::fs::read_to_string(modules.join("heartbeat.toml")).unwrap())
                .unwrap();
        let wasm = std::fs::read(modules.join("heartbeat.wasm")).unwrap();
        let checked = edge_agent::engine::check(&wasm, &rt.config().wasm_limits()).unwrap();
        let mut t = Vec::new();
        for _ in 0..runs {
            let start = Instant::now();
            let prepared = rt.prepare_checked(&m, checked).unwrap();
            let mut i = rt.instantiate(&prepared, None).unwrap();
            assert!(i.init().outcome.is_finished());
            assert!(i.tick().outcome.is_finished());
            t.push(start.elapsed());
        }
        percentiles(t).0
    };

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

    // Memory per module in the daemon (runner task, channels, buffers, instance, engine): 20 more
    // heartbeat modules under other names, each ticking once a second.
    let extra = 20;
    let before_extra = rss(pid);
    for i in 0..extra {
        let mut m =
            Manifest::from_toml(&std::fs::read_to_string(modules.join("heartbeat.toml")).unwrap())
                .unwrap();
        m.name = format!("hb-{i}");
        m.caps.publish = vec![format!("hb-{i}/#")];
        let wasm = std::fs::read(modules.join("heartbeat.wasm")).unwrap();
        let b = bundle::sign(m, Some(&wasm), &key, DEFAULT_MAX_BUNDLE_BYTES).unwrap();
        operator
            .publish(
                format!("edge/{DEVICE}/desired/hb-{i}"),
                QoS::AtLeastOnce,
                true,
                b,
            )
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let p = next_publish(&mut obs, Duration::from_secs(30));
        if p.topic.ends_with("/status") {
            let s: Status = protocol::from_cbor(&p.payload).unwrap();
            let up = s
                .modules
                .iter()
                .filter(|m| m.name.starts_with("hb-") && m.detail.is_none() && m.calls >= 2)
                .count();
            if up == extra {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the {extra} extra modules did not all start"
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    let per_module = rss(pid).saturating_sub(before_extra) as f64 / extra as f64;
    let linear = 128.0 * 1024.0;

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

    let (s50, s99) = percentiles(stored);
    let (d50, d99) = percentiles(deploy);
    let (p50, p99) = percentiles(probation);
    let (r50, r99) = percentiles(round);
    let floor = r50 + fsync + cold_start;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "edge-agent daemon benchmarks (mosquitto on loopback, release edge-agent)\n"
    )
    .unwrap();
    writeln!(
        out,
        "deploy latency: publish a {size}-byte heartbeat bundle, {runs} runs"
    )
    .unwrap();
    writeln!(
        out,
        "  publish -> stored durably (status names the seq)  p50 {:>8.2} ms  p99 {:>8.2} ms",
        ms(s50),
        ms(s99)
    )
    .unwrap();
    writeln!(
        out,
        "  publish -> init returned (the deploy)              p50 {:>8.2} ms  p99 {:>8.2} ms",
        ms(d50),
        ms(d99)
    )
    .unwrap();
    writeln!(
        out,
        "  probation, reported apart (policy: 1 tick of 10 ms) p50 {:>7.2} ms  p99 {:>8.2} ms",
        ms(p50),
        ms(p99)
    )
    .unwrap();
    writeln!(
        out,
        "  floor: round trip p50 {:.3} ms (same size, same broker, QoS 1; p99 {:.3} ms) + fsync of \
         16 KiB p50 {:.3} ms + cold start p50 {:.3} ms = {:.3} ms",
        ms(r50),
        ms(r99),
        ms(fsync),
        ms(cold_start),
        ms(floor)
    )
    .unwrap();
    writeln!(
        out,
        "  deploy / floor  p50 {:>6.2}x  (goal <= 3x); deploy / round trip p50 {:.1}x",
        d50.as_secs_f64() / floor.as_secs_f64(),
        d50.as_secs_f64() / r50.as_secs_f64()
    )
    .unwrap();
    match fsyncs_per_install {
        Some(n) => writeln!(
            out,
            "  fsync + fdatasync calls per deploy (install, start, confirmation after probation; \
             strace over 10 deploys): {n:.1}"
        )
        .unwrap(),
        None => writeln!(out, "  fsyncs per deploy: not measured (strace is missing)").unwrap(),
    }
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
        "  idle (no modules)                         {:>7.2} MiB (goal <= 4 MiB)",
        idle as f64 / 1048576.0
    )
    .unwrap();
    writeln!(
        out,
        "  heartbeat, kv-counter, echo running        {:>7.2} MiB",
        busy as f64 / 1048576.0
    )
    .unwrap();
    writeln!(
        out,
        "  per heartbeat module ({extra} more): {:.1} KiB = {:.1} KiB beyond its 128 KiB of linear memory",
        per_module / 1024.0,
        (per_module - linear) / 1024.0
    )
    .unwrap();
    drop(agent);
}
