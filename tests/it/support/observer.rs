//! An MQTT client that records what the agents publish and waits for predicates.

use super::*;
use edge_agent::core::protocol::{
    self, Event, EventKind, LogRecord, ModuleState, ModuleStatus, Status,
};
use edge_agent::mqtt::{self, BrokerUrl, ClientSettings, TlsFiles};
use rumqttc::{Packet, QoS};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

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
        // A panic while the lock was held (a failed wait) poisons it; the record is still
        // readable, and a second panic in `drop` would abort the whole test binary.
        self.shared
            .record
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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
