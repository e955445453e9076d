//! Module runners: restart with backoff, quarantine, probation, and many modules ticking side by
//! side while a hog burns its budget.

use std::collections::HashMap;
use std::time::Duration;

use edge_agent::core::policy::RestartPolicy;
use edge_agent::core::rate::Rate;
use edge_agent::runtime::host::HostLimits;
use edge_agent::runtime::kv::MemoryKv;
use edge_agent::runtime::runner::{self, CallKind, GuestPool, RunState, RunnerConfig, RunnerEvent};
use edge_agent::runtime::{Outcome, Runtime, RuntimeConfig};
use tokio::sync::mpsc;

use crate::support::guest;

/// Generous bound on any wait below; tests end as soon as the awaited event arrives.
const PATIENCE: Duration = Duration::from_secs(120);

fn spawn(
    rt: &Runtime,
    pool: &GuestPool,
    name: &str,
    config: RunnerConfig,
    events: &mpsc::Sender<RunnerEvent>,
) -> runner::RunnerHandle {
    let (m, wasm) = guest(name);
    let prepared = rt.prepare(&m, &wasm).unwrap();
    let kv = (m.caps.kv_quota_bytes > 0)
        .then(|| Box::new(MemoryKv::new(m.caps.kv_quota_bytes)) as Box<_>);
    runner::spawn(
        rt.clone(),
        pool.clone(),
        prepared,
        kv,
        config,
        events.clone(),
    )
}

fn fast_policy(quarantine_after: u32) -> RestartPolicy {
    RestartPolicy {
        backoff_initial_ms: 5,
        backoff_max_ms: 20,
        quarantine_after,
        window_ms: 60_000,
        stable_after_ms: 60_000,
    }
}

async fn next_state(rx: &mut mpsc::Receiver<RunnerEvent>, module: &str) -> RunState {
    tokio::time::timeout(PATIENCE, async {
        loop {
            match rx.recv().await.expect("events open") {
                RunnerEvent::State {
                    module: m, state, ..
                } if m == module => return state,
                _ => {}
            }
        }
    })
    .await
    .expect("a state change in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_module_backs_off_then_is_quarantined_until_an_operator_restarts_it() {
    let rt = Runtime::new(RuntimeConfig::default());
    let pool = GuestPool::new(2);
    let (tx, mut rx) = mpsc::channel(1024);
    let config = RunnerConfig {
        id: 0,
        policy: fast_policy(3),
        probation_ticks: None,
        durability: None,
    };
    let h = spawn(&rt, &pool, "trapper", config, &tx);
    let mut seen = Vec::new();
    loop {
        let s = next_state(&mut rx, "trapper").await;
        let done = matches!(s, RunState::Quarantined { .. });
        seen.push(s);
        if done {
            break;
        }
    }
    let backoffs: Vec<u64> = seen
        .iter()
        .filter_map(|s| match s {
            RunState::BackingOff { delay_ms, .. } => Some(*delay_ms),
            _ => None,
        })
        .collect();
    assert_eq!(backoffs, [5, 10], "{seen:?}");
    match seen.last() {
        Some(RunState::Quarantined { cause, failures: 3 }) => {
            assert!(cause.contains("tick: trapped"), "{cause}")
        }
        other => panic!("{other:?}"),
    }
    // Quarantined: it stays put. An operator's restart runs it again.
    h.restart().unwrap();
    assert_eq!(next_state(&mut rx, "trapper").await, RunState::Running);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_that_traps_in_init_fails_its_probation_without_a_restart() {
    let rt = Runtime::new(RuntimeConfig::default());
    let pool = GuestPool::new(2);
    let (tx, mut rx) = mpsc::channel(1024);
    let config = RunnerConfig {
        id: 0,
        policy: fast_policy(5),
        probation_ticks: Some(2),
        durability: None,
    };
    let h = spawn(&rt, &pool, "init-trapper", config, &tx);
    assert_eq!(next_state(&mut rx, "init-trapper").await, RunState::Running);
    match next_state(&mut rx, "init-trapper").await {
        RunState::ProbationFailed { cause } => {
            assert!(cause.starts_with("init: trapped"), "{cause}")
        }
        other => panic!("{other:?}"),
    }
    tokio::time::timeout(PATIENCE, async {
        while !h.is_finished() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_new_version_passes_probation_after_its_first_ticks() {
    let rt = Runtime::new(RuntimeConfig {
        min_tick_interval_ms: 1,
        ..RuntimeConfig::default()
    });
    let pool = GuestPool::new(2);
    let (tx, mut rx) = mpsc::channel(1024);
    let (mut m, wasm) = guest("heartbeat");
    m.limits.tick_interval_ms = 5;
    let prepared = rt.prepare(&m, &wasm).unwrap();
    let config = RunnerConfig {
        id: 0,
        policy: fast_policy(5),
        probation_ticks: Some(2),
        durability: None,
    };
    let h = runner::spawn(rt.clone(), pool, prepared, None, config, tx);
    let mut ticks = 0;
    tokio::time::timeout(PATIENCE, async {
        loop {
            match rx.recv().await.unwrap() {
                RunnerEvent::Called {
                    call: CallKind::Tick,
                    ..
                } => ticks += 1,
                RunnerEvent::State {
                    state: RunState::ProbationPassed,
                    ..
                } => break,
                _ => {}
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(ticks, 2);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_reach_on_message_through_the_runner() {
    let rt = Runtime::new(RuntimeConfig::default());
    let pool = GuestPool::new(2);
    let (tx, mut rx) = mpsc::channel(1024);
    let config = RunnerConfig {
        id: 0,
        policy: fast_policy(5),
        probation_ticks: None,
        durability: None,
    };
    let h = spawn(&rt, &pool, "echo", config, &tx);
    h.deliver("a".into(), b"1".to_vec()).unwrap();
    let report = tokio::time::timeout(PATIENCE, async {
        loop {
            if let RunnerEvent::Called {
                call: CallKind::Message,
                report,
                ..
            } = rx.recv().await.unwrap()
            {
                return report;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(report.messages[0].topic, "echo/a");
    assert!(h.stop().await.is_none(), "echo has no key-value store");
}

/// 50 heartbeats tick every 10 ms while a fuel hog burns a budget large enough to keep one worker
/// busy for a long call. Counted, not timed: heartbeat ticks completed while the hog's call was in
/// flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_modules_keep_ticking_while_a_hog_burns_its_budget() {
    let rt = Runtime::new(RuntimeConfig {
        max_fuel_per_call: u64::MAX,
        // The hog must burn its budget, not stop at its deadline.
        call_deadline_ms: 3_600_000,
        min_tick_interval_ms: 1,
        host: HostLimits {
            publish_rate: Rate {
                per_sec: 1000,
                burst: 1000,
            },
            ..HostLimits::default()
        },
        ..RuntimeConfig::default()
    });
    let pool = GuestPool::new(2);
    let (tx, mut rx) = mpsc::channel(100_000);
    let config = RunnerConfig {
        id: 0,
        policy: fast_policy(100),
        probation_ticks: None,
        durability: None,
    };
    let (mut hog_manifest, hog_wasm) = guest("fuel-hog");
    hog_manifest.limits.fuel_per_call = 2_000_000_000;
    hog_manifest.limits.tick_interval_ms = 1;
    let hog = runner::spawn(
        rt.clone(),
        pool.clone(),
        rt.prepare(&hog_manifest, &hog_wasm).unwrap(),
        None,
        config.clone(),
        tx.clone(),
    );
    // Wait until the hog is inside its first tick.
    tokio::time::timeout(PATIENCE, async {
        loop {
            if let RunnerEvent::Calling {
                call: CallKind::Tick,
                ..
            } = rx.recv().await.unwrap()
            {
                break;
            }
        }
    })
    .await
    .unwrap();

    let (mut hb, wasm) = guest("heartbeat");
    hb.limits.tick_interval_ms = 10;
    let mut handles = Vec::new();
    for i in 0..50 {
        let mut m = hb.clone();
        m.name = format!("hb-{i}");
        m.caps.publish = vec!["heartbeat/#".into()];
        let prepared = rt.prepare(&m, &wasm).unwrap();
        handles.push(runner::spawn(
            rt.clone(),
            pool.clone(),
            prepared,
            None,
            config.clone(),
            tx.clone(),
        ));
    }
    let mut ticks: HashMap<String, u32> = HashMap::new();
    let hog_outcome = tokio::time::timeout(PATIENCE, async {
        loop {
            match rx.recv().await.unwrap() {
                RunnerEvent::Called { module, report, .. } if module == "fuel-hog" => {
                    return report.outcome;
                }
                RunnerEvent::Called {
                    module,
                    call: CallKind::Tick,
                    report,
                    ..
                } => {
                    assert!(
                        report.outcome.is_finished(),
                        "{module}: {:?}",
                        report.outcome
                    );
                    *ticks.entry(module).or_default() += 1;
                }
                _ => {}
            }
        }
    })
    .await
    .unwrap();
    assert!(
        matches!(hog_outcome, Outcome::OutOfFuel { .. }),
        "{hog_outcome:?}"
    );
    assert_eq!(
        ticks.len(),
        50,
        "every heartbeat ticked during the hog's call: {ticks:?}"
    );
    let least = ticks.values().min().copied().unwrap_or(0);
    assert!(
        least >= 3,
        "every heartbeat ticked at least 3 times during the hog's call: {ticks:?}"
    );
    for h in handles {
        h.stop().await;
    }
    hog.stop().await;
}
