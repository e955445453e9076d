//! systemd's notify protocol (`sd_notify(3)`) without libsystemd: datagrams to `$NOTIFY_SOCKET`.
//! READY=1 once the store is open and the installed modules are started, STATUS= lines, WATCHDOG=1
//! from the supervisor loop (so a wedged agent is killed and restarted), RELOADING=1 around a
//! configuration reload, STOPPING=1 at shutdown. Outside systemd every call does nothing.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

use super::Notifier;

/// A connection to systemd's notify socket, if the agent runs under systemd.
#[derive(Debug)]
pub struct Systemd {
    socket: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
    last_ping: Option<Instant>,
}

/// `$NOTIFY_SOCKET`'s address: a path, or `@name` in the abstract namespace.
fn address(spec: &str) -> std::io::Result<SocketAddr> {
    match spec.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt as _;
            SocketAddr::from_abstract_name(name.as_bytes())
        }
        None => SocketAddr::from_pathname(spec),
    }
}

/// The watchdog interval systemd asks for (`WATCHDOG_USEC`), if it is meant for this process
/// (`WATCHDOG_PID` absent or ours).
fn watchdog_interval(usec: Option<String>, pid: Option<String>) -> Option<Duration> {
    if let Some(pid) = pid
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    let usec: u64 = usec?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

impl Systemd {
    /// Reads `$NOTIFY_SOCKET` and `$WATCHDOG_USEC` (and `$WATCHDOG_PID`).
    pub fn from_env() -> Self {
        let socket = std::env::var("NOTIFY_SOCKET").ok().and_then(|spec| {
            let addr = address(&spec)
                .map_err(|e| tracing::warn!("NOTIFY_SOCKET={spec}: {e}"))
                .ok()?;
            let sock = UnixDatagram::unbound()
                .map_err(|e| tracing::warn!("cannot create a notify socket: {e}"))
                .ok()?;
            Some((sock, addr))
        });
        let watchdog = watchdog_interval(
            std::env::var("WATCHDOG_USEC").ok(),
            std::env::var("WATCHDOG_PID").ok(),
        );
        if let Some(w) = watchdog {
            tracing::info!("systemd watchdog every {w:?}");
        }
        Systemd {
            socket,
            watchdog,
            last_ping: None,
        }
    }

    fn send(&self, message: &str) {
        if let Some((sock, addr)) = &self.socket
            && let Err(e) = sock.send_to_addr(message.as_bytes(), addr)
        {
            tracing::warn!("cannot notify systemd: {e}");
        }
    }
}

/// A STATUS= value on one line.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

impl Notifier for Systemd {
    fn ready(&mut self) {
        self.send("READY=1");
    }

    fn status(&mut self, line: &str) {
        self.send(&format!("STATUS={}", one_line(line)));
    }

    fn watchdog(&mut self) {
        // Ping at twice the rate systemd asks for, as sd_watchdog_enabled(3) advises.
        let Some(interval) = self.watchdog else {
            return;
        };
        if self.last_ping.is_none_or(|t| t.elapsed() >= interval / 2) {
            self.send("WATCHDOG=1");
            self.last_ping = Some(Instant::now());
        }
    }

    fn reloading(&mut self) {
        self.send("RELOADING=1");
    }

    fn reloaded(&mut self) {
        self.send("READY=1");
    }

    fn stopping(&mut self) {
        self.send("STOPPING=1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_interval_is_for_this_process_only() {
        let me = std::process::id().to_string();
        assert_eq!(
            watchdog_interval(Some("2000000".into()), None),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            watchdog_interval(Some("2000000".into()), Some(me)),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            watchdog_interval(Some("2000000".into()), Some("1".into())),
            None
        );
        assert_eq!(watchdog_interval(Some("0".into()), None), None);
        assert_eq!(watchdog_interval(None, None), None);
    }

    #[test]
    fn messages_reach_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let mut sd = Systemd {
            socket: Some((
                UnixDatagram::unbound().unwrap(),
                address(path.to_str().unwrap()).unwrap(),
            )),
            watchdog: Some(Duration::from_secs(10)),
            last_ping: None,
        };
        sd.ready();
        sd.status("2 modules\nrunning");
        sd.watchdog();
        sd.watchdog(); // too soon: not sent
        sd.stopping();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        listener.set_nonblocking(true).unwrap();
        while let Ok(n) = listener.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        assert_eq!(
            got,
            [
                "READY=1",
                "STATUS=2 modules running",
                "WATCHDOG=1",
                "STOPPING=1"
            ]
        );
    }

    #[test]
    fn abstract_addresses_are_understood() {
        assert!(address("@/org/freedesktop/systemd1/notify/123").is_ok());
    }
}
