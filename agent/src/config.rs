//! The agent's configuration: a TOML file plus `config.d/*.toml` overrides beside it (applied in
//! name order, tables merged key by key), validated once at start-up and passed explicitly.
//! Relative paths in the file are relative to the file's folder.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::core::bundle::DEFAULT_MAX_BUNDLE_BYTES;
use crate::core::policy::RestartPolicy;
use crate::core::topics::Topics;
use crate::hal::HardwareConfig;
use crate::mqtt::{BrokerUrl, TlsFiles};
use crate::runtime::RuntimeConfig;

/// The environment variable naming the configuration file when `--config` is not given.
pub const CONFIG_ENV: &str = "EDGE_AGENT_CONFIG";

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This device's id: its MQTT client id and topic level.
    pub device_id: String,
    /// Groups the device belongs to; earlier groups outrank later ones.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Where the store lives.
    pub state_dir: PathBuf,
    /// Simple mode: public keys (SPKI PEM files) whose bundles the device accepts, each for
    /// every module. Empty when `[trust]` is set.
    #[serde(default)]
    pub trusted_keys: Vec<PathBuf>,
    /// Trust-document mode: the root keys and threshold that sign the fleet's trust document,
    /// the only source of signing keys when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<TrustConfig>,
    /// The broker.
    pub mqtt: MqttConfig,
    /// Agent behaviour.
    #[serde(default)]
    pub agent: AgentConfig,
    /// The store.
    #[serde(default)]
    pub store: StoreConfig,
    /// Maxima that clamp every module's limits, and host-call bounds.
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// Restart backoff and quarantine.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// GPIO lines, I2C buses and SPI devices this device offers to modules.
    #[serde(default)]
    pub hardware: HardwareConfig,
}

/// `[trust]`: the device's roots, provisioned once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// Root public keys (SPKI PEM files).
    pub roots: Vec<PathBuf>,
    /// How many distinct roots must sign a trust document.
    pub threshold: u64,
}

/// The broker connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://host:port` or `mqtts://host:port`.
    pub url: String,
    /// First topic level(s) of every topic.
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    /// Keep-alive, seconds.
    #[serde(default = "default_keep_alive")]
    pub keep_alive_s: u64,
    /// First reconnect delay, milliseconds (doubles, with jitter, up to the maximum).
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay, milliseconds.
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max_ms: u64,
    /// The largest MQTT packet the broker passes (AWS IoT Core: 128 KiB). A chunked bundle
    /// listing a chunk that could not fit is refused at once, and the agent publishes nothing
    /// larger (telemetry above it is dropped and counted).
    #[serde(default = "default_max_packet")]
    pub max_packet_bytes: usize,
    /// TLS files for `mqtts://`: keys `ca_file`, `client_cert` and `client_key` of this table.
    #[serde(flatten)]
    pub tls: TlsFiles,
}

impl MqttConfig {
    /// A copy of the TLS files, as the client setup takes them.
    pub fn tls(&self) -> TlsFiles {
        self.tls.clone()
    }
}

fn default_prefix() -> String {
    "edge".into()
}
fn default_keep_alive() -> u64 {
    30
}
fn default_reconnect_min() -> u64 {
    500
}
fn default_reconnect_max() -> u64 {
    30_000
}
fn default_max_packet() -> usize {
    crate::core::topics::DEFAULT_MAX_PACKET_BYTES
}

/// Agent behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Largest bundle accepted (the MQTT packet limit follows it).
    pub max_bundle_bytes: usize,
    /// A new version is on probation until `init` and this many ticks finished.
    pub probation_ticks: u32,
    /// Seconds between periodic status reports (also sent on every change).
    pub status_interval_s: u64,
    /// Guest calls running at once; 0 = one per CPU.
    pub max_concurrent_calls: usize,
    /// Shortest time between two flushes that make key-value writes durable (each a store flush
    /// and an fsync, shared by every module that wrote meanwhile): bounds the fsyncs per second.
    pub kv_commit_interval_ms: u64,
    /// A version being fetched in chunks that has received no chunk for this many seconds is
    /// reported with a `fetch_stalled` event (the fetch goes on).
    pub fetch_timeout_s: u64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            max_bundle_bytes: DEFAULT_MAX_BUNDLE_BYTES,
            probation_ticks: 3,
            status_interval_s: 30,
            max_concurrent_calls: 0,
            kv_commit_interval_ms: 50,
            fetch_timeout_s: 300,
        }
    }
}

/// The store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// sled's page cache, bytes.
    pub cache_capacity_bytes: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            cache_capacity_bytes: 2 << 20,
        }
    }
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file is not valid TOML or has unknown or mistyped keys.
    #[error("{path}: {reason}")]
    Parse {
        /// The file (or the merged result).
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{path}: {reason}")]
    Invalid {
        /// The main file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl Config {
    /// Reads `path`, applies `config.d/*.toml` beside it, resolves relative paths and validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_path_buf(),
                source,
            })
        };
        let parse = |p: &Path, text: &str| {
            text.parse::<toml::Table>().map_err(|e| ConfigError::Parse {
                path: p.to_path_buf(),
                reason: e.to_string(),
            })
        };
        let mut table = parse(path, &read(path)?)?;
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let dropins = base.join("config.d");
        if dropins.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dropins)
                .map_err(|source| ConfigError::Read {
                    path: dropins.clone(),
                    source,
                })?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            files.sort();
            for file in files {
                merge(&mut table, parse(&file, &read(&file)?)?);
            }
        }
        let mut config: Config =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })?;
        config.resolve_paths(&base);
        config.validate().map_err(|reason| ConfigError::Invalid {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(config)
    }

    /// Parses one TOML text (no drop-ins), resolving relative paths against `base`.
    pub fn from_toml(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: base.to_path_buf(),
            reason: e.to_string(),
        })?;
        config.resolve_paths(base);
        config.validate().map_err(|reason| ConfigError::Invalid {
            path: base.to_path_buf(),
            reason,
        })?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.state_dir);
        self.trusted_keys.iter_mut().for_each(fix);
        if let Some(trust) = &mut self.trust {
            trust.roots.iter_mut().for_each(fix);
        }
        for g in &mut self.hardware.gpio {
            if let Some(chip) = &mut g.chip {
                fix(chip);
            }
        }
        for p in self
            .hardware
            .i2c
            .iter_mut()
            .map(|b| &mut b.path)
            .chain(self.hardware.spi.iter_mut().map(|s| &mut s.path))
            .flatten()
        {
            fix(p);
        }
        self.mqtt.tls.paths_mut().for_each(fix);
    }

    fn validate(&self) -> Result<(), String> {
        self.topics().map_err(|e| e.to_string())?;
        BrokerUrl::parse(&self.mqtt.url).map_err(|e| e.to_string())?;
        match &self.trust {
            None if self.trusted_keys.is_empty() => {
                return Err(
                    "trusted_keys is empty and there is no [trust]: the agent would refuse every bundle"
                        .into(),
                );
            }
            None => {}
            Some(_) if !self.trusted_keys.is_empty() => {
                return Err("trusted_keys and [trust] are both set: with [trust], signing keys come only from the trust document; remove trusted_keys".into());
            }
            Some(t) if t.roots.is_empty() => {
                return Err("trust.roots is empty".into());
            }
            Some(t) if t.threshold == 0 || t.threshold > t.roots.len() as u64 => {
                return Err(format!(
                    "trust.threshold must be between 1 and the number of roots ({})",
                    t.roots.len()
                ));
            }
            Some(_) => {}
        }
        if self.mqtt.reconnect_min_ms == 0
            || self.mqtt.reconnect_min_ms > self.mqtt.reconnect_max_ms
        {
            return Err("mqtt: need 0 < reconnect_min_ms <= reconnect_max_ms".into());
        }
        if self.mqtt.max_packet_bytes < crate::core::topics::MIN_MAX_PACKET_BYTES {
            return Err(format!(
                "mqtt.max_packet_bytes must be at least {} (a broker that passes less cannot carry a status report)",
                crate::core::topics::MIN_MAX_PACKET_BYTES
            ));
        }
        if self.agent.fetch_timeout_s == 0 {
            return Err("agent.fetch_timeout_s must be at least 1".into());
        }
        if self.mqtt.keep_alive_s < 5 {
            return Err("mqtt.keep_alive_s must be at least 5".into());
        }
        if self.agent.max_bundle_bytes < 1024 {
            return Err("agent.max_bundle_bytes must be at least 1024".into());
        }
        if self.agent.status_interval_s == 0 {
            return Err("agent.status_interval_s must be at least 1".into());
        }
        // Guest calls run on tokio's blocking pool beside the store, compile and commit workers.
        let most = crate::daemon::MAX_BLOCKING_THREADS - 4;
        if self.agent.max_concurrent_calls > most {
            return Err(format!(
                "agent.max_concurrent_calls must be at most {most} (the agent's threads are bounded)"
            ));
        }
        let r = &self.runtime;
        if r.max_fuel_per_call == 0 || r.max_memory_bytes < 65536 {
            return Err(
                "runtime: max_fuel_per_call must be > 0 and max_memory_bytes >= 65536".into(),
            );
        }
        self.hardware.validate()?;
        if self.restart.quarantine_after == 0 || self.restart.backoff_initial_ms == 0 {
            return Err("restart: quarantine_after and backoff_initial_ms must be > 0".into());
        }
        Ok(())
    }

    /// The device's topics.
    pub fn topics(&self) -> Result<Topics, crate::core::topics::TopicError> {
        let topics = Topics::new(&self.mqtt.topic_prefix, &self.device_id, &self.groups)?;
        Ok(match self.trust {
            Some(_) => topics.with_trust_document(),
            None => topics,
        })
    }
}

/// Merges `over` into `base`: tables key by key, anything else replaced.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
device_id = "pi-1"
state_dir = "state"
trusted_keys = ["ops.pub"]
[mqtt]
url = "mqtt://127.0.0.1:1883"
"#;

    #[test]
    fn a_minimal_config_gets_defaults_and_absolute_paths() {
        let c = Config::from_toml(MINIMAL, Path::new("/etc/edge-agent")).unwrap();
        assert_eq!(c.state_dir, Path::new("/etc/edge-agent/state"));
        assert_eq!(c.trusted_keys[0], Path::new("/etc/edge-agent/ops.pub"));
        assert_eq!(c.mqtt.topic_prefix, "edge");
        assert_eq!(c.agent, AgentConfig::default());
    }

    #[test]
    fn drop_ins_override_key_by_key_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("agent.toml");
        std::fs::write(&main, MINIMAL).unwrap();
        std::fs::create_dir(dir.path().join("config.d")).unwrap();
        std::fs::write(
            dir.path().join("config.d/10-a.toml"),
            "groups = [\"a\"]\n[mqtt]\nkeep_alive_s = 60\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("config.d/20-b.toml"), "groups = [\"b\"]\n").unwrap();
        std::fs::write(dir.path().join("config.d/ignored.txt"), "garbage").unwrap();
        let c = Config::load(&main).unwrap();
        assert_eq!(c.groups, ["b"]);
        assert_eq!(c.mqtt.keep_alive_s, 60);
        assert_eq!(c.mqtt.url, "mqtt://127.0.0.1:1883", "untouched keys stay");
    }

    #[test]
    fn every_sample_in_configs_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut parsed = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|x| x == "toml") {
                let c = Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert!(c.state_dir.is_absolute(), "{}", path.display());
                parsed += 1;
            }
        }
        assert!(parsed >= 2, "dev.toml and pi.toml at least");
    }

    #[test]
    fn tls_files_keep_their_mqtt_keys_and_resolve_against_the_file() {
        let text = format!(
            "{MINIMAL}ca_file = \"tls/ca.pem\"\nclient_cert = \"/abs/device.pem\"\nclient_key = \"tls/device.key\"\n"
        );
        let c = Config::from_toml(&text, Path::new("/etc/edge-agent")).unwrap();
        assert_eq!(
            c.mqtt.tls(),
            TlsFiles {
                ca_file: Some("/etc/edge-agent/tls/ca.pem".into()),
                client_cert: Some("/abs/device.pem".into()),
                client_key: Some("/etc/edge-agent/tls/device.key".into()),
            }
        );
        let none = Config::from_toml(MINIMAL, Path::new("/x")).unwrap();
        assert_eq!(none.mqtt.tls(), TlsFiles::default());
    }

    #[test]
    fn unknown_keys_beside_the_tls_files_are_still_refused() {
        let err = Config::from_toml(
            &format!("{MINIMAL}ca_file = \"ca.pem\"\ncafile = \"ca.pem\"\n"),
            Path::new("/x"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("cafile"), "{err}");
    }

    #[test]
    fn mistakes_are_named() {
        let base = Path::new("/x");
        let bad = |text: &str| Config::from_toml(text, base).unwrap_err().to_string();
        assert!(bad(&format!("{MINIMAL}\ntypo = 1\n")).contains("typo"));
        assert!(bad(&MINIMAL.replace("pi-1", "group")).contains("device id"));
        assert!(bad(&MINIMAL.replace("[\"ops.pub\"]", "[]")).contains("trusted_keys"));
        assert!(bad(&MINIMAL.replace("mqtt://", "http://")).contains("mqtt://"));
        assert!(
            bad(&format!("{MINIMAL}[agent]\nstatus_interval_s = 0\n"))
                .contains("status_interval_s")
        );
    }
}
