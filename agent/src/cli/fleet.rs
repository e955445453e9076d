//! `edgectl`'s fleet commands: deploy and remove bundles (retained on the desired topics), and
//! watch a device's status, events, logs and telemetry.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use rumqttc::{AsyncClient, EventLoop, Packet, QoS};

use super::common::{CliError, FleetError, read_private_key, unix_now};
use super::delivery::{random_hex, size_hint};
use super::files;
use super::run_module::show_payload;
use crate::core::bundle::{self, DEFAULT_MAX_BUNDLE_BYTES};
use crate::core::chunking;
use crate::core::manifest::{Action, ChunkRef, Manifest, Sha256, Targets, is_valid_module_name};
use crate::core::protocol::{self, Event, LogRecord, Status};
use crate::core::text::printable;
use crate::core::topics::{
    DEFAULT_MAX_PACKET_BYTES, MIN_MAX_PACKET_BYTES, PUBLISH_OVERHEAD, Topics,
};
use crate::core::verify;
use crate::mqtt::{self, BrokerUrl, ClientSettings, TlsFiles};

/// How to reach the broker.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// The broker: mqtt://host[:port] or mqtts://host[:port].
    #[arg(long, env = "EDGECTL_BROKER")]
    pub broker: String,
    /// TLS files: `--ca`, `--tls-cert`, `--tls-key`.
    #[command(flatten)]
    pub tls: TlsFiles,
    /// Topic prefix.
    #[arg(long, default_value = "edge")]
    pub prefix: String,
    /// Seconds to wait for the broker.
    #[arg(long, default_value_t = 10)]
    pub connect_timeout: u64,
}

/// Who a bundle is for.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct Target {
    /// One device.
    #[arg(long)]
    pub device: Option<String>,
    /// A group of devices.
    #[arg(long)]
    pub group: Option<String>,
}

/// `edgectl deploy`.
#[derive(Debug, Args)]
pub struct DeployArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(flatten)]
    target: Target,
    /// The largest MQTT packet the broker takes (AWS IoT Core: 128 KiB). A bundle that does not
    /// fit one packet travels in chunks: the chunks it lists, then its signed part.
    #[arg(long, env = "EDGECTL_MAX_PACKET_BYTES", default_value_t = DEFAULT_MAX_PACKET_BYTES, value_name = "BYTES")]
    max_packet_bytes: usize,
    /// Send the bundle in chunks even when it fits one packet (it must list chunks: `edgectl
    /// sign` lists them for modules above --chunk-avg-bytes).
    #[arg(long)]
    chunked: bool,
    /// The signed bundle.
    bundle: PathBuf,
}

/// `edgectl remove`.
#[derive(Debug, Args)]
pub struct RemoveArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(flatten)]
    target: Target,
    /// The signing key (PKCS#8 PEM).
    #[arg(long)]
    key: PathBuf,
    /// The module to remove.
    #[arg(long)]
    module: String,
    /// The removal's sequence number (above every seq deployed for the module).
    #[arg(long)]
    seq: u64,
}

/// `edgectl status`, `events`, `logs`, `telemetry`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    /// The device.
    #[arg(long)]
    device: String,
    /// Only this module (logs and telemetry).
    #[arg(long)]
    module: Option<String>,
    /// Keep printing as reports arrive (status); without it status prints once.
    #[arg(long)]
    watch: bool,
    /// Stop after this many messages.
    #[arg(long)]
    count: Option<usize>,
    /// Stop after this many seconds (status without --watch: how long to wait for a report).
    #[arg(long)]
    timeout: Option<u64>,
    /// Print JSON lines instead of text.
    #[arg(long)]
    json: bool,
}

/// `edgectl restart`.
#[derive(Debug, Args)]
pub struct RestartArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    /// The device.
    #[arg(long)]
    device: String,
    /// The module (also brings it out of quarantine).
    #[arg(long)]
    module: String,
}

/// A connection to the broker (also used by `cli/trust.rs`).
pub(crate) struct Session {
    pub(super) client: AsyncClient,
    pub(super) eventloop: EventLoop,
    pub(super) broker: String,
}

/// Connects to the broker and waits for its CONNACK, within `--connect-timeout`.
pub(crate) async fn connect(args: &BrokerArgs) -> Result<Session, CliError> {
    let settings = ClientSettings {
        client_id: format!("edgectl-{}", random_hex()),
        url: BrokerUrl::parse(&args.broker).map_err(FleetError::from)?,
        tls: args.tls.clone(),
        keep_alive: Duration::from_secs(30),
        max_packet_bytes: DEFAULT_MAX_BUNDLE_BYTES * 4 + mqtt::PACKET_OVERHEAD,
        last_will: None,
        clean_session: true,
    };
    let (client, mut eventloop) = mqtt::connect(&settings, 64).map_err(FleetError::from)?;
    let broker = args.broker.clone();
    let wait = tokio::time::timeout(Duration::from_secs(args.connect_timeout), async {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await;
    match wait {
        Ok(Ok(())) => Ok(Session {
            client,
            eventloop,
            broker,
        }),
        Ok(Err(reason)) => Err(FleetError::Broker { broker, reason }.into()),
        Err(_) => Err(FleetError::Broker {
            broker,
            reason: format!("no answer within {} s", args.connect_timeout),
        }
        .into()),
    }
}

impl Session {
    fn broker_error(&self, e: impl std::fmt::Display) -> CliError {
        FleetError::Broker {
            broker: self.broker.clone(),
            reason: e.to_string(),
        }
        .into()
    }

    /// Publishes and waits until the broker acknowledged it.
    pub(crate) async fn publish(
        &mut self,
        topic: String,
        retain: bool,
        payload: Vec<u8>,
    ) -> Result<(), CliError> {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .map_err(|e| self.broker_error(e))?;
        loop {
            match self.eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(Packet::PubAck(_))) => break,
                Ok(_) => {}
                Err(e) => return Err(self.broker_error(e)),
            }
        }
        let _ = self.client.disconnect().await;
        // Let the disconnect go out.
        let _ = tokio::time::timeout(Duration::from_millis(500), self.eventloop.poll()).await;
        Ok(())
    }

    /// Subscribes and hands each message to `each` until it returns false, `count` messages
    /// arrived, or `timeout` passed (an error only when nothing arrived and `need_one`).
    async fn watch(
        &mut self,
        filter: String,
        count: Option<usize>,
        timeout: Option<Duration>,
        mut each: impl FnMut(&str, &[u8]) -> Result<bool, CliError>,
    ) -> Result<usize, CliError> {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .map_err(|e| self.broker_error(e))?;
        let mut seen = 0;
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        loop {
            let polled = match deadline {
                Some(d) => match tokio::time::timeout_at(d, self.eventloop.poll()).await {
                    Ok(p) => p,
                    Err(_) => return Ok(seen),
                },
                None => self.eventloop.poll().await,
            };
            match polled {
                Ok(rumqttc::Event::Incoming(Packet::Publish(p))) => {
                    seen += 1;
                    if !each(&p.topic, &p.payload)? || count.is_some_and(|c| seen >= c) {
                        return Ok(seen);
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(self.broker_error(e)),
            }
        }
    }
}

fn desired_topic(prefix: &str, target: &Target, module: &str) -> Result<String, CliError> {
    match (&target.device, &target.group) {
        (Some(d), _) => Ok(Topics::new(prefix, d, &[])
            .map_err(|e| FleetError::Usage(e.to_string()))?
            .device_desired(module)),
        (None, Some(g)) => {
            if !crate::core::manifest::is_valid_id(g) {
                return Err(FleetError::Usage(format!(
                    "group {g:?} must match [A-Za-z0-9._:-]{{1,128}}"
                ))
                .into());
            }
            Ok(Topics::group_desired(prefix, g, module))
        }
        (None, None) => Err(FleetError::Usage("give --device or --group".into()).into()),
    }
}

fn topics(prefix: &str, device: &str) -> Result<Topics, CliError> {
    Ok(Topics::new(prefix, device, &[]).map_err(|e| FleetError::Usage(e.to_string()))?)
}

/// `edgectl deploy`: publishes the bundle, retained, on the device's or group's desired topic:
/// as one message when it fits `--max-packet-bytes`, else (or with `--chunked`) the chunks its
/// manifest lists that the broker does not hold yet, then the signed part (format 2). Then reads
/// the retained message back.
pub async fn deploy(args: &DeployArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let bytes = files::read_bounded(&args.bundle, DEFAULT_MAX_BUNDLE_BYTES as u64 * 4)?;
    let invalid = |source| CliError::Invalid {
        path: args.bundle.clone(),
        source,
    };
    let u = verify::read_unverified(&bytes, bytes.len()).map_err(invalid)?;
    let raw = bundle::decode(&bytes, bytes.len()).map_err(|e| invalid(e.into()))?;
    if args.max_packet_bytes < MIN_MAX_PACKET_BYTES {
        return Err(FleetError::Usage(format!(
            "--max-packet-bytes {} is below the smallest packet limit edgectl works with, \
             {MIN_MAX_PACKET_BYTES}",
            args.max_packet_bytes
        ))
        .into());
    }
    let m = &u.manifest;
    let topic = desired_topic(&args.broker.prefix, &args.target, &m.name)?;
    let what = format!("{} {} {} seq {}", m.action, m.name, m.version, m.seq);
    let fits = bytes.len() + PUBLISH_OVERHEAD <= args.max_packet_bytes;
    if !raw.chunked && fits && !args.chunked {
        let mut session = connect(&args.broker).await?;
        session
            .publish_all([(topic.clone(), bytes.clone())], true)
            .await
            .map_err(|e| with_hint(e, bytes.len()))?;
        check_read_back(&mut session, &args.broker.prefix, &topic, &bytes).await?;
        session.close().await;
        writeln!(
            out,
            "deployed {what} to {topic} as one message ({} bytes)",
            bytes.len()
        )?;
        return Ok(());
    }
    if m.chunks.is_empty() {
        let why = if args.chunked {
            "--chunked needs a bundle that lists its chunks".to_string()
        } else {
            format!(
                "the bundle is {} bytes: with the PUBLISH header it does not fit \
                 --max-packet-bytes {}",
                bytes.len(),
                args.max_packet_bytes
            )
        };
        return Err(FleetError::Usage(format!(
            "{}: {why}, and its manifest lists no chunks to send it in; sign it again with this \
             edgectl (`edgectl sign` lists chunks for modules above --chunk-avg-bytes)",
            args.bundle.display()
        ))
        .into());
    }
    let signed = bundle::encode_chunked(raw.sign1);
    let pieces = match raw.wasm {
        Some(wasm) => Some(chunking::pieces(wasm, &m.chunks).map_err(|i| {
            FleetError::Usage(format!(
                "{}: chunk {i} of the manifest's list is not the bytes at its place in the \
                 bundle's Wasm (a damaged file?)",
                args.bundle.display()
            ))
        })?),
        // Format 2: only the signed part; the chunks must be on the broker already.
        None => None,
    };
    // Each distinct chunk once, in the list's order.
    let mut seen = std::collections::HashSet::new();
    let distinct: Vec<(usize, ChunkRef)> = m
        .chunks
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, c)| seen.insert(c.sha256()))
        .collect();
    let largest = distinct.iter().map(|(_, c)| c.size()).max().unwrap_or(0);
    let too_big = |n: usize| n + PUBLISH_OVERHEAD > args.max_packet_bytes;
    if too_big(usize::try_from(largest).unwrap_or(usize::MAX)) {
        return Err(FleetError::Usage(format!(
            "{}: its largest chunk is {largest} bytes: with the PUBLISH header it does not fit \
             --max-packet-bytes {}; sign it again with a smaller --chunk-avg-bytes",
            args.bundle.display(),
            args.max_packet_bytes
        ))
        .into());
    }
    if too_big(signed.len()) {
        return Err(FleetError::Usage(format!(
            "{}: its signed part is {} bytes: with the PUBLISH header it does not fit \
             --max-packet-bytes {}",
            args.bundle.display(),
            signed.len(),
            args.max_packet_bytes
        ))
        .into());
    }

    let prefix = &args.broker.prefix;
    let mut session = connect(&args.broker).await?;
    let listed: std::collections::HashMap<String, ChunkRef> = distinct
        .iter()
        .map(|(_, c)| (Topics::chunk(prefix, &c.sha256()), *c))
        .collect();
    let mut present = std::collections::HashSet::new();
    session
        .retained(prefix, listed.keys().cloned().collect(), |t, payload| {
            // Present only when it is the chunk its topic names; a damaged one is sent again.
            if let Some(c) = listed.get(t)
                && payload.len() as u64 == c.size()
                && Sha256::of(payload) == c.sha256()
            {
                present.insert(c.sha256());
            }
        })
        .await?;
    // A fresh session: the chunk subscriptions end, so the chunks sent do not come back.
    session.close().await;
    let missing: Vec<(usize, ChunkRef)> = distinct
        .iter()
        .copied()
        .filter(|(_, c)| !present.contains(&c.sha256()))
        .collect();
    let Some(pieces) = pieces else {
        if !missing.is_empty() {
            return Err(FleetError::Usage(format!(
                "{}: a format 2 file carries only the signed part, and {} of the {} chunks it \
                 lists are not on the broker; deploy the format 1 bundle `edgectl sign` wrote",
                args.bundle.display(),
                missing.len(),
                distinct.len()
            ))
            .into());
        }
        return finish_chunked(args, out, &topic, &what, &signed, (distinct.len(), 0, 0)).await;
    };
    let sent_bytes: u64 = missing.iter().map(|(_, c)| c.size()).sum();
    let mut session = connect(&args.broker).await?;
    session
        .publish_all(
            missing
                .iter()
                .map(|(i, c)| (Topics::chunk(prefix, &c.sha256()), pieces[*i].to_vec())),
            true,
        )
        .await
        .map_err(|e| with_hint(e, usize::try_from(largest).unwrap_or(usize::MAX)))?;
    session.close().await;
    let figures = (distinct.len(), missing.len(), sent_bytes);
    finish_chunked(args, out, &topic, &what, &signed, figures).await
}

/// Publishes the signed part of a chunked delivery, reads it back and prints the line.
async fn finish_chunked(
    args: &DeployArgs,
    out: &mut dyn Write,
    topic: &str,
    what: &str,
    signed: &[u8],
    (total, sent, sent_bytes): (usize, usize, u64),
) -> Result<(), CliError> {
    let mut session = connect(&args.broker).await?;
    session
        .publish_all([(topic.to_string(), signed.to_vec())], true)
        .await
        .map_err(|e| with_hint(e, signed.len()))?;
    check_read_back(&mut session, &args.broker.prefix, topic, signed).await?;
    session.close().await;
    writeln!(
        out,
        "deployed {what} to {topic} in chunks: {total} chunks, {sent} sent, {} already on the \
         broker; {} bytes sent (chunks {sent_bytes} + signed part {}) for {} bytes of Wasm",
        total - sent,
        sent_bytes + signed.len() as u64,
        signed.len(),
        wasm_size_of(signed)
    )?;
    Ok(())
}

/// The Wasm size a signed part's manifest states.
fn wasm_size_of(signed: &[u8]) -> u64 {
    verify::read_unverified(signed, signed.len())
        .ok()
        .and_then(|u| u.manifest.wasm)
        .map_or(0, |w| w.size)
}

/// A broker error while sending a message of `bytes` bytes, with the likely cause.
fn with_hint(e: CliError, bytes: usize) -> CliError {
    match e {
        CliError::Fleet(FleetError::Broker { broker, reason }) => FleetError::Broker {
            broker,
            reason: format!(
                "{reason}; if it closed the connection, {}",
                size_hint(bytes)
            ),
        }
        .into(),
        other => other,
    }
}

/// Fails unless the message retained on `topic` is `published`.
async fn check_read_back(
    session: &mut Session,
    prefix: &str,
    topic: &str,
    published: &[u8],
) -> Result<(), CliError> {
    match session.read_back(prefix, topic).await? {
        Some((sha, _)) if sha == Sha256::of(published) => Ok(()),
        found => Err(FleetError::Broker {
            broker: session.broker.clone(),
            reason: format!(
                "{} retained on {topic} after the publish ({}): {}",
                if found.is_some() {
                    "another message is"
                } else {
                    "nothing is"
                },
                match found {
                    Some((_, len)) => format!("{len} bytes"),
                    None => "none".into(),
                },
                size_hint(published.len())
            ),
        }
        .into()),
    }
}

/// `edgectl remove`: signs a removal for the device or group it names and publishes it,
/// retained, in place of the module's bundle.
pub async fn remove(args: &RemoveArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let (topic, bundle) = sign_removal(args)?;
    let mut session = connect(&args.broker).await?;
    session.publish(topic.clone(), true, bundle).await?;
    writeln!(
        out,
        "removal of {} seq {} published to {topic}",
        args.module, args.seq
    )?;
    Ok(())
}

/// What `edgectl remove` publishes and where: the desired topic of the device or group, and a
/// removal signed for that device or group only (`targets`), so that the retained message,
/// copied to another device's or group's topic, removes nothing there.
pub fn sign_removal(args: &RemoveArgs) -> Result<(String, Vec<u8>), CliError> {
    if !is_valid_module_name(&args.module) {
        return Err(FleetError::Usage(format!("{:?} is not a module name", args.module)).into());
    }
    let topic = desired_topic(&args.broker.prefix, &args.target, &args.module)?;
    let key = read_private_key(&args.key)?;
    let manifest = removal_manifest(&args.target, &args.module, args.seq);
    let bundle = bundle::sign(manifest, None, &key, DEFAULT_MAX_BUNDLE_BYTES)?;
    Ok((topic, bundle))
}

/// The manifest of a removal of `module` at `seq` for the device or group `target` names.
pub fn removal_manifest(target: &Target, module: &str, seq: u64) -> Manifest {
    Manifest {
        name: module.to_string(),
        version: String::new(),
        seq,
        action: Action::Remove,
        wasm: None,
        limits: Default::default(),
        caps: Default::default(),
        expires_at: None,
        targets: Some(Targets {
            devices: target.device.iter().cloned().collect(),
            groups: target.group.iter().cloned().collect(),
        }),
        issued_at: Some(unix_now()),
        chunks: Vec::new(),
    }
}

/// `edgectl restart`: asks the device to restart a module (also out of quarantine).
pub async fn restart(args: &RestartArgs, out: &mut dyn Write) -> Result<(), CliError> {
    if !is_valid_module_name(&args.module) {
        return Err(FleetError::Usage(format!("{:?} is not a module name", args.module)).into());
    }
    let topic = topics(&args.broker.prefix, &args.device)?.restart(&args.module);
    let mut session = connect(&args.broker).await?;
    session.publish(topic, false, Vec::new()).await?;
    writeln!(out, "restart of {} sent to {}", args.module, args.device)?;
    Ok(())
}

/// `edgectl status`: the device's retained status as a table.
pub async fn status(args: &WatchArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let topic = topics(&args.broker.prefix, &args.device)?.status();
    let mut session = connect(&args.broker).await?;
    let timeout = match (args.watch, args.timeout) {
        (_, Some(t)) => Some(Duration::from_secs(t)),
        (false, None) => Some(Duration::from_secs(5)),
        (true, None) => None,
    };
    let count = if args.watch { args.count } else { Some(1) };
    let seen = session
        .watch(topic, count, timeout, |_, payload| {
            let status: Status = protocol::from_cbor(payload).map_err(|e| {
                FleetError::Usage(format!("malformed status from {}: {e}", args.device))
            })?;
            if args.json {
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string(&status).unwrap_or_default()
                )?;
            } else {
                print_status(out, &status)?;
            }
            Ok(true)
        })
        .await?;
    if seen == 0 && !args.watch {
        return Err(FleetError::Timeout(format!(
            "no status from device {:?} (it has never connected to this broker, or the prefix differs)",
            args.device
        ))
        .into());
    }
    Ok(())
}

/// Prints a status report as a table.
pub fn print_status(out: &mut dyn Write, s: &Status) -> std::io::Result<()> {
    let age = unix_now().saturating_mul(1000).saturating_sub(s.ts_ms);
    writeln!(
        out,
        "device {}  {}  agent {}  up {} s  report {:.1} s old{}",
        printable(&s.device),
        if s.online { "online" } else { "OFFLINE" },
        printable(&s.agent_version),
        s.uptime_s,
        age as f64 / 1000.0,
        if s.dropped_messages > 0 {
            format!("  {} messages dropped", s.dropped_messages)
        } else {
            String::new()
        }
    )?;
    if s.fetched_bytes > 0 {
        writeln!(
            out,
            "{} bytes of chunks fetched since the agent started",
            s.fetched_bytes
        )?;
    }
    if let Some(version) = s.trust_version {
        let mut line = format!("trust document version {version}");
        if let Some(note) = &s.trust_note {
            line.push_str(&format!(": {}", printable(note)));
        }
        writeln!(out, "{line}")?;
    }
    if let Some(behind) = s.clock_behind_s {
        writeln!(
            out,
            "clock {behind} s behind the newest signed time the device has seen (no RTC or NTP yet?)"
        )?;
    }
    if let Some(note) = &s.broker_note {
        writeln!(out, "broker: {}", printable(note))?;
    }
    writeln!(
        out,
        "{:<20} {:<10} {:>5} {:<12} {:>8} {:>9} {:>10} {:>14} {:>9} {:>8}  DETAIL / LAST ERROR",
        "MODULE",
        "VERSION",
        "SEQ",
        "STATE",
        "RESTARTS",
        "CALLS",
        "FUEL LAST",
        "FUEL TOTAL",
        "MEMORY",
        "KV"
    )?;
    for m in &s.modules {
        let state = serde_json::to_value(m.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let fetch = m.fetch.as_ref().map(|f| {
            let mut line = format!(
                "fetching {} (seq {}): {}/{} chunks, {}/{} bytes ({} reused)",
                f.version,
                f.seq,
                f.chunks_have,
                f.chunks_total,
                f.bytes_have,
                f.bytes_total,
                f.reused_bytes
            );
            if f.chunks_refused > 0 {
                line.push_str(&format!(", {} damaged chunks refused", f.chunks_refused));
            }
            if let Some(s) = f.stalled_s {
                line.push_str(&format!(", nothing for {s} s"));
            }
            line
        });
        let reused = m
            .reused_bytes
            .filter(|_| m.fetch.is_none())
            .map(|r| format!("installed in chunks, {r} bytes reused"));
        let note = [
            m.detail.as_deref(),
            m.last_error.as_deref(),
            fetch.as_deref(),
            reused.as_deref(),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("; ");
        writeln!(
            out,
            "{:<20} {:<10} {:>5} {:<12} {:>8} {:>9} {:>10} {:>14} {:>9} {:>8}  {}",
            printable(&m.name),
            printable(&m.version),
            m.seq,
            state,
            m.restarts,
            m.calls,
            m.fuel_last,
            m.fuel_total,
            m.memory_bytes,
            m.kv_bytes,
            printable(&note)
        )?;
    }
    if s.modules.is_empty() {
        writeln!(out, "(no modules installed)")?;
    }
    out.flush()
}

/// `edgectl events`: deployment events as they happen.
pub async fn events(args: &WatchArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let topic = topics(&args.broker.prefix, &args.device)?.events();
    let mut session = connect(&args.broker).await?;
    session
        .watch(
            topic,
            args.count,
            args.timeout.map(Duration::from_secs),
            |_, payload| {
                let e: Event = protocol::from_cbor(payload)
                    .map_err(|e| FleetError::Usage(format!("malformed event: {e}")))?;
                if args.json {
                    writeln!(out, "{}", serde_json::to_string(&e).unwrap_or_default())?;
                } else {
                    writeln!(out, "{} {}", format_ts(e.ts_ms), format_event(&e))?;
                }
                out.flush()?;
                Ok(true)
            },
        )
        .await?;
    Ok(())
}

/// Unix milliseconds as UTC, `2026-11-25T17:02:03.123Z` (days to civil date after Howard
/// Hinnant's algorithm).
pub fn format_ts(ms: u64) -> String {
    let (secs, millis) = (ms / 1000, ms % 1000);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = i64::try_from(days).unwrap_or(i64::MAX) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// An event on one line: kind, module, version, seq and reason.
pub fn format_event(e: &Event) -> String {
    format!(
        "{:<12} {}{}{}{}",
        e.kind.as_str(),
        printable(&e.module),
        e.version
            .as_ref()
            .map(|v| format!(" {}", printable(v)))
            .unwrap_or_default(),
        e.seq.map(|s| format!(" seq {s}")).unwrap_or_default(),
        e.reason
            .as_ref()
            .map(|r| format!(": {}", printable(r)))
            .unwrap_or_default()
    )
}

/// A module's log line on one line of a terminal: control characters in it are escaped.
pub fn format_log(module: &str, r: &LogRecord) -> String {
    format!(
        "{} {:<16} {:<5} {}",
        format_ts(r.ts_ms),
        printable(module),
        r.level,
        printable(&r.text)
    )
}

/// `edgectl logs`: module log lines as they arrive.
pub async fn logs(args: &WatchArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let t = topics(&args.broker.prefix, &args.device)?;
    let filter = t.logs(args.module.as_deref().unwrap_or("+"));
    let mut session = connect(&args.broker).await?;
    session
        .watch(filter, args.count, args.timeout.map(Duration::from_secs), |topic, payload| {
            let module = topic.rsplit('/').next().unwrap_or("?");
            let r: LogRecord = protocol::from_cbor(payload)
                .map_err(|e| FleetError::Usage(format!("malformed log record: {e}")))?;
            if args.json {
                let line = serde_json::json!({"module": module, "ts_ms": r.ts_ms, "level": r.level, "text": r.text});
                writeln!(out, "{line}")?;
            } else {
                writeln!(out, "{}", format_log(module, &r))?;
            }
            out.flush()?;
            Ok(true)
        })
        .await?;
    Ok(())
}

/// `edgectl telemetry`: what modules publish, as it arrives.
pub async fn telemetry(args: &WatchArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let t = topics(&args.broker.prefix, &args.device)?;
    let filter = t.telemetry(args.module.as_deref().unwrap_or("+"), "#");
    let mut session = connect(&args.broker).await?;
    session
        .watch(filter, args.count, args.timeout.map(Duration::from_secs), |topic, payload| {
            if args.json {
                let line = serde_json::json!({"topic": topic, "payload": String::from_utf8_lossy(payload)});
                writeln!(out, "{line}")?;
            } else {
                writeln!(out, "{} {}", printable(topic), show_payload(payload))?;
            }
            out.flush()?;
            Ok(true)
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `edgectl remove ARGS` would publish (topic and bundle), signed by key seed 1.
    fn removal(args: &[&str]) -> (String, Vec<u8>) {
        #[derive(Debug, clap::Parser)]
        struct Probe {
            #[command(flatten)]
            remove: RemoveArgs,
        }
        use clap::Parser as _;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("op.key");
        let signing = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        std::fs::write(&key, crate::core::keys::private_key_pem(&signing)).unwrap();
        let mut argv = vec![
            "probe",
            "--broker",
            "mqtt://h",
            "--key",
            key.to_str().unwrap(),
        ];
        argv.extend_from_slice(&["--module", "heartbeat", "--seq", "5"]);
        argv.extend_from_slice(args);
        sign_removal(&Probe::try_parse_from(argv).unwrap().remove).unwrap()
    }

    fn verify_as(bundle: &[u8], device: &str, groups: &[&str]) -> Result<(), verify::VerifyError> {
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key();
        let trust = crate::core::keys::TrustSet::from_keys([key]).unwrap();
        verify::Verifier::new(trust, crate::engine::WasmLimits::default())
            .for_device(verify::DeviceIdentity {
                id: device.into(),
                groups: groups.iter().map(|g| g.to_string()).collect(),
            })
            .verify(bundle, 0, |_| Some(4))
            .map(|_| ())
    }

    #[test]
    fn a_removal_signed_for_one_device_is_refused_by_every_other_device() {
        let (topic, bundle) = removal(&["--device", "pi-7"]);
        assert_eq!(topic, "edge/pi-7/desired/heartbeat");
        verify_as(&bundle, "pi-7", &[]).unwrap();
        for (device, groups) in [("pi-8", &[][..]), ("pi-8", &["pi-7"][..])] {
            let err = verify_as(&bundle, device, groups).unwrap_err();
            assert!(
                matches!(err, verify::VerifyError::NotForThisDevice { .. }),
                "{device} {groups:?}: {err}"
            );
        }
    }

    #[test]
    fn a_removal_signed_for_a_group_is_refused_outside_the_group() {
        let (topic, bundle) = removal(&["--group", "greenhouse"]);
        assert_eq!(topic, "edge/group/greenhouse/desired/heartbeat");
        verify_as(&bundle, "pi-8", &["barn", "greenhouse"]).unwrap();
        for (device, groups) in [("pi-9", &["barn"][..]), ("greenhouse", &[][..])] {
            let err = verify_as(&bundle, device, groups).unwrap_err();
            assert!(
                matches!(err, verify::VerifyError::NotForThisDevice { .. }),
                "{device} {groups:?}: {err}"
            );
        }
    }

    #[test]
    fn the_tls_flags_fill_the_shared_tls_files() {
        #[derive(Debug, clap::Parser)]
        struct Probe {
            #[command(flatten)]
            broker: BrokerArgs,
        }
        use clap::Parser as _;
        let p = Probe::try_parse_from([
            "probe",
            "--broker",
            "mqtts://broker.example",
            "--ca",
            "ca.pem",
            "--tls-cert",
            "op.pem",
            "--tls-key",
            "op.key",
        ])
        .unwrap();
        assert_eq!(
            p.broker.tls,
            TlsFiles {
                ca_file: Some("ca.pem".into()),
                client_cert: Some("op.pem".into()),
                client_key: Some("op.key".into()),
            }
        );
        let p = Probe::try_parse_from(["probe", "--broker", "mqtt://h"]).unwrap();
        assert_eq!(p.broker.tls, TlsFiles::default());
    }

    #[test]
    fn timestamps_read_as_utc() {
        assert_eq!(format_ts(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_ts(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(format_ts(1_795_630_263_139), "2026-11-25T18:11:03.139Z");
    }

    #[test]
    fn text_from_modules_and_devices_reaches_the_terminal_escaped() {
        let log = LogRecord {
            ts_ms: 0,
            level: protocol::LogLevel::Info,
            text: "\u{1b}[2J\rforged\0\nline".into(),
        };
        let event = Event {
            id: 0,
            ts_ms: 0,
            kind: protocol::EventKind::Rejected,
            module: "m\u{1b}".into(),
            version: Some("1\r".into()),
            seq: Some(1),
            reason: Some("bad\nforged".into()),
        };
        for line in [format_log("m", &log), format_event(&event)] {
            assert!(
                !line.chars().any(char::is_control),
                "a control character reached the terminal: {line:?}"
            );
        }
        assert!(format_log("m", &log).ends_with("\\u{1b}[2J\\rforged\\u{0}\\nline"));
    }
}
