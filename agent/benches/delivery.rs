//! Delivery benchmark (`just bench`): a 1 MiB module (the tests' `big_module`) delivered to the
//! release `edge-agent` as one message and in content-defined chunks (~16 KiB, FastCDC as the
//! tests cut them), through the same private mosquitto on loopback: (a) a first install, (b) an
//! upgrade changing one function. For each: wall time from the first publish to the agent's
//! `installed` event, and bytes on the wire from broker to agent (MQTT PUBLISH packets: payload
//! plus fixed header, topic and packet id). For chunks, what the agent received is its own count
//! (`fetched_bytes` in its status), checked against the chunks it lacked. The floor is the same
//! bundle installed from one message, measured in the same run.

#![allow(clippy::unwrap_used, clippy::cast_precision_loss)]

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use edge_agent::core::bundle::{self, DEFAULT_MAX_BUNDLE_BYTES};
use edge_agent::core::keys;
use edge_agent::core::manifest::{Manifest, Sha256};
use edge_agent::core::protocol::{self, EventKind, Status};
use rumqttc::{Client, Connection, Event, MqttOptions, Packet, QoS};

#[allow(dead_code)]
#[path = "../../tests/it/support/big_module.rs"]
mod big_module;

const MIB: usize = 1 << 20;
/// Runs per case (each with a fresh broker and fresh agents); the median is reported.
const RUNS: usize = 5;

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
    let (c, mut conn) = Client::new(o, 4096);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    conn.eventloop.set_network_options(net);
    (c, conn)
}

/// The size of an MQTT 3.1.1 PUBLISH at QoS 1 carrying `payload` bytes on `topic`: fixed header
/// (1 byte and the remaining length, 1 to 4 bytes), topic (2-byte length and the name), packet
/// id (2 bytes), payload. The PUBACK (4 bytes) going back is not counted.
fn publish_packet(topic: &str, payload: usize) -> u64 {
    let remaining = 2 + topic.len() + 2 + payload;
    let varint = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    (1 + varint + remaining) as u64
}

fn chunk_topic(sha: &Sha256) -> String {
    format!("edge/chunk/{}", sha.to_hex())
}

/// A module version as the operator ships it: one message, or a signed part and chunks.
struct Shipped {
    single: Vec<u8>,
    signed: Vec<u8>,
    chunks: Vec<(Sha256, Vec<u8>)>,
}

fn manifest(name: &str, seq: u64) -> Manifest {
    Manifest::from_toml(&format!(
        "name = \"{name}\"\nversion = \"1.0.{seq}\"\nseq = {seq}\n[limits]\nfuel_per_call = 1000000\n\
         memory_max_bytes = 1048576\ntick_interval_ms = 1000\n[caps]\npublish = [\"{name}/#\"]\n"
    ))
    .unwrap()
}

fn ship(name: &str, seq: u64, wasm: &[u8], key: &SigningKey) -> Shipped {
    let single = bundle::sign(
        manifest(name, seq),
        Some(wasm),
        key,
        DEFAULT_MAX_BUNDLE_BYTES,
    )
    .unwrap();
    let avg: u32 = 16 << 10;
    let lengths: Vec<usize> = fastcdc::v2020::FastCDC::new(wasm, avg / 4, avg, avg * 4)
        .map(|c| c.length)
        .collect();
    let (signed, refs) = bundle::sign_chunked(manifest(name, seq), wasm, &lengths, key).unwrap();
    let mut at = 0;
    let chunks = refs
        .iter()
        .map(|r| {
            let bytes = wasm[at..at + usize::try_from(r.size()).unwrap()].to_vec();
            at += bytes.len();
            (r.sha256(), bytes)
        })
        .collect();
    Shipped {
        single,
        signed,
        chunks,
    }
}

/// One broker, one operator, one observer of every device's events and status.
struct Rig {
    _broker: Killed,
    port: u16,
    dir: tempfile::TempDir,
    operator: Client,
    observer: Connection,
    _observer_client: Client,
    /// The last status of each device.
    statuses: std::collections::HashMap<String, Status>,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        std::fs::write(
            dir.path().join("mosquitto.conf"),
            format!("listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\npersistence false\nmessage_size_limit 0\n"),
        )
        .unwrap();
        let broker = Killed(
            Command::new("mosquitto")
                .arg("-c")
                .arg(dir.path().join("mosquitto.conf"))
                .stderr(Stdio::null())
                .spawn()
                .expect("mosquitto (apt-get install mosquitto)"),
        );
        wait_port(port);
        let (observer_client, mut observer) = client(port, "bench-observer");
        observer_client
            .subscribe("edge/+/events", QoS::AtLeastOnce)
            .unwrap();
        observer_client
            .subscribe("edge/+/status", QoS::AtLeastOnce)
            .unwrap();
        let mut subacks = 0;
        while subacks < 2 {
            if let Ok(Ok(Event::Incoming(Packet::SubAck(_)))) =
                observer.recv_timeout(Duration::from_secs(10))
            {
                subacks += 1;
            }
        }
        let (operator, mut op) = client(port, "bench-operator");
        std::thread::spawn(move || for _ in op.iter() {});
        Rig {
            _broker: broker,
            port,
            dir,
            operator,
            observer,
            _observer_client: observer_client,
            statuses: std::collections::HashMap::new(),
        }
    }

    fn agent(&self, bin: &Path, device: &str, key: &SigningKey) -> Killed {
        let dir = self.dir.path().join(device);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("ops.pub"),
            keys::public_key_pem(&key.verifying_key()),
        )
        .unwrap();
        std::fs::write(
            dir.join("agent.toml"),
            format!(
                "device_id = \"{device}\"\nstate_dir = \"state\"\ntrusted_keys = [\"ops.pub\"]\n\
                 [mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\n[agent]\nprobation_ticks = 1\n\
                 status_interval_s = 3600\n",
                self.port
            ),
        )
        .unwrap();
        Killed(
            Command::new(bin)
                .arg("--config")
                .arg(dir.join("agent.toml"))
                .env("RUST_LOG", "warn")
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    fn publish(&self, topic: &str, payload: &[u8]) {
        self.operator
            .publish(topic, QoS::AtLeastOnce, true, payload.to_vec())
            .unwrap();
    }

    /// Waits until every one of `devices` has reported a status (it is up and subscribed).
    fn online(&mut self, devices: &[&str]) {
        for d in devices {
            self.wait_status(d, |_| true);
        }
    }

    /// Waits for a status of `device` satisfying `f`, the last one already received included.
    fn wait_status(&mut self, device: &str, f: impl Fn(&Status) -> bool) -> Status {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = self.statuses.get(device).filter(|s| f(s)) {
                return s.clone();
            }
            self.next_publish(deadline, "a status");
        }
    }

    /// Waits for `device`'s `installed` event of `module` at `seq`.
    fn installed(&mut self, device: &str, module: &str, seq: u64) {
        let topic = format!("edge/{device}/events");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let p = self.next_publish(deadline, "an installed event");
            if p.topic == topic {
                let e: protocol::Event = protocol::from_cbor(&p.payload).unwrap();
                assert!(
                    e.kind != EventKind::Rejected || e.module != module,
                    "{device}: {e:?}"
                );
                if e.kind == EventKind::Installed && e.module == module && e.seq == Some(seq) {
                    return;
                }
            }
        }
    }

    fn next_publish(&mut self, deadline: Instant, what: &str) -> rumqttc::Publish {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.observer.recv_timeout(left) {
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    if let Some(device) = p
                        .topic
                        .strip_prefix("edge/")
                        .and_then(|t| t.strip_suffix("/status"))
                        && !p.payload.is_empty()
                    {
                        let s: Status = protocol::from_cbor(&p.payload).unwrap();
                        self.statuses.insert(device.to_string(), s);
                    }
                    return p;
                }
                Ok(Ok(_)) => {}
                other => panic!("waiting for {what}: {other:?}"),
            }
        }
    }
}

/// One delivery's figures.
#[derive(Clone, Copy, Default)]
struct Figures {
    time: Duration,
    /// Bytes on the wire to the agent (PUBLISH packets).
    wire: u64,
    /// Payload bytes to the agent (the bundle, or the signed part and the chunks it fetched).
    payload: u64,
    messages: u64,
}

fn median(mut v: Vec<Figures>) -> Figures {
    v.sort_by_key(|f| f.time);
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    // The bench runs from <target>/release/deps/: the agent is in <target>/release/.
    let exe = std::env::current_exe().unwrap();
    let agent_bin: PathBuf = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("edge-agent");
    assert!(
        agent_bin.exists(),
        "build the agent first: cargo build --release -p edge-agent (just bench does); looked for {}",
        agent_bin.display()
    );
    let key = edge_agent::cli::common::generate_key().unwrap();
    let v1 = big_module::big_module(MIB, 0);
    let v2 = big_module::big_module(MIB, 1);
    let first = ship("big", 1, &v1, &key);
    let second = ship("big", 2, &v2, &key);
    let desired = |device: &str| format!("edge/{device}/desired/big");

    let (mut single_first, mut single_up, mut chunked_first, mut chunked_up) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..RUNS {
        // Each run on a fresh broker (no chunks retained from an earlier run) with fresh agents.
        let mut rig = Rig::new();
        let (s_dev, c_dev) = (format!("single-{run}"), format!("chunked-{run}"));
        let _s = rig.agent(&agent_bin, &s_dev, &key);
        let _c = rig.agent(&agent_bin, &c_dev, &key);
        rig.online(&[&s_dev, &c_dev]);

        // One message.
        for (shipped, seq, out) in [(&first, 1, &mut single_first), (&second, 2, &mut single_up)] {
            let t = Instant::now();
            rig.publish(&desired(&s_dev), &shipped.single);
            rig.installed(&s_dev, "big", seq);
            out.push(Figures {
                time: t.elapsed(),
                wire: publish_packet(&desired(&s_dev), shipped.single.len()),
                payload: shipped.single.len() as u64,
                messages: 1,
            });
        }

        // In chunks: the operator publishes the chunks the broker does not hold yet, each once,
        // then the signed part.
        let mut on_broker: BTreeSet<Sha256> = BTreeSet::new();
        let mut fetched_before = 0;
        let mut held: BTreeSet<Sha256> = BTreeSet::new();
        for (shipped, seq, out) in [
            (&first, 1, &mut chunked_first),
            (&second, 2, &mut chunked_up),
        ] {
            let t = Instant::now();
            for (sha, bytes) in &shipped.chunks {
                if on_broker.insert(*sha) {
                    rig.publish(&chunk_topic(sha), bytes);
                }
            }
            rig.publish(&desired(&c_dev), &shipped.signed);
            rig.installed(&c_dev, "big", seq);
            let time = t.elapsed();
            let s = rig.wait_status(&c_dev, |s| {
                s.modules.iter().any(|m| m.name == "big" && m.seq == seq)
            });
            let fetched = s.fetched_bytes - fetched_before;
            fetched_before = s.fetched_bytes;
            // The chunks it lacked (each distinct one once): their packets.
            let mut wanted = BTreeSet::new();
            let (mut wire, mut expected) = (0, 0);
            for (sha, bytes) in &shipped.chunks {
                if !held.contains(sha) && wanted.insert(*sha) {
                    wire += publish_packet(&chunk_topic(sha), bytes.len());
                    expected += bytes.len() as u64;
                }
            }
            assert_eq!(
                fetched, expected,
                "{c_dev} seq {seq}: fetched {fetched} bytes, lacked {expected}"
            );
            held.extend(shipped.chunks.iter().map(|(sha, _)| *sha));
            out.push(Figures {
                time,
                wire: wire + publish_packet(&desired(&c_dev), shipped.signed.len()),
                payload: fetched + shipped.signed.len() as u64,
                messages: wanted.len() as u64 + 1,
            });
        }
    }

    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "edge-agent delivery benchmark (mosquitto on loopback, release edge-agent, {RUNS} runs, \
         medians by time)\n"
    )
    .unwrap();
    writeln!(
        out,
        "module: big_module({MIB}, v): {} bytes of Wasm; v1 in {} chunks, v2 (one function \
         changed) in {} chunks (FastCDC ~16 KiB)",
        v1.len(),
        first.chunks.len(),
        second.chunks.len()
    )
    .unwrap();
    for (what, single, chunked) in [
        (
            "(a) first install",
            median(single_first),
            median(chunked_first),
        ),
        (
            "(b) upgrade, one function changed",
            median(single_up),
            median(chunked_up),
        ),
    ] {
        writeln!(out, "\n{what}").unwrap();
        for (how, f) in [("one message", single), ("in chunks  ", chunked)] {
            writeln!(
                out,
                "  {how}  publish -> installed {:>8.1} ms   to the agent: {:>8} bytes on the wire \
                 ({:>8} payload, {:>3} messages)",
                ms(f.time),
                f.wire,
                f.payload,
                f.messages
            )
            .unwrap();
        }
        writeln!(
            out,
            "  chunked / one message: bytes {:.3}x, time {:.2}x (floor: the same bundle from one \
             message, {:.1} ms)",
            chunked.wire as f64 / single.wire as f64,
            chunked.time.as_secs_f64() / single.time.as_secs_f64(),
            ms(single.time)
        )
        .unwrap();
    }
}
