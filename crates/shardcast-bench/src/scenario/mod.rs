//! What one worker runs: the shared per-worker state and the connect phase, and one file per
//! scenario (`fanout`, `chat`, `idle`, `connect`). Each scenario talks to the parent only
//! through a [`Link`]; merging workers' results and printing them live in `worker.rs` and
//! `report.rs`.
//!
//! A worker runs on one thread (a current-thread runtime and a `LocalSet`), so its state is in
//! `Cell`s and `RefCell`s, never borrowed across an await.

mod chat;
mod connect;
mod fanout;
mod idle;
mod soak;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::Error;
use super::client::{self, Dialer, Frame, FrameReader, Request, Rng};
use super::payload::{STAMP_LEN, Stamp, now_ns};
use super::url::{Template, Url, parse_headers};
use super::worker::{FromWorker, Job, Plan, Progress, ServerPart, ToWorker, WorkerResult};

/// The worker's end of the parent/worker channel.
pub struct Link {
    pub tx: mpsc::UnboundedSender<FromWorker>,
    pub rx: mpsc::UnboundedReceiver<ToWorker>,
}

impl Link {
    pub fn send(&self, msg: FromWorker) {
        // A parent that went away will also close `rx`, which `recv` reports.
        let _ = self.tx.send(msg);
    }

    pub async fn recv(&mut self) -> Result<ToWorker, Error> {
        self.rx.recv().await.ok_or_else(|| Error::Worker {
            index: 0,
            message: "the parent went away".into(),
        })
    }
}

/// A new latency histogram: 1 ns to 1 hour, 3 significant figures.
pub fn histogram() -> Histogram<u64> {
    // The bounds are constants that satisfy the constructor's checks (low >= 1, high >= 2 * low,
    // sigfig <= 5), so this cannot fail.
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds")
}

/// One server's share of a worker's results, kept when there is more than one `--url`.
pub struct ServerTally {
    pub connected: Cell<u64>,
    pub window_deliveries: Cell<u64>,
    pub latency: RefCell<Histogram<u64>>,
}

/// Counters and results shared by every connection task of one worker.
pub struct Shared {
    pub connected: Cell<u64>,
    pub open: Cell<u64>,
    pub deliveries: Cell<u64>,
    pub measured: Cell<u64>,
    /// Deliveries received in the measured window, and the last one's time.
    pub window_deliveries: Cell<u64>,
    pub last_window_recv_ns: Cell<u64>,
    pub sent: Cell<u64>,
    pub handshakes: Cell<u64>,
    pub foreign: Cell<u64>,
    /// Stamps at or after this instant are measured (`u64::MAX` until the run starts).
    pub measure_from_ns: Cell<u64>,
    /// Deliveries received from `measure_from_ns` until this instant count toward throughput.
    pub window_to_ns: Cell<u64>,
    pub latency: RefCell<Histogram<u64>>,
    pub disconnects: RefCell<BTreeMap<String, u64>>,
    pub connect_failures: RefCell<BTreeMap<String, u64>>,
    pub publish_errors: RefCell<BTreeMap<String, u64>>,
    pub cpu_at_measure: Cell<Option<Duration>>,
    pub cpu_at_end: Cell<Option<Duration>>,
    /// When (`now_ns`) `cpu_at_measure` and `cpu_at_end` were sampled: the CPU window's span.
    pub cpu_measure_ns: Cell<Option<u64>>,
    pub cpu_end_ns: Cell<Option<u64>>,
    /// Per subscriber URL, in `--url` order; empty with a single URL, where it would only
    /// repeat the totals (and record every latency twice).
    pub by_server: Vec<ServerTally>,
}

impl Shared {
    fn new(servers: usize) -> Shared {
        Shared {
            connected: Cell::new(0),
            open: Cell::new(0),
            deliveries: Cell::new(0),
            measured: Cell::new(0),
            window_deliveries: Cell::new(0),
            last_window_recv_ns: Cell::new(0),
            sent: Cell::new(0),
            handshakes: Cell::new(0),
            foreign: Cell::new(0),
            measure_from_ns: Cell::new(u64::MAX),
            window_to_ns: Cell::new(u64::MAX),
            latency: RefCell::new(histogram()),
            disconnects: RefCell::new(BTreeMap::new()),
            connect_failures: RefCell::new(BTreeMap::new()),
            publish_errors: RefCell::new(BTreeMap::new()),
            cpu_at_measure: Cell::new(None),
            cpu_at_end: Cell::new(None),
            cpu_measure_ns: Cell::new(None),
            cpu_end_ns: Cell::new(None),
            by_server: if servers > 1 {
                (0..servers)
                    .map(|_| ServerTally {
                        connected: Cell::new(0),
                        window_deliveries: Cell::new(0),
                        latency: RefCell::new(histogram()),
                    })
                    .collect()
            } else {
                Vec::new()
            },
        }
    }

    pub fn count(map: &RefCell<BTreeMap<String, u64>>, label: String) {
        *map.borrow_mut().entry(label).or_insert(0) += 1;
    }

    /// Marks the end of the measured window for the CPU count.
    pub fn mark_cpu_end(&self) {
        let (u, s) = super::sys::self_cpu();
        self.cpu_at_end.set(Some(u + s));
        self.cpu_end_ns.set(Some(now_ns()));
    }

    /// Records one delivery stamped `sent_ns` and received at `now` by a connection to
    /// server `server` (its `--url` index): throughput counts what is received in the window,
    /// latency what was sent in it.
    pub fn delivered(&self, server: usize, sent_ns: u64, now: u64) {
        self.deliveries.set(self.deliveries.get() + 1);
        if now >= self.measure_from_ns.get() && now < self.window_to_ns.get() {
            self.window_deliveries.set(self.window_deliveries.get() + 1);
            self.last_window_recv_ns.set(now);
            if let Some(t) = self.by_server.get(server) {
                t.window_deliveries.set(t.window_deliveries.get() + 1);
            }
        }
        self.measure(server, sent_ns, now);
    }

    /// Counts an event on server `server` that started at `sent_ns` and ended at `now`, if it
    /// is measured.
    pub fn measure(&self, server: usize, sent_ns: u64, now: u64) {
        if sent_ns >= self.measure_from_ns.get() {
            let v = now.saturating_sub(sent_ns).max(1);
            self.measured.set(self.measured.get() + 1);
            self.latency.borrow_mut().saturating_record(v);
            if let Some(t) = self.by_server.get(server) {
                t.latency.borrow_mut().saturating_record(v);
            }
        }
    }

    /// Counts a connection opened on server `server` (its `--url` index).
    pub fn opened_on(&self, server: usize) {
        if let Some(t) = self.by_server.get(server) {
            t.connected.set(t.connected.get() + 1);
        }
    }

    /// A connection ended for `label` (a close code, end of file, an error).
    pub fn ended(&self, label: String) {
        self.open.set(self.open.get().saturating_sub(1));
        Shared::count(&self.disconnects, label);
    }

    fn progress(&self) -> Progress {
        Progress {
            connected: self.connected.get(),
            open: self.open.get(),
            deliveries: self.deliveries.get(),
            sent: self.sent.get(),
            handshakes: self.handshakes.get(),
        }
    }

    /// The parts of a result every scenario fills the same way.
    fn result(&self, cpu_total: Duration) -> WorkerResult {
        let end = self.cpu_at_end.get().unwrap_or(cpu_total);
        let cpu_window = self
            .cpu_at_measure
            .get()
            .map_or(end, |at| end.saturating_sub(at));
        WorkerResult {
            connected: self.connected.get(),
            open: self.open.get(),
            deliveries: self.deliveries.get(),
            measured: self.measured.get(),
            window_deliveries: self.window_deliveries.get(),
            last_window_recv_ns: self.last_window_recv_ns.get(),
            sent: self.sent.get(),
            handshakes: self.handshakes.get(),
            foreign: self.foreign.get(),
            latency: super::report::encode_histogram(&self.latency.borrow()),
            disconnects: self.disconnects.borrow().clone(),
            connect_failures: self.connect_failures.borrow().clone(),
            publish_errors: self.publish_errors.borrow().clone(),
            cpu_total_s: cpu_total.as_secs_f64(),
            cpu_window_s: cpu_window.as_secs_f64(),
            cpu_window_wall_s: match (self.cpu_measure_ns.get(), self.cpu_end_ns.get()) {
                (Some(from), Some(to)) => to.saturating_sub(from) as f64 / 1e9,
                _ => 0.0,
            },
            by_server: self
                .by_server
                .iter()
                .map(|t| ServerPart {
                    connected: t.connected.get(),
                    window_deliveries: t.window_deliveries.get(),
                    latency: super::report::encode_histogram(&t.latency.borrow()),
                })
                .collect(),
            ..WorkerResult::default()
        }
    }
}

/// Where connections go: the resolved address and the `Host` header.
pub struct Endpoint {
    pub dialer: Dialer,
    pub host: String,
}

impl Endpoint {
    /// Resolves the host of `url`; connections bind their source as `per_addr` says.
    pub async fn resolve(url: &Url, per_addr: u32) -> Result<Endpoint, Error> {
        Ok(Endpoint {
            dialer: Dialer {
                dest: url.resolve().await?,
                per_addr,
            },
            host: url.host_header(),
        })
    }
}

/// One subscriber URL template and the server it names.
pub struct Server {
    pub endpoint: Endpoint,
    pub template: Template,
}

/// A connection to open: its index, its server (index into [`Ctx::servers`]) and target.
pub struct Dial {
    pub index: u64,
    pub server: usize,
    pub target: String,
}

/// Everything a worker's tasks need, shared by reference count.
pub struct Ctx {
    pub plan: Plan,
    pub index: u32,
    /// The subscriber templates' servers, in `--url` order; never empty.
    pub servers: Vec<Server>,
    pub headers: Vec<(String, String)>,
    pub shared: Shared,
}

impl Ctx {
    pub fn topic(&self, t: u64) -> String {
        format!("{}{t}", self.plan.topic_prefix)
    }

    /// Connection `index` on topic `index % topics`, on the next server for that topic: each
    /// topic's connections go round robin over the servers.
    pub fn dial(&self, index: u64, topics: u64) -> Result<Dial, Error> {
        let server = ((index / topics.max(1)) % self.servers.len() as u64) as usize;
        Ok(Dial {
            index,
            server,
            target: self.servers[server]
                .template
                .url(&self.topic(index % topics.max(1)))?
                .target,
        })
    }

    /// A generator for connection `index`, distinct per connection and per seed.
    pub fn rng(&self, index: u64) -> Rng {
        let mut r = Rng::new(self.plan.seed ^ index.wrapping_mul(0xA076_1D64_78BD_642F));
        r.next_u64();
        r
    }

    /// The share of `total` items that worker `self.index` of `workers` takes.
    pub fn share(&self, total: u64) -> std::ops::Range<u64> {
        share(total, u64::from(self.plan.workers), u64::from(self.index))
    }
}

/// Items `[start, end)` of `total` for worker `i` of `k`: contiguous, sizes differing by one.
pub fn share(total: u64, k: u64, i: u64) -> std::ops::Range<u64> {
    let base = total / k;
    let extra = total % k;
    let start = i * base + i.min(extra);
    let len = base + u64::from(i < extra);
    start..start + len
}

/// Reassembles just enough of each data message to read its stamp: whole frames pass
/// through, fragments are collected up to [`STAMP_LEN`] bytes.
#[derive(Debug, Default)]
pub struct Assembler {
    buf: [u8; STAMP_LEN],
    len: usize,
    in_message: bool,
}

impl Assembler {
    /// Feeds one data frame. `Ok(Some(stamp))` when a message completes (the stamp is `None`
    /// when the message is too short to hold one).
    pub fn push(&mut self, frame: &Frame<'_>) -> Result<Option<Option<Stamp>>, Error> {
        match (frame.opcode, self.in_message) {
            (client::OP_CONT, false) => {
                return Err(Error::Protocol("continuation without a message".into()));
            }
            (client::OP_TEXT | client::OP_BINARY, true) => {
                return Err(Error::Protocol(
                    "new message inside a fragmented one".into(),
                ));
            }
            (_, false) if frame.fin => return Ok(Some(Stamp::read(frame.payload))),
            _ => {}
        }
        self.in_message = true;
        let take = (STAMP_LEN - self.len).min(frame.payload.len());
        self.buf[self.len..self.len + take].copy_from_slice(&frame.payload[..take]);
        self.len += take;
        if !frame.fin {
            return Ok(None);
        }
        let stamp = Stamp::read(&self.buf[..self.len]);
        self.in_message = false;
        self.len = 0;
        Ok(Some(stamp))
    }
}

/// Reads frames until the connection ends and returns how it ended. Each complete data
/// message's stamp goes to `on_message` with the time its bytes were read; pings and closes
/// are answered on `w`.
pub async fn read_loop<R, W>(
    rd: &mut R,
    w: &mut W,
    reader: &mut FrameReader,
    rng: &mut Rng,
    mut on_message: impl FnMut(Option<Stamp>, u64),
) -> String
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut assembler = Assembler::default();
    let mut scratch = Vec::new();
    // Frames that arrived with the handshake response are already buffered: parse first.
    let mut now = now_ns();
    loop {
        loop {
            let frame = match reader.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return e.to_string(),
            };
            if frame.opcode <= client::OP_BINARY {
                match assembler.push(&frame) {
                    Ok(Some(stamp)) => on_message(stamp, now),
                    Ok(None) => {}
                    Err(e) => return e.to_string(),
                }
                continue;
            }
            match client::answer_control(w, &frame, rng, &mut scratch).await {
                Ok(Some(label)) => return label,
                Ok(None) => {}
                Err(e) => return client::io_label(&e),
            }
        }
        match reader.fill(rd).await {
            Ok(0) => return "eof".into(),
            Ok(_) => {}
            Err(e) => return client::io_label(&e),
        }
        now = now_ns();
    }
}

/// An `AsyncWrite` that hands each write to a channel: lets a reading task answer pings on a
/// socket whose write half another task owns (that task writes what arrives, in order).
pub struct ChannelWriter(pub mpsc::UnboundedSender<Vec<u8>>);

impl AsyncWrite for ChannelWriter {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(match self.0.send(buf.to_vec()) {
            Ok(()) => Ok(buf.len()),
            Err(_) => Err(std::io::ErrorKind::BrokenPipe.into()),
        })
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// An open WebSocket: its socket, the reader holding any early frames, its generator.
pub struct Conn {
    pub index: u64,
    /// Which `--url` it was opened on (0 for a publisher's own URL).
    pub server: usize,
    pub stream: TcpStream,
    pub reader: FrameReader,
    pub rng: Rng,
}

/// Opens connection `index` to `target` on `ep`, counting the failure by reason if it fails.
/// `server` is the `--url` index the connection counts toward.
pub async fn open(
    ctx: &Ctx,
    ep: &Endpoint,
    server: usize,
    index: u64,
    target: &str,
    read_buf: usize,
) -> Option<Conn> {
    let mut reader = FrameReader::new(read_buf, client::DEFAULT_MAX_FRAME);
    let mut rng = ctx.rng(index);
    let req = Request {
        host: &ep.host,
        target,
        headers: &ctx.headers,
    };
    match client::open(
        &ep.dialer,
        index,
        &req,
        &mut reader,
        &mut rng,
        ctx.plan.connect_timeout,
    )
    .await
    {
        Ok(stream) => {
            ctx.shared.connected.set(ctx.shared.connected.get() + 1);
            ctx.shared.open.set(ctx.shared.open.get() + 1);
            Some(Conn {
                index,
                server,
                stream,
                reader,
                rng,
            })
        }
        Err(e) => {
            Shared::count(&ctx.shared.connect_failures, failure_label(&e));
            None
        }
    }
}

/// A short, stable label for a failed handshake.
pub fn failure_label(e: &Error) -> String {
    match e {
        Error::Refused { status, .. } => format!("HTTP {status}"),
        Error::Io { source, .. } => client::io_label(source),
        Error::Timeout(_) => "timeout".into(),
        Error::Protocol(m) => format!("protocol: {m}"),
        other => other.to_string(),
    }
}

/// Opens every connection with at most `connect_concurrency` in flight, and hands each to
/// `start` as soon as it is open.
pub async fn open_all(
    ctx: &Rc<Ctx>,
    conns: Vec<Dial>,
    read_buf: usize,
    mut start: impl FnMut(Conn),
) {
    let limit = ctx.plan.connect_concurrency as usize;
    let mut opening = futures_util::stream::iter(conns)
        .map(|d| {
            let ctx = ctx.clone();
            async move {
                // `Ctx::dial` takes the server index modulo the number of servers.
                let ep = &ctx.servers[d.server].endpoint;
                open(&ctx, ep, d.server, d.index, &d.target, read_buf).await
            }
        })
        .buffer_unordered(limit);
    while let Some(conn) = opening.next().await {
        if let Some(conn) = conn {
            ctx.shared.opened_on(conn.server);
            start(conn);
        }
    }
}

/// Sends progress to the parent every 250 ms until aborted.
fn spawn_progress(
    ctx: &Rc<Ctx>,
    tx: mpsc::UnboundedSender<FromWorker>,
) -> tokio::task::JoinHandle<()> {
    let ctx = ctx.clone();
    tokio::task::spawn_local(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            if tx
                .send(FromWorker::Progress(ctx.shared.progress()))
                .is_err()
            {
                return;
            }
        }
    })
}

/// Samples this process's CPU at `at_ns` (`CLOCK_MONOTONIC`), the start of the measured window.
fn spawn_cpu_mark(ctx: &Rc<Ctx>, at_ns: u64) {
    let ctx = ctx.clone();
    tokio::task::spawn_local(async move {
        tokio::time::sleep(until(at_ns)).await;
        let (u, s) = super::sys::self_cpu();
        ctx.shared.cpu_at_measure.set(Some(u + s));
        ctx.shared.cpu_measure_ns.set(Some(now_ns()));
    });
}

/// How long from now until `at_ns` (zero if past).
pub fn until(at_ns: u64) -> Duration {
    Duration::from_nanos(at_ns.saturating_sub(now_ns()))
}

/// Runs one worker: builds its context, runs the scenario, returns its result.
pub async fn run(plan: Plan, index: u32, mut link: Link) -> Result<WorkerResult, Error> {
    let mut servers = Vec::with_capacity(plan.urls.len());
    for url in &plan.urls {
        let template = Template::new(url)?;
        let endpoint = Endpoint::resolve(&template.url("t")?, plan.conns_per_addr).await?;
        servers.push(Server { endpoint, template });
    }
    if servers.is_empty() {
        return Err(Error::BadArgs("--url: at least one is needed".into()));
    }
    let headers = parse_headers(&plan.headers)?;
    let ctx = Rc::new(Ctx {
        shared: Shared::new(servers.len()),
        servers,
        headers,
        index,
        plan,
    });
    let progress = spawn_progress(&ctx, link.tx.clone());
    let result = match ctx.plan.job.clone() {
        Job::Fanout(job) => fanout::run(&ctx, &job, &mut link).await,
        Job::Chat(job) => chat::run(&ctx, &job, &mut link).await,
        Job::Idle(_) => idle::run(&ctx, &mut link).await,
        Job::Connect(job) => connect::run(&ctx, &job, &mut link).await,
        Job::Soak(job) => soak::run(&ctx, &job, &mut link).await,
    };
    progress.abort();
    result
}

/// Tells the parent this worker is connected. An untimed run (by count) measures everything
/// from here on: another worker may start sending before this one has seen `Start`.
fn ready(ctx: &Ctx, link: &Link, timed: bool) {
    if !timed {
        ctx.shared.measure_from_ns.set(0);
    }
    link.send(FromWorker::Ready);
}

/// Waits for the parent's `Start` and marks the measured window; returns the start instant.
/// `timed`: the run lasts `--warmup` + `--duration` (else it runs by count, unwindowed).
async fn wait_start(ctx: &Rc<Ctx>, link: &mut Link, timed: bool) -> Result<u64, Error> {
    loop {
        match link.recv().await? {
            ToWorker::Start { t0_ns } => {
                let from = if timed {
                    t0_ns + ctx.plan.warmup.as_nanos() as u64
                } else {
                    t0_ns
                };
                if timed {
                    ctx.shared.measure_from_ns.set(from);
                    ctx.shared
                        .window_to_ns
                        .set(from + ctx.plan.duration.as_nanos() as u64);
                }
                spawn_cpu_mark(ctx, from);
                return Ok(t0_ns);
            }
            ToWorker::Stop => return Err(Error::Timeout("stopped before the start".into())),
            _ => continue,
        }
    }
}
