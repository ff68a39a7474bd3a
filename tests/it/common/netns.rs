//! Separate hosts on this one machine, for the network fault tests (`netfault`): network
//! namespaces joined by a bridge ([`Net`]), faults injected with nftables in a host's own
//! namespace ([`Net::partition`], [`Net::loss`]), and forwarders ([`Agent`]) that let the
//! test process, which stays in the machine's own namespace, reach a host, or that sit
//! between two hosts and delay what they forward. On top of these, a Redis ([`NsRedis`]) and
//! `shardcast serve` processes ([`Node`]) run inside namespaces.
//!
//! Addresses: every host gets one in 169.254.77.0/24, a link-local range that no router
//! forwards, assigned to a veth interface inside a namespace this harness created. Nothing
//! here routes to them from the machine's own namespace: the test reaches them only through
//! an [`Agent`], which listens on 127.0.0.1. Each [`Net`] has its own bridge namespace, so
//! the same addresses in two concurrent tests (or test runs) never meet.
//!
//! Names: every namespace is `scnf<pid>x<n><host>`, unique per process and per [`Net`], and
//! the veth interfaces are created inside those namespaces (never in the machine's own), so
//! parallel runs do not clash. Dropping a [`Net`] deletes its namespaces, and with them their
//! interfaces and nftables tables, also when the test fails.
//!
//! Needs root, `ip` (iproute2) and `nft` (nftables); [`Net::new`] fails the test saying what
//! to install when one is missing.

use std::io::Write;
use std::net::TcpListener as StdListener;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::Instant;
use tokio_tungstenite::MaybeTlsStream;

use super::brokers::{Proc, http_get, need_from, poll, redis_args_on, redis_ready};
use super::{Ws, within};

/// The first three octets of every host's address (link-local: never leaves the machine).
pub const SUBNET: &str = "169.254.77";

/// The port every node listens on, in its own namespace.
pub const NODE_PORT: u16 = 8080;

/// The variable that makes the test binary an [`Agent`] (see [`agent_main`]).
pub const AGENT_ENV: &str = "SHARDCAST_NETFAULT_AGENT";

/// The test that [`agent_main`] runs in: `netfault::agent_process`.
const AGENT_TEST: &str = "netfault::agent_process";

/// Runs `bin args`, failing the test with its stderr if it fails; feeds it `stdin`.
fn run(bin: &str, args: &[&str], stdin: &str) -> String {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("failed to start {bin}: {e}"));
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{bin} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) {
    run("ip", args, "");
}

/// Hosts in network namespaces, each with one address on a shared bridge.
pub struct Net {
    tag: String,
    /// Every namespace made so far, the bridge's first: deleted on drop.
    made: Vec<String>,
    hosts: Vec<(String, u8)>,
}

impl Net {
    /// A bridge and one namespace per `(host, last octet of its address)`.
    pub fn new(hosts: &[(&str, u8)]) -> Self {
        need_from("ip", "iproute2");
        need_from("nft", "nftables");
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let tag = format!(
            "scnf{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut net = Self {
            tag,
            made: Vec::new(),
            hosts: Vec::new(),
        };
        let sw = net.ns("sw");
        ip(&["netns", "add", &sw]);
        net.made.push(sw.clone());
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &sw, "link", "set", "br0", "up"]);
        for (i, &(host, octet)) in hosts.iter().enumerate() {
            let ns = net.ns(host);
            ip(&["netns", "add", &ns]);
            net.made.push(ns.clone());
            net.hosts.push((host.to_string(), octet));
            let port = format!("v{i}");
            ip(&[
                "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ]);
            ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"]);
            let cidr = format!("{SUBNET}.{octet}/24");
            ip(&["-n", &ns, "addr", "add", &cidr, "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        net
    }

    /// The namespace of `host`.
    pub fn ns(&self, host: &str) -> String {
        format!("{}{host}", self.tag)
    }

    /// The address of `host`.
    pub fn ip(&self, host: &str) -> String {
        let octet = self
            .hosts
            .iter()
            .find(|(h, _)| h == host)
            .unwrap_or_else(|| panic!("no host {host}"))
            .1;
        format!("{SUBNET}.{octet}")
    }

    /// `ip:port` of `host`.
    pub fn addr(&self, host: &str, port: u16) -> String {
        format!("{}:{port}", self.ip(host))
    }

    /// Runs `nft -f -` with `script` in `host`'s namespace; returns what it prints.
    pub fn nft(&self, host: &str, script: &str) -> String {
        run(
            "ip",
            &["netns", "exec", &self.ns(host), "nft", "-f", "-"],
            script,
        )
    }

    /// Cuts `host` off from `peer`: every packet between them is dropped, both ways, in
    /// `host`'s namespace. Connections stay open on both sides; nothing is refused.
    pub fn partition(&self, host: &str, peer: &str) {
        let peer = self.ip(peer);
        self.nft(
            host,
            &format!(
                "table inet netfault_partition {{
                   chain input {{ type filter hook input priority 0; ip saddr {peer} drop; }}
                   chain output {{ type filter hook output priority 0; ip daddr {peer} drop; }}
                 }}"
            ),
        );
    }

    /// Ends [`Net::partition`].
    pub fn heal(&self, host: &str) {
        self.nft(host, "delete table inet netfault_partition");
    }

    /// Drops `percent` % of the packets that arrive in `host`'s namespace, at random
    /// (`numgen random`), counting them.
    pub fn loss(&self, host: &str, percent: u32) {
        self.nft(
            host,
            &format!(
                "table inet netfault_loss {{
                   chain input {{
                     type filter hook input priority 0;
                     iifname \"eth0\" numgen random mod 100 < {percent} counter drop;
                   }}
                 }}"
            ),
        );
    }

    /// Packets [`Net::loss`] has dropped so far.
    pub fn lost(&self, host: &str) -> u64 {
        let out = run(
            "ip",
            &[
                "netns",
                "exec",
                &self.ns(host),
                "nft",
                "list",
                "table",
                "inet",
                "netfault_loss",
            ],
            "",
        );
        out.split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no packet counter in {out}"))
    }

    /// `ip netns exec <host's namespace> bin args...`, as a [`Proc`].
    fn spawn(
        &self,
        host: &str,
        bin: &str,
        args: Vec<String>,
        port: u16,
        setup: impl FnOnce(&mut Command),
    ) -> Proc {
        let mut all = vec![
            "netns".to_string(),
            "exec".into(),
            self.ns(host),
            bin.to_string(),
        ];
        all.extend(args);
        Proc::spawn_with("ip", all, port, setup)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // The hosts first, then the bridge; deleting a namespace deletes its interfaces
        // (and their veth peers) and its nftables tables.
        for ns in self.made.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Agents: the test binary again, forwarding TCP inside a namespace

/// A TCP forwarder running in a host's namespace: the test binary started again under
/// `ip netns exec` as the test `netfault::agent_process`, which [`agent_main`] turns into a
/// forwarder. Killed when dropped; it also exits on its own once the test process is gone.
pub struct Agent {
    _proc: Proc,
    /// The loopback port of a gateway; 0 for a proxy.
    pub port: u16,
}

impl Agent {
    /// A gateway: connections to 127.0.0.1:[`Agent::port`], in the machine's own namespace,
    /// are forwarded to `target` from inside `host`'s namespace. The listener is bound here
    /// and handed to the agent as its stdin, so it keeps the namespace it was made in and
    /// takes connections before the agent even runs.
    pub fn gateway(net: &Net, host: &str, target: &str) -> Self {
        let listener = StdListener::bind("127.0.0.1:0").expect("bind a gateway port");
        let port = listener.local_addr().expect("gateway addr").port();
        let proc = Self::spawn(net, host, "stdin", target, Duration::ZERO, |c| {
            c.stdin(Stdio::from(OwnedFd::from(listener)));
        });
        Self { _proc: proc, port }
    }

    /// A proxy listening on `listen` inside `host`'s namespace that forwards to `target`,
    /// holding the bytes of each direction for `delay` first.
    pub fn proxy(net: &Net, host: &str, listen: &str, target: &str, delay: Duration) -> Self {
        let proc = Self::spawn(net, host, listen, target, delay, |c| {
            c.stdin(Stdio::null());
        });
        Self {
            _proc: proc,
            port: 0,
        }
    }

    fn spawn(
        net: &Net,
        host: &str,
        listen: &str,
        target: &str,
        delay: Duration,
        setup: impl FnOnce(&mut Command),
    ) -> Proc {
        let exe = std::env::current_exe().expect("the test binary's path");
        let spec = format!("{listen} {target} {}", delay.as_millis());
        let args = [
            AGENT_TEST,
            "--exact",
            "--include-ignored",
            "--test-threads",
            "1",
        ];
        net.spawn(
            host,
            &exe.display().to_string(),
            args.iter().map(|s| s.to_string()).collect(),
            0,
            |c| {
                c.env(AGENT_ENV, spec);
                setup(c);
            },
        )
    }

    /// A WebSocket to `ws://{target}{path}` through this gateway (whose target it must be).
    pub async fn ws(&self, target: &str, path: &str) -> Ws {
        let tcp = within("a connection to the gateway", async {
            TcpStream::connect(("127.0.0.1", self.port))
                .await
                .expect("connect to the gateway")
        })
        .await;
        tcp.set_nodelay(true).expect("nodelay");
        let url = format!("ws://{target}{path}");
        let (ws, res) = within(
            "a websocket handshake through the gateway",
            tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(tcp)),
        )
        .await
        .expect("websocket handshake");
        assert_eq!(res.status(), 101);
        ws
    }
}

/// What the test binary does when it is an [`Agent`]: reads its job from [`AGENT_ENV`]
/// (`<listen> <target> <delay ms>`, `listen` being an address or `stdin` for a listener
/// handed over as fd 0) and forwards until killed or orphaned. Returns at once when the
/// variable is not set, which is every ordinary run of the test.
pub fn agent_main() {
    let Ok(spec) = std::env::var(AGENT_ENV) else {
        return;
    };
    let mut words = spec.split(' ');
    let (Some(listen), Some(target), Some(delay)) = (words.next(), words.next(), words.next())
    else {
        panic!("bad {AGENT_ENV}: {spec:?}");
    };
    let (listen, target) = (listen.to_string(), target.to_string());
    let delay = Duration::from_millis(delay.parse().expect("delay in ms"));
    let parent = std::os::unix::process::parent_id();
    std::thread::spawn(move || {
        loop {
            if std::os::unix::process::parent_id() != parent {
                std::process::exit(0);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async move {
        let listener = if listen == "stdin" {
            let fd = std::io::stdin()
                .as_fd()
                .try_clone_to_owned()
                .expect("the listener on fd 0");
            let l = StdListener::from(fd);
            l.set_nonblocking(true).expect("nonblocking");
            tokio::net::TcpListener::from_std(l).expect("a tokio listener")
        } else {
            tokio::net::TcpListener::bind(&listen)
                .await
                .unwrap_or_else(|e| panic!("bind {listen}: {e}"))
        };
        loop {
            let Ok((inbound, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(link(inbound, target.clone(), delay));
        }
    });
}

/// Forwards between `inbound` and a new connection to `target`, both ways.
async fn link(inbound: TcpStream, target: String, delay: Duration) {
    let Ok(outbound) = TcpStream::connect(&target).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (ir, iw) = inbound.into_split();
    let (or, ow) = outbound.into_split();
    tokio::join!(pipe(ir, ow, delay), pipe(or, iw, delay));
}

/// Copies `r` to `w`, each chunk written `delay` after it was read. At most 64 chunks of
/// 16 KiB wait at once: beyond that the reader stops reading, and TCP pushes back.
async fn pipe(mut r: OwnedReadHalf, mut w: OwnedWriteHalf, delay: Duration) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(64);
    let reader = async move {
        let mut buf = vec![0u8; 16384];
        while let Ok(n @ 1..) = r.read(&mut buf).await {
            if tx
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .await
                .is_err()
            {
                break;
            }
        }
    };
    let writer = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if w.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = w.shutdown().await;
    };
    tokio::join!(reader, writer);
}

// ---------------------------------------------------------------------------------------
// A Redis and shardcast nodes in namespaces

/// `redis-server` on port 6379 of `host`, with a gateway for the test's own commands.
pub struct NsRedis {
    _proc: Proc,
    /// Its gateway: `brokers::redis_cmd(admin.port, ..)` reaches it.
    pub admin: Agent,
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl NsRedis {
    pub async fn start(net: &Net, host: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = need_from("redis-server", "redis-server");
        let addr = net.addr(host, 6379);
        // Not in protected mode, which takes only loopback clients: the nodes come from
        // other namespaces, over the link-local bridge of this test alone.
        let args = redis_args_on(&net.ip(host), 6379, dir.path(), &["--protected-mode", "no"]);
        let proc = net.spawn(host, &bin, args, 6379, |_| {});
        let admin = Agent::gateway(net, host, &addr);
        let port = admin.port;
        poll("redis-server in its namespace to answer PING", || {
            redis_ready(port, None)
        })
        .await;
        Self {
            _proc: proc,
            admin,
            addr,
            _dir: dir,
        }
    }
}

/// A `shardcast serve` process on [`NODE_PORT`] of `host`, with a gateway from the test
/// (in `host`'s own namespace, so partitions elsewhere never cut it) for `/metrics` and
/// the node's local clients.
pub struct Node {
    proc: Proc,
    pub admin: Agent,
    pub addr: String,
}

impl Node {
    /// Starts it with `extra` arguments after `serve --listen … --shards 1` and waits until
    /// it serves `/livez`.
    pub async fn start(net: &Net, host: &str, extra: &[&str]) -> Self {
        let addr = net.addr(host, NODE_PORT);
        let mut args: Vec<String> = ["serve", "--listen", &addr, "--shards", "1"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect();
        args.extend(["--drain-delay".into(), "0s".into()]);
        let proc = net.spawn(
            host,
            env!("CARGO_BIN_EXE_shardcast"),
            args,
            NODE_PORT,
            |_| {},
        );
        let admin = Agent::gateway(net, host, &addr);
        let port = admin.port;
        poll("the node in its namespace to serve /livez", || async move {
            http_get(port, "/livez")
                .await
                .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
        })
        .await;
        Self { proc, admin, addr }
    }

    /// Its `/metrics` text (through its gateway).
    pub async fn metrics(&self) -> String {
        within("/metrics", async {
            loop {
                if let Some(text) = http_get(self.admin.port, "/metrics").await {
                    return text;
                }
            }
        })
        .await
    }

    /// The sum of every series of `name` (all its labels) in its `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        metric_sum(&self.metrics().await, name)
    }

    /// Polls its `/metrics` until `done` holds for the sum of `name`; returns that value.
    pub async fn metric_until(&self, name: &str, done: impl Fn(f64) -> bool) -> f64 {
        let mut last = f64::NAN;
        let what = format!("{name} in /metrics");
        within(&what, async {
            loop {
                last = self.metric(name).await;
                if done(last) {
                    return last;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }

    /// A WebSocket to this node, as one of its local clients.
    pub async fn ws(&self, path: &str) -> Ws {
        self.admin.ws(&self.addr, path).await
    }

    /// Its resident memory, read from /proc.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(
            Path::new("/proc")
                .join(self.proc.pid().to_string())
                .join("status"),
        )
        .expect("the node's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmRSS")
            * 1024
    }
}

/// The sum of every series of `name` (any labels) in a `/metrics` text; fails the test if
/// there is none.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    let values: Vec<f64> = text
        .lines()
        .filter_map(|l| l.strip_prefix(name))
        .filter_map(|rest| match rest.as_bytes().first() {
            Some(b' ') => Some(rest),
            Some(b'{') => rest.split_once("} ").map(|(_, v)| v),
            _ => None,
        })
        .map(|v| v.trim().parse::<f64>().expect("a number"))
        .collect();
    assert!(!values.is_empty(), "no {name} in /metrics:\n{text}");
    values.iter().sum()
}
