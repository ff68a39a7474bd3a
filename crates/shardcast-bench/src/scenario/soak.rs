//! `soak` inside one worker: its share of the connections, each held by a slot task that
//! reopens it whenever it ends, and the churn that makes slots leave (abruptly, with a close
//! frame, or as a slow reader) at the worker's share of `--churn-rate`. The parent's side
//! (probes, publishes, the server's metrics, the verdict) lives in `soak.rs`, not here.
//!
//! Phases, as the parent paces them: every slot opens, then `Ready`; `Start` starts the
//! churn; `Calm` stops it, and once every slot holds an ordinary connection again (slow
//! readers dropped by the server and replaced), `Ready` again; `Stop` ends the worker.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, Semaphore, oneshot};

use super::{Conn, Ctx, Link, read_loop};
use crate::Error;
use crate::args::Mix;
use crate::client::{self, FrameReader, Request};
use crate::worker::{FromWorker, SoakJob, ToWorker, WorkerResult};

/// An ordinary connection's read buffer: the topic's small messages and pings.
const READ_BUF: usize = 2048;
/// A slow reader's kernel receive buffer (the kernel doubles it, and rounds it up).
const SLOW_RCVBUF: usize = 4096;
/// How long a slow reader, reading again after its stall, waits for the server's close.
const SLOW_DRAIN: Duration = Duration::from_secs(10);
/// How long a clean close waits for the server's close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// Random slots tried per churn before giving up on that tick (most are held at any time).
const PICK_TRIES: usize = 16;

/// How a churned connection leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leave {
    Abrupt,
    Close,
    Slow,
}

/// The way to leave that `roll` (any number) picks, in proportion to the weights of `mix`.
pub fn pick(mix: &Mix, roll: u64) -> Leave {
    let total = u64::from(mix.abrupt) + u64::from(mix.close) + u64::from(mix.slow);
    // `parse_mix` refuses all-zero weights; `max(1)` keeps a hand-built `Mix` from dividing by 0.
    let r = roll % total.max(1);
    if r < u64::from(mix.abrupt) {
        Leave::Abrupt
    } else if r < u64::from(mix.abrupt) + u64::from(mix.close) {
        Leave::Close
    } else {
        Leave::Slow
    }
}

/// The worker's slots: which hold an ordinary connection now, and the way to tell each to leave.
struct Slots {
    /// Per slot (from the start of this worker's share), the sender that makes it leave; `None`
    /// while it is connecting, leaving or living as a slow reader.
    leave: RefCell<Vec<Option<oneshot::Sender<Leave>>>>,
    held: Cell<u64>,
    /// Woken at every change of `held` (one waiter: the worker's main task).
    changed: Notify,
    churned: RefCell<std::collections::BTreeMap<String, u64>>,
    /// Churn ticks that found no held slot in `PICK_TRIES` tries.
    missed: Cell<u64>,
}

impl Slots {
    fn hold(&self, i: usize, tx: oneshot::Sender<Leave>) {
        self.leave.borrow_mut()[i] = Some(tx);
        self.held.set(self.held.get() + 1);
        self.changed.notify_one();
    }

    fn release(&self, i: usize) {
        self.leave.borrow_mut()[i] = None;
        self.held.set(self.held.get().saturating_sub(1));
        self.changed.notify_one();
    }

    /// Tells one random held slot to leave as `mix` says.
    fn churn_one(&self, rng: &mut client::Rng, mix: &Mix) {
        let n = self.leave.borrow().len() as u64;
        if n == 0 {
            return;
        }
        for _ in 0..PICK_TRIES {
            let i = (rng.next_u64() % n) as usize;
            let Some(tx) = self.leave.borrow_mut()[i].take() else {
                continue;
            };
            let how = pick(mix, rng.next_u64());
            if tx.send(how).is_ok() {
                let name = match how {
                    Leave::Abrupt => "abrupt",
                    Leave::Close => "close",
                    Leave::Slow => "slow",
                };
                *self.churned.borrow_mut().entry(name.into()).or_insert(0) += 1;
                return;
            }
        }
        self.missed.set(self.missed.get() + 1);
    }

    /// Waits until all `n` slots are held, at most `limit`.
    async fn all_held(&self, n: u64, limit: Duration, what: &str) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + limit;
        while self.held.get() < n {
            if tokio::time::timeout_at(deadline, self.changed.notified())
                .await
                .is_err()
            {
                return Err(Error::Timeout(format!(
                    "{what}: {} of {n} connections open after {limit:?}",
                    self.held.get()
                )));
            }
        }
        Ok(())
    }
}

pub async fn run(ctx: &Rc<Ctx>, job: &SoakJob, link: &mut Link) -> Result<WorkerResult, Error> {
    let share = ctx.share(job.connections);
    let n = share.end - share.start;
    let slots = Rc::new(Slots {
        leave: RefCell::new((0..n).map(|_| None).collect()),
        held: Cell::new(0),
        changed: Notify::new(),
        churned: RefCell::new(Default::default()),
        missed: Cell::new(0),
    });
    let gate = Rc::new(Semaphore::new(ctx.plan.connect_concurrency as usize));
    let job = Rc::new(job.clone());
    let mut tasks = Vec::with_capacity(n as usize);
    for slot in share.clone() {
        tasks.push(tokio::task::spawn_local(slot_loop(
            ctx.clone(),
            slots.clone(),
            gate.clone(),
            job.clone(),
            slot,
            (slot - share.start) as usize,
        )));
    }
    slots
        .all_held(n, job.recover_timeout, "opening the connections")
        .await?;
    super::ready(ctx, link, false);
    super::wait_start(ctx, link, false).await?;
    let per_worker = job.churn_rate / f64::from(ctx.plan.workers);
    let mut rng = ctx.rng(u64::MAX - u64::from(ctx.index));
    let churn = async {
        if per_worker <= 0.0 || n == 0 {
            return std::future::pending::<()>().await;
        }
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_worker));
        loop {
            tick.tick().await;
            slots.churn_one(&mut rng, &job.mix);
        }
    };
    tokio::select! {
        () = churn => {}
        calm = wait_calm(link) => calm?,
    }
    slots
        .all_held(n, job.recover_timeout, "after the churn")
        .await?;
    link.send(FromWorker::Ready);
    while !matches!(link.recv().await?, ToWorker::Stop) {}
    ctx.shared.mark_cpu_end();
    for t in tasks {
        t.abort();
    }
    let (u, s) = crate::sys::self_cpu();
    let mut result = ctx.shared.result(u + s);
    result.churned = slots.churned.borrow().clone();
    result.churn_missed = slots.missed.get();
    Ok(result)
}

async fn wait_calm(link: &mut Link) -> Result<(), Error> {
    loop {
        match link.recv().await? {
            ToWorker::Calm => return Ok(()),
            ToWorker::Stop => return Err(Error::Timeout("stopped during the churn".into())),
            _ => {}
        }
    }
}

/// Keeps slot `slot` (position `i` in this worker's share) connected: opens an ordinary
/// connection on topic `slot % topics`, holds it until the server ends it or the churn tells
/// it to leave, leaves, and opens the next. Each connection has a fresh index, so source
/// addresses and handshake keys rotate.
async fn slot_loop(
    ctx: Rc<Ctx>,
    slots: Rc<Slots>,
    gate: Rc<Semaphore>,
    job: Rc<SoakJob>,
    slot: u64,
    i: usize,
) {
    let server = (slot % ctx.servers.len() as u64) as usize;
    let Ok(target) = ctx.servers[server]
        .template
        .url(&ctx.topic(slot % job.topics.max(1)))
        .map(|u| u.target)
    else {
        return;
    };
    let mut generation = 0u64;
    let mut backoff = Duration::from_millis(100);
    loop {
        let index = slot + generation * job.connections;
        generation += 1;
        let opened = {
            // The gate outlives the slot tasks (they are aborted first), so it is never closed.
            let _permit = gate.acquire().await;
            let ep = &ctx.servers[server].endpoint;
            super::open(&ctx, ep, server, index, &target, READ_BUF).await
        };
        let Some(conn) = opened else {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
            continue;
        };
        backoff = Duration::from_millis(100);
        ctx.shared.handshakes.set(ctx.shared.handshakes.get() + 1);
        let (tx, rx) = oneshot::channel();
        slots.hold(i, tx);
        let Conn {
            mut stream,
            mut reader,
            mut rng,
            ..
        } = conn;
        let shared = &ctx.shared;
        let told = {
            let (mut rd, mut wr) = stream.split();
            tokio::select! {
                label = read_loop(&mut rd, &mut wr, &mut reader, &mut rng, |_, _| {
                    shared.deliveries.set(shared.deliveries.get() + 1);
                }) => Err(label),
                how = rx => Ok(how),
            }
        };
        slots.release(i);
        match told {
            // The server ended it: unexpected in a soak, and reported as it is.
            Err(label) => shared.ended(label),
            Ok(Ok(Leave::Abrupt)) => {
                // Half with a reset (SO_LINGER 0), half with a plain FIN and no close frame.
                let label = if rng.next_u64().is_multiple_of(2) {
                    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                    "churn: abrupt (reset)"
                } else {
                    "churn: abrupt (fin)"
                };
                drop(stream);
                shared.ended(label.into());
            }
            // A sender dropped without a word cannot happen (the churn sends or puts nothing
            // back); treat it as a clean close.
            Ok(Ok(Leave::Close)) | Ok(Err(_)) => {
                let label = close(&mut stream, &mut reader, &mut rng).await;
                shared.ended(format!("churn: close ({label})"));
            }
            Ok(Ok(Leave::Slow)) => {
                let label = close(&mut stream, &mut reader, &mut rng).await;
                shared.ended(format!("churn: close before slow ({label})"));
                drop(stream);
                let index = slot + generation * job.connections;
                generation += 1;
                let label = slow_reader(&ctx, &gate, &job, server, slot, index).await;
                shared.ended(format!("slow reader: {label}"));
            }
        }
    }
}

/// Sends a close frame (1000) and reads until the server's close, its end of file, or
/// [`CLOSE_WAIT`]; returns how it ended.
async fn close(
    stream: &mut tokio::net::TcpStream,
    reader: &mut FrameReader,
    rng: &mut client::Rng,
) -> String {
    let mut frame = Vec::new();
    client::encode_close(&mut frame, Some(1000), rng.mask());
    if let Err(e) = stream.write_all(&frame).await {
        return client::io_label(&e);
    }
    let (mut rd, mut wr) = stream.split();
    tokio::time::timeout(
        CLOSE_WAIT,
        read_loop(&mut rd, &mut wr, reader, rng, |_, _| {}),
    )
    .await
    .unwrap_or_else(|_| "no close from the server".into())
}

/// A slow reader's life: connects with tiny buffers to a slow (flooded) topic, stops reading
/// for `--slow-stall`, then reads again until the server's close. Returns how it ended
/// (`close 4008 ...` when the server dropped it as a slow consumer).
async fn slow_reader(
    ctx: &Rc<Ctx>,
    gate: &Semaphore,
    job: &SoakJob,
    server: usize,
    slot: u64,
    index: u64,
) -> String {
    let topic = format!("{}slow{}", ctx.plan.topic_prefix, slot % job.slow_topics);
    let Ok(target) = ctx.servers[server].template.url(&topic).map(|u| u.target) else {
        return "bad slow topic".into();
    };
    let ep = &ctx.servers[server].endpoint;
    let mut reader = FrameReader::new(READ_BUF, client::DEFAULT_MAX_FRAME);
    let mut rng = ctx.rng(index);
    let req = Request {
        host: &ep.host,
        target: &target,
        headers: &ctx.headers,
    };
    let opened = {
        let _permit = gate.acquire().await;
        tokio::time::timeout(ctx.plan.connect_timeout, async {
            let mut s = ep
                .dialer
                .connect_tuned(index, Some(SLOW_RCVBUF))
                .await
                .map_err(|e| Error::io("connecting a slow reader", e))?;
            client::handshake(&mut s, &mut reader, &req, &mut rng).await?;
            Ok::<_, Error>(s)
        })
        .await
    };
    let mut stream = match opened {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            crate::scenario::Shared::count(&ctx.shared.connect_failures, super::failure_label(&e));
            return "connect failed".into();
        }
        Err(_) => return "connect timed out".into(),
    };
    ctx.shared.connected.set(ctx.shared.connected.get() + 1);
    ctx.shared.open.set(ctx.shared.open.get() + 1);
    ctx.shared.handshakes.set(ctx.shared.handshakes.get() + 1);
    tokio::time::sleep(job.slow_stall).await;
    let (mut rd, mut wr) = stream.split();
    tokio::time::timeout(
        SLOW_DRAIN,
        read_loop(&mut rd, &mut wr, &mut reader, &mut rng, |_, _| {}),
    )
    .await
    .unwrap_or_else(|_| "not dropped by the server".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaving_follows_the_weights() {
        let mix = Mix {
            abrupt: 2,
            close: 1,
            slow: 1,
        };
        let got: Vec<Leave> = (0..8).map(|r| pick(&mix, r)).collect();
        use Leave::*;
        assert_eq!(
            got,
            [Abrupt, Abrupt, Close, Slow, Abrupt, Abrupt, Close, Slow]
        );
        let only_slow = Mix {
            abrupt: 0,
            close: 0,
            slow: 3,
        };
        assert!((0..10).all(|r| pick(&only_slow, r) == Slow));
    }
}
