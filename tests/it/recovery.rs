//! Recovery, tried as the testers did (issue 12): a supervisor that never waits on a
//! module, key-value state restored on rollback and durable when published, a store that stops
//! the agent when it cannot be trusted, events that survive kill -9, operator restarts after a
//! reboot, a status that stays current, a fleet broker that keeps one device's session its own.

use std::time::{Duration, Instant};

use edge_agent::core::manifest::Manifest;
use edge_agent::core::protocol::{EventKind, ModuleState};

use crate::support::signed;
use crate::support::{
    Agent, AgentSetup, Certs, Mosquitto, Observer, Operator, Rig, Seen, deploy_running, edgectl_ok,
    module_in, poll,
};

fn wat_fixture(name: &str) -> Vec<u8> {
    let text = std::fs::read_to_string(
        crate::support::repo().join(format!("tests/it/hostile/{name}.wat")),
    )
    .unwrap();
    wat::parse_str(text).unwrap()
}

/// A signed bundle of a WAT fixture under `name` with the manifest text `manifest` (name,
/// version and seq are filled in).
fn fixture_bundle(op: &Operator, name: &str, seq: u64, fixture: &str, manifest: &str) -> Vec<u8> {
    let m = Manifest::from_toml(&format!(
        "name = \"{name}\"\nversion = \"1.0.{seq}\"\nseq = {seq}\n{manifest}"
    ))
    .unwrap();
    signed(m, &wat_fixture(fixture), &op.key)
}

fn removal(op: &Operator, name: &str, seq: u64, device: &str) -> Vec<u8> {
    let mut m = Manifest::from_toml(&format!(
        "name = \"{name}\"\nversion = \"1.0.{seq}\"\nseq = {seq}\naction = \"remove\"\n\
         [targets]\ndevices = [\"{device}\"]\n"
    ))
    .unwrap();
    m.wasm = None;
    edge_agent::core::bundle::sign(m, None, &op.key, 4 << 20).unwrap()
}

#[test]
fn a_removal_commits_while_the_module_is_in_a_long_call() {
    // Calls may last 60 s here: the removal must not wait for one.
    let Rig {
        broker: _broker,
        op,
        obs,
        agent: _agent,
    } = Rig::with(|setup| {
        setup.toml(
            "\n[runtime]\nmax_fuel_per_call = 9223372036854775807\ncall_deadline_ms = 60000\n",
        )
    });
    obs.deploy(
        "pi-1",
        "spin",
        &fixture_bundle(
            &op,
            "spin",
            1,
            "started-then-spin",
            "[limits]\nfuel_per_call = 1000000000000\ntick_interval_ms = 50\n\
             [caps]\npublish = [\"started\"]\n",
        ),
    );
    // Its init has run (it said so); its first tick, 50 ms later, never returns in this test.
    obs.wait(0, "spin started", |s| match s {
        Seen::Telemetry { module, .. } if module == "spin" => Some(()),
        _ => None,
    });
    std::thread::sleep(Duration::from_millis(300));
    let m = obs.mark();
    let started = Instant::now();
    obs.deploy("pi-1", "spin", &removal(&op, "spin", 2, "pi-1"));
    let removed = obs.event(m, "pi-1", EventKind::Removed, "spin");
    assert_eq!(removed.seq, Some(2));
    // The status goes on, without the module, while its call still runs.
    obs.status(m, "pi-1", "spin gone from the status", |s| {
        module_in(s, "spin").is_none()
    });
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the removal waited for the call"
    );
}

#[test]
fn a_rollback_takes_the_failed_versions_key_value_writes_back() {
    let Rig {
        broker: _broker,
        op,
        obs,
        agent: _agent,
    } = Rig::start();
    deploy_running(&obs, &op, "kv-counter", 1);
    let before = obs.counter_at_least(0, "pi-1", "kv-counter", 3);

    let m = obs.mark();
    // v2 writes a counter v1 cannot read, then traps.
    obs.deploy(
        "pi-1",
        "kv-counter",
        &op.bundle_with("kv-counter", 2, &wat_fixture("kv-poisoner")),
    );
    let rolled = obs.event(m, "pi-1", EventKind::RolledBack, "kv-counter");
    assert_eq!(rolled.seq, Some(2));
    // v1 runs again from where it was: its init reads its own counter back.
    obs.running(m, "pi-1", "kv-counter", 1);
    let after = obs.counter_at_least(m, "pi-1", "kv-counter", before + 1);
    assert!(after > before);
    let events = obs.events_since(m, "pi-1");
    assert!(
        !events.iter().any(|e| e.kind == EventKind::Quarantined),
        "{events:?}"
    );
}

#[test]
fn no_counter_value_published_before_a_kill_9_is_lost() {
    let Rig {
        broker: _broker,
        op,
        obs,
        mut agent,
    } = Rig::start();
    deploy_running(&obs, &op, "kv-counter", 1);
    for round in 0..8 {
        let m = obs.mark();
        // Let it count a little, kill it at a moment unrelated to its ticks, start it again.
        let seen = obs.counter_at_least(m, "pi-1", "kv-counter", 1);
        std::thread::sleep(Duration::from_millis(37 * (round % 5) + 13));
        agent.kill9();
        // Everything published before the kill has arrived by now or never will.
        std::thread::sleep(Duration::from_millis(300));
        let last = obs
            .counters_since(m, "pi-1", "kv-counter")
            .into_iter()
            .max()
            .unwrap_or(seen);
        let m = obs.mark();
        agent.start_again();
        let first = poll(
            Duration::from_secs(20),
            "the counter after the restart",
            || obs.counters_since(m, "pi-1", "kv-counter").first().copied(),
        );
        // A value published was durable: the count goes on from at least there.
        assert!(
            first > last,
            "round {round}: published {last} before kill -9, then {first} after the restart"
        );
    }
}

#[test]
fn a_runner_told_to_stop_while_its_store_is_still_opening_never_keeps_the_next_version_waiting() {
    // A burst of versions: a runner may be asked to stop (its successor stored) while the store
    // worker has not yet opened its key-value store, so before it exists. The stop used to be
    // lost there, the runner then ran on and its successor waited for its end for ever.
    let Rig {
        broker: _broker,
        op,
        obs,
        agent: _agent,
    } = Rig::start();
    obs.status(0, "pi-1", "online", |s| s.online);
    let mut seq = 0;
    for _round in 0..100 {
        let m = obs.mark();
        for _ in 0..12 {
            seq += 1;
            obs.deploy(
                "pi-1",
                "kv-counter",
                &op.bundle("kv-counter", seq, "kv-counter"),
            );
        }
        obs.running(m, "pi-1", "kv-counter", seq);
    }
}

#[test]
fn a_deployment_is_reported_for_every_version_even_when_versions_come_back_to_back() {
    let Rig {
        broker: _broker,
        op,
        obs,
        agent: _agent,
    } = Rig::start();
    obs.status(0, "pi-1", "online", |s| s.online);
    let m = obs.mark();
    let last = 30;
    for seq in 1..=last {
        obs.deploy(
            "pi-1",
            "heartbeat",
            &op.bundle("heartbeat", seq, "heartbeat"),
        );
    }
    obs.running(m, "pi-1", "heartbeat", last);
    // Each version has its verdict: installed, superseded (or rejected, if a later one was
    // already there when it was looked at).
    let verdicts = poll(
        Duration::from_secs(20),
        "a verdict for every version",
        || {
            let events = obs.events_since(m, "pi-1");
            let have: Vec<u64> = (1..=last)
                .filter(|seq| {
                    events.iter().any(|e| {
                        e.seq == Some(*seq)
                            && matches!(
                                e.kind,
                                EventKind::Installed | EventKind::Superseded | EventKind::Rejected
                            )
                    })
                })
                .collect();
            (have.len() as u64 == last).then_some(events)
        },
    );
    assert!(
        verdicts
            .iter()
            .any(|e| e.seq == Some(last) && e.kind == EventKind::Installed),
        "{verdicts:?}"
    );
}

#[test]
fn the_rollback_event_reaches_the_broker_although_the_agent_was_killed_right_after_it() {
    let Rig {
        mut broker,
        op,
        obs,
        mut agent,
    } = Rig::start();
    deploy_running(&obs, &op, "heartbeat", 1);
    let connacks = obs.connacks();
    let m = obs.mark();
    // v2 passes its first tick (one second in) and traps on its second.
    obs.deploy(
        "pi-1",
        "heartbeat",
        &fixture_bundle(
            &op,
            "heartbeat",
            2,
            "traps-on-second-tick",
            "[limits]\ntick_interval_ms = 1000\n",
        ),
    );
    poll(Duration::from_secs(20), "seq 2 stored", || {
        agent
            .log_of_this_run()
            .contains("heartbeat: seq 2 stored")
            .then_some(())
    });
    // The broker goes; the rollback happens while the agent cannot publish; then the agent is
    // killed before it ever could.
    broker.kill();
    poll(
        Duration::from_secs(20),
        "the rollback in the agent's log",
        || {
            agent
                .log_of_this_run()
                .contains("rolled_back heartbeat")
                .then_some(())
        },
    );
    agent.kill9();
    broker.start_again();
    obs.wait_subscribed(connacks);
    agent.start_again();
    let e = obs.event(m, "pi-1", EventKind::RolledBack, "heartbeat");
    assert_eq!(e.seq, Some(2));
}

#[test]
fn an_operator_restart_after_a_reboot_runs_a_failed_module_again_on_probation() {
    let Rig {
        broker,
        op,
        obs,
        mut agent,
    } = Rig::with(|setup| {
        setup.toml(
            "\n[restart]\nbackoff_initial_ms = 10\nbackoff_max_ms = 20\nquarantine_after = 2\n",
        )
    });
    // A first version that runs out of fuel on its first tick: no previous version, failed.
    let m = obs.mark();
    obs.deploy(
        "pi-1",
        "trapper",
        &fixture_bundle(
            &op,
            "trapper",
            1,
            "spin",
            "[limits]\nfuel_per_call = 1000\ntick_interval_ms = 50\n",
        ),
    );
    obs.event(m, "pi-1", EventKind::Failed, "trapper");
    agent.terminate();
    agent.start_again();
    obs.status(obs.mark(), "pi-1", "online again", |s| s.online);
    let m = obs.mark();
    edgectl_ok(&[
        "restart",
        "--broker",
        &broker.url(),
        "--device",
        "pi-1",
        "--module",
        "trapper",
    ]);
    // It runs again, on probation (it never passed one), and fails again: reported as such.
    obs.event(m, "pi-1", EventKind::Restarted, "trapper");
    let failed = obs.event(m, "pi-1", EventKind::Failed, "trapper");
    assert!(
        failed
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("out of fuel"),
        "{failed:?}"
    );
    let status = obs.status(m, "pi-1", "trapper failed", |s| {
        module_in(s, "trapper").is_some_and(|m| m.state == ModuleState::Failed)
    });
    assert!(module_in(&status, "trapper").unwrap().calls >= 1);
}

#[test]
fn the_offline_status_at_shutdown_is_current() {
    let Rig {
        broker: _broker,
        op,
        obs,
        mut agent,
    } = Rig::start();
    deploy_running(&obs, &op, "heartbeat", 1);
    let online = obs.status(0, "pi-1", "a report with calls", |s| {
        s.online && module_in(s, "heartbeat").is_some_and(|m| m.calls >= 3)
    });
    let m = obs.mark();
    agent.terminate();
    let offline = obs.status(m, "pi-1", "offline", |s| !s.online);
    assert!(offline.ts_ms >= online.ts_ms, "{offline:?} vs {online:?}");
    assert!(offline.uptime_s >= online.uptime_s);
    assert_eq!(offline.started_ms, online.started_ms);
    assert!(module_in(&offline, "heartbeat").is_some(), "{offline:?}");
}

#[test]
fn the_last_will_names_the_run_it_ends_and_its_modules() {
    let Rig {
        broker,
        op,
        obs,
        mut agent,
    } = Rig::start();
    deploy_running(&obs, &op, "heartbeat", 1);
    // A reconnect registers the will with the modules as they are then.
    let mut broker = broker;
    broker.kill();
    broker.start_again();
    let online = obs.status(obs.mark(), "pi-1", "online after the reconnect", |s| {
        s.online && module_in(s, "heartbeat").is_some()
    });
    let m = obs.mark();
    agent.kill9();
    // The broker publishes the will once it notices (keep-alive 5 s here).
    let will = obs.status(m, "pi-1", "the last will", |s| !s.online);
    assert_eq!(will.started_ms, online.started_ms);
    assert!(module_in(&will, "heartbeat").is_some(), "{will:?}");
    assert!(
        will.uptime_s > 0 || will.ts_ms > will.started_ms,
        "{will:?}"
    );
}

#[test]
fn on_the_shipped_fleet_broker_one_device_cannot_take_anothers_session() {
    let certs = Certs::new();
    let broker = Mosquitto::start_fleet(&certs);
    let op = Operator::new(1);
    let obs = Observer::connect_tls(&broker.url(), &certs.ca, &certs.client("ops-alice"));
    let setup = AgentSetup::new("dev-a", &broker.url()).tls(&certs.ca, certs.client("dev-a"));
    let _agent = Agent::start(&setup, &op);
    let first = obs.status(0, "dev-a", "dev-a online", |s| s.online);
    let m = obs.mark();
    // dev-b's certificate, connecting again and again with dev-a's client id.
    let intruder = certs.client("dev-b");
    for _ in 0..5 {
        let o = Observer::connect_tls_as(&broker.url(), &certs.ca, &intruder, "dev-a");
        std::thread::sleep(Duration::from_millis(300));
        drop(o);
    }
    std::thread::sleep(Duration::from_secs(1));
    // dev-a was never knocked off: no last will, no second connection.
    let seen = obs.seen_since(m);
    assert!(
        !seen
            .iter()
            .filter_map(|s| s.status("dev-a"))
            .any(|s| !s.online),
        "dev-a's last will was published: its session was taken over"
    );
    let now = obs.status(m, "dev-a", "dev-a still online", |s| s.online);
    assert_eq!(now.started_ms, first.started_ms);
}

/// A tmpfs mounted over a directory for the life of the value (the tests run as root, in CI
/// too: without the privilege to mount, the test fails saying so).
pub(crate) struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    pub(crate) fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "cannot mount a tmpfs (this test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Writes `path` until the filesystem is full.
pub(crate) fn fill(path: &std::path::Path) {
    use std::io::Write as _;
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0x5au8; 64 * 1024];
    while f.write_all(&block).is_ok() {}
    let _ = f.sync_all();
}

#[test]
fn a_store_that_cannot_write_stops_the_agent_and_a_restart_with_room_recovers_it() {
    let broker = Mosquitto::start();
    let op = Operator::new(1);
    let obs = Observer::connect(&broker.url());
    let mut agent = Agent::configure(&AgentSetup::new("pi-1", &broker.url()), &op);
    let _tmpfs = Tmpfs::mount(agent.state_dir(), "32m");
    agent.start_again();
    obs.status(0, "pi-1", "online", |s| s.online);
    obs.deploy(
        "pi-1",
        "filler",
        &fixture_bundle(
            &op,
            "filler",
            1,
            "kv-filler",
            "[limits]\ntick_interval_ms = 50\n[caps]\nkv_quota_bytes = 1048576\n",
        ),
    );
    obs.running(0, "pi-1", "filler", 1);
    // The disk fills up under the agent.
    let filler = agent.state_dir().join("filler");
    fill(&filler);
    // The next key-value flush fails: the store can no longer be trusted, the agent stops with
    // an error (systemd restarts it) instead of answering "store unavailable" forever.
    poll(Duration::from_secs(60), "the agent to stop", || {
        (!agent.running()).then_some(())
    });
    let log = agent.log_of_this_run();
    assert!(log.contains("store"), "{log}");
    // Room again, and a restart: the store opens and the module runs.
    std::fs::remove_file(&filler).unwrap();
    let m = obs.mark();
    let exit = agent.restart_after_exit();
    assert!(!exit.success(), "it stopped with an error: {exit}");
    obs.running(m, "pi-1", "filler", 1);
}
