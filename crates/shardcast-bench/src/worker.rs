//! The parent/worker split of `shardcast bench`. The parent turns the flags into a [`Plan`],
//! starts the workers (in process for one, else re-executions of this binary with the hidden
//! `__bench-worker` subcommand: spec on stdin, JSON lines on stdout), paces the phases
//! (ready, start, rounds, stop), shows progress and merges the results into a [`Report`].
//! What a worker does inside lives in `scenario/`; formatting lives in `report.rs`.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;

use super::Error;
use super::args::{
    BenchArgs, ChatArgs, CommonArgs, ConnectArgs, FanoutArgs, IdleArgs, Mix, Rate, Scenario,
    SoakArgs,
};
use super::payload::{STAMP_LEN, now_ns};
use super::report::{self, Report};
use super::scenario::{self, Link};
use super::soak;
use super::sys;
use super::url::{Scheme, Template, Url, parse_headers};

/// Connections per worker process when `--workers` is not given.
const CONNS_PER_WORKER: u64 = 15_000;

/// Everything a worker needs to run its share; sent to worker processes as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// Subscriber URL templates, at least one; connections go round robin over them.
    pub urls: Vec<String>,
    pub headers: Vec<String>,
    pub duration: Duration,
    pub warmup: Duration,
    pub seed: u64,
    pub workers: u32,
    pub conns_per_addr: u32,
    pub connect_concurrency: u32,
    pub connect_timeout: Duration,
    pub topic_prefix: String,
    pub job: Job,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Job {
    Fanout(FanoutJob),
    Chat(ChatJob),
    Idle(IdleJob),
    Connect(ConnectJob),
    Soak(SoakJob),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FanoutJob {
    pub subscribers: u64,
    pub topics: u64,
    pub publishers: u64,
    /// Messages per second per publisher; `None` is as fast as the server takes them.
    pub rate_per_publisher: Option<f64>,
    pub size: usize,
    pub messages: Option<u64>,
    pub publish_url: String,
    pub publish_http: bool,
    pub content_type: String,
    pub publisher_buffer: usize,
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatJob {
    pub clients: u64,
    /// Whether the server sends a client its own messages.
    pub echo: bool,
    pub size: usize,
    pub rounds: Option<u64>,
    pub round_timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdleJob {
    pub connections: u64,
    pub topics: u64,
    pub settle: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectJob {
    pub connections: Option<u64>,
    pub concurrency: u32,
}

/// The soak: workers hold and churn the connections; the parent (`soak.rs`) publishes,
/// probes and samples the server's metrics.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SoakJob {
    pub connections: u64,
    pub topics: u64,
    /// Churned connections per second, over all workers.
    pub churn_rate: f64,
    pub mix: Mix,
    pub slow_topics: u64,
    pub slow_stall: Duration,
    /// How long the workers may take to get every connection open (at the start, and after
    /// the churn); and the parent, the server's gauge back to the baseline's count.
    pub recover_timeout: Duration,
    /// The parent's part.
    pub publish_url: String,
    pub metrics_url: String,
    pub publish_rate: f64,
    pub size: usize,
    pub slow_rate: f64,
    pub slow_size: usize,
    pub sample_interval: Duration,
    pub probe_interval: Duration,
    pub probe_timeout: Duration,
    pub settle: Duration,
}

/// Parent to worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToWorker {
    /// Begin; `t0_ns` is the parent's `CLOCK_MONOTONIC`, the same clock as the workers'.
    Start {
        t0_ns: u64,
    },
    /// Fanout: how many messages each topic's publishers sent in all.
    Expected(Vec<u64>),
    /// Chat: send round `n`.
    Round(u64),
    /// Soak: stop churning, get every connection open again, then `Ready`.
    Calm,
    Stop,
}

/// Worker to parent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FromWorker {
    Progress(Progress),
    /// The current phase is over: every connection has been tried (first), the deliveries
    /// have drained (fanout), the handshakes are done (connect).
    Ready,
    /// Fanout: this worker's publishers are done; messages sent per topic.
    Sent(Vec<u64>),
    /// Chat: every client of this worker has received round `n` in full.
    RoundDone(u64),
    Done(Box<WorkerResult>),
    Failed(String),
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Progress {
    pub connected: u64,
    pub open: u64,
    pub deliveries: u64,
    pub sent: u64,
    pub handshakes: u64,
}

/// One topic's subscribers in one worker, summarised for loss accounting.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TopicTally {
    pub subscribers: u64,
    pub received_sum: u64,
    pub received_min: u64,
    pub out_of_order_sum: u64,
    pub out_of_order_max: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerResult {
    pub connected: u64,
    pub open: u64,
    pub deliveries: u64,
    pub measured: u64,
    pub window_deliveries: u64,
    pub last_window_recv_ns: u64,
    pub sent: u64,
    pub handshakes: u64,
    pub foreign: u64,
    /// The latency histogram (ns), V2-serialized and base64-encoded.
    pub latency: String,
    pub disconnects: BTreeMap<String, u64>,
    pub connect_failures: BTreeMap<String, u64>,
    pub publish_errors: BTreeMap<String, u64>,
    pub topics: Vec<TopicTally>,
    pub chat_errors: u64,
    /// Fanout: the drain ended at `--drain-timeout` with deliveries still missing.
    pub drain_timed_out: bool,
    pub cpu_total_s: f64,
    pub cpu_window_s: f64,
    /// Wall time between the two samples behind `cpu_window_s` (0 if one is missing).
    pub cpu_window_wall_s: f64,
    /// Per subscriber URL, in `--url` order; empty with a single URL.
    pub by_server: Vec<ServerPart>,
    /// Soak: connections told to leave, by way (`abrupt`, `close`, `slow`).
    pub churned: BTreeMap<String, u64>,
    /// Soak: churn ticks that found no open connection to churn.
    pub churn_missed: u64,
}

/// One subscriber URL's share of a worker's result.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServerPart {
    pub connected: u64,
    pub window_deliveries: u64,
    /// The latency histogram (ns), encoded as [`WorkerResult::latency`] is.
    pub latency: String,
}

impl Plan {
    /// Checks the flags and resolves the defaults.
    pub fn from_args(args: &BenchArgs) -> Result<Plan, Error> {
        let bad = |m: String| Err(Error::BadArgs(m));
        let common: &CommonArgs = args.scenario.common();
        if common.urls.is_empty() {
            return bad("--url: at least one is needed".into());
        }
        for url in &common.urls {
            if Template::new(url)?.url("t")?.scheme != Scheme::Ws {
                return bad(format!("--url {url}: must be a ws:// URL"));
            }
        }
        parse_headers(&common.headers)?;
        if common.topic_prefix.is_empty() {
            return bad("--topic-prefix must not be empty".into());
        }
        let (job, conns) = match &args.scenario {
            Scenario::Fanout(a) => fanout_job(a)?,
            Scenario::Chat(a) => chat_job(a)?,
            Scenario::Idle(a) => idle_job(a)?,
            Scenario::Connect(a) => connect_job(a),
            Scenario::Soak(a) => soak_job(a)?,
        };
        let workers = match common.workers {
            Some(w) => w,
            None => conns.div_ceil(CONNS_PER_WORKER).clamp(1, 64) as u32,
        };
        Ok(Plan {
            urls: common.urls.clone(),
            headers: common.headers.clone(),
            duration: common.duration,
            warmup: common.warmup,
            seed: common.seed,
            workers,
            conns_per_addr: common.conns_per_addr,
            connect_concurrency: common.connect_concurrency,
            connect_timeout: common.connect_timeout,
            topic_prefix: common.topic_prefix.clone(),
            job,
        })
    }
}

fn check_size(size: u32) -> Result<usize, Error> {
    if (size as usize) < STAMP_LEN {
        return Err(Error::BadArgs(format!(
            "--size {size}: must be at least {STAMP_LEN} bytes (the stamp)"
        )));
    }
    Ok(size as usize)
}

fn fanout_job(a: &FanoutArgs) -> Result<(Job, u64), Error> {
    let publish_url = a
        .publish_url
        .clone()
        .or_else(|| a.common.urls.first().cloned())
        .ok_or_else(|| Error::BadArgs("--url: at least one is needed".into()))?;
    let publish = Template::new(&publish_url)?.url("t")?;
    let publish_http = publish.scheme == Scheme::Http;
    if a.messages == Some(0) {
        return Err(Error::BadArgs("--messages must be at least 1".into()));
    }
    let rate_per_publisher = match a.rate {
        Rate::Max => None,
        Rate::PerSecond(r) => Some(r / f64::from(a.publishers)),
    };
    let conns = u64::from(a.subscribers)
        + if publish_http {
            0
        } else {
            u64::from(a.publishers)
        };
    Ok((
        Job::Fanout(FanoutJob {
            subscribers: u64::from(a.subscribers),
            topics: u64::from(a.topics),
            publishers: u64::from(a.publishers),
            rate_per_publisher,
            size: check_size(a.size)?,
            messages: a.messages,
            publish_url,
            publish_http,
            content_type: a.content_type.clone(),
            publisher_buffer: a.publisher_buffer,
            drain_timeout: a.drain_timeout,
        }),
        conns,
    ))
}

fn chat_job(a: &ChatArgs) -> Result<(Job, u64), Error> {
    if a.rounds == Some(0) {
        return Err(Error::BadArgs("--rounds must be at least 1".into()));
    }
    Ok((
        Job::Chat(ChatJob {
            clients: u64::from(a.clients),
            echo: !a.no_echo,
            size: check_size(a.size)?,
            rounds: a.rounds,
            round_timeout: a.round_timeout,
        }),
        u64::from(a.clients),
    ))
}

fn idle_job(a: &IdleArgs) -> Result<(Job, u64), Error> {
    Ok((
        Job::Idle(IdleJob {
            connections: u64::from(a.connections),
            topics: u64::from(a.topics),
            settle: a.settle,
        }),
        u64::from(a.connections),
    ))
}

fn connect_job(a: &ConnectArgs) -> (Job, u64) {
    (
        Job::Connect(ConnectJob {
            connections: a.connections,
            concurrency: a.concurrency,
        }),
        u64::from(a.concurrency),
    )
}

fn soak_job(a: &SoakArgs) -> Result<(Job, u64), Error> {
    let first = a
        .common
        .urls
        .first()
        .ok_or_else(|| Error::BadArgs("--url: at least one is needed".into()))?;
    let derived = |path: &str| soak::http_url(first, path);
    let publish_url = match &a.publish_url {
        Some(u) => u.clone(),
        None => derived("/publish/{topic}")?,
    };
    if Template::new(&publish_url)?.url("t")?.scheme != Scheme::Http {
        return Err(Error::BadArgs(format!(
            "--publish-url {publish_url}: must be an http:// URL"
        )));
    }
    let metrics_url = match &a.metrics_url {
        Some(u) => u.clone(),
        None => derived("/metrics")?,
    };
    if Url::parse(&metrics_url)?.scheme != Scheme::Http {
        return Err(Error::BadArgs(format!(
            "--metrics-url {metrics_url}: must be an http:// URL"
        )));
    }
    for (name, rate) in [
        ("--churn-rate", a.churn_rate),
        ("--publish-rate", a.publish_rate),
        ("--slow-rate", a.slow_rate),
    ] {
        if !(rate >= 0.0 && rate.is_finite()) {
            return Err(Error::BadArgs(format!(
                "{name} {rate}: expected a number of messages or connections per second, 0 or more"
            )));
        }
    }
    if a.probe_interval.is_zero() || a.sample_interval.is_zero() {
        return Err(Error::BadArgs(
            "--probe-interval and --sample-interval must be above 0".into(),
        ));
    }
    Ok((
        Job::Soak(SoakJob {
            connections: u64::from(a.connections),
            topics: u64::from(a.topics),
            churn_rate: a.churn_rate,
            mix: a.mix,
            slow_topics: u64::from(a.slow_topics),
            slow_stall: a.slow_stall,
            recover_timeout: a.recover_timeout,
            publish_url,
            metrics_url,
            publish_rate: a.publish_rate,
            size: a.size as usize,
            slow_rate: a.slow_rate,
            slow_size: a.slow_size,
            sample_interval: a.sample_interval,
            probe_interval: a.probe_interval,
            probe_timeout: a.probe_timeout,
            settle: a.settle,
        }),
        u64::from(a.connections),
    ))
}

/// The first line a worker process reads on stdin.
#[derive(Debug, Serialize, Deserialize)]
struct WorkerSpec {
    plan: Plan,
    index: u32,
}

/// The hidden `__bench-worker` subcommand: reads its spec from stdin, runs its share, and
/// writes [`FromWorker`] messages as JSON lines to stdout.
pub fn run_worker_process() -> Result<(), Error> {
    sys::raise_nofile();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the runtime", e))?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async {
        // The parent's pipes, read and written without a blocking thread in between: chat's
        // barrier crosses them every round.
        let (stdin, mut out) = parent_pipes()?;
        let mut lines = BufReader::new(stdin).lines();
        let first = lines
            .next_line()
            .await
            .map_err(|e| Error::io("reading the worker spec", e))?
            .ok_or_else(|| Error::BadArgs("no worker spec on stdin".into()))?;
        let spec: WorkerSpec = serde_json::from_str(&first)
            .map_err(|e| Error::BadArgs(format!("bad worker spec: {e}")))?;
        let (to_tx, to_rx) = mpsc::unbounded_channel();
        let (from_tx, mut from_rx) = mpsc::unbounded_channel::<FromWorker>();
        // stdin lines -> ToWorker
        tokio::task::spawn_local(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<ToWorker>(&line) {
                    Ok(msg) => {
                        if to_tx.send(msg).is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
            // The parent closed stdin: stop.
            let _ = to_tx.send(ToWorker::Stop);
        });
        // FromWorker -> stdout lines
        let writer = tokio::task::spawn_local(async move {
            while let Some(msg) = from_rx.recv().await {
                let done = matches!(msg, FromWorker::Done(_) | FromWorker::Failed(_));
                let Ok(mut line) = serde_json::to_vec(&msg) else {
                    continue;
                };
                line.push(b'\n');
                if out.write_all(&line).await.is_err() || out.flush().await.is_err() {
                    return;
                }
                if done {
                    return;
                }
            }
        });
        let link = Link {
            tx: from_tx.clone(),
            rx: to_rx,
        };
        let msg = match scenario::run(spec.plan, spec.index, link).await {
            Ok(result) => FromWorker::Done(Box::new(result)),
            Err(e) => FromWorker::Failed(e.to_string()),
        };
        let _ = from_tx.send(msg);
        drop(from_tx);
        let _ = writer.await;
        Ok(())
    })
}

/// Stdin and stdout as asynchronous pipe ends (duplicated descriptors; the parent made them
/// pipes).
fn parent_pipes() -> Result<(pipe::Receiver, pipe::Sender), Error> {
    use std::os::fd::AsFd;
    let dup = |fd: std::os::fd::BorrowedFd<'_>| {
        fd.try_clone_to_owned()
            .map(std::fs::File::from)
            .map_err(|e| Error::io("duplicating a standard stream", e))
    };
    let stdin = pipe::Receiver::from_file(dup(std::io::stdin().as_fd())?)
        .map_err(|e| Error::io("stdin must be a pipe from the parent", e))?;
    let stdout = pipe::Sender::from_file(dup(std::io::stdout().as_fd())?)
        .map_err(|e| Error::io("stdout must be a pipe to the parent", e))?;
    Ok((stdin, stdout))
}

/// The parent's handles on its workers: one channel in, one merged channel out.
pub(crate) struct Workers {
    to: Vec<mpsc::UnboundedSender<ToWorker>>,
    from: mpsc::UnboundedReceiver<(usize, FromWorker)>,
    progress: Vec<Progress>,
    _children: Vec<tokio::process::Child>,
}

impl Workers {
    fn start(plan: &Plan) -> Result<Workers, Error> {
        let (from_tx, from) = mpsc::unbounded_channel();
        let mut to = Vec::new();
        let mut children = Vec::new();
        if plan.workers == 1 {
            let (tx, rx) = mpsc::unbounded_channel();
            let (wtx, mut wrx) = mpsc::unbounded_channel();
            to.push(tx);
            let link = Link { tx: wtx, rx };
            let plan = plan.clone();
            let out = from_tx.clone();
            tokio::task::spawn_local(async move {
                let fwd = out.clone();
                let pump = tokio::task::spawn_local(async move {
                    while let Some(m) = wrx.recv().await {
                        let _ = fwd.send((0, m));
                    }
                });
                let msg = match scenario::run(plan, 0, link).await {
                    Ok(r) => FromWorker::Done(Box::new(r)),
                    Err(e) => FromWorker::Failed(e.to_string()),
                };
                // Progress sent before the result stays ahead of it.
                let _ = pump.await;
                let _ = out.send((0, msg));
            });
        } else {
            let exe =
                std::env::current_exe().map_err(|e| Error::io("finding this executable", e))?;
            for index in 0..plan.workers {
                let mut child = tokio::process::Command::new(&exe)
                    .arg("__bench-worker")
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    .kill_on_drop(true)
                    .spawn()
                    .map_err(|e| Error::io(format!("starting worker {index}"), e))?;
                let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take())
                else {
                    return Err(Error::Worker {
                        index: index as usize,
                        message: "no pipes".into(),
                    });
                };
                let spec = WorkerSpec {
                    plan: plan.clone(),
                    index,
                };
                let mut first = serde_json::to_vec(&spec)
                    .map_err(|e| Error::BadArgs(format!("worker spec: {e}")))?;
                first.push(b'\n');
                let (tx, mut rx) = mpsc::unbounded_channel::<ToWorker>();
                tokio::task::spawn_local(async move {
                    if stdin.write_all(&first).await.is_err() {
                        return;
                    }
                    while let Some(msg) = rx.recv().await {
                        let Ok(mut line) = serde_json::to_vec(&msg) else {
                            continue;
                        };
                        line.push(b'\n');
                        if stdin.write_all(&line).await.is_err() {
                            return;
                        }
                    }
                });
                to.push(tx);
                let out = from_tx.clone();
                let i = index as usize;
                tokio::task::spawn_local(async move {
                    let mut lines = BufReader::new(stdout).lines();
                    loop {
                        match lines.next_line().await {
                            Ok(Some(line)) => match serde_json::from_str::<FromWorker>(&line) {
                                Ok(m) => {
                                    // The last message: the end of file that follows is no failure.
                                    let last =
                                        matches!(m, FromWorker::Done(_) | FromWorker::Failed(_));
                                    let _ = out.send((i, m));
                                    if last {
                                        return;
                                    }
                                }
                                Err(e) => {
                                    let _ = out
                                        .send((i, FromWorker::Failed(format!("bad message: {e}"))));
                                    return;
                                }
                            },
                            Ok(None) | Err(_) => {
                                let _ = out.send((i, FromWorker::Failed("exited".into())));
                                return;
                            }
                        }
                    }
                });
                children.push(child);
            }
        }
        Ok(Workers {
            progress: vec![Progress::default(); to.len()],
            to,
            from,
            _children: children,
        })
    }

    pub(crate) fn send_all(&self, msg: &ToWorker) {
        for tx in &self.to {
            let _ = tx.send(msg.clone());
        }
    }

    pub(crate) fn total(&self) -> Progress {
        self.progress
            .iter()
            .fold(Progress::default(), |a, p| Progress {
                connected: a.connected + p.connected,
                open: a.open + p.open,
                deliveries: a.deliveries + p.deliveries,
                sent: a.sent + p.sent,
                handshakes: a.handshakes + p.handshakes,
            })
    }

    /// The next message that is not progress (progress is folded in). A worker's failure is
    /// an error; `Done` after it has sent one is kept for `results`.
    pub(crate) async fn next(&mut self, bar: &report::Bar) -> Result<(usize, FromWorker), Error> {
        loop {
            let Some((i, msg)) = self.from.recv().await else {
                return Err(Error::Worker {
                    index: 0,
                    message: "every worker went away".into(),
                });
            };
            match msg {
                FromWorker::Progress(p) => {
                    if let Some(slot) = self.progress.get_mut(i) {
                        *slot = p;
                    }
                    bar.update(&self.total());
                }
                FromWorker::Failed(message) => return Err(Error::Worker { index: i, message }),
                other => return Ok((i, other)),
            }
        }
    }

    /// Waits until every worker has sent a message `pick` accepts.
    pub(crate) async fn gather<T>(
        &mut self,
        bar: &report::Bar,
        mut pick: impl FnMut(FromWorker) -> Option<T>,
    ) -> Result<Vec<T>, Error> {
        let mut got: Vec<Option<T>> = (0..self.to.len()).map(|_| None).collect();
        while got.iter().any(Option::is_none) {
            let (i, msg) = self.next(bar).await?;
            if let Some(v) = pick(msg)
                && let Some(slot) = got.get_mut(i)
            {
                *slot = Some(v);
            }
        }
        Ok(got.into_iter().flatten().collect())
    }

    async fn results(&mut self, bar: &report::Bar) -> Result<Vec<WorkerResult>, Error> {
        self.send_all(&ToWorker::Stop);
        self.gather(bar, |m| match m {
            FromWorker::Done(r) => Some(*r),
            _ => None,
        })
        .await
    }
}

/// Runs `shardcast bench` to completion: blocking, on a runtime of its own.
pub fn run_bench(args: &BenchArgs) -> Result<Report, Error> {
    let plan = Plan::from_args(args)?;
    let common = args.scenario.common().clone();
    sys::raise_nofile();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the runtime", e))?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, orchestrate(plan, args.scenario.clone(), common))
}

async fn orchestrate(plan: Plan, scenario: Scenario, common: CommonArgs) -> Result<Report, Error> {
    let wall = Instant::now();
    let pids = &common.server_pids;
    let pid = (!pids.is_empty()).then_some(pids.as_slice());
    let server_before = pid.map(ServerSample::take);
    let cpu_before = sys::self_cpu();
    let bar = report::Bar::new(&plan, common.quiet);
    let mut workers = Workers::start(&plan)?;
    workers
        .gather(&bar, |m| matches!(m, FromWorker::Ready).then_some(()))
        .await?;
    let mut extra = report::Extra::default();
    if let Some(pid) = pid
        && let Job::Idle(job) = &plan.job
    {
        bar.phase("settling");
        tokio::time::sleep(job.settle).await;
        extra.server_after_connect = Some(ServerSample::take(pid));
    }
    // The soak's baseline: the connections open and settled, publishes and probes running.
    let mut soak = match &plan.job {
        Job::Soak(job) => {
            Some(soak::Soak::baseline(&plan, job, &mut workers, &bar, common.quiet).await?)
        }
        _ => None,
    };
    let t0_ns = now_ns();
    let t0 = Instant::now();
    workers.send_all(&ToWorker::Start { t0_ns });
    extra.t0_ns = t0_ns;
    bar.running(&plan);
    let server_at_start = pid.map(ServerSample::take);
    let window = match &plan.job {
        Job::Fanout(job) => fanout_phases(&plan, job, &mut workers, &bar, &mut extra).await?,
        Job::Chat(job) => chat_phases(&plan, job, &mut workers, &bar, &mut extra).await?,
        Job::Idle(_) => {
            tokio::time::sleep(plan.duration).await;
            Window::since(t0)
        }
        Job::Soak(_) => {
            if let Some(soak) = soak.as_mut() {
                soak.churn_and_recover(&plan, &mut workers, &bar).await?;
            }
            Window::since(t0)
        }
        Job::Connect(job) => {
            // Each worker stops by itself: after its share of handshakes, or at the deadline.
            workers
                .gather(&bar, |m| matches!(m, FromWorker::Ready).then_some(()))
                .await?;
            if job.connections.is_some() {
                Window::since(t0)
            } else {
                Window::last(plan.duration)
            }
        }
    };
    let server_at_end = pid.map(ServerSample::take);
    let results = workers.results(&bar).await?;
    bar.finish();
    extra.soak = soak.map(soak::Soak::finish);
    let (u1, s1) = sys::self_cpu();
    let parent_cpu = (u1 + s1).saturating_sub(cpu_before.0 + cpu_before.1);
    extra.server = match (server_before, server_at_start, server_at_end) {
        (Some(b), Some(s), Some(e)) => Some((b, s, e)),
        _ => None,
    };
    report::build(
        &plan,
        &scenario,
        &common,
        results,
        window,
        extra,
        parent_cpu,
        wall.elapsed(),
    )
}

/// The measured window, as the parent saw it.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub wall: Duration,
}

impl Window {
    fn since(t: Instant) -> Window {
        Window { wall: t.elapsed() }
    }
    fn last(d: Duration) -> Window {
        Window { wall: d }
    }
}

/// The server processes' CPU and RSS (sums over the pids that could be read: a helper process
/// that has exited counts nothing; `None` when none could) and the kernel's TCP memory at one
/// instant.
#[derive(Debug, Clone, Copy)]
pub struct ServerSample {
    pub at: Instant,
    pub cpu: Option<Duration>,
    pub rss: Option<u64>,
    pub tcp_mem: Option<u64>,
    pub slab: Option<u64>,
}

impl ServerSample {
    fn take(pids: &[u32]) -> ServerSample {
        ServerSample {
            at: Instant::now(),
            cpu: sum_some(
                pids.iter()
                    .map(|&p| sys::process_cpu(p).map(|(u, s)| u + s)),
            ),
            rss: sum_some(pids.iter().map(|&p| sys::process_rss(p))),
            tcp_mem: sys::tcp_socket_memory(),
            slab: sys::kernel_slab(),
        }
    }
}

/// The sum of the `Some`s, or `None` if there are none.
fn sum_some<T: std::iter::Sum<T>>(items: impl Iterator<Item = Option<T>>) -> Option<T> {
    let mut any = false;
    let sum = items.flatten().inspect(|_| any = true).sum::<T>();
    any.then_some(sum)
}

async fn fanout_phases(
    plan: &Plan,
    job: &FanoutJob,
    workers: &mut Workers,
    bar: &report::Bar,
    extra: &mut report::Extra,
) -> Result<Window, Error> {
    let measure_start = Instant::now()
        + if job.messages.is_some() {
            Duration::ZERO
        } else {
            plan.warmup
        };
    let sent = workers
        .gather(bar, |m| match m {
            FromWorker::Sent(v) => Some(v),
            _ => None,
        })
        .await?;
    let window = Window {
        wall: measure_start.elapsed(),
    };
    let mut expected = vec![0u64; job.topics as usize];
    for per_topic in &sent {
        for (e, s) in expected.iter_mut().zip(per_topic) {
            *e += s;
        }
    }
    extra.expected = expected.clone();
    bar.phase("draining");
    workers.send_all(&ToWorker::Expected(expected));
    workers
        .gather(bar, |m| matches!(m, FromWorker::Ready).then_some(()))
        .await?;
    Ok(window)
}

async fn chat_phases(
    plan: &Plan,
    job: &ChatJob,
    workers: &mut Workers,
    bar: &report::Bar,
    extra: &mut report::Extra,
) -> Result<Window, Error> {
    let start = Instant::now();
    let (warmup, end) = match job.rounds {
        Some(_) => (Duration::ZERO, None),
        None => (plan.warmup, Some(plan.warmup + plan.duration)),
    };
    let mut measured_since: Option<Instant> = None;
    let mut n = 0u64;
    loop {
        if let Some(r) = job.rounds
            && n >= r
        {
            break;
        }
        if let Some(end) = end
            && start.elapsed() >= end
        {
            break;
        }
        n += 1;
        let round_start = Instant::now();
        if measured_since.is_none() && start.elapsed() >= warmup {
            measured_since = Some(round_start);
            extra.first_measured_round = n;
        }
        workers.send_all(&ToWorker::Round(n));
        let done = tokio::time::timeout(
            job.round_timeout,
            workers.gather(bar, |m| {
                matches!(m, FromWorker::RoundDone(r) if r == n).then_some(())
            }),
        )
        .await;
        match done {
            Ok(r) => drop(r?),
            Err(_) => {
                extra.round_timed_out = Some(n);
                break;
            }
        }
        extra.rounds = n;
        if measured_since.is_some() {
            extra.measured_rounds += 1;
        }
        bar.rounds(n);
    }
    Ok(Window {
        wall: measured_since.map_or(Duration::ZERO, |s| s.elapsed()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(args: &[&str]) -> Result<Plan, Error> {
        Plan::from_args(&BenchArgs::parse_from(args)?)
    }

    #[test]
    fn workers_default_to_one_per_15000_connections() {
        assert_eq!(plan(&["idle", "-n", "15000"]).unwrap().workers, 1);
        assert_eq!(plan(&["idle", "-n", "15001"]).unwrap().workers, 2);
        assert_eq!(
            plan(&["idle", "-n", "15001", "--workers", "3"])
                .unwrap()
                .workers,
            3
        );
    }

    #[test]
    fn rate_is_split_over_publishers() {
        let p = plan(&["fanout", "--rate", "300", "-p", "3"]).unwrap();
        let Job::Fanout(f) = p.job else { panic!() };
        assert_eq!(f.rate_per_publisher, Some(100.0));
        let p = plan(&[
            "fanout",
            "--rate",
            "max",
            "--publish-url",
            "http://h/p/{topic}",
        ])
        .unwrap();
        let Job::Fanout(f) = p.job else { panic!() };
        assert_eq!((f.rate_per_publisher, f.publish_http), (None, true));
    }

    #[test]
    fn bad_values_are_bad_args() {
        for args in [
            &["fanout", "--size", "8"][..],
            &["fanout", "--url", "http://h/{topic}"],
            &["fanout", "--rate", "0"],
            &["chat", "--rounds", "0"],
            &["idle", "--url", "nope"],
            &["soak", "--url", "wss://h/{topic}"],
            &["soak", "--publish-url", "ws://h/{topic}"],
            &["soak", "--metrics-url", "https://h/metrics"],
            &["soak", "--churn-rate", "-1"],
            &["soak", "--mix", "abrupt=0"],
            &["soak", "--mix", "fast=1"],
            &["soak", "--probe-interval", "0s"],
        ] {
            assert!(plan(args).unwrap_err().is_bad_args(), "{args:?}");
        }
    }

    #[test]
    fn soak_derives_its_http_urls_from_the_first_url() {
        let p = plan(&[
            "soak",
            "--url",
            "ws://10.0.0.1:9000/ws/{topic}",
            "--mix",
            "close=1",
        ])
        .unwrap();
        let Job::Soak(k) = p.job else { panic!() };
        assert_eq!(k.publish_url, "http://10.0.0.1:9000/publish/{topic}");
        assert_eq!(k.metrics_url, "http://10.0.0.1:9000/metrics");
        assert_eq!((k.mix.abrupt, k.mix.close, k.mix.slow), (0, 1, 0));
        // One worker per 15,000 connections, as for the other scenarios.
        assert_eq!((k.connections, p.workers), (15_000, 1));
    }

    #[test]
    fn shares_cover_everything_once() {
        for (total, k) in [(10, 3), (2, 5), (15_001, 2)] {
            let mut next = 0;
            for i in 0..k {
                let r = scenario::share(total, k, i);
                assert_eq!(r.start, next);
                next = r.end;
            }
            assert_eq!(next, total);
        }
    }
}
