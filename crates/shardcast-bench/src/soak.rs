//! The parent's side of `shardcast bench soak`: the HTTP publishes on the topics and the
//! flood of the slow topics, the probes (a POST to the probe topic, received by the probe
//! subscriber), the server's `/metrics` sampled over time, the baseline and end samples and
//! the verdict. Holding and churning the connections is the workers' part
//! (`scenario/soak.rs`); printing the summary is `report.rs`'s.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::Error;
use super::client::{self, Dialer, FrameReader, Request};
use super::payload::{STAMP_LEN, Stamp, now_ns};
use super::post::{Poster, Response};
use super::report::Bar;
use super::scenario::{failure_label, read_loop};
use super::top::{self, Scrape};
use super::url::{Template, Url, parse_headers};
use super::worker::{FromWorker, Plan, SoakJob, ToWorker, Workers};

/// RSS, descriptors and tasks at the end must be within this share of the baseline.
pub const TOLERANCE: f64 = 0.05;
/// A metrics scrape that takes longer fails.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the connection gauge is read while waiting for it to reach a count.
const GAUGE_POLL: Duration = Duration::from_millis(500);

/// `http://HOST:PORT{path}` from a `ws://HOST:PORT/...` URL template.
pub fn http_url(ws: &str, path: &str) -> Result<String, Error> {
    let rest = ws.strip_prefix("ws://").ok_or_else(|| {
        Error::BadArgs(format!(
            "--url {ws}: the publish and metrics URLs are derived only from a ws:// URL; give --publish-url and --metrics-url"
        ))
    })?;
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(Error::BadArgs(format!("--url {ws}: no host")));
    }
    Ok(format!("http://{authority}{path}"))
}

/// The server's gauges at one instant, with the probes so far.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sample {
    /// Seconds since the first connection was asked for.
    pub t_s: f64,
    /// `connect`, `settle`, `baseline`, `churn`, `recover`, `end`.
    pub phase: &'static str,
    /// WebSocket clients the server holds (`shardcast_connections`, all shards).
    pub connections: Option<u64>,
    /// `shardcast_connections_opened_total`: its rise between samples is the churn.
    pub opened_total: Option<u64>,
    pub rss_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub tokio_tasks: Option<u64>,
    /// `shardcast_disconnects_total{reason="slow_consumer"}`: the slow readers the server
    /// dropped (4008), so far.
    pub slow_consumer_drops: Option<u64>,
    pub probes_sent: u64,
    pub probes_answered: u64,
    /// The slowest probe so far, milliseconds.
    pub worst_probe_ms: f64,
    /// Why the scrape failed, if it did.
    pub error: Option<String>,
}

impl Sample {
    fn of(scrape: &Scrape) -> Sample {
        let get = |name: &str| scrape.get(name).map(|v| v.max(0.0) as u64);
        Sample {
            connections: Some(scrape.sum("shardcast_connections", "") as u64),
            opened_total: get("shardcast_connections_opened_total"),
            rss_bytes: get("process_resident_memory_bytes"),
            open_fds: get("process_open_fds"),
            tokio_tasks: get("shardcast_tokio_tasks"),
            slow_consumer_drops: Some(
                scrape.sum("shardcast_disconnects_total", "\"slow_consumer\"") as u64,
            ),
            ..Sample::default()
        }
    }
}

/// The probes: sent, answered within `--probe-timeout`, answered later, and the slowest.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Probes {
    pub sent: u64,
    pub answered: u64,
    pub late: u64,
    /// POSTs that failed (no 2xx); such a probe is not answered either.
    pub post_failures: u64,
    pub worst_ms: f64,
    /// Times the probe subscriber lost its connection.
    pub subscriber_drops: u64,
}

/// The soak's result: the series, the baseline against the end, the churn and the verdict.
#[derive(Debug, Clone, Serialize)]
pub struct SoakResult {
    pub baseline: Sample,
    pub end: Sample,
    pub samples: Vec<Sample>,
    pub probes: Probes,
    /// Seconds the churn lasted.
    pub churn_s: f64,
    /// Connections the server opened while the churn lasted, per second (its counter).
    pub connects_per_sec: f64,
    /// Messages POSTed to the topics, and to the slow topics.
    pub published: u64,
    pub slow_published: u64,
    pub publish_errors: BTreeMap<String, u64>,
    /// Scrapes of `/metrics` that failed.
    pub scrape_failures: u64,
    /// The share of the baseline RSS, descriptors and tasks may differ by at the end.
    pub tolerance: f64,
    /// Empty when the soak passed; each entry says what failed.
    pub failures: Vec<String>,
}

/// `None` when `end` is within `tolerance` (a share) of `base`, else why not.
pub fn drift(what: &str, base: Option<u64>, end: Option<u64>, tolerance: f64) -> Option<String> {
    let (Some(b), Some(e)) = (base, end) else {
        return Some(format!(
            "{what}: not measured (baseline {base:?}, end {end:?})"
        ));
    };
    let change = (e as f64 - b as f64) / (b.max(1) as f64);
    (change.abs() > tolerance).then(|| {
        format!(
            "{what}: {e} at the end against {b} at the baseline ({:+.1}%, limit ±{:.0}%)",
            change * 100.0,
            tolerance * 100.0
        )
    })
}

/// What failed, given the baseline, the end and the probes (empty: the soak passed).
pub fn verdict(baseline: &Sample, end: &Sample, probes: &Probes, tolerance: f64) -> Vec<String> {
    let mut failures: Vec<String> = [
        drift("RSS", baseline.rss_bytes, end.rss_bytes, tolerance),
        drift(
            "open descriptors",
            baseline.open_fds,
            end.open_fds,
            tolerance,
        ),
        drift(
            "tokio tasks",
            baseline.tokio_tasks,
            end.tokio_tasks,
            tolerance,
        ),
    ]
    .into_iter()
    .flatten()
    .collect();
    if probes.sent == 0 {
        failures.push("probes: none was sent".into());
    } else if probes.answered < probes.sent {
        failures.push(format!(
            "probes: {} of {} not answered in time ({} late, {} POSTs failed; slowest {:.0} ms)",
            probes.sent - probes.answered,
            probes.sent,
            probes.late,
            probes.post_failures,
            probes.worst_ms
        ));
    }
    failures
}

/// One row of the table, for the live lines and the summary.
pub fn row(s: &Sample) -> String {
    let n = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    let mib =
        |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{:.1}", v as f64 / 1048576.0));
    format!(
        "{:>8.0} {:>8} {:>7} {:>9} {:>7} {:>7} {:>7} {:>11} {:>9.1}{}",
        s.t_s,
        s.phase,
        n(s.connections),
        mib(s.rss_bytes),
        n(s.open_fds),
        n(s.tokio_tasks),
        n(s.slow_consumer_drops),
        format!("{}/{}", s.probes_answered, s.probes_sent),
        s.worst_probe_ms,
        s.error
            .as_ref()
            .map(|e| format!("  scrape failed: {e}"))
            .unwrap_or_default()
    )
}

/// The header of [`row`]'s table.
pub const HEADER: &str =
    "     t s    phase   conns   RSS MiB     fds   tasks   4008s      probes  worst ms";

/// What the background tasks share with the phases.
struct State {
    t0: Instant,
    /// The probes' stamp id: this run's, so that another run's probes on the same server
    /// are not counted.
    probe_id: u32,
    phase: Cell<&'static str>,
    samples: RefCell<Vec<Sample>>,
    probes: RefCell<Probes>,
    scrape_failures: Cell<u64>,
    published: Cell<u64>,
    slow_published: Cell<u64>,
    publish_errors: RefCell<BTreeMap<String, u64>>,
    /// Probes are sent while this is set.
    probing: Cell<bool>,
    /// Woken when a probe arrives (one waiter: the end of the run).
    probe_arrived: Notify,
    quiet: bool,
}

impl State {
    fn probe_seen(&self, stamp: Stamp, now: u64, timeout: Duration) {
        if stamp.id != self.probe_id {
            return;
        }
        let sent_ns = stamp.sent_ns;
        let ms = now.saturating_sub(sent_ns) as f64 / 1e6;
        let mut p = self.probes.borrow_mut();
        if ms <= timeout.as_secs_f64() * 1e3 {
            p.answered += 1;
        } else {
            p.late += 1;
        }
        p.worst_ms = p.worst_ms.max(ms);
        self.probe_arrived.notify_one();
    }

    /// Whether a POST was answered 2xx; counts its error if not.
    fn posted(&self, r: Result<Response, Error>) -> bool {
        let e = match r {
            Ok(r) if (200..300).contains(&r.status) => return true,
            Ok(r) => Error::Refused {
                status: r.status,
                body: String::new(),
            },
            Err(e) => e,
        };
        let label = failure_label(&e);
        *self.publish_errors.borrow_mut().entry(label).or_insert(0) += 1;
        false
    }
}

/// A soak in progress: the parent's tasks and what they found.
pub(crate) struct Soak {
    state: Rc<State>,
    job: SoakJob,
    metrics: Url,
    metrics_addr: std::net::SocketAddr,
    tasks: Vec<JoinHandle<()>>,
    baseline: Sample,
    end: Sample,
    churn: Option<(Instant, Instant, Option<u64>, Option<u64>)>,
    extra_failures: Vec<String>,
}

impl Soak {
    /// With the workers' connections open: starts the probes, the publishes and the sampler,
    /// waits for the server to count every connection, lets it settle, takes the baseline.
    pub(crate) async fn baseline(
        plan: &Plan,
        job: &SoakJob,
        workers: &mut Workers,
        bar: &Bar,
        quiet: bool,
    ) -> Result<Soak, Error> {
        let state = Rc::new(State {
            t0: Instant::now(),
            // The pid tells concurrent runs apart; the clock, runs of one pid (tests).
            probe_id: std::process::id() ^ (now_ns() as u32),
            phase: Cell::new("settle"),
            samples: RefCell::new(Vec::new()),
            probes: RefCell::new(Probes::default()),
            scrape_failures: Cell::new(0),
            published: Cell::new(0),
            slow_published: Cell::new(0),
            publish_errors: RefCell::new(BTreeMap::new()),
            probing: Cell::new(true),
            probe_arrived: Notify::new(),
            quiet,
        });
        let metrics = Url::parse(&job.metrics_url)?;
        let metrics_addr = metrics.resolve().await?;
        let mut soak = Soak {
            state,
            job: job.clone(),
            metrics,
            metrics_addr,
            tasks: Vec::new(),
            baseline: Sample::default(),
            end: Sample::default(),
            churn: None,
            extra_failures: Vec::new(),
        };
        bar.phase("settling");
        soak.start_tasks(plan).await?;
        if !quiet {
            eprintln!("{HEADER}");
        }
        let expected = job.connections + 1;
        let deadline = Instant::now() + job.recover_timeout;
        let reached = pump(workers, bar, soak.connections_reach(expected, deadline)).await?;
        if let Err(seen) = reached {
            return Err(Error::Failed(format!(
                "soak: the server holds {seen:?} connections, not {expected}, {:?} after they were opened",
                job.recover_timeout
            )));
        }
        pump(workers, bar, tokio::time::sleep(job.settle)).await?;
        soak.baseline = soak.sample("baseline").await;
        if soak.baseline.error.is_some() {
            return Err(Error::Failed(format!(
                "soak: the baseline scrape of {} failed: {}",
                soak.job.metrics_url,
                soak.baseline.error.as_deref().unwrap_or_default()
            )));
        }
        soak.state.phase.set("churn");
        Ok(soak)
    }

    /// After `Start`: churns for `--duration`, calms the workers, waits for the server to
    /// be back to the baseline's connections, lets it settle, takes the end sample and waits
    /// for the last probes.
    pub(crate) async fn churn_and_recover(
        &mut self,
        plan: &Plan,
        workers: &mut Workers,
        bar: &Bar,
    ) -> Result<(), Error> {
        let start = Instant::now();
        let opened_start = self.opened().await;
        pump(workers, bar, tokio::time::sleep(plan.duration)).await?;
        let stop = Instant::now();
        let opened_stop = self.opened().await;
        self.churn = Some((start, stop, opened_start, opened_stop));
        self.state.phase.set("recover");
        bar.phase("recovering");
        workers.send_all(&ToWorker::Calm);
        let calm = tokio::time::timeout(
            self.job.recover_timeout,
            workers.gather(bar, |m| matches!(m, FromWorker::Ready).then_some(())),
        )
        .await;
        match calm {
            Ok(r) => drop(r?),
            Err(_) => {
                return Err(Error::Failed(format!(
                    "soak: the workers did not get every connection open again within {:?}",
                    self.job.recover_timeout
                )));
            }
        }
        let expected = self.job.connections + 1;
        let deadline = Instant::now() + self.job.recover_timeout;
        if let Err(seen) = pump(workers, bar, self.connections_reach(expected, deadline)).await? {
            self.extra_failures.push(format!(
                "connections: the server held {seen:?} connections, not the baseline's {expected}, {:?} after the churn stopped",
                self.job.recover_timeout
            ));
        }
        self.state.phase.set("settle");
        pump(workers, bar, tokio::time::sleep(self.job.settle)).await?;
        self.end = self.sample("end").await;
        // No more probes; those sent get their time to arrive (a POST in flight included).
        self.state.probing.set(false);
        self.state.phase.set("done");
        let deadline = tokio::time::Instant::now() + self.job.probe_timeout + SCRAPE_TIMEOUT;
        loop {
            let p = self.state.probes.borrow().clone();
            if p.answered + p.late + p.post_failures >= p.sent {
                break;
            }
            let arrived = self.state.probe_arrived.notified();
            if pump(workers, bar, tokio::time::timeout_at(deadline, arrived))
                .await?
                .is_err()
            {
                break;
            }
        }
        for t in self.tasks.drain(..) {
            t.abort();
        }
        Ok(())
    }

    /// Stops the tasks and builds the result with its verdict.
    pub(crate) fn finish(self) -> SoakResult {
        for t in &self.tasks {
            t.abort();
        }
        let probes = self.state.probes.borrow().clone();
        let mut failures = verdict(&self.baseline, &self.end, &probes, TOLERANCE);
        failures.extend(self.extra_failures.iter().cloned());
        let scrape_failures = self.state.scrape_failures.get();
        if scrape_failures > 0 {
            failures.push(format!(
                "metrics: {scrape_failures} scrapes of {} failed",
                self.job.metrics_url
            ));
        }
        let (churn_s, connects_per_sec) = match self.churn {
            Some((a, b, Some(o1), Some(o2))) => {
                let s = b.duration_since(a).as_secs_f64();
                (
                    s,
                    if s > 0.0 {
                        o2.saturating_sub(o1) as f64 / s
                    } else {
                        0.0
                    },
                )
            }
            Some((a, b, _, _)) => (b.duration_since(a).as_secs_f64(), 0.0),
            None => (0.0, 0.0),
        };
        SoakResult {
            baseline: self.baseline,
            end: self.end,
            samples: self.state.samples.borrow().clone(),
            probes,
            churn_s,
            connects_per_sec,
            published: self.state.published.get(),
            slow_published: self.state.slow_published.get(),
            publish_errors: self.state.publish_errors.borrow().clone(),
            scrape_failures,
            tolerance: TOLERANCE,
            failures,
        }
    }

    /// Scrapes the server's metrics once.
    async fn scrape(&self) -> Result<Scrape, String> {
        scrape(self.metrics_addr, &self.metrics).await
    }

    /// The server's count of connections opened so far, if it answers.
    async fn opened(&self) -> Option<u64> {
        Sample::of(&self.scrape().await.ok()?).opened_total
    }

    /// Scrapes, records and prints one sample of `phase`.
    async fn sample(&self, phase: &'static str) -> Sample {
        record(&self.state, phase, self.scrape().await)
    }

    /// Polls the connection gauge until it reads `n` (`Ok`), or the deadline (`Err` with the
    /// last reading).
    async fn connections_reach(&self, n: u64, deadline: Instant) -> Result<(), Option<u64>> {
        let mut last = None;
        loop {
            if let Ok(s) = self.scrape().await {
                last = Some(Sample::of(&s).connections.unwrap_or(0));
                if last == Some(n) {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(last);
            }
            tokio::time::sleep(GAUGE_POLL).await;
        }
    }

    /// Opens the probe subscriber, then starts it, the probe sender, the publishers and the
    /// sampler as local tasks.
    async fn start_tasks(&mut self, plan: &Plan) -> Result<(), Error> {
        let job = &self.job;
        let headers = parse_headers(&plan.headers)?;
        let publish = Template::new(&job.publish_url)?;
        let post_dialer = Dialer {
            dest: publish.url("t")?.resolve().await?,
            per_addr: 0,
        };
        let poster = |topic: &str| -> Result<Poster, Error> {
            Ok(Poster::new(
                post_dialer,
                0,
                publish.url(topic)?,
                "application/octet-stream",
                &headers,
            ))
        };
        // The probe subscriber, open before the first probe is sent.
        let probe_topic = format!("{}probe", plan.topic_prefix);
        let ws = Template::new(plan.urls.first().map_or("", String::as_str))?.url(&probe_topic)?;
        let ws_dialer = Dialer {
            dest: ws.resolve().await?,
            per_addr: 0,
        };
        let host = ws.host_header();
        let sub = Rc::new((ws_dialer, host, ws.target.clone(), headers.clone()));
        let mut reader = FrameReader::new(4096, client::DEFAULT_MAX_FRAME);
        let mut rng = client::Rng::new(plan.seed ^ 0x5EED_50AC);
        let first = client::open(
            &sub.0,
            0,
            &Request {
                host: &sub.1,
                target: &sub.2,
                headers: &sub.3,
            },
            &mut reader,
            &mut rng,
            plan.connect_timeout,
        )
        .await
        .map_err(|e| Error::Failed(format!("soak: opening the probe subscriber: {e}")))?;
        let state = self.state.clone();
        let timeout = job.probe_timeout;
        let connect_timeout = plan.connect_timeout;
        self.tasks.push(tokio::task::spawn_local(async move {
            let mut stream = Some(first);
            loop {
                if let Some(mut s) = stream.take() {
                    let (mut rd, mut wr) = s.split();
                    read_loop(&mut rd, &mut wr, &mut reader, &mut rng, |st, now| {
                        if let Some(st) = st {
                            state.probe_seen(st, now, timeout);
                        }
                    })
                    .await;
                    state.probes.borrow_mut().subscriber_drops += 1;
                }
                reader = FrameReader::new(4096, client::DEFAULT_MAX_FRAME);
                let req = Request {
                    host: &sub.1,
                    target: &sub.2,
                    headers: &sub.3,
                };
                match client::open(&sub.0, 0, &req, &mut reader, &mut rng, connect_timeout).await {
                    Ok(s) => stream = Some(s),
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }));
        // The probe sender: one POST at a time.
        let mut probe = poster(&probe_topic)?;
        let state = self.state.clone();
        self.tasks.push(every(job.probe_interval, async move |seq| {
            if !state.probing.get() {
                return;
            }
            let mut body = [0u8; STAMP_LEN];
            Stamp {
                sent_ns: now_ns(),
                seq,
                id: state.probe_id,
            }
            .write(&mut body);
            state.probes.borrow_mut().sent += 1;
            if !state.posted(probe.post(&body, false).await) {
                state.probes.borrow_mut().post_failures += 1;
            }
            state.probe_arrived.notify_one();
        }));
        // The topics' publishes, round robin; and the slow topics' flood, always on so that
        // its HTTP connections are in the baseline too (only slow readers subscribe to these
        // topics: outside the churn a message costs the server a lookup).
        let slow_rate = if job.mix.slow > 0 { job.slow_rate } else { 0.0 };
        let streams: [(&str, u64, usize, f64, Counter); 2] = [
            ("", job.topics, job.size, job.publish_rate, |s| &s.published),
            ("slow", job.slow_topics, job.slow_size, slow_rate, |s| {
                &s.slow_published
            }),
        ];
        for (infix, topics, size, rate, count) in streams {
            if rate <= 0.0 {
                continue;
            }
            let posters = (0..topics)
                .map(|t| poster(&format!("{}{infix}{t}", plan.topic_prefix)))
                .collect::<Result<Vec<_>, Error>>()?;
            let total = rate * if infix.is_empty() { 1.0 } else { topics as f64 };
            self.tasks
                .push(round_robin(self.state.clone(), posters, size, total, count));
        }
        // The sampler.
        let state = self.state.clone();
        let (addr, url) = (self.metrics_addr, self.metrics.clone());
        self.tasks.push(every(job.sample_interval, async move |_| {
            let got = scrape(addr, &url).await;
            record(&state, state.phase.get(), got);
        }));
        Ok(())
    }
}

/// One `GET` of the metrics, on a fresh connection, bounded by [`SCRAPE_TIMEOUT`].
async fn scrape(addr: std::net::SocketAddr, url: &Url) -> Result<Scrape, String> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            url.target,
            url.host_header()
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut body = Vec::new();
        (&mut s)
            .take(top::MAX_METRICS)
            .read_to_end(&mut body)
            .await
            .map_err(|e| e.to_string())?;
        top::parse_response(&body)
    };
    tokio::time::timeout(SCRAPE_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| Err(format!("no answer in {SCRAPE_TIMEOUT:?}")))
}

/// Runs `fut` while folding the workers' progress into the bar; a worker's failure ends it
/// with that error. Other messages are not expected while the parent waits here.
async fn pump<T>(
    workers: &mut Workers,
    bar: &Bar,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, Error> {
    tokio::pin!(fut);
    loop {
        tokio::select! {
            v = &mut fut => return Ok(v),
            m = workers.next(bar) => drop(m?),
        }
    }
}

/// Records a scrape (or its failure) as a sample of `phase`, with the probes so far, and
/// prints its row unless quiet.
fn record(state: &State, phase: &'static str, scrape: Result<Scrape, String>) -> Sample {
    let mut s = match &scrape {
        Ok(sc) => Sample::of(sc),
        Err(e) => {
            state.scrape_failures.set(state.scrape_failures.get() + 1);
            Sample {
                error: Some(e.clone()),
                ..Sample::default()
            }
        }
    };
    s.t_s = state.t0.elapsed().as_secs_f64();
    s.phase = phase;
    let p = state.probes.borrow();
    s.probes_sent = p.sent;
    s.probes_answered = p.answered;
    s.worst_probe_ms = p.worst_ms;
    drop(p);
    if !state.quiet {
        eprintln!("{}", row(&s));
    }
    state.samples.borrow_mut().push(s.clone());
    s
}

/// Which counter of the [`State`] a stream of publishes counts in.
type Counter = fn(&State) -> &Cell<u64>;

/// A local task POSTing `size`-byte stamped messages at `rate` per second, one poster after
/// the other, counting those answered 2xx in the counter `count` picks.
fn round_robin(
    state: Rc<State>,
    mut posters: Vec<Poster>,
    size: usize,
    rate: f64,
    count: Counter,
) -> JoinHandle<()> {
    let mut body = vec![0u8; size.max(STAMP_LEN)];
    every(Duration::from_secs_f64(1.0 / rate), async move |n| {
        Stamp {
            sent_ns: now_ns(),
            seq: n,
            id: 1,
        }
        .write(&mut body);
        let i = (n % posters.len().max(1) as u64) as usize;
        let Some(poster) = posters.get_mut(i) else {
            return;
        };
        if state.posted(poster.post(&body, false).await) {
            let c = count(&state);
            c.set(c.get() + 1);
        }
    })
}

/// A local task calling `tick(n)` every `interval` (n = 0, 1, ...) and awaiting it before
/// the next tick; ticks missed meanwhile are skipped, not bunched.
fn every<F>(interval: Duration, mut tick: F) -> JoinHandle<()>
where
    F: AsyncFnMut(u64) + 'static,
{
    tokio::task::spawn_local(async move {
        let mut t = tokio::time::interval(interval);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut n = 0;
        loop {
            t.tick().await;
            tick(n).await;
            n += 1;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_and_metrics_urls_come_from_the_websocket_url() {
        assert_eq!(
            http_url("ws://127.0.0.1:8080/ws/{topic}", "/metrics").unwrap(),
            "http://127.0.0.1:8080/metrics"
        );
        assert_eq!(
            http_url("ws://h:1/{topic}", "/publish/{topic}").unwrap(),
            "http://h:1/publish/{topic}"
        );
        assert!(
            http_url("wss://h/ws/{topic}", "/metrics")
                .unwrap_err()
                .is_bad_args()
        );
        assert!(http_url("ws:///x", "/metrics").unwrap_err().is_bad_args());
    }

    fn sample(rss: u64, fds: u64, tasks: u64) -> Sample {
        Sample {
            rss_bytes: Some(rss),
            open_fds: Some(fds),
            tokio_tasks: Some(tasks),
            ..Sample::default()
        }
    }

    #[test]
    fn the_end_passes_within_five_percent_either_way() {
        let probes = Probes {
            sent: 10,
            answered: 10,
            ..Probes::default()
        };
        let base = sample(1000, 200, 400);
        assert!(verdict(&base, &sample(1050, 190, 420), &probes, TOLERANCE).is_empty());
        let bad = verdict(&base, &sample(1051, 189, 400), &probes, TOLERANCE);
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(
            bad[0].starts_with("RSS: 1051 at the end against 1000"),
            "{bad:?}"
        );
        assert!(bad[1].starts_with("open descriptors: 189"), "{bad:?}");
    }

    #[test]
    fn every_probe_must_be_answered_and_gauges_measured() {
        let base = sample(1000, 200, 400);
        let missed = Probes {
            sent: 10,
            answered: 9,
            late: 1,
            worst_ms: 2500.0,
            ..Probes::default()
        };
        let f = verdict(&base, &base, &missed, TOLERANCE);
        assert_eq!(f.len(), 1);
        assert!(f[0].starts_with("probes: 1 of 10 not answered"), "{f:?}");
        let none = verdict(&base, &base, &Probes::default(), TOLERANCE);
        assert_eq!(none, ["probes: none was sent"]);
        let unmeasured = Sample {
            tokio_tasks: None,
            ..base.clone()
        };
        let f = verdict(
            &base,
            &unmeasured,
            &Probes {
                sent: 1,
                answered: 1,
                ..Probes::default()
            },
            TOLERANCE,
        );
        assert!(f[0].starts_with("tokio tasks: not measured"), "{f:?}");
    }

    #[test]
    fn a_scrape_gives_the_gauges() {
        let text = "# TYPE shardcast_connections gauge\n\
            shardcast_connections{shard=\"0\"} 3\n\
            shardcast_connections{shard=\"1\"} 4\n\
            shardcast_connections_opened_total 90\n\
            shardcast_tokio_tasks 17\n\
            process_open_fds 12\n\
            process_resident_memory_bytes 4096\n";
        let s = Sample::of(&Scrape::parse(text));
        assert_eq!(
            (
                s.connections,
                s.opened_total,
                s.rss_bytes,
                s.open_fds,
                s.tokio_tasks
            ),
            (Some(7), Some(90), Some(4096), Some(12), Some(17))
        );
    }
}
