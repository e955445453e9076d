//! Test support: fixtures (keys, small modules, manifests, hand-made bundles, built guests) and the
//! real-broker harness for the daemon tests: a private mosquitto per test (plain or mutual TLS),
//! an embedded rumqttd, the agent as a subprocess, `edgectl`, and an observer client that records
//! what the agents publish and lets a test wait for a predicate with a deadline.
//!
//! Nothing here sleeps in the hope that something happened: every wait polls a condition until a
//! deadline and fails with what it saw, the agents' logs and the broker's log.

#![allow(dead_code)]

pub mod agent;
pub mod big_module;
pub mod certs;
pub mod chunks;
pub mod edgectl;
pub mod fixtures;
pub mod mosquitto;
pub mod observer;
pub mod operator;
pub mod ports;
pub mod rumqttd;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

pub use agent::{Agent, AgentSetup};
pub use certs::{Certs, ClientCert};
pub use edgectl::{edgectl, edgectl_ok};
pub use fixtures::*;
pub use mosquitto::Mosquitto;
pub use observer::{Observer, Seen, is_running, module_in};
pub use operator::Operator;
pub use ports::{free_port, listening};
pub use rumqttd::start_rumqttd;

/// The usual cast of a daemon test: a private broker, an operator, an observer, and the agent
/// "pi-1" trusting the operator (with the setup a test asks for).
pub struct Rig {
    /// The observer (first: it goes before the broker it is connected to).
    pub obs: Observer,
    /// The agent.
    pub agent: Agent,
    /// The operator.
    pub op: Operator,
    /// The broker.
    pub broker: Mosquitto,
}

impl Rig {
    /// pi-1 with the default setup, online.
    pub fn start() -> Rig {
        Rig::with(|setup| setup)
    }

    /// pi-1 configured by `setup`, online.
    pub fn with(setup: impl FnOnce(AgentSetup) -> AgentSetup) -> Rig {
        let broker = Mosquitto::start();
        let op = Operator::new(1);
        let obs = Observer::connect(&broker.url());
        let agent = Agent::start(&setup(AgentSetup::new("pi-1", &broker.url())), &op);
        obs.status(0, "pi-1", "online", |s| s.online);
        Rig {
            obs,
            agent,
            op,
            broker,
        }
    }

    /// Deploys guest `name` at `seq` to pi-1 and waits until it runs off probation.
    pub fn deploy_running(&self, name: &str, seq: u64) {
        deploy_running(&self.obs, &self.op, name, seq);
    }
}

/// Deploys guest `name` at `seq` to pi-1 and waits until it runs off probation.
pub fn deploy_running(obs: &Observer, op: &Operator, name: &str, seq: u64) {
    obs.deploy("pi-1", name, &op.bundle(name, seq, name));
    obs.running(0, "pi-1", name, seq);
}

/// How long a broker or an agent may take to start or stop.
pub const START: Duration = Duration::from_secs(20);

/// Polls `f` every 20 ms until it returns `Some`, or panics with `what` after `timeout`.
pub fn poll<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last `n` lines of a text file (for failure messages).
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| format!("({}: {e})", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
