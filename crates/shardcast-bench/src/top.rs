//! `shardcast top`: a live terminal view of one or several nodes' `/metrics`, refreshed every
//! interval and sorted by what is busiest: connections, publishes and deliveries per second,
//! disconnects by reason, fan-out p99, readiness and the bus. Plain text and ANSI clear-screen;
//! scraping is a blocking `GET` per node on its own thread. The series themselves are
//! defined by the server (`shardcast-server`'s `metrics.rs`), not here.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use clap::Args;
use shardcast_core::units::parse_duration;

use crate::Error;
use crate::report::si;

/// Watch the /metrics of one or several shardcast nodes, like `top`.
#[derive(Debug, Clone, Args)]
pub struct TopArgs {
    /// A node's metrics URL, or its host:port (repeatable) [default: http://127.0.0.1:8080/metrics].
    #[arg(long = "url", value_name = "URL")]
    pub urls: Vec<String>,
    /// Time between two refreshes.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Stop after this many refreshes [default: run until interrupted].
    #[arg(long)]
    pub iterations: Option<u64>,
}

/// Reasons shown in their own column; the others are summed under `other`.
const DROP_REASONS: [(&str, &str); 3] = [
    ("slow_consumer", "slow/s"),
    ("pong_timeout", "pong/s"),
    ("write_timeout", "wto/s"),
];

/// One scrape of one node: every sample by its name and labels, as written.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scrape {
    samples: HashMap<String, f64>,
}

impl Scrape {
    /// Parses the Prometheus (or OpenMetrics) text format; comments and bad lines are skipped.
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let (key, value) = l.rsplit_once(' ')?;
                Some((key.trim().to_string(), value.trim().parse().ok()?))
            })
            .collect();
        Self { samples }
    }

    /// The sample of `name` with no labels.
    pub(crate) fn get(&self, name: &str) -> Option<f64> {
        self.samples.get(name).copied()
    }

    /// The sum of every sample of `name`, whatever its labels (with `filter` in them).
    pub(crate) fn sum(&self, name: &str, filter: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(k, _)| {
                k.strip_prefix(name)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('{'))
                    && k.contains(filter)
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// Cumulative `(le, count)` buckets of histogram `name`, sorted by bound.
    fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let prefix = format!("{name}_bucket{{");
        let mut out: Vec<(f64, f64)> = self
            .samples
            .iter()
            .filter_map(|(k, v)| {
                let labels = k.strip_prefix(&prefix)?;
                let le = labels.split("le=\"").nth(1)?.split('"').next()?;
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((bound, *v))
            })
            .collect();
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        out
    }
}

/// The `q` quantile of the observations between two cumulative bucket sets, interpolated
/// within the bucket as Prometheus's `histogram_quantile` does. `None` without observations.
pub fn quantile(q: f64, before: &[(f64, f64)], now: &[(f64, f64)]) -> Option<f64> {
    let delta: Vec<(f64, f64)> = now
        .iter()
        .map(|&(le, n)| {
            let old = before.iter().find(|b| b.0 == le).map_or(0.0, |b| b.1);
            (le, (n - old).max(0.0))
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, n) in &delta {
        if n >= rank {
            if le.is_infinite() {
                return Some(lower.0); // as Prometheus: the highest finite bound
            }
            let within = if n > lower.1 {
                (rank - lower.1) / (n - lower.1)
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * within);
        }
        lower = (le, n);
    }
    None
}

/// One node's line: what changed between two scrapes.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub node: String,
    /// `None`: the node did not answer (the reason is in `state`).
    pub connections: Option<f64>,
    pub state: String,
    pub publishes: f64,
    pub deliveries: f64,
    /// Disconnects per second for each of [`DROP_REASONS`], then all the others.
    pub drops: [f64; DROP_REASONS.len() + 1],
    pub fanout_p99: Option<f64>,
    pub bus: &'static str,
}

impl Row {
    /// The row for `node` from its previous and current scrapes, `secs` apart.
    pub fn new(node: &str, before: Option<&Scrape>, now: Result<&Scrape, &str>, secs: f64) -> Row {
        let now = match now {
            Ok(s) => s,
            Err(why) => {
                return Row {
                    node: node.to_string(),
                    connections: None,
                    state: format!("down: {why}"),
                    publishes: 0.0,
                    deliveries: 0.0,
                    drops: [0.0; DROP_REASONS.len() + 1],
                    fanout_p99: None,
                    bus: "-",
                };
            }
        };
        let rate = |name: &str, filter: &str| match before {
            Some(b) if secs > 0.0 => {
                ((now.sum(name, filter) - b.sum(name, filter)) / secs).max(0.0)
            }
            _ => 0.0,
        };
        let mut drops = [0.0; DROP_REASONS.len() + 1];
        let all = rate("shardcast_disconnects_total", "");
        for (slot, (reason, _)) in drops.iter_mut().zip(DROP_REASONS) {
            *slot = rate(
                "shardcast_disconnects_total",
                &format!("reason=\"{reason}\""),
            );
        }
        let shown: f64 = drops[..DROP_REASONS.len()].iter().sum();
        drops[DROP_REASONS.len()] = (all - shown).max(0.0);
        let fanout = "shardcast_publish_fanout_seconds";
        let fanout_p99 =
            before.and_then(|b| quantile(0.99, &b.buckets(fanout), &now.buckets(fanout)));
        let state = match now.get("shardcast_ready") {
            Some(0.0) => "draining",
            _ => "ready",
        };
        let bus = match now.get("shardcast_bus_connected") {
            None => "-",
            Some(c) if c > 0.0 => "up",
            Some(_) => "DOWN",
        };
        Row {
            node: node.to_string(),
            connections: Some(now.sum("shardcast_connections", "")),
            state: state.to_string(),
            publishes: rate("shardcast_messages_published_total", ""),
            deliveries: rate("shardcast_deliveries_total", ""),
            drops,
            fanout_p99,
            bus,
        }
    }
}

/// The screen: a header, then one row per node, busiest (deliveries, then connections) first.
pub fn render(mut rows: Vec<Row>, interval: Duration, at: &str) -> String {
    rows.sort_by(|a, b| {
        b.deliveries.total_cmp(&a.deliveries).then(
            b.connections
                .unwrap_or(-1.0)
                .total_cmp(&a.connections.unwrap_or(-1.0)),
        )
    });
    let up = rows.iter().filter(|r| r.connections.is_some()).count();
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "shardcast top  {at}  {up}/{} nodes up  every {:?}  (Ctrl-C quits)",
        rows.len(),
        interval
    );
    let total = |f: fn(&Row) -> f64| si(rows.iter().map(f).sum());
    let _ = writeln!(
        out,
        "total: {} connections  {} publishes/s  {} deliveries/s\n",
        total(|r| r.connections.unwrap_or(0.0)),
        total(|r| r.publishes),
        total(|r| r.deliveries),
    );
    let mut head = format!(
        "{:<22} {:>9} {:>9} {:>10}",
        "NODE", "CONNS", "PUB/S", "DELIV/S"
    );
    for (_, label) in DROP_REASONS {
        let _ = write!(head, " {label:>7}");
    }
    let _ = write!(
        head,
        " {:>7} {:>9} {:>5}  STATE",
        "other/s", "FANOUT99", "BUS"
    );
    let _ = writeln!(out, "{head}");
    for r in &rows {
        let conns = r.connections.map_or("-".to_string(), si);
        let _ = write!(
            out,
            "{:<22} {conns:>9} {:>9} {:>10}",
            r.node,
            si(r.publishes),
            si(r.deliveries)
        );
        for d in r.drops {
            let _ = write!(out, " {:>7}", si(d));
        }
        let p99 = r
            .fanout_p99
            .map_or("-".to_string(), |s| format!("{:.1}ms", s * 1e3));
        let _ = writeln!(out, " {p99:>9} {:>5}  {}", r.bus, r.state);
    }
    out
}

/// Where to `GET` a node's metrics: `(address to dial, Host header, path, label)`.
fn target(url: &str) -> Result<(String, String, String, String), Error> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    if url.contains("://") && !url.starts_with("http://") {
        return Err(Error::BadArgs(format!(
            "--url {url}: only http:// is supported (put /metrics on a plain listener with --metrics-listen)"
        )));
    }
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    if host.is_empty() {
        return Err(Error::BadArgs(format!("--url {url}: no host")));
    }
    let addr = if host.contains(':') && !host.ends_with(']') {
        host.to_string()
    } else {
        format!("{host}:80")
    };
    Ok((addr, host.to_string(), path.to_string(), host.to_string()))
}

/// One `GET`, bounded by `timeout` for connecting and for each read and write.
fn scrape(addr: &str, host: &str, path: &str, timeout: Duration) -> Result<Scrape, String> {
    let sock = addr
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("no address")?;
    let mut s = TcpStream::connect_timeout(&sock, timeout).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut body = Vec::new();
    s.take(MAX_METRICS)
        .read_to_end(&mut body)
        .map_err(|e| e.to_string())?;
    parse_response(&body)
}

/// Metrics are a few KiB; a node that sends more than 4 MiB is not a shardcast node.
pub(crate) const MAX_METRICS: u64 = 4 << 20;

/// A whole `GET /metrics` response (read to its end: `Connection: close`) as a [`Scrape`].
pub(crate) fn parse_response(body: &[u8]) -> Result<Scrape, String> {
    let text = String::from_utf8_lossy(body);
    let (head, rest) = text.split_once("\r\n\r\n").ok_or("no response")?;
    let status = head.split_whitespace().nth(1).unwrap_or("?");
    if status != "200" {
        return Err(format!("HTTP {status}"));
    }
    Ok(Scrape::parse(rest))
}

/// `HH:MM:SS` UTC.
fn clock(t: std::time::SystemTime) -> String {
    let s = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        % 86_400;
    format!("{:02}:{:02}:{:02} UTC", s / 3600, s / 60 % 60, s % 60)
}

/// Runs `shardcast top` until interrupted or `--iterations` refreshes.
pub fn run_top(args: &TopArgs) -> Result<(), Error> {
    let urls = if args.urls.is_empty() {
        vec!["http://127.0.0.1:8080/metrics".to_string()]
    } else {
        args.urls.clone()
    };
    let targets = urls
        .iter()
        .map(|u| target(u))
        .collect::<Result<Vec<_>, _>>()?;
    let timeout = args
        .interval
        .clamp(Duration::from_millis(100), Duration::from_secs(2));
    let tty = std::io::stdout().is_terminal();
    let mut before: Vec<Option<Scrape>> = vec![None; targets.len()];
    let mut last = Instant::now();
    let mut n = 0u64;
    loop {
        let started = Instant::now();
        let scrapes: Vec<Result<Scrape, String>> = std::thread::scope(|s| {
            let handles: Vec<_> = targets
                .iter()
                .map(|(addr, host, path, _)| s.spawn(move || scrape(addr, host, path, timeout)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("scrape panicked".into())))
                .collect()
        });
        let secs = started.duration_since(last).as_secs_f64();
        last = started;
        let rows = targets
            .iter()
            .zip(&scrapes)
            .zip(&before)
            .map(|(((_, _, _, label), now), prev)| {
                Row::new(
                    label,
                    prev.as_ref(),
                    now.as_ref().map_err(String::as_str),
                    secs,
                )
            })
            .collect();
        let at = clock(std::time::SystemTime::now());
        let screen = render(rows, args.interval, &at);
        let mut out = std::io::stdout().lock();
        let written = if tty {
            // Home and clear, then the screen: no scrolling history of old frames.
            write!(out, "\x1b[H\x1b[2J{screen}")
        } else {
            writeln!(out, "{screen}")
        };
        if written.and_then(|()| out.flush()).is_err() {
            return Ok(()); // stdout closed (a pipe to `head`): nothing left to show
        }
        drop(out);
        before = scrapes.into_iter().map(Result::ok).collect();
        n += 1;
        if args.iterations.is_some_and(|max| n >= max) {
            return Ok(());
        }
        std::thread::sleep(args.interval.saturating_sub(started.elapsed()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "# TYPE shardcast_connections gauge
shardcast_connections{shard=\"0\"} 3
shardcast_connections{shard=\"1\"} 4
shardcast_deliveries_total 1000
shardcast_messages_published_total{source=\"ws\"} 10
shardcast_messages_published_total{source=\"http\"} 5
shardcast_disconnects_total{reason=\"slow_consumer\"} 1
shardcast_disconnects_total{reason=\"client_close\"} 7
shardcast_publish_fanout_seconds_bucket{le=\"0.001\"} 10
shardcast_publish_fanout_seconds_bucket{le=\"0.01\"} 10
shardcast_publish_fanout_seconds_bucket{le=\"+Inf\"} 10
shardcast_ready 1
# EOF
";

    const NOW: &str = "shardcast_connections{shard=\"0\"} 5
shardcast_connections{shard=\"1\"} 4
shardcast_deliveries_total 3000
shardcast_messages_published_total{source=\"ws\"} 20
shardcast_messages_published_total{source=\"http\"} 15
shardcast_disconnects_total{reason=\"slow_consumer\"} 3
shardcast_disconnects_total{reason=\"client_close\"} 11
shardcast_publish_fanout_seconds_bucket{le=\"0.001\"} 10
shardcast_publish_fanout_seconds_bucket{le=\"0.01\"} 110
shardcast_publish_fanout_seconds_bucket{le=\"+Inf\"} 110
shardcast_ready 0
shardcast_bus_connected 1
";

    #[test]
    fn a_row_is_the_rates_between_two_scrapes() {
        let (a, b) = (Scrape::parse(BEFORE), Scrape::parse(NOW));
        let row = Row::new("n1", Some(&a), Ok(&b), 2.0);
        assert_eq!(row.connections, Some(9.0));
        assert_eq!(row.deliveries, 1000.0);
        assert_eq!(row.publishes, 10.0);
        assert_eq!(row.drops, [1.0, 0.0, 0.0, 2.0]);
        assert_eq!(row.state, "draining");
        assert_eq!(row.bus, "up");
        // 100 new observations, all in (1 ms, 10 ms]: p99 interpolates to 9.91 ms.
        let p99 = row.fanout_p99.expect("observations");
        assert!((p99 - 0.00991).abs() < 1e-9, "{p99}");
    }

    #[test]
    fn the_first_scrape_has_no_rates_and_a_down_node_says_why() {
        let now = Scrape::parse(NOW);
        let first = Row::new("n1", None, Ok(&now), 0.0);
        assert_eq!((first.deliveries, first.fanout_p99), (0.0, None));
        let down = Row::new("n2", None, Err("connection refused"), 1.0);
        assert_eq!(down.connections, None);
        assert_eq!(down.state, "down: connection refused");
    }

    #[test]
    fn the_screen_lists_the_busiest_node_first() {
        let (a, b) = (Scrape::parse(BEFORE), Scrape::parse(NOW));
        let busy = Row::new("busy:8080", Some(&a), Ok(&b), 1.0);
        let idle = Row::new("idle:8080", Some(&b), Ok(&b), 1.0);
        let down = Row::new("gone:8080", None, Err("refused"), 1.0);
        let screen = render(vec![idle, down, busy], Duration::from_secs(1), "now");
        let lines: Vec<&str> = screen.lines().collect();
        assert!(lines[0].contains("2/3 nodes up"), "{screen}");
        assert!(lines[3].starts_with("NODE"), "{screen}");
        assert!(lines[4].starts_with("busy:8080"), "{screen}");
        assert!(
            lines[4].contains(" 2.0k "),
            "deliveries per second: {screen}"
        );
        assert!(lines[5].starts_with("idle:8080"), "{screen}");
        assert!(lines[6].starts_with("gone:8080") && lines[6].ends_with("down: refused"));
    }

    #[test]
    fn urls_name_a_host_and_a_path() {
        let t = target("http://127.0.0.1:9090/metrics").expect("valid");
        assert_eq!((t.0.as_str(), t.2.as_str()), ("127.0.0.1:9090", "/metrics"));
        let t = target("127.0.0.1:8080").expect("valid");
        assert_eq!((t.0.as_str(), t.2.as_str()), ("127.0.0.1:8080", "/metrics"));
        assert!(target("https://x/metrics").is_err());
        assert!(target("http:///metrics").is_err());
    }
}
