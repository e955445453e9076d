//! Hardware for modules: host functions against embedded-hal-mock expectations, every refused
//! capability path, install-time refusals, output-line ownership, and the example modules on the
//! simulated board.

use std::sync::Arc;

use edge_abi::err;
use edge_agent::core::manifest::Manifest;
use edge_agent::hal::{Board, Direction, Eh, HardwareConfig, sim};
use edge_agent::runtime::host::{Clock, Hardware, HostCall, HostLimits, HostState};
use edge_agent::runtime::limiter::GuestLimiter;
use edge_agent::runtime::{InstallError, Outcome, Runtime, RuntimeConfig};
use embedded_hal_mock::eh1::{digital, i2c, spi};

use crate::support::guest;

#[derive(Debug)]
struct FixedClock;
impl Clock for FixedClock {
    fn now_ms(&self) -> u64 {
        1_000
    }
}

fn caps(text: &str) -> Manifest {
    Manifest::from_toml(&format!(
        "name = \"hw\"\nversion = \"1\"\nseq = 1\n[limits]\ntick_interval_ms = 100\n[caps]\n{text}\n"
    ))
    .unwrap()
}

fn host(board: Board, manifest: &Manifest) -> HostState {
    let mut s = HostState::new(
        vec![],
        None,
        Arc::new(FixedClock),
        HostLimits::default(),
        GuestLimiter::new(1 << 20, 16),
    )
    .with_hardware(Hardware::new(Arc::new(board), &manifest.caps));
    s.start_call(1 << 40, std::time::Duration::from_secs(3600));
    s
}

#[test]
fn i2c_host_calls_reach_the_bus_as_the_guest_asked() {
    let expectations = [
        i2c::Transaction::write_read(0x76, vec![0xd0], vec![0x60]),
        i2c::Transaction::write(0x76, vec![0xf4, 0x25]),
        i2c::Transaction::read(0x76, vec![1, 2, 3]),
    ];
    let mut mock = i2c::Mock::new(&expectations);
    let board = Board::empty().with_i2c(1, Box::new(Eh(mock.clone())));
    let mut s = host(board, &caps("i2c = [{ bus = 1, addresses = [0x76] }]"));
    let mut mem = vec![0u8; 64];
    mem[0] = 0xd0;
    mem[8..10].copy_from_slice(&[0xf4, 0x25]);
    assert_eq!(
        s.call(&mut mem, HostCall::I2cWriteRead(1, 0x76, 0, 1, 4, 1)),
        Ok(0)
    );
    assert_eq!(mem[4], 0x60);
    assert_eq!(s.call(&mut mem, HostCall::I2cWrite(1, 0x76, 8, 2)), Ok(0));
    assert_eq!(s.call(&mut mem, HostCall::I2cRead(1, 0x76, 16, 3)), Ok(0));
    assert_eq!(&mem[16..19], &[1, 2, 3]);
    mock.done();
}

#[test]
fn gpio_host_calls_drive_and_read_the_line() {
    use digital::{State, Transaction};
    let mut led =
        digital::Mock::new(&[Transaction::set(State::High), Transaction::set(State::Low)]);
    let mut button = digital::Mock::new(&[Transaction::get(State::High)]);
    let board = Board::empty()
        .with_gpio(17, Direction::Output, Box::new(Eh(led.clone())))
        .with_gpio(27, Direction::Input, Box::new(Eh(button.clone())));
    let mut s = host(board, &caps("gpio = [17, 27]"));
    let mut mem = vec![0u8; 8];
    assert_eq!(s.call(&mut mem, HostCall::GpioSet(17, 1)), Ok(0));
    assert_eq!(s.call(&mut mem, HostCall::GpioSet(17, 0)), Ok(0));
    assert_eq!(s.call(&mut mem, HostCall::GpioGet(27)), Ok(1));
    // An input line cannot be driven; the call never reaches the pin.
    assert_eq!(
        s.call(&mut mem, HostCall::GpioSet(27, 1)),
        Ok(i64::from(err::BAD_ARGUMENT))
    );
    led.done();
    button.done();
}

#[test]
fn spi_transfer_is_full_duplex_through_guest_memory() {
    let expectations = [
        spi::Transaction::transaction_start(),
        spi::Transaction::transfer(vec![0x9f, 0, 0], vec![0xff, 0xef, 0x40]),
        spi::Transaction::transaction_end(),
    ];
    let mut mock = spi::Mock::new(&expectations);
    let board = Board::empty().with_spi(0, 0, Box::new(Eh(mock.clone())));
    let mut s = host(board, &caps("spi = [{ bus = 0, cs = 0 }]"));
    let mut mem = vec![0u8; 32];
    mem[0] = 0x9f;
    assert_eq!(
        s.call(&mut mem, HostCall::SpiTransfer(0, 0, 0, 16, 3)),
        Ok(0)
    );
    assert_eq!(&mem[16..19], &[0xff, 0xef, 0x40]);
    mock.done();
}

#[test]
fn every_refused_capability_returns_a_code_and_is_counted() {
    // The grant is line 17, bus 1 address 0x76 and SPI 0.0; the board has more.
    let board = Board::open(&HardwareConfig::simulated(), Arc::new(|| 0));
    let manifest =
        caps("gpio = [17]\ni2c = [{ bus = 1, addresses = [0x76] }]\nspi = [{ bus = 0, cs = 0 }]");
    let mut s = host(board, &manifest);
    let mut mem = vec![0u8; 64];
    let cases = [
        ("an ungranted line", HostCall::GpioSet(27, 1), err::DENIED),
        (
            "reading an ungranted line",
            HostCall::GpioGet(4),
            err::DENIED,
        ),
        ("a negative line", HostCall::GpioGet(-1), err::DENIED),
        (
            "an ungranted address",
            HostCall::I2cWrite(1, 0x77, 0, 1),
            err::DENIED,
        ),
        (
            "an ungranted bus",
            HostCall::I2cRead(2, 0x76, 0, 1),
            err::DENIED,
        ),
        (
            "a 10-bit address",
            HostCall::I2cRead(1, 0x176, 0, 1),
            err::DENIED,
        ),
        (
            "an ungranted SPI device",
            HostCall::SpiTransfer(0, 1, 0, 8, 4),
            err::DENIED,
        ),
        (
            "an I2C buffer outside memory",
            HostCall::I2cRead(1, 0x76, 60, 8),
            err::BAD_POINTER,
        ),
        (
            "an I2C transfer too large",
            HostCall::I2cWrite(1, 0x76, 0, 5000),
            err::TOO_LARGE,
        ),
        (
            "an SPI buffer outside memory",
            HostCall::SpiTransfer(0, 0, 0, 62, 4),
            err::BAD_POINTER,
        ),
    ];
    for (what, call, code) in cases {
        assert_eq!(s.call(&mut mem, call), Ok(i64::from(code)), "{what}");
    }
    assert_eq!(s.counters.refused, cases.len() as u64);
}

#[test]
fn hardware_the_device_lacks_or_cannot_answer_is_unavailable_or_io() {
    let board = Board::open(&HardwareConfig::simulated(), Arc::new(|| 0));
    // Granted but absent: bus 3 is not on this board; 0x40 is granted but nothing answers there.
    let manifest = caps("i2c = [{ bus = 1, addresses = [0x40] }, { bus = 3, addresses = [0x10] }]");
    let mut s = host(board, &manifest);
    let mut mem = vec![0u8; 16];
    assert_eq!(
        s.call(&mut mem, HostCall::I2cRead(3, 0x10, 0, 1)),
        Ok(i64::from(err::UNAVAILABLE))
    );
    assert_eq!(
        s.call(&mut mem, HostCall::I2cRead(1, 0x40, 0, 1)),
        Ok(i64::from(err::IO))
    );
    let mut bare = host(Board::empty(), &caps("gpio = [17]"));
    assert_eq!(
        bare.call(&mut mem, HostCall::GpioGet(17)),
        Ok(i64::from(err::UNAVAILABLE))
    );
}

fn wat_module(imports: &str) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module {imports} (memory (export "memory") 1) (func (export "edge_abi_v1")))"#
    ))
    .unwrap()
}

fn sim_runtime() -> Runtime {
    let board = Board::open(&HardwareConfig::simulated(), Arc::new(|| 0));
    Runtime::new(RuntimeConfig::default()).with_board(Arc::new(board))
}

#[test]
fn a_module_importing_hardware_its_manifest_grants_nothing_for_is_refused_at_install() {
    let rt = sim_runtime();
    for (import, ty, cap) in [
        ("gpio_set", "(param i32 i32) (result i32)", "caps.gpio"),
        ("gpio_get", "(param i32) (result i32)", "caps.gpio"),
        (
            "i2c_write_read",
            "(param i32 i32 i32 i32 i32 i32) (result i32)",
            "caps.i2c",
        ),
        (
            "spi_transfer",
            "(param i32 i32 i32 i32 i32) (result i32)",
            "caps.spi",
        ),
    ] {
        let wasm = wat_module(&format!(r#"(import "edge" "{import}" (func {ty}))"#));
        match rt.prepare(&caps(""), &wasm) {
            Err(InstallError::RefusedImport {
                import: i, reason, ..
            }) => {
                assert_eq!(i, format!("edge.{import}"));
                assert!(reason.contains(cap), "{reason}");
            }
            other => panic!("{import}: {other:?}"),
        }
    }
}

#[test]
fn a_manifest_granting_hardware_the_device_does_not_have_is_refused_at_install() {
    let rt = sim_runtime();
    for (grant, missing) in [
        ("gpio = [99]", "gpio line 99"),
        ("i2c = [{ bus = 4, addresses = [0x76] }]", "i2c bus 4"),
        ("spi = [{ bus = 1, cs = 1 }]", "spi device 1.1"),
    ] {
        let e = rt.prepare(&caps(grant), &wat_module("")).unwrap_err();
        assert!(matches!(e, InstallError::Hardware { .. }), "{e:?}");
        assert!(e.to_string().contains(missing), "{e}");
    }
}

#[test]
fn two_modules_may_not_drive_one_output_line() {
    let board = Board::open(&HardwareConfig::simulated(), Arc::new(|| 0));
    let led = caps("gpio = [17]").caps;
    let button = caps("gpio = [27]").caps;
    board.claim_outputs("blinky", &led).unwrap();
    let e = board.claimable("other", &led).unwrap_err();
    assert_eq!(
        e.to_string(),
        "gpio line 17 is an output already driven by module \"blinky\""
    );
    // The owner may claim again (an upgrade); an input line is shared freely.
    board.claim_outputs("blinky", &led).unwrap();
    board.claim_outputs("a", &button).unwrap();
    board.claim_outputs("b", &button).unwrap();
    board.release("blinky");
    board.claim_outputs("other", &led).unwrap();
}

#[test]
fn bme280_telemetry_reads_plausible_values_from_the_simulated_sensor() {
    let start = 1_800_000_000_000u64;
    let now = Arc::new(std::sync::atomic::AtomicU64::new(start));
    let clock = Arc::clone(&now);
    let board = Board::open(
        &HardwareConfig::simulated(),
        Arc::new(move || clock.load(std::sync::atomic::Ordering::Relaxed)),
    );
    let rt = Runtime::new(RuntimeConfig::default()).with_board(Arc::new(board));
    let (m, wasm) = guest("bme280-telemetry");
    let p = rt.prepare(&m, &wasm).unwrap();
    let mut i = rt.instantiate(&p, None).unwrap();
    assert_eq!(i.init().outcome, Outcome::Finished);
    let mut temps = Vec::new();
    for tick in 0..5u64 {
        now.store(start + tick * 60_000, std::sync::atomic::Ordering::Relaxed);
        let r = i.tick();
        assert_eq!(r.outcome, Outcome::Finished, "{r:?}");
        assert_eq!(r.messages.len(), 1, "{r:?}");
        assert_eq!(r.messages[0].topic, "bme280/reading");
        let v: serde_json::Value = serde_json::from_slice(&r.messages[0].payload).unwrap();
        let (t, p, h) = (
            v["temperature_c"].as_f64().unwrap(),
            v["pressure_pa"].as_f64().unwrap(),
            v["humidity_pct"].as_f64().unwrap(),
        );
        let target = sim::Bme280Sim::target_at(start + tick * 60_000);
        assert!((t - target.temperature_c).abs() < 0.1, "{t} vs {target:?}");
        assert!((p - target.pressure_pa).abs() < 10.0, "{p} vs {target:?}");
        assert!((h - target.humidity_pct).abs() < 0.5, "{h} vs {target:?}");
        assert!(
            (18.0..24.0).contains(&t)
                && (100_000.0..102_500.0).contains(&p)
                && (35.0..55.0).contains(&h)
        );
        temps.push(t);
    }
    assert!(
        temps.windows(2).any(|w| w[0] != w[1]),
        "the readings change: {temps:?}"
    );
}

#[test]
fn bme280_telemetry_without_its_i2c_grant_is_refused_at_install() {
    let (mut m, wasm) = guest("bme280-telemetry");
    m.caps.i2c.clear();
    match sim_runtime().prepare(&m, &wasm) {
        Err(InstallError::RefusedImport { import, .. }) => {
            assert!(import.starts_with("edge.i2c_"), "{import}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn blinky_toggles_the_simulated_led() {
    let board = Arc::new(Board::open(&HardwareConfig::simulated(), Arc::new(|| 0)));
    let rt = Runtime::new(RuntimeConfig::default()).with_board(Arc::clone(&board));
    let (m, wasm) = guest("blinky");
    let p = rt.prepare(&m, &wasm).unwrap();
    let mut i = rt.instantiate(&p, None).unwrap();
    assert!(i.init().outcome.is_finished());
    let led = board.sim_line(17).unwrap();
    let mut levels = Vec::new();
    for _ in 0..4 {
        assert!(i.tick().outcome.is_finished());
        levels.push(led.level());
    }
    assert_eq!(levels, [true, false, true, false]);
    assert!(led.toggles() >= 4);
}

/// The simulated board in an agent's configuration.
const SIM_BOARD: &str = r#"
[[hardware.gpio]]
line = 17
backend = "sim-led"

[[hardware.i2c]]
bus = 1
backend = "sim"
devices = [{ address = 0x76, kind = "bme280" }]
"#;

#[test]
fn an_agent_refuses_a_second_module_driving_the_same_line_and_runs_its_sensor_module() {
    use crate::support::{Agent, AgentSetup, Mosquitto, Observer, Operator, Seen};
    use edge_agent::core::protocol::EventKind;

    let broker = Mosquitto::start();
    let url = broker.url();
    let op = Operator::new(1);
    let obs = Observer::connect(&url);
    let _agent = Agent::start(&AgentSetup::new("pi-hw", &url).toml(SIM_BOARD), &op);
    obs.status(0, "pi-hw", "online", |s| s.online);

    let sign = |name: &str, wasm_of: &str| {
        let (mut m, _) = guest(wasm_of);
        m.name = name.to_string();
        m.limits.tick_interval_ms = 100;
        crate::support::signed(m, &guest(wasm_of).1, &op.key)
    };
    let m = obs.mark();
    obs.deploy("pi-hw", "blinky", &sign("blinky", "blinky"));
    obs.event(m, "pi-hw", EventKind::Installed, "blinky");
    // Another module granted the same output line: refused, with the owner named.
    obs.deploy("pi-hw", "blinky-two", &sign("blinky-two", "blinky"));
    let rejected = obs.event(m, "pi-hw", EventKind::Rejected, "blinky-two");
    let reason = rejected.reason.unwrap_or_default();
    assert!(
        reason.contains("gpio line 17") && reason.contains("\"blinky\""),
        "{reason}"
    );
    // The sensor module on the same board runs and publishes.
    obs.deploy(
        "pi-hw",
        "bme280-telemetry",
        &sign("bme280-telemetry", "bme280-telemetry"),
    );
    obs.event(m, "pi-hw", EventKind::Installed, "bme280-telemetry");
    let reading = obs.wait(m, "a BME280 reading", |seen| match seen {
        Seen::Telemetry {
            module,
            topic,
            payload,
            ..
        } if module == "bme280-telemetry" && topic == "bme280/reading" => Some(payload.clone()),
        _ => None,
    });
    let v: serde_json::Value = serde_json::from_slice(&reading).unwrap();
    let t = v["temperature_c"].as_f64().unwrap();
    assert!((18.0..24.0).contains(&t), "{t}");
}

/// The simulated board with line 17's safe level set to `safe`.
fn board_with_safe(safe: edge_agent::hal::SafeLevel) -> Board {
    let mut config = HardwareConfig::simulated();
    config.gpio.iter_mut().find(|g| g.line == 17).unwrap().safe = safe;
    Board::open(&config, Arc::new(|| 0))
}

fn drive(board: &Board, line: u32, high: bool) {
    let (_, dev) = board.gpio(line).unwrap();
    dev.lock().unwrap().set(high).unwrap();
}

#[test]
fn an_output_no_module_owns_goes_to_its_safe_level() {
    use edge_agent::hal::SafeLevel;
    let caps = caps("gpio = [17]").caps;
    for (safe, after) in [
        (SafeLevel::Low, Some(false)),
        (SafeLevel::High, Some(true)),
        (SafeLevel::Keep, None),
    ] {
        let board = board_with_safe(safe);
        if safe == SafeLevel::High {
            assert!(board.sim_line(17).unwrap().level(), "safe at start too");
        }
        board.claim_outputs("relay", &caps).unwrap();
        assert_eq!(board.owner(17).as_deref(), Some("relay"));
        // The module drives the relay on, then is removed (quarantined, rolled back, ...).
        drive(&board, 17, safe != SafeLevel::High);
        let driven = board.sim_line(17).unwrap().level();
        board.release("relay");
        assert_eq!(board.owner(17), None);
        assert_eq!(
            board.sim_line(17).unwrap().level(),
            after.unwrap_or(driven),
            "{safe:?}"
        );
    }
    // An upgrade that no longer grants the line lets it go too.
    let board = board_with_safe(SafeLevel::Low);
    board.claim_outputs("relay", &caps).unwrap();
    drive(&board, 17, true);
    board.claim_outputs("relay", &self::caps("").caps).unwrap();
    assert!(!board.sim_line(17).unwrap().level());
}
