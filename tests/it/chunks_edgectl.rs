//! Chunked delivery, the operator's side: `edgectl sign` lists content-defined chunks, `edgectl
//! deploy` sends a bundle too big for one broker message as the chunks the broker does not hold
//! plus the signed part, and `edgectl gc` clears the chunks nothing references. Against a real
//! mosquitto whose `message_size_limit` is AWS IoT Core's 128 KiB.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use edge_agent::core::bundle;
use edge_agent::core::manifest::{ChunkRef, Sha256};
use edge_agent::core::verify;

use crate::support::big_module::big_module;
use crate::support::edgectl::fails;
use crate::support::{Mosquitto, edgectl, edgectl_ok, key, manifest, signed, tempdir, verifier};

const MIB: usize = 1 << 20;
const LIMIT: &str = "message_size_limit 131072";

#[test]
fn big_module_is_a_valid_one_mib_module_and_a_variant_changes_a_few_bytes() {
    let (v0, v1) = (big_module(MIB, 0), big_module(MIB, 1));
    assert!(
        (MIB * 9 / 10..=MIB * 11 / 10).contains(&v0.len()),
        "{} bytes",
        v0.len()
    );
    assert_eq!(v0, big_module(MIB, 0), "deterministic");
    let b = signed(manifest("big", 1), &v0, &key(1));
    verifier(&[&key(1)]).verify(&b, 0, |_| None).unwrap();
    // The bytes that differ: what is left between the common prefix and the common suffix.
    let prefix = v0.iter().zip(&v1).take_while(|(a, b)| a == b).count();
    let suffix = v0
        .iter()
        .rev()
        .zip(v1.iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    let changed = v0.len().max(v1.len()) - prefix.min(v0.len().min(v1.len())) - suffix;
    assert!(changed <= 8, "{changed} bytes differ");
    assert!(
        prefix > v0.len() / 4 && prefix < v0.len() * 3 / 4,
        "{prefix}"
    );
}

/// A directory with `op.key` (seed 1), `op.key.pub`, and `big0.bundle` / `big1.bundle`: the 1 MiB
/// module and its one-function variant, signed by `edgectl sign` with its defaults.
struct Signed {
    dir: tempfile::TempDir,
}

impl Signed {
    fn new() -> Signed {
        let dir = tempdir();
        let k = key(1);
        fs::write(
            dir.path().join("op.key"),
            edge_agent::core::keys::private_key_pem(&k),
        )
        .unwrap();
        fs::write(
            dir.path().join("op.key.pub"),
            edge_agent::core::keys::public_key_pem(&k.verifying_key()),
        )
        .unwrap();
        let s = Signed { dir };
        for variant in [0, 1] {
            fs::write(
                s.path(&format!("big{variant}.wasm")),
                big_module(MIB, variant),
            )
            .unwrap();
            s.sign(variant, &[]);
        }
        s
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    fn p(&self, file: &str) -> String {
        self.path(file).to_str().unwrap().to_string()
    }

    /// Signs variant `v` into `big{v}.bundle` with `extra` arguments; returns the output.
    fn sign(&self, v: u32, extra: &[&str]) -> String {
        fs::write(
            self.path("big.toml"),
            "name = \"big\"\nversion = \"1\"\nseq = 1\n[targets]\ndevices = [\"pi-a\", \"pi-b\"]\n",
        )
        .unwrap();
        let (key, wasm, m, out) = (
            self.p("op.key"),
            self.p(&format!("big{v}.wasm")),
            self.p("big.toml"),
            self.p(&format!("big{v}.bundle")),
        );
        let mut args = vec![
            "sign",
            "--key",
            &key,
            "--wasm",
            &wasm,
            "--manifest",
            &m,
            "--out",
            &out,
        ];
        args.extend_from_slice(extra);
        edgectl_ok(&args)
    }

    fn chunks(&self, v: u32) -> Vec<ChunkRef> {
        let bytes = fs::read(self.path(&format!("big{v}.bundle"))).unwrap();
        verify::read_unverified(&bytes, bytes.len())
            .unwrap()
            .manifest
            .chunks
    }

    fn deploy(&self, broker: &Mosquitto, v: u32, target: &[&str], extra: &[&str]) -> Deployed {
        let url = broker.url();
        let bundle = self.p(&format!("big{v}.bundle"));
        let mut args = vec!["deploy", "--broker", &url];
        args.extend_from_slice(target);
        args.extend_from_slice(extra);
        args.push(&bundle);
        Deployed::parse(&edgectl_ok(&args))
    }
}

/// The figures of a chunked deploy's line.
#[derive(Debug)]
struct Deployed {
    line: String,
    total: usize,
    sent: usize,
    present: usize,
    chunk_bytes: u64,
}

impl Deployed {
    fn parse(line: &str) -> Deployed {
        let num = |after: &str| -> usize {
            let at = line
                .find(after)
                .unwrap_or_else(|| panic!("{after:?} in {line}"));
            line[..at]
                .split(|c: char| !c.is_ascii_digit())
                .rfind(|w| !w.is_empty())
                .unwrap()
                .parse()
                .unwrap()
        };
        let chunk_bytes = {
            let at = line.find("(chunks ").expect(line) + "(chunks ".len();
            line[at..].split(' ').next().unwrap().parse().unwrap()
        };
        Deployed {
            line: line.trim().to_string(),
            total: num(" chunks,"),
            sent: num(" sent,"),
            present: num(" already on the broker"),
            chunk_bytes,
        }
    }
}

/// A client id no other client of this test process uses.
fn client_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Every message retained on `filter`, asked with a probe (the broker answers in order).
fn retained(url: &str, filter: &str) -> BTreeMap<String, Vec<u8>> {
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    let mut options = rumqttc::MqttOptions::new(client_id(), "127.0.0.1", port);
    options.set_max_packet_size(16 * MIB, 16 * MIB);
    let (client, mut conn) = rumqttc::Client::new(options, 16);
    let probe = "edge/test/probe";
    client.subscribe(filter, rumqttc::QoS::AtLeastOnce).unwrap();
    client.subscribe(probe, rumqttc::QoS::AtLeastOnce).unwrap();
    client
        .publish(probe, rumqttc::QoS::AtLeastOnce, false, b"done".to_vec())
        .unwrap();
    let mut out = BTreeMap::new();
    for event in conn.iter() {
        match event.unwrap() {
            rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) if p.topic == probe => break,
            rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                out.insert(p.topic.clone(), p.payload.to_vec());
            }
            _ => {}
        }
    }
    let _ = client.disconnect();
    out
}

/// Publishes one retained message and waits for the broker's acknowledgement.
fn publish_retained(url: &str, topic: &str, payload: Vec<u8>) {
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    let mut options = rumqttc::MqttOptions::new(client_id(), "127.0.0.1", port);
    options.set_max_packet_size(16 * MIB, 16 * MIB);
    let (client, mut conn) = rumqttc::Client::new(options, 16);
    client
        .publish(topic, rumqttc::QoS::AtLeastOnce, true, payload)
        .unwrap();
    for event in conn.iter() {
        if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = event.unwrap() {
            break;
        }
    }
    let _ = client.disconnect();
    std::thread::sleep(Duration::from_millis(50));
}

fn chunk_topic(c: &ChunkRef) -> String {
    format!("edge/chunk/{}", c.sha256().to_hex())
}

#[test]
fn chunks_edgectl_sign_lists_chunks_and_inspect_shows_them() {
    let s = Signed::new();
    let chunks = s.chunks(0);
    assert!(
        (16..=256).contains(&chunks.len()),
        "{} chunks for 1 MiB at 16 KiB",
        chunks.len()
    );
    let shown = edgectl_ok(&[
        "inspect",
        "--trust",
        &s.p("op.key.pub"),
        &s.p("big0.bundle"),
    ]);
    assert!(shown.contains("valid, by trusted key"), "{shown}");
    assert!(shown.contains("container  format 1"), "{shown}");
    assert!(
        shown.contains(&format!("chunks     {} (", chunks.len())),
        "{shown}"
    );

    // The format 2 signed part, as deploy makes it.
    let bytes = fs::read(s.path("big0.bundle")).unwrap();
    let raw = bundle::decode(&bytes, bytes.len()).unwrap();
    fs::write(s.path("signed.part"), bundle::encode_chunked(raw.sign1)).unwrap();
    let shown = edgectl_ok(&[
        "inspect",
        "--trust",
        &s.p("op.key.pub"),
        &s.p("signed.part"),
    ]);
    assert!(
        shown.contains("format 2") && shown.contains("the Wasm travels in"),
        "{shown}"
    );

    let out = s.sign(0, &["--chunk-avg-bytes", "0"]);
    assert!(!out.contains("chunks"), "{out}");
    assert!(s.chunks(0).is_empty());
    for bad in ["100", "200000"] {
        let err = fails(edgectl(&[
            "sign",
            "--key",
            &s.p("op.key"),
            "--wasm",
            &s.p("big0.wasm"),
            "--manifest",
            &s.p("big.toml"),
            "--out",
            &s.p("x.bundle"),
            "--chunk-avg-bytes",
            bad,
        ]));
        assert!(
            err.contains("--chunk-avg-bytes") && err.contains("256"),
            "{err}"
        );
    }
}

#[test]
fn chunks_edgectl_one_message_above_the_brokers_limit_fails_the_read_back() {
    let broker = Mosquitto::start_configured(LIMIT);
    let s = Signed::new();
    let err = fails(edgectl(&[
        "deploy",
        "--broker",
        &broker.url(),
        "--device",
        "pi-a",
        "--max-packet-bytes",
        "8388608",
        &s.p("big0.bundle"),
    ]));
    assert!(
        err.contains("did not keep") && err.contains("message_size_limit"),
        "{err}"
    );
    assert!(retained(&broker.url(), "edge/#").is_empty());

    // A broker without the limit keeps it: one message, read back.
    let roomy = Mosquitto::start();
    let out = edgectl_ok(&[
        "deploy",
        "--broker",
        &roomy.url(),
        "--device",
        "pi-a",
        "--max-packet-bytes",
        "8388608",
        &s.p("big0.bundle"),
    ]);
    assert!(out.contains("as one message"), "{out}");
    let kept = retained(&roomy.url(), "edge/#");
    assert_eq!(
        kept.get("edge/pi-a/desired/big"),
        Some(&fs::read(s.path("big0.bundle")).unwrap())
    );
    assert_eq!(kept.len(), 1, "no chunks: {:?}", kept.keys());

    // Without a chunk list there is no way through: a clear error, nothing published.
    s.sign(0, &["--chunk-avg-bytes", "0"]);
    let err = fails(edgectl(&[
        "deploy",
        "--broker",
        &broker.url(),
        "--device",
        "pi-a",
        &s.p("big0.bundle"),
    ]));
    assert!(err.contains("sign it again"), "{err}");
    assert!(retained(&broker.url(), "edge/#").is_empty());
}

#[test]
fn chunks_edgectl_deploy_sends_only_the_chunks_the_broker_lacks() {
    let broker = Mosquitto::start_configured(LIMIT);
    let url = broker.url();
    let s = Signed::new();
    let (c0, c1) = (s.chunks(0), s.chunks(1));
    let wasm0 = big_module(MIB, 0);

    // First deploy: every chunk, then the signed part; all of it retained under the limit.
    let d = s.deploy(&broker, 0, &["--device", "pi-a"], &[]);
    eprintln!("{}", d.line);
    let distinct: HashSet<_> = c0.iter().map(|c| c.sha256()).collect();
    assert_eq!(
        (d.total, d.sent, d.present),
        (distinct.len(), distinct.len(), 0)
    );
    assert_eq!(d.chunk_bytes, wasm0.len() as u64);
    let held = retained(&url, "edge/chunk/+");
    let mut at = 0;
    for c in &c0 {
        let len = usize::try_from(c.size()).unwrap();
        assert_eq!(
            held.get(&chunk_topic(c)).map(Vec::as_slice),
            Some(&wasm0[at..at + len])
        );
        at += len;
    }
    let desired = retained(&url, "edge/pi-a/desired/big");
    let part = &desired["edge/pi-a/desired/big"];
    assert!(part.len() <= 128 << 10, "{} bytes", part.len());
    let raw = bundle::decode(part, part.len()).unwrap();
    assert!(raw.chunked && raw.wasm.is_none());
    let v = verifier(&[&key(1)]).verify(part, 0, |_| None).unwrap();
    assert!(v.awaits_chunks());

    // Again, and to a group: nothing to send but the signed part.
    let again = s.deploy(&broker, 0, &["--device", "pi-a"], &[]);
    assert_eq!(
        (again.sent, again.present),
        (0, distinct.len()),
        "{}",
        again.line
    );
    let group = s.deploy(&broker, 0, &["--group", "greenhouse"], &[]);
    assert_eq!(group.sent, 0, "{}", group.line);
    assert!(retained(&url, "edge/group/greenhouse/desired/big").len() == 1);

    // One function changed: a few chunks.
    let up = s.deploy(&broker, 1, &["--device", "pi-a"], &[]);
    eprintln!("{}", up.line);
    let known: HashSet<_> = c0.iter().map(|c| c.sha256()).collect();
    let new: HashSet<_> = c1
        .iter()
        .map(|c| c.sha256())
        .filter(|h| !known.contains(h))
        .collect();
    assert_eq!(up.sent, new.len(), "{}", up.line);
    assert!(up.sent >= 1 && up.sent <= 4, "{}", up.line);
    assert!(up.chunk_bytes * 10 <= wasm0.len() as u64, "{}", up.line);

    // A retained chunk with a flipped byte is sent again.
    let victim = c1[c1.len() / 3];
    let mut bad = retained(&url, &chunk_topic(&victim))[&chunk_topic(&victim)].clone();
    bad[7] ^= 0x40;
    publish_retained(&url, &chunk_topic(&victim), bad);
    let fixed = s.deploy(&broker, 1, &["--device", "pi-a"], &[]);
    assert_eq!(fixed.sent, 1, "{}", fixed.line);
    let now = &retained(&url, &chunk_topic(&victim))[&chunk_topic(&victim)];
    assert_eq!(Sha256::of(now), victim.sha256());

    // --chunked forces chunks for a bundle that fits (here: all of them present already).
    let forced = s.deploy(
        &broker,
        1,
        &["--device", "pi-b"],
        &["--chunked", "--max-packet-bytes", "8388608"],
    );
    assert_eq!(forced.sent, 0, "{}", forced.line);
}

#[test]
fn chunks_edgectl_gc_removes_exactly_the_unreferenced_and_the_corrupt_chunks() {
    let broker = Mosquitto::start();
    let url = broker.url();
    let s = Signed::new();
    let (c0, c1) = (s.chunks(0), s.chunks(1));
    let set = |c: &[ChunkRef]| c.iter().map(chunk_topic).collect::<HashSet<_>>();
    let (s0, s1) = (set(&c0), set(&c1));
    s.deploy(&broker, 0, &["--device", "pi-a"], &[]);
    s.deploy(&broker, 1, &["--device", "pi-b"], &[]);
    let gc = |extra: &[&str]| {
        let mut args = vec!["gc", "--broker", &url];
        args.extend_from_slice(extra);
        edgectl_ok(&args)
    };
    let out = gc(&[]);
    assert!(out.contains("removed 0 chunks"), "{out}");
    assert!(out.contains("referenced by 2 bundles"), "{out}");

    // pi-a moves to v1: the chunks only v0 had are referenced by nothing now.
    s.deploy(&broker, 1, &["--device", "pi-a"], &[]);
    let only_v0: HashSet<_> = s0.difference(&s1).cloned().collect();
    assert!(!only_v0.is_empty());
    // And one chunk v1 uses is damaged on the broker.
    let victim = chunk_topic(&c1[0]);
    publish_retained(&url, &victim, b"not the chunk".to_vec());

    let before = retained(&url, "edge/chunk/+");
    let dry = gc(&["--dry-run"]);
    assert_eq!(
        retained(&url, "edge/chunk/+"),
        before,
        "--dry-run removed something"
    );
    assert!(
        dry.contains(&format!("would remove {} chunks", only_v0.len() + 1)),
        "{dry}"
    );

    let out = gc(&[]);
    eprintln!("{out}");
    assert!(out.contains("corrupt"), "{out}");
    assert_eq!(out.matches("unreferenced").count(), only_v0.len(), "{out}");
    let after: HashSet<String> = retained(&url, "edge/chunk/+").into_keys().collect();
    let mut expected = s1.clone();
    expected.remove(&victim);
    assert_eq!(after, expected);
    assert!(
        out.contains(&format!("removed {} chunks", only_v0.len() + 1))
            && out.contains("referenced by 2 bundles"),
        "{out}"
    );
    // The next deploy puts the damaged chunk back.
    let d = s.deploy(&broker, 1, &["--device", "pi-b"], &[]);
    assert_eq!(d.sent, 1, "{}", d.line);
}

#[test]
fn chunks_edgectl_a_one_function_change_shares_most_chunks_at_every_average() {
    use edge_agent::core::chunking;
    let (v0, v1) = (big_module(MIB, 0), big_module(MIB, 1));
    for avg in [4 << 10, 16 << 10, 64 << 10] {
        let l0 = chunking::cut(&v0, avg).unwrap();
        assert_eq!(l0, chunking::cut(&v0, avg).unwrap(), "deterministic");
        let (r0, r1) = (
            chunking::refs(&v0, &l0).unwrap(),
            chunking::refs(&v1, &chunking::cut(&v1, avg).unwrap()).unwrap(),
        );
        let (_, _, max) = chunking::bounds(avg).unwrap();
        assert!(r1.iter().all(|c| usize::try_from(c.1).unwrap() <= max));
        let held: HashSet<Sha256> = r0.iter().map(ChunkRef::sha256).collect();
        let new: Vec<&ChunkRef> = r1.iter().filter(|c| !held.contains(&c.0)).collect();
        let new_bytes: u64 = new.iter().map(|c| c.1).sum();
        assert!(
            !new.is_empty() && new.len() <= 2 && new_bytes * 10 <= v1.len() as u64,
            "avg {avg}: {} new chunks, {new_bytes} bytes",
            new.len()
        );
    }
}
