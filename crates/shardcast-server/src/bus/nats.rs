//! The NATS bus session, on `async-nats`: one connection, one `Subscriber` per subject, each
//! drained by a small task into the shared inbound handler. async-nats writes commands from
//! its queue in batches, so consecutive publishes and subscribes share writes. Its `flush`
//! only says the bytes were written, not that the server has the `SUB`s: after a batch of
//! subscribes the session publishes to its own sync subject and waits for that message to
//! come back, which the server does only after handling everything sent before it.
//!
//! async-nats's own reconnection is cut short: a disconnect ends the session and the bus task
//! (`mod.rs`) builds a new one and resubscribes, as for Redis. Naming, envelopes and delivery
//! live there.

use std::collections::HashMap;
use std::sync::Arc;

use async_nats::{Client, ConnectOptions, Event, Subscriber};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{BusError, BusUrl, COMMAND_TIMEOUT, Inbound};

/// Messages async-nats holds per subscription before it drops them as a slow consumer.
const SUBSCRIPTION_BUFFER: usize = 1 << 16;

pub(super) struct Session {
    client: Client,
    inbound: Inbound,
    /// Set by the event callback once the connection is lost.
    lost: watch::Receiver<bool>,
    /// One reader per subscribed subject; aborting it drops its `Subscriber`, which sends
    /// the `UNSUB`.
    readers: HashMap<String, JoinHandle<()>>,
    /// A subject only this session subscribes to, and its subscription: see the module doc.
    sync_subject: String,
    sync: Subscriber,
    /// Sequence of the last sync message sent; only its echo ends a wait.
    sync_seq: u64,
}

impl Session {
    pub(super) async fn connect(url: &BusUrl, inbound: Inbound) -> Result<Self, BusError> {
        let fail = |e: &dyn std::fmt::Display| BusError::Connect {
            url: url.redacted(),
            reason: e.to_string(),
        };
        let (tx, lost) = watch::channel(false);
        let tx = Arc::new(tx);
        let client = ConnectOptions::new()
            .connection_timeout(COMMAND_TIMEOUT)
            .subscription_capacity(SUBSCRIPTION_BUFFER)
            // One attempt after a loss at most; the session is already given up by then.
            .max_reconnects(1)
            .event_callback(move |event| {
                if matches!(event, Event::Disconnected | Event::Closed) {
                    tx.send_replace(true);
                }
                async {}
            })
            .connect(url.as_str())
            .await
            .map_err(|e| fail(&e))?;
        let sync_subject = format!("{}.sync", inbound.naming.probe);
        let sync = client
            .subscribe(sync_subject.clone())
            .await
            .map_err(|e| fail(&e))?;
        Ok(Self {
            client,
            inbound,
            lost,
            readers: HashMap::new(),
            sync_subject,
            sync,
            sync_seq: 0,
        })
    }

    /// Returns once the server has handled every command this session sent before: a
    /// message to the sync subject comes back only after them (one connection is handled
    /// in order).
    async fn sync(&mut self) -> Result<(), String> {
        self.sync_seq += 1;
        let want = self.sync_seq.to_be_bytes();
        self.client
            .publish(self.sync_subject.clone(), Bytes::copy_from_slice(&want))
            .await
            .map_err(|e| e.to_string())?;
        loop {
            match self.sync.next().await {
                Some(msg) if msg.payload[..] == want => return Ok(()),
                Some(_) => continue, // the echo of an earlier, abandoned wait
                None => return Err("the sync subscription ended".into()),
            }
        }
    }

    pub(super) async fn subscribe(&mut self, subjects: Vec<String>) -> Result<(), String> {
        for subject in subjects {
            let mut sub = self
                .client
                .subscribe(subject.clone())
                .await
                .map_err(|e| e.to_string())?;
            let inbound = self.inbound.clone();
            let reader = tokio::spawn(async move {
                while let Some(msg) = sub.next().await {
                    inbound.handle(msg.subject.as_str(), &msg.payload).await;
                }
            });
            if let Some(old) = self.readers.insert(subject, reader) {
                old.abort();
            }
        }
        self.sync().await
    }

    pub(super) async fn unsubscribe(&mut self, subjects: Vec<String>) -> Result<(), String> {
        for subject in subjects {
            if let Some(reader) = self.readers.remove(&subject) {
                reader.abort();
            }
        }
        // Nothing to confirm: a message that still arrives finds no interest and is dropped.
        Ok(())
    }

    /// Queues the batch on the connection in order; async-nats writes it out in batches.
    pub(super) async fn publish(&mut self, batch: Vec<(String, Bytes)>) -> Result<(), String> {
        for (subject, envelope) in batch {
            self.client
                .publish(subject, envelope)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    pub(super) async fn closed(&mut self) {
        // An error means the callback (and so the client) is gone: that is a loss too.
        let _ = self.lost.wait_for(|lost| *lost).await;
    }

    pub(super) async fn close(self) {
        drop(self);
    }
}

impl Drop for Session {
    /// The readers hold the subscribers, which keep the connection open; ending them with the
    /// client closes it, also when the bus task is aborted at shutdown.
    fn drop(&mut self) {
        for reader in self.readers.values() {
            reader.abort();
        }
    }
}
