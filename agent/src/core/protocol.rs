//! Payloads the agent publishes (CBOR maps with text keys; docs/protocol.md): the retained device
//! status, deployment events, module logs (and their [`LogLevel`]), and the operator's restart
//! command.

use std::fmt;

use serde::{Deserialize, Serialize};

/// What a module is doing, as the status reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModuleState {
    /// Running (or between restarts after a failure).
    Running,
    /// Installed but not running (the agent is stopping, say).
    Stopped,
    /// Stopped after too many failures; runs again for a new version or an operator's restart.
    Quarantined,
    /// Installed but failed and could not be restored (a first version that failed probation).
    Failed,
    /// Stopped: the trust document in effect revokes the key that signed it. Runs again only
    /// when a bundle under a valid key replaces it.
    Revoked,
    /// Not installed yet: a version delivered in chunks is being fetched (see
    /// [`ModuleStatus::fetch`]).
    Fetching,
}

/// A version being fetched in chunks, as the status reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchStatus {
    /// Its human version.
    pub version: String,
    /// Its sequence number.
    pub seq: u64,
    /// Chunks verified and staged (or found locally).
    pub chunks_have: u64,
    /// Chunks the manifest lists.
    pub chunks_total: u64,
    /// Bytes of the Wasm verified and staged.
    pub bytes_have: u64,
    /// The Wasm's size.
    pub bytes_total: u64,
    /// Bytes found in chunks the device already held (installed versions, an earlier transfer).
    pub reused_bytes: u64,
    /// Chunks that arrived with the wrong content or length and were refused.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub chunks_refused: u64,
    /// Seconds since the last chunk arrived, when a `fetch_stalled` event was sent for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalled_s: Option<u64>,
}

/// One module in the status report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleStatus {
    /// Name.
    pub name: String,
    /// Human version.
    pub version: String,
    /// Sequence number of the running version.
    pub seq: u64,
    /// State.
    pub state: ModuleState,
    /// More about the state: "on probation", "restarting in 2000 ms", ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Restarts since the agent started.
    pub restarts: u32,
    /// Guest calls made by the current instance.
    pub calls: u64,
    /// Fuel the last call burned.
    pub fuel_last: u64,
    /// Fuel burned by the current instance.
    pub fuel_total: u64,
    /// Linear memory in use, bytes.
    pub memory_bytes: u64,
    /// Key-value bytes in use.
    pub kv_bytes: u64,
    /// Messages published by the current instance.
    pub published: u64,
    /// Host calls refused for the current instance.
    pub refused: u64,
    /// Inbox messages dropped since the agent started (inbox full, too large, not running).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub inbox_dropped: u64,
    /// The last failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// A newer version being fetched in chunks (the module's `state` is `fetching` when none is
    /// installed yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch: Option<FetchStatus>,
    /// Bytes of the running version's Wasm that came from chunks the device already held when it
    /// was installed (installs in chunks during this run of the agent only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reused_bytes: Option<u64>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The retained device status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The device id.
    pub device: String,
    /// False in the last will and at a clean shutdown.
    pub online: bool,
    /// The agent's version.
    pub agent_version: String,
    /// Seconds since the agent started.
    pub uptime_s: u64,
    /// When this report was made, unix milliseconds.
    pub ts_ms: u64,
    /// When this run of the agent started, unix milliseconds: a report with `online: false` ends
    /// the run it names, even when its `ts_ms` is older than the run's last online report (a last
    /// will is registered at connect time and carries the status of that moment).
    #[serde(default)]
    pub started_ms: u64,
    /// Installed modules, by name.
    pub modules: Vec<ModuleStatus>,
    /// Telemetry and log messages dropped because the broker was unreachable or slow.
    #[serde(default)]
    pub dropped_messages: u64,
    /// Bytes of chunks received since the agent started (chunked delivery), refused ones too.
    #[serde(default)]
    pub fetched_bytes: u64,
    /// Something wrong with the broker connection worth an operator's look (a session that keeps
    /// being taken over by another client with this device's id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_note: Option<String>,
    /// The version of the trust document in effect (trust-document mode only; 0 until the
    /// device accepts one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_version: Option<u64>,
    /// Something about trust worth an operator's look (no document yet, the document expired).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_note: Option<String>,
    /// How far the system clock is behind the time floor (the newest `issued_at` the device
    /// accepted), seconds, when that is more than a minute: the clock is wrong (no RTC, no NTP
    /// yet); expiry is judged by the floor meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_behind_s: Option<u64>,
}

/// What a deployment event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A new version passed its probation and runs.
    Installed,
    /// A bundle was refused; nothing changed.
    Rejected,
    /// A module was removed by a signed removal.
    Removed,
    /// A new version failed its probation; the previous version runs again.
    RolledBack,
    /// A new version failed its probation and there was no previous version to restore.
    Failed,
    /// A module failed too often and was stopped.
    Quarantined,
    /// An operator restarted a module.
    Restarted,
    /// A version on probation was replaced by a newer one before its verdict.
    Superseded,
    /// A newer bundle on a lower-ranked topic is hidden by the one that outranks it.
    Outranked,
    /// A trust document was put in effect (`module` is empty).
    TrustUpdated,
    /// A trust document was refused; the one in effect stays (`module` is empty).
    TrustRejected,
    /// A module was stopped because the trust document revokes the key that signed it.
    Revoked,
    /// Chunks of a version being fetched have not arrived for `agent.fetch_timeout_s`; the
    /// device keeps waiting for them, and what is installed keeps running.
    FetchStalled,
}

impl EventKind {
    /// The name on the wire and on terminals.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Installed => "installed",
            EventKind::Rejected => "rejected",
            EventKind::Removed => "removed",
            EventKind::RolledBack => "rolled_back",
            EventKind::Failed => "failed",
            EventKind::Quarantined => "quarantined",
            EventKind::Restarted => "restarted",
            EventKind::Superseded => "superseded",
            EventKind::Outranked => "outranked",
            EventKind::TrustUpdated => "trust_updated",
            EventKind::TrustRejected => "trust_rejected",
            EventKind::Revoked => "revoked",
            EventKind::FetchStalled => "fetch_stalled",
        }
    }
}

/// A deployment event on `<p>/<device>/events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Assigned by the device's store when it records the event; strictly increasing per
    /// device, never reused. Events are delivered at least once: consumers deduplicate by
    /// device and id. 0 in events from agents that did not number them.
    #[serde(default)]
    pub id: u64,
    /// Unix milliseconds.
    pub ts_ms: u64,
    /// What happened.
    pub kind: EventKind,
    /// The module (as named by the bundle; "unverified" names are marked in `reason`).
    pub module: String,
    /// The version concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Its sequence number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Why (rejections, rollbacks, failures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A module log line's severity: ABI v1's `level::*` from the guest, lower-case names in
/// `LogRecord`, upper-case on terminals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// `level::ERROR`.
    Error,
    /// `level::WARN`.
    Warn,
    /// `level::INFO`.
    Info,
    /// `level::DEBUG`.
    Debug,
}

impl LogLevel {
    /// The level a guest passed to `log` (ABI v1's `level::*`), if it is one.
    pub fn from_abi(l: i32) -> Option<Self> {
        use edge_abi::level;
        match l {
            level::ERROR => Some(LogLevel::Error),
            level::WARN => Some(LogLevel::Warn),
            level::INFO => Some(LogLevel::Info),
            level::DEBUG => Some(LogLevel::Debug),
            _ => None,
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogLevel::Error => "ERROR",
            LogLevel::Warn => "WARN",
            LogLevel::Info => "INFO",
            LogLevel::Debug => "DEBUG",
        })
    }
}

/// A module's log line on `<p>/<device>/logs/<module>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    /// Unix milliseconds.
    pub ts_ms: u64,
    /// Severity.
    pub level: LogLevel,
    /// The line.
    pub text: String,
}

/// Encodes a payload as CBOR.
pub fn to_cbor<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    // Serializing plain structs into a Vec cannot fail.
    ciborium::into_writer(value, &mut out).unwrap_or_else(|e| unreachable!("{e}"));
    out
}

/// Decodes a CBOR payload (for `edgectl` and tests).
pub fn from_cbor<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    // Messages come from the broker: bounded before anything is built from them.
    super::cbor::check(bytes, super::cbor::DOCUMENT).map_err(|e| e.to_string())?;
    ciborium::from_reader(bytes).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_through_cbor() {
        let status = Status {
            device: "pi".into(),
            online: true,
            agent_version: "0.1.0".into(),
            uptime_s: 3,
            ts_ms: 4,
            started_ms: 1,
            modules: vec![ModuleStatus {
                name: "m".into(),
                version: "1".into(),
                seq: 2,
                state: ModuleState::Quarantined,
                detail: None,
                restarts: 1,
                calls: 5,
                fuel_last: 6,
                fuel_total: 7,
                memory_bytes: 8,
                kv_bytes: 9,
                published: 10,
                refused: 11,
                inbox_dropped: 3,
                last_error: Some("tick: trapped".into()),
                fetch: Some(FetchStatus {
                    version: "2".into(),
                    seq: 3,
                    chunks_have: 4,
                    chunks_total: 9,
                    bytes_have: 40_000,
                    bytes_total: 90_000,
                    reused_bytes: 30_000,
                    chunks_refused: 1,
                    stalled_s: Some(301),
                }),
                reused_bytes: Some(12),
            }],
            dropped_messages: 0,
            fetched_bytes: 70_000,
            broker_note: None,
            trust_version: Some(3),
            trust_note: None,
            clock_behind_s: Some(5),
        };
        assert_eq!(from_cbor::<Status>(&to_cbor(&status)).unwrap(), status);
        let event = Event {
            id: 7,
            ts_ms: 1,
            kind: EventKind::RolledBack,
            module: "m".into(),
            version: Some("2".into()),
            seq: Some(2),
            reason: Some("init: trapped".into()),
        };
        assert_eq!(from_cbor::<Event>(&to_cbor(&event)).unwrap(), event);
    }
}
