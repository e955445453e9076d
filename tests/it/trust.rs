//! Trust-document mode on real agents: a real mosquitto, real `edge-agent` processes, real sled
//! stores. Roots sign versioned trust documents that grant, scope and revoke signing keys; the
//! documents travel retained on `<prefix>/trust`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use edge_agent::core::keys::{self, KeyId};
use edge_agent::core::protocol::{EventKind, ModuleState};
use edge_agent::core::topics::Topics;
use edge_agent::core::trust::{self, Fixed, KeyGrant, Roots, SeqReset, TrustPayload};
use edge_agent::store::InstallState;

use crate::support::operator::TICK_MS;
use crate::support::*;

/// The roots: seeds 21, 22, 23 (threshold 2), their public key files.
struct Fleet {
    _dir: tempfile::TempDir,
    roots: Vec<PathBuf>,
}

impl Fleet {
    fn new() -> Fleet {
        let dir = tempdir();
        let roots = [21u8, 22, 23]
            .iter()
            .map(|s| {
                let path = dir.path().join(format!("r{s}.pub"));
                std::fs::write(&path, keys::public_key_pem(&key(*s).verifying_key())).unwrap();
                path
            })
            .collect();
        Fleet { _dir: dir, roots }
    }

    fn setup(&self, device: &str, url: &str) -> AgentSetup {
        AgentSetup::new(device, url).trust_roots(&self.roots, 2)
    }
}

fn grant(k: &SigningKey) -> KeyGrant {
    KeyGrant {
        key: Fixed(k.verifying_key().to_bytes()),
        modules: None,
        groups: None,
        not_after: None,
    }
}

fn kid(k: &SigningKey) -> KeyId {
    KeyId::of(&k.verifying_key())
}

fn doc(version: u64, keys: Vec<KeyGrant>, revoked: &[&SigningKey]) -> TrustPayload {
    TrustPayload {
        version,
        issued_at: unix_now(),
        expires_at: None,
        keys,
        revoked: revoked.iter().map(|k| Fixed(kid(k).0)).collect(),
        seq_resets: vec![],
        roots: None,
    }
}

/// Signed by the root keys of these seeds.
fn sign(p: &TrustPayload, seeds: &[u8]) -> Vec<u8> {
    let keys: Vec<SigningKey> = seeds.iter().map(|s| key(*s)).collect();
    trust::sign(p, &keys).unwrap()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An install of the heartbeat guest, named `name`, at `seq`, signed by `k`.
fn bundle(k: &SigningKey, name: &str, seq: u64) -> Vec<u8> {
    bundle_with(k, name, seq, |_| {})
}

fn bundle_with(
    k: &SigningKey,
    name: &str,
    seq: u64,
    edit: impl FnOnce(&mut edge_agent::core::manifest::Manifest),
) -> Vec<u8> {
    let (mut m, wasm) = guest("heartbeat");
    m.name = name.into();
    m.seq = seq;
    m.version = format!("1.0.{seq}");
    m.limits.tick_interval_ms = TICK_MS;
    m.issued_at = Some(unix_now());
    edit(&mut m);
    signed(m, &wasm, k)
}

fn publish_trust(obs: &Observer, document: &[u8]) {
    obs.publish(&Topics::trust_document("edge"), document, true);
}

/// Waits for an event of `kind` from `device` (any module) whose reason contains `text`.
fn event_with(obs: &Observer, since: usize, device: &str, kind: EventKind, text: &str) -> String {
    obs.wait(
        since,
        &format!("{} event with {text:?}", kind.as_str()),
        |s| match s {
            Seen::Event { device: d, event }
                if d == device
                    && event.kind == kind
                    && event.reason.as_deref().is_some_and(|r| r.contains(text)) =>
            {
                event.reason.clone()
            }
            _ => None,
        },
    )
}

fn trust_version(obs: &Observer, since: usize, device: &str, version: u64) {
    obs.status(since, device, &format!("trust version {version}"), |s| {
        s.online && s.trust_version == Some(version)
    });
}

#[test]
fn keys_are_granted_rotated_and_revoked_by_trust_documents_over_mqtt() {
    let fleet = Fleet::new();
    let broker = Mosquitto::start();
    let op = Operator::new(1);
    let (a, b) = (key(1), key(2));
    let obs = Observer::connect(&broker.url());
    let mut agent = Agent::start(&fleet.setup("pi-1", &broker.url()), &op);
    let status = obs.status(0, "pi-1", "online", |s| s.online);
    assert_eq!(status.trust_version, Some(0));
    assert!(status.trust_note.is_some(), "{status:?}");

    // No document yet: even a bundle by a key the first document will grant is refused.
    let m = obs.mark();
    obs.deploy("pi-1", "sensor-a", &bundle(&a, "sensor-a", 1));
    event_with(&obs, m, "pi-1", EventKind::Rejected, "no trust document");

    // Version 1 grants A: the refused bundle is evaluated again and installs.
    let m = obs.mark();
    publish_trust(&obs, &sign(&doc(1, vec![grant(&a)], &[]), &[21, 22]));
    event_with(
        &obs,
        m,
        "pi-1",
        EventKind::TrustUpdated,
        "version 1 in effect",
    );
    obs.running(m, "pi-1", "sensor-a", 1);
    trust_version(&obs, m, "pi-1", 1);

    // B is not a signing key yet.
    let m = obs.mark();
    obs.deploy("pi-1", "blinky-b", &bundle(&b, "blinky-b", 1));
    event_with(
        &obs,
        m,
        "pi-1",
        EventKind::Rejected,
        "is not a signing key in trust document version 1",
    );
    // Rotation, step 1: version 2 grants A and B; B's bundle installs.
    let m = obs.mark();
    publish_trust(
        &obs,
        &sign(&doc(2, vec![grant(&a), grant(&b)], &[]), &[22, 23]),
    );
    obs.running(m, "pi-1", "blinky-b", 1);
    // Step 2: version 3 drops A (no revocation): what A signed keeps running, new bundles by
    // A are refused.
    let m = obs.mark();
    publish_trust(&obs, &sign(&doc(3, vec![grant(&b)], &[]), &[21, 23]));
    trust_version(&obs, m, "pi-1", 3);
    let m = obs.mark();
    obs.deploy("pi-1", "sensor-a", &bundle(&a, "sensor-a", 2));
    event_with(
        &obs,
        m,
        "pi-1",
        EventKind::Rejected,
        "is not a signing key in trust document version 3",
    );
    let s = obs.status(m, "pi-1", "sensor-a still runs", |s| {
        module_in(s, "sensor-a").is_some_and(|x| x.seq == 1 && is_running(x))
    });
    assert!(module_in(&s, "blinky-b").is_some_and(is_running));

    // Version 4 revokes B (and grants A again): exactly B's module stops, reported.
    let m = obs.mark();
    publish_trust(&obs, &sign(&doc(4, vec![grant(&a)], &[&b]), &[21, 22]));
    let e = obs.event(m, "pi-1", EventKind::Revoked, "blinky-b");
    assert!(
        e.reason
            .as_deref()
            .unwrap_or_default()
            .contains(&kid(&b).to_string()),
        "{e:?}"
    );
    let s = obs.status(m, "pi-1", "blinky-b revoked", |s| {
        module_in(s, "blinky-b").is_some_and(|x| x.state == ModuleState::Revoked)
    });
    assert!(module_in(&s, "sensor-a").is_some_and(is_running), "{s:?}");
    assert_eq!(s.trust_version, Some(4));
    let m = obs.mark();
    obs.deploy("pi-1", "blinky-b", &bundle(&b, "blinky-b", 2));
    event_with(
        &obs,
        m,
        "pi-1",
        EventKind::Rejected,
        "is revoked by trust document version 4",
    );

    // A replayed older document is refused by version.
    let m = obs.mark();
    publish_trust(
        &obs,
        &sign(&doc(2, vec![grant(&a), grant(&b)], &[]), &[22, 23]),
    );
    event_with(
        &obs,
        m,
        "pi-1",
        EventKind::TrustRejected,
        "version 2 is not above the version in effect, 4",
    );

    // After a restart: version 4 from the store, B's module still revoked, the replay still
    // refused (the retained message is the replayed version 2).
    agent.terminate();
    let m = obs.mark();
    agent.start_again();
    let s = obs.status(m, "pi-1", "online again at version 4", |s| {
        s.online && s.trust_version == Some(4)
    });
    assert_eq!(
        module_in(&s, "blinky-b").map(|x| x.state),
        Some(ModuleState::Revoked),
        "{s:?}"
    );
    event_with(
        &obs,
        m,
        "pi-1",
        EventKind::TrustRejected,
        "version 2 is not above the version in effect, 4",
    );
    // An operator's restart cannot bring a revoked module back ...
    let m = obs.mark();
    obs.publish("edge/pi-1/control/restart/blinky-b", b"", false);
    event_with(&obs, m, "pi-1", EventKind::Failed, "restart refused");
    // ... a bundle under a valid key replaces it.
    let m = obs.mark();
    obs.deploy("pi-1", "blinky-b", &bundle(&a, "blinky-b", 3));
    obs.running(m, "pi-1", "blinky-b", 3);
    let store_state = {
        agent.terminate();
        let store = agent.store();
        let t = store.trust().unwrap().unwrap();
        (t.version, store.module("blinky-b").unwrap().unwrap().state)
    };
    assert_eq!(store_state, (4, InstallState::Active));
}

#[test]
fn documents_need_the_threshold_of_distinct_roots_and_rotations_both_sets() {
    let fleet = Fleet::new();
    let broker = Mosquitto::start();
    let op = Operator::new(1);
    let obs = Observer::connect(&broker.url());
    let _agent = Agent::start(&fleet.setup("pi-1", &broker.url()), &op);
    obs.status(0, "pi-1", "online", |s| s.online);
    let a = key(1);
    let refused = |document: Vec<u8>, why: &str| {
        let m = obs.mark();
        publish_trust(&obs, &document);
        event_with(&obs, m, "pi-1", EventKind::TrustRejected, why);
    };
    // One root of two.
    refused(
        sign(&doc(1, vec![grant(&a)], &[]), &[21]),
        "signed by 1 of the current roots",
    );
    // A root and a stranger.
    refused(
        sign(&doc(1, vec![grant(&a)], &[]), &[21, 99]),
        "signed by 1 of the current roots",
    );
    // The same root twice: built by hand, since trust::sign refuses it.
    let twice = {
        let one = sign(&doc(1, vec![grant(&a)], &[]), &[21]);
        let mut cose =
            <coset::CoseSign as coset::TaggedCborSerializable>::from_tagged_slice(&one).unwrap();
        cose.signatures.push(cose.signatures[0].clone());
        coset::TaggedCborSerializable::to_tagged_vec(cose).unwrap()
    };
    refused(twice, "signed it more than once");

    // Root rotation to 24, 25, 26 (threshold 2), signed by the old roots only: refused.
    let mut rotate = doc(1, vec![grant(&a)], &[]);
    rotate.roots = Some(
        Roots::new([24u8, 25, 26].map(|s| key(s).verifying_key()), 2)
            .unwrap()
            .to_wire(),
    );
    refused(
        sign(&rotate, &[21, 22]),
        "only 0 of the new roots signed it",
    );
    // By the new roots only: refused.
    refused(sign(&rotate, &[24, 25]), "signed by 0 of the current roots");
    // By both: accepted.
    let m = obs.mark();
    publish_trust(&obs, &sign(&rotate, &[21, 22, 24, 25]));
    event_with(&obs, m, "pi-1", EventKind::TrustUpdated, "roots rotated");
    trust_version(&obs, m, "pi-1", 1);
    // From now on the old roots are not enough; the new ones are.
    refused(
        sign(&doc(2, vec![grant(&a)], &[]), &[21, 22, 23]),
        "signed by 0 of the current roots",
    );
    let m = obs.mark();
    publish_trust(&obs, &sign(&doc(2, vec![grant(&a)], &[]), &[25, 26]));
    trust_version(&obs, m, "pi-1", 2);
    let m = obs.mark();
    obs.deploy("pi-1", "sensor-a", &bundle(&a, "sensor-a", 1));
    obs.running(m, "pi-1", "sensor-a", 1);
}

#[test]
fn scoped_keys_sign_only_their_modules_and_groups_and_removals_are_scoped_too() {
    let fleet = Fleet::new();
    let broker = Mosquitto::start();
    let op = Operator::new(1);
    let obs = Observer::connect(&broker.url());
    let _lab = Agent::start(&fleet.setup("pi-1", &broker.url()).groups(&["lab"]), &op);
    let _barn = Agent::start(&fleet.setup("pi-2", &broker.url()).groups(&["barn"]), &op);
    obs.status(0, "pi-1", "online", |s| s.online);
    obs.status(0, "pi-2", "online", |s| s.online);
    let (sensors, lab, ops) = (key(1), key(2), key(3));
    let mut payload = doc(1, vec![], &[]);
    payload.keys = vec![
        KeyGrant {
            modules: Some(vec!["sensor-*".into()]),
            ..grant(&sensors)
        },
        KeyGrant {
            groups: Some(vec!["lab".into()]),
            ..grant(&lab)
        },
        grant(&ops),
    ];
    let m = obs.mark();
    publish_trust(&obs, &sign(&payload, &[21, 22]));
    trust_version(&obs, m, "pi-1", 1);
    trust_version(&obs, m, "pi-2", 1);

    // The sensors key: sensor-* only.
    let m = obs.mark();
    obs.deploy("pi-1", "sensor-a", &bundle(&sensors, "sensor-a", 1));
    obs.running(m, "pi-1", "sensor-a", 1);
    obs.deploy("pi-1", "blinky", &bundle(&sensors, "blinky", 1));
    event_with(
        &obs,
        m,
        "pi-1",
        EventKind::Rejected,
        "may not sign module \"blinky\"",
    );

    // The lab key: devices in group lab only, through the group topic both follow.
    let m = obs.mark();
    obs.deploy_group("lab", "lab-tool", &bundle(&lab, "lab-tool", 1));
    obs.deploy("pi-2", "lab-tool", &bundle(&lab, "lab-tool", 1));
    obs.running(m, "pi-1", "lab-tool", 1);
    event_with(
        &obs,
        m,
        "pi-2",
        EventKind::Rejected,
        "its scope is groups [\"lab\"]",
    );

    // A removal is a bundle like any other: the sensors key cannot remove a module out of its
    // scope (installed by the ops key), the ops key can.
    let m = obs.mark();
    obs.deploy("pi-1", "blinky", &bundle(&ops, "blinky", 2));
    obs.running(m, "pi-1", "blinky", 2);
    let removal = |k: &SigningKey, seq: u64| {
        let mut m = edge_agent::core::manifest::Manifest::from_toml(&format!(
            "name = \"blinky\"\nseq = {seq}\naction = \"remove\"\n"
        ))
        .unwrap();
        m.issued_at = Some(unix_now());
        edge_agent::core::bundle::sign(m, None, k, 1 << 20).unwrap()
    };
    let m = obs.mark();
    obs.deploy("pi-1", "blinky", &removal(&sensors, 3));
    event_with(
        &obs,
        m,
        "pi-1",
        EventKind::Rejected,
        "may not sign module \"blinky\"",
    );
    let s = obs.status(m, "pi-1", "blinky still runs", |s| {
        module_in(s, "blinky").is_some_and(is_running)
    });
    assert!(module_in(&s, "blinky").is_some());
    let m = obs.mark();
    obs.deploy("pi-1", "blinky", &removal(&ops, 4));
    obs.event(m, "pi-1", EventKind::Removed, "blinky");
}

#[test]
fn a_device_whose_clock_reads_1970_refuses_what_expired_before_its_time_floor() {
    let fleet = Fleet::new();
    let broker = Mosquitto::start();
    let op = Operator::new(1);
    let obs = Observer::connect(&broker.url());
    // The clock reads 2 January 1970 (a board without a real-time clock, before NTP).
    let offset = -(i64::try_from(unix_now()).unwrap() - 86_400);
    let mut agent = Agent::start(
        &fleet
            .setup("pi-1", &broker.url())
            .env("EDGE_AGENT_CLOCK_OFFSET_S", &offset.to_string()),
        &op,
    );
    let s = obs.status(0, "pi-1", "online", |s| s.online);
    assert!(
        s.ts_ms < 2 * 86_400_000,
        "the clock is not in 1970: {}",
        s.ts_ms
    );
    let a = key(1);
    let now = unix_now();
    // The document raises the time floor to its issued_at (now).
    let m = obs.mark();
    publish_trust(&obs, &sign(&doc(1, vec![grant(&a)], &[]), &[21, 22]));
    let s = obs.status(m, "pi-1", "trust version 1, clock behind", |s| {
        s.trust_version == Some(1) && s.clock_behind_s.is_some()
    });
    assert!(
        s.clock_behind_s.unwrap() > now - 2 * 86_400 - 60,
        "{:?}",
        s.clock_behind_s
    );
    // Expired an hour ago: by the 1970 clock it would be years ahead; by the floor it expired.
    let expired = |seq| {
        bundle_with(&a, "sensor-a", seq, |m| {
            m.expires_at = Some(now - 3600);
            m.issued_at = Some(now - 7200);
        })
    };
    let m = obs.mark();
    obs.deploy("pi-1", "sensor-a", &expired(1));
    event_with(&obs, m, "pi-1", EventKind::Rejected, "expired at unix time");
    // Valid for another hour: installs.
    let m = obs.mark();
    obs.deploy(
        "pi-1",
        "sensor-a",
        &bundle_with(&a, "sensor-a", 2, |m| m.expires_at = Some(now + 3600)),
    );
    obs.running(m, "pi-1", "sensor-a", 2);
    // The floor is persisted: after a restart, still in 1970, still refused.
    agent.terminate();
    assert!(agent.store().time_floor() >= now);
    let m = obs.mark();
    agent.start_again();
    obs.status(m, "pi-1", "online again", |s| s.online);
    let m = obs.mark();
    obs.deploy("pi-1", "sensor-a", &expired(3));
    event_with(&obs, m, "pi-1", EventKind::Rejected, "expired at unix time");
}

#[test]
fn a_seq_poisoned_by_a_leaked_key_is_recovered_by_the_roots() {
    let fleet = Fleet::new();
    let broker = Mosquitto::start();
    let op = Operator::new(1);
    let obs = Observer::connect(&broker.url());
    let _agent = Agent::start(&fleet.setup("pi-1", &broker.url()), &op);
    obs.status(0, "pi-1", "online", |s| s.online);
    let (good, leaked) = (key(1), key(2));
    let m = obs.mark();
    publish_trust(
        &obs,
        &sign(&doc(1, vec![grant(&good), grant(&leaked)], &[]), &[21, 22]),
    );
    trust_version(&obs, m, "pi-1", 1);
    let m = obs.mark();
    obs.deploy("pi-1", "sensor-a", &bundle(&good, "sensor-a", 5));
    obs.running(m, "pi-1", "sensor-a", 5);
    // The leaked key pushes a huge seq.
    let poisoned = 1 << 50;
    let m = obs.mark();
    obs.deploy("pi-1", "sensor-a", &bundle(&leaked, "sensor-a", poisoned));
    obs.running(m, "pi-1", "sensor-a", poisoned);
    // The roots revoke the key and reset the floor to 5: the next good bundle is seq 6.
    let mut fix = doc(2, vec![grant(&good)], &[&leaked]);
    fix.seq_resets = vec![SeqReset {
        module: "sensor-a".into(),
        seq: 5,
    }];
    let m = obs.mark();
    publish_trust(&obs, &sign(&fix, &[21, 23]));
    obs.event(m, "pi-1", EventKind::Revoked, "sensor-a");
    event_with(
        &obs,
        m,
        "pi-1",
        EventKind::TrustUpdated,
        "seq floor of sensor-a lowered to 5",
    );
    let m = obs.mark();
    obs.deploy("pi-1", "sensor-a", &bundle(&good, "sensor-a", 6));
    obs.running(m, "pi-1", "sensor-a", 6);
    // The reset is not replayed by the same document again (its version is in effect).
    let m = obs.mark();
    publish_trust(&obs, &sign(&fix, &[22, 23]));
    event_with(
        &obs,
        m,
        "pi-1",
        EventKind::TrustRejected,
        "version 2 is not above",
    );
    obs.deploy("pi-1", "sensor-a", &bundle(&good, "sensor-a", 6));
    let s = obs.status(m, "pi-1", "sensor-a at 6", |s| {
        module_in(s, "sensor-a").is_some_and(|x| x.seq == 6 && is_running(x))
    });
    assert!(s.online);
}

#[test]
fn kill_9_during_trust_updates_leaves_the_old_or_the_new_document() {
    const DELAYS_MS: [u64; 10] = [0, 1, 2, 3, 5, 8, 12, 20, 35, 60];
    let started = Instant::now();
    let fleet = Fleet::new();
    let broker = Mosquitto::start();
    let op = Operator::new(1);
    let obs = Observer::connect(&broker.url());
    let mut agent = Agent::start(&fleet.setup("pi-1", &broker.url()), &op);
    let (a, b) = (key(1), key(2));
    let m = obs.mark();
    publish_trust(
        &obs,
        &sign(&doc(1, vec![grant(&a), grant(&b)], &[]), &[21, 22]),
    );
    trust_version(&obs, m, "pi-1", 1);
    obs.deploy("pi-1", "sensor-b", &bundle(&b, "sensor-b", 1));
    obs.running(m, "pi-1", "sensor-b", 1);
    let mut outcomes = Vec::new();
    for (round, delay) in (1u64..).zip(DELAYS_MS) {
        assert!(
            started.elapsed() < Duration::from_secs(150),
            "round {round} after {:?}",
            started.elapsed()
        );
        // Odd versions revoke B, even ones grant it again.
        let version = round + 1;
        let revoke = version % 2 == 1;
        let payload = if revoke {
            doc(version, vec![grant(&a)], &[&b])
        } else {
            doc(version, vec![grant(&a), grant(&b)], &[])
        };
        publish_trust(&obs, &sign(&payload, &[21, 22]));
        std::thread::sleep(Duration::from_millis(delay));
        agent.kill9();
        {
            let store = agent.store();
            let t = store.trust().unwrap().expect("a trust document in effect");
            assert!(
                t.version == version || t.version == version - 1,
                "round {round}: version {}, neither {} nor {version}",
                t.version,
                version - 1
            );
            let p = trust::Policy::from_accepted(&t.document).unwrap();
            assert_eq!(p.version, t.version, "round {round}");
            let state = store.module("sensor-b").unwrap().unwrap().state;
            // B's module is revoked exactly when a revoking version is in effect (or stays
            // revoked: nothing brings it back but a new bundle).
            if t.version % 2 == 1 && t.version > 1 {
                assert!(
                    matches!(state, InstallState::Revoked { .. }),
                    "round {round}: version {} in effect, sensor-b {state:?}",
                    t.version
                );
            }
            outcomes.push(t.version == version);
        }
        let m = obs.mark();
        agent.start_again();
        // The retained document is applied (again, if the kill came first).
        trust_version(&obs, m, "pi-1", version);
    }
    eprintln!(
        "kill -9 during trust updates: {} of {} rounds had the new document durable",
        outcomes.iter().filter(|n| **n).count(),
        outcomes.len()
    );
}

#[test]
fn a_fleet_of_ten_agents_takes_a_rotation_and_a_revocation() {
    // Ten agents on this machine; three under qemu-user (`cross/test-arm`), where every agent
    // is an emulated process and the point is the architecture, not the fleet's size.
    let emulated = std::env::var("EDGE_TEST_RUNNER").is_ok_and(|r| !r.trim().is_empty());
    let devices_n = if emulated { 3 } else { 10 };
    let fleet = Fleet::new();
    let broker = Mosquitto::start();
    let op = Operator::new(1);
    let obs = Observer::connect(&broker.url());
    let devices: Vec<String> = (0..devices_n).map(|i| format!("pi-{i}")).collect();
    let _agents: Vec<Agent> = devices
        .iter()
        .map(|d| Agent::start(&fleet.setup(d, &broker.url()).groups(&["all"]), &op))
        .collect();
    for d in &devices {
        obs.status(0, d, "online", |s| s.online);
    }
    let (old, new) = (key(1), key(2));
    let devices = &devices;
    let everywhere = |version: u64| {
        let m = obs.mark();
        let t0 = Instant::now();
        move |obs: &Observer| {
            for d in devices {
                trust_version(obs, m, d, version);
            }
            t0.elapsed()
        }
    };
    let v1 = sign(&doc(1, vec![grant(&old)], &[]), &[21, 22]);
    let wait = everywhere(1);
    publish_trust(&obs, &v1);
    wait(&obs);
    let m = obs.mark();
    obs.deploy_group("all", "sensor-a", &bundle(&old, "sensor-a", 1));
    for d in 0..devices_n {
        obs.running(m, &format!("pi-{d}"), "sensor-a", 1);
    }
    // Rotation: the new key granted beside the old one.
    let v2 = sign(&doc(2, vec![grant(&old), grant(&new)], &[]), &[21, 22]);
    let wait = everywhere(2);
    publish_trust(&obs, &v2);
    let rotation = wait(&obs);
    // Revocation of the old key: every device stops sensor-a.
    let v3 = sign(&doc(3, vec![grant(&new)], &[&old]), &[21, 22]);
    let wait = everywhere(3);
    publish_trust(&obs, &v3);
    let revocation = wait(&obs);
    for d in 0..devices_n {
        obs.status(0, &format!("pi-{d}"), "sensor-a revoked", |s| {
            module_in(s, "sensor-a").is_some_and(|x| x.state == ModuleState::Revoked)
        });
    }
    eprintln!(
        "trust documents on the wire: version 1 {} bytes, rotation (2 keys) {} bytes, \
         revocation {} bytes; publish -> all {devices_n} devices report the new version: \
         rotation {rotation:?}, revocation {revocation:?} (debug build; status every second)",
        v1.len(),
        v2.len(),
        v3.len()
    );
}

#[test]
fn on_the_shipped_fleet_broker_devices_read_the_trust_document_and_cannot_write_it() {
    let certs = Certs::new();
    let broker = Mosquitto::start_fleet(&certs);
    let fleet = Fleet::new();
    let op = Operator::new(1);
    let ops = Observer::connect_tls(&broker.url(), &certs.ca, &certs.client("ops-alice"));
    let setup = fleet
        .setup("dev-a", &broker.url())
        .tls(&certs.ca, certs.client("dev-a"));
    let _agent = Agent::start(&setup, &op);
    ops.status(0, "dev-a", "online", |s| s.online);
    let a = key(1);
    let m = ops.mark();
    publish_trust(&ops, &sign(&doc(1, vec![grant(&a)], &[]), &[21, 22]));
    trust_version(&ops, m, "dev-a", 1);
    // Another device's certificate cannot replace the document (the ACL drops its publish),
    // even with one that the roots signed.
    let intruder = Observer::connect_tls(&broker.url(), &certs.ca, &certs.client("dev-b"));
    intruder.publish(
        &Topics::trust_document("edge"),
        &sign(&doc(2, vec![], &[&a]), &[21, 22]),
        true,
    );
    std::thread::sleep(Duration::from_secs(2));
    let s = ops.status(m, "dev-a", "still at version 1", |s| s.online);
    assert_eq!(s.trust_version, Some(1), "{s:?}");
}

#[test]
fn a_trust_document_that_cannot_be_written_leaves_the_old_one_and_a_restart_with_room_applies_it() {
    let fleet = Fleet::new();
    let broker = Mosquitto::start();
    let op = Operator::new(1);
    let obs = Observer::connect(&broker.url());
    let mut agent = Agent::configure(&fleet.setup("pi-1", &broker.url()), &op);
    let _tmpfs = crate::recovery::Tmpfs::mount(agent.state_dir(), "32m");
    agent.start_again();
    obs.status(0, "pi-1", "online", |s| s.online);
    let (a, b) = (key(1), key(2));
    let m = obs.mark();
    publish_trust(
        &obs,
        &sign(&doc(1, vec![grant(&a), grant(&b)], &[]), &[21, 22]),
    );
    trust_version(&obs, m, "pi-1", 1);
    obs.deploy("pi-1", "sensor-b", &bundle(&b, "sensor-b", 1));
    obs.running(m, "pi-1", "sensor-b", 1);
    // The disk fills up; then version 2 revokes B.
    let filler = agent.state_dir().join("filler");
    crate::recovery::fill(&filler);
    publish_trust(&obs, &sign(&doc(2, vec![grant(&a)], &[&b]), &[21, 22]));
    // It cannot be made durable: the agent stops with an error rather than run on a store it
    // cannot trust.
    poll(Duration::from_secs(60), "the agent to stop", || {
        (!agent.running()).then_some(())
    });
    let exit = agent.exited();
    assert!(!exit.success(), "it stopped with an error: {exit}");
    // Room again (sled cannot even open a full disk): the store holds the old document.
    std::fs::remove_file(&filler).unwrap();
    {
        let store = agent.store();
        assert_eq!(
            store.trust().unwrap().unwrap().version,
            1,
            "the old document"
        );
        assert_eq!(
            store.module("sensor-b").unwrap().unwrap().state,
            InstallState::Active
        );
    }
    // A restart: the retained version 2 is applied.
    let m = obs.mark();
    agent.start_again();
    trust_version(&obs, m, "pi-1", 2);
    obs.status(m, "pi-1", "sensor-b revoked", |s| {
        module_in(s, "sensor-b").is_some_and(|x| x.state == ModuleState::Revoked)
    });
}
