//! The NATS bus session, on `async-nats`: one connection, one `Subscriber` per subject, each
//! drained by a small task into the shared inbound handler. async-nats writes commands from
//! its queue in batches, so consecutive publishes and subscribes share writes. Its `flush`
//! only says the bytes were written, not that the server has the `SUB`s: after a batch of
//! subscribes the session publishes to its own sync subject and waits for that message to
//! come back, which the server does only after handling everything sent before it.
//!
//! Credentials: `nats://user:password@host:port` (user and password), `nats://token@host:port`
//! (a token), or `--bus-creds-file` (a user JWT and nkey seed, as `nsc` writes them); the URL's
//! are percent-decoded here and never passed on in the URL, which async-nats would not read.
//! TLS: `tls://` requires it; `nats://` gets it when the server requires it; either way the
//! server is verified against `--bus-ca-file`, else the system's roots.
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

use super::{BusConfig, BusError, BusUrl, COMMAND_TIMEOUT, Inbound};

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
    pub(super) async fn connect(bus: &BusConfig, inbound: Inbound) -> Result<Self, BusError> {
        let url = &bus.url;
        let fail = |e: &dyn std::fmt::Display| BusError::Connect {
            url: url.redacted(),
            reason: e.to_string(),
        };
        let (tx, lost) = watch::channel(false);
        let tx = Arc::new(tx);
        let mut options = match credentials(url).map_err(|e| fail(&e))? {
            Credentials::None => ConnectOptions::new(),
            Credentials::UserPassword(user, password) => {
                ConnectOptions::new().user_and_password(user, password)
            }
            Credentials::Token(token) => ConnectOptions::new().token(token),
        };
        if url.tls {
            options = options.require_tls(true);
        }
        if let Some(path) = &bus.ca_file {
            options = options.add_root_certificates(path.clone());
        }
        if let Some(path) = &bus.creds_file {
            let creds = read_creds(path).map_err(|e| fail(&e))?;
            options = options.credentials(&creds).map_err(|e| fail(&e))?;
        }
        let client = options
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
            .connect(url.without_userinfo())
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

/// How a NATS URL authenticates.
#[derive(Debug, PartialEq, Eq)]
enum Credentials {
    None,
    /// `nats://user:password@host:port`.
    UserPassword(String, String),
    /// `nats://token@host:port`.
    Token(String),
}

/// The credentials in `url`, percent-decoded.
fn credentials(url: &BusUrl) -> Result<Credentials, String> {
    let Some(userinfo) = url.userinfo() else {
        return Ok(Credentials::None);
    };
    Ok(match userinfo.split_once(':') {
        Some((user, password)) => {
            Credentials::UserPassword(percent_decode(user)?, percent_decode(password)?)
        }
        None => Credentials::Token(percent_decode(userinfo)?),
    })
}

/// Decodes `%XX` escapes (a `+` stays a `+`, as in any URL's userinfo).
fn percent_decode(s: &str) -> Result<String, String> {
    let bad = || "the credentials of the bus URL have an invalid %-escape".to_string();
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b != b'%' {
            out.push(b);
            continue;
        }
        let hex = [bytes.next().ok_or_else(bad)?, bytes.next().ok_or_else(bad)?];
        let hex = std::str::from_utf8(&hex).map_err(|_| bad())?;
        out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
    }
    String::from_utf8(out).map_err(|_| bad())
}

/// Reads and checks a NATS credentials file (`--bus-creds-file`): a user JWT and the nkey
/// seed that signs the server's nonce. Errors name the file, never its content.
pub(super) fn read_creds(path: &std::path::Path) -> Result<String, String> {
    let bad = |why: &dyn std::fmt::Display| format!("--bus-creds-file {}: {why}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| bad(&e))?;
    ConnectOptions::new()
        .credentials(&text)
        .map_err(|_| bad(&"not a NATS credentials file (a user JWT and an nkey seed)"))?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(url: &str) -> Credentials {
        credentials(&url.parse().expect("a valid bus URL")).expect("readable credentials")
    }

    #[test]
    fn url_credentials_are_a_user_and_password_or_a_token() {
        assert_eq!(creds("nats://127.0.0.1:4222"), Credentials::None);
        assert_eq!(
            creds("tls://app:p%40ss%3Aw+x@h:4222"),
            Credentials::UserPassword("app".into(), "p@ss:w+x".into())
        );
        assert_eq!(
            creds("nats://s3cr%2Ft@h:4222"),
            Credentials::Token("s3cr/t".into())
        );
        let bad: BusUrl = "nats://a%zz@h:4222".parse().expect("a valid bus URL");
        assert!(credentials(&bad).unwrap_err().contains("%-escape"));
        let url: BusUrl = "tls://app:pw@h:4222".parse().expect("a valid bus URL");
        assert_eq!(url.without_userinfo(), "tls://h:4222");
    }

    /// A creds file as `nsc` writes it is read; anything else is refused without its
    /// content in the error.
    #[test]
    fn creds_files_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = dir.path().join("user.creds");
        // The seed is the example one of async-nats's documentation; the JWT part is only
        // carried, not checked, by the client.
        std::fs::write(
            &good,
            "-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJqd3QiLCJhbGciOiJlZDI1NTE5In0.e30.c2ln\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\n\
             -----BEGIN USER NKEY SEED-----\nSUAIO3FHUX5PNV2LQIIP7TZ3N4L7TX3W53MQGEIVYFIGA635OZCKEYHFLM\n------END USER NKEY SEED------\n",
        )
        .expect("write creds");
        read_creds(&good).expect("a valid creds file");
        let bad = dir.path().join("bad.creds");
        std::fs::write(&bad, "SUAsecretseed").expect("write");
        let err = read_creds(&bad).unwrap_err();
        assert!(err.contains("not a NATS credentials file"), "{err}");
        assert!(!err.contains("SUAsecretseed"));
        let missing = read_creds(&dir.path().join("none.creds")).unwrap_err();
        assert!(missing.contains("none.creds"), "{missing}");
    }
}
