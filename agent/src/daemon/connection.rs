//! The MQTT connection task: owns rumqttc's event loop, subscribes on every (re)connect, turns
//! incoming packets into supervisor inputs, and reconnects with capped exponential backoff and
//! jitter when the broker goes away. Before each (re)connect it registers the newest last will
//! (the status as the supervisor last reported it, offline).

use std::time::Duration;

use rumqttc::{EventLoop, LastWill, Packet, QoS, Request, Subscribe, SubscribeFilter};
use tokio::sync::{mpsc, watch};

use super::Input as Event;

/// Reconnect delays.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// First delay.
    pub min: Duration,
    /// Longest delay.
    pub max: Duration,
}

/// A delay in `[d/2, d]`: jitter so that a fleet does not reconnect in lockstep after a broker
/// restart (mosquitto's listen backlog overflows when a thousand clients arrive at once).
fn jittered(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    // Without a random source the delay is simply not jittered.
    let _ = getrandom::fill(&mut b);
    let frac = f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX);
    d.mul_f64(0.5 + frac / 2.0)
}

/// Runs until `stop` turns true (after the final publishes are flushed) or the supervisor goes.
pub async fn run(
    mut eventloop: EventLoop,
    subscriptions: watch::Receiver<Vec<String>>,
    will: watch::Receiver<LastWill>,
    backoff: Backoff,
    events: mpsc::Sender<Event>,
    mut stop: watch::Receiver<bool>,
) {
    let mut delay = backoff.min;
    loop {
        if eventloop.network.is_none() {
            // About to (re)connect: the will the broker keeps for this session is the newest.
            let will = will.borrow().clone();
            if !will.message.is_empty() {
                eventloop.mqtt_options.set_last_will(will);
            }
        }
        let polled = tokio::select! {
            polled = eventloop.poll() => polled,
            _ = stop.changed() => {
                drain(&mut eventloop).await;
                return;
            }
        };
        match polled {
            Ok(rumqttc::Event::Incoming(Packet::ConnAck(_))) => {
                delay = backoff.min;
                // Subscribe ahead of the client's request queue: after a long outage it can be
                // full of telemetry (a `try_subscribe` would fail and leave the agent deaf to its
                // fleet), and waiting on it here would deadlock, since this loop drains it. The
                // event loop sends `pending` first; a clean session has just emptied it.
                let filters = subscriptions
                    .borrow()
                    .clone()
                    .into_iter()
                    .map(|topic| SubscribeFilter::new(topic, QoS::AtLeastOnce));
                eventloop
                    .pending
                    .push_front(Request::Subscribe(Subscribe::new_many(filters)));
                if events.send(Event::Connected).await.is_err() {
                    return;
                }
            }
            Ok(rumqttc::Event::Incoming(Packet::Publish(p))) => {
                let event = Event::Message {
                    topic: p.topic,
                    payload: p.payload.to_vec(),
                };
                if events.send(event).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                if events
                    .send(Event::Disconnected(e.to_string()))
                    .await
                    .is_err()
                {
                    return;
                }
                let wait = jittered(delay);
                delay = (delay * 2).min(backoff.max);
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

/// Sends what is queued (the final offline status, the disconnect) for at most two seconds.
async fn drain(eventloop: &mut EventLoop) {
    let deadline = tokio::time::sleep(Duration::from_secs(2));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = &mut deadline => return,
            polled = eventloop.poll() => match polled {
                Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => return,
                Ok(_) => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_half_to_all_of_the_delay() {
        for _ in 0..100 {
            let d = jittered(Duration::from_millis(1000));
            assert!(
                d >= Duration::from_millis(500) && d <= Duration::from_millis(1000),
                "{d:?}"
            );
        }
    }
}
