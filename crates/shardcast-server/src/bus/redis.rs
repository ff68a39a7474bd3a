//! The Redis and Redis Cluster bus sessions, on `fred`. One session is two connections (or
//! two per cluster primary): a subscriber, which RESP2 puts in pub/sub mode, and a publisher
//! that sends each batch as one pipeline. Standalone Redis uses `PUBLISH`/`SUBSCRIBE`; a
//! cluster uses sharded pub/sub (`SPUBLISH`/`SSUBSCRIBE`, Redis 7+), so a message travels
//! only within the shard that owns its channel's slot.
//!
//! Over TLS (`rediss://`, `rediss+cluster://`) every connection, to the seeds and to the
//! primaries a cluster announces, is verified with rustls (ring) against `--bus-ca-file` or
//! the system's roots; the server name checked is the host as given or as announced, so a
//! cluster's certificates must name the addresses the cluster announces (often IPs).
//!
//! fred's own reconnection is off: when a connection drops, the session ends and the bus task
//! (`mod.rs`) builds a new one and resubscribes. Naming, envelopes and delivery live there.

use bytes::Bytes;
use fred::prelude::{
    Builder, Client, ClientLike, ClusterInterface, Config, EventInterface, PubsubInterface,
    ServerConfig,
};
use fred::types::config::{TlsConfig, TlsConnector};
use fred::types::{ConnectHandle, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;

use super::{BusConfig, BusError, BusKind, BusUrl, COMMAND_TIMEOUT, Inbound, Probe};

/// Pub/sub messages fred may hold for the reader before the oldest are lost (counted as
/// rejected). The reader hands each straight to the shards, so this absorbs bursts only.
/// fred's broadcast channels allocate every slot up front, so this is also fixed memory:
/// measured, 8192 costs about 2 MiB of RSS where 65536 cost about 70 MiB.
const MESSAGE_BUFFER: usize = 8192;
/// The publisher receives no pub/sub messages; its event channels stay small.
const PUBLISHER_EVENTS: usize = 32;

pub(super) struct Session {
    cluster: bool,
    publisher: Client,
    subscriber: Client,
    /// The two connection tasks; either one ending means the session is lost.
    tasks: [ConnectHandle; 2],
    reader: JoinHandle<()>,
}

fn reason(e: fred::error::Error) -> String {
    e.to_string()
}

impl Session {
    pub(super) async fn connect(bus: &BusConfig, inbound: Inbound) -> Result<Self, BusError> {
        let url = &bus.url;
        let fail = |reason: String| BusError::Connect {
            url: url.redacted(),
            reason,
        };
        let cluster = url.kind == BusKind::RedisCluster;
        let mut config = config(url).map_err(|e| fail(reason(e)))?;
        if url.tls {
            config.tls = Some(tls(bus).map_err(fail)?);
        }
        // No reconnect policy: a lost connection ends the session (see the module doc).
        let build = |events: usize| {
            let mut builder = Builder::from_config(config.clone());
            builder
                .with_connection_config(|c| {
                    c.connection_timeout = COMMAND_TIMEOUT;
                    c.internal_command_timeout = COMMAND_TIMEOUT;
                    c.max_command_attempts = 1;
                    // Closing a connection resets it (SO_LINGER 0): the kernel discards what
                    // it still holds to send. Without it, publishes written before a
                    // partition outlive a session given up on it: the kernel retransmits
                    // them, and once the network heals Redis executes them, seconds late,
                    // after newer ones, although the node counted them as dropped.
                    c.tcp.linger = Some(Duration::ZERO);
                })
                .with_performance_config(|p| {
                    // No fred timeout: the bus task bounds every command itself and counts
                    // one left unanswered as a stall. A fred timeout, firing first, would end
                    // the session as a plain command failure and hide the stall.
                    p.default_command_timeout = Duration::ZERO;
                    p.broadcast_channel_capacity = events;
                });
            builder.build().map_err(|e| fail(reason(e)))
        };
        let publisher = build(PUBLISHER_EVENTS)?;
        let subscriber = build(MESSAGE_BUFFER)?;
        let mut messages = subscriber.message_rx();
        let p = publisher.init().await.map_err(|e| fail(reason(e)))?;
        let s = match subscriber.init().await {
            Ok(s) => s,
            Err(e) => {
                p.abort();
                return Err(fail(reason(e)));
            }
        };
        let reader = tokio::spawn(async move {
            loop {
                match messages.recv().await {
                    Ok(msg) => {
                        let bytes: &[u8] = match &msg.value {
                            Value::Bytes(b) => b,
                            Value::String(s) => s.as_bytes(),
                            _ => &[],
                        };
                        inbound.handle(&msg.channel, bytes).await;
                    }
                    Err(RecvError::Lagged(n)) => {
                        inbound
                            .bus
                            .reject_n(n, &"messages lost: the reader fell behind");
                    }
                    Err(RecvError::Closed) => break,
                }
            }
        });
        Ok(Self {
            cluster,
            publisher,
            subscriber,
            tasks: [p, s],
            reader,
        })
    }

    pub(super) async fn subscribe(&mut self, channels: Vec<String>) -> Result<(), String> {
        if !self.cluster {
            self.subscriber.subscribe(channels).await.map_err(reason)?;
            // fred resolves SUBSCRIBE once it is written, not once Redis has it: its replies
            // come out of band. Redis answers a connection's commands in order, so the PING's
            // reply means the subscriptions are in effect. Without it, the first probe (on the
            // publisher connection) can reach Redis before the SUBSCRIBE, be lost and be taken
            // for a stall; a handshake waiting for its topic's subscription could likewise
            // go on before that subscription is live.
            return self.confirm().await;
        }
        // SSUBSCRIBE takes channels of one slot per call: one call per slot, all in flight
        // at once.
        let calls = by_slot(channels)
            .into_values()
            .map(|group| self.subscriber.ssubscribe(group));
        futures_util::future::try_join_all(calls)
            .await
            .map(drop)
            .map_err(reason)
    }

    /// Waits until Redis has processed every command written before on the subscriber
    /// connection. In RESP2 pub/sub mode, Redis answers PING with `["pong", ""]`.
    async fn confirm(&self) -> Result<(), String> {
        self.subscriber
            .ping::<Value>(None)
            .await
            .map(drop)
            .map_err(reason)
    }

    pub(super) async fn unsubscribe(&mut self, channels: Vec<String>) -> Result<(), String> {
        if !self.cluster {
            return self.subscriber.unsubscribe(channels).await.map_err(reason);
        }
        let calls = by_slot(channels)
            .into_values()
            .map(|group| self.subscriber.sunsubscribe(group));
        futures_util::future::try_join_all(calls)
            .await
            .map(drop)
            .map_err(reason)
    }

    /// Sends the batch as one pipeline (per cluster node), in order.
    pub(super) async fn publish(&mut self, batch: Vec<(String, Bytes)>) -> Result<(), String> {
        let pipe = self.publisher.pipeline();
        for (channel, envelope) in batch {
            let queued: Result<(), _> = if self.cluster {
                pipe.spublish(channel, envelope).await
            } else {
                pipe.publish(channel, envelope).await
            };
            queued.map_err(reason)?;
        }
        let replies: Vec<Result<Value, _>> = pipe.try_all().await;
        match replies.into_iter().find_map(Result::err) {
            Some(e) => Err(reason(e)),
            None => Ok(()),
        }
    }

    /// The probe channels: `base`, or on a cluster one per primary of the slot map fred
    /// read at connect, each named `base:{n}` with the first hash tag `n` whose slot that
    /// primary owns. A primary added later gets its probe at the next session.
    pub(super) fn probes(&self, base: &str) -> Vec<Probe> {
        let one = || {
            vec![Probe {
                channel: base.to_string(),
                primary: None,
            }]
        };
        let routing = match self.publisher.cached_cluster_state() {
            Some(routing) if self.cluster => routing,
            _ => return one(),
        };
        let primaries = routing.unique_primary_nodes();
        let mut probes: Vec<Probe> = Vec::with_capacity(primaries.len());
        // A primary owning a share s of the slots is found within a few times 1/s tags; a
        // primary with a single slot takes about 16384. The bound only guards a map that
        // changes under us.
        for n in 0..(1u32 << 20) {
            if probes.len() == primaries.len() {
                break;
            }
            let channel = format!("{base}:{{{n}}}");
            let slot = fred::util::redis_keyslot(channel.as_bytes());
            let Some(primary) = routing.get_server(slot).map(ToString::to_string) else {
                continue;
            };
            if !probes.iter().any(|p| p.primary.as_ref() == Some(&primary)) {
                probes.push(Probe {
                    channel,
                    primary: Some(primary),
                });
            }
        }
        if probes.is_empty() { one() } else { probes }
    }

    pub(super) async fn closed(&mut self) {
        let [p, s] = &mut self.tasks;
        tokio::select! {
            _ = p => {}
            _ = s => {}
        }
    }

    pub(super) async fn close(self) {
        self.reader.abort();
        // QUIT politely, but never wait on a broker that is gone or stalled. Dropping `self`
        // then ends the connection tasks.
        let quit = async {
            let _ = tokio::join!(self.publisher.quit(), self.subscriber.quit());
        };
        let _ = tokio::time::timeout(std::time::Duration::from_millis(100), quit).await;
    }
}

impl Drop for Session {
    /// The connection tasks hold the clients; without this they would outlive the session
    /// (and, when the bus task is aborted at shutdown, the server).
    fn drop(&mut self) {
        self.reader.abort();
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// fred's settings for `url`, TLS aside: one node, or the cluster's seed nodes. The user and
/// password go to every node: fred authenticates each connection it opens, to the seeds and
/// to the primaries it discovers, with the one `Config`.
fn config(url: &BusUrl) -> Result<Config, fred::error::Error> {
    if url.kind != BusKind::RedisCluster {
        // `rediss` would make fred build its own TLS settings: [`tls`] builds ours.
        let rest = url.as_str().split_once("://").map_or("", |(_, rest)| rest);
        return Config::from_url_centralized(&format!("redis://{rest}"));
    }
    let (username, password) = credentials(url)?;
    Ok(Config {
        server: ServerConfig::new_clustered(url.hosts.clone()),
        username,
        password,
        ..Config::default()
    })
}

/// The user and password of a `redis+cluster://user:password@host:port,host:port` URL
/// (either may be empty), decoded by fred's own URL parser, as a single node's are, so
/// percent-escapes mean the same in both. fred cannot parse the cluster URL itself: it takes
/// only one address.
fn credentials(url: &BusUrl) -> Result<(Option<String>, Option<String>), fred::error::Error> {
    let Some(userinfo) = url.userinfo() else {
        return Ok((None, None));
    };
    let one = Config::from_url_centralized(&format!("redis://{userinfo}@127.0.0.1"))?;
    Ok((one.username, one.password))
}

/// TLS for every connection: rustls with the ring provider, verifying against the CA file's
/// certificates when one is given, else the system's roots.
fn tls(bus: &BusConfig) -> Result<TlsConfig, String> {
    use tokio_rustls::rustls::ClientConfig;
    let connector = match &bus.ca_file {
        Some(path) => {
            let roots = super::tls_roots(path)?;
            let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
            let config = ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            TlsConnector::from(config)
        }
        None => TlsConnector::default_rustls().map_err(reason)?,
    };
    Ok(connector.into())
}

/// Channels grouped by cluster hash slot.
fn by_slot(channels: Vec<String>) -> BTreeMap<u16, Vec<String>> {
    let mut groups: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    for c in channels {
        groups
            .entry(fred::util::redis_keyslot(c.as_bytes()))
            .or_default()
            .push(c);
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(url: &str) -> (ServerConfig, Option<String>, Option<String>) {
        let c = config(&url.parse().expect("a valid bus URL")).expect("a fred config");
        (c.server, c.username, c.password)
    }

    #[test]
    fn cluster_credentials_reach_the_config() {
        let (server, user, password) = parts("redis+cluster://:s3cret@10.0.0.1:7000,10.0.0.2:7001");
        assert_eq!(
            server,
            ServerConfig::new_clustered(vec![("10.0.0.1", 7000), ("10.0.0.2", 7001)])
        );
        assert_eq!((user, password), (None, Some("s3cret".into())));
        let (_, user, password) = parts("redis+cluster://app:p%40ss%3Aw@h:7000");
        assert_eq!(
            (user, password),
            (Some("app".into()), Some("p@ss:w".into()))
        );
        let (_, user, password) = parts("redis+cluster://h1:7000,h2:7001");
        assert_eq!((user, password), (None, None));
    }

    /// A single node and a cluster read the same credentials the same way.
    #[test]
    fn single_node_and_cluster_agree_on_credentials() {
        for userinfo in [":pw", "user:pw", "user:", "u%2Fs:p%25w"] {
            let (_, u1, p1) = parts(&format!("redis://{userinfo}@h:6379"));
            let (_, u2, p2) = parts(&format!("redis+cluster://{userinfo}@h:7000,h:7001"));
            assert_eq!((u1, p1), (u2, p2), "{userinfo}");
        }
    }
}
