//! A private mosquitto per test: plain, mutual TLS, or the shipped fleet configuration.

use super::*;
use std::fs::{self, OpenOptions};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

    /// A plain broker that passes at most `limit` bytes per message (mosquitto's
    /// `message_size_limit`: what AWS IoT Core's 128 KiB does to a client), started. `log_type
    /// debug` has it log each message it drops for its size.
    pub fn start_limited(limit: usize) -> Mosquitto {
        Mosquitto::start_configured(&format!("message_size_limit {limit}\nlog_type debug\n"))
    }

    /// A plain-TCP broker with `extra` configuration lines (`message_size_limit 131072`, say),
    /// started.
    pub fn start_configured(extra: &str) -> Mosquitto {
        Mosquitto::start_full(None, false, extra)
    }

    /// Starts on a free port; if another process takes the port first, on another one.
    fn start_with(tls: Option<Certs>) -> Mosquitto {
        Mosquitto::start_as(tls, false)
    }

    fn start_as(tls: Option<Certs>, fleet: bool) -> Mosquitto {
        Mosquitto::start_full(tls, fleet, "")
    }

    fn start_full(tls: Option<Certs>, fleet: bool, extra: &str) -> Mosquitto {
        let mut m = Mosquitto::configure(tls.clone(), free_port(), fleet, extra);
        for _ in 0..5 {
            match m.launch() {
                Ok(child) => {
                    m.child = Some(child);
                    return m;
                }
                Err(_) => m = Mosquitto::configure(tls.clone(), free_port(), fleet, extra),
            }
        }
        let e = m.launch().err().unwrap_or_default();
        panic!("mosquitto would not start: {e}");
    }

    fn configure(tls: Option<Certs>, port: u16, fleet: bool, extra: &str) -> Mosquitto {
        let dir = tempdir();
        let conf = dir.path().join("mosquitto.conf");
        let log = dir.path().join("mosquitto.log");
        let mut text = match (fleet, &tls) {
            (true, Some(c)) => {
                // The shipped configuration, line by line, with this test's files and port.
                let acl = dir.path().join("fleet.acl");
                fs::copy(repo().join("configs/mosquitto-fleet.acl"), &acl).unwrap();
                let shipped =
                    fs::read_to_string(repo().join("configs/mosquitto-fleet.conf")).unwrap();
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
                text
            }
            _ => {
                let mut text = format!(
                    "# mosquitto 2.0.11 ignores -p together with -c: the port is here.\n\
                     listener {port} 127.0.0.1\n\
                     allow_anonymous true\n\
                     set_tcp_nodelay true\n\
                     persistence false\n"
                );
                if let Some(c) = &tls {
                    text.push_str(&format!(
                        "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nuse_identity_as_username true\n",
                        c.ca.display(),
                        c.server_cert.display(),
                        c.server_key.display()
                    ));
                }
                text
            }
        };
        text.push_str(
            "log_dest stderr\n\
             log_type error\nlog_type warning\nlog_type notice\nlog_type information\n\
             connection_messages true\n\
             # As root, mosquitto would switch to the mosquitto user and lose access to this\n\
             # test's files; for other users this line has no effect.\n\
             user root\n",
        );
        for line in extra.lines() {
            text.push_str(line.trim());
            text.push('\n');
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

    /// The broker's whole log (with `log_type debug`, one line per PUBLISH it received).
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
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
