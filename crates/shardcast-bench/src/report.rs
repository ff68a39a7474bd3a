//! The result of a bench: merging the workers' results (histograms travel V2-serialized and
//! base64-encoded), the JSON form, the human summary, and the progress bar shown meanwhile.
//! Running the phases lives in `worker.rs`.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use base64::Engine;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use super::Error;
use super::args::{CommonArgs, Rate, Scenario};
use super::worker::{Job, Plan, Progress, ServerSample, Window, WorkerResult};

/// A histogram as text: V2 serialization, base64.
pub fn encode_histogram(h: &Histogram<u64>) -> String {
    let mut bytes = Vec::new();
    // Serializing into a Vec cannot fail for lack of space; a failure leaves it empty, which
    // decodes as no data.
    if V2Serializer::new().serialize(h, &mut bytes).is_err() {
        bytes.clear();
    }
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn decode_histogram(s: &str) -> Result<Histogram<u64>, Error> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| Error::Protocol(format!("worker histogram: {e}")))?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| Error::Protocol(format!("worker histogram: {e:?}")))
}

/// What the parent itself observed, besides the workers' results.
#[derive(Debug, Default)]
pub struct Extra {
    /// The start, `CLOCK_MONOTONIC` ns.
    pub t0_ns: u64,
    pub expected: Vec<u64>,
    pub rounds: u64,
    pub measured_rounds: u64,
    pub first_measured_round: u64,
    pub round_timed_out: Option<u64>,
    pub server_after_connect: Option<ServerSample>,
    /// The server before any connection, at the start and at the end of the window.
    pub server: Option<(ServerSample, ServerSample, ServerSample)>,
    pub soak: Option<super::soak::SoakResult>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: &'static str,
    pub urls: Vec<String>,
    pub publish_url: Option<String>,
    pub workers: u32,
    pub settings: serde_json::Value,
    pub connections: Connections,
    /// Length of the measured window, seconds.
    pub window_s: f64,
    /// Every delivery, warmup included.
    pub deliveries: u64,
    /// Deliveries received in the measured window (fanout), or of the measured rounds (chat).
    pub measured_deliveries: u64,
    pub deliveries_per_sec: f64,
    /// Delivery latency (chat, fanout) or handshake latency (connect), microseconds.
    pub latency_us: Option<Latency>,
    /// With several `--url`s, the connections, deliveries and latency of each, in order.
    pub by_url: Vec<UrlResult>,
    pub fanout: Option<FanoutResult>,
    pub chat: Option<ChatResult>,
    pub idle: Option<IdleResult>,
    pub connect: Option<ConnectResult>,
    pub soak: Option<SoakReport>,
    /// Connections the server ended (or that failed), by close code or error.
    pub disconnects: BTreeMap<String, u64>,
    pub generator_cpu: GeneratorCpu,
    pub server: Option<ServerCpu>,
    pub wall_s: f64,
}

/// One subscriber URL's part of the result.
#[derive(Debug, Clone, Serialize)]
pub struct UrlResult {
    pub url: String,
    /// Connections opened to it (fanout: subscribers; publishers are not counted; connect:
    /// every handshake).
    pub connected: u64,
    /// Deliveries its connections received in the measured window.
    pub measured_deliveries: u64,
    /// Fanout: `measured_deliveries` over the window.
    pub deliveries_per_sec: Option<f64>,
    pub latency_us: Option<Latency>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Connections {
    pub attempted: u64,
    pub connected: u64,
    pub failed: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Option<Latency> {
        if h.is_empty() {
            return None;
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Some(Latency {
            count: h.len(),
            mean: h.mean() / 1000.0,
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p99_9: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FanoutResult {
    /// Messages the publishers sent (written to the socket, or answered 2xx).
    pub published: u64,
    /// Deliveries there should have been: each connected subscriber, every message of its topic.
    pub expected: u64,
    /// Deliveries missing when the run ended. With `drain_timed_out`, some of them may only
    /// have been late (still queued in the server when the drain gave up).
    pub lost: u64,
    pub drain_timed_out: bool,
    pub out_of_order: u64,
    pub worst_subscriber_lost: u64,
    pub worst_subscriber_out_of_order: u64,
    /// Messages whose payload carried no stamp of this run.
    pub foreign: u64,
    pub publish_errors: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatResult {
    pub rounds: u64,
    pub measured_rounds: u64,
    pub rounds_per_sec: f64,
    pub round_timed_out: Option<u64>,
    /// Messages with no stamp or an unexpected round.
    pub errors: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct IdleResult {
    /// Connections still open at the end.
    pub held: u64,
    pub server_rss_before: Option<u64>,
    pub server_rss_after: Option<u64>,
    pub server_rss_per_connection: Option<f64>,
    /// Kernel TCP memory (`/proc/net/sockstat`, both ends of each loopback connection).
    pub tcp_mem_before: Option<u64>,
    pub tcp_mem_after: Option<u64>,
    pub tcp_mem_per_connection: Option<f64>,
    /// Kernel slab memory (`/proc/meminfo`), where the socket structures of both ends live;
    /// system-wide, so other activity on the machine shows up here too.
    pub kernel_slab_before: Option<u64>,
    pub kernel_slab_after: Option<u64>,
    pub kernel_slab_per_connection: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    /// Connections told to leave, by way (`abrupt`, `close`, `slow`), over the churn.
    pub churned: BTreeMap<String, u64>,
    /// `churned` over the churn's duration.
    pub churned_per_sec: f64,
    /// Churn ticks that found no open connection to churn (the rate was not met).
    pub churn_missed: u64,
    #[serde(flatten)]
    pub run: super::soak::SoakResult,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConnectResult {
    pub handshakes: u64,
    pub handshakes_per_sec: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GeneratorCpu {
    /// CPU seconds of every worker (user + system) over the whole run.
    pub total_s: f64,
    /// CPU seconds of every worker in the measured window.
    pub window_s: f64,
    /// `window_s` over the wall time between its two samples: 1.0 is one core busy.
    pub share_of_window: f64,
    /// CPU seconds of the parent, when the workers are separate processes.
    pub parent_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerCpu {
    /// The `--server-pid`s; the figures are their sums.
    pub pids: Vec<u32>,
    /// Server CPU seconds (user + system) from the start to the end of the window.
    pub cpu_s: f64,
    pub wall_s: f64,
    /// `cpu_s` over `wall_s`: 1.0 is one core busy.
    pub share: f64,
    /// Server CPU seconds per million deliveries, where there are deliveries.
    pub cpu_s_per_million_deliveries: Option<f64>,
}

fn merge_map(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_insert(0) += v;
    }
}

fn settings(scenario: &Scenario) -> serde_json::Value {
    use serde_json::json;
    let rate = |r: Rate| match r {
        Rate::Max => json!("max"),
        Rate::PerSecond(r) => json!(r),
    };
    match scenario {
        Scenario::Fanout(a) => json!({
            "subscribers": a.subscribers, "topics": a.topics, "publishers": a.publishers,
            "rate_total_per_sec": rate(a.rate), "size": a.size, "messages": a.messages,
        }),
        Scenario::Chat(a) => {
            json!({ "clients": a.clients, "size": a.size, "rounds": a.rounds, "echo": !a.no_echo })
        }
        Scenario::Idle(a) => json!({ "connections": a.connections, "topics": a.topics }),
        Scenario::Connect(a) => {
            json!({ "connections": a.connections, "concurrency": a.concurrency })
        }
        Scenario::Soak(a) => json!({
            "connections": a.connections, "topics": a.topics, "churn_rate": a.churn_rate,
            "mix": { "abrupt": a.mix.abrupt, "close": a.mix.close, "slow": a.mix.slow },
            "publish_rate": a.publish_rate, "size": a.size, "slow_topics": a.slow_topics,
            "slow_rate": a.slow_rate, "slow_size": a.slow_size,
            "slow_stall_s": a.slow_stall.as_secs_f64(), "duration_s": a.common.duration.as_secs_f64(),
        }),
    }
}

#[allow(clippy::too_many_arguments)]
pub fn build(
    plan: &Plan,
    scenario: &Scenario,
    common: &CommonArgs,
    results: Vec<WorkerResult>,
    window: Window,
    extra: Extra,
    parent_cpu: Duration,
    wall: Duration,
) -> Result<Report, Error> {
    let mut latency = super::scenario::histogram();
    let mut disconnects = BTreeMap::new();
    let mut failed = BTreeMap::new();
    let mut publish_errors = BTreeMap::new();
    let (mut connected, mut deliveries, mut measured, mut sent, mut foreign) = (0, 0, 0, 0, 0);
    let (mut window_deliveries, mut last_recv) = (0u64, 0u64);
    let (mut open, mut handshakes, mut chat_errors) = (0, 0, 0);
    let (mut cpu_total, mut cpu_window, mut cpu_window_wall) = (0.0, 0.0, 0.0f64);
    for r in &results {
        let h = decode_histogram(&r.latency)?;
        latency
            .add(&h)
            .map_err(|e| Error::Protocol(format!("merging histograms: {e:?}")))?;
        merge_map(&mut disconnects, &r.disconnects);
        merge_map(&mut failed, &r.connect_failures);
        merge_map(&mut publish_errors, &r.publish_errors);
        connected += r.connected;
        deliveries += r.deliveries;
        measured += r.measured;
        sent += r.sent;
        foreign += r.foreign;
        open += r.open;
        handshakes += r.handshakes;
        chat_errors += r.chat_errors;
        window_deliveries += r.window_deliveries;
        last_recv = last_recv.max(r.last_window_recv_ns);
        cpu_total += r.cpu_total_s;
        cpu_window += r.cpu_window_s;
        cpu_window_wall = cpu_window_wall.max(r.cpu_window_wall_s);
    }
    let mut window_s = window.wall.as_secs_f64();
    let per_sec = |n: u64, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    let (mut fanout, mut chat, mut idle, mut connect) = (None, None, None, None);
    let mut soak = None;
    let mut attempted = connected + failed.values().sum::<u64>();
    let mut measured_deliveries = measured;
    let mut deliveries_per_sec;
    match &plan.job {
        Job::Fanout(job) => {
            // Throughput counts deliveries received in the window: after the warmup and until
            // the publishers stop (by count: from the start to the last delivery).
            let by_time = job.messages.is_none();
            let from = extra.t0_ns
                + if by_time {
                    plan.warmup.as_nanos() as u64
                } else {
                    0
                };
            let to = if by_time {
                from + plan.duration.as_nanos() as u64
            } else {
                u64::MAX
            };
            if last_recv > from {
                window_s = (last_recv.min(to) - from) as f64 / 1e9;
            }
            measured_deliveries = window_deliveries;
            deliveries_per_sec = per_sec(window_deliveries, window_s);
            let mut expected_total = 0;
            let (mut received, mut ooo, mut worst_lost, mut worst_ooo) = (0, 0, 0, 0);
            let mut topics: Vec<_> = vec![None; job.topics as usize];
            for r in &results {
                for (t, tally) in r.topics.iter().enumerate() {
                    if tally.subscribers == 0 {
                        continue;
                    }
                    let Some(slot) = topics.get_mut(t) else {
                        continue;
                    };
                    let (subs, sum, min, osum, omax) = slot.unwrap_or((0, 0, u64::MAX, 0, 0));
                    *slot = Some((
                        subs + tally.subscribers,
                        sum + tally.received_sum,
                        min.min(tally.received_min),
                        osum + tally.out_of_order_sum,
                        omax.max(tally.out_of_order_max),
                    ));
                }
            }
            for (t, slot) in topics.iter().enumerate() {
                let Some((subs, sum, min, osum, omax)) = *slot else {
                    continue;
                };
                let e = extra.expected.get(t).copied().unwrap_or(0);
                expected_total += subs * e;
                received += sum.min(subs * e);
                ooo += osum;
                worst_lost = worst_lost.max(e.saturating_sub(min));
                worst_ooo = worst_ooo.max(omax);
            }
            fanout = Some(FanoutResult {
                published: sent,
                expected: expected_total,
                lost: expected_total - received,
                drain_timed_out: results.iter().any(|r| r.drain_timed_out),
                out_of_order: ooo,
                worst_subscriber_lost: worst_lost,
                worst_subscriber_out_of_order: worst_ooo,
                foreign,
                publish_errors,
            });
        }
        Job::Chat(job) => {
            let per_round = job.clients
                * if job.echo {
                    job.clients
                } else {
                    job.clients - 1
                };
            measured_deliveries = extra.measured_rounds * per_round;
            deliveries_per_sec = per_sec(measured_deliveries, window_s);
            chat = Some(ChatResult {
                rounds: extra.rounds,
                measured_rounds: extra.measured_rounds,
                rounds_per_sec: per_sec(extra.measured_rounds, window_s),
                round_timed_out: extra.round_timed_out,
                errors: chat_errors,
            });
        }
        Job::Idle(_) => {
            deliveries_per_sec = 0.0;
            let before = extra.server.as_ref().map(|s| s.0);
            let after = extra.server_after_connect;
            // Per connection the server holds, not per connection asked for.
            let n = connected.max(1) as f64;
            let diff = |a: Option<u64>, b: Option<u64>| match (a, b) {
                (Some(a), Some(b)) => Some((b as f64 - a as f64) / n),
                _ => None,
            };
            idle = Some(IdleResult {
                held: open,
                server_rss_before: before.and_then(|s| s.rss),
                server_rss_after: after.and_then(|s| s.rss),
                server_rss_per_connection: diff(
                    before.and_then(|s| s.rss),
                    after.and_then(|s| s.rss),
                ),
                tcp_mem_before: before.and_then(|s| s.tcp_mem),
                tcp_mem_after: after.and_then(|s| s.tcp_mem),
                tcp_mem_per_connection: diff(
                    before.and_then(|s| s.tcp_mem),
                    after.and_then(|s| s.tcp_mem),
                ),
                kernel_slab_before: before.and_then(|s| s.slab),
                kernel_slab_after: after.and_then(|s| s.slab),
                kernel_slab_per_connection: diff(
                    before.and_then(|s| s.slab),
                    after.and_then(|s| s.slab),
                ),
            });
        }
        Job::Soak(_) => {
            deliveries_per_sec = 0.0;
            attempted = handshakes + failed.values().sum::<u64>();
            let mut churned = BTreeMap::new();
            for r in &results {
                merge_map(&mut churned, &r.churned);
            }
            if let Some(run) = extra.soak.clone() {
                let n: u64 = churned.values().sum();
                soak = Some(SoakReport {
                    churned_per_sec: if run.churn_s > 0.0 {
                        n as f64 / run.churn_s
                    } else {
                        0.0
                    },
                    churned,
                    churn_missed: results.iter().map(|r| r.churn_missed).sum(),
                    run,
                });
            }
        }
        Job::Connect(_) => {
            attempted = handshakes + failed.values().sum::<u64>();
            deliveries_per_sec = 0.0;
            connect = Some(ConnectResult {
                handshakes: measured,
                handshakes_per_sec: per_sec(measured, window_s),
            });
        }
    }
    if matches!(plan.job, Job::Idle(_) | Job::Connect(_) | Job::Soak(_)) {
        deliveries_per_sec = deliveries_per_sec.max(0.0);
    }
    if connected == 0 && !matches!(plan.job, Job::Connect(_)) {
        return Err(Error::Failed(format!(
            "no connection could be opened ({})",
            fmt_map(&failed)
        )));
    }
    let by_url = by_url(plan, &results, window_s)?;
    let server = extra.server.as_ref().and_then(|(_, start, end)| {
        let cpu = end.cpu?.saturating_sub(start.cpu?).as_secs_f64();
        let wall_s = end.at.duration_since(start.at).as_secs_f64();
        Some(ServerCpu {
            pids: common.server_pids.clone(),
            cpu_s: cpu,
            wall_s,
            share: if wall_s > 0.0 { cpu / wall_s } else { 0.0 },
            cpu_s_per_million_deliveries: (deliveries > 0).then(|| cpu / deliveries as f64 * 1e6),
        })
    });
    let parent_s = if plan.workers > 1 {
        parent_cpu.as_secs_f64()
    } else {
        0.0
    };
    Ok(Report {
        scenario: match plan.job {
            Job::Fanout(_) => "fanout",
            Job::Chat(_) => "chat",
            Job::Idle(_) => "idle",
            Job::Connect(_) => "connect",
            Job::Soak(_) => "soak",
        },
        urls: plan.urls.clone(),
        by_url,
        publish_url: match &plan.job {
            Job::Fanout(j) => Some(j.publish_url.clone()),
            _ => None,
        },
        workers: plan.workers,
        settings: settings(scenario),
        connections: Connections {
            attempted,
            connected,
            failed,
        },
        window_s,
        deliveries,
        measured_deliveries,
        deliveries_per_sec,
        latency_us: Latency::of(&latency),
        fanout,
        chat,
        idle,
        connect,
        soak,
        disconnects,
        generator_cpu: GeneratorCpu {
            total_s: cpu_total + parent_s,
            window_s: cpu_window,
            // Over the CPU window's own span: it ends when the publishers stop, which can be
            // after the throughput window when the server is slow to take their frames.
            share_of_window: if cpu_window_wall > 0.0 {
                cpu_window / cpu_window_wall
            } else if window_s > 0.0 {
                cpu_window / window_s
            } else {
                0.0
            },
            parent_s,
        },
        server,
        wall_s: wall.as_secs_f64(),
    })
}

/// Merges the workers' per-URL parts (there are none with a single URL).
fn by_url(plan: &Plan, results: &[WorkerResult], window_s: f64) -> Result<Vec<UrlResult>, Error> {
    if plan.urls.len() < 2 {
        return Ok(Vec::new());
    }
    let mut out = Vec::with_capacity(plan.urls.len());
    for (i, url) in plan.urls.iter().enumerate() {
        let (mut connected, mut deliveries) = (0, 0);
        let mut latency = super::scenario::histogram();
        for part in results.iter().filter_map(|r| r.by_server.get(i)) {
            connected += part.connected;
            deliveries += part.window_deliveries;
            latency
                .add(decode_histogram(&part.latency)?)
                .map_err(|e| Error::Protocol(format!("merging histograms: {e:?}")))?;
        }
        out.push(UrlResult {
            url: url.clone(),
            connected,
            measured_deliveries: deliveries,
            deliveries_per_sec: (matches!(plan.job, Job::Fanout(_)) && window_s > 0.0)
                .then(|| deliveries as f64 / window_s),
            latency_us: Latency::of(&latency),
        });
    }
    Ok(out)
}

/// Writes the report: JSON to `--json` (a file, or stdout for `-`), and the human summary to
/// stdout (stderr when the JSON goes to stdout) unless `--quiet`.
pub fn emit(report: &Report, common: &CommonArgs) -> Result<(), Error> {
    let json_to_stdout = common.json.as_deref() == Some(std::path::Path::new("-"));
    if !common.quiet {
        if json_to_stdout {
            eprint!("{}", report.human());
        } else {
            print!("{}", report.human());
        }
    }
    if let Some(path) = &common.json {
        let mut text = serde_json::to_string_pretty(report)
            .map_err(|e| Error::Protocol(format!("encoding the report: {e}")))?;
        text.push('\n');
        if json_to_stdout {
            print!("{text}");
        } else {
            std::fs::write(path, text)
                .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        }
    }
    Ok(())
}

/// A count, short: `950`, `12.3k`, `4.56M` (also `shardcast top`'s columns).
pub(crate) fn si(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

fn kib(b: f64) -> String {
    format!("{:.2} KiB", b / 1024.0)
}

impl Report {
    /// The summary printed at the end of a run.
    pub fn human(&self) -> String {
        let mut o = String::new();
        let mut line = |s: String| {
            o.push_str(&s);
            o.push('\n');
        };
        line(format!(
            "{} against {} ({} worker{}, {:.1}s wall, {:.2}s measured)",
            self.scenario,
            self.urls.join(" "),
            self.workers,
            if self.workers == 1 { "" } else { "s" },
            self.wall_s,
            self.window_s
        ));
        let failed: u64 = self.connections.failed.values().sum();
        line(format!(
            "  connections   {} of {} opened{}",
            self.connections.connected,
            self.connections.attempted,
            if failed > 0 {
                format!(", failed: {}", fmt_map(&self.connections.failed))
            } else {
                String::new()
            }
        ));
        if let Some(f) = &self.fanout {
            line(format!(
                "  deliveries    {} /s ({} measured, {} in all; {} published)",
                si(self.deliveries_per_sec),
                self.measured_deliveries,
                self.deliveries,
                f.published
            ));
            line(format!(
                "  loss          {} lost of {} expected, {} out of order; worst subscriber: {} lost, {} out of order",
                f.lost,
                f.expected,
                f.out_of_order,
                f.worst_subscriber_lost,
                f.worst_subscriber_out_of_order
            ));
            if f.drain_timed_out {
                line(format!(
                    "  DRAIN TIMEOUT deliveries were still missing after --drain-timeout: some of the {} lost may only be late",
                    f.lost
                ));
            }
            if f.foreign > 0 {
                line(format!(
                    "  foreign       {} messages without a stamp of this run",
                    f.foreign
                ));
            }
            if !f.publish_errors.is_empty() {
                line(format!("  publish errs  {}", fmt_map(&f.publish_errors)));
            }
        }
        if let Some(c) = &self.chat {
            line(format!(
                "  deliveries    {} /s ({:.1} rounds/s; {} rounds, {} measured)",
                si(self.deliveries_per_sec),
                c.rounds_per_sec,
                c.rounds,
                c.measured_rounds
            ));
            if let Some(n) = c.round_timed_out {
                line(format!("  TIMED OUT     round {n} did not complete"));
            }
            if c.errors > 0 {
                line(format!("  errors        {} unexpected messages", c.errors));
            }
        }
        if let Some(i) = &self.idle {
            line(format!(
                "  held          {} connections open at the end",
                i.held
            ));
            if let (Some(b), Some(a), Some(p)) = (
                i.server_rss_before,
                i.server_rss_after,
                i.server_rss_per_connection,
            ) {
                line(format!(
                    "  server RSS    {} -> {}: {} per connection",
                    kib(b as f64),
                    kib(a as f64),
                    kib(p)
                ));
            }
            if let (Some(b), Some(a), Some(p)) =
                (i.tcp_mem_before, i.tcp_mem_after, i.tcp_mem_per_connection)
            {
                line(format!(
                    "  kernel TCP    {} -> {}: {} per connection (sockstat mem: buffered data, both ends)",
                    kib(b as f64),
                    kib(a as f64),
                    kib(p)
                ));
            }
            if let (Some(b), Some(a), Some(p)) = (
                i.kernel_slab_before,
                i.kernel_slab_after,
                i.kernel_slab_per_connection,
            ) {
                line(format!(
                    "  kernel slab   {} -> {}: {} per connection (socket structures, both ends)",
                    kib(b as f64),
                    kib(a as f64),
                    kib(p)
                ));
            }
        }
        if let Some(c) = &self.connect {
            line(format!(
                "  handshakes    {} /s ({} measured)",
                si(c.handshakes_per_sec),
                c.handshakes
            ));
        }
        if let Some(k) = &self.soak {
            let r = &k.run;
            line(format!(
                "  churn         {:.0}s: {} churned ({:.1}/s; {}), {:.1} connects/s at the server{}",
                r.churn_s,
                k.churned.values().sum::<u64>(),
                k.churned_per_sec,
                fmt_map(&k.churned),
                r.connects_per_sec,
                if k.churn_missed > 0 {
                    format!(", {} ticks found nothing to churn", k.churn_missed)
                } else {
                    String::new()
                }
            ));
            line(format!(
                "  publishes     {} on the topics, {} on the slow topics{}",
                r.published,
                r.slow_published,
                if r.publish_errors.is_empty() {
                    String::new()
                } else {
                    format!("; errors: {}", fmt_map(&r.publish_errors))
                }
            ));
            line(format!(
                "  probes        {} of {} answered within the timeout, {} late, slowest {:.1} ms",
                r.probes.answered, r.probes.sent, r.probes.late, r.probes.worst_ms
            ));
            line(format!("  {}", super::soak::HEADER.trim_start()));
            for s in &r.samples {
                line(format!("  {}", super::soak::row(s)));
            }
            for (what, b, e) in [
                ("RSS bytes", r.baseline.rss_bytes, r.end.rss_bytes),
                ("descriptors", r.baseline.open_fds, r.end.open_fds),
                ("tokio tasks", r.baseline.tokio_tasks, r.end.tokio_tasks),
                ("connections", r.baseline.connections, r.end.connections),
            ] {
                let change = match (b, e) {
                    (Some(b), Some(e)) if b > 0 => {
                        format!("{:+.2}%", (e as f64 - b as f64) / b as f64 * 100.0)
                    }
                    _ => "-".into(),
                };
                let n = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
                line(format!(
                    "  {what:<13} baseline {:>12}  end {:>12}  {change}",
                    n(b),
                    n(e)
                ));
            }
            if r.failures.is_empty() {
                line(format!(
                    "  verdict       PASS: back within {:.0}% of the baseline, every probe answered",
                    r.tolerance * 100.0
                ));
            } else {
                for f in &r.failures {
                    line(format!("  FAILED        {f}"));
                }
            }
        }
        if let Some(l) = &self.latency_us {
            line(format!(
                "  latency µs    p50 {:.0}  p90 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}  (mean {:.0}, n={})",
                l.p50, l.p90, l.p99, l.p99_9, l.max, l.mean, l.count
            ));
        }
        for u in &self.by_url {
            line(format!(
                "  {}: {} connections, {}{}",
                u.url,
                u.connected,
                match (self.connect.is_some(), u.deliveries_per_sec) {
                    (true, _) => format!(
                        "{} handshakes measured",
                        u.latency_us.as_ref().map_or(0, |l| l.count)
                    ),
                    (false, Some(r)) => format!("{} deliveries/s", si(r)),
                    (false, None) => format!("{} deliveries", u.measured_deliveries),
                },
                u.latency_us
                    .as_ref()
                    .map(|l| format!(
                        ", latency µs p50 {:.0}  p99 {:.0}  max {:.0}",
                        l.p50, l.p99, l.max
                    ))
                    .unwrap_or_default()
            ));
        }
        if !self.disconnects.is_empty() {
            line(format!("  disconnects   {}", fmt_map(&self.disconnects)));
        }
        let g = &self.generator_cpu;
        line(format!(
            "  generator CPU {:.2}s in the window ({:.0}% of one core), {:.2}s in all",
            g.window_s,
            g.share_of_window * 100.0,
            g.total_s
        ));
        if let Some(s) = &self.server {
            line(format!(
                "  server CPU    {:.2}s over {:.2}s ({:.0}% of one core){}",
                s.cpu_s,
                s.wall_s,
                s.share * 100.0,
                s.cpu_s_per_million_deliveries
                    .map(|c| format!(", {c:.3}s per million deliveries"))
                    .unwrap_or_default()
            ));
        }
        o
    }
}

impl Report {
    /// An error when a run's own assertions failed (the soak's), for a non-zero exit.
    pub fn verdict(&self) -> Result<(), Error> {
        match &self.soak {
            Some(k) if !k.run.failures.is_empty() => Err(Error::Failed(format!(
                "soak failed: {}",
                k.run.failures.join("; ")
            ))),
            _ => Ok(()),
        }
    }
}

fn fmt_map(m: &BTreeMap<String, u64>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The progress bar on stderr (hidden with `--quiet` or when stderr is not a terminal).
pub struct Bar {
    bar: ProgressBar,
    connecting: Cell<bool>,
    started: Cell<Option<Instant>>,
    last: RefCell<(Instant, u64)>,
    counts_handshakes: bool,
}

impl Bar {
    pub fn new(plan: &Plan, quiet: bool) -> Bar {
        let total = match &plan.job {
            Job::Fanout(j) => j.subscribers + if j.publish_http { 0 } else { j.publishers },
            Job::Chat(j) => j.clients,
            Job::Idle(j) => j.connections,
            Job::Connect(_) => 0,
            Job::Soak(j) => j.connections,
        };
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        if quiet {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        // The template is a constant known to parse; fall back to the default style if not.
        let style =
            ProgressStyle::with_template("{spinner} {prefix:>10} [{bar:30}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_prefix("connecting");
        bar.enable_steady_tick(Duration::from_millis(200));
        Bar {
            bar,
            connecting: Cell::new(true),
            started: Cell::new(None),
            last: RefCell::new((Instant::now(), 0)),
            counts_handshakes: matches!(plan.job, Job::Connect(_)),
        }
    }

    pub fn update(&self, p: &Progress) {
        if self.connecting.get() {
            self.bar.set_position(p.connected);
            return;
        }
        if let Some(s) = self.started.get() {
            self.bar.set_position(s.elapsed().as_millis() as u64);
        }
        let count = if self.counts_handshakes {
            p.handshakes
        } else {
            p.deliveries
        };
        let mut last = self.last.borrow_mut();
        let dt = last.0.elapsed().as_secs_f64();
        if dt >= 0.5 {
            let rate = count.saturating_sub(last.1) as f64 / dt;
            let what = if self.counts_handshakes {
                "handshakes"
            } else {
                "deliveries"
            };
            self.bar.set_message(format!(
                "{} {what}/s, {} open, {} sent",
                si(rate),
                p.open,
                p.sent
            ));
            *last = (Instant::now(), count);
        }
    }

    pub fn running(&self, plan: &Plan) {
        self.connecting.set(false);
        self.started.set(Some(Instant::now()));
        self.bar.set_prefix("running");
        self.bar.set_position(0);
        self.bar
            .set_length((plan.warmup + plan.duration).as_millis() as u64);
        self.bar.set_style(
            ProgressStyle::with_template("{spinner} {prefix:>10} [{bar:30}] {elapsed} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
    }

    pub fn phase(&self, name: &'static str) {
        self.bar.set_prefix(name);
    }

    pub fn rounds(&self, n: u64) {
        if n.is_multiple_of(16) {
            self.bar.set_prefix(format!("round {n}"));
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_survive_the_trip_between_processes() {
        let mut h = crate::scenario::histogram();
        for v in [1_000u64, 2_000, 50_000, 1_000_000] {
            h.record(v).unwrap();
        }
        let back = decode_histogram(&encode_histogram(&h)).unwrap();
        assert_eq!(back.len(), 4);
        assert_eq!(back.max(), h.max());
        assert_eq!(back.value_at_quantile(0.5), h.value_at_quantile(0.5));
        assert!(decode_histogram("not base64!").is_err());
        assert!(decode_histogram("AAAA").is_err());
    }
}
