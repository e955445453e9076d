//! The `edge-agent` daemon as a subprocess: configuration, start, signals, log, store.

use super::*;
use edge_agent::store::Store;
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

/// How to configure an agent.
#[derive(Debug, Clone)]
pub struct AgentSetup {
    /// Device id.
    pub device: String,
    /// Groups.
    pub groups: Vec<String>,
    /// Broker URL.
    pub url: String,
    /// CA and client certificate for `mqtts://`.
    pub tls: Option<(PathBuf, ClientCert)>,
    /// `mqtt.keep_alive_s` (at least 5).
    pub keep_alive_s: u64,
    /// `agent.probation_ticks`.
    pub probation_ticks: u32,
    /// More TOML, appended to the configuration (tables only).
    pub extra: String,
    /// Trust-document mode: `[trust]` with these root key files and threshold instead of
    /// `trusted_keys`.
    pub trust: Option<(Vec<PathBuf>, u64)>,
    /// Environment variables for the agent process.
    pub env: Vec<(String, String)>,
}

impl AgentSetup {
    /// A device on `url` with short timers.
    pub fn new(device: &str, url: &str) -> AgentSetup {
        AgentSetup {
            device: device.into(),
            groups: Vec::new(),
            url: url.into(),
            tls: None,
            keep_alive_s: 5,
            probation_ticks: 2,
            extra: String::new(),
            trust: None,
            env: Vec::new(),
        }
    }

    /// In trust-document mode with these roots.
    pub fn trust_roots(mut self, roots: &[PathBuf], threshold: u64) -> AgentSetup {
        self.trust = Some((roots.to_vec(), threshold));
        self
    }

    /// With an environment variable.
    pub fn env(mut self, key: &str, value: &str) -> AgentSetup {
        self.env.push((key.into(), value.into()));
        self
    }

    /// With more configuration (TOML tables).
    pub fn toml(mut self, extra: &str) -> AgentSetup {
        self.extra.push_str(extra);
        self
    }

    /// In these groups.
    pub fn groups(mut self, groups: &[&str]) -> AgentSetup {
        self.groups = groups.iter().map(|g| g.to_string()).collect();
        self
    }

    /// With mutual TLS.
    pub fn tls(mut self, ca: &Path, cert: ClientCert) -> AgentSetup {
        self.tls = Some((ca.to_path_buf(), cert));
        self
    }
}

/// The `edge-agent` daemon as a subprocess with its own configuration and state directory. Its
/// stderr goes to a file, printed when the test fails. Killed when dropped.
pub struct Agent {
    /// Device id.
    pub device: String,
    /// Holds the configuration, the state and the log; removed with the agent.
    _dir: tempfile::TempDir,
    config: PathBuf,
    state: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    starts: u32,
    env: Vec<(String, String)>,
}

impl Agent {
    /// Writes the configuration (trusting `operator`) and starts the agent.
    pub fn start(setup: &AgentSetup, operator: &Operator) -> Agent {
        let mut agent = Agent::configure(setup, operator);
        agent.start_again();
        agent
    }

    /// Writes the configuration without starting the agent.
    pub fn configure(setup: &AgentSetup, operator: &Operator) -> Agent {
        let dir = tempdir();
        let config = dir.path().join("agent.toml");
        let groups: Vec<String> = setup.groups.iter().map(|g| format!("{g:?}")).collect();
        let trusted = match &setup.trust {
            Some(_) => String::new(),
            None => format!("{:?}", operator.pub_file.display().to_string()),
        };
        let mut text = format!(
            "device_id = {:?}\ngroups = [{}]\nstate_dir = \"state\"\ntrusted_keys = [{trusted}]\n\n\
             [mqtt]\nurl = {:?}\nkeep_alive_s = {}\nreconnect_min_ms = 50\nreconnect_max_ms = 300\n",
            setup.device,
            groups.join(", "),
            setup.url,
            setup.keep_alive_s,
        );
        if let Some((ca, cert)) = &setup.tls {
            text.push_str(&format!(
                "ca_file = {:?}\nclient_cert = {:?}\nclient_key = {:?}\n",
                ca.display().to_string(),
                cert.cert.display().to_string(),
                cert.key.display().to_string()
            ));
        }
        text.push_str(&format!(
            "\n[agent]\nstatus_interval_s = 1\nprobation_ticks = {}\nmax_concurrent_calls = 2\n",
            setup.probation_ticks
        ));
        if let Some((roots, threshold)) = &setup.trust {
            let roots: Vec<String> = roots
                .iter()
                .map(|r| format!("{:?}", r.display().to_string()))
                .collect();
            text.push_str(&format!(
                "\n[trust]\nroots = [{}]\nthreshold = {threshold}\n",
                roots.join(", ")
            ));
        }
        text.push_str(&setup.extra);
        fs::write(&config, text).unwrap();
        Agent {
            device: setup.device.clone(),
            state: dir.path().join("state"),
            log: dir.path().join("agent.log"),
            config,
            _dir: dir,
            child: None,
            starts: 0,
            env: setup.env.clone(),
        }
    }

    /// Starts the agent process (again, with the same configuration and state).
    pub fn start_again(&mut self) {
        assert!(
            self.child.is_none(),
            "agent {} is already running",
            self.device
        );
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        writeln!(log, "===== start {} =====", self.starts).unwrap();
        let child = target_command(env!("CARGO_BIN_EXE_edge-agent"))
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("EDGE_AGENT_CONFIG")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start edge-agent");
        self.child = Some(child);
    }

    /// How the agent exited by itself (it must have); it can then be started again.
    pub fn exited(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the agent was started");
        let exit = child
            .try_wait()
            .unwrap()
            .expect("the agent has exited by itself");
        let mut log = OpenOptions::new().append(true).open(&self.log).unwrap();
        writeln!(log, "===== exited by itself: {exit} =====").unwrap();
        exit
    }

    /// Starts the agent again after it exited by itself; returns how it had exited.
    pub fn restart_after_exit(&mut self) -> ExitStatus {
        let exit = self.exited();
        self.start_again();
        exit
    }

    /// Whether the process is running (reaps it if it exited).
    pub fn running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// SIGTERM, then waits (bounded) for the process to exit; returns its exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("agent running");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        let exit = poll(START, "the agent to exit after SIGTERM", || {
            child.try_wait().unwrap()
        });
        let mut log = OpenOptions::new().append(true).open(&self.log).unwrap();
        writeln!(log, "===== exited after SIGTERM: {exit} =====").unwrap();
        exit
    }

    /// SIGKILL (`kill -9`), and waits for the process to be gone.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("agent running");
        let _ = child.kill();
        let exit = child.wait().unwrap();
        let mut log = OpenOptions::new().append(true).open(&self.log).unwrap();
        writeln!(log, "===== killed: {exit} =====").unwrap();
    }

    /// Rewrites the agent's configuration file with `edit` (the running agent sees it on a
    /// reload or a restart).
    pub fn edit_config(&self, edit: impl FnOnce(String) -> String) {
        let text = fs::read_to_string(&self.config).unwrap();
        fs::write(&self.config, edit(text)).unwrap();
    }

    /// The configuration file.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The state directory (created by the agent at its first start).
    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    /// SIGHUP: the agent reloads its configuration.
    pub fn reload(&self) {
        let child = self.child.as_ref().expect("agent running");
        let status = Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -HUP failed");
    }

    /// Opens the agent's store (the agent must not be running).
    pub fn store(&self) -> Store {
        assert!(
            self.child.is_none(),
            "the store is locked while the agent runs"
        );
        Store::open(&self.state, 1 << 20)
            .unwrap_or_else(|e| panic!("opening the store of {}: {e}", self.device))
    }

    /// The agent's log (all its runs) so far.
    pub fn log(&self) -> String {
        tail(&self.log, 60)
    }

    /// What the agent logged since it was last started.
    pub fn log_of_this_run(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let marker = format!("===== start {} =====", self.starts);
        text.rsplit_once(&marker)
            .map(|(_, run)| run.to_string())
            .unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() || std::env::var_os("EDGE_TEST_AGENT_LOGS").is_some() {
            eprintln!("--- agent {} log ---\n{}", self.device, tail(&self.log, 80));
        }
    }
}
