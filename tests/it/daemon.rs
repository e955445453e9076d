//! The agent daemon against real brokers (a private mosquitto per test, mutual TLS, the embedded
//! rumqttd): deploys, upgrades, anti-rollback, rejections, removal, groups, automatic rollback,
//! broker and agent restarts, `kill -9` during installs, clean shutdown and the last will.
//!
//! Each test has its own broker, port, directories and agents; waits are bounded (see
//! `support/`). Modules tick every 50 ms so that a handful of ticks takes a fraction of a second.

use std::fs;
use std::time::{Duration, Instant};

use edge_agent::core::bundle;
use edge_agent::core::manifest::Sha256;
use edge_agent::core::protocol::{EventKind, ModuleState};
use edge_agent::runtime::kv::KvStore as _;
use edge_agent::store::{InstallState, Store};

use crate::support::{
    Agent, AgentSetup, Certs, Mosquitto, Observer, Operator, Seen, edgectl, edgectl_ok, is_running,
    module_in, poll, start_rumqttd,
};
use crate::support::{guest, key, signed};

/// Strictly increasing: a counter that never restarted.
fn assert_increasing(values: &[u64], what: &str) {
    assert!(
        values.windows(2).all(|w| w[0] < w[1]),
        "{what}: the counter went back: {values:?}"
    );
}

/// Deploys heartbeat with `edgectl deploy` to an agent on `url`, and checks telemetry, events,
/// status and `edgectl status`.
fn deploy_end_to_end(url: &str) {
    let op = Operator::new(1);
    let obs = Observer::connect(url);
    let _agent = Agent::start(&AgentSetup::new("pi-1", url), &op);
    obs.status(0, "pi-1", "online", |s| s.online);

    let m = obs.mark();
    let file = op.file("heartbeat.bundle", &op.bundle("heartbeat", 1, "heartbeat"));
    let out = edgectl_ok(&[
        "deploy",
        "--broker",
        url,
        "--device",
        "pi-1",
        file.to_str().unwrap(),
    ]);
    assert!(out.contains("heartbeat"), "{out}");

    let installed = obs.event(m, "pi-1", EventKind::Installed, "heartbeat");
    assert_eq!(installed.seq, Some(1));
    let n = obs.counter_at_least(m, "pi-1", "heartbeat", 3);
    assert!(n >= 3);
    let status = obs.running(m, "pi-1", "heartbeat", 1);
    assert!(status.calls >= 1 && status.restarts == 0, "{status:?}");
    assert_eq!(status.last_error, None);

    let json = edgectl_ok(&["status", "--broker", url, "--device", "pi-1", "--json"]);
    assert!(
        json.contains("\"online\":true") && json.contains("\"heartbeat\""),
        "{json}"
    );
}

#[test]
fn a_deployed_module_runs_and_its_telemetry_and_status_arrive() {
    let broker = Mosquitto::start();
    deploy_end_to_end(&broker.url());
}

#[test]
fn the_end_to_end_deploy_also_works_through_the_embedded_rumqttd_broker() {
    let port = start_rumqttd();
    deploy_end_to_end(&format!("mqtt://127.0.0.1:{port}"));
}

#[test]
fn an_upgrade_keeps_the_modules_key_value_state() {
    let broker = Mosquitto::start();
    let op = Operator::new(1);
    let obs = Observer::connect(&broker.url());
    let _agent = Agent::start(&AgentSetup::new("pi-1", &broker.url()), &op);

    obs.deploy(
        "pi-1",
        "kv-counter",
        &op.bundle("kv-counter", 1, "kv-counter"),
    );
    obs.running(0, "pi-1", "kv-counter", 1);
    let before = obs.counter_at_least(0, "pi-1", "kv-counter", 3);

    let m = obs.mark();
    obs.deploy(
        "pi-1",
        "kv-counter",
        &op.bundle("kv-counter", 2, "kv-counter"),
    );
    let installed = obs.event(m, "pi-1", EventKind::Installed, "kv-counter");
    assert_eq!(installed.seq, Some(2));
    let status = obs.running(m, "pi-1", "kv-counter", 2);
    assert_eq!(status.version, "1.0.2");
    let after_install = obs.mark();
    let next = obs.counter_at_least(after_install, "pi-1", "kv-counter", 1);
    assert!(
        next > before,
        "seq 2 started over at {next} (seq 1 had reached {before})"
    );
    assert_increasing(
        &obs.counters_since(0, "pi-1", "kv-counter"),
        "across the upgrade",
    );
}

#[test]
fn an_older_seq_deployed_after_a_newer_one_is_rejected_and_the_newer_keeps_running() {
    let broker = Mosquitto::start();
    let op = Operator::new(1);
    let obs = Observer::connect(&broker.url());
    let _agent = Agent::start(&AgentSetup::new("pi-1", &broker.url()), &op);

    obs.deploy(
        "pi-1",
        "kv-counter",
        &op.bundle("kv-counter", 2, "kv-counter"),
    );
    obs.running(0, "pi-1", "kv-counter", 2);
    let before = obs.counter_at_least(0, "pi-1", "kv-counter", 2);

    let m = obs.mark();
    obs.deploy(
        "pi-1",
        "kv-counter",
        &op.bundle("kv-counter", 1, "kv-counter"),
    );
    let rejected = obs.event(m, "pi-1", EventKind::Rejected, "kv-counter");
    let reason = rejected.reason.unwrap_or_default();
    assert!(
        reason.contains("seq 1 is not greater than the installed seq 2"),
        "{reason}"
    );

    let after = obs.mark();
    let status = obs.running(after, "pi-1", "kv-counter", 2);
    assert_eq!(status.restarts, 0);
    obs.counter_at_least(after, "pi-1", "kv-counter", before + 1);
    let kinds: Vec<EventKind> = obs.events_since(m, "pi-1").iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [EventKind::Rejected]);
}

/// The bundle with one byte of its COSE signature flipped.
fn with_bad_signature(bytes: &[u8]) -> Vec<u8> {
    let raw = bundle::decode(bytes, bundle::DEFAULT_MAX_BUNDLE_BYTES).unwrap();
    let start = raw.sign1.as_ptr() as usize - bytes.as_ptr() as usize;
    // The signature is the last 64 bytes of the COSE_Sign1.
    let at = start + raw.sign1.len() - 10;
    let mut out = bytes.to_vec();
    out[at] ^= 0x01;
    out
}

#[test]
fn bad_signatures_unknown_keys_and_tampered_wasm_are_rejected_and_change_nothing() {
    let broker = Mosquitto::start();
    let op = Operator::new(1);
    let obs = Observer::connect(&broker.url());
    let _agent = Agent::start(&AgentSetup::new("pi-1", &broker.url()), &op);
    obs.deploy("pi-1", "heartbeat", &op.bundle("heartbeat", 1, "heartbeat"));
    obs.running(0, "pi-1", "heartbeat", 1);

    let good = op.bundle("heartbeat", 2, "heartbeat");
    let untrusted = {
        let (mut m, wasm) = guest("heartbeat");
        m.seq = 2;
        m.limits.tick_interval_ms = crate::support::operator::TICK_MS;
        signed(m, &wasm, &key(2))
    };
    let mut tampered_wasm = good.clone();
    *tampered_wasm.last_mut().unwrap() ^= 0x01;
    let cases = [
        (
            "a tampered signature",
            with_bad_signature(&good),
            "signature does not verify",
        ),
        (
            "an untrusted key",
            untrusted,
            "which this device does not trust",
        ),
        ("tampered Wasm bytes", tampered_wasm, "Wasm SHA-256 is"),
    ];
    for (what, bytes, reason) in cases {
        let m = obs.mark();
        obs.deploy("pi-1", "heartbeat", &bytes);
        let rejected = obs.event(m, "pi-1", EventKind::Rejected, "heartbeat");
        let got = rejected.reason.unwrap_or_default();
        assert!(
            got.contains(reason),
            "{what}: reason {got:?} lacks {reason:?}"
        );
        // Nothing changed: seq 1 keeps running, never restarted, and keeps publishing.
        let after = obs.mark();
        let status = obs.running(after, "pi-1", "heartbeat", 1);
        assert_eq!(status.restarts, 0, "{what}");
        obs.counter_at_least(after, "pi-1", "heartbeat", 1);
        let kinds: Vec<EventKind> = obs.events_since(m, "pi-1").iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [EventKind::Rejected], "{what}");
    }
}

#[test]
fn a_signed_removal_stops_the_module_and_its_old_bundle_cannot_come_back() {
    let broker = Mosquitto::start();
    let url = broker.url();
    let op = Operator::new(1);
    let obs = Observer::connect(&url);
    let _agent = Agent::start(&AgentSetup::new("pi-1", &url), &op);
    let install = op.bundle("heartbeat", 1, "heartbeat");
    obs.deploy("pi-1", "heartbeat", &install);
    obs.running(0, "pi-1", "heartbeat", 1);
    obs.counter_at_least(0, "pi-1", "heartbeat", 1);

    let m = obs.mark();
    edgectl_ok(&[
        "remove",
        "--broker",
        &url,
        "--device",
        "pi-1",
        "--key",
        op.key_file.to_str().unwrap(),
        "--module",
        "heartbeat",
        "--seq",
        "2",
    ]);
    let removed = obs.event(m, "pi-1", EventKind::Removed, "heartbeat");
    assert_eq!(removed.seq, Some(2));
    obs.status(m, "pi-1", "heartbeat gone", |s| {
        s.online && module_in(s, "heartbeat").is_none()
    });

    // Telemetry stops: nothing from heartbeat across two more periodic reports (>= 1 s, 20 ticks).
    let quiet = obs.mark();
    let mut reports = 0;
    obs.wait(quiet, "two more status reports", |s| {
        if matches!(s, Seen::Status { device, .. } if device == "pi-1") {
            reports += 1;
        }
        (reports >= 2).then_some(())
    });
    assert_eq!(
        obs.counters_since(quiet, "pi-1", "heartbeat"),
        Vec::<u64>::new()
    );

    // The old install, published again, is refused: the seq is kept after the removal.
    let m = obs.mark();
    obs.deploy("pi-1", "heartbeat", &install);
    let rejected = obs.event(m, "pi-1", EventKind::Rejected, "heartbeat");
    let reason = rejected.reason.unwrap_or_default();
    assert!(
        reason.contains("seq 1 is not greater than the installed seq 2"),
        "{reason}"
    );
    let after = obs.mark();
    obs.status(after, "pi-1", "still no heartbeat", |s| {
        s.online && module_in(s, "heartbeat").is_none()
    });
    assert_eq!(
        obs.counters_since(quiet, "pi-1", "heartbeat"),
        Vec::<u64>::new()
    );
}

#[test]
fn a_group_deployment_reaches_every_agent_in_the_group() {
    let broker = Mosquitto::start();
    let url = broker.url();
    let op = Operator::new(1);
    let obs = Observer::connect(&url);
    let _a = Agent::start(&AgentSetup::new("pi-a", &url).groups(&["barn"]), &op);
    let _b = Agent::start(&AgentSetup::new("pi-b", &url).groups(&["barn"]), &op);
    obs.status(0, "pi-a", "online", |s| s.online);
    obs.status(0, "pi-b", "online", |s| s.online);

    let m = obs.mark();
    let file = op.file("heartbeat.bundle", &op.bundle("heartbeat", 1, "heartbeat"));
    edgectl_ok(&[
        "deploy",
        "--broker",
        &url,
        "--group",
        "barn",
        file.to_str().unwrap(),
    ]);
    for device in ["pi-a", "pi-b"] {
        obs.event(m, device, EventKind::Installed, "heartbeat");
        obs.running(m, device, "heartbeat", 1);
        obs.counter_at_least(m, device, "heartbeat", 2);
    }
}

#[test]
fn a_device_addressed_bundle_outranks_the_groups_bundle_for_the_same_module() {
    let broker = Mosquitto::start();
    let url = broker.url();
    let op = Operator::new(1);
    let obs = Observer::connect(&url);
    let _a = Agent::start(&AgentSetup::new("pi-a", &url).groups(&["barn"]), &op);
    // A second device in the group, with no bundle of its own: it shows the group's bundles
    // arrived.
    let _b = Agent::start(&AgentSetup::new("pi-b", &url).groups(&["barn"]), &op);

    obs.deploy_group("barn", "heartbeat", &op.bundle("heartbeat", 1, "heartbeat"));
    obs.running(0, "pi-a", "heartbeat", 1);
    obs.running(0, "pi-b", "heartbeat", 1);

    // The device's own bundle takes over from the group's.
    let m = obs.mark();
    obs.deploy("pi-a", "heartbeat", &op.bundle("heartbeat", 2, "heartbeat"));
    obs.running(m, "pi-a", "heartbeat", 2);

    // The group moves on to seq 3: pi-b takes it, pi-a keeps its own bundle.
    let m = obs.mark();
    obs.deploy_group("barn", "heartbeat", &op.bundle("heartbeat", 3, "heartbeat"));
    obs.running(m, "pi-b", "heartbeat", 3);
    // A sentinel after the group's bundle: once pi-a installed it, pi-a has handled the group's
    // message before it (one connection, one ordered stream, handled in order).
    obs.deploy("pi-a", "echo", &op.bundle("echo", 1, "echo"));
    obs.event(m, "pi-a", EventKind::Installed, "echo");
    let after = obs.mark();
    let status = obs.running(after, "pi-a", "heartbeat", 2);
    assert_eq!(status.restarts, 0);
    // pi-a did not act on the group's bundle; it reported that a newer one is hidden.
    let heartbeat_events: Vec<_> = obs
        .events_since(m, "pi-a")
        .into_iter()
        .filter(|e| e.module == "heartbeat")
        .collect();
    assert!(
        heartbeat_events
            .iter()
            .all(|e| e.kind == EventKind::Outranked && e.seq == Some(3)),
        "pi-a acted on the group's bundle: {heartbeat_events:?}"
    );
    assert_eq!(heartbeat_events.len(), 1, "{heartbeat_events:?}");
}

#[test]
fn a_new_version_that_traps_in_init_is_rolled_back_and_the_old_one_runs_again() {
    let broker = Mosquitto::start();
    let op = Operator::new(1);
    let obs = Observer::connect(&broker.url());
    let _agent = Agent::start(&AgentSetup::new("pi-1", &broker.url()), &op);
    obs.deploy(
        "pi-1",
        "kv-counter",
        &op.bundle("kv-counter", 1, "kv-counter"),
    );
    obs.running(0, "pi-1", "kv-counter", 1);
    let before = obs.counter_at_least(0, "pi-1", "kv-counter", 3);

    // kv-counter seq 2 carries init-trapper's Wasm.
    let m = obs.mark();
    obs.deploy(
        "pi-1",
        "kv-counter",
        &op.bundle("kv-counter", 2, "init-trapper"),
    );
    let rolled_back = obs.event(m, "pi-1", EventKind::RolledBack, "kv-counter");
    assert_eq!(rolled_back.seq, Some(2));
    let reason = rolled_back.reason.unwrap_or_default();
    assert!(
        reason.contains("init") && reason.contains("seq 1"),
        "{reason}"
    );

    let after = obs.mark();
    let status = obs.running(after, "pi-1", "kv-counter", 1);
    assert_eq!((status.version.as_str(), status.restarts), ("1.0.1", 0));
    // The key-value state is intact: the old version counts on from where it was.
    let next = obs.counter_at_least(after, "pi-1", "kv-counter", 1);
    assert!(next > before, "restarted at {next} after reaching {before}");
    obs.counter_at_least(after, "pi-1", "kv-counter", next + 3);
    assert_increasing(
        &obs.counters_since(0, "pi-1", "kv-counter"),
        "across the rollback",
    );
    let kinds: Vec<EventKind> = obs.events_since(m, "pi-1").iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [EventKind::RolledBack]);
}

#[test]
fn after_a_broker_restart_the_agent_reconnects_and_resyncs_and_its_modules_never_stop() {
    let mut broker = Mosquitto::start();
    let op = Operator::new(1);
    let obs = Observer::connect(&broker.url());
    let _agent = Agent::start(&AgentSetup::new("pi-1", &broker.url()), &op);
    obs.deploy(
        "pi-1",
        "kv-counter",
        &op.bundle("kv-counter", 1, "kv-counter"),
    );
    obs.running(0, "pi-1", "kv-counter", 1);
    let before = obs.counter_at_least(0, "pi-1", "kv-counter", 3);
    let calls_before = obs.running(obs.mark(), "pi-1", "kv-counter", 1).calls;

    let connacks = obs.connacks();
    broker.kill();
    // The outage: a second, twenty ticks.
    std::thread::sleep(Duration::from_secs(1));
    broker.start_again();
    obs.wait_subscribed(connacks);

    // Retained messages died with the broker: this status is the agent's new report.
    let after = obs.mark();
    let status = obs.status(
        after,
        "pi-1",
        "online again, kv-counter ticked through the outage",
        |s| {
            s.online
                && module_in(s, "kv-counter")
                    .is_some_and(|m| is_running(m) && m.calls >= calls_before + 10)
        },
    );
    let m = module_in(&status, "kv-counter").unwrap();
    assert_eq!((m.seq, m.restarts), (1, 0), "{m:?}");
    let next = obs.counter_at_least(after, "pi-1", "kv-counter", before + 10);
    assert!(next > before);
    assert_increasing(
        &obs.counters_since(0, "pi-1", "kv-counter"),
        "across the broker restart",
    );
}

#[test]
fn after_a_long_outage_with_chatty_modules_the_agent_still_subscribes_and_takes_deployments() {
    let mut broker = Mosquitto::start();
    let op = Operator::new(1);
    let obs = Observer::connect(&broker.url());
    let setup = AgentSetup::new("pi-1", &broker.url())
        .toml("\n[runtime.host.publish_rate]\nper_sec = 1000\nburst = 1000\n");
    let _agent = Agent::start(&setup, &op);
    // Four modules publishing every 10 ms: 400 messages a second with nowhere to go during the
    // outage, more than the client's queue of 1024 holds within three seconds.
    let chatty = ["chatty-1", "chatty-2", "chatty-3", "chatty-4"];
    let (mut manifest, wasm) = guest("heartbeat");
    manifest.limits.tick_interval_ms = 10;
    for name in chatty {
        let mut m = manifest.clone();
        m.name = name.into();
        obs.deploy("pi-1", name, &signed(m, &wasm, &op.key));
    }
    for name in chatty {
        obs.running(0, "pi-1", name, 1);
    }

    let connacks = obs.connacks();
    broker.kill();
    std::thread::sleep(Duration::from_secs(4));
    broker.start_again();
    obs.wait_subscribed(connacks);
    let after = obs.mark();
    // Telemetry was dropped: the client's queue did fill up during the outage.
    obs.status(after, "pi-1", "online again, messages dropped", |s| {
        s.online && s.dropped_messages > 0
    });

    // Subscribed again: a new deployment arrives.
    obs.deploy("pi-1", "echo", &op.bundle("echo", 1, "echo"));
    obs.event(after, "pi-1", EventKind::Installed, "echo");
    for name in chatty {
        assert!(is_running(
            module_in(
                &obs.status(after, "pi-1", name, |s| module_in(s, name).is_some()),
                name
            )
            .unwrap()
        ));
    }
}

#[test]
fn an_agent_restarted_while_the_broker_is_down_runs_its_modules_from_the_store() {
    let mut broker = Mosquitto::start();
    let op = Operator::new(1);
    let obs = Observer::connect(&broker.url());
    let mut agent = Agent::start(&AgentSetup::new("pi-1", &broker.url()), &op);
    obs.deploy(
        "pi-1",
        "kv-counter",
        &op.bundle("kv-counter", 1, "kv-counter"),
    );
    obs.running(0, "pi-1", "kv-counter", 1);
    let before = obs.counter_at_least(0, "pi-1", "kv-counter", 3);

    assert!(agent.terminate().success(), "{}", agent.log());
    let connacks = obs.connacks();
    broker.kill();
    agent.start_again();
    // The agent started the module from its store with no broker...
    poll(
        Duration::from_secs(20),
        "the agent to start kv-counter from its store",
        || {
            agent
                .log_of_this_run()
                .contains("module kv-counter 1.0.1 (seq 1): Active")
                .then_some(())
        },
    );
    // ...and runs it through the outage (a second and a half, thirty ticks).
    std::thread::sleep(Duration::from_millis(1500));
    assert!(agent.running(), "{}", agent.log());
    broker.start_again();
    obs.wait_subscribed(connacks);

    let after = obs.mark();
    let status = obs.status(
        after,
        "pi-1",
        "online, kv-counter ran through the outage",
        |s| s.online && module_in(s, "kv-counter").is_some_and(|m| is_running(m) && m.calls >= 10),
    );
    assert_eq!(module_in(&status, "kv-counter").unwrap().restarts, 0);
    let first = obs.counter_at_least(after, "pi-1", "kv-counter", 1);
    assert!(
        first > before,
        "the counter started over: {first} after {before}"
    );
    obs.counter_at_least(after, "pi-1", "kv-counter", before + 10);
    assert_increasing(
        &obs.counters_since(0, "pi-1", "kv-counter"),
        "across the agent restart",
    );
}

/// A module started from the store is compiled from the record of its check at install, which
/// holds only for the limits it was made under: with stricter structure limits the agent checks
/// the stored module again and refuses it; back under the old limits it runs from its record.
#[test]
fn a_stored_module_is_checked_again_when_the_structure_limits_change() {
    let broker = Mosquitto::start();
    let op = Operator::new(1);
    let obs = Observer::connect(&broker.url());
    let mut agent = Agent::start(&AgentSetup::new("pi-1", &broker.url()), &op);
    obs.deploy("pi-1", "heartbeat", &op.bundle("heartbeat", 1, "heartbeat"));
    obs.running(0, "pi-1", "heartbeat", 1);
    assert!(agent.terminate().success(), "{}", agent.log());
    {
        let store = Store::open(agent.state_dir(), 1 << 20).unwrap();
        let record = store.module("heartbeat").unwrap().unwrap();
        let sha = record.current.wasm_sha256();
        assert!(
            store.check_record(&sha).unwrap().is_some(),
            "the install kept no record of the Wasm check"
        );
    }

    let original = fs::read_to_string(agent.config_path()).unwrap();
    agent.edit_config(|text| format!("{text}\n[runtime.structure]\nmax_functions = 2\n"));
    agent.start_again();
    poll(
        Duration::from_secs(20),
        "the stored heartbeat refused under max_functions = 2",
        || {
            agent
                .log_of_this_run()
                .contains("max_functions")
                .then_some(())
        },
    );
    assert!(agent.terminate().success(), "{}", agent.log());

    agent.edit_config(|_| original);
    let m = obs.mark();
    agent.start_again();
    obs.status(m, "pi-1", "heartbeat running again from the store", |s| {
        module_in(s, "heartbeat").is_some_and(|h| is_running(h) && h.seq == 1 && h.calls >= 2)
    });
    assert!(!agent.log_of_this_run().contains("max_functions"));
}

/// The kv-counter Wasm with a custom section appended: the same module, another digest.
fn kv_counter_variant() -> Vec<u8> {
    let mut wasm = guest("kv-counter").1;
    let name = b"edge-test-variant";
    wasm.push(0); // custom section
    wasm.push(u8::try_from(1 + name.len() + 1).unwrap());
    wasm.push(u8::try_from(name.len()).unwrap());
    wasm.extend_from_slice(name);
    wasm.push(1);
    wasm
}

/// The `count` the kv-counter keeps in its key-value store, if any.
fn stored_count(store: &Store) -> Option<u64> {
    let kv = store.kv("kv-counter", 4096).unwrap();
    let value = kv.get(b"count").unwrap()?;
    Some(u64::from_le_bytes(
        value.try_into().expect("an 8-byte count"),
    ))
}

#[test]
fn kill_9_in_the_middle_of_installs_leaves_the_old_or_the_new_version_and_the_agent_starts_cleanly()
{
    // When to kill after the broker took the new bundle: the first few milliseconds cover
    // verification and the store transaction, the rest the probation ticks and the confirmation.
    const DELAYS_MS: [u64; 30] = [
        0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 18, 20, 23, 26, 30, 35, 40, 50, 60, 70, 80,
        90, 100, 120, 150, 200,
    ];
    let started = Instant::now();
    let broker = Mosquitto::start();
    let op = Operator::new(1);
    let obs = Observer::connect(&broker.url());
    let mut agent = Agent::start(&AgentSetup::new("pi-1", &broker.url()), &op);
    let wasms = [guest("kv-counter").1, kv_counter_variant()];
    let wasm_for = |seq: u64| &wasms[usize::from(seq.is_multiple_of(2))];

    obs.deploy(
        "pi-1",
        "kv-counter",
        &op.bundle_with("kv-counter", 1, wasm_for(1)),
    );
    obs.running(0, "pi-1", "kv-counter", 1);
    let mut durable = 0;
    let mut outcomes = Vec::new();
    for (round, delay) in (0..).zip(DELAYS_MS) {
        let (old, new) = (round + 1, round + 2);
        assert!(
            started.elapsed() < Duration::from_secs(150),
            "round {round} after {:?}",
            started.elapsed()
        );
        obs.deploy(
            "pi-1",
            "kv-counter",
            &op.bundle_with("kv-counter", new, wasm_for(new)),
        );
        let before_kill = obs.mark();
        std::thread::sleep(Duration::from_millis(delay));
        agent.kill9();
        // The broker's last will comes after everything the killed process published: what
        // follows it comes from the next process.
        obs.status(before_kill, "pi-1", "offline (the last will)", |s| {
            !s.online
        });

        {
            let store = agent.store();
            let record = store
                .module("kv-counter")
                .unwrap()
                .expect("kv-counter installed");
            let seq = record.current.manifest.seq;
            assert!(
                seq == old || seq == new,
                "round {round}: seq {seq}, neither {old} nor {new}"
            );
            assert!(
                matches!(record.state, InstallState::Active | InstallState::Probation),
                "round {round}: {:?}",
                record.state
            );
            assert_eq!(
                store.seq("kv-counter").unwrap().unwrap().highest_seq,
                seq,
                "round {round}"
            );
            let sha = record.current.wasm_sha256();
            let wasm = store
                .wasm(&sha)
                .unwrap_or_else(|e| panic!("round {round}: current blob: {e}"));
            assert_eq!(&wasm, wasm_for(seq), "round {round}");
            if let Some(previous) = &record.previous {
                let sha = previous.wasm_sha256();
                assert_eq!(
                    Sha256::of(&store.wasm(&sha).unwrap()),
                    sha,
                    "round {round}: previous blob"
                );
            }
            let count = stored_count(&store).unwrap_or(0);
            assert!(
                count >= durable,
                "round {round}: count went back from {durable} to {count}"
            );
            let published = obs
                .counters_since(0, "pi-1", "kv-counter")
                .into_iter()
                .max()
                .unwrap_or(0);
            // Stored before published: at most the few ticks whose telemetry the kill cut off.
            assert!(
                count <= published + 20,
                "round {round}: stored {count}, published only {published}"
            );
            durable = count;
            outcomes.push((delay, seq == new, record.state.clone()));
        }

        let m = obs.mark();
        agent.start_again();
        let status = obs.running(m, "pi-1", "kv-counter", new);
        assert_eq!(status.state, ModuleState::Running, "round {round}");
        obs.counter_at_least(m, "pi-1", "kv-counter", durable + 1);
    }
    assert!(
        started.elapsed() < Duration::from_secs(150),
        "took {:?}",
        started.elapsed()
    );
    // Some kills came before the install was confirmed (the old version, or the new one still on
    // probation): the loop did interrupt installs, however fast or slow this machine is.
    assert!(
        outcomes
            .iter()
            .any(|(_, new, state)| !new || *state == InstallState::Probation),
        "every kill came after the install was confirmed (delay ms, new version, state): {outcomes:?}"
    );
    assert_increasing(
        &dedup_restarts(&obs.counters_since(0, "pi-1", "kv-counter")),
        "over every kill",
    );
}

/// After a kill -9 the counter may resume a little below what was published (its last writes were
/// not yet durable); drops the values that repeat earlier ones so only a reset would remain.
fn dedup_restarts(values: &[u64]) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    for &v in values {
        if out.last().is_none_or(|&last| v > last) {
            out.push(v);
        } else if v <= 1 {
            // A reset to the beginning is kept, so assert_increasing reports it.
            out.push(v);
        }
    }
    out
}

#[test]
fn mutual_tls_lets_the_agent_in_with_its_certificate_and_refuses_a_client_without_one() {
    let certs = Certs::new();
    let broker = Mosquitto::start_tls(&certs);
    let url = broker.url();
    let op = Operator::new(1);
    let observer_cert = certs.client("observer");
    let obs = Observer::connect_tls(&url, &certs.ca, &observer_cert);
    let _agent = Agent::start(
        &AgentSetup::new("pi-tls", &url).tls(&certs.ca, certs.client("pi-tls")),
        &op,
    );
    obs.status(0, "pi-tls", "online", |s| s.online);

    let operator_cert = certs.client("operator");
    let file = op.file("heartbeat.bundle", &op.bundle("heartbeat", 1, "heartbeat"));
    let (ca, file) = (certs.ca.to_str().unwrap(), file.to_str().unwrap());
    let m = obs.mark();
    edgectl_ok(&[
        "deploy",
        "--broker",
        &url,
        "--ca",
        ca,
        "--tls-cert",
        operator_cert.cert.to_str().unwrap(),
        "--tls-key",
        operator_cert.key.to_str().unwrap(),
        "--device",
        "pi-tls",
        file,
    ]);
    obs.event(m, "pi-tls", EventKind::Installed, "heartbeat");
    obs.running(m, "pi-tls", "heartbeat", 1);
    obs.counter_at_least(m, "pi-tls", "heartbeat", 2);

    // Without a client certificate the broker refuses the connection.
    let out = edgectl(&[
        "deploy",
        "--broker",
        &url,
        "--ca",
        ca,
        "--connect-timeout",
        "5",
        "--device",
        "pi-tls",
        file,
    ]);
    assert!(
        !out.status.success(),
        "edgectl without a client certificate got in"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&url), "{stderr}");
    assert!(
        broker.logged("peer did not return a certificate"),
        "{}",
        broker.log()
    );
    // The agent got in as its certificate's common name.
    assert!(
        broker.logged("as pi-tls (p2, c1, k5, u'pi-tls')"),
        "{}",
        broker.log()
    );
}

#[test]
fn sigterm_stops_cleanly_leaving_the_status_offline_and_the_store_consistent() {
    let broker = Mosquitto::start();
    let url = broker.url();
    let op = Operator::new(1);
    let obs = Observer::connect(&url);
    let mut agent = Agent::start(&AgentSetup::new("pi-1", &url), &op);
    obs.deploy(
        "pi-1",
        "kv-counter",
        &op.bundle("kv-counter", 1, "kv-counter"),
    );
    obs.running(0, "pi-1", "kv-counter", 1);
    obs.counter_at_least(0, "pi-1", "kv-counter", 3);

    let m = obs.mark();
    let exit = agent.terminate();
    assert!(exit.success(), "exit {exit}:\n{}", agent.log());
    obs.status(m, "pi-1", "offline", |s| !s.online);
    // Said by the agent itself before a clean DISCONNECT (so the broker dropped its will).
    poll(
        Duration::from_secs(10),
        "mosquitto to log the clean disconnect",
        || broker.logged("Client pi-1 disconnected.").then_some(()),
    );

    // What a newcomer gets is the retained offline report.
    let late = Observer::connect(&url);
    let retained = late.wait(0, "the retained status", |s| match s {
        Seen::Status {
            device,
            status,
            retained,
        } if device == "pi-1" => Some((status.clone(), *retained)),
        _ => None,
    });
    assert!(retained.1 && !retained.0.online, "{retained:?}");

    let store = agent.store();
    let record = store.module("kv-counter").unwrap().unwrap();
    assert_eq!(
        (record.current.manifest.seq, &record.state),
        (1, &InstallState::Active)
    );
    store.wasm(&record.current.wasm_sha256()).unwrap();
    // Every published count was stored first, and a clean stop flushes the store.
    let published = obs
        .counters_since(0, "pi-1", "kv-counter")
        .into_iter()
        .max()
        .unwrap();
    let stored = stored_count(&store).unwrap();
    assert!(
        stored >= published,
        "stored {stored}, published {published}"
    );
}

#[test]
fn the_last_will_marks_the_device_offline_after_sigkill() {
    let broker = Mosquitto::start();
    let op = Operator::new(1);
    let obs = Observer::connect(&broker.url());
    let mut agent = Agent::start(&AgentSetup::new("pi-1", &broker.url()), &op);
    obs.deploy("pi-1", "heartbeat", &op.bundle("heartbeat", 1, "heartbeat"));
    obs.running(0, "pi-1", "heartbeat", 1);

    let m = obs.mark();
    agent.kill9();
    // The broker publishes the will when it notices (the closed socket at once, or the lapsed
    // keep-alive of 5 s at the latest): well within the observer's patience.
    let will = obs.status(m, "pi-1", "offline (the last will)", |s| !s.online);
    assert!(will.modules.is_empty() && will.uptime_s == 0, "{will:?}");
    // The agent had no chance to say goodbye: this is the broker's doing.
    assert!(
        !broker.logged("Client pi-1 disconnected."),
        "{}",
        broker.log()
    );
}

#[test]
fn inbox_messages_reach_the_module_and_a_quarantined_module_comes_back_on_an_operator_restart() {
    let broker = Mosquitto::start();
    let url = broker.url();
    let op = Operator::new(1);
    let obs = Observer::connect(&url);
    let mut setup = AgentSetup::new("pi-1", &url).toml(
        "\n[restart]\nbackoff_initial_ms = 20\nbackoff_max_ms = 40\nquarantine_after = 3\n\
         window_ms = 60000\nstable_after_ms = 60000\n",
    );
    // Off probation after init, so that a failing tick is restarted rather than rolled back.
    setup.probation_ticks = 0;
    let _agent = Agent::start(&setup, &op);

    obs.deploy("pi-1", "echo", &op.bundle("echo", 1, "echo"));
    obs.running(0, "pi-1", "echo", 1);
    let m = obs.mark();
    obs.publish("edge/pi-1/inbox/echo/greeting", b"hello", false);
    let echoed = obs.wait(m, "the echo", |s| match s {
        Seen::Telemetry {
            device,
            module,
            topic,
            payload,
        } if device == "pi-1" && module == "echo" => Some((topic.clone(), payload.clone())),
        _ => None,
    });
    assert_eq!(echoed, ("echo/greeting".to_string(), b"hello".to_vec()));

    let m = obs.mark();
    obs.deploy("pi-1", "trapper", &op.bundle("trapper", 1, "trapper"));
    let quarantined = obs.event(m, "pi-1", EventKind::Quarantined, "trapper");
    assert!(
        quarantined
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("3 failures"),
        "{quarantined:?}"
    );
    obs.status(m, "pi-1", "trapper quarantined", |s| {
        module_in(s, "trapper").is_some_and(|t| t.state == ModuleState::Quarantined)
    });

    let m = obs.mark();
    edgectl_ok(&[
        "restart", "--broker", &url, "--device", "pi-1", "--module", "trapper",
    ]);
    obs.event(m, "pi-1", EventKind::Restarted, "trapper");
    // It runs again, fails again, and is quarantined again; echo never noticed.
    obs.event(m, "pi-1", EventKind::Quarantined, "trapper");
    let status = obs.running(obs.mark(), "pi-1", "echo", 1);
    assert_eq!(status.restarts, 0);
}

#[test]
fn a_reload_trusts_a_new_key_and_evaluates_again_what_the_old_configuration_refused() {
    let broker = Mosquitto::start();
    let url = broker.url();
    let (op, newcomer) = (Operator::new(1), Operator::new(7));
    let obs = Observer::connect(&url);
    let agent = Agent::start(&AgentSetup::new("pi-r", &url), &op);
    obs.status(0, "pi-r", "online", |s| s.online);

    // Signed by a key the device does not trust yet: refused.
    let m = obs.mark();
    obs.deploy(
        "pi-r",
        "heartbeat",
        &newcomer.bundle("heartbeat", 1, "heartbeat"),
    );
    let rejected = obs.event(m, "pi-r", EventKind::Rejected, "heartbeat");
    assert!(
        rejected
            .reason
            .unwrap_or_default()
            .contains("does not trust")
    );

    // Trust it and reload: the retained bundle is evaluated again and installed, no restart.
    let m = obs.mark();
    let extra = newcomer.pub_file.display().to_string();
    agent.edit_config(|text| {
        text.replace("trusted_keys = [", &format!("trusted_keys = [{extra:?}, "))
    });
    agent.reload();
    obs.event(m, "pi-r", EventKind::Installed, "heartbeat");
    obs.counter_at_least(m, "pi-r", "heartbeat", 2);

    // A broken configuration is refused and the one in effect stays.
    agent.edit_config(|text| text.replace("trusted_keys", "trusted_kays"));
    agent.reload();
    let m = obs.mark();
    obs.counter_at_least(m, "pi-r", "heartbeat", 2);
    poll(
        Duration::from_secs(30),
        "the refused reload in the log",
        || {
            agent
                .log_of_this_run()
                .contains("reload refused")
                .then_some(())
        },
    );
}
