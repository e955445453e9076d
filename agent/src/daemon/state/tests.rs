//! The supervisor's decisions, driven input by input with no tokio, broker, disk or clock.

use super::*;
use crate::core::keys::KeyId;
use crate::core::manifest::WasmRef;
use crate::runtime::{CallReport, Outcome, Runtime, RuntimeConfig};

fn config() -> Config {
    Config::from_toml(
        r#"
device_id = "pi-1"
groups = ["barn"]
state_dir = "/nonexistent"
trusted_keys = ["/k.pub"]
[mqtt]
url = "mqtt://127.0.0.1:1883"
[agent]
status_interval_s = 10
"#,
        std::path::Path::new("/"),
    )
    .unwrap()
}

fn at(s: u64) -> Now {
    Now {
        wall_ms: 1_800_000_000_000 + s * 1000,
        mono_ms: s * 1000,
    }
}

fn manifest(name: &str, seq: u64, gpio: &[u32]) -> Manifest {
    let mut m = Manifest::from_toml(&format!(
        "name = \"{name}\"\nversion = \"1.{seq}\"\nseq = {seq}\n[limits]\ntick_interval_ms = 100\n"
    ))
    .unwrap();
    m.caps.gpio = gpio.to_vec();
    m.wasm = Some(WasmRef {
        sha256: Sha256::of(name.as_bytes()),
        size: 1,
    });
    m
}

fn prepared(name: &str) -> PreparedModule {
    let wasm = wat::parse_str(
        r#"(module (memory (export "memory") 1) (func (export "edge_abi_v1"))
             (func (export "tick") (result i32) i32.const 0))"#,
    )
    .unwrap();
    let mut m = manifest(name, 1, &[]);
    m.wasm = None;
    Runtime::new(RuntimeConfig::default())
        .prepare(&m, &wasm)
        .unwrap()
}

fn version(m: &Manifest) -> StoredVersion {
    StoredVersion {
        manifest: m.clone(),
        key_id_hex: "00".repeat(8),
        bundle_sha256: Sha256::of(format!("{}{}", m.name, m.seq).as_bytes()),
        installed_at_ms: 0,
    }
}

fn record(name: &str, seq: u64, state: InstallState, previous: Option<u64>) -> ModuleRecord {
    ModuleRecord {
        name: name.into(),
        current: version(&manifest(name, seq, &[17])),
        previous: previous.map(|p| version(&manifest(name, p, &[17]))),
        state,
        kv_snapshot: None,
    }
}

/// A state started with `records`, connected, its boot-time compiles answered.
fn booted(records: Vec<ModuleRecord>) -> (State, Vec<Effect>) {
    booted_with(config(), records)
}

/// The same, with `config`.
fn booted_with(config: Config, records: Vec<ModuleRecord>) -> (State, Vec<Effect>) {
    let (mut s, fx) = State::new(config, records, Vec::new(), at(0)).unwrap();
    let mut all = fx;
    loop {
        let prepare = all.iter().find_map(|e| match e {
            Effect::Prepare { ticket, version } => Some((*ticket, version.manifest.name.clone())),
            _ => None,
        });
        let Some((ticket, name)) = prepare else { break };
        all.retain(|e| !matches!(e, Effect::Prepare { ticket: t, .. } if *t == ticket));
        let fx = s.handle(
            Input::Prepared {
                ticket,
                result: Ok(Box::new(prepared(&name))),
            },
            at(0),
        );
        all.extend(fx);
        // Probation snapshots at boot.
        while let Some((ticket, _)) =
            store_op(&all, |op| matches!(op, StoreOp::BeginProbation { .. }))
        {
            all.retain(|e| !matches!(e, Effect::Store { ticket: t, .. } if *t == ticket));
            all.extend(s.handle(stored(ticket, Stored::Done), at(0)));
        }
    }
    all.extend(s.handle(Input::Connected, at(0)));
    (s, all)
}

/// A compile worker's successful result for `ticket`: module `name`, compiled.
fn compiled(ticket: u64, name: &str) -> Input {
    Input::Prepared {
        ticket,
        result: Ok(Box::new(prepared(name))),
    }
}

fn stored(ticket: u64, what: Stored) -> Input {
    Input::Stored {
        ticket,
        result: Ok((what, Vec::new())),
    }
}

/// The first store effect whose operation matches, with its ticket.
fn store_op(fx: &[Effect], pick: impl Fn(&StoreOp) -> bool) -> Option<(u64, StoreOp)> {
    fx.iter().find_map(|e| match e {
        Effect::Store { ticket, op, .. } if pick(op) => Some((*ticket, (**op).clone())),
        _ => None,
    })
}

fn spawned(fx: &[Effect]) -> Vec<(u64, bool)> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Spawn {
                runner, probation, ..
            } => Some((*runner, *probation)),
            _ => None,
        })
        .collect()
}

fn stopped(fx: &[Effect]) -> Vec<u64> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Stop { runner } => Some(*runner),
            _ => None,
        })
        .collect()
}

fn released(fx: &[Effect]) -> Vec<String> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Release { module } => Some(module.clone()),
            _ => None,
        })
        .collect()
}

fn runner_state(id: u64, module: &str, state: RunState) -> Input {
    Input::Runner(RunnerEvent::State {
        id,
        module: module.into(),
        state,
        restarts: 0,
    })
}

fn events_in(op: &StoreOp) -> Vec<EventKind> {
    let events = match op {
        StoreOp::Install { events, .. }
        | StoreOp::Confirm { events, .. }
        | StoreOp::Rollback { events, .. }
        | StoreOp::Remove { events, .. }
        | StoreOp::SetState { events, .. }
        | StoreOp::PushEvents { events } => events.clone(),
        StoreOp::BeginProbation { .. } => Vec::new(),
    };
    events.iter().map(|e| e.kind).collect()
}

/// Offers `m` on the device's desired topic and answers its verification as passed.
fn deploy(s: &mut State, m: &Manifest, now: Now) -> Vec<Effect> {
    let bundle = format!("bundle {} {}", m.name, m.seq).into_bytes();
    let fx = s.handle(
        Input::Message {
            topic: format!("edge/pi-1/desired/{}", m.name),
            payload: bundle,
        },
        now,
    );
    let ticket = fx
        .iter()
        .find_map(|e| match e {
            Effect::Verify { ticket, .. } => Some(*ticket),
            _ => None,
        })
        .expect("the offer is verified");
    s.handle(
        Input::Verified {
            ticket,
            result: Ok(Box::new(Checked {
                manifest: m.clone(),
                key_id: KeyId([0; 8]),
                wasm: (m.action == BundleAction::Install).then(|| Arc::from(&b"wasm"[..])),
                prepared: (m.action == BundleAction::Install).then(|| prepared(&m.name)),
                check_record: None,
                trust_version: 0,
                awaiting_chunks: None,
            })),
        },
        now,
    )
}

/// `edgectl restart` of a stopped module: the ticket of the compile it asks for.
fn operator_restart(s: &mut State, module: &str, now: Now) -> u64 {
    let fx = s.handle(
        Input::Message {
            topic: format!("edge/pi-1/control/restart/{module}"),
            payload: vec![],
        },
        now,
    );
    fx.iter()
        .find_map(|e| match e {
            Effect::Prepare { ticket, .. } => Some(*ticket),
            _ => None,
        })
        .expect("a stopped module is compiled again")
}

/// A tick of runner `id` of `module` that published `payload` on `topic`.
fn published(id: u64, module: &str, topic: &str, payload: Vec<u8>) -> Input {
    Input::Runner(RunnerEvent::Called {
        id,
        module: module.into(),
        call: CallKind::Tick,
        report: Box::new(CallReport {
            outcome: Outcome::Finished,
            fuel_used: 1,
            logs: vec![],
            messages: vec![crate::runtime::host::OutMessage {
                topic: topic.into(),
                payload,
            }],
            refusals: vec![],
            refusal_summary: None,
            kv_writes: 0,
        }),
        stats: InstanceStats::default(),
    })
}

fn running(s: &State, module: &str) -> Option<u64> {
    s.slots.get(module).and_then(Slot::runner)
}

#[test]
fn boot_starts_what_the_store_says_runs_and_is_ready_without_a_broker() {
    let (s, fx) = booted(vec![
        record("a", 1, InstallState::Active, None),
        record("b", 2, InstallState::Probation, Some(1)),
        record(
            "q",
            1,
            InstallState::Quarantined { cause: "x".into() },
            None,
        ),
    ]);
    assert!(fx.iter().any(|e| matches!(e, Effect::Ready)));
    let mut runs = spawned(&fx);
    runs.sort();
    // "a" as it was, "b" on probation again (after its snapshot), "q" not at all.
    assert_eq!(runs.len(), 2);
    assert!(runs.iter().any(|(_, probation)| *probation));
    assert!(running(&s, "q").is_none());
}

#[test]
fn an_upgrade_is_committed_then_the_old_runner_is_told_to_stop_and_nothing_waits_for_it() {
    let (mut s, _) = booted(vec![record("m", 1, InstallState::Active, None)]);
    let old = running(&s, "m").unwrap();
    let fx = deploy(&mut s, &manifest("m", 2, &[17]), at(1));
    // First the store: nothing is stopped before the install is committed.
    let (ticket, op) = store_op(&fx, |op| matches!(op, StoreOp::Install { .. })).unwrap();
    assert!(stopped(&fx).is_empty());
    let mut r = record("m", 2, InstallState::Probation, Some(1));
    r.current.manifest = manifest("m", 2, &[17]);
    let fx = s.handle(stored(ticket, Stored::Record(Box::new(r))), at(1));
    assert_eq!(stopped(&fx), [old]);
    assert!(
        spawned(&fx).is_empty(),
        "the new version waits for the old runner to end"
    );
    let _ = op;
    // The old runner is stuck in a long call: time passes, the status and ticks go on.
    for t in 2..40 {
        let fx = s.handle(Input::Tick, at(t));
        assert!(spawned(&fx).is_empty());
        assert!(!fx.iter().any(|e| matches!(e, Effect::Exit(_))));
    }
    // It ends: the snapshot for probation, then the new runner.
    let fx = s.handle(runner_state(old, "m", RunState::Stopped), at(40));
    assert!(released(&fx).is_empty(), "the new version keeps the lines");
    let (ticket, op) =
        store_op(&fx, |op| matches!(op, StoreOp::BeginProbation { seq: 2 })).unwrap();
    assert!(matches!(op, StoreOp::BeginProbation { seq: 2 }));
    let fx = s.handle(stored(ticket, Stored::Done), at(40));
    assert_eq!(spawned(&fx).len(), 1);
    assert!(spawned(&fx)[0].1, "on probation");
}

#[test]
fn a_removal_is_committed_before_the_runner_stops_and_its_lines_are_released_after() {
    let (mut s, _) = booted(vec![record("m", 1, InstallState::Active, None)]);
    let runner = running(&s, "m").unwrap();
    let mut removal = manifest("m", 2, &[]);
    removal.action = BundleAction::Remove;
    removal.wasm = None;
    let fx = deploy(&mut s, &removal, at(1));
    let (ticket, op) = store_op(&fx, |op| matches!(op, StoreOp::Remove { .. })).unwrap();
    assert_eq!(
        events_in(&op),
        [EventKind::Removed],
        "written with the removal"
    );
    assert!(stopped(&fx).is_empty());
    let fx = s.handle(stored(ticket, Stored::Done), at(1));
    assert_eq!(stopped(&fx), [runner]);
    assert!(
        released(&fx).is_empty(),
        "it may still drive its line until its call ends"
    );
    // Output of the removed module that arrives now is not published.
    let fx = s.handle(published(runner, "m", "x", b"late".to_vec()), at(2));
    assert!(
        !fx.iter()
            .any(|e| matches!(e, Effect::Publish { topic, .. } if topic.contains("telemetry")))
    );
    let fx = s.handle(runner_state(runner, "m", RunState::Stopped), at(3));
    assert_eq!(released(&fx), ["m"]);
}

/// Module m, v2 on probation over v1, whose runner reports `end`: the state and the ticket of
/// the rollback it asks the store for (with its `rolled_back` event).
fn probation_ended_by(end: RunState) -> (State, u64) {
    let (mut s, _) = booted(vec![record("m", 2, InstallState::Probation, Some(1))]);
    let runner = running(&s, "m").unwrap();
    let fx = s.handle(runner_state(runner, "m", end), at(1));
    let (ticket, op) = store_op(&fx, |op| matches!(op, StoreOp::Rollback { .. })).unwrap();
    assert_eq!(events_in(&op), [EventKind::RolledBack]);
    (s, ticket)
}

#[test]
fn a_failed_probation_rolls_back_in_the_store_and_starts_the_previous_version() {
    let (mut s, ticket) = probation_ended_by(RunState::ProbationFailed {
        cause: "tick: trapped".into(),
    });
    let restored = record("m", 1, InstallState::Active, None);
    let fx = s.handle(
        stored(ticket, Stored::RolledBack(Some(Box::new(restored)))),
        at(1),
    );
    assert_eq!(
        released(&fx),
        ["m"],
        "the failed version's lines go to their safe state"
    );
    let (ticket, name) = fx
        .iter()
        .find_map(|e| match e {
            Effect::Prepare { ticket, version } => Some((*ticket, version.manifest.seq)),
            _ => None,
        })
        .unwrap();
    assert_eq!(name, 1);
    let fx = s.handle(compiled(ticket, "m"), at(1));
    assert!(fx.iter().any(|e| matches!(e, Effect::Claim { .. })));
    assert_eq!(spawned(&fx).len(), 1);
    assert!(!spawned(&fx)[0].1, "the previous version runs as it was");
}

#[test]
fn a_quarantined_module_is_stopped_persisted_and_its_lines_released_once_it_has_ended() {
    let (mut s, _) = booted(vec![record("m", 1, InstallState::Active, None)]);
    let runner = running(&s, "m").unwrap();
    let fx = s.handle(
        runner_state(
            runner,
            "m",
            RunState::Quarantined {
                cause: "tick: trapped".into(),
                failures: 5,
            },
        ),
        at(1),
    );
    assert_eq!(stopped(&fx), [runner]);
    let (_, op) = store_op(&fx, |op| matches!(op, StoreOp::SetState { .. })).unwrap();
    assert_eq!(events_in(&op), [EventKind::Quarantined]);
    let fx = s.handle(runner_state(runner, "m", RunState::Stopped), at(2));
    assert_eq!(released(&fx), ["m"]);
}

#[test]
fn restarting_a_module_that_failed_its_probation_runs_it_on_probation_again_with_its_lines() {
    let failed = InstallState::Failed {
        cause: "init: trapped".into(),
    };
    let (mut s, fx) = booted(vec![record("m", 1, failed, None)]);
    assert!(spawned(&fx).is_empty());
    // Compiled again, since it never ran in this agent.
    let ticket = operator_restart(&mut s, "m", at(1));
    let fx = s.handle(compiled(ticket, "m"), at(1));
    assert!(fx.iter().any(|e| matches!(e, Effect::Claim { .. })));
    let (_, op) = store_op(&fx, |op| matches!(op, StoreOp::SetState { .. })).unwrap();
    assert!(matches!(
        op,
        StoreOp::SetState {
            state: InstallState::Probation,
            ..
        }
    ));
    assert_eq!(events_in(&op), [EventKind::Restarted]);
    let (ticket, _) = store_op(&fx, |op| matches!(op, StoreOp::BeginProbation { .. })).unwrap();
    let fx = s.handle(stored(ticket, Stored::Done), at(1));
    assert_eq!(spawned(&fx).len(), 1);
    assert!(spawned(&fx)[0].1, "on probation");
}

#[test]
fn restarting_a_module_that_cannot_be_compiled_keeps_its_error_and_says_so() {
    let quarantined = InstallState::Quarantined {
        cause: "5 failures".into(),
    };
    let (mut s, _) = booted(vec![record("m", 1, quarantined, None)]);
    let ticket = operator_restart(&mut s, "m", at(1));
    let fx = s.handle(
        Input::Prepared {
            ticket,
            result: Err("store: Wasm blob 00ab is corrupt".into()),
        },
        at(1),
    );
    assert!(spawned(&fx).is_empty());
    assert!(store_op(&fx, |op| matches!(op, StoreOp::SetState { .. })).is_none());
    let (_, op) = store_op(&fx, |op| matches!(op, StoreOp::PushEvents { .. })).unwrap();
    assert_eq!(events_in(&op), [EventKind::Failed]);
    let status = s.module_statuses();
    assert!(status[0].last_error.as_deref().unwrap().contains("corrupt"));
}

#[test]
fn a_broken_store_stops_the_agent_with_an_error() {
    let (mut s, _) = booted(vec![record("m", 2, InstallState::Probation, Some(1))]);
    let runner = running(&s, "m").unwrap();
    let fx = s.handle(runner_state(runner, "m", RunState::ProbationPassed), at(1));
    let (ticket, _) = store_op(&fx, |op| matches!(op, StoreOp::Confirm { .. })).unwrap();
    let fx = s.handle(
        Input::Stored {
            ticket,
            result: Err(StoreFailure {
                reason: "flushing: No space left on device".into(),
                broken: true,
            }),
        },
        at(1),
    );
    assert_eq!(stopped(&fx), [runner]);
    // The runner ends; the agent exits with the store's error for systemd to restart it.
    let fx = s.handle(runner_state(runner, "m", RunState::Stopped), at(2));
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::Exit(Some(reason)) if reason.contains("No space left")))
    );
    assert!(!fx.iter().any(|e| matches!(e, Effect::Flush)));
}

#[test]
fn shutdown_leaves_a_runner_stuck_in_a_call_after_the_grace_period() {
    let (mut s, _) = booted(vec![record("m", 1, InstallState::Active, None)]);
    let runner = running(&s, "m").unwrap();
    let fx = s.handle(Input::Shutdown, at(1));
    assert_eq!(stopped(&fx), [runner]);
    assert!(!fx.iter().any(|e| matches!(e, Effect::Exit(_))));
    let fx = s.handle(Input::Tick, at(5));
    assert!(!fx.iter().any(|e| matches!(e, Effect::Exit(_))));
    let fx = s.handle(Input::Tick, at(12));
    assert!(fx.iter().any(|e| matches!(e, Effect::Flush)));
    assert!(fx.iter().any(|e| matches!(e, Effect::Exit(None))));
    // The offline status is made now, with the modules as they are.
    let offline = fx
        .iter()
        .find_map(|e| match e {
            Effect::Publish { topic, payload, .. } if topic.ends_with("/status") => {
                protocol::from_cbor::<Status>(payload).ok()
            }
            _ => None,
        })
        .unwrap();
    assert!(!offline.online);
    assert_eq!(offline.ts_ms, at(12).wall_ms);
    assert_eq!(offline.uptime_s, 12);
    assert_eq!(offline.modules.len(), 1);
}

fn published_events(fx: &[Effect]) -> Vec<Event> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Publish { topic, payload, .. } if topic.ends_with("/events") => {
                protocol::from_cbor::<Event>(payload).ok()
            }
            _ => None,
        })
        .collect()
}

#[test]
fn events_are_published_until_seen_on_the_broker_and_again_after_a_reconnect() {
    let (mut s, _) = booted(vec![]);
    let event = Event {
        id: 7,
        ts_ms: 1,
        kind: EventKind::RolledBack,
        module: "m".into(),
        version: None,
        seq: Some(2),
        reason: None,
    };
    let fx = s.handle(Input::Outbox(vec![event.clone()]), at(1));
    assert_eq!(published_events(&fx), std::slice::from_ref(&event));
    // Not seen back: again after a while, and after a reconnect.
    assert!(published_events(&s.handle(Input::Tick, at(2))).is_empty());
    assert_eq!(published_events(&s.handle(Input::Tick, at(40))).len(), 1);
    s.handle(Input::Disconnected("gone".into()), at(41));
    let fx = s.handle(Input::Connected, at(42));
    assert_eq!(published_events(&fx).len(), 1);
    // Seen on the broker: acknowledged in the outbox, not published again.
    let fx = s.handle(
        Input::Message {
            topic: "edge/pi-1/events".into(),
            payload: protocol::to_cbor(&event),
        },
        at(43),
    );
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::AckEvents(ids) if ids == &[7]))
    );
    assert!(published_events(&s.handle(Input::Tick, at(100))).is_empty());
}

#[test]
fn while_the_broker_is_away_the_newest_telemetry_is_kept_and_the_oldest_dropped() {
    let (mut s, _) = booted(vec![record("m", 1, InstallState::Active, None)]);
    let runner = running(&s, "m").unwrap();
    s.handle(Input::Disconnected("gone".into()), at(1));
    let tick = |n: u64| published(runner, "m", "n", n.to_string().into_bytes());
    // Ten minutes of one message a second, more than the queue keeps.
    for n in 0..600 {
        let fx = s.handle(tick(n), at(2 + n));
        assert!(
            !fx.iter()
                .any(|e| matches!(e, Effect::Publish { topic, .. } if topic.contains("telemetry")))
        );
    }
    let fx = s.handle(Input::Connected, at(602));
    let sent: Vec<u64> = fx
        .iter()
        .filter_map(|e| match e {
            Effect::Publish { topic, payload, .. } if topic.contains("telemetry") => {
                String::from_utf8_lossy(payload).parse().ok()
            }
            _ => None,
        })
        .collect();
    // The last minute, oldest first; the newest is there.
    assert_eq!(sent.last(), Some(&599));
    assert!(sent.len() <= 61, "{}", sent.len());
    assert!(sent.windows(2).all(|w| w[0] < w[1]));
    let status = s.status(true, at(602));
    assert!(status.dropped_messages >= 539);
}

#[test]
fn a_session_that_keeps_being_taken_over_is_reported() {
    let (mut s, _) = booted(vec![]);
    let mut warned = false;
    for i in 0..4u64 {
        s.handle(Input::Connected, at(10 * i));
        let fx = s.handle(
            Input::Disconnected("connection reset".into()),
            at(10 * i + 1),
        );
        warned |= fx
            .iter()
            .any(|e| matches!(e, Effect::Log(Level::Error, t) if t.contains("session takeover")));
    }
    assert!(warned);
    assert!(s.status(true, at(40)).broker_note.is_some());
    // A session that lasts clears it.
    s.handle(Input::Connected, at(50));
    s.handle(Input::Tick, at(50 + 121));
    assert!(s.status(true, at(171)).broker_note.is_none());
}

#[test]
fn a_version_replaced_while_on_probation_gets_an_event() {
    let (mut s, _) = booted(vec![record("m", 2, InstallState::Probation, Some(1))]);
    let fx = deploy(&mut s, &manifest("m", 3, &[17]), at(1));
    let (_, op) = store_op(&fx, |op| matches!(op, StoreOp::Install { .. })).unwrap();
    assert_eq!(events_in(&op), [EventKind::Superseded]);
}

#[test]
fn a_newer_group_offer_hidden_by_an_older_device_offer_is_reported() {
    let (mut s, _) = booted(vec![record("m", 2, InstallState::Active, None)]);
    // The device offer that is installed (seq 2).
    s.handle(
        Input::Message {
            topic: "edge/pi-1/desired/m".into(),
            payload: b"device bundle".to_vec(),
        },
        at(1),
    );
    let fx = s.handle(
        Input::Message {
            topic: "edge/group/barn/desired/m".into(),
            payload: b"group bundle".to_vec(),
        },
        at(2),
    );
    let ticket = fx
        .iter()
        .find_map(|e| match e {
            Effect::Verify { ticket, .. } => Some(*ticket),
            _ => None,
        })
        .expect("the hidden offer is looked at");
    let fx = s.handle(
        Input::Verified {
            ticket,
            result: Ok(Box::new(Checked {
                manifest: manifest("m", 5, &[]),
                key_id: KeyId([0; 8]),
                wasm: None,
                prepared: None,
                check_record: None,
                trust_version: 0,
                awaiting_chunks: None,
            })),
        },
        at(2),
    );
    let (_, op) = store_op(&fx, |op| matches!(op, StoreOp::PushEvents { .. })).unwrap();
    assert_eq!(events_in(&op), [EventKind::Outranked]);
    // Nothing is installed from it.
    assert!(store_op(&fx, |op| matches!(op, StoreOp::Install { .. })).is_none());
}

#[test]
fn the_last_will_follows_the_status() {
    let (mut s, fx) = booted(vec![record("m", 1, InstallState::Active, None)]);
    let will = |fx: &[Effect]| {
        fx.iter().rev().find_map(|e| match e {
            Effect::Will(p) => protocol::from_cbor::<Status>(p).ok(),
            _ => None,
        })
    };
    let first = will(&fx).unwrap();
    assert!(!first.online);
    let fx = s.handle(Input::Tick, at(30));
    let later = will(&fx).unwrap();
    assert_eq!(later.ts_ms, at(30).wall_ms);
    assert_eq!(later.uptime_s, 30);
    assert_eq!(later.started_ms, at(0).wall_ms);
    assert_eq!(later.modules.len(), 1);
}

#[test]
fn a_version_that_has_not_started_yet_gives_way_to_a_newer_one_and_never_runs_beside_its_predecessor()
 {
    let (mut s, _) = booted(vec![record("m", 1, InstallState::Active, None)]);
    let old = running(&s, "m").unwrap();
    // v2 is committed and waits for v1's runner, stuck in a call.
    let fx = deploy(&mut s, &manifest("m", 2, &[17]), at(1));
    let (ticket, _) = store_op(&fx, |op| matches!(op, StoreOp::Install { .. })).unwrap();
    let mut r = record("m", 2, InstallState::Probation, Some(1));
    r.current.manifest = manifest("m", 2, &[17]);
    let fx = s.handle(stored(ticket, Stored::Record(Box::new(r))), at(1));
    assert_eq!(stopped(&fx), [old]);
    // v3 arrives meanwhile: committed, and it takes v2's place in the queue.
    let fx = deploy(&mut s, &manifest("m", 3, &[17]), at(2));
    let (ticket, _) = store_op(&fx, |op| matches!(op, StoreOp::Install { .. })).unwrap();
    let mut r = record("m", 3, InstallState::Probation, Some(1));
    r.current.manifest = manifest("m", 3, &[17]);
    let fx = s.handle(stored(ticket, Stored::Record(Box::new(r))), at(2));
    assert!(
        spawned(&fx).is_empty(),
        "nothing starts while v1's runner lives"
    );
    assert!(store_op(&fx, |op| matches!(op, StoreOp::BeginProbation { .. })).is_none());
    // v1 ends: v3 (and only v3) starts, after its snapshot.
    let fx = s.handle(runner_state(old, "m", RunState::Stopped), at(3));
    let (ticket, op) = store_op(&fx, |op| matches!(op, StoreOp::BeginProbation { .. })).unwrap();
    assert!(matches!(op, StoreOp::BeginProbation { seq: 3 }));
    let fx = s.handle(stored(ticket, Stored::Done), at(3));
    assert_eq!(spawned(&fx).len(), 1);
}

#[test]
fn a_version_on_probation_that_cannot_be_instantiated_is_rolled_back() {
    probation_ended_by(RunState::Failed {
        cause: "instantiation failed".into(),
    });
}

// ---- trust-document mode ----

/// The test configuration in trust-document mode.
fn trust_config() -> Config {
    Config::from_toml(
        r#"
device_id = "pi-1"
groups = ["barn"]
state_dir = "/nonexistent"
[mqtt]
url = "mqtt://127.0.0.1:1883"
[agent]
status_interval_s = 10
[trust]
roots = ["/r1.pub", "/r2.pub"]
threshold = 2
"#,
        std::path::Path::new("/"),
    )
    .unwrap()
}

fn trust_outcome(version: u64, changed: Vec<ModuleRecord>) -> Input {
    let payload = crate::core::trust::TrustPayload {
        version,
        issued_at: 1,
        expires_at: None,
        keys: vec![],
        revoked: vec![],
        seq_resets: vec![],
        roots: None,
    };
    Input::Trust {
        ticket: 0,
        result: Ok(Box::new(TrustOutcome {
            policy: Arc::new(Policy::from_payload(&payload).unwrap()),
            view: TrustView {
                version,
                expires_at: None,
            },
            changed,
            events: vec![],
        })),
    }
}

/// Offers a trust document; returns the ticket of the `Effect::Trust` it asks for.
fn offer_trust(s: &mut State, document: &[u8], now: Now) -> Option<u64> {
    let fx = s.handle(
        Input::Message {
            topic: "edge/trust".into(),
            payload: document.to_vec(),
        },
        now,
    );
    fx.iter().find_map(|e| match e {
        Effect::Trust { ticket, .. } => Some(*ticket),
        _ => None,
    })
}

fn answered(input: Input, ticket: u64) -> Input {
    match input {
        Input::Trust { result, .. } => Input::Trust { ticket, result },
        other => other,
    }
}

#[test]
fn a_revoking_document_stops_exactly_the_revoked_module_and_swaps_the_policy_first() {
    let (mut s, _) = booted_with(
        trust_config(),
        vec![
            record("a", 1, InstallState::Active, None),
            record("b", 1, InstallState::Active, None),
        ],
    );
    s.set_trust(Some(TrustView::default()), 0, None);
    let (ra, rb) = (running(&s, "a").unwrap(), running(&s, "b").unwrap());
    let ticket = offer_trust(&mut s, b"doc 2", at(1)).expect("the document is verified");
    // The same bytes again while the first is being applied: nothing more is asked.
    assert_eq!(offer_trust(&mut s, b"doc 2", at(1)), None);
    let mut revoked = record("b", 1, InstallState::Active, None);
    revoked.state = InstallState::Revoked {
        key_id: "00".repeat(8),
    };
    let fx = s.handle(answered(trust_outcome(2, vec![revoked]), ticket), at(2));
    assert!(
        matches!(fx.first(), Some(Effect::Policy(p)) if p.version == 2),
        "the policy goes first: {fx:?}"
    );
    assert_eq!(stopped(&fx), vec![rb]);
    assert_eq!(running(&s, "a"), Some(ra));
    let status = s.status(true, at(2));
    assert_eq!(status.trust_version, Some(2));
    let b = status.modules.iter().find(|m| m.name == "b").unwrap();
    assert_eq!(b.state, ModuleState::Revoked);
    // Its lines go to their safe state once its runner has ended.
    let fx = s.handle(runner_state(rb, "b", RunState::Stopped), at(3));
    assert_eq!(released(&fx), vec!["b".to_string()]);
    // The document in effect, offered again (a reconnect): not evaluated again.
    assert_eq!(offer_trust(&mut s, b"doc 2", at(4)), None);
}

#[test]
fn a_bundle_verified_under_an_older_document_is_verified_again() {
    let (mut s, _) = booted_with(trust_config(), vec![]);
    s.set_trust(Some(TrustView::default()), 0, None);
    let m = manifest("m", 1, &[]);
    let fx = s.handle(
        Input::Message {
            topic: "edge/pi-1/desired/m".into(),
            payload: b"bundle m 1".to_vec(),
        },
        at(1),
    );
    let first = fx
        .iter()
        .find_map(|e| match e {
            Effect::Verify { ticket, .. } => Some(*ticket),
            _ => None,
        })
        .unwrap();
    // A document comes into effect while the bundle is being verified.
    let t = offer_trust(&mut s, b"doc 1", at(1)).unwrap();
    s.handle(answered(trust_outcome(1, vec![]), t), at(2));
    let fx = s.handle(
        Input::Verified {
            ticket: first,
            result: Ok(Box::new(Checked {
                manifest: m.clone(),
                key_id: KeyId([0; 8]),
                wasm: Some(Arc::from(&b"wasm"[..])),
                prepared: Some(prepared("m")),
                check_record: None,
                trust_version: 0,
                awaiting_chunks: None,
            })),
        },
        at(3),
    );
    assert!(
        store_op(&fx, |op| matches!(op, StoreOp::Install { .. })).is_none(),
        "not installed under the old document: {fx:?}"
    );
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::Verify { .. } | Effect::Refetch { .. })),
        "verified again: {fx:?}"
    );
}

// ---- chunked delivery ----

/// A chunked install of `name` at `seq` made of `n` chunks (digests of "c0", "c1", ...).
fn chunked_manifest(name: &str, seq: u64, n: u8) -> Manifest {
    let mut m = manifest(name, seq, &[]);
    m.chunks = (0..n)
        .map(|i| ChunkRef(Sha256::of(format!("c{i}").as_bytes()), 10))
        .collect();
    m.wasm = Some(WasmRef {
        sha256: Sha256::of(b"whole"),
        size: 10 * u64::from(n),
    });
    m
}

/// Offers `m` (chunked) and answers its verification: the fetch's plan ticket.
fn offer_chunked(s: &mut State, m: &Manifest, now: Now) -> (Vec<Effect>, u64) {
    let bundle = format!("signed part {} {}", m.name, m.seq).into_bytes();
    let fx = s.handle(
        Input::Message {
            topic: format!("edge/pi-1/desired/{}", m.name),
            payload: bundle.clone(),
        },
        now,
    );
    let ticket = fx
        .iter()
        .find_map(|e| match e {
            Effect::Verify { ticket, .. } => Some(*ticket),
            _ => None,
        })
        .expect("the offer is verified");
    let fx = s.handle(
        Input::Verified {
            ticket,
            result: Ok(Box::new(Checked {
                manifest: m.clone(),
                key_id: KeyId([0; 8]),
                wasm: None,
                prepared: None,
                check_record: None,
                trust_version: 0,
                awaiting_chunks: Some(Arc::from(bundle)),
            })),
        },
        now,
    );
    let plan = fx
        .iter()
        .find_map(|e| match e {
            Effect::PlanFetch { ticket, chunks, .. } => {
                assert_eq!(chunks.len(), m.chunks.len());
                Some(*ticket)
            }
            _ => None,
        })
        .expect("a plan of the fetch is asked for");
    (fx, plan)
}

/// Answers a fetch's plan: which chunks are held, and the bytes reused.
fn planned(s: &mut State, plan: u64, have: Vec<bool>, reused_bytes: u64, now: Now) -> Vec<Effect> {
    s.handle(
        Input::FetchPlanned {
            ticket: plan,
            result: Ok(FetchPlan { have, reused_bytes }),
        },
        now,
    )
}

fn chunk_topics(fx: &[Effect]) -> (Vec<String>, Vec<String>) {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Subscriptions { added, removed, .. } => Some((added.clone(), removed.clone())),
            _ => None,
        })
        .fold((vec![], vec![]), |(mut a, mut r), (x, y)| {
            a.extend(x);
            r.extend(y);
            (a, r)
        })
}

fn chunk_topic(i: u8) -> String {
    format!(
        "edge/chunk/{}",
        Sha256::of(format!("c{i}").as_bytes()).to_hex()
    )
}

#[test]
fn a_chunked_install_subscribes_only_to_missing_chunks_stages_each_and_assembles_when_all_are_in() {
    let (mut s, _) = booted(vec![]);
    let m = chunked_manifest("big", 1, 4);
    let (_, plan) = offer_chunked(&mut s, &m, at(1));
    // Chunk 1 is held already (an installed version has it).
    let fx = planned(&mut s, plan, vec![false, true, false, false], 10, at(1));
    let (mut added, _) = chunk_topics(&fx);
    added.sort();
    let mut want = [0, 2, 3].map(chunk_topic);
    want.sort();
    assert_eq!(added, want);
    // A chunk arrives: it is staged by the shell, then counted.
    let mut assemble = None;
    for i in [0u8, 2, 3] {
        let fx = s.handle(
            Input::Message {
                topic: chunk_topic(i),
                payload: vec![i; 10],
            },
            at(2),
        );
        let ticket = fx
            .iter()
            .find_map(|e| match e {
                Effect::StageChunk {
                    ticket,
                    size,
                    modules,
                    ..
                } => {
                    assert_eq!((*size, modules.as_slice()), (10, &["big".to_string()][..]));
                    Some(*ticket)
                }
                _ => None,
            })
            .expect("the chunk is staged");
        // The same chunk again while it is staged (a reconnect) is not staged twice.
        let again = s.handle(
            Input::Message {
                topic: chunk_topic(i),
                payload: vec![i; 10],
            },
            at(2),
        );
        assert!(!again.iter().any(|e| matches!(e, Effect::StageChunk { .. })));
        let fx = s.handle(
            Input::ChunkStaged {
                ticket,
                result: Ok(()),
            },
            at(2),
        );
        let (_, removed) = chunk_topics(&fx);
        assert_eq!(removed, [chunk_topic(i)]);
        assemble = fx.iter().find_map(|e| match e {
            Effect::Assemble { ticket, module, .. } => Some((*ticket, module.clone())),
            _ => None,
        });
    }
    let (ticket, module) = assemble.expect("assembled once every chunk is in");
    assert_eq!(module, "big");
    let status = s.status(true, at(2));
    assert_eq!(status.fetched_bytes, 60);
    let big = status.modules.iter().find(|m| m.name == "big").unwrap();
    assert_eq!(big.state, ModuleState::Fetching);
    let f = big.fetch.as_ref().unwrap();
    assert_eq!((f.chunks_have, f.chunks_total, f.reused_bytes), (4, 4, 10));
    // Verified with its Wasm: installed as any bundle.
    let fx = s.handle(
        Input::Verified {
            ticket,
            result: Ok(Box::new(Checked {
                manifest: m.clone(),
                key_id: KeyId([0; 8]),
                wasm: Some(Arc::from(&[0u8; 40][..])),
                prepared: Some(prepared("big")),
                check_record: None,
                trust_version: 0,
                awaiting_chunks: None,
            })),
        },
        at(3),
    );
    assert!(store_op(&fx, |op| matches!(op, StoreOp::Install { .. })).is_some());
    assert!(s.fetches.is_empty());
}

#[test]
fn a_damaged_chunk_is_counted_and_waited_for_and_a_full_disk_abandons_the_fetch() {
    let (mut s, _) = booted(vec![]);
    let m = chunked_manifest("big", 1, 2);
    let (_, plan) = offer_chunked(&mut s, &m, at(1));
    planned(&mut s, plan, vec![false, false], 0, at(1));
    let stage = |s: &mut State, i: u8| {
        let fx = s.handle(
            Input::Message {
                topic: chunk_topic(i),
                payload: vec![9; 10],
            },
            at(2),
        );
        fx.iter()
            .find_map(|e| match e {
                Effect::StageChunk { ticket, .. } => Some(*ticket),
                _ => None,
            })
            .unwrap()
    };
    let t = stage(&mut s, 0);
    let fx = s.handle(
        Input::ChunkStaged {
            ticket: t,
            result: Err(ChunkFailure {
                reason: "its bytes hash to ...".into(),
                refused: true,
            }),
        },
        at(2),
    );
    // Still subscribed, nothing refused for good.
    assert_eq!(chunk_topics(&fx), (vec![], vec![]));
    assert!(store_op(&fx, |op| matches!(op, StoreOp::PushEvents { .. })).is_none());
    let f = s.fetches["big"].status(at(2));
    assert_eq!((f.chunks_refused, f.chunks_have), (1, 0));
    // A disk that cannot take a chunk ends the fetch: staging dropped, one rejection.
    let t = stage(&mut s, 1);
    let fx = s.handle(
        Input::ChunkStaged {
            ticket: t,
            result: Err(ChunkFailure {
                reason: "No space left on device".into(),
                refused: false,
            }),
        },
        at(3),
    );
    let clear = fx
        .iter()
        .position(|e| matches!(e, Effect::ClearStaging { .. }))
        .expect("staging dropped");
    let events = fx
        .iter()
        .position(|e| matches!(e, Effect::Store { .. }))
        .unwrap();
    assert!(clear < events, "room is made before the event is written");
    let (_, op) = store_op(&fx, |op| matches!(op, StoreOp::PushEvents { .. })).unwrap();
    assert_eq!(events_in(&op), [EventKind::Rejected]);
    let (_, removed) = chunk_topics(&fx);
    assert_eq!(removed.len(), 2, "{removed:?}");
    assert!(s.fetches.is_empty());
}

#[test]
fn a_fetch_without_progress_is_reported_once_and_a_replaced_offer_ends_it() {
    let mut config = config();
    config.agent.fetch_timeout_s = 5;
    let (mut s, _) = booted_with(config, vec![]);
    let m = chunked_manifest("big", 1, 2);
    let (_, plan) = offer_chunked(&mut s, &m, at(1));
    planned(&mut s, plan, vec![false, false], 0, at(1));
    let stalled = |fx: &[Effect]| {
        store_op(fx, |op| matches!(op, StoreOp::PushEvents { .. }))
            .is_some_and(|(_, op)| events_in(&op) == [EventKind::FetchStalled])
    };
    assert!(!stalled(&s.handle(Input::Tick, at(5))));
    assert!(stalled(&s.handle(Input::Tick, at(6))));
    assert!(!stalled(&s.handle(Input::Tick, at(20))));
    // A newer version replaces the offer: the fetch ends, the new one is evaluated.
    let newer = b"signed part big 2".to_vec();
    let fx = s.handle(
        Input::Message {
            topic: "edge/pi-1/desired/big".into(),
            payload: newer,
        },
        at(21),
    );
    let (_, op) = store_op(&fx, |op| matches!(op, StoreOp::PushEvents { .. })).unwrap();
    assert_eq!(events_in(&op), [EventKind::Superseded]);
    assert!(fx.iter().any(|e| matches!(e, Effect::Verify { .. })));
    assert_eq!(chunk_topics(&fx).1.len(), 2);
    assert!(s.fetches.is_empty());
}

#[test]
fn a_fetch_abandoned_while_chunks_are_being_staged_releases_their_topics_for_the_next_fetch() {
    let (mut s, _) = booted(vec![]);
    let m = chunked_manifest("big", 1, 3);
    let (_, plan) = offer_chunked(&mut s, &m, at(1));
    planned(&mut s, plan, vec![false; 3], 0, at(1));
    // Two chunks arrive; both are being written when the first write fails.
    let mut tickets = Vec::new();
    for i in [0u8, 1] {
        let fx = s.handle(
            Input::Message {
                topic: chunk_topic(i),
                payload: vec![i; 10],
            },
            at(2),
        );
        tickets.extend(fx.iter().filter_map(|e| match e {
            Effect::StageChunk { ticket, .. } => Some(*ticket),
            _ => None,
        }));
    }
    assert_eq!(tickets.len(), 2);
    let full = |ticket| Input::ChunkStaged {
        ticket,
        result: Err(ChunkFailure {
            reason: "No space left on device".into(),
            refused: false,
        }),
    };
    s.handle(full(tickets[0]), at(3));
    assert!(s.fetches.is_empty());
    // The second write's answer comes after the fetch is gone.
    s.handle(full(tickets[1]), at(3));
    assert!(s.subscribed_chunks.is_empty(), "{:?}", s.subscribed_chunks);
    // A new version with the same chunks subscribes to all of them again.
    let m = chunked_manifest("big", 2, 3);
    let (_, plan) = offer_chunked(&mut s, &m, at(4));
    let fx = planned(&mut s, plan, vec![false; 3], 0, at(4));
    let (added, _) = chunk_topics(&fx);
    assert_eq!(added.len(), 3, "{added:?}");
}
