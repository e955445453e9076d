//! MQTT client setup shared by the agent and `edgectl`: broker URLs, TLS through rustls on the
//! *ring* provider (mutual TLS when a client certificate is given), TCP_NODELAY on, and the
//! maximum packet size raised to fit a bundle.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, EventLoop, MqttOptions, NetworkOptions, TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Where the broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// `mqtts://`: TLS.
    pub tls: bool,
}

/// The TLS files (PEM): the one declaration of the triple, shared by the agent's configuration
/// (`[mqtt]` keys `ca_file`, `client_cert`, `client_key`, through `#[serde(flatten)]`) and
/// `edgectl`'s broker arguments (`--ca`, `--tls-cert`, `--tls-key`, through
/// `#[command(flatten)]`).
#[derive(
    Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::Args,
)]
pub struct TlsFiles {
    /// CA certificate(s) (PEM) the broker's certificate must chain to, for mqtts://; without
    /// it, the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long = "ca", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS: the client's identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long = "tls-cert", value_name = "FILE")]
    pub client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long = "tls-key", value_name = "FILE")]
    pub client_key: Option<PathBuf>,
}

impl TlsFiles {
    /// The files that are given, for resolving relative paths.
    pub fn paths_mut(&mut self) -> impl Iterator<Item = &mut PathBuf> {
        [
            &mut self.ca_file,
            &mut self.client_cert,
            &mut self.client_key,
        ]
        .into_iter()
        .flatten()
    }
}

/// Why a broker connection cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum MqttSetupError {
    /// The URL is malformed.
    #[error("broker URL {url:?}: {reason}")]
    BadUrl {
        /// The URL.
        url: String,
        /// Why.
        reason: &'static str,
    },
    /// A TLS file cannot be read or parsed.
    #[error("TLS file {path}: {reason}")]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The TLS settings are inconsistent.
    #[error("TLS: {0}")]
    Tls(String),
}

impl BrokerUrl {
    /// Parses `mqtt://host[:port]` (default port 1883) or `mqtts://host[:port]` (8883). IPv6
    /// addresses go in brackets: `mqtt://[::1]:1883`.
    pub fn parse(url: &str) -> Result<BrokerUrl, MqttSetupError> {
        let bad = |reason| MqttSetupError::BadUrl {
            url: url.to_string(),
            reason,
        };
        let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("mqtt://") {
            (false, r)
        } else {
            return Err(bad("must start with mqtt:// or mqtts://"));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') || rest.contains('@') {
            return Err(bad("only mqtt[s]://host[:port] is supported"));
        }
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            match after.strip_prefix(':') {
                Some(p) => (host, p.parse().map_err(|_| bad("bad port"))?),
                None if after.is_empty() => (host, default_port),
                None => return Err(bad("unexpected text after ]")),
            }
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h, p.parse().map_err(|_| bad("bad port"))?),
                None => (rest, default_port),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(BrokerUrl {
            host: host.to_string(),
            port,
            tls,
        })
    }
}

fn read_pem(path: &Path) -> Result<Vec<u8>, MqttSetupError> {
    std::fs::read(path).map_err(|e| MqttSetupError::TlsFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// A rustls client configuration on the ring provider.
pub fn rustls_config(files: &TlsFiles) -> Result<rustls::ClientConfig, MqttSetupError> {
    let tls_file = |path: &Path, reason: String| MqttSetupError::TlsFile {
        path: path.to_path_buf(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    match &files.ca_file {
        Some(ca) => {
            let pem = read_pem(ca)?;
            let mut n = 0;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| tls_file(ca, e.to_string()))?;
                roots.add(cert).map_err(|e| tls_file(ca, e.to_string()))?;
                n += 1;
            }
            if n == 0 {
                return Err(tls_file(ca, "no certificate in the file".into()));
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                // A system root rustls cannot use is skipped, as browsers do.
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(MqttSetupError::Tls(
                    "no ca_file given and no system root certificates found".into(),
                ));
            }
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| MqttSetupError::Tls(e.to_string()))?
    .with_root_certificates(roots);
    match (&files.client_cert, &files.client_key) {
        (Some(cert_path), Some(key_path)) => {
            let pem = read_pem(cert_path)?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| tls_file(cert_path, e.to_string()))?;
            if certs.is_empty() {
                return Err(tls_file(cert_path, "no certificate in the file".into()));
            }
            let key = PrivateKeyDer::from_pem_slice(&read_pem(key_path)?)
                .map_err(|e| tls_file(key_path, e.to_string()))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| MqttSetupError::Tls(e.to_string()))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(MqttSetupError::Tls(
            "client_cert and client_key go together".into(),
        )),
    }
}

/// Connection settings.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// Client id (the device id for the agent).
    pub client_id: String,
    /// The broker.
    pub url: BrokerUrl,
    /// TLS files (used with `mqtts://`).
    pub tls: TlsFiles,
    /// Keep-alive interval.
    pub keep_alive: Duration,
    /// Largest packet in either direction (at least a bundle plus topic and headers).
    pub max_packet_bytes: usize,
    /// A message the broker publishes if the client disappears.
    pub last_will: Option<rumqttc::LastWill>,
    /// Start a fresh session (no stored subscriptions or queued messages).
    pub clean_session: bool,
}

/// An MQTT client and its event loop, TCP_NODELAY on.
pub fn connect(
    settings: &ClientSettings,
    capacity: usize,
) -> Result<(AsyncClient, EventLoop), MqttSetupError> {
    let mut options = MqttOptions::new(
        settings.client_id.clone(),
        settings.url.host.clone(),
        settings.url.port,
    );
    options
        .set_keep_alive(settings.keep_alive)
        .set_max_packet_size(settings.max_packet_bytes, settings.max_packet_bytes)
        .set_clean_session(settings.clean_session);
    if let Some(will) = &settings.last_will {
        options.set_last_will(will.clone());
    }
    if settings.url.tls {
        let config = rustls_config(&settings.tls)?;
        options.set_transport(Transport::Tls(TlsConfiguration::Rustls(Arc::new(config))));
    } else if settings.tls != TlsFiles::default() {
        return Err(MqttSetupError::Tls(
            "TLS files are given but the broker URL is mqtt:// (use mqtts://)".into(),
        ));
    }
    let (client, mut eventloop) = AsyncClient::new(options, capacity);
    // rumqttc (and mosquitto) leave Nagle's algorithm on: a QoS 1 round trip through a loopback
    // broker then takes ~88 ms instead of ~0.14 ms.
    let mut network = NetworkOptions::new();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    Ok((client, eventloop))
}

/// Headroom above a bundle for the MQTT fixed header, topic and properties.
pub const PACKET_OVERHEAD: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse() {
        let u = BrokerUrl::parse("mqtt://127.0.0.1:1884").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.tls), ("127.0.0.1", 1884, false));
        let u = BrokerUrl::parse("mqtts://broker.example").unwrap();
        assert_eq!((u.port, u.tls), (8883, true));
        let u = BrokerUrl::parse("mqtt://[::1]:1885").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 1885));
        for bad in [
            "http://x",
            "mqtt://",
            "mqtt://x:port",
            "mqtt://u@x",
            "mqtt://x/y",
            "mqtt://[::1",
        ] {
            assert!(BrokerUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn half_a_client_identity_is_refused() {
        let files = TlsFiles {
            ca_file: None,
            client_cert: Some("c.pem".into()),
            client_key: None,
        };
        assert!(rustls_config(&files).is_err());
    }

    #[test]
    fn tls_files_with_a_plain_url_are_refused() {
        let settings = ClientSettings {
            client_id: "x".into(),
            url: BrokerUrl::parse("mqtt://localhost").unwrap(),
            tls: TlsFiles {
                ca_file: Some("ca.pem".into()),
                ..TlsFiles::default()
            },
            keep_alive: Duration::from_secs(30),
            max_packet_bytes: 1 << 20,
            last_will: None,
            clean_session: true,
        };
        assert!(connect(&settings, 10).is_err());
    }
}
