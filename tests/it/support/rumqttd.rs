//! The embedded rumqttd broker, for the tests that need a second broker implementation.

use super::*;
use std::net::SocketAddr;

/// Starts rumqttd (MQTT 3.1.1) in this process on a thread and returns its port once it accepts
/// connections. rumqttd has no way to stop it: it lives until the test process ends.
pub fn start_rumqttd() -> u16 {
    use std::collections::HashMap;

    let port = free_port();
    let connections = ::rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: 8 << 20,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = ::rumqttd::ServerSettings {
        name: "v4".into(),
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    let config = ::rumqttd::Config {
        id: 0,
        router: ::rumqttd::RouterConfig {
            max_connections: 100,
            max_outgoing_packet_count: 200,
            max_segment_size: 16 << 20,
            max_segment_count: 10,
            ..Default::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name(format!("rumqttd-{port}"))
        .spawn(move || {
            let mut broker = ::rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                eprintln!("rumqttd on port {port} stopped: {e}");
            }
        })
        .unwrap();
    poll(START, "rumqttd to accept connections", || {
        listening(port).then_some(())
    });
    port
}
