//! The trust document from the operator's side: `edgectl trust sign`, `inspect`, `publish` and
//! `inspect --trust-doc` run as an operator runs them; a property test that no single changed
//! byte of a signed document is accepted; the byte-by-byte example in docs/protocol.md.

use crate::support::edgectl::fails;
use std::fs;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use edge_agent::core::keys::KeyId;
use edge_agent::core::trust::{self, Fixed, KeyGrant, RootKeys, Roots, TrustPayload};
use proptest::prelude::*;

use crate::support::{self, key, tempdir};

const NOW: u64 = 1_800_000_000;

fn edgectl(dir: &Path, args: &[&str]) -> Output {
    support::target_command(env!("CARGO_BIN_EXE_edgectl"))
        .args(args)
        .current_dir(dir)
        .env_remove("EDGECTL_BROKER")
        .output()
        .expect("run edgectl")
}

fn ok(out: Output) -> (String, String) {
    assert!(
        out.status.success(),
        "edgectl failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// Runs `edgectl keygen --out <name>.key` in `dir`; returns the key id it prints.
fn keygen(dir: &Path, name: &str) -> String {
    let (out, _) = ok(edgectl(dir, &["keygen", "--out", &format!("{name}.key")]));
    out.trim().to_string()
}

/// A directory with root keys r1..r3 and an operator key `ops` at its top, and the policy
/// directory `policy/` holding `ops.key.pub` (the policy names it relative to itself).
struct Fleet {
    dir: tempfile::TempDir,
    ops: String,
}

const ROOTS: &[&str] = &[
    "--root",
    "r1.key.pub",
    "--root",
    "r2.key.pub",
    "--root",
    "r3.key.pub",
    "--threshold",
    "2",
];

impl Fleet {
    fn new() -> Fleet {
        let dir = tempdir();
        for r in ["r1", "r2", "r3"] {
            keygen(dir.path(), r);
        }
        let ops = keygen(dir.path(), "ops");
        fs::create_dir(dir.path().join("policy")).unwrap();
        fs::copy(
            dir.path().join("ops.key.pub"),
            dir.path().join("policy/ops.key.pub"),
        )
        .unwrap();
        Fleet { dir, ops }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn run(&self, args: &[&str]) -> Output {
        edgectl(self.path(), args)
    }

    /// Writes `policy/<name>.toml` and signs it with `roots` into `<name>.cbor`.
    fn sign(&self, name: &str, policy: &str, roots: &[&str]) -> Output {
        fs::write(self.path().join(format!("policy/{name}.toml")), policy).unwrap();
        let policy_path = format!("policy/{name}.toml");
        let out = format!("{name}.cbor");
        let mut args = vec!["trust", "sign", "--policy", &policy_path, "--out", &out];
        let keys: Vec<String> = roots.iter().map(|r| format!("{r}.key")).collect();
        for k in &keys {
            args.extend(["--root-key", k]);
        }
        self.run(&args)
    }

    /// `sensor-a` (module name `name`) signed by `key` into `<name>.bundle`.
    fn bundle(&self, name: &str, key: &str) -> String {
        fs::write(self.path().join("m.wasm"), support::tiny_wasm()).unwrap();
        fs::write(
            self.path().join(format!("{name}.toml")),
            format!("name = \"{name}\"\nversion = \"1\"\nseq = 1\n"),
        )
        .unwrap();
        let out = format!("{name}.bundle");
        ok(self.run(&[
            "sign",
            "--key",
            &format!("{key}.key"),
            "--wasm",
            "m.wasm",
            "--manifest",
            &format!("{name}.toml"),
            "--out",
            &out,
        ]));
        out
    }

    /// `edgectl inspect --trust-doc <doc> <roots> <extra...> <bundle>`.
    fn inspect_as(&self, doc: &str, extra: &[&str], bundle: &str) -> Output {
        let mut args = vec!["inspect", "--trust-doc", doc];
        args.extend(ROOTS);
        args.extend(extra);
        args.push(bundle);
        self.run(&args)
    }
}

const SCOPED: &str = r#"
version = 1
[[keys]]
public_key = "ops.key.pub"
modules = ["sensor-*"]
groups = ["lab"]
"#;

#[test]
fn a_policy_with_relative_key_paths_is_signed_and_verifies_under_the_roots() {
    let f = Fleet::new();
    let (out, _) = ok(f.sign("trust", SCOPED, &["r1", "r2"]));
    assert!(
        out.contains("signed trust document version 1 -> trust.cbor"),
        "{out}"
    );
    assert!(
        out.contains(&format!("{} modules=[sensor-*] groups=[lab]", f.ops)),
        "{out}"
    );

    // Without roots: printed, marked as not checked.
    let (out, _) = ok(f.run(&["trust", "inspect", "trust.cbor"]));
    assert!(out.contains("NOT CHECKED"), "{out}");
    assert!(out.contains("version    1"), "{out}");

    // With the devices' roots: verified.
    let mut args = vec!["trust", "inspect"];
    args.extend(ROOTS);
    args.push("trust.cbor");
    let (out, _) = ok(f.run(&args));
    assert!(out.contains("signatures valid"), "{out}");
    assert!(out.contains("roots      unchanged"), "{out}");

    // JSON carries the key id and the scope.
    args.insert(2, "--json");
    let (out, _) = ok(f.run(&args));
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["verified"], true);
    assert_eq!(json["keys"][0]["key_id"], f.ops.as_str());
    assert_eq!(json["keys"][0]["modules"][0], "sensor-*");
    assert_eq!(json["signers"].as_array().unwrap().len(), 2);
}

#[test]
fn a_document_below_the_threshold_or_roots_that_do_not_add_up_are_refused_with_the_reason() {
    let f = Fleet::new();
    ok(f.sign("one", SCOPED, &["r1"]));
    let mut args = vec!["trust", "inspect"];
    args.extend(ROOTS);
    args.push("one.cbor");
    let err = fails(f.run(&args));
    assert!(err.contains("one.cbor"), "{err}");
    assert!(err.contains("the threshold is 2"), "{err}");

    ok(f.sign("two", SCOPED, &["r1", "r2"]));
    let err = fails(f.run(&[
        "trust",
        "inspect",
        "--root",
        "r1.key.pub",
        "--threshold",
        "2",
        "two.cbor",
    ]));
    assert!(
        err.contains("threshold 2 must be between 1 and the number of roots (1)"),
        "{err}"
    );
    let err = fails(f.run(&["trust", "inspect", "--root", "r1.key.pub", "two.cbor"]));
    assert!(err.contains("--root needs --threshold"), "{err}");
}

#[test]
fn a_root_rotation_needs_the_new_roots_signatures_and_says_so() {
    let f = Fleet::new();
    for r in ["r4", "r5", "r6"] {
        keygen(f.path(), r);
        fs::copy(
            f.path().join(format!("{r}.key.pub")),
            f.path().join(format!("policy/{r}.key.pub")),
        )
        .unwrap();
    }
    let rotation = format!(
        "{SCOPED}\n[roots]\npublic_keys = [\"r4.key.pub\", \"r5.key.pub\", \"r6.key.pub\"]\nthreshold = 2\n"
    );
    // Only the old roots: a document no device could accept is not made.
    let err = fails(f.sign("rot", &rotation, &["r1", "r2"]));
    assert!(err.contains("only 0 of the new roots signed it"), "{err}");
    assert!(!f.path().join("rot.cbor").exists());

    let (out, warn) = ok(f.sign("rot", &rotation, &["r1", "r2", "r4", "r5"]));
    assert!(out.contains("roots      ROTATED to 2 of ["), "{out}");
    assert!(warn.contains("warning"), "{warn}");
    assert!(warn.contains("current roots AND"), "{warn}");

    // Devices on the old roots accept it and move to the new ones.
    let mut args = vec!["trust", "inspect"];
    args.extend(ROOTS);
    args.push("rot.cbor");
    let (out, _) = ok(f.run(&args));
    assert!(out.contains("devices move to roots 2 of ["), "{out}");

    // Devices already on the new roots accept it too (r4 and r5 signed it).
    let new_roots = [
        "--root",
        "r4.key.pub",
        "--root",
        "r5.key.pub",
        "--root",
        "r6.key.pub",
        "--threshold",
        "2",
    ];
    let mut args = vec!["trust", "inspect"];
    args.extend(new_roots);
    args.push("rot.cbor");
    ok(f.run(&args));
}

#[test]
fn an_unknown_key_in_a_policy_is_refused_naming_the_file() {
    let f = Fleet::new();
    let err = fails(f.sign(
        "typo",
        &format!("{SCOPED}\nmodule = \"x\"\n"),
        &["r1", "r2"],
    ));
    assert!(err.contains("policy/typo.toml"), "{err}");
    assert!(err.contains("unknown field"), "{err}");

    let err = fails(f.sign(
        "badid",
        "version = 1\nrevoked = [\"not-a-key-id\"]\n",
        &["r1", "r2"],
    ));
    assert!(err.contains("is not a key id"), "{err}");

    // A missing key file is named as the resolved path.
    let err = fails(f.sign(
        "missing",
        "version = 1\n[[keys]]\npublic_key = \"nope.pub\"\n",
        &["r1", "r2"],
    ));
    assert!(err.contains("policy/nope.pub"), "{err}");
}

#[test]
fn inspect_with_a_trust_document_verifies_a_bundle_as_a_device_would() {
    let f = Fleet::new();
    ok(f.sign("trust", SCOPED, &["r1", "r2"]));
    let sensor = f.bundle("sensor-a", "ops");
    let blinky = f.bundle("blinky", "ops");

    let (out, _) = ok(f.inspect_as(
        "trust.cbor",
        &["--device", "pi-1", "--group", "lab"],
        &sensor,
    ));
    assert!(out.contains("trust document version 1"), "{out}");
    assert!(out.contains(&format!("valid, by key {}", f.ops)), "{out}");

    let err = fails(f.inspect_as(
        "trust.cbor",
        &["--device", "pi-1", "--group", "lab"],
        &blinky,
    ));
    assert!(err.contains("may not sign module \"blinky\""), "{err}");

    let err = fails(f.inspect_as(
        "trust.cbor",
        &["--device", "pi-2", "--group", "attic"],
        &sensor,
    ));
    assert!(err.contains("its scope is groups [\"lab\"]"), "{err}");

    // --trust and --trust-doc together: a usage error.
    let mut args = vec![
        "inspect",
        "--trust",
        "ops.key.pub",
        "--trust-doc",
        "trust.cbor",
    ];
    args.extend(ROOTS);
    args.push(&sensor);
    let err = fails(f.run(&args));
    assert!(err.contains("cannot be used with"), "{err}");
}

#[test]
fn inspect_with_a_trust_document_refuses_a_revoked_key() {
    let f = Fleet::new();
    keygen(f.path(), "ops2");
    fs::copy(
        f.path().join("ops2.key.pub"),
        f.path().join("policy/ops2.key.pub"),
    )
    .unwrap();
    let policy = format!(
        "version = 2\nrevoked = [\"{}\"]\n[[keys]]\npublic_key = \"ops2.key.pub\"\n",
        f.ops
    );
    let (out, _) = ok(f.sign("v2", &policy, &["r2", "r3"]));
    assert!(out.contains(&format!("revoked    {}", f.ops)), "{out}");
    let old = f.bundle("sensor-a", "ops");
    let err = fails(f.inspect_as("v2.cbor", &["--device", "pi-1"], &old));
    assert!(
        err.contains(&format!(
            "key {} is revoked by trust document version 2",
            f.ops
        )),
        "{err}"
    );
    let new = f.bundle("sensor-b", "ops2");
    ok(f.inspect_as("v2.cbor", &["--device", "pi-1"], &new));

    // The same by the key's file; listed once whichever way it is named.
    let policy = format!(
        "version = 3\nrevoked = [\"{}\"]\nrevoked_keys = [\"ops.key.pub\"]\n[[keys]]\npublic_key = \"ops2.key.pub\"\n",
        f.ops
    );
    let (out, _) = ok(f.sign("v3", &policy, &["r2", "r3"]));
    assert!(out.contains(&format!("revoked    {}\n", f.ops)), "{out}");
    let err = fails(f.inspect_as("v3.cbor", &["--device", "pi-1"], &old));
    assert!(
        err.contains("is revoked by trust document version 3"),
        "{err}"
    );
}

#[test]
fn publish_puts_the_document_retained_on_the_trust_topic() {
    let f = Fleet::new();
    ok(f.sign("trust", SCOPED, &["r1", "r2"]));
    fs::write(f.path().join("junk.cbor"), b"not a trust document").unwrap();
    let port = support::start_rumqttd();
    let url = format!("mqtt://127.0.0.1:{port}");
    let err = fails(f.run(&["trust", "publish", "--broker", &url, "junk.cbor"]));
    assert!(err.contains("junk.cbor"), "{err}");

    let mut args = vec!["trust", "publish", "--broker", &url];
    args.extend(ROOTS);
    args.push("trust.cbor");
    let (out, _) = ok(f.run(&args));
    assert!(out.contains("version 1"), "{out}");
    assert!(out.contains("to edge/trust (retained)"), "{out}");

    let retained = retained(&url, "edge/trust");
    assert_eq!(retained, fs::read(f.path().join("trust.cbor")).unwrap());
}

/// The retained message on `topic`, read by a new subscriber.
fn retained(url: &str, topic: &str) -> Vec<u8> {
    use edge_agent::mqtt::{self, BrokerUrl, ClientSettings};
    use rumqttc::{Event, Packet, QoS};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let settings = ClientSettings {
            client_id: "trust-reader".into(),
            url: BrokerUrl::parse(url).unwrap(),
            tls: Default::default(),
            keep_alive: Duration::from_secs(5),
            max_packet_bytes: 1 << 20,
            last_will: None,
            clean_session: true,
        };
        let (client, mut eventloop) = mqtt::connect(&settings, 16).unwrap();
        client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let Event::Incoming(Packet::Publish(p)) = eventloop.poll().await.unwrap() {
                    assert!(p.retain, "not a retained message");
                    return p.payload.to_vec();
                }
            }
        })
        .await
        .expect("the retained trust document within 20 s")
    })
}

// The document's bytes, through the library.

fn roots() -> Roots {
    Roots::new([key(1).verifying_key(), key(2).verifying_key()], 2).unwrap()
}

fn payload() -> TrustPayload {
    TrustPayload {
        version: 1,
        issued_at: 1_767_225_600,
        expires_at: None,
        keys: vec![KeyGrant {
            key: Fixed(key(0x0a).verifying_key().to_bytes()),
            modules: Some(vec!["sensor-*".into()]),
            groups: None,
            not_after: None,
        }],
        revoked: vec![],
        seq_resets: vec![],
        roots: None,
    }
}

/// The example in docs/protocol.md: roots seeds 0x01 and 0x02, a key of seed 0x0a granted
/// modules `sensor-*`, version 1, issued 2026-01-01.
fn example_document() -> Vec<u8> {
    trust::sign(&payload(), &[key(1), key(2)]).unwrap()
}

/// A rotation from roots {1, 2} to {4, 5, 6} (threshold 2), signed by 1, 2, 4, 5, revoking a key
/// and resetting a seq.
fn rotation_document() -> Vec<u8> {
    let mut p = payload();
    p.version = 2;
    p.expires_at = Some(NOW + 1000);
    p.revoked = vec![Fixed(KeyId::of(&key(0x0b).verifying_key()).0)];
    p.seq_resets = vec![trust::SeqReset {
        module: "sensor-a".into(),
        seq: 41,
    }];
    p.roots = Some(RootKeys {
        keys: [4, 5, 6]
            .iter()
            .map(|s| Fixed(key(*s).verifying_key().to_bytes()))
            .collect(),
        threshold: 2,
    });
    trust::sign(&p, &[key(1), key(2), key(4), key(5)]).unwrap()
}

fn assert_every_single_byte_change_is_refused(doc: &[u8]) {
    trust::verify(doc, &roots(), 0, NOW).expect("the original is valid");
    for i in 0..doc.len() {
        let mut b = doc.to_vec();
        b[i] = b[i].wrapping_add(1);
        assert!(
            trust::verify(&b, &roots(), 0, NOW).is_err(),
            "byte {i} + 1 was accepted"
        );
    }
}

#[test]
fn every_byte_of_a_trust_document_plus_one_is_refused() {
    assert_every_single_byte_change_is_refused(&example_document());
}

#[test]
fn every_byte_of_a_root_rotation_plus_one_is_refused() {
    assert_every_single_byte_change_is_refused(&rotation_document());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn changing_any_single_byte_of_a_trust_document_to_any_other_value_is_refused(
        pos in any::<prop::sample::Index>(),
        delta in 1u8..=255,
        rotation in any::<bool>(),
    ) {
        thread_local! {
            static FIXTURE: (Vec<u8>, Vec<u8>, Roots) =
                (example_document(), rotation_document(), roots());
        }
        FIXTURE.with(|(doc, rot, roots)| {
            let mut b = if rotation { rot.clone() } else { doc.clone() };
            let i = pos.index(b.len());
            b[i] = b[i].wrapping_add(delta);
            prop_assert!(
                trust::verify(&b, roots, 0, NOW).is_err(),
                "byte {} + {} accepted", i, delta
            );
            // The display reader never panics on it either.
            let _ = trust::read_unverified(&b);
            Ok(())
        })?;
    }
}

#[test]
fn the_trust_document_example_in_the_protocol_doc_is_what_the_code_produces() {
    let doc =
        fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md")).unwrap();
    let start = doc
        .find("<!-- example-trust-begin -->")
        .expect("begin marker");
    let end = doc.find("<!-- example-trust-end -->").expect("end marker");
    let hex_lines: String = doc[start..end]
        .lines()
        .filter(|l| l.starts_with("    "))
        .filter_map(|l| l.split('|').next())
        .collect::<Vec<_>>()
        .join(" ");
    let documented = support::unhex(&hex_lines);
    let produced = example_document();
    assert_eq!(
        hex::encode(&documented),
        hex::encode(&produced),
        "docs/protocol.md's trust document example is stale; regenerate it with \
         `cargo test -p edge-agent --test it print_example_trust_document -- --ignored --nocapture`"
    );
    // And it is what a device provisioned with those roots accepts.
    let accepted = trust::verify(&documented, &roots(), 0, NOW).unwrap();
    assert_eq!(accepted.policy.version, 1);
    assert_eq!(accepted.signers.len(), 2, "both roots' signatures verified");
}

#[test]
#[ignore = "prints the docs/protocol.md trust document example"]
fn print_example_trust_document() {
    let b = example_document();
    for chunk in b.chunks(16) {
        println!("    {}", hex::encode(chunk));
    }
    println!(
        "roots {} {}, granted {}",
        KeyId::of(&key(1).verifying_key()),
        KeyId::of(&key(2).verifying_key()),
        KeyId::of(&key(0x0a).verifying_key())
    );
}
