//! edge-demo: the README's first command. On embedded defaults — an in-process broker (rumqttd),
//! a throwaway signing key, a temporary state directory — it runs the agent, signs the example
//! modules and deploys them **through the real MQTT path**, then walks through an upgrade that
//! keeps state, a rollback attempt that is refused, and a broken version that is rolled back by
//! itself, with the status table, telemetry and events live on the terminal.

use std::collections::VecDeque;
use std::io::{IsTerminal as _, Write as _};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;
use edge_agent::cli::fleet::{format_event, print_status};
use edge_agent::cli::run_module::show_payload;
use edge_agent::config::Config;
use edge_agent::core::bundle::{self, DEFAULT_MAX_BUNDLE_BYTES};
use edge_agent::core::chunking;
use edge_agent::core::keys;
use edge_agent::core::manifest::Manifest;
use edge_agent::core::protocol::{self, Event, Status};
use edge_agent::core::topics::Topics;
use edge_agent::daemon;
use edge_agent::hal::{Board, HardwareConfig};
use edge_agent::runtime::host::{Clock as _, SystemClock};
use edge_agent::store::Store;
use rumqttc::{AsyncClient, MqttOptions, Packet, QoS};
use tokio::time::Instant;

/// Runs the edge-agent demo: a broker, the agent, and signed modules deployed over MQTT.
#[derive(Debug, Parser)]
#[command(name = "edge-demo", version, about)]
struct Args {
    /// How long to run (Ctrl-C stops it sooner).
    #[arg(long, default_value_t = 60)]
    seconds: u64,
}

const DEVICE: &str = "demo-pi";
/// The embedded broker passes at most this per message, as AWS IoT Core does.
const BROKER_LIMIT: usize = 128 << 10;

/// A 1 MiB module, generated (the tests' `big_module`), for the chunked delivery.
#[path = "../../../tests/it/support/big_module.rs"]
mod big_module;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds the Rust guest modules (the target is added if missing; nothing but rustup needed).
fn build_modules() -> anyhow::Result<PathBuf> {
    println!("building the example modules (modules/build --rust-only) ...");
    let _ = Command::new("rustup")
        .args(["target", "add", "wasm32-unknown-unknown"])
        .current_dir(repo())
        .output();
    let status = Command::new(repo().join("modules/build"))
        .arg("--rust-only")
        .stdout(std::process::Stdio::null())
        .status()
        .context("running modules/build")?;
    if !status.success() {
        bail!("modules/build failed");
    }
    Ok(repo().join("target/modules"))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// Starts rumqttd on `port`, on its own thread.
fn start_broker(port: u16) -> anyhow::Result<()> {
    let config: rumqttd::Config = toml::from_str(&format!(
        r#"
id = 0
[router]
id = 0
max_connections = 100
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10
[v4.1]
name = "v4-1"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = {BROKER_LIMIT}
max_inflight_count = 100
dynamic_filters = true
"#
    ))
    .context("broker configuration")?;
    std::thread::Builder::new()
        .name("broker".into())
        .spawn(move || {
            if let Err(e) = rumqttd::Broker::new(config).start() {
                eprintln!("broker stopped: {e}");
            }
        })?;
    for _ in 0..100 {
        if std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("the embedded broker did not start on port {port}")
}

/// Messages to publish: topic, payload, retained.
type Publishes = Vec<(String, Vec<u8>, bool)>;

/// A step of the story: when, what it says, and the bundle to publish.
struct Step {
    at: Duration,
    say: String,
    publish: Publishes,
}

struct Signer {
    key: ed25519_dalek::SigningKey,
    modules: PathBuf,
}

impl Signer {
    /// The 1 MiB module in chunks: each chunk retained on its topic, then the signed part on the
    /// desired topic; and a line saying so.
    fn chunked(
        &self,
        t: &Topics,
        version: &str,
        seq: u64,
        variant: u32,
    ) -> anyhow::Result<(Publishes, String)> {
        let wasm = big_module::big_module(1 << 20, variant);
        let m = Manifest::from_toml(&format!(
            "name = \"big-model\"\nversion = \"{version}\"\nseq = {seq}\n\
             [limits]\ntick_interval_ms = 1000\n"
        ))
        .map_err(anyhow::Error::msg)?;
        let lengths = chunking::cut(&wasm, chunking::DEFAULT_AVG_BYTES)?;
        let (signed, refs) = bundle::sign_chunked(m, &wasm, &lengths, &self.key)?;
        let mut publish = Vec::new();
        let mut at = 0;
        for r in &refs {
            let len = usize::try_from(r.size())?;
            publish.push((
                Topics::chunk(t.prefix(), &r.sha256()),
                wasm[at..at + len].to_vec(),
                true,
            ));
            at += len;
        }
        let line = format!(
            "{} KiB of Wasm in {} chunks (the largest {} KiB) retained on edge/chunk/<sha256>, then a \
             {} KiB signed part",
            wasm.len() >> 10,
            refs.len(),
            refs.iter().map(|r| r.size()).max().unwrap_or(0) >> 10,
            signed.len() >> 10
        );
        publish.push((t.device_desired("big-model"), signed, true));
        Ok((publish, line))
    }

    fn bundle(
        &self,
        wasm: &str,
        name: &str,
        version: &str,
        seq: u64,
        tick_ms: u64,
    ) -> anyhow::Result<Vec<u8>> {
        let mut m = Manifest::from_toml(&std::fs::read_to_string(
            self.modules.join(format!("{name}.toml")),
        )?)
        .map_err(anyhow::Error::msg)?;
        m.version = version.into();
        m.seq = seq;
        if m.limits.tick_interval_ms > 0 {
            m.limits.tick_interval_ms = tick_ms;
        }
        let wasm = std::fs::read(self.modules.join(format!("{wasm}.wasm")))?;
        Ok(bundle::sign(
            m,
            Some(&wasm),
            &self.key,
            DEFAULT_MAX_BUNDLE_BYTES,
        )?)
    }
}

fn story(s: &Signer, t: &Topics) -> anyhow::Result<Vec<Step>> {
    let desired = |m: &str| t.device_desired(m);
    let secs = Duration::from_secs;
    let broken = {
        // A correctly signed bundle with the last byte of its signature changed.
        let mut b = s.bundle("heartbeat", "heartbeat", "9.9.9", 9, 1000)?;
        let raw = bundle::decode(&b, DEFAULT_MAX_BUNDLE_BYTES)?;
        let last_of_signature =
            raw.sign1.as_ptr() as usize - b.as_ptr() as usize + raw.sign1.len() - 1;
        b[last_of_signature] ^= 0x01;
        b
    };
    let (first, first_line) = s.chunked(t, "1.0.0", 1, 0)?;
    let (second, _) = s.chunked(t, "1.1.0", 2, 1)?;
    let chunked_say = format!(
        "deploy big-model 1.0.0 IN CHUNKS: the broker passes at most 128 KiB a message, so \
         {first_line}"
    );
    Ok(vec![
        Step {
            at: secs(1),
            say: "deploy heartbeat, kv-counter, echo, bme280-telemetry (I2C bus 1, 0x76) and blinky (GPIO 17), signed, retained".into(),
            publish: vec![
                (
                    desired("heartbeat"),
                    s.bundle("heartbeat", "heartbeat", "1.0.0", 1, 1000)?,
                    true,
                ),
                (
                    desired("kv-counter"),
                    s.bundle("kv-counter", "kv-counter", "1.0.0", 1, 1000)?,
                    true,
                ),
                (
                    desired("echo"),
                    s.bundle("echo", "echo", "1.0.0", 1, 0)?,
                    true,
                ),
                (
                    desired("bme280-telemetry"),
                    s.bundle("bme280-telemetry", "bme280-telemetry", "1.0.0", 1, 1000)?,
                    true,
                ),
                (
                    desired("blinky"),
                    s.bundle("blinky", "blinky", "1.0.0", 1, 500)?,
                    true,
                ),
            ],
        },
        Step {
            at: secs(6),
            say: "send \"hello\" to echo's inbox: it answers on telemetry echo/greeting".into(),
            publish: vec![(t.inbox("echo", "greeting"), b"hello".to_vec(), false)],
        },
        Step {
            at: secs(10),
            say: "upgrade kv-counter to 1.1.0 (seq 2): the counter lives in its key-value store and goes on".into(),
            publish: vec![(
                desired("kv-counter"),
                s.bundle("kv-counter", "kv-counter", "1.1.0", 2, 1000)?,
                true,
            )],
        },
        Step {
            at: secs(18),
            say: "replay kv-counter 1.0.0 (seq 1): refused, seq 2 keeps running (anti-rollback)".into(),
            publish: vec![(
                desired("kv-counter"),
                s.bundle("kv-counter", "kv-counter", "1.0.0", 1, 1000)?,
                true,
            )],
        },
        Step {
            at: secs(24),
            say: "deploy kv-counter 1.2.0 (seq 3), which traps in init: rolled back to 1.1.0 by itself".into(),
            publish: vec![(
                desired("kv-counter"),
                s.bundle("init-trapper", "kv-counter", "1.2.0", 3, 1000)?,
                true,
            )],
        },
        Step {
            at: secs(32),
            say: "publish a heartbeat bundle with one signature byte changed: refused, nothing changes".into(),
            publish: vec![(desired("heartbeat"), broken, true)],
        },
        Step {
            at: secs(36),
            say: chunked_say,
            publish: first,
        },
        Step {
            at: secs(44),
            say: "upgrade big-model to 1.1.0, one function changed: the device fetches only the \
                  chunks that changed and reuses the rest (see its line and \"chunks fetched\")".into(),
            publish: second,
        },
    ])
}

struct View {
    status: Option<Status>,
    telemetry: VecDeque<String>,
    events: VecDeque<String>,
    story: Vec<String>,
    board: Arc<Board>,
    sensor: Option<String>,
}

impl View {
    fn push(list: &mut VecDeque<String>, line: String, keep: usize) {
        list.push_back(line);
        while list.len() > keep {
            list.pop_front();
        }
    }

    fn draw(&self, elapsed: Duration, total: Duration, tty: bool) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        if tty {
            write!(out, "\x1b[2J\x1b[H")?;
        } else {
            writeln!(out, "\n----- {} s -----", elapsed.as_secs())?;
        }
        writeln!(
            out,
            "edge-agent demo: device {DEVICE}, {} of {} s (Ctrl-C to stop)\n",
            elapsed.as_secs(),
            total.as_secs()
        )?;
        for line in &self.story {
            writeln!(out, "  > {line}")?;
        }
        writeln!(out)?;
        match &self.status {
            Some(s) => print_status(&mut out, s)?,
            None => writeln!(out, "(waiting for the agent's status)")?,
        }
        if let Some(led) = self.board.sim_line(17) {
            writeln!(
                out,
                "\nsimulated board: LED 17 {} (toggled {} times)   BME280 at 0x76: {}",
                if led.level() { "ON " } else { "off" },
                led.toggles(),
                self.sensor.as_deref().unwrap_or("(no reading yet)")
            )?;
        }
        writeln!(out, "\nevents:")?;
        for e in &self.events {
            writeln!(out, "  {e}")?;
        }
        writeln!(out, "\ntelemetry:")?;
        for t in &self.telemetry {
            writeln!(out, "  {t}")?;
        }
        out.flush()
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let modules = build_modules()?;
    let dir = tempfile::Builder::new().prefix("edge-demo-").tempdir()?;
    let key = edge_agent::cli::common::generate_key()?;
    std::fs::write(
        dir.path().join("demo.key.pub"),
        keys::public_key_pem(&key.verifying_key()),
    )?;
    let port = free_port()?;
    let log = std::fs::File::create(dir.path().join("agent.log"))?;
    {
        use tracing_subscriber::filter::{LevelFilter, Targets};
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(log))
            .finish()
            .with(
                Targets::new()
                    .with_default(LevelFilter::INFO)
                    .with_target("rumqttd", LevelFilter::WARN),
            )
            .init();
    }
    start_broker(port)?;
    let config = Config::from_toml(
        &format!(
            r#"
device_id = "{DEVICE}"
groups = ["demo"]
state_dir = "state"
trusted_keys = ["demo.key.pub"]
[mqtt]
url = "mqtt://127.0.0.1:{port}"
[agent]
status_interval_s = 2
probation_ticks = 2
"#
        ),
        dir.path(),
    )?;
    let topics = config.topics()?;
    let store = Store::open(&config.state_dir, config.store.cache_capacity_bytes)?;
    let signer = Signer { key, modules };
    let steps = story(&signer, &topics)?;
    println!(
        "state in {}, agent log in {}",
        dir.path().display(),
        dir.path().join("agent.log").display()
    );

    // The simulated board the modules reach; kept here too, to show the LED.
    let board = Arc::new(Board::open(
        &HardwareConfig::simulated(),
        Arc::new(|| SystemClock.now_ms()),
    ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let agent_board = Arc::clone(&board);
        let agent = tokio::spawn(async move {
            let mut silent = daemon::Silent;
            let stop = async {
                let _ = stop_rx.await;
            };
            // The demo never reloads its configuration.
            let (_reload, reloads) = tokio::sync::mpsc::channel(1);
            daemon::run(config, store, agent_board, stop, reloads, &mut silent).await
        });

        let mut options = MqttOptions::new("edge-demo-operator", "127.0.0.1", port);
        options.set_max_packet_size(DEFAULT_MAX_BUNDLE_BYTES + 4096, DEFAULT_MAX_BUNDLE_BYTES + 4096);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        client.subscribe(format!("edge/{DEVICE}/#"), QoS::AtLeastOnce).await?;

        let total = Duration::from_secs(args.seconds);
        let start = Instant::now();
        let tty = std::io::stdout().is_terminal();
        let mut view = View {
            status: None,
            telemetry: VecDeque::new(),
            events: VecDeque::new(),
            story: Vec::new(),
            board: Arc::clone(&board),
            sensor: None,
        };
        let mut steps = steps.into_iter().peekable();
        let mut frame = tokio::time::interval(if tty { Duration::from_secs(1) } else { Duration::from_secs(5) });
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        loop {
            tokio::select! {
                _ = &mut ctrl_c => break,
                () = tokio::time::sleep_until(start + total) => break,
                _ = frame.tick() => {
                    while let Some(step) = steps.next_if(|s| start.elapsed() >= s.at) {
                        view.story.push(format!("{:>3} s  {}", step.at.as_secs(), step.say));
                        for (topic, payload, retain) in step.publish {
                            client.publish(topic, QoS::AtLeastOnce, retain, payload).await?;
                        }
                    }
                    view.draw(start.elapsed(), total, tty)?;
                }
                polled = eventloop.poll() => match polled {
                    Ok(rumqttc::Event::Incoming(Packet::Publish(p))) => {
                        let rest = p.topic.strip_prefix(&format!("edge/{DEVICE}/")).unwrap_or(&p.topic);
                        if rest == "status" {
                            view.status = protocol::from_cbor(&p.payload).ok();
                        } else if rest == "events" {
                            if let Ok(e) = protocol::from_cbor::<Event>(&p.payload) {
                                View::push(&mut view.events, format!("{:>3} s  {}", start.elapsed().as_secs(), format_event(&e)), 8);
                            }
                        } else if let Some(t) = rest.strip_prefix("telemetry/") {
                            if t.starts_with("bme280-telemetry/") {
                                view.sensor = Some(String::from_utf8_lossy(&p.payload).into_owned());
                            }
                            View::push(&mut view.telemetry, format!("{t} {}", show_payload(&p.payload)), 6);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => bail!("demo client lost the broker: {e}"),
                },
            }
        }
        let _ = stop_tx.send(());
        agent.await??;
        println!("\nstopped; the agent left its status offline and flushed its store.");
        Ok::<_, anyhow::Error>(())
    })
}
