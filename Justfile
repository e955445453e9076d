# Every recipe a developer or operator needs. `just` alone runs `check`.

set shell := ["bash", "-euo", "pipefail", "-c"]

# fmt, clippy with warnings denied, all tests
default: check

# fmt, clippy with warnings denied, all tests
check: lint test

# install what the tests need (Debian packages, Rust targets)
setup:
    tests/setup

# every test (installs what they need first)
test:
    tests/run-all

# formatting and clippy with warnings denied
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets --locked -- -D warnings
    cd modules/guests && cargo fmt -- --check && cargo clippy --locked -- -D warnings

# format the code
fmt:
    cargo fmt --all

# dependency policy: licenses, duplicate versions, sources (advisories need GitHub access)
deny *checks="bans licenses sources":
    cargo deny check {{checks}}

# build every fuzz target on stable and run each for SECONDS
fuzz-smoke SECONDS="30":
    tests/fuzz-smoke {{SECONDS}}

# fuzz one target for real with cargo-fuzz (needs nightly and `cargo install cargo-fuzz`)
fuzz TARGET="verify_bundle" *ARGS:
    cd agent && cargo +nightly fuzz run {{TARGET}} fuzz/seeds/{{TARGET}} {{ARGS}}

# the store's power-cut test (tests/powercut) with CUTS cut points over a recording of OPS
# operations, strict and torn models, and the fsyncs per operation; needs /dev/fuse and root
powercut CUTS="2000" OPS="300" SECONDS="1800":
    EDGE_POWERCUT_CUTS={{CUTS}} EDGE_POWERCUT_OPS={{OPS}} EDGE_POWERCUT_SECONDS={{SECONDS}} \
      cargo test --locked -p powercut --test powercut -- --nocapture

# release build of the agent and edgectl for this machine
build:
    cargo build --release --locked -p edge-agent

# build the guest modules (Rust and C) into target/modules
modules:
    modules/build

# benchmarks: runtime (cold start, fuel overhead, host calls, memory per module), containment
# (host-call prices against plain Wasm, the worst call at the default limits, peak memory of
# checking hostile structures, RSS across 1,000 upgrades), daemon (deploy latency against an
# MQTT round trip, agent RSS; needs mosquitto), chunking (bytes a device downloads per install and
# per one-function upgrade at 4/16/64 KiB average chunks, cutting time against SHA-256), delivery
# (a 1 MiB module to the release agent in one message and in chunks, first install and
# one-function upgrade: time and bytes on the wire, as ratios; needs mosquitto) and peers
# (CPU-heavy guests: the agent's throughput over wasm3's, goal >= 1.40x, and over wasmtime's, with
# plain wasmi fuel on and off;
# peers-setup pip-installs pinned pywasm3 and wasmtime into target/bench-venv, and an engine it
# could not install is reported as not measured, with why). The store's power-cut test with many
# more cut points than `cargo test` checks, and its fsyncs per operation: `just powercut`.
bench: modules
    cargo build --release --locked -p edge-agent
    cargo bench --locked -p edge-agent --bench runtime
    cargo bench --locked -p edge-agent --bench containment
    cargo bench --locked -p edge-agent --bench daemon
    cargo bench --locked -p edge-agent --bench chunking
    cargo bench --locked -p edge-agent --bench delivery
    -agent/benches/peers-setup
    cargo bench --locked -p edge-agent --bench peers

# release build of edge-agent and edgectl for an ARM target, without Docker (Debian's cross gcc)
cross TARGET="aarch64-unknown-linux-gnu":
    rustup target add {{TARGET}}
    cargo build --release --locked --config cross/cargo.toml --config cross/release.toml --target {{TARGET}} -p edge-agent --bins
    ls -l target/{{TARGET}}/release/edge-agent target/{{TARGET}}/release/edgectl

# the agent's unit and integration tests for an ARM target under qemu-user (brokers on the host)
test-arm TARGET="aarch64-unknown-linux-gnu":
    cross/test-arm {{TARGET}}

# the Debian package for a target (arm64 for aarch64, armhf for armv7) into target/deb/
deb TARGET="aarch64-unknown-linux-gnu":
    cross/build-deb {{TARGET}}

# full-system tests in QEMU, images made from Debian's packages (tests/system/): the .deb under
# systemd in an x86_64 Debian guest (notify, deploy, telemetry, BME280 on i2c-stub, watchdog,
# reload, stop, reboot without broker) and blinky on a PL061 GPIO line under Debian's arm64
# kernel; needs root; EDGE_SYSTEM_NO_KVM=1 forces TCG.
test-system:
    tests/system/run

# checks of the systemd unit: verify (no output allowed) and the offline security rating
systemd-check:
    cargo test --locked -p edge-agent --test it systemd
