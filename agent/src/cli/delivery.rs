//! What `edgectl deploy` (chunked delivery) and `edgectl gc` do with the broker beyond one
//! publish: list retained messages, publish many messages pipelined, read a retained message back.

use std::time::Duration;

use rumqttc::{Event, Packet, QoS, SubscribeFilter};

use super::common::{CliError, FleetError};
use super::fleet::Session;
use crate::core::manifest::Sha256;

/// Publishes in flight at once (below rumqttc's default window of 100 and the request channel's
/// capacity of 64, so that queuing a request never waits for the event loop).
const WINDOW: usize = 32;
/// Filters per SUBSCRIBE packet, at least: 4,096 chunk topics make at most 32 packets.
const FILTERS_PER_SUBSCRIBE: usize = 128;
/// How long the broker may stay silent while edgectl waits for acknowledgements or for its
/// probe message.
const SILENCE: Duration = Duration::from_secs(20);

/// A random lower-case hex suffix (client ids, probe topics).
pub(crate) fn random_hex() -> String {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    hex::encode(b)
}

/// Hint appended to errors where a broker dropped a message or the connection over its size.
pub(crate) fn size_hint(bytes: usize) -> String {
    format!(
        "the broker did not keep the {bytes}-byte message: its message size limit (mosquitto \
         `message_size_limit`, AWS IoT Core 128 KiB) is probably below it; use a smaller \
         --max-packet-bytes so that the bundle travels in chunks"
    )
}

impl Session {
    fn fail(&self, reason: impl std::fmt::Display) -> CliError {
        FleetError::Broker {
            broker: self.broker.clone(),
            reason: reason.to_string(),
        }
        .into()
    }

    /// Polls the event loop once, failing after [`SILENCE`] without any event.
    async fn next_event(&mut self, waiting_for: &str) -> Result<Event, CliError> {
        match tokio::time::timeout(SILENCE, self.eventloop.poll()).await {
            Ok(Ok(event)) => Ok(event),
            Ok(Err(e)) => Err(self.fail(format!("{e} (while waiting for {waiting_for})"))),
            Err(_) => Err(self.fail(format!(
                "no answer within {} s while waiting for {waiting_for}",
                SILENCE.as_secs()
            ))),
        }
    }

    /// Every retained message on `filters`, handed to `each` (topic, payload) as it arrives,
    /// one at a time (never all held). Subscribes in batches, then to a unique probe topic, and
    /// publishes one message there: the broker delivers to a client in order, so once the probe
    /// comes back every retained message of the earlier subscriptions has been delivered. The
    /// caller closes the session afterwards (that ends the subscriptions).
    pub(crate) async fn retained(
        &mut self,
        prefix: &str,
        filters: Vec<String>,
        mut each: impl FnMut(&str, &[u8]),
    ) -> Result<(), CliError> {
        let probe = format!("{prefix}/edgectl/probe/{}", random_hex());
        let nonce = random_hex().into_bytes();
        let per_packet = FILTERS_PER_SUBSCRIBE.max(filters.len().div_ceil(32));
        for batch in filters.chunks(per_packet) {
            let batch = batch
                .iter()
                .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
            self.client
                .subscribe_many(batch)
                .await
                .map_err(|e| self.fail(e))?;
        }
        self.client
            .subscribe(probe.clone(), QoS::AtLeastOnce)
            .await
            .map_err(|e| self.fail(e))?;
        self.client
            .publish(probe.clone(), QoS::AtLeastOnce, false, nonce.clone())
            .await
            .map_err(|e| self.fail(e))?;
        let waiting = format!("the probe message on {probe} (may this client use that topic?)");
        loop {
            if let Event::Incoming(Packet::Publish(p)) = self.next_event(&waiting).await? {
                if p.topic == probe {
                    if p.payload[..] == nonce[..] {
                        return Ok(());
                    }
                } else {
                    each(&p.topic, &p.payload);
                }
            }
        }
    }

    /// Publishes `messages` (QoS 1) pipelined, at most [`WINDOW`] unacknowledged at a time, and
    /// waits until the broker acknowledged them all. Returns how many were sent.
    pub(crate) async fn publish_all(
        &mut self,
        messages: impl IntoIterator<Item = (String, Vec<u8>)>,
        retain: bool,
    ) -> Result<usize, CliError> {
        let mut messages = messages.into_iter().peekable();
        let (mut sent, mut acked) = (0usize, 0usize);
        loop {
            while sent - acked < WINDOW {
                let Some((topic, payload)) = messages.next() else {
                    break;
                };
                self.client
                    .publish(topic, QoS::AtLeastOnce, retain, payload)
                    .await
                    .map_err(|e| self.fail(e))?;
                sent += 1;
            }
            if acked == sent && messages.peek().is_none() {
                return Ok(sent);
            }
            let waiting = format!("the broker's acknowledgement of {} messages", sent - acked);
            if let Event::Incoming(Packet::PubAck(_)) = self.next_event(&waiting).await? {
                acked += 1;
            }
        }
    }

    /// The digest and length of the message retained on `topic` (`None`: nothing is), asked
    /// with a probe as [`Session::retained`] does, so the answer needs no timeout.
    pub(crate) async fn read_back(
        &mut self,
        prefix: &str,
        topic: &str,
    ) -> Result<Option<(Sha256, usize)>, CliError> {
        let mut seen = None;
        self.retained(prefix, vec![topic.to_string()], |t, payload| {
            if t == topic {
                seen = Some((Sha256::of(payload), payload.len()));
            }
        })
        .await?;
        Ok(seen)
    }

    /// Disconnects cleanly (what was acknowledged stays on the broker either way).
    pub(crate) async fn close(mut self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while self.eventloop.poll().await.is_ok() {}
        })
        .await;
    }
}
