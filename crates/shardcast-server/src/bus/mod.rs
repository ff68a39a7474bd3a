//! The bus: joins shardcast nodes through a broker (Redis, Redis Cluster or NATS), so a
//! message published on any node reaches the subscribers on every node. Here live the `--bus`
//! URL, the channel names, the node's counters and the one bus task per node (connection
//! lifecycle, subscriptions that follow the interest registry, pipelined publishes, stall
//! probes). The broker clients live in `redis.rs` and `nats.rs`, the wire format in
//! `envelope.rs`; local delivery stays in the engine (shardcast-core).
//!
//! Flow: `Relay::publish_from` delivers locally, then queues an envelope on [`Bus::send`]'s
//! bounded channel. A full channel is back-pressure for up to `CONGESTION_WAIT` (100 ms); if
//! it stays full (the broker is stalled or away and the bus task has not yet given the
//! session up) the bus copy is dropped and counted in `dropped_full`, and later ones are
//! dropped at once until it takes one again. The bus task drains that
//! channel and publishes what it holds as one pipeline. A session's reader task decodes what the broker delivers,
//! drops the node's own messages, and hands the rest to the engine's local publish
//! (`Engine::publish` with `Source::Bus`): the bus depends on the engine's API, never on the
//! relay, and what it delivers never goes back to the broker.
//!
//! Delivery across nodes is at-most-once across a broker outage: a message published while
//! the node has no broker connection reaches local subscribers only, and is counted in
//! `dropped_disconnected` (or `dropped_full` if it found the queue full).

#[doc(hidden)]
pub mod envelope;
mod nats;
mod redis;

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use envelope::Kind;
use shardcast_core::Histogram;
use shardcast_core::{Engine, InterestWatcher, Opcode, Source, Topic};

/// Upper bounds of `bus_round_trip_seconds`: 100 µs to 5 s.
const BUS_RTT_BOUNDS: &[f64] = &[
    1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The channel prefix when `--bus-prefix` is not given.
pub const DEFAULT_PREFIX: &str = "shardcast";
/// How often a node sends its stall probe when the configuration does not say.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// Envelopes waiting for the bus task. Full means a publisher waits (at most
/// `CONGESTION_WAIT`) and then drops the bus copy of its message (counted). Sized to ride out
/// a few round trips of a busy broker (about 8 pipelines of [`PUBLISH_BATCH`]).
const OUT_CAPACITY: usize = 4096;
/// How long a publisher waits for room in a full bus queue before the broker is taken to be
/// stalled and messages are dropped instead (`Bus::send`). A healthy broker takes a full
/// queue's pipeline in a few milliseconds.
const CONGESTION_WAIT: Duration = Duration::from_millis(100);
/// Interest changes waiting for the bus task. Full sets [`Bus::rescan`] instead of waiting.
const CHANGES_CAPACITY: usize = 4096;
/// Most envelopes sent as one pipeline.
const PUBLISH_BATCH: usize = 512;
/// How long interest changes are collected before one (un)subscribe call.
const SUBSCRIBE_BATCH: Duration = Duration::from_millis(5);
/// Most channels named in one (un)subscribe command.
const SUBSCRIBE_CHUNK: usize = 1000;
/// Bounds of the reconnect backoff. The cap keeps the return within 2 s of the broker's.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Longest a connect or a broker command may take before the session is given up.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Probes come back waiting for the bus task: a round's worth for a large cluster.
const PROBES_CAPACITY: usize = 1024;
/// Longest a WebSocket handshake waits for its node's broker subscriptions.
pub(crate) const SUBSCRIBE_WAIT: Duration = Duration::from_secs(1);

/// The bus settings of the server's `Config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusConfig {
    /// Which broker, and where.
    pub url: BusUrl,
    /// Channels are named from it (`prefix:topic` on Redis, `prefix.topic` on NATS), so
    /// several deployments can share a broker.
    pub prefix: String,
    /// How often the node sends a probe through the broker to itself (on a Redis Cluster,
    /// one to each primary). A probe not back by the next one is a stall: the node reconnects
    /// and resubscribes.
    pub probe_interval: Duration,
    /// PEM file of the CA certificates that verify the broker's TLS certificate
    /// (`--bus-ca-file`); `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// NATS credentials file (`--bus-creds-file`): a user JWT and its nkey seed.
    pub creds_file: Option<PathBuf>,
}

impl BusConfig {
    /// A bus on `url` with the default prefix and probe interval.
    pub fn new(url: BusUrl) -> Self {
        Self {
            url,
            prefix: DEFAULT_PREFIX.to_string(),
            probe_interval: DEFAULT_PROBE_INTERVAL,
            ca_file: None,
            creds_file: None,
        }
    }

    /// Checks the prefix: 1 to 64 bytes of `[A-Za-z0-9_:.-]`, no empty `.`-separated part.
    pub fn validate(&self) -> Result<(), String> {
        let p = &self.prefix;
        let ok = !p.is_empty()
            && p.len() <= 64
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'.' | b'-'))
            && p.split('.').all(|part| !part.is_empty());
        if !ok {
            return Err(format!(
                "--bus-prefix {p:?} must be 1 to 64 bytes of [A-Za-z0-9_:.-] with no empty part between dots"
            ));
        }
        if self.probe_interval.is_zero() {
            return Err("the bus probe interval must be greater than zero".into());
        }
        // NATS upgrades `nats://` to TLS when the server asks, so a CA file serves there too;
        // a Redis URL says whether it is TLS.
        if self.ca_file.is_some() && self.url.kind != BusKind::Nats && !self.url.tls {
            return Err(format!(
                "--bus-ca-file needs a TLS bus URL (rediss:// or rediss+cluster://), not {}",
                self.url
            ));
        }
        if self.creds_file.is_some() && self.url.kind != BusKind::Nats {
            return Err("--bus-creds-file is for NATS (nats:// or tls://) only".into());
        }
        Ok(())
    }

    /// Reads the CA and credentials files once, so a missing or unreadable one is a
    /// configuration error at start rather than a bus that never connects. Each session
    /// reads them again, so a renewed file takes effect at the next reconnect.
    pub fn check_files(&self) -> Result<(), String> {
        if let Some(path) = &self.ca_file {
            tls_roots(path)?;
        }
        if let Some(path) = &self.creds_file {
            nats::read_creds(path)?;
        }
        Ok(())
    }
}

/// The CA certificates of a PEM file (`--bus-ca-file`), as rustls roots. An error names the
/// file and says what is wrong with it.
pub(crate) fn tls_roots(
    path: &std::path::Path,
) -> Result<tokio_rustls::rustls::RootCertStore, String> {
    use tokio_rustls::rustls::pki_types::{CertificateDer, pem::PemObject};
    let bad = |why: String| format!("--bus-ca-file {}: {why}", path.display());
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(format!("unreadable PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(bad("holds no PEM certificate".into()));
    }
    Ok(roots)
}

/// The kind of broker a [`BusUrl`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusKind {
    /// `redis://host:port` (`rediss://` over TLS): one Redis, `PUBLISH`/`SUBSCRIBE`.
    Redis,
    /// `redis+cluster://host:port,host:port` (`rediss+cluster://` over TLS): sharded
    /// pub/sub, `SPUBLISH`/`SSUBSCRIBE`.
    RedisCluster,
    /// `nats://host:port` (`tls://` to require TLS): subjects `prefix.topic`.
    Nats,
}

/// A parsed `--bus` URL.
#[derive(Clone, PartialEq, Eq)]
pub struct BusUrl {
    raw: String,
    kind: BusKind,
    /// The scheme asks for TLS: `rediss`, `rediss+cluster` or NATS's `tls`.
    tls: bool,
    /// `(host, port)` of every node named (one but for Redis Cluster).
    hosts: Vec<(String, u16)>,
}

impl BusUrl {
    pub fn kind(&self) -> BusKind {
        self.kind
    }

    /// Whether the scheme asks for TLS (`rediss://`, `rediss+cluster://`, `tls://`). A
    /// `nats://` URL still gets TLS from a server that requires it.
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// The URL as given.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The URL with any credentials replaced, for logs and `shardcast config`.
    pub fn redacted(&self) -> String {
        redact(&self.raw)
    }

    /// The credentials of the URL (`user:password@`, `:password@` or `token@`), still
    /// percent-encoded; `None` without an `@`. They end at the last `@`.
    fn userinfo(&self) -> Option<&str> {
        let rest = self.raw.split_once("://").map_or("", |(_, rest)| rest);
        rest.rsplit_once('@').map(|(userinfo, _)| userinfo)
    }

    /// The URL without its credentials.
    fn without_userinfo(&self) -> String {
        replace_userinfo(&self.raw, "")
    }
}

/// `raw` with the credentials of a URL replaced by `<redacted>`.
fn redact(raw: &str) -> String {
    replace_userinfo(raw, "<redacted>@")
}

/// `raw` with `scheme://userinfo@` made `scheme://{with}`; as is without credentials.
fn replace_userinfo(raw: &str, with: &str) -> String {
    match raw.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://{with}{host}"),
            None => raw.to_string(),
        },
        None => raw.to_string(),
    }
}

impl fmt::Debug for BusUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Display for BusUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl FromStr for BusUrl {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            Err(format!(
                "invalid bus URL {:?}: {why} (try redis://127.0.0.1:6379, redis+cluster://127.0.0.1:7000,127.0.0.1:7001 or nats://127.0.0.1:4222; over TLS rediss://, rediss+cluster:// or tls://)",
                redact(raw)
            ))
        };
        let Some((scheme, rest)) = raw.split_once("://") else {
            return bad("no scheme");
        };
        let (kind, tls) = match scheme {
            "redis" => (BusKind::Redis, false),
            "rediss" => (BusKind::Redis, true),
            "redis+cluster" => (BusKind::RedisCluster, false),
            "rediss+cluster" => (BusKind::RedisCluster, true),
            "nats" => (BusKind::Nats, false),
            "tls" => (BusKind::Nats, true),
            _ => return bad(&format!("unknown scheme {scheme:?}")),
        };
        // Credentials, if any, end at the last '@'; a database path follows the address.
        let addrs = rest.rsplit_once('@').map_or(rest, |(_, a)| a);
        let addrs = addrs.split_once('/').map_or(addrs, |(a, _)| a);
        let mut hosts = Vec::new();
        for addr in addrs.split(',') {
            let Some((host, port)) = addr.rsplit_once(':') else {
                return bad(&format!("{addr:?} has no port"));
            };
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() {
                return bad(&format!("{addr:?} has no host"));
            }
            let Ok(port) = port.parse::<u16>() else {
                return bad(&format!("{addr:?} has no valid port"));
            };
            hosts.push((host.to_string(), port));
        }
        if hosts.len() > 1 && kind != BusKind::RedisCluster {
            return bad("only redis+cluster takes several addresses");
        }
        Ok(Self {
            raw: raw.to_string(),
            kind,
            tls,
            hosts,
        })
    }
}

/// The bus's counters, copied at the moment of asking.
#[derive(Debug, Clone, PartialEq)]
pub struct BusStats {
    /// A session with the broker is up (subscribed to its probe channel and its interest).
    pub connected: bool,
    /// Sessions established after a previous one was lost.
    pub reconnects: u64,
    /// Envelopes the broker accepted from this node.
    pub published: u64,
    /// Messages from other nodes received and handed to local delivery.
    pub received: u64,
    /// This node's own messages that came back from the broker, dropped.
    pub dropped_own: u64,
    /// Messages not sent to the broker because no session was up (or the send failed):
    /// delivered locally only.
    pub dropped_disconnected: u64,
    /// Messages not sent to the broker because the bus queue was full (the broker slower
    /// than the publishers, or a session hung on a command): delivered locally only.
    pub dropped_full: u64,
    /// Received bytes that were not a readable envelope for a known topic.
    pub rejected: u64,
    /// Silent stalls: a probe that did not come back in time, or a command not answered
    /// on a connection that looked up. Each one restarted the session.
    pub stall_detected: u64,
    /// Broker channels the node is subscribed to (its topics, not its probe channel).
    pub subscriptions: usize,
    /// Round trip of the stall probe: publish to receipt.
    pub round_trip: Histogram,
}

impl Default for BusStats {
    fn default() -> Self {
        Self {
            connected: false,
            reconnects: 0,
            published: 0,
            received: 0,
            dropped_own: 0,
            dropped_disconnected: 0,
            dropped_full: 0,
            rejected: 0,
            stall_detected: 0,
            subscriptions: 0,
            round_trip: Histogram::new(BUS_RTT_BOUNDS),
        }
    }
}

/// An envelope on its way to the broker.
struct Outgoing {
    topic: Topic,
    envelope: Bytes,
}

/// The bus state shared by publishers, shards and the bus task.
pub(crate) struct Bus {
    /// This process's id in every envelope it sends; messages carrying it are its own.
    node: u128,
    /// Publishers' envelopes, in publish order. Bounded: when it is full a publisher waits
    /// at most `CONGESTION_WAIT` for room, then the envelope is dropped and counted in
    /// `dropped_full` (`Bus::send`).
    out: mpsc::Sender<Outgoing>,
    /// Set from a publisher's first `CONGESTION_WAIT` that found no room until the queue
    /// takes an envelope again. While set, publishers drop at once instead of waiting, and
    /// the episode is logged once.
    shedding: AtomicBool,
    /// Topics whose interest entry a shard just created or removed. A shard never waits on
    /// it: when it is full the shard sets `rescan` instead.
    changes: mpsc::Sender<Topic>,
    /// Set when a change could not be queued: the bus task then compares the whole interest
    /// registry with its subscriptions.
    rescan: AtomicBool,
    /// Written only by the bus task; read by scrapes and readiness checks.
    connected: AtomicBool,
    /// Topics subscribed on the broker, mirrored by the bus task after each confirmed
    /// (un)subscribe, for `Relay::bus_subscribed` and the subscriptions gauge. The bus task
    /// owns the real set; this copy is read only by checks and scrapes.
    subscribed: Mutex<HashSet<Topic>>,
    /// Bumped after each change of `subscribed` or `connected`, waking handshakes waiting
    /// in [`Bus::wait_subscribed`].
    changed: watch::Sender<u64>,
    reconnects: AtomicU64,
    published: AtomicU64,
    received: AtomicU64,
    dropped_own: AtomicU64,
    dropped_disconnected: AtomicU64,
    dropped_full: AtomicU64,
    rejected: AtomicU64,
    stall_detected: AtomicU64,
    /// Observed once per probe (every few seconds), never per message.
    round_trip: Mutex<Histogram>,
    /// The first unreadable message is logged; the rest are only counted.
    warned_rejected: AtomicBool,
}

/// The receiving ends the bus task takes over.
pub(crate) struct BusInboxes {
    out: mpsc::Receiver<Outgoing>,
    changes: mpsc::Receiver<Topic>,
}

impl Bus {
    pub(crate) fn new() -> (Arc<Self>, BusInboxes) {
        let (out, out_rx) = mpsc::channel(OUT_CAPACITY);
        let (changes, changes_rx) = mpsc::channel(CHANGES_CAPACITY);
        let bus = Arc::new(Self {
            node: rand::random(),
            out,
            shedding: AtomicBool::new(false),
            changes,
            rescan: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            subscribed: Mutex::new(HashSet::new()),
            changed: watch::Sender::new(0),
            reconnects: AtomicU64::new(0),
            published: AtomicU64::new(0),
            received: AtomicU64::new(0),
            dropped_own: AtomicU64::new(0),
            dropped_disconnected: AtomicU64::new(0),
            dropped_full: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            stall_detected: AtomicU64::new(0),
            round_trip: Mutex::new(Histogram::new(BUS_RTT_BOUNDS)),
            warned_rejected: AtomicBool::new(false),
        });
        (
            bus,
            BusInboxes {
                out: out_rx,
                changes: changes_rx,
            },
        )
    }

    /// Queues a locally published message for the other nodes; the message has already
    /// reached this node's subscribers. A full queue is first taken as back-pressure: the
    /// caller waits up to `CONGESTION_WAIT` for room, so a burst faster than a healthy broker
    /// is slowed down, not lost. If no room comes in that time the broker is taken to be
    /// stalled: this message and every later one are dropped at once, without waiting, and
    /// counted in `dropped_full`, until the queue takes a message again. So a frozen broker
    /// delays a publisher at most once, by `CONGESTION_WAIT`, before the command timeout
    /// ends its session. Does nothing once the bus task has stopped (shutdown).
    pub(crate) async fn send(&self, topic: &Topic, opcode: Opcode, payload: &[u8]) {
        let envelope = envelope::encode(self.node, Kind::of(opcode), payload);
        let msg = Outgoing {
            topic: topic.clone(),
            envelope,
        };
        let full = match self.out.try_send(msg) {
            Ok(()) => {
                self.accepting();
                return;
            }
            // The bus task has ended (shutdown): nothing is left to send to.
            Err(mpsc::error::TrySendError::Closed(_)) => return,
            Err(mpsc::error::TrySendError::Full(msg)) => msg,
        };
        if !self.shedding.load(Ordering::Relaxed) {
            // `Ok`: sent, or the bus task ended meanwhile (shutdown). `Err`: no room in time.
            if tokio::time::timeout(CONGESTION_WAIT, self.out.send(full))
                .await
                .is_ok()
            {
                self.accepting();
                return;
            }
        }
        self.dropped_full.fetch_add(1, Ordering::Relaxed);
        if !self.shedding.swap(true, Ordering::Relaxed) {
            tracing::debug!(
                capacity = OUT_CAPACITY,
                wait = ?CONGESTION_WAIT,
                "bus queue stayed full (broker slow or stalled); messages reach local subscribers only, counted in shardcast_bus_dropped_full_total"
            );
        }
    }

    /// The queue took a message: ends a shedding episode (a plain load first, so the swap's
    /// write happens once per episode, not per message).
    fn accepting(&self) {
        if self.shedding.load(Ordering::Relaxed) && self.shedding.swap(false, Ordering::Relaxed) {
            tracing::debug!("bus queue accepting again; messages reach the other nodes again");
        }
    }

    /// Waits, at most `limit`, until the node is subscribed on the broker to every one of
    /// `topics`, so that a client whose handshake completes after this gets every message
    /// published on any node from then on. Returns at once when no session is up: there is
    /// nothing to wait for.
    pub(crate) async fn wait_subscribed(&self, topics: &[Topic], limit: Duration) {
        let mut rx = self.changed.subscribe();
        let ready = || {
            !self.is_connected() || {
                let subscribed = lock(&self.subscribed);
                topics.iter().all(|t| subscribed.contains(t))
            }
        };
        let wait = async {
            while !ready() {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(limit, wait).await;
    }

    fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Release);
        self.changed.send_modify(|n| *n += 1);
    }

    pub(crate) fn is_subscribed(&self, topic: &Topic) -> bool {
        lock(&self.subscribed).contains(topic)
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    pub(crate) fn stats(&self) -> BusStats {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BusStats {
            connected: self.is_connected(),
            reconnects: n(&self.reconnects),
            published: n(&self.published),
            received: n(&self.received),
            dropped_own: n(&self.dropped_own),
            dropped_disconnected: n(&self.dropped_disconnected),
            dropped_full: n(&self.dropped_full),
            rejected: n(&self.rejected),
            stall_detected: n(&self.stall_detected),
            subscriptions: lock(&self.subscribed).len(),
            round_trip: lock(&self.round_trip).clone(),
        }
    }

    fn reject(&self, why: &dyn fmt::Display) {
        self.reject_n(1, why);
    }

    fn reject_n(&self, n: u64, why: &dyn fmt::Display) {
        self.rejected.fetch_add(n, Ordering::Relaxed);
        if !self.warned_rejected.swap(true, Ordering::Relaxed) {
            tracing::warn!(%why, "unreadable message from the bus (further ones are only counted in shardcast_bus_rejected_total)");
        }
    }
}

/// Locks a mutex that holds plain data: a panic while it was held cannot leave it torn, so
/// a poisoned lock is used as is.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why a session with the broker ended or could not start. Expected outcomes, logged and
/// counted, never fatal.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BusError {
    #[error("failed to connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("failed to {op} on {url}: {reason}")]
    Command {
        op: &'static str,
        url: String,
        reason: String,
    },
    #[error("the connection to {url} closed")]
    Closed { url: String },
    #[error("{url}{on} did not answer within {after:?} on a connection that looks up: stalled")]
    Stalled {
        url: String,
        /// Which part of the broker, when one was singled out: ` (cluster primary h:p)`.
        on: String,
        after: Duration,
    },
}

/// One stall probe channel of a session and, on a Redis Cluster, the primary it lives on.
pub(crate) struct Probe {
    channel: String,
    primary: Option<String>,
}

/// Channel (Redis) or subject (NATS) names.
///
/// Redis: `prefix:topic`, probe `prefix#probe:<node>` (on a cluster, one probe per primary:
/// `prefix#probe:<node>:{<n>}`, its hash tag `n` chosen so that the slot is the primary's).
/// NATS: `prefix.topic`, or
/// `prefix-x.<hex>` for a topic that would make an empty subject token (a leading,
/// trailing or doubled `.`), probe `prefix-probe.<node>`. `#` and `-x`/`-probe` after the
/// prefix cannot start a topic's name, so no topic maps onto a probe or onto another topic.
pub(crate) struct Naming {
    kind: BusKind,
    prefix: String,
    probe: String,
}

impl Naming {
    fn new(kind: BusKind, prefix: &str, node: u128) -> Self {
        let probe = match kind {
            BusKind::Nats => format!("{prefix}-probe.{node:032x}"),
            BusKind::Redis | BusKind::RedisCluster => format!("{prefix}#probe:{node:032x}"),
        };
        Self {
            kind,
            prefix: prefix.to_string(),
            probe,
        }
    }

    fn channel(&self, topic: &Topic) -> String {
        let (p, t) = (&self.prefix, topic.as_str());
        match self.kind {
            BusKind::Nats if t.split('.').any(str::is_empty) => {
                let hex: String = t.bytes().map(|b| format!("{b:02x}")).collect();
                format!("{p}-x.{hex}")
            }
            BusKind::Nats => format!("{p}.{t}"),
            BusKind::Redis | BusKind::RedisCluster => format!("{p}:{t}"),
        }
    }

    fn topic(&self, channel: &str) -> Option<Topic> {
        let rest = channel.strip_prefix(self.prefix.as_str())?;
        let name = match self.kind {
            BusKind::Nats => {
                if let Some(t) = rest.strip_prefix('.') {
                    t.to_string()
                } else {
                    let hex = rest.strip_prefix("-x.")?;
                    if hex.len() % 2 != 0 || !hex.is_ascii() {
                        return None;
                    }
                    let bytes: Option<Vec<u8>> = (0..hex.len())
                        .step_by(2)
                        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
                        .collect();
                    String::from_utf8(bytes?).ok()?
                }
            }
            BusKind::Redis | BusKind::RedisCluster => rest.strip_prefix(':')?.to_string(),
        };
        Topic::new(&name).ok()
    }
}

impl InterestWatcher for Bus {
    /// Called by a shard when it creates or removes `topic`'s interest entry. Never waits.
    fn changed(&self, topic: &Topic) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.changes.try_send(topic.clone()) {
            self.rescan.store(true, Ordering::Release);
        }
    }
}

/// What a session's reader needs: it decodes, filters and delivers each message.
#[derive(Clone)]
pub(crate) struct Inbound {
    bus: Arc<Bus>,
    /// Where messages from other nodes are delivered: the engine's local publish, so they
    /// never go back to the bus.
    engine: Engine,
    naming: Arc<Naming>,
    /// This node's probes as they come back: the channel and the sequence number.
    probes: mpsc::Sender<(String, u64)>,
}

impl Inbound {
    /// Handles one message from the broker on `channel`.
    pub(crate) async fn handle(&self, channel: &str, bytes: &[u8]) {
        let env = match envelope::decode(bytes) {
            Ok(env) => env,
            Err(e) => return self.bus.reject(&e),
        };
        if env.node == self.bus.node {
            if env.kind == Kind::Probe {
                if let Ok(seq) = <[u8; 8]>::try_from(env.payload) {
                    // Full only if probes pile up unread, which the next round makes moot.
                    let _ = self
                        .probes
                        .try_send((channel.to_string(), u64::from_be_bytes(seq)));
                }
            } else {
                self.bus.dropped_own.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        let Some(opcode) = env.kind.opcode() else {
            return self.bus.reject(&"another node's probe on a topic channel");
        };
        let Some(topic) = self.naming.topic(channel) else {
            return self
                .bus
                .reject(&format_args!("channel {channel:?} names no topic"));
        };
        self.bus.received.fetch_add(1, Ordering::Relaxed);
        // Refusals (shutdown, an oversized payload) are moot: the node is stopping, or the
        // sender's limit is larger than ours.
        let _ = self
            .engine
            .publish(Source::Bus, &topic, opcode, env.payload)
            .await;
    }
}

/// One connection to the broker, whichever kind.
enum Session {
    Redis(redis::Session),
    /// Boxed: it holds its sync subscription inline, and is the larger by far.
    Nats(Box<nats::Session>),
}

impl Session {
    async fn connect(config: &BusConfig, inbound: Inbound) -> Result<Self, BusError> {
        let url = &config.url;
        let connect = async {
            match url.kind {
                BusKind::Redis | BusKind::RedisCluster => redis::Session::connect(config, inbound)
                    .await
                    .map(Self::Redis),
                BusKind::Nats => nats::Session::connect(config, inbound)
                    .await
                    .map(|s| Self::Nats(Box::new(s))),
            }
        };
        tokio::time::timeout(COMMAND_TIMEOUT, connect)
            .await
            .unwrap_or_else(|_| {
                Err(BusError::Connect {
                    url: url.redacted(),
                    reason: format!("timed out after {COMMAND_TIMEOUT:?}"),
                })
            })
    }

    /// Runs one broker command. Not answered within `limit` on a connection that looks
    /// up is a stall, the failure the probe exists for.
    async fn timed<T>(
        url: &BusUrl,
        op: &'static str,
        limit: Duration,
        fut: impl Future<Output = Result<T, String>>,
    ) -> Result<T, BusError> {
        match tokio::time::timeout(limit, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(reason)) => Err(BusError::Command {
                op,
                url: url.redacted(),
                reason,
            }),
            Err(_) => Err(BusError::Stalled {
                url: url.redacted(),
                on: String::new(),
                after: limit,
            }),
        }
    }

    async fn subscribe(&mut self, url: &BusUrl, channels: Vec<String>) -> Result<(), BusError> {
        match self {
            Self::Redis(s) => {
                Self::timed(url, "subscribe", COMMAND_TIMEOUT, s.subscribe(channels)).await
            }
            Self::Nats(s) => {
                Self::timed(url, "subscribe", COMMAND_TIMEOUT, s.subscribe(channels)).await
            }
        }
    }

    async fn unsubscribe(&mut self, url: &BusUrl, channels: Vec<String>) -> Result<(), BusError> {
        match self {
            Self::Redis(s) => {
                Self::timed(url, "unsubscribe", COMMAND_TIMEOUT, s.unsubscribe(channels)).await
            }
            Self::Nats(s) => {
                Self::timed(url, "unsubscribe", COMMAND_TIMEOUT, s.unsubscribe(channels)).await
            }
        }
    }

    async fn publish(
        &mut self,
        url: &BusUrl,
        limit: Duration,
        batch: Vec<(String, Bytes)>,
    ) -> Result<(), BusError> {
        match self {
            Self::Redis(s) => Self::timed(url, "publish", limit, s.publish(batch)).await,
            Self::Nats(s) => Self::timed(url, "publish", limit, s.publish(batch)).await,
        }
    }

    /// The probe channels of this session: one, or one per primary of a Redis Cluster
    /// (named from `base`), so a silent stall of any primary misses its probe.
    fn probes(&self, base: &str) -> Vec<Probe> {
        match self {
            Self::Redis(s) => s.probes(base),
            Self::Nats(_) => vec![Probe {
                channel: base.to_string(),
                primary: None,
            }],
        }
    }

    /// Completes when the connection is lost.
    async fn closed(&mut self) {
        match self {
            Self::Redis(s) => s.closed().await,
            Self::Nats(s) => s.closed().await,
        }
    }

    /// Ends the session: stops its reader first, so nothing more is delivered from it.
    async fn close(self) {
        match self {
            Self::Redis(s) => s.close().await,
            Self::Nats(s) => (*s).close().await,
        }
    }
}

/// Starts the bus task for `engine`, whose interest map tells `bus` of its changes.
pub(crate) fn spawn(
    bus: Arc<Bus>,
    inboxes: BusInboxes,
    engine: Engine,
    config: BusConfig,
) -> JoinHandle<()> {
    let naming = Arc::new(Naming::new(config.url.kind, &config.prefix, bus.node));
    let task = Task {
        bus,
        engine,
        config,
        naming,
        out: inboxes.out,
        changes: inboxes.changes,
        subscribed: HashSet::new(),
        pending: HashSet::new(),
        probe_seq: 0,
    };
    tokio::spawn(task.run())
}

/// The bus task's own state.
struct Task {
    bus: Arc<Bus>,
    engine: Engine,
    config: BusConfig,
    naming: Arc<Naming>,
    out: mpsc::Receiver<Outgoing>,
    changes: mpsc::Receiver<Topic>,
    /// Topics subscribed in the current session. Invariant: after each reconcile, equal to
    /// the topics in the interest registry at the moment it looked (changes since are queued
    /// in `changes` or flagged in `rescan`, so the next reconcile catches up).
    subscribed: HashSet<Topic>,
    /// Topics whose interest changed since the last reconcile.
    pending: HashSet<Topic>,
    probe_seq: u64,
}

impl Task {
    async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        let mut sessions = 0u64;
        let mut failures = 0u64;
        loop {
            let (probes_tx, probes_rx) = mpsc::channel(PROBES_CAPACITY);
            let inbound = Inbound {
                bus: Arc::clone(&self.bus),
                engine: self.engine.clone(),
                naming: Arc::clone(&self.naming),
                probes: probes_tx,
            };
            let config = self.config.clone();
            let connected = self
                .while_draining(Session::connect(&config, inbound))
                .await;
            match connected {
                Ok(mut session) => {
                    failures = 0;
                    if sessions > 0 {
                        self.bus.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    sessions += 1;
                    let ended = self.serve(&mut session, probes_rx).await;
                    self.bus.set_connected(false);
                    self.set_subscribed(HashSet::new());
                    session.close().await;
                    tracing::warn!(error = %ended, "bus session lost; messages reach local subscribers only until it is back");
                    backoff = BACKOFF_MIN;
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 && sessions == 0 {
                        tracing::warn!(error = %e, "bus unavailable; retrying with backoff (messages reach local subscribers only)");
                    } else {
                        tracing::debug!(error = %e, "bus reconnect attempt failed");
                    }
                }
            }
            let wait = jitter(backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
            self.while_draining(tokio::time::sleep(wait)).await;
        }
    }

    /// Awaits `fut` while no session is up: queued envelopes are dropped (and counted) so
    /// publishers never wait on a missing broker, and interest changes are discarded (the
    /// next session compares the whole registry).
    async fn while_draining<T>(&mut self, fut: impl Future<Output = T>) -> T {
        tokio::pin!(fut);
        let mut buf = Vec::with_capacity(PUBLISH_BATCH);
        loop {
            tokio::select! {
                v = &mut fut => return v,
                n = self.out.recv_many(&mut buf, PUBLISH_BATCH) => {
                    if n == 0 {
                        // Every sender is gone: the relay was dropped. Nothing is left to do.
                        std::future::pending::<()>().await;
                    }
                    self.bus.dropped_disconnected.fetch_add(n as u64, Ordering::Relaxed);
                    buf.clear();
                }
                Some(_) = self.changes.recv() => {}
            }
        }
    }

    /// Runs one session until it fails; returns why.
    async fn serve(
        &mut self,
        session: &mut Session,
        mut probes: mpsc::Receiver<(String, u64)>,
    ) -> BusError {
        let channels = match self.start(session).await {
            Ok(channels) => channels,
            Err(e) => return e,
        };
        tracing::info!(url = %self.config.url, subscriptions = self.subscribed.len(), probes = channels.len(), "bus connected");
        let every = self.config.probe_interval;
        let mut probe_tick = tokio::time::interval(every);
        probe_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The round in flight: its number, when it was sent, the probes not yet back.
        let mut outstanding: Option<(u64, Instant, Vec<&Probe>)> = None;
        let mut reconcile_at: Option<Instant> = None;
        let mut batch = Vec::with_capacity(PUBLISH_BATCH);
        loop {
            let result = tokio::select! {
                biased;
                _ = session.closed() => Err(BusError::Closed { url: self.config.url.redacted() }),
                Some((channel, seq)) = probes.recv() => {
                    if let Some((want, sent, waiting)) = &mut outstanding
                        && *want == seq
                    {
                        waiting.retain(|p| p.channel != channel);
                        if waiting.is_empty() {
                            // The slowest primary's round trip.
                            lock(&self.bus.round_trip).observe(sent.elapsed().as_secs_f64());
                            outstanding = None;
                        }
                    }
                    Ok(())
                }
                _ = probe_tick.tick() => {
                    if let Some((_, _, waiting)) = &outstanding {
                        let primaries: Vec<&str> = waiting.iter().filter_map(|p| p.primary.as_deref()).collect();
                        let on = match primaries.as_slice() {
                            [] => String::new(),
                            [one] => format!(" (cluster primary {one})"),
                            many => format!(" (cluster primaries {})", many.join(", ")),
                        };
                        Err(BusError::Stalled { url: self.config.url.redacted(), on, after: every })
                    } else {
                        self.probe_seq += 1;
                        outstanding = Some((self.probe_seq, Instant::now(), channels.iter().collect()));
                        let probe = envelope::encode(self.bus.node, Kind::Probe, &self.probe_seq.to_be_bytes());
                        let batch = channels.iter().map(|p| (p.channel.clone(), probe.clone())).collect();
                        session.publish(&self.config.url, every, batch).await
                    }
                }
                Some(topic) = self.changes.recv() => {
                    self.pending.insert(topic);
                    reconcile_at.get_or_insert_with(|| Instant::now() + SUBSCRIBE_BATCH);
                    Ok(())
                }
                _ = sleep_until(reconcile_at), if reconcile_at.is_some() => {
                    reconcile_at = None;
                    self.reconcile(session, false).await
                }
                n = self.out.recv_many(&mut batch, PUBLISH_BATCH) => {
                    if n == 0 {
                        // Every sender is gone: the relay was dropped. Nothing is left to do.
                        std::future::pending::<()>().await;
                    }
                    self.publish(session, &mut batch).await
                }
            };
            if let Err(e) = result {
                if matches!(e, BusError::Stalled { .. }) {
                    self.bus.stall_detected.fetch_add(1, Ordering::Relaxed);
                }
                return e;
            }
        }
    }

    /// Subscribes a new session to its probe channels and to every topic in the registry;
    /// returns the probe channels.
    async fn start(&mut self, session: &mut Session) -> Result<Vec<Probe>, BusError> {
        self.subscribed.clear();
        self.pending.clear();
        self.bus.rescan.store(false, Ordering::Release);
        let probes = session.probes(&self.naming.probe);
        let channels = probes.iter().map(|p| p.channel.clone()).collect();
        session.subscribe(&self.config.url, channels).await?;
        self.reconcile(session, true).await?;
        self.bus.set_connected(true);
        Ok(probes)
    }

    /// Brings the broker subscriptions in line with the interest registry, level-triggered:
    /// whatever order the shards' notifications came in, each topic named (or, on a rescan,
    /// every topic) ends up subscribed iff the registry has an entry for it now.
    async fn reconcile(&mut self, session: &mut Session, all: bool) -> Result<(), BusError> {
        let interest = self.engine.interest();
        let all = all || self.bus.rescan.swap(false, Ordering::AcqRel);
        let mut add = Vec::new();
        let mut remove = Vec::new();
        if all {
            self.pending.clear();
            for t in interest.snapshot() {
                if !self.subscribed.contains(&t) {
                    add.push(t);
                }
            }
            for t in &self.subscribed {
                if !interest.contains(t) {
                    remove.push(t.clone());
                }
            }
        } else {
            for t in self.pending.drain() {
                match (interest.contains(&t), self.subscribed.contains(&t)) {
                    (true, false) => add.push(t),
                    (false, true) => remove.push(t),
                    _ => {}
                }
            }
        }
        for chunk in add.chunks(SUBSCRIBE_CHUNK) {
            let names = chunk.iter().map(|t| self.naming.channel(t)).collect();
            session.subscribe(&self.config.url, names).await?;
            self.subscribed.extend(chunk.iter().cloned());
        }
        for chunk in remove.chunks(SUBSCRIBE_CHUNK) {
            let names = chunk.iter().map(|t| self.naming.channel(t)).collect();
            session.unsubscribe(&self.config.url, names).await?;
            for t in chunk {
                self.subscribed.remove(t);
            }
        }
        if !add.is_empty() || !remove.is_empty() {
            self.set_subscribed(self.subscribed.clone());
        }
        Ok(())
    }

    /// Sends the batch `recv_many` gathered as one pipeline. On failure the batch is counted
    /// as dropped and the session ends.
    async fn publish(
        &mut self,
        session: &mut Session,
        batch: &mut Vec<Outgoing>,
    ) -> Result<(), BusError> {
        let n = batch.len() as u64;
        let msgs = batch
            .drain(..)
            .map(|m| (self.naming.channel(&m.topic), m.envelope))
            .collect();
        match session
            .publish(&self.config.url, COMMAND_TIMEOUT, msgs)
            .await
        {
            Ok(()) => {
                self.bus.published.fetch_add(n, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.bus
                    .dropped_disconnected
                    .fetch_add(n, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    fn set_subscribed(&self, set: HashSet<Topic>) {
        *lock(&self.bus.subscribed) = set;
        self.bus.changed.send_modify(|n| *n += 1);
    }
}

/// Sleeps until `at`; never completes for `None` (the `select!` guard keeps it unpolled).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A random wait between half of `d` and `d`, so nodes that lost the broker together do
/// not all return at the same instant.
fn jitter(d: Duration) -> Duration {
    let half = d / 2;
    half + half.mul_f64(rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_refuse_with_a_reason() {
        let u: BusUrl = "redis://127.0.0.1:6379".parse().unwrap();
        assert_eq!(u.kind(), BusKind::Redis);
        let u: BusUrl = "redis+cluster://127.0.0.1:7000,127.0.0.1:7001"
            .parse()
            .unwrap();
        assert_eq!(u.kind(), BusKind::RedisCluster);
        assert_eq!(u.hosts.len(), 2);
        let u: BusUrl = "nats://localhost:4222".parse().unwrap();
        assert_eq!(u.kind(), BusKind::Nats);
        let u: BusUrl = "redis://:secret@10.0.0.5:6379/2".parse().unwrap();
        assert_eq!(u.hosts, vec![("10.0.0.5".to_string(), 6379)]);
        assert_eq!(u.redacted(), "redis://<redacted>@10.0.0.5:6379/2");
        assert!(!format!("{u:?}").contains("secret"));
        for bad in [
            "127.0.0.1:6379",
            "http://127.0.0.1:1",
            "redis://127.0.0.1",
            "redis://:6379",
            "nats://h:notaport",
            "redis://a:1,b:2",
        ] {
            let err = bad.parse::<BusUrl>().unwrap_err();
            assert!(err.contains("invalid bus URL"), "{bad}: {err}");
        }
    }

    #[test]
    fn tls_schemes_parse_and_errors_never_show_credentials() {
        for (raw, kind, tls) in [
            ("rediss://u:p@h:6380/1", BusKind::Redis, true),
            (
                "rediss+cluster://:p@h:7000,h:7001",
                BusKind::RedisCluster,
                true,
            ),
            ("tls://h:4222", BusKind::Nats, true),
            ("nats://tok@h:4222", BusKind::Nats, false),
        ] {
            let u: BusUrl = raw.parse().unwrap();
            assert_eq!((u.kind(), u.tls()), (kind, tls), "{raw}");
        }
        let err = "redis+tls://user:hunter2@h:1"
            .parse::<BusUrl>()
            .unwrap_err();
        assert!(
            err.contains("unknown scheme") && !err.contains("hunter2"),
            "{err}"
        );
    }

    #[test]
    fn ca_and_creds_files_go_with_the_brokers_that_use_them() {
        let with = |url: &str, ca: bool, creds: bool| BusConfig {
            ca_file: ca.then(|| "ca.pem".into()),
            creds_file: creds.then(|| "u.creds".into()),
            ..BusConfig::new(url.parse().unwrap())
        };
        with("rediss://h:1", true, false).validate().unwrap();
        with("rediss+cluster://h:1,h:2", true, false)
            .validate()
            .unwrap();
        with("nats://h:1", true, true).validate().unwrap();
        with("tls://h:1", true, true).validate().unwrap();
        let err = with("redis://h:1", true, false).validate().unwrap_err();
        assert!(err.contains("--bus-ca-file needs a TLS bus URL"), "{err}");
        let err = with("rediss://h:1", false, true).validate().unwrap_err();
        assert!(err.contains("--bus-creds-file is for NATS"), "{err}");
    }

    #[test]
    fn ca_files_are_read_or_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, ca.cert.pem()).unwrap();
        assert_eq!(tls_roots(&good).unwrap().len(), 1);
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate").unwrap();
        assert!(
            tls_roots(&empty)
                .unwrap_err()
                .contains("no PEM certificate")
        );
        let missing = tls_roots(&dir.path().join("none.pem")).unwrap_err();
        assert!(missing.contains("--bus-ca-file") && missing.contains("none.pem"));
    }

    #[test]
    fn names_map_back_to_their_topics_and_never_onto_a_probe() {
        let node = 0xabc;
        for kind in [BusKind::Redis, BusKind::Nats] {
            let n = Naming::new(kind, "app", node);
            for name in ["chat", "a.b", ".a", "a.", "a..b", "x:y-z_1"] {
                let t = Topic::new(name).unwrap();
                let ch = n.channel(&t);
                assert_eq!(n.topic(&ch), Some(t), "{kind:?} {ch}");
                if kind == BusKind::Nats {
                    assert!(ch.split('.').all(|p| !p.is_empty()), "empty token in {ch}");
                }
            }
            assert_eq!(n.topic(&n.probe), None);
            assert_eq!(n.topic("other:chat"), None);
        }
    }

    #[test]
    fn prefixes_are_checked() {
        let url: BusUrl = "nats://127.0.0.1:4222".parse().unwrap();
        let mut c = BusConfig::new(url);
        c.validate().unwrap();
        for bad in ["", "a..b", ".a", "a b", "a*"] {
            c.prefix = bad.into();
            assert!(c.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn jitter_stays_within_half_to_whole() {
        for _ in 0..100 {
            let j = jitter(Duration::from_millis(100));
            assert!(j >= Duration::from_millis(50) && j <= Duration::from_millis(100));
        }
    }
}
