//! Real-broker harness for the daemon tests: a private mosquitto per test (plain or mutual TLS),
//! an embedded rumqttd, the agent as a subprocess, `edgectl`, and an observer client that records
//! what the agents publish and lets a test wait for a predicate with a deadline.
//!
//! Nothing here sleeps in the hope that something happened: every wait polls a condition until a
//! deadline and fails with what it saw, the agents' logs and the broker's log.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use edge_agent::core::keys;
use edge_agent::core::protocol::{
    self, Event, EventKind, LogRecord, ModuleState, ModuleStatus, Status,
};
use edge_agent::mqtt::{self, BrokerUrl, ClientSettings, TlsFiles};
use edge_agent::store::Store;
use rumqttc::{Packet, QoS};

use crate::harness::tempdir;

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

// ---------------------------------------------------------------------------------------------
// Ports

/// A loopback port nothing listens on, below the kernel's ephemeral range (32768 and up) so that
/// no outgoing connection of this or another process is handed the same port while the broker
/// is down. Ports are spread by process id and handed out once per process.
pub fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    const BASE: u16 = 20_000;
    const SPAN: u16 = 12_000;
    let seed = u16::try_from(std::process::id() % u32::from(SPAN)).unwrap_or(0);
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = BASE + (seed.wrapping_add(n.wrapping_mul(7))) % SPAN;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {BASE} and {}", BASE + SPAN);
}

/// Whether something accepts connections on the loopback port.
pub fn listening(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

// ---------------------------------------------------------------------------------------------
// mosquitto

/// A private mosquitto on a loopback port, killed when dropped. It can be stopped and started
/// again on the same port. Retained messages do not survive a restart (`persistence false`).
pub struct Mosquitto {
    port: u16,
    /// Holds the configuration and the log; removed with the broker.
    _dir: tempfile::TempDir,
    conf: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    tls: Option<Certs>,
}

impl Mosquitto {
    /// A plain-TCP broker, started.
    pub fn start() -> Mosquitto {
        Mosquitto::start_with(None)
    }

    /// A broker that requires a client certificate signed by `certs`' CA (mutual TLS), started.
    pub fn start_tls(certs: &Certs) -> Mosquitto {
        Mosquitto::start_with(Some(certs.clone()))
    }

    /// The shipped fleet broker (`configs/mosquitto-fleet.conf` and its ACL, with this test's
    /// certificates, port and no persistence), started.
    pub fn start_fleet(certs: &Certs) -> Mosquitto {
        Mosquitto::start_as(Some(certs.clone()), true)
    }

    /// Starts on a free port; if another process takes the port first, on another one.
    fn start_with(tls: Option<Certs>) -> Mosquitto {
        Mosquitto::start_as(tls, false)
    }

    fn start_as(tls: Option<Certs>, fleet: bool) -> Mosquitto {
        let mut m = Mosquitto::configure(tls.clone(), free_port(), fleet);
        for _ in 0..5 {
            match m.launch() {
                Ok(child) => {
                    m.child = Some(child);
                    return m;
                }
                Err(_) => m = Mosquitto::configure(tls.clone(), free_port(), fleet),
            }
        }
        let e = m.launch().err().unwrap_or_default();
        panic!("mosquitto would not start: {e}");
    }

    fn configure(tls: Option<Certs>, port: u16, fleet: bool) -> Mosquitto {
        let dir = tempdir();
        let conf = dir.path().join("mosquitto.conf");
        let log = dir.path().join("mosquitto.log");
        if let (true, Some(c)) = (fleet, &tls) {
            // The shipped configuration, line by line, with this test's files and port.
            let acl = dir.path().join("fleet.acl");
            fs::copy(
                crate::harness::repo().join("configs/mosquitto-fleet.acl"),
                &acl,
            )
            .unwrap();
            let shipped =
                fs::read_to_string(crate::harness::repo().join("configs/mosquitto-fleet.conf"))
                    .unwrap();
            let mut text = String::new();
            for line in shipped.lines() {
                let key = line.split_whitespace().next().unwrap_or("");
                let line = match key {
                    "listener" => format!("listener {port} 127.0.0.1"),
                    "cafile" => format!("cafile {}", c.ca.display()),
                    "certfile" => format!("certfile {}", c.server_cert.display()),
                    "keyfile" => format!("keyfile {}", c.server_key.display()),
                    "acl_file" => format!("acl_file {}", acl.display()),
                    "persistence" => "persistence false".into(),
                    "persistence_location" => continue,
                    _ => line.to_string(),
                };
                text.push_str(&line);
                text.push('\n');
            }
            text.push_str(
                "log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n\
                 log_type information\nconnection_messages true\nuser root\n",
            );
            fs::write(&conf, text).unwrap();
            return Mosquitto {
                port,
                _dir: dir,
                conf,
                log,
                child: None,
                tls,
            };
        }
        let mut text = format!(
            "# mosquitto 2.0.11 ignores -p together with -c: the port is here.\n\
             listener {port} 127.0.0.1\n\
             allow_anonymous true\n\
             set_tcp_nodelay true\n\
             persistence false\n\
             log_dest stderr\n\
             log_type error\nlog_type warning\nlog_type notice\nlog_type information\n\
             connection_messages true\n\
             # As root, mosquitto would switch to the mosquitto user and lose access to this\n\
             # test's files; for other users this line has no effect.\n\
             user root\n"
        );
        if let Some(c) = &tls {
            text.push_str(&format!(
                "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nuse_identity_as_username true\n",
                c.ca.display(),
                c.server_cert.display(),
                c.server_key.display()
            ));
        }
        fs::write(&conf, text).unwrap();
        Mosquitto {
            port,
            _dir: dir,
            conf,
            log,
            child: None,
            tls,
        }
    }

    /// `mqtt://127.0.0.1:PORT` or `mqtts://...` for a TLS broker.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "mqtts" } else { "mqtt" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Starts the broker (again) on its port and waits until it accepts connections.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "mosquitto is already running");
        let deadline = Instant::now() + START;
        loop {
            match self.launch() {
                Ok(child) => {
                    self.child = Some(child);
                    return;
                }
                // The port is briefly taken (by a connection in TIME_WAIT, say): try again.
                Err(e) => assert!(Instant::now() < deadline, "{e}"),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// How many times this broker logged that it was up ("mosquitto version X running", after
    /// its listener is open).
    fn runs(&self) -> usize {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()) && l.ends_with(" running"))
            .count()
    }

    /// Runs mosquitto and waits until it listens, or until it exits (the port is taken).
    fn launch(&self) -> Result<Child, String> {
        let runs = self.runs();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("run mosquitto (Debian package mosquitto; tests/setup installs it)");
        let deadline = Instant::now() + START;
        loop {
            // Its own log says it is up, not just someone on the port.
            if self.runs() > runs && listening(self.port) {
                return Ok(child);
            }
            if let Some(status) = child.try_wait().unwrap() {
                return Err(format!(
                    "mosquitto exited with {status} on port {}:\n{}",
                    self.port,
                    self.log()
                ));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "mosquitto did not listen on port {} within {START:?}:\n{}",
                    self.port,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the broker (SIGKILL) and waits until the port is closed.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        poll(START, "the broker's port to close", || {
            (!listening(self.port)).then_some(())
        });
    }

    /// The broker's log so far (the last lines).
    pub fn log(&self) -> String {
        tail(&self.log, 40)
    }

    /// Whether the broker logged `line` (its connection messages, say).
    pub fn logged(&self, line: &str) -> bool {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .contains(line)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- mosquitto log (port {}) ---\n{}",
                self.port,
                tail(&self.log, 40)
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Certificates

/// A throw-away CA with a server certificate for 127.0.0.1 and client certificates, made with
/// Debian's `openssl` (PEM files in a temporary directory, kept while any clone lives).
#[derive(Clone)]
pub struct Certs {
    dir: Arc<tempfile::TempDir>,
    /// The CA certificate.
    pub ca: PathBuf,
    /// The broker's certificate (subjectAltName IP:127.0.0.1).
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
}

/// A client certificate and its key.
#[derive(Debug, Clone)]
pub struct ClientCert {
    /// Certificate (PEM).
    pub cert: PathBuf,
    /// Key (PKCS#8 PEM).
    pub key: PathBuf,
}

/// Runs `openssl` with `args` (split at spaces) in `dir`.
fn openssl(dir: &Path, args: &str) {
    let out = Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Certs {
    /// A new CA and a server certificate for 127.0.0.1 (P-256 keys).
    pub fn new() -> Certs {
        let dir = tempdir();
        let d = dir.path();
        fs::write(
            d.join("ca.cnf"),
            "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = edge-agent test CA\n\
             [v3_ca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n\
             subjectKeyIdentifier = hash\n",
        )
        .unwrap();
        openssl(
            d,
            "req -x509 -config ca.cnf -extensions v3_ca -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
             -nodes -keyout ca.key -out ca.crt -days 2",
        );
        let certs = Certs {
            ca: d.join("ca.crt"),
            server_cert: d.join("server.crt"),
            server_key: d.join("server.key"),
            dir: Arc::new(dir),
        };
        certs.issue(
            "server",
            "127.0.0.1",
            "subjectAltName = IP:127.0.0.1\nbasicConstraints = CA:FALSE\n\
             keyUsage = critical,digitalSignature\nextendedKeyUsage = serverAuth\n",
        );
        certs
    }

    fn issue(&self, file: &str, cn: &str, extensions: &str) -> ClientCert {
        let d = self.dir.path();
        fs::write(d.join(format!("{file}.ext")), extensions).unwrap();
        openssl(
            d,
            &format!(
                "req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout {file}.key \
                 -out {file}.csr -subj /CN={cn}"
            ),
        );
        let serial = 2 + fs::read_dir(d).map(Iterator::count).unwrap_or(0);
        openssl(
            d,
            &format!(
                "x509 -req -in {file}.csr -CA ca.crt -CAkey ca.key -set_serial {serial} -days 2 \
                 -out {file}.crt -extfile {file}.ext"
            ),
        );
        ClientCert {
            cert: d.join(format!("{file}.crt")),
            key: d.join(format!("{file}.key")),
        }
    }

    /// A client certificate with `cn` as its common name (mosquitto's username for it).
    pub fn client(&self, cn: &str) -> ClientCert {
        self.issue(
            &format!("client-{cn}"),
            cn,
            "basicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature\nextendedKeyUsage = clientAuth\n",
        )
    }
}

// ---------------------------------------------------------------------------------------------
// rumqttd

/// Starts rumqttd (MQTT 3.1.1) in this process on a thread and returns its port once it accepts
/// connections. rumqttd has no way to stop it: it lives until the test process ends.
pub fn start_rumqttd() -> u16 {
    use std::collections::HashMap;

    let port = free_port();
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: 8 << 20,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: "v4".into(),
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 100,
            max_outgoing_packet_count: 200,
            max_segment_size: 16 << 20,
            max_segment_count: 10,
            ..Default::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name(format!("rumqttd-{port}"))
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                eprintln!("rumqttd on port {port} stopped: {e}");
            }
        })
        .unwrap();
    poll(START, "rumqttd to accept connections", || {
        listening(port).then_some(())
    });
    port
}

// ---------------------------------------------------------------------------------------------
// Keys

/// The operator's signing key, trusted by every agent started with it: `op.key` (PKCS#8 PEM) and
/// `op.key.pub` in a temporary directory.
pub struct Operator {
    dir: tempfile::TempDir,
    /// The signing key.
    pub key: SigningKey,
    /// The private key file (for `edgectl`).
    pub key_file: PathBuf,
    /// The public key file (for the agent's `trusted_keys`).
    pub pub_file: PathBuf,
}

impl Operator {
    /// The deterministic test key `harness::key(seed)`, written out.
    pub fn new(seed: u8) -> Operator {
        let dir = tempdir();
        let key = crate::harness::key(seed);
        let key_file = dir.path().join("op.key");
        let pub_file = dir.path().join("op.key.pub");
        fs::write(&key_file, keys::private_key_pem(&key)).unwrap();
        fs::write(&pub_file, keys::public_key_pem(&key.verifying_key())).unwrap();
        Operator {
            dir,
            key,
            key_file,
            pub_file,
        }
    }

    /// Writes `bytes` to a file in the operator's directory (a bundle for `edgectl deploy`).
    pub fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.dir.path().join(name);
        fs::write(&path, bytes).unwrap();
        path
    }
}

// ---------------------------------------------------------------------------------------------
// The agent

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
        }
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
        let mut text = format!(
            "device_id = {:?}\ngroups = [{}]\nstate_dir = \"state\"\ntrusted_keys = [{:?}]\n\n\
             [mqtt]\nurl = {:?}\nkeep_alive_s = {}\nreconnect_min_ms = 50\nreconnect_max_ms = 300\n",
            setup.device,
            groups.join(", "),
            operator.pub_file.display().to_string(),
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
        let child = crate::harness::target_command(env!("CARGO_BIN_EXE_edge-agent"))
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("EDGE_AGENT_CONFIG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start edge-agent");
        self.child = Some(child);
    }

    /// Starts the agent again after it exited by itself; returns how it had exited.
    pub fn restart_after_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the agent was started");
        let exit = child
            .try_wait()
            .unwrap()
            .expect("the agent has exited by itself");
        let mut log = OpenOptions::new().append(true).open(&self.log).unwrap();
        writeln!(log, "===== exited by itself: {exit} =====").unwrap();
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

// ---------------------------------------------------------------------------------------------
// edgectl

/// Runs `edgectl` with `args`, killed if it takes longer than 30 s.
pub fn edgectl(args: &[&str]) -> Output {
    let dir = tempdir();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = crate::harness::target_command(env!("CARGO_BIN_EXE_edgectl"))
        .args(args)
        .env_remove("EDGECTL_BROKER")
        .stdin(Stdio::null())
        .stdout(File::create(&out).unwrap())
        .stderr(File::create(&err).unwrap())
        .spawn()
        .expect("run edgectl");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("edgectl {args:?} did not finish within 30 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: fs::read(out).unwrap(),
        stderr: fs::read(err).unwrap(),
    }
}

/// Runs `edgectl` and requires it to succeed; returns its stdout.
pub fn edgectl_ok(args: &[&str]) -> String {
    let out = edgectl(args);
    assert!(
        out.status.success(),
        "edgectl {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

// ---------------------------------------------------------------------------------------------
// The observer

/// Something an agent published, decoded.
#[derive(Debug, Clone)]
pub enum Seen {
    /// `edge/<device>/status`.
    Status {
        /// Device.
        device: String,
        /// The report.
        status: Status,
        /// Delivered as a retained message (on subscribe).
        retained: bool,
    },
    /// `edge/<device>/events`.
    Event {
        /// Device.
        device: String,
        /// The event.
        event: Event,
    },
    /// `edge/<device>/telemetry/<module>/<topic>`.
    Telemetry {
        /// Device.
        device: String,
        /// Module.
        module: String,
        /// Topic below the module.
        topic: String,
        /// Payload.
        payload: Vec<u8>,
    },
    /// `edge/<device>/logs/<module>`.
    Log {
        /// Device.
        device: String,
        /// Module.
        module: String,
        /// The record.
        record: LogRecord,
    },
}

impl Seen {
    /// The status, if this is a status of `device`.
    pub fn status(&self, of: &str) -> Option<&Status> {
        match self {
            Seen::Status { device, status, .. } if device == of => Some(status),
            _ => None,
        }
    }

    fn summary(&self) -> String {
        match self {
            Seen::Status {
                device,
                status,
                retained,
            } => {
                let modules: Vec<String> = status
                    .modules
                    .iter()
                    .map(|m| {
                        format!(
                            "{} seq {} {:?} calls {} restarts {}{}{}",
                            m.name,
                            m.seq,
                            m.state,
                            m.calls,
                            m.restarts,
                            m.detail
                                .as_deref()
                                .map(|d| format!(" ({d})"))
                                .unwrap_or_default(),
                            m.last_error
                                .as_deref()
                                .map(|e| format!(" [{e}]"))
                                .unwrap_or_default()
                        )
                    })
                    .collect();
                format!(
                    "{device} status online={} retained={retained} up {} s: {}",
                    status.online,
                    status.uptime_s,
                    modules.join("; ")
                )
            }
            Seen::Event { device, event } => format!(
                "{device} event {} {} seq {:?}: {}",
                event.kind.as_str(),
                event.module,
                event.seq,
                event.reason.as_deref().unwrap_or("")
            ),
            Seen::Telemetry {
                device,
                module,
                topic,
                payload,
            } => format!(
                "{device} telemetry {module}/{topic} {}",
                String::from_utf8_lossy(payload)
            ),
            Seen::Log {
                device,
                module,
                record,
            } => format!("{device} log {module}: {}", record.text),
        }
    }
}

fn tls_files(ca: &Path, cert: &ClientCert) -> TlsFiles {
    TlsFiles {
        ca_file: Some(ca.to_path_buf()),
        client_cert: Some(cert.cert.clone()),
        client_key: Some(cert.key.clone()),
    }
}

/// A position in the observer's record: waits look only at what arrived after it.
pub type Mark = usize;

#[derive(Default)]
struct Record {
    seen: Vec<Seen>,
    connacks: u64,
    subacks: u64,
    pubacks: u64,
    last_error: Option<String>,
}

struct Shared {
    record: Mutex<Record>,
    changed: Condvar,
}

/// An MQTT client that subscribes to every device's status, events, telemetry and logs (again
/// after every reconnect), records them in arrival order, and publishes for the tests.
pub struct Observer {
    client: rumqttc::AsyncClient,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    prefix: String,
}

/// How long a test waits for anything the agent should do.
pub const PATIENCE: Duration = Duration::from_secs(45);

impl Observer {
    /// Connects to the broker at `url` and waits until it is subscribed.
    pub fn connect(url: &str) -> Observer {
        Observer::connect_with(url, TlsFiles::default(), None)
    }

    /// Connects with TLS files (mutual TLS: a client certificate).
    pub fn connect_tls(url: &str, ca: &Path, cert: &ClientCert) -> Observer {
        Observer::connect_with(url, tls_files(ca, cert), None)
    }

    /// Connects with a client certificate and the client id `client_id` (another device's, to
    /// try to take its session over).
    pub fn connect_tls_as(url: &str, ca: &Path, cert: &ClientCert, client_id: &str) -> Observer {
        Observer::connect_with(url, tls_files(ca, cert), Some(client_id))
    }

    fn connect_with(url: &str, tls: TlsFiles, client_id: Option<&str>) -> Observer {
        let mut suffix = [0u8; 4];
        getrandom::fill(&mut suffix).unwrap();
        let settings = ClientSettings {
            client_id: client_id.map_or_else(
                || format!("observer-{}", hex::encode(suffix)),
                str::to_string,
            ),
            url: BrokerUrl::parse(url).unwrap(),
            tls,
            keep_alive: Duration::from_secs(5),
            max_packet_bytes: 16 << 20,
            last_will: None,
            clean_session: true,
        };
        let (client, mut eventloop) = mqtt::connect(&settings, 1024).unwrap();
        let prefix = "edge".to_string();
        let filters: Vec<String> = ["+/status", "+/events", "+/telemetry/#", "+/logs/+"]
            .iter()
            .map(|f| format!("{prefix}/{f}"))
            .collect();
        let shared = Arc::new(Shared {
            record: Mutex::new(Record::default()),
            changed: Condvar::new(),
        });
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = {
            let shared = Arc::clone(&shared);
            let client = client.clone();
            let prefix = prefix.clone();
            std::thread::Builder::new()
                .name("observer".into())
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    rt.block_on(async move {
                        loop {
                            let polled = tokio::select! {
                                _ = &mut stop_rx => return,
                                polled = eventloop.poll() => polled,
                            };
                            let failed = {
                                let mut r = shared.record.lock().unwrap();
                                match polled {
                                    Ok(rumqttc::Event::Incoming(Packet::ConnAck(_))) => {
                                        r.connacks += 1;
                                        for f in &filters {
                                            let _ =
                                                client.try_subscribe(f.clone(), QoS::AtLeastOnce);
                                        }
                                        false
                                    }
                                    Ok(rumqttc::Event::Incoming(Packet::SubAck(_))) => {
                                        r.subacks += 1;
                                        false
                                    }
                                    Ok(rumqttc::Event::Incoming(Packet::PubAck(_))) => {
                                        r.pubacks += 1;
                                        false
                                    }
                                    Ok(rumqttc::Event::Incoming(Packet::Publish(p))) => {
                                        match decode(&prefix, &p.topic, &p.payload, p.retain) {
                                            Ok(Some(seen)) => r.seen.push(seen),
                                            Ok(None) => {}
                                            Err(e) => r.last_error = Some(e),
                                        }
                                        false
                                    }
                                    Ok(_) => false,
                                    Err(e) => {
                                        r.last_error = Some(e.to_string());
                                        true
                                    }
                                }
                            };
                            shared.changed.notify_all();
                            if failed {
                                // rumqttc reconnects on the next poll.
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    });
                })
                .unwrap()
        };
        let obs = Observer {
            client,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
            prefix,
        };
        obs.wait_subscribed(0);
        obs
    }

    fn lock(&self) -> MutexGuard<'_, Record> {
        self.shared.record.lock().unwrap()
    }

    /// Waits until the observer has (re)connected more than `connacks` times and is subscribed.
    pub fn wait_subscribed(&self, connacks: u64) {
        let deadline = Instant::now() + START;
        let mut r = self.lock();
        loop {
            // Four filters are subscribed after every ConnAck.
            if r.connacks > connacks && r.subacks >= 4 * r.connacks {
                return;
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "observer not connected and subscribed within {START:?} (last error: {:?})",
                r.last_error
            );
            r = self
                .shared
                .changed
                .wait_timeout(r, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// How many times the observer has connected.
    pub fn connacks(&self) -> u64 {
        self.lock().connacks
    }

    /// Publishes at QoS 1 and waits (bounded) until the broker acknowledged it.
    pub fn publish(&self, topic: &str, payload: &[u8], retain: bool) {
        let before = self.lock().pubacks;
        self.client
            .try_publish(topic, QoS::AtLeastOnce, retain, payload.to_vec())
            .unwrap();
        let deadline = Instant::now() + START;
        let mut r = self.lock();
        while r.pubacks <= before {
            let now = Instant::now();
            assert!(now < deadline, "no PUBACK for {topic} within {START:?}");
            r = self
                .shared
                .changed
                .wait_timeout(r, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// Publishes a bundle, retained, on the device's desired topic for `module`.
    pub fn deploy(&self, device: &str, module: &str, bundle: &[u8]) {
        self.publish(
            &format!("{}/{device}/desired/{module}", self.prefix),
            bundle,
            true,
        );
    }

    /// Publishes a bundle, retained, on the group's desired topic for `module`.
    pub fn deploy_group(&self, group: &str, module: &str, bundle: &[u8]) {
        self.publish(
            &format!("{}/group/{group}/desired/{module}", self.prefix),
            bundle,
            true,
        );
    }

    /// The current end of the record.
    pub fn mark(&self) -> Mark {
        self.lock().seen.len()
    }

    /// Everything recorded from `since` on.
    pub fn seen_since(&self, since: Mark) -> Vec<Seen> {
        self.lock().seen[since..].to_vec()
    }

    /// Waits until something recorded at or after `since` makes `f` return `Some`, scanning in
    /// arrival order; panics after `PATIENCE` with `what` and the last things seen.
    pub fn wait<T>(&self, since: Mark, what: &str, mut f: impl FnMut(&Seen) -> Option<T>) -> T {
        self.wait_at_most(PATIENCE, since, what, &mut f)
    }

    /// [`Observer::wait`] with another deadline.
    pub fn wait_at_most<T>(
        &self,
        timeout: Duration,
        since: Mark,
        what: &str,
        mut f: impl FnMut(&Seen) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        let mut next = since;
        let mut r = self.lock();
        loop {
            while next < r.seen.len() {
                if let Some(t) = f(&r.seen[next]) {
                    return t;
                }
                next += 1;
            }
            let now = Instant::now();
            if now >= deadline {
                let recent: Vec<String> = r.seen[since.max(r.seen.len().saturating_sub(40))..]
                    .iter()
                    .map(Seen::summary)
                    .collect();
                panic!(
                    "timed out after {timeout:?} waiting for {what}; last error {:?}; recently seen:\n  {}",
                    r.last_error,
                    recent.join("\n  ")
                );
            }
            r = self
                .shared
                .changed
                .wait_timeout(r, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// Waits for a status report from `device` that satisfies `f`.
    pub fn status(
        &self,
        since: Mark,
        device: &str,
        what: &str,
        f: impl Fn(&Status) -> bool,
    ) -> Status {
        self.wait(since, &format!("status of {device}: {what}"), |s| match s {
            Seen::Status {
                device: d, status, ..
            } if d == device && f(status) => Some(status.clone()),
            _ => None,
        })
    }

    /// Waits for an online status in which `module` runs at `seq`, off probation.
    pub fn running(&self, since: Mark, device: &str, module: &str, seq: u64) -> ModuleStatus {
        let status = self.status(
            since,
            device,
            &format!("online, {module} running seq {seq}"),
            |s| s.online && module_in(s, module).is_some_and(|m| m.seq == seq && is_running(m)),
        );
        module_in(&status, module)
            .cloned()
            .unwrap_or_else(|| unreachable!())
    }

    /// Waits for an event of `kind` about `module` from `device`.
    pub fn event(&self, since: Mark, device: &str, kind: EventKind, module: &str) -> Event {
        self.wait(
            since,
            &format!("{} event for {module} from {device}", kind.as_str()),
            |s| match s {
                Seen::Event { device: d, event }
                    if d == device && event.kind == kind && event.module == module =>
                {
                    Some(event.clone())
                }
                _ => None,
            },
        )
    }

    /// Events from `device` recorded since `since`.
    /// Events are delivered at least once: each counts once, by id, and one already seen
    /// before `since` does not count again.
    pub fn events_since(&self, since: Mark, device: &str) -> Vec<Event> {
        let r = self.lock();
        let mut seen_ids: std::collections::BTreeSet<u64> = r.seen[..since.min(r.seen.len())]
            .iter()
            .filter_map(|s| match s {
                Seen::Event { device: d, event } if d == device && event.id != 0 => Some(event.id),
                _ => None,
            })
            .collect();
        r.seen[since.min(r.seen.len())..]
            .iter()
            .filter_map(|s| match s {
                Seen::Event { device: d, event } if d == device => Some(event.clone()),
                _ => None,
            })
            .filter(|e| e.id == 0 || seen_ids.insert(e.id))
            .collect()
    }

    /// Waits for a decimal counter on `<module>/<topic>` from `device` that is at least `min`.
    pub fn counter_at_least(&self, since: Mark, device: &str, module: &str, min: u64) -> u64 {
        self.wait(
            since,
            &format!("{module} telemetry >= {min} from {device}"),
            |s| counter(s, device, module).filter(|&n| n >= min),
        )
    }

    /// Every counter value `device`'s `module` published since `since`, in arrival order.
    pub fn counters_since(&self, since: Mark, device: &str, module: &str) -> Vec<u64> {
        self.seen_since(since)
            .iter()
            .filter_map(|s| counter(s, device, module))
            .collect()
    }
}

/// The counter in a telemetry message of `module` from `device` (`<module>/count`).
pub fn counter(seen: &Seen, device: &str, module: &str) -> Option<u64> {
    match seen {
        Seen::Telemetry {
            device: d,
            module: m,
            topic,
            payload,
        } if d == device && m == module && topic.ends_with("count") => {
            std::str::from_utf8(payload).ok()?.parse().ok()
        }
        _ => None,
    }
}

/// `module`'s entry in a status report.
pub fn module_in<'a>(status: &'a Status, module: &str) -> Option<&'a ModuleStatus> {
    status.modules.iter().find(|m| m.name == module)
}

/// Running and off probation.
pub fn is_running(m: &ModuleStatus) -> bool {
    m.state == ModuleState::Running && m.detail.is_none()
}

impl Drop for Observer {
    fn drop(&mut self) {
        let _ = self.client.try_disconnect();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if std::thread::panicking() {
            let r = self.lock();
            let recent: Vec<String> = r.seen[r.seen.len().saturating_sub(30)..]
                .iter()
                .map(Seen::summary)
                .collect();
            eprintln!(
                "--- observer: last things seen ---\n  {}",
                recent.join("\n  ")
            );
        }
    }
}

fn decode(
    prefix: &str,
    topic: &str,
    payload: &[u8],
    retained: bool,
) -> Result<Option<Seen>, String> {
    let Some((device, rest)) = topic
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('/'))
        .and_then(|r| r.split_once('/'))
    else {
        return Ok(None);
    };
    let device = device.to_string();
    let malformed = |e: String| format!("malformed payload on {topic}: {e}");
    if rest == "status" {
        if payload.is_empty() {
            return Ok(None);
        }
        let status = protocol::from_cbor(payload).map_err(malformed)?;
        return Ok(Some(Seen::Status {
            device,
            status,
            retained,
        }));
    }
    if rest == "events" {
        let event = protocol::from_cbor(payload).map_err(malformed)?;
        return Ok(Some(Seen::Event { device, event }));
    }
    if let Some((module, topic)) = rest
        .strip_prefix("telemetry/")
        .and_then(|r| r.split_once('/'))
    {
        return Ok(Some(Seen::Telemetry {
            device,
            module: module.into(),
            topic: topic.into(),
            payload: payload.to_vec(),
        }));
    }
    if let Some(module) = rest.strip_prefix("logs/") {
        let record = protocol::from_cbor(payload).map_err(malformed)?;
        return Ok(Some(Seen::Log {
            device,
            module: module.into(),
            record,
        }));
    }
    Ok(None)
}
