//! The group committer: makes key-value writes durable for every runner that asks, one store
//! flush (sled's flush plus an fsync) for all requests that arrived while the previous one ran,
//! and at most one flush per `interval`: the guarantee of docs/abi.md ("a guest call's writes are
//! durable before anything it published leaves the device and before its next call") at a
//! bounded number of fsyncs per second, whatever the number of modules — an SD card's wear
//! follows the flushes, not the writes.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::store::Store;

/// Serves commit requests until every sender is gone. `broken` is told once if a flush fails
/// (the store refuses everything afterwards; the agent stops).
pub async fn run(
    store: Arc<Store>,
    mut requests: mpsc::Receiver<oneshot::Sender<Result<(), String>>>,
    interval: Duration,
    broken: impl Fn(String) + Send + 'static,
) {
    let mut last: Option<Instant> = None;
    let mut told = false;
    while let Some(first) = requests.recv().await {
        if let Some(at) = last {
            tokio::time::sleep_until(at + interval).await;
        }
        let mut waiting = vec![first];
        while let Ok(more) = requests.try_recv() {
            waiting.push(more);
        }
        last = Some(Instant::now());
        let s = Arc::clone(&store);
        let result = match tokio::task::spawn_blocking(move || s.flush()).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = &result
            && !told
        {
            told = true;
            broken(e.clone());
        }
        for w in waiting {
            let _ = w.send(result.clone());
        }
    }
}
