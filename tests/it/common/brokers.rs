//! The brokers the bus tests run against, each started here on free loopback ports and
//! killed when dropped: a standalone Redis, a 3-node Redis Cluster and a NATS server (with or
//! without a password for the Redis ones; over TLS with certificates made here ([`Certs`]),
//! with an ACL user or NATS authorization); a process handle ([`Proc`]); a minimal RESP
//! client that reads the broker's own view (`PUBSUB NUMSUB`, `INFO commandstats`); and a
//! TCP proxy that can go silent. [`TestBroker`] is what a test does to any of them.
//!
//! Needs `redis-server`, `redis-cli` and `nats-server` on the PATH; without one, [`need`]
//! fails the test saying what to install.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shardcast::BusUrl;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tokio::task::AbortHandle;

use super::{find, within};

/// The channel prefix every node here uses (the default).
pub const PREFIX: &str = "shardcast";

// ---------------------------------------------------------------------------------------
// Waiting

/// Polls `ready` every 20 ms, for at most [`WAIT`], failing the test naming `what`.
///
/// Only for states nothing signals to a test: a broker process coming up, a broker's view of
/// its subscribers, a node's bus flag (`Relay::bus_connected` is a getter; the relay offers
/// no change notification to library users). Message flow never goes through this: that is
/// awaited on the sockets themselves, with end markers.
pub async fn poll<F: Future<Output = bool>>(what: &str, mut ready: impl FnMut() -> F) {
    within(what, async {
        while !ready().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------
// Certificates

/// A CA made for one test and a server certificate it signed, for `localhost` and
/// `127.0.0.1`, as PEM files in a temporary directory.
pub struct Certs {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    _dir: tempfile::TempDir,
}

impl Certs {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        // A name of its own: another test CA is another issuer, as in real life.
        static MADE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = MADE.fetch_add(1, Ordering::Relaxed);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("shardcast test CA {n}"));
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA certificate");
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let params = rcgen::CertificateParams::new(names).expect("server params");
        let key = rcgen::KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &ca).expect("server certificate");
        let path = |name: &str| dir.path().join(name);
        std::fs::write(path("ca.pem"), ca.pem()).expect("write CA");
        std::fs::write(path("server.pem"), cert.pem()).expect("write cert");
        std::fs::write(path("server-key.pem"), key.serialize_pem()).expect("write key");
        Self {
            ca: path("ca.pem"),
            cert: path("server.pem"),
            key: path("server-key.pem"),
            _dir: dir,
        }
    }

    /// `redis-server` arguments serving TLS on `tls_port` with these files (clients need no
    /// certificate of their own), its cluster bus and replication too.
    fn redis_args(&self, tls_port: u16) -> Vec<String> {
        let s = |p: &Path| p.display().to_string();
        [
            "--tls-port".to_string(),
            tls_port.to_string(),
            "--tls-cert-file".into(),
            s(&self.cert),
            "--tls-key-file".into(),
            s(&self.key),
            "--tls-ca-cert-file".into(),
            s(&self.ca),
            "--tls-auth-clients".into(),
            "no".into(),
            "--tls-cluster".into(),
            "yes".into(),
            "--tls-replication".into(),
            "yes".into(),
        ]
        .into()
    }
}

// ---------------------------------------------------------------------------------------
// Brokers

/// Finds `bin` on the PATH (or in /usr/sbin, where Debian puts nats-server) or fails the
/// test saying how to get it.
pub fn need(bin: &str) -> String {
    need_from(bin, "redis-server nats-server")
}

/// Finds `bin` like [`need`]; the failure names the Debian `packages` that provide it.
pub fn need_from(bin: &str, packages: &str) -> String {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain([Path::new("/usr/sbin").to_path_buf()])
        .map(|dir| dir.join(bin))
        .find(|p| p.is_file());
    match found {
        Some(p) => p.display().to_string(),
        None => panic!("{bin} is not installed (Debian: apt-get install {packages})"),
    }
}

/// A port that was free a moment ago on 127.0.0.1.
/// Never the same one twice in this process: the tests run in parallel, and the kernel may
/// hand a just-released port out again.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let port = l.local_addr().expect("local addr").port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A process this test started (a broker or a shardcast node), killed when dropped (also
/// when the test panics).
pub struct Proc {
    child: Child,
    pub port: u16,
    args: Vec<String>,
    bin: String,
}

impl Proc {
    pub fn spawn(bin: &str, args: Vec<String>, port: u16) -> Self {
        Self::spawn_with(bin, args, port, |_| {})
    }

    /// Like [`Proc::spawn`], after `setup` has had its say on the command (its environment,
    /// its stdin). [`Proc::restart`] starts it again without `setup`.
    pub fn spawn_with(
        bin: &str,
        args: Vec<String>,
        port: u16,
        setup: impl FnOnce(&mut Command),
    ) -> Self {
        let mut command = Command::new(bin);
        command
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        setup(&mut command);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start {bin}: {e}"));
        Self {
            child,
            port,
            args,
            bin: bin.to_string(),
        }
    }

    /// Like [`Proc::spawn`], with `RUST_LOG=rust_log`; returns the lines the process writes
    /// to stderr as they come (read on a thread of their own).
    pub fn spawn_logged(
        bin: &str,
        args: Vec<String>,
        port: u16,
        rust_log: &str,
    ) -> (Self, UnboundedReceiver<String>) {
        let mut child = Command::new(bin)
            .args(&args)
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start {bin}: {e}"));
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let proc = Self {
            child,
            port,
            args,
            bin: bin.to_string(),
        };
        (proc, rx)
    }

    /// Its process id (with `ip netns exec`, which execs, the program's own).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the same process again, on the same port.
    pub fn restart(&mut self) {
        self.kill();
        *self = Proc::spawn(&self.bin, self.args.clone(), self.port);
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill {sig} failed");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One RESP value, as far as these tests read them.
#[derive(Debug)]
pub enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Resp>),
}

impl Resp {
    pub fn text(&self) -> String {
        match self {
            Self::Simple(s) | Self::Error(s) => s.clone(),
            Self::Bulk(Some(b)) => String::from_utf8_lossy(b).into_owned(),
            other => format!("{other:?}"),
        }
    }
}

/// Parses one RESP value at the start of `buf`: the value and the bytes it took, or `None`
/// when `buf` does not hold a whole one yet.
pub fn parse_resp(buf: &[u8]) -> Option<(Resp, usize)> {
    let end = find(buf, b"\r\n")?;
    let line = std::str::from_utf8(&buf[1..end]).ok()?;
    let rest = end + 2;
    match buf[0] {
        b'+' => Some((Resp::Simple(line.into()), rest)),
        b'-' => Some((Resp::Error(line.into()), rest)),
        b':' => Some((Resp::Int(line.parse().ok()?), rest)),
        b'$' => {
            let Ok(n) = usize::try_from(line.parse::<i64>().ok()?) else {
                return Some((Resp::Bulk(None), rest));
            };
            let body = buf.get(rest..rest + n)?;
            buf.get(rest + n + 1)?;
            Some((Resp::Bulk(Some(body.to_vec())), rest + n + 2))
        }
        b'*' => {
            let n = line.parse::<i64>().ok()?.max(0);
            let mut items = Vec::new();
            let mut at = rest;
            for _ in 0..n {
                let (v, used) = parse_resp(&buf[at..])?;
                items.push(v);
                at += used;
            }
            Some((Resp::Array(items), at))
        }
        _ => None,
    }
}

/// Sends one command to the Redis on `port` over a fresh connection and returns its reply,
/// or `None` if nothing answers within a second (not started, stopped, or gone).
pub async fn redis_cmd(port: u16, args: &[&str]) -> Option<Resp> {
    redis_cmd_auth(port, None, args).await
}

/// [`redis_cmd`] on a Redis that wants a password: `AUTH password` first when one is given
/// (its reply is skipped; a refusal shows as the command's `NOAUTH` error).
pub async fn redis_cmd_auth(port: u16, password: Option<&str>, args: &[&str]) -> Option<Resp> {
    let command = |args: &[&str]| {
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req += &format!("${}\r\n{a}\r\n", a.len());
        }
        req
    };
    let io = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let mut req = password.map_or_else(String::new, |pw| command(&["AUTH", pw]));
        req += &command(args);
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let skip = match password {
                Some(_) => parse_resp(&buf).map(|(_, used)| used),
                None => Some(0),
            };
            if let Some((v, _)) = skip.and_then(|at| parse_resp(&buf[at..])) {
                return Some(v);
            }
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(1), io)
        .await
        .ok()
        .flatten()
}

pub async fn redis_ready(port: u16, password: Option<&str>) -> bool {
    let pong = redis_cmd_auth(port, password, &["PING"]).await;
    matches!(pong, Some(Resp::Simple(s)) if s == "PONG")
}

/// Subscribers of `channel` on one Redis: `PUBSUB NUMSUB`, or `SHARDNUMSUB` for sharded
/// pub/sub. A node that cannot be asked counts as having none.
pub async fn redis_numsub(port: u16, password: Option<&str>, shard: bool, channel: &str) -> usize {
    let sub = if shard { "SHARDNUMSUB" } else { "NUMSUB" };
    match redis_cmd_auth(port, password, &["PUBSUB", sub, channel]).await {
        Some(Resp::Array(v)) => match v.get(1) {
            Some(Resp::Int(n)) => *n as usize,
            _ => 0,
        },
        _ => 0,
    }
}

/// `calls` of each command in `INFO commandstats`, by command name (`publish`, `spublish`).
pub async fn commandstats(port: u16) -> HashMap<String, u64> {
    let info = redis_cmd(port, &["INFO", "commandstats"])
        .await
        .expect("INFO commandstats")
        .text();
    info.lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

/// GETs `path` from 127.0.0.1:`port` and returns the response (head and body), or `None` if
/// nothing answers in full within a second.
pub async fn http_get(port: u16, path: &str) -> Option<String> {
    let io = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        Some(String::from_utf8_lossy(&buf).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(1), io)
        .await
        .ok()
        .flatten()
}

pub fn redis_args(port: u16, dir: &Path, extra: &[&str]) -> Vec<String> {
    redis_args_on("127.0.0.1", port, dir, extra)
}

/// [`redis_args`] listening on `bind` (an address of the host, or of its network namespace).
pub fn redis_args_on(bind: &str, port: u16, dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--port",
        &port.to_string(),
        "--bind",
        bind,
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        &dir.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// The Redis channel or NATS subject of `topic` (as the bus names it, default prefix).
pub fn channel(kind: shardcast::BusKind, topic: &str) -> String {
    match kind {
        shardcast::BusKind::Nats => format!("{PREFIX}.{topic}"),
        _ => format!("{PREFIX}:{topic}"),
    }
}

/// What the tests do to a broker, whichever it is.
pub trait TestBroker {
    fn url(&self) -> BusUrl;
    /// Kills every broker process.
    fn kill(&mut self);
    /// Starts them again on the same ports and waits until they serve.
    async fn restart(&mut self);
    /// Sends `sig` (`-STOP`, `-CONT`) to every broker process.
    fn signal(&self, sig: &str);
    /// Subscriptions to `topic`'s channel, as the broker counts them (every node of it).
    async fn interest(&self, topic: &str) -> usize;
}

/// Waits until the broker counts exactly `n` subscriptions to `topic`.
pub async fn interest_is(broker: &impl TestBroker, topic: &str, n: usize) {
    let what = format!("the broker to count {n} subscriptions to {topic}");
    poll(&what, || async move { broker.interest(topic).await == n }).await;
}

/// `scheme://[:password@]127.0.0.1:port[,127.0.0.1:port…]`.
pub fn redis_url(scheme: &str, ports: &[u16], password: Option<&str>) -> BusUrl {
    let hosts: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let auth = password.map_or_else(String::new, |pw| format!(":{pw}@"));
    format!("{scheme}://{auth}{}", hosts.join(","))
        .parse()
        .expect("redis url")
}

/// The `redis-server` arguments that make it want `password` from clients (`requirepass`)
/// and give it to its primary (`masterauth`). None without a password.
fn auth_args(password: Option<&str>) -> Vec<&str> {
    password.map_or_else(Vec::new, |pw| vec!["--requirepass", pw, "--masterauth", pw])
}

pub struct Redis {
    broker: Proc,
    password: Option<String>,
    /// Its TLS port, when it serves TLS (the plain port stays open for the tests' own
    /// commands, on loopback).
    tls_port: Option<u16>,
    _dir: tempfile::TempDir,
}

impl Redis {
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// A Redis that wants `password` (`requirepass`), or none.
    pub async fn start_with(password: Option<&str>) -> Self {
        Self::start_opts(password, None, &[]).await
    }

    /// A Redis that wants `password` of the default user, serves TLS with `certs` when
    /// given, and takes `extra` arguments (an ACL `--user`).
    pub async fn start_opts(password: Option<&str>, certs: Option<&Certs>, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let tls_port = certs.map(|_| free_port());
        let bin = need("redis-server");
        let mut args = redis_args(port, dir.path(), &auth_args(password));
        if let (Some(certs), Some(tls_port)) = (certs, tls_port) {
            args.extend(certs.redis_args(tls_port));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let broker = Proc::spawn(&bin, args, port);
        poll("redis-server to answer PING", || {
            redis_ready(port, password)
        })
        .await;
        Self {
            broker,
            password: password.map(String::from),
            tls_port,
            _dir: dir,
        }
    }

    pub fn port(&self) -> u16 {
        self.broker.port
    }

    /// Its URL with `password` in it (the right one or not): `rediss://` to its TLS port
    /// when it serves TLS.
    pub fn url_with(&self, password: Option<&str>) -> BusUrl {
        match self.tls_port {
            Some(port) => redis_url("rediss", &[port], password),
            None => redis_url("redis", &[self.port()], password),
        }
    }

    /// Its URL with `userinfo` (`user:password`) in it.
    pub fn url_as(&self, userinfo: &str) -> BusUrl {
        let url = self.url_with(None);
        let (scheme, rest) = url.as_str().split_once("://").expect("a scheme");
        format!("{scheme}://{userinfo}@{rest}")
            .parse()
            .expect("redis url")
    }
}

impl TestBroker for Redis {
    fn url(&self) -> BusUrl {
        self.url_with(self.password.as_deref())
    }

    fn kill(&mut self) {
        self.broker.kill();
    }

    async fn restart(&mut self) {
        self.broker.restart();
        let (port, password) = (self.broker.port, self.password.as_deref());
        poll("redis-server to answer PING again", || {
            redis_ready(port, password)
        })
        .await;
    }

    fn signal(&self, sig: &str) {
        self.broker.signal(sig);
    }

    async fn interest(&self, topic: &str) -> usize {
        let ch = channel(shardcast::BusKind::Redis, topic);
        redis_numsub(self.broker.port, self.password.as_deref(), false, &ch).await
    }
}

pub struct RedisCluster {
    nodes: Vec<Proc>,
    password: Option<String>,
    /// The nodes' TLS ports, when they serve TLS (their plain ports stay open for the tests'
    /// own commands, on loopback).
    tls_ports: Option<Vec<u16>>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// A 3-node cluster whose every node wants `password` (`requirepass`, `masterauth`), or
    /// none.
    pub async fn start_with(password: Option<&str>) -> Self {
        Self::start_opts(password, None).await
    }

    /// [`RedisCluster::start_with`], serving TLS with `certs` when given: to clients, on the
    /// cluster bus and for replication; the cluster is created over TLS.
    pub async fn start_opts(password: Option<&str>, certs: Option<&Certs>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let cli = need("redis-cli");
        let bin = need("redis-server");
        let tls_ports: Option<Vec<u16>> = certs.map(|_| (0..3).map(|_| free_port()).collect());
        let nodes: Vec<Proc> = (0..3)
            .map(|i| {
                let port = free_port();
                let conf = dir.path().join(format!("nodes-{port}.conf"));
                let conf = conf.display().to_string();
                // The cluster bus defaults to port + 10000, past 65535 for half the
                // ephemeral range: give it a free port of its own (Redis 7's cluster-port).
                let bus_port = free_port().to_string();
                let mut extra = vec![
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &conf,
                    "--cluster-port",
                    &bus_port,
                ];
                extra.extend(auth_args(password));
                let mut args = redis_args(port, dir.path(), &extra);
                if let (Some(certs), Some(tls)) = (certs, &tls_ports) {
                    args.extend(certs.redis_args(tls[i]));
                }
                Proc::spawn(&bin, args, port)
            })
            .collect();
        for n in &nodes {
            let port = n.port;
            poll("a cluster node to answer PING", || {
                redis_ready(port, password)
            })
            .await;
        }
        let plain: Vec<u16> = nodes.iter().map(|n| n.port).collect();
        let addrs: Vec<String> = tls_ports
            .as_ref()
            .unwrap_or(&plain)
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        let mut create = Command::new(&cli);
        if let Some(pw) = password {
            create.args(["-a", pw, "--no-auth-warning"]);
        }
        if let Some(certs) = certs {
            create.args(["--tls", "--cacert"]).arg(&certs.ca);
        }
        let create = create
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output();
        let out = within(
            "redis-cli --cluster create",
            tokio::task::spawn_blocking(move || create),
        )
        .await
        .expect("redis-cli thread")
        .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = Self {
            nodes,
            password: password.map(String::from),
            tls_ports,
            _dir: dir,
        };
        cluster.wait_ok().await;
        cluster
    }

    pub async fn wait_ok(&self) {
        let password = self.password.as_deref();
        for port in self.ports() {
            poll("cluster_state:ok on every node", || async move {
                redis_cmd_auth(port, password, &["CLUSTER", "INFO"])
                    .await
                    .is_some_and(|r| r.text().contains("cluster_state:ok"))
            })
            .await;
        }
    }

    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// Its URL with `password` in it (the right one or not): `rediss+cluster://` to the TLS
    /// ports when it serves TLS.
    pub fn url_with(&self, password: Option<&str>) -> BusUrl {
        match &self.tls_ports {
            Some(ports) => redis_url("rediss+cluster", ports, password),
            None => redis_url("redis+cluster", &self.ports(), password),
        }
    }

    /// Makes node `i` announce `port` to clients (`cluster-announce-port`), as a node behind
    /// a proxy or a NAT does, and waits until every node's slot map says so.
    pub async fn announce_port(&self, i: usize, port: u16) {
        let password = self.password.as_deref();
        let node = self.nodes[i].port.to_string();
        let port_s = port.to_string();
        let set = ["CONFIG", "SET", "cluster-announce-port", &port_s];
        let ok = redis_cmd_auth(self.nodes[i].port, password, &set).await;
        assert!(
            matches!(&ok, Some(Resp::Simple(s)) if s == "OK"),
            "{node}: {ok:?}"
        );
        let want = format!("Int({port})");
        for p in self.ports() {
            poll("every node to announce the new port", || {
                let want = want.clone();
                async move {
                    redis_cmd_auth(p, password, &["CLUSTER", "SLOTS"])
                        .await
                        .is_some_and(|r| format!("{r:?}").contains(&want))
                }
            })
            .await;
        }
    }
}

impl TestBroker for RedisCluster {
    fn url(&self) -> BusUrl {
        self.url_with(self.password.as_deref())
    }

    fn kill(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
    }

    /// Restarts every node; each reloads its nodes-PORT.conf, so the cluster forms again.
    async fn restart(&mut self) {
        for n in &mut self.nodes {
            n.restart();
        }
        self.wait_ok().await;
    }

    fn signal(&self, sig: &str) {
        for n in &self.nodes {
            n.signal(sig);
        }
    }

    /// Summed over the primaries: only the one owning the channel's slot has subscribers.
    async fn interest(&self, topic: &str) -> usize {
        let ch = channel(shardcast::BusKind::RedisCluster, topic);
        let mut n = 0;
        for port in self.ports() {
            n += redis_numsub(port, self.password.as_deref(), true, &ch).await;
        }
        n
    }
}

pub struct Nats {
    pub broker: Proc,
    /// The monitoring port (`-m`), for `/connz?subs=1`.
    monitor: u16,
    /// The configuration file of a secured server, kept while it runs.
    _dir: Option<tempfile::TempDir>,
}

impl Nats {
    pub async fn start() -> Self {
        let port = free_port();
        let monitor = free_port();
        let args = [
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-m",
            &monitor.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let broker = Proc::spawn(&need("nats-server"), args, port);
        let nats = Self {
            broker,
            monitor,
            _dir: None,
        };
        nats.wait_ready().await;
        nats
    }

    /// A NATS server that serves TLS with `certs` (required of every client) when given, and
    /// whose `authorization` block is `authorization` (`user: a, password: b`, `token: t`).
    pub async fn start_secured(certs: Option<&Certs>, authorization: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let monitor = free_port();
        let mut conf = format!(
            "listen: \"127.0.0.1:{port}\"\nhttp: \"127.0.0.1:{monitor}\"\nauthorization {{ {authorization} }}\n"
        );
        if let Some(c) = certs {
            conf += &format!(
                "tls {{ cert_file: {:?}, key_file: {:?}, timeout: 2 }}\n",
                c.cert.display().to_string(),
                c.key.display().to_string()
            );
        }
        let file = dir.path().join("nats.conf");
        std::fs::write(&file, conf).expect("write nats.conf");
        let args = vec!["-c".to_string(), file.display().to_string()];
        let broker = Proc::spawn(&need("nats-server"), args, port);
        let nats = Self {
            broker,
            monitor,
            _dir: Some(dir),
        };
        nats.wait_ready().await;
        nats
    }

    /// `scheme://userinfo@127.0.0.1:port` (no `@` when `userinfo` is empty).
    pub fn url_as(&self, scheme: &str, userinfo: &str) -> BusUrl {
        let at = if userinfo.is_empty() { "" } else { "@" };
        format!("{scheme}://{userinfo}{at}127.0.0.1:{}", self.broker.port)
            .parse()
            .expect("nats url")
    }

    pub async fn wait_ready(&self) {
        let (port, monitor) = (self.broker.port, self.monitor);
        poll("nats-server to send INFO and serve /varz", || async move {
            let info = async {
                let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
                let mut buf = [0u8; 4];
                s.read_exact(&mut buf).await.ok()?;
                Some(buf == *b"INFO")
            };
            let info = tokio::time::timeout(Duration::from_secs(1), info).await;
            matches!(info, Ok(Some(true))) && http_get(monitor, "/varz").await.is_some()
        })
        .await;
    }
}

impl TestBroker for Nats {
    fn url(&self) -> BusUrl {
        format!("nats://127.0.0.1:{}", self.broker.port)
            .parse()
            .expect("nats url")
    }

    fn kill(&mut self) {
        self.broker.kill();
    }

    async fn restart(&mut self) {
        self.broker.restart();
        self.wait_ready().await;
    }

    fn signal(&self, sig: &str) {
        self.broker.signal(sig);
    }

    /// Connections listing the subject among their subscriptions (each node subscribes to a
    /// subject once).
    async fn interest(&self, topic: &str) -> usize {
        let subject = format!("\"{}\"", channel(shardcast::BusKind::Nats, topic));
        http_get(self.monitor, "/connz?subs=1&limit=1024")
            .await
            .map_or(0, |r| r.matches(&subject).count())
    }
}

// ---------------------------------------------------------------------------------------
// A proxy that can go silent

/// A TCP proxy on loopback in front of a broker. Once [`Proxy::gag`] is called, the bytes
/// the broker sends on the connections open at that moment are read and thrown away: the
/// node's side of the connection still looks healthy (writes succeed, nothing closes) but
/// nothing comes back. Connections opened later are forwarded normally.
pub struct Proxy {
    pub port: u16,
    links: Arc<Mutex<Vec<Arc<Link>>>>,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

#[derive(Default)]
pub struct Link {
    /// The node sent a (S)SUBSCRIBE on it: Redis's pub/sub connection.
    subscriber: AtomicBool,
    gagged: AtomicBool,
}

impl Proxy {
    pub async fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let links: Arc<Mutex<Vec<Arc<Link>>>> = Arc::default();
        let tasks: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (l, t) = (Arc::clone(&links), Arc::clone(&tasks));
        let accept = tokio::spawn(async move {
            while let Ok((node, _)) = listener.accept().await {
                let Ok(broker) = TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                let link = Arc::new(Link::default());
                l.lock()
                    .expect("no test thread panicked holding the lock")
                    .push(Arc::clone(&link));
                let (mut nr, mut nw) = node.into_split();
                let (mut br, mut bw) = broker.into_split();
                let up_link = Arc::clone(&link);
                let up = tokio::spawn(async move {
                    let mut buf = vec![0u8; 16384];
                    while let Ok(n) = nr.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if find(&buf[..n], b"SUBSCRIBE").is_some() {
                            up_link.subscriber.store(true, Ordering::Relaxed);
                        }
                        if bw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = bw.shutdown().await;
                });
                let down = tokio::spawn(async move {
                    let mut buf = vec![0u8; 16384];
                    while let Ok(n) = br.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if link.gagged.load(Ordering::Relaxed) {
                            continue;
                        }
                        if nw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = nw.shutdown().await;
                });
                t.lock()
                    .expect("no test thread panicked holding the lock")
                    .extend([up.abort_handle(), down.abort_handle()]);
            }
        });
        tasks
            .lock()
            .expect("no test thread panicked holding the lock")
            .push(accept.abort_handle());
        Self { port, links, tasks }
    }

    /// Silences the open connections: Redis's pub/sub ones when `subscribers_only`, else all.
    /// Returns how many.
    pub fn gag(&self, subscribers_only: bool) -> usize {
        let links = self
            .links
            .lock()
            .expect("no test thread panicked holding the lock");
        let mut n = 0;
        for link in links.iter() {
            if !subscribers_only || link.subscriber.load(Ordering::Relaxed) {
                link.gagged.store(true, Ordering::Relaxed);
                n += 1;
            }
        }
        n
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for t in self.tasks.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            t.abort();
        }
    }
}
