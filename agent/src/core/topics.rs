//! The MQTT topic scheme (docs/protocol.md, "Topics"), built and parsed in one place. Every topic a
//! device uses starts with `<prefix>/<device>/` (or `<prefix>/group/<group>/` for group desired
//! state), so a broker ACL can confine a device to its own subtree.

use super::manifest::{is_valid_id, is_valid_module_name};

/// The topic level that introduces group topics; no device may be called this.
pub const GROUP_LEVEL: &str = "group";
/// The topic level under which chunks of Wasm are retained (`<p>/chunk/<sha256>`); no device
/// may be called this.
pub const CHUNK_LEVEL: &str = "chunk";
/// The default largest MQTT packet: what AWS IoT Core passes (128 KiB).
pub const DEFAULT_MAX_PACKET_BYTES: usize = 128 << 10;
/// The smallest packet limit the agent and edgectl work with.
pub const MIN_MAX_PACKET_BYTES: usize = 4 << 10;
/// Bytes of an MQTT PUBLISH packet besides its payload, with room to spare: fixed header (5),
/// topic length (2) and topic (`<p>/chunk/<64 hex>`, prefixes up to ~150 bytes), packet id (2).
pub const PUBLISH_OVERHEAD: usize = 256;

/// Who a desired-state bundle is addressed to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// This device (outranks any group).
    Device,
    /// One of the device's groups; the number is the group's position in the configuration, so
    /// earlier groups outrank later ones.
    Group(usize, String),
}

/// A message the agent receives, by topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// A desired-state bundle (empty payload: the retained message was cleared).
    Desired {
        /// Addressed to.
        scope: Scope,
        /// The module the topic names.
        module: String,
    },
    /// A message for a module's `on_message`.
    Inbox {
        /// The module.
        module: String,
        /// The topic below the module (may be empty).
        topic: String,
    },
    /// An operator's restart of a module (out of quarantine, say).
    Restart {
        /// The module.
        module: String,
    },
    /// The fleet's trust document (`<prefix>/trust`; only with [`Topics::with_trust_document`]).
    Trust,
    /// A chunk of Wasm, retained under its digest (`<prefix>/chunk/<sha256 hex>`).
    Chunk {
        /// The digest the topic names.
        sha256: super::manifest::Sha256,
    },
}

/// Topic names for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
    device: String,
    groups: Vec<String>,
    trust: bool,
}

/// Why topics cannot be made for a device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The prefix is empty, has wildcards or empty levels.
    #[error("topic prefix {0:?} must be one or more non-empty levels without + or #")]
    BadPrefix(String),
    /// The device id is not a valid single level, or is reserved.
    #[error(
        "device id {0:?} must match [A-Za-z0-9._:-]{{1,128}} and not be \"group\" or \"chunk\""
    )]
    BadDevice(String),
    /// A group name is not a valid single level.
    #[error("group {0:?} must match [A-Za-z0-9._:-]{{1,128}}")]
    BadGroup(String),
}

impl Topics {
    /// Topics for `device` in `groups` under `prefix` (default `edge`).
    pub fn new(prefix: &str, device: &str, groups: &[String]) -> Result<Self, TopicError> {
        if prefix.is_empty()
            || prefix
                .split('/')
                .any(|l| l.is_empty() || l.contains(['+', '#']) || l.chars().any(char::is_control))
        {
            return Err(TopicError::BadPrefix(prefix.into()));
        }
        if !is_valid_id(device) || device == GROUP_LEVEL || device == CHUNK_LEVEL {
            return Err(TopicError::BadDevice(device.into()));
        }
        if let Some(g) = groups.iter().find(|g| !is_valid_id(g)) {
            return Err(TopicError::BadGroup(g.clone()));
        }
        Ok(Topics {
            prefix: prefix.into(),
            device: device.into(),
            groups: groups.to_vec(),
            trust: false,
        })
    }

    /// Also follows the fleet's trust document (trust-document mode).
    pub fn with_trust_document(mut self) -> Self {
        self.trust = true;
        self
    }

    /// The device id.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// `<p>/<device>/desired/<module>`.
    pub fn device_desired(&self, module: &str) -> String {
        format!("{}/{}/desired/{module}", self.prefix, self.device)
    }

    /// `<p>/group/<group>/desired/<module>`.
    pub fn group_desired(prefix: &str, group: &str, module: &str) -> String {
        format!("{prefix}/{GROUP_LEVEL}/{group}/desired/{module}")
    }

    /// `<p>/trust`: the fleet's trust document (retained).
    pub fn trust_document(prefix: &str) -> String {
        format!("{prefix}/trust")
    }

    /// `<p>/chunk/<sha256 hex>`: a chunk of Wasm (retained), shared by every module, version and
    /// device that uses it.
    pub fn chunk(prefix: &str, sha256: &super::manifest::Sha256) -> String {
        format!("{prefix}/{CHUNK_LEVEL}/{}", sha256.to_hex())
    }

    /// The prefix in use.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<p>/<device>/status` (retained; the last will sets it offline).
    pub fn status(&self) -> String {
        format!("{}/{}/status", self.prefix, self.device)
    }

    /// `<p>/<device>/events`.
    pub fn events(&self) -> String {
        format!("{}/{}/events", self.prefix, self.device)
    }

    /// `<p>/<device>/telemetry/<module>/<topic>`.
    pub fn telemetry(&self, module: &str, topic: &str) -> String {
        format!("{}/{}/telemetry/{module}/{topic}", self.prefix, self.device)
    }

    /// `<p>/<device>/logs/<module>`.
    pub fn logs(&self, module: &str) -> String {
        format!("{}/{}/logs/{module}", self.prefix, self.device)
    }

    /// `<p>/<device>/inbox/<module>/<topic>`.
    pub fn inbox(&self, module: &str, topic: &str) -> String {
        format!("{}/{}/inbox/{module}/{topic}", self.prefix, self.device)
    }

    /// `<p>/<device>/control/restart/<module>`.
    pub fn restart(&self, module: &str) -> String {
        format!("{}/{}/control/restart/{module}", self.prefix, self.device)
    }

    /// The filters the agent subscribes to on every (re)connect.
    pub fn subscriptions(&self) -> Vec<String> {
        let mut subs = vec![
            format!("{}/{}/desired/+", self.prefix, self.device),
            format!("{}/{}/inbox/#", self.prefix, self.device),
            format!("{}/{}/control/restart/+", self.prefix, self.device),
        ];
        subs.extend(
            self.groups
                .iter()
                .map(|g| format!("{}/{GROUP_LEVEL}/{g}/desired/+", self.prefix)),
        );
        if self.trust {
            subs.push(Self::trust_document(&self.prefix));
        }
        subs
    }

    /// Parses a received topic; `None` for anything that is not the agent's (or is malformed).
    pub fn parse(&self, topic: &str) -> Option<Inbound> {
        let rest = topic.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        if self.trust && rest == "trust" {
            return Some(Inbound::Trust);
        }
        if let Some(hex) = rest
            .strip_prefix(CHUNK_LEVEL)
            .and_then(|r| r.strip_prefix('/'))
        {
            // Lower-case hex only: the one spelling of a digest that a topic can carry.
            if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                return None;
            }
            let mut sha = [0u8; 32];
            hex::decode_to_slice(hex, &mut sha).ok()?;
            return Some(Inbound::Chunk {
                sha256: super::manifest::Sha256(sha),
            });
        }
        let module_ok = |m: &str| is_valid_module_name(m).then(|| m.to_string());
        if let Some(rest) = rest
            .strip_prefix(GROUP_LEVEL)
            .and_then(|r| r.strip_prefix('/'))
        {
            let (group, rest) = rest.split_once('/')?;
            let module = module_ok(rest.strip_prefix("desired/")?)?;
            let index = self.groups.iter().position(|g| g == group)?;
            return Some(Inbound::Desired {
                scope: Scope::Group(index, group.to_string()),
                module,
            });
        }
        let rest = rest.strip_prefix(&self.device)?.strip_prefix('/')?;
        if let Some(m) = rest.strip_prefix("desired/") {
            return Some(Inbound::Desired {
                scope: Scope::Device,
                module: module_ok(m)?,
            });
        }
        if let Some(m) = rest.strip_prefix("control/restart/") {
            return Some(Inbound::Restart {
                module: module_ok(m)?,
            });
        }
        let rest = rest.strip_prefix("inbox/")?;
        let (module, topic) = rest.split_once('/').unwrap_or((rest, ""));
        Some(Inbound::Inbox {
            module: module_ok(module)?,
            topic: topic.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics() -> Topics {
        Topics::new("edge", "pi-1", &["barn".into(), "all".into()]).unwrap()
    }

    #[test]
    fn received_topics_parse_into_typed_events() {
        let t = topics();
        assert_eq!(
            t.parse("edge/pi-1/desired/heartbeat"),
            Some(Inbound::Desired {
                scope: Scope::Device,
                module: "heartbeat".into()
            })
        );
        assert_eq!(
            t.parse("edge/group/all/desired/echo"),
            Some(Inbound::Desired {
                scope: Scope::Group(1, "all".into()),
                module: "echo".into()
            })
        );
        assert_eq!(
            t.parse("edge/pi-1/inbox/echo/a/b"),
            Some(Inbound::Inbox {
                module: "echo".into(),
                topic: "a/b".into()
            })
        );
        assert_eq!(
            t.parse("edge/pi-1/inbox/echo"),
            Some(Inbound::Inbox {
                module: "echo".into(),
                topic: String::new()
            })
        );
        assert_eq!(
            t.parse("edge/pi-1/control/restart/echo"),
            Some(Inbound::Restart {
                module: "echo".into()
            })
        );
    }

    #[test]
    fn foreign_and_malformed_topics_are_ignored() {
        let t = topics();
        for topic in [
            "edge/pi-2/desired/heartbeat",
            "edge/group/other/desired/heartbeat",
            "edge/pi-1/desired/Bad_Name",
            "edge/pi-1/desired/a/b",
            "edge/pi-1/status",
            "edge/pi-1/telemetry/x/y",
            "edgex/pi-1/desired/a",
            "other/pi-1/desired/a",
            "edge/pi-1/inbox/",
            "edge/group/barn/desired/",
        ] {
            assert_eq!(t.parse(topic), None, "{topic}");
        }
    }

    #[test]
    fn built_topics_parse_back() {
        let t = topics();
        assert!(matches!(
            t.parse(&t.device_desired("m")),
            Some(Inbound::Desired { .. })
        ));
        assert!(matches!(
            t.parse(&t.inbox("m", "x")),
            Some(Inbound::Inbox { .. })
        ));
        assert!(matches!(
            t.parse(&Topics::group_desired("edge", "barn", "m")),
            Some(Inbound::Desired {
                scope: Scope::Group(0, _),
                ..
            })
        ));
        assert_eq!(t.subscriptions().len(), 5);
        assert_eq!(
            t.parse("edge/trust"),
            None,
            "simple mode ignores the trust document"
        );
        let t = t.with_trust_document();
        assert_eq!(t.subscriptions().len(), 6);
        assert_eq!(t.parse("edge/trust"), Some(Inbound::Trust));
        assert_eq!(
            t.parse(&Topics::trust_document("edge")),
            Some(Inbound::Trust)
        );
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(Topics::new("edge", "group", &[]).is_err());
        assert!(Topics::new("edge", "a/b", &[]).is_err());
        assert!(Topics::new("", "a", &[]).is_err());
        assert!(Topics::new("e/#", "a", &[]).is_err());
        assert!(Topics::new("edge", "a", &["x+".into()]).is_err());
        assert!(Topics::new("site/7/edge", "a", &[]).is_ok());
    }
}
