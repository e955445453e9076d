//! Chunked delivery against real agents and a real mosquitto that passes at most 128 KiB per
//! message (`message_size_limit 131072`, as AWS IoT Core does): a 1 MiB module installs in
//! chunks where one message cannot pass, a damaged chunk is refused on arrival, an upgrade
//! downloads only the chunks that changed, a transfer cut by a broker restart, an agent killed
//! with SIGKILL or a full disk resumes or fails cleanly, and a stalled fetch is reported.

use std::time::Duration;

use edge_agent::core::protocol::{EventKind, ModuleState, Status};

use crate::support::big_module::big_module;
use crate::support::chunks::Chunked;
use crate::support::{
    Agent, AgentSetup, Mosquitto, Observer, Operator, is_running, manifest, module_in, poll, signed,
};

/// What AWS IoT Core passes per message, and what these brokers are limited to.
const LIMIT: usize = 128 << 10;
const MIB: usize = 1 << 20;

fn fetch_of(s: &Status, module: &str) -> Option<edge_agent::core::protocol::FetchStatus> {
    module_in(s, module).and_then(|m| m.fetch.clone())
}

#[test]
fn a_one_mib_module_installs_in_chunks_through_a_broker_that_refuses_it_as_one_message() {
    let broker = Mosquitto::start_limited(LIMIT);
    let op = Operator::new(1);
    let obs = Observer::connect(&broker.url());
    let _agent = Agent::start(&AgentSetup::new("pi-1", &broker.url()), &op);
    obs.status(0, "pi-1", "online", |s| s.online);
    let wasm = big_module(MIB, 0);
    assert!(wasm.len() > 900_000, "{}", wasm.len());

    // As one message, the bundle never passes the broker: this is why chunks exist.
    let one = signed(manifest("big", 1), &wasm, &op.key);
    obs.deploy("pi-1", "big", &one);
    poll(Duration::from_secs(10), "the broker to drop it", || {
        broker.logged("Dropped too large PUBLISH").then_some(())
    });

    // In chunks, each far below the limit, it installs.
    let chunked = Chunked::module("big", 2, &wasm, &op.key);
    assert!(chunked.signed.len() < LIMIT, "{}", chunked.signed.len());
    assert!(chunked.chunks.iter().all(|(_, c)| c.len() < LIMIT));
    let m = obs.mark();
    chunked.deploy(&obs, "pi-1", "big");
    let installed = obs.event(m, "pi-1", EventKind::Installed, "big");
    assert_eq!(installed.seq, Some(2));
    let running = obs.running(m, "pi-1", "big", 2);
    assert_eq!(running.reused_bytes, Some(0), "{running:?}");
    assert_eq!(running.fetch, None);
    let status = obs.status(m, "pi-1", "fetched bytes counted", |s| {
        s.fetched_bytes >= wasm.len() as u64
    });
    // Each chunk came once.
    assert_eq!(status.fetched_bytes, wasm.len() as u64);
    // The staging area is gone with the install.
    let staged = _agent.state_dir().join("staging/big");
    assert!(!staged.exists(), "{} is left", staged.display());
}

#[test]
fn a_damaged_chunk_is_refused_on_arrival_and_the_install_completes_once_the_right_one_appears() {
    let broker = Mosquitto::start_limited(LIMIT);
    let op = Operator::new(1);
    let obs = Observer::connect(&broker.url());
    let agent = Agent::start(&AgentSetup::new("pi-1", &broker.url()), &op);
    obs.status(0, "pi-1", "online", |s| s.online);
    let wasm = big_module(256 << 10, 0);
    let chunked = Chunked::module("big", 1, &wasm, &op.key);
    let bad = 3;
    let m = obs.mark();
    // Chunk 3 with one byte flipped, on its own topic; the others as they are.
    let (sha, bytes) = &chunked.chunks[bad];
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 0x01;
    obs.publish(&Chunked::topic(sha), &flipped, true);
    chunked.publish_chunks(&obs, |i| i != bad);
    obs.deploy("pi-1", "big", &chunked.signed);
    let total = chunked.chunks.len() as u64;
    let s = obs.status(m, "pi-1", "the damaged chunk refused", |s| {
        fetch_of(s, "big").is_some_and(|f| f.chunks_refused >= 1 && f.chunks_have == total - 1)
    });
    let big = module_in(&s, "big").unwrap();
    assert_eq!(big.state, ModuleState::Fetching, "{big:?}");
    assert!(agent.log().contains("refused"), "{}", agent.log());
    // The right bytes appear on the topic: the agent, still subscribed, takes them.
    obs.publish(&Chunked::topic(sha), bytes, true);
    obs.running(m, "pi-1", "big", 1);
}

#[test]
fn an_upgrade_changing_one_function_of_a_one_mib_module_downloads_at_most_a_tenth_of_it() {
    let broker = Mosquitto::start_limited(LIMIT);
    let op = Operator::new(1);
    let obs = Observer::connect(&broker.url());
    let _agent = Agent::start(&AgentSetup::new("pi-1", &broker.url()), &op);
    obs.status(0, "pi-1", "online", |s| s.online);
    let v1 = big_module(MIB, 0);
    let v2 = big_module(MIB, 1);
    let first = Chunked::module("big", 1, &v1, &op.key);
    let m = obs.mark();
    first.deploy(&obs, "pi-1", "big");
    obs.running(m, "pi-1", "big", 1);
    let before = obs
        .status(m, "pi-1", "v1's bytes counted", |s| {
            s.fetched_bytes >= v1.len() as u64
        })
        .fetched_bytes;

    let second = Chunked::module("big", 2, &v2, &op.key);
    let m = obs.mark();
    second.deploy(&obs, "pi-1", "big");
    let status = obs.status(m, "pi-1", "big running seq 2", |s| {
        module_in(s, "big").is_some_and(|b| b.seq == 2 && is_running(b))
    });
    let running = module_in(&status, "big").unwrap().clone();
    let after = status.fetched_bytes;
    let downloaded = after - before;
    let reused = running.reused_bytes.unwrap_or(0);
    assert_eq!(downloaded + reused, v2.len() as u64, "{running:?}");
    assert!(
        downloaded * 10 <= v2.len() as u64,
        "downloaded {downloaded} of {} bytes",
        v2.len()
    );
}

#[test]
fn a_fetch_whose_chunks_do_not_come_is_reported_and_completes_when_they_do() {
    let broker = Mosquitto::start_limited(LIMIT);
    let op = Operator::new(1);
    let obs = Observer::connect(&broker.url());
    let setup = AgentSetup::new("pi-1", &broker.url()).toml("fetch_timeout_s = 1\n");
    let _agent = Agent::start(&setup, &op);
    obs.status(0, "pi-1", "online", |s| s.online);
    // A running module that the stalled fetch must not disturb.
    let small = Chunked::module("small", 1, &big_module(64 << 10, 0), &op.key);
    let m = obs.mark();
    small.deploy(&obs, "pi-1", "small");
    obs.running(m, "pi-1", "small", 1);

    let wasm = big_module(256 << 10, 0);
    let chunked = Chunked::module("big", 1, &wasm, &op.key);
    let m = obs.mark();
    obs.deploy("pi-1", "big", &chunked.signed);
    let stalled = obs.event(m, "pi-1", EventKind::FetchStalled, "big");
    assert_eq!(stalled.seq, Some(1));
    assert!(
        stalled.reason.as_deref().unwrap_or("").contains("chunks"),
        "{stalled:?}"
    );
    let s = obs.status(m, "pi-1", "big fetching", |s| {
        fetch_of(s, "big").is_some_and(|f| f.stalled_s.is_some())
    });
    let f = fetch_of(&s, "big").unwrap();
    // What it holds came from the installed module (the two share their first functions).
    assert_eq!(f.chunks_total, chunked.chunks.len() as u64);
    assert!(f.chunks_have < f.chunks_total, "{f:?}");
    assert_eq!(f.bytes_have, f.reused_bytes, "{f:?}");
    assert!(module_in(&s, "small").is_some_and(is_running));
    // The chunks arrive: it installs.
    chunked.publish_chunks(&obs, |_| true);
    obs.running(m, "pi-1", "big", 1);
}

#[test]
fn an_offer_replaced_while_its_chunks_are_missing_is_superseded_and_the_new_one_installs() {
    let broker = Mosquitto::start_limited(LIMIT);
    let op = Operator::new(1);
    let obs = Observer::connect(&broker.url());
    let _agent = Agent::start(&AgentSetup::new("pi-1", &broker.url()), &op);
    obs.status(0, "pi-1", "online", |s| s.online);
    let one = Chunked::module("big", 1, &big_module(256 << 10, 0), &op.key);
    let m = obs.mark();
    // Version 1's signed part, but none of its chunks.
    obs.deploy("pi-1", "big", &one.signed);
    obs.status(m, "pi-1", "big fetching", |s| fetch_of(s, "big").is_some());
    let two = Chunked::module("big", 2, &big_module(256 << 10, 7), &op.key);
    two.deploy(&obs, "pi-1", "big");
    let e = obs.event(m, "pi-1", EventKind::Superseded, "big");
    assert_eq!(e.seq, Some(1));
    obs.running(m, "pi-1", "big", 2);
}

/// Waits for a status of `device` showing `module`'s fetch with `have` chunks in and
/// `fetched` bytes received; returns the fetch's view.
fn wait_fetch_at(
    obs: &Observer,
    m: usize,
    device: &str,
    module: &str,
    have: u64,
    fetched: u64,
) -> edge_agent::core::protocol::FetchStatus {
    let s = obs.status(
        m,
        device,
        &format!("{module} fetching with {have} chunks in, {fetched} bytes fetched"),
        |s| {
            s.fetched_bytes == fetched && fetch_of(s, module).is_some_and(|f| f.chunks_have == have)
        },
    );
    fetch_of(&s, module).unwrap()
}

#[test]
fn a_broker_restart_mid_transfer_resumes_without_downloading_verified_chunks_again() {
    let mut broker = Mosquitto::start_limited(LIMIT);
    let op = Operator::new(1);
    let obs = Observer::connect(&broker.url());
    let agent = Agent::start(&AgentSetup::new("pi-1", &broker.url()), &op);
    obs.status(0, "pi-1", "online", |s| s.online);
    let wasm = big_module(MIB, 0);
    let chunked = Chunked::module("big", 1, &wasm, &op.key);
    let n = chunked.chunks.len();
    let half = |i: usize| i < n / 2;
    let m = obs.mark();
    // The signed part and the first half of the chunks (each distinct chunk once).
    let first = chunked.publish_distinct(&obs, half);
    obs.deploy("pi-1", "big", &chunked.signed);
    let f = wait_fetch_at(&obs, m, "pi-1", "big", chunked.chunks_covered(half), first);
    assert_eq!(f.bytes_have, first, "{f:?}");
    assert_eq!(f.reused_bytes, 0, "{f:?}");

    // The broker dies and comes back empty (no persistence): the operator publishes it all
    // again, every chunk and the signed part.
    let connacks = obs.connacks();
    broker.kill();
    broker.start_again();
    obs.wait_subscribed(connacks);
    let m = obs.mark();
    let all = chunked.publish_distinct(&obs, |_| true);
    obs.deploy("pi-1", "big", &chunked.signed);
    assert_eq!(all, chunked.distinct_bytes(|_| true));
    let installed = obs.event(m, "pi-1", EventKind::Installed, "big");
    assert_eq!(installed.seq, Some(1));
    obs.running(m, "pi-1", "big", 1);
    // The same agent process: what it received is every distinct chunk exactly once; the
    // verified half was not sent to it again.
    let s = obs.status(m, "pi-1", "every chunk counted", |s| s.fetched_bytes >= all);
    assert_eq!(s.fetched_bytes, all, "{}", agent.log());
    // And nothing arrives twice later (a resubscription would resend retained chunks).
    let later = obs.mark();
    obs.status(later, "pi-1", "a later report", |_| true);
    let s = obs.status(later, "pi-1", "a second later report", |_| true);
    assert_eq!(s.fetched_bytes, all);
    assert!(!agent.state_dir().join("staging/big").exists());
}

#[test]
fn an_agent_killed_mid_transfer_resumes_from_its_staging_area() {
    let broker = Mosquitto::start_limited(LIMIT);
    let op = Operator::new(1);
    let obs = Observer::connect(&broker.url());
    let mut agent = Agent::start(&AgentSetup::new("pi-1", &broker.url()), &op);
    obs.status(0, "pi-1", "online", |s| s.online);
    let wasm = big_module(MIB, 0);
    let chunked = Chunked::module("big", 1, &wasm, &op.key);
    let n = chunked.chunks.len();
    let half = |i: usize| i < n / 2;
    let m = obs.mark();
    let first = chunked.publish_distinct(&obs, half);
    obs.deploy("pi-1", "big", &chunked.signed);
    wait_fetch_at(&obs, m, "pi-1", "big", chunked.chunks_covered(half), first);
    let staging = agent.state_dir().join("staging/big");
    assert!(staging.is_dir(), "{} is missing", staging.display());

    agent.kill9();
    // The rest appears while the agent is down.
    let rest = chunked.distinct_bytes(|i| !half(i));
    let published = chunked.publish_distinct(&obs, |i| !half(i));
    assert_eq!(published, rest);
    let m = obs.mark();
    agent.start_again();
    let installed = obs.event(m, "pi-1", EventKind::Installed, "big");
    assert_eq!(installed.seq, Some(1));
    obs.running(m, "pi-1", "big", 1);
    // The new process received only the chunks that were missing.
    let s = obs.status(m, "pi-1", "the missing chunks counted", |s| {
        s.fetched_bytes >= rest
    });
    assert_eq!(s.fetched_bytes, rest, "{}", agent.log_of_this_run());
    assert!(
        agent.log_of_this_run().contains(&format!(
            "{} of {n} chunks held already",
            chunked.chunks_covered(half)
        )),
        "{}",
        agent.log_of_this_run()
    );
    assert!(!staging.exists(), "{} is left", staging.display());
}

/// A device whose state directory (a 24 MiB tmpfs) runs v1 of `big` (64 KiB, chunked), then
/// fills up but for ~256 KiB, and is offered a 1 MiB v2 in chunks, which it must refuse cleanly.
/// Returns the rig and the filler file (remove it for room again).
fn full_disk_refuses_v2() -> (
    Mosquitto,
    Operator,
    Observer,
    Agent,
    crate::recovery::Tmpfs,
    std::path::PathBuf,
) {
    use crate::recovery::{Tmpfs, fill};
    let broker = Mosquitto::start_limited(LIMIT);
    let op = Operator::new(1);
    let obs = Observer::connect(&broker.url());
    let mut agent = Agent::configure(&AgentSetup::new("pi-1", &broker.url()), &op);
    let tmpfs = Tmpfs::mount(agent.state_dir(), "24m");
    agent.start_again();
    obs.status(0, "pi-1", "online", |s| s.online);
    let v1 = Chunked::module("big", 1, &big_module(64 << 10, 0), &op.key);
    let m = obs.mark();
    v1.deploy(&obs, "pi-1", "big");
    obs.running(m, "pi-1", "big", 1);

    // The disk fills up, but for ~256 KiB.
    let filler = agent.state_dir().join("filler");
    fill(&filler);
    let full = std::fs::metadata(&filler).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .unwrap();
    f.set_len(full - (256 << 10)).unwrap();
    f.sync_all().unwrap();
    drop(f);

    // A 1 MiB v2 in chunks cannot be staged: refused, with the reason.
    let v2 = Chunked::module("big", 2, &big_module(MIB, 1), &op.key);
    let m = obs.mark();
    v2.deploy(&obs, "pi-1", "big");
    let rejected = obs.event(m, "pi-1", EventKind::Rejected, "big");
    assert_eq!(rejected.seq, Some(2), "{rejected:?}");
    let reason = rejected.reason.clone().unwrap_or_default();
    assert!(reason.contains("could not be staged"), "{rejected:?}");
    // v1 runs on, untouched, and keeps being called.
    let after = obs.mark();
    let calls = |s: &Status| module_in(s, "big").map(|b| (b.seq, is_running(b), b.calls));
    let a = obs.status(after, "pi-1", "big v1 running", |s| {
        calls(s).is_some_and(|(seq, run, _)| seq == 1 && run)
    });
    let a = calls(&a).unwrap().2;
    let s = obs.status(after, "pi-1", "big v1 called since", |s| {
        calls(s).is_some_and(|(seq, run, c)| seq == 1 && run && c > a)
    });
    assert_eq!(fetch_of(&s, "big"), None, "{s:?}");
    let staging = agent.state_dir().join("staging/big");
    assert!(!staging.exists(), "{} is left", staging.display());
    assert!(agent.running(), "{}", agent.log_of_this_run());
    (broker, op, obs, agent, tmpfs, filler)
}

#[test]
fn a_full_disk_during_staging_refuses_the_bundle_cleanly_and_the_running_version_is_untouched() {
    let (_broker, _op, obs, mut agent, _tmpfs, filler) = full_disk_refuses_v2();
    // Room again and a restart: the retained v2 is fetched again and installs.
    std::fs::remove_file(&filler).unwrap();
    agent.kill9();
    let m = obs.mark();
    agent.start_again();
    obs.running(m, "pi-1", "big", 2);
    let staging = agent.state_dir().join("staging/big");
    assert!(!staging.exists(), "{} is left", staging.display());
}

/// A fetch abandoned because a chunk could not be staged must release every chunk topic it
/// held, those still being written at that moment too: a later fetch of the same chunks
/// subscribes to them again, so the broker sends their retained copies (without that, the new
/// version stalled with `fetch_stalled` until the agent restarted).
#[test]
fn after_a_full_disk_refusal_a_new_version_in_chunks_installs_without_a_restart() {
    let (_broker, op, obs, _agent, _tmpfs, filler) = full_disk_refuses_v2();
    std::fs::remove_file(&filler).unwrap();
    // v3 shares all but one function with the refused v2.
    let v3 = Chunked::module("big", 3, &big_module(MIB, 2), &op.key);
    let m = obs.mark();
    v3.deploy(&obs, "pi-1", "big");
    obs.running(m, "pi-1", "big", 3);
}

#[test]
fn a_group_deploy_to_ten_agents_uses_each_chunk_once_on_the_broker() {
    let broker = Mosquitto::start_limited(LIMIT);
    let op = Operator::new(1);
    let obs = Observer::connect(&broker.url());
    // Ten agents on this machine; three under qemu-user (`cross/test-arm`), where each agent is
    // an emulated process and the point is the architecture, not the fleet's size.
    let emulated = std::env::var("EDGE_TEST_RUNNER").is_ok_and(|r| !r.trim().is_empty());
    let n = if emulated { 3 } else { 10 };
    let devices: Vec<String> = (0..n).map(|i| format!("pi-{i}")).collect();
    let _agents: Vec<Agent> = devices
        .iter()
        .map(|d| Agent::start(&AgentSetup::new(d, &broker.url()).groups(&["fleet"]), &op))
        .collect();
    for d in &devices {
        obs.status(0, d, "online", |s| s.online);
    }
    let wasm = big_module(256 << 10, 0);
    let chunked = Chunked::module("big", 1, &wasm, &op.key);
    let distinct = chunked.distinct_bytes(|_| true);
    let m = obs.mark();
    chunked.publish_distinct(&obs, |_| true);
    obs.deploy_group("fleet", "big", &chunked.signed);
    for d in &devices {
        obs.running(m, d, "big", 1);
        let s = obs.status(m, d, "every chunk counted", |s| s.fetched_bytes >= distinct);
        assert_eq!(s.fetched_bytes, distinct, "{d}");
    }
    assert!(distinct <= wasm.len() as u64);
    // The broker received each chunk once (its debug log has a line per PUBLISH received)
    // and sent it to each of the ten agents.
    let log = broker.log_text();
    for i in chunked.first_of_each() {
        let topic = Chunked::topic(&chunked.chunks[i].0);
        let received = log
            .lines()
            .filter(|l| l.contains("Received PUBLISH") && l.contains(&topic))
            .count();
        assert_eq!(received, 1, "{topic}");
        let sent = log
            .lines()
            .filter(|l| l.contains("Sending PUBLISH") && l.contains(&topic))
            .count();
        assert_eq!(sent, devices.len(), "{topic}");
    }
}
