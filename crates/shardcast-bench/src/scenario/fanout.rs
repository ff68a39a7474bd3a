//! `fanout` inside one worker: its share of subscribers (subscriber `i` on topic `i % T`) and
//! of publishers (publisher `j` on topic `j % T`, in worker `j % K`), pacing, per-subscriber
//! loss and order, and the drain. Merging across workers lives in `report.rs`.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::{ChannelWriter, Conn, Ctx, Dial, Endpoint, Link, Shared, read_loop, until};
use crate::Error;
use crate::client::{self, OP_BINARY};
use crate::payload::{STAMP_LEN, Stamp, now_ns};
use crate::post::Poster;
use crate::url::{Template, parse_headers};
use crate::worker::{FanoutJob, FromWorker, ToWorker, TopicTally, WorkerResult};

/// Frames a publisher writes at most per write at `--rate max`.
const BATCH: u64 = 64;
/// A subscriber's read buffer: room for many small frames per read.
const SUB_READ_BUF: usize = 8 * 1024;
/// An HTTP publisher gives up after this many failed requests in a row.
const MAX_POST_ERRORS: u32 = 100;

/// One subscriber's tally, read once the run is over.
struct Sub {
    topic: u64,
    received: Cell<u64>,
    out_of_order: Cell<u64>,
    ended: Cell<bool>,
}

/// Publishers on topic `t` of `topics` when there are `publishers` in all (ids `t`, `t + T`, ...).
fn publishers_on(t: u64, topics: u64, publishers: u64) -> u64 {
    publishers / topics + u64::from(t < publishers % topics)
}

pub async fn run(ctx: &Rc<Ctx>, job: &FanoutJob, link: &mut Link) -> Result<WorkerResult, Error> {
    let topics = job.topics;
    let subs: Vec<Dial> = ctx
        .share(job.subscribers)
        .map(|i| ctx.dial(i, topics))
        .collect::<Result<_, Error>>()?;
    let mut tallies: Vec<Rc<Sub>> = Vec::with_capacity(subs.len());
    super::open_all(ctx, subs, SUB_READ_BUF, |conn| {
        let sub = Rc::new(Sub {
            topic: conn.index % topics,
            received: Cell::new(0),
            out_of_order: Cell::new(0),
            ended: Cell::new(false),
        });
        tallies.push(sub.clone());
        tokio::task::spawn_local(subscriber(ctx.clone(), conn, sub, job.publishers, topics));
    })
    .await;

    // This worker's publishers.
    let template = Template::new(&job.publish_url)?;
    let endpoint = Endpoint::resolve(&template.url("t")?, ctx.plan.conns_per_addr).await?;
    let workers = u64::from(ctx.plan.workers);
    let ids: Vec<u64> = (0..job.publishers)
        .filter(|j| j % workers == u64::from(ctx.index))
        .collect();
    let mut publishers = Vec::new();
    for &id in &ids {
        let topic = ctx.topic(id % topics);
        let url = template.url(&topic)?;
        let index = job.subscribers + id;
        let publisher = if job.publish_http {
            let headers = parse_headers(&ctx.plan.headers)?;
            Publisher::Http(Box::new(Poster::new(
                endpoint.dialer,
                index,
                url,
                &job.content_type,
                &headers,
            )))
        } else {
            match super::open(ctx, &endpoint, 0, index, &url.target, 4096).await {
                Some(conn) => {
                    // Without this the kernel buffers megabytes ahead of a server that reads
                    // slower than the publisher writes, and stamps age before it reads them.
                    socket2::SockRef::from(&conn.stream)
                        .set_send_buffer_size(job.publisher_buffer)
                        .map_err(|e| Error::io("setting the publisher's send buffer", e))?;
                    Publisher::Ws(conn)
                }
                None => continue,
            }
        };
        publishers.push((id, publisher));
    }
    super::ready(ctx, link, job.messages.is_none());

    let t0 = super::wait_start(ctx, link, job.messages.is_none()).await?;
    let end_ns = match job.messages {
        Some(_) => None,
        None => Some(t0 + (ctx.plan.warmup + ctx.plan.duration).as_nanos() as u64),
    };
    let pace = Pace {
        t0,
        end_ns,
        interval_ns: job.rate_per_publisher.map(|r| 1e9 / r),
        messages: job.messages,
        size: job.size,
    };
    let mut handles = Vec::new();
    let publishes_here = !publishers.is_empty();
    for (id, publisher) in publishers {
        let ctx = ctx.clone();
        handles.push(tokio::task::spawn_local(async move {
            let sent = match publisher {
                Publisher::Ws(conn) => ws_publisher(&ctx, conn, id, pace).await,
                Publisher::Http(poster) => http_publisher(&ctx, *poster, id, pace).await,
            };
            (id, sent)
        }));
    }
    let mut sent = vec![0u64; topics as usize];
    for h in handles {
        // A publisher task only ends by returning; a join error would be a panic in it.
        if let Ok((id, n)) = h.await {
            sent[(id % topics) as usize] += n;
        }
    }
    // A worker that only subscribes ends its CPU window when the publishers are due to stop
    // (timed runs), not at once: its work is the receiving.
    if let (false, Some(end)) = (publishes_here, end_ns) {
        tokio::time::sleep(super::until(end)).await;
    }
    ctx.shared.mark_cpu_end();
    link.send(FromWorker::Sent(sent));

    let expected = loop {
        match link.recv().await? {
            ToWorker::Expected(e) => break e,
            ToWorker::Stop => return Ok(finish(ctx, &tallies, &[])),
            _ => continue,
        }
    };
    let drained = drain(&tallies, &expected, job.drain_timeout).await;
    link.send(FromWorker::Ready);
    while !matches!(link.recv().await?, ToWorker::Stop) {}
    let mut result = finish(ctx, &tallies, &expected);
    result.drain_timed_out = !drained;
    Ok(result)
}

/// Waits until every subscriber has every message its topic's publishers sent (or has
/// ended), for at most `timeout`. Returns whether they all have.
async fn drain(tallies: &[Rc<Sub>], expected: &[u64], timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let done = tallies.iter().all(|s| {
            s.ended.get()
                || s.received.get() >= expected.get(s.topic as usize).copied().unwrap_or(0)
        });
        if done || tokio::time::Instant::now() >= deadline {
            return done;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn finish(ctx: &Ctx, tallies: &[Rc<Sub>], expected: &[u64]) -> WorkerResult {
    let (u, s) = crate::sys::self_cpu();
    let mut result = ctx.shared.result(u + s);
    let mut topics = vec![TopicTally::default(); expected.len()];
    for sub in tallies {
        let Some(t) = topics.get_mut(sub.topic as usize) else {
            continue;
        };
        let got = sub.received.get();
        let ooo = sub.out_of_order.get();
        t.received_min = if t.subscribers == 0 {
            got
        } else {
            t.received_min.min(got)
        };
        t.subscribers += 1;
        t.received_sum += got;
        t.out_of_order_sum += ooo;
        t.out_of_order_max = t.out_of_order_max.max(ooo);
    }
    result.topics = topics;
    result
}

/// Reads a subscriber's messages: latency, and loss and order per publisher.
async fn subscriber(ctx: Rc<Ctx>, conn: Conn, sub: Rc<Sub>, publishers: u64, topics: u64) {
    let Conn {
        mut stream,
        mut reader,
        mut rng,
        server,
        ..
    } = conn;
    let mut next = vec![0u64; publishers_on(sub.topic, topics, publishers) as usize];
    let shared: &Shared = &ctx.shared;
    let (mut rd, mut wr) = stream.split();
    let label = read_loop(&mut rd, &mut wr, &mut reader, &mut rng, |stamp, now| {
        let Some(stamp) = stamp else {
            shared.foreign.set(shared.foreign.get() + 1);
            return;
        };
        let id = u64::from(stamp.id);
        let slot = if id % topics == sub.topic {
            next.get_mut((id / topics) as usize)
        } else {
            None
        };
        let Some(expect) = slot else {
            shared.foreign.set(shared.foreign.get() + 1);
            return;
        };
        if stamp.seq >= *expect {
            *expect = stamp.seq.saturating_add(1);
        } else {
            sub.out_of_order.set(sub.out_of_order.get() + 1);
        }
        sub.received.set(sub.received.get() + 1);
        shared.delivered(server, stamp.sent_ns, now);
    })
    .await;
    sub.ended.set(true);
    ctx.shared.ended(label);
}

enum Publisher {
    Ws(Conn),
    Http(Box<Poster>),
}

/// When a publisher sends: from `t0`, one message every `interval_ns` (none: as fast as the
/// server takes them), until `end_ns` or `messages` sent.
#[derive(Debug, Clone, Copy)]
struct Pace {
    t0: u64,
    end_ns: Option<u64>,
    interval_ns: Option<f64>,
    messages: Option<u64>,
    size: usize,
}

impl Pace {
    /// How many messages should have been sent by `now` (capped by the count), or `None` when
    /// the run is over.
    fn due(&self, now: u64, sent: u64) -> Option<u64> {
        if self.end_ns.is_some_and(|end| now >= end) || self.messages.is_some_and(|m| sent >= m) {
            return None;
        }
        let due = match self.interval_ns {
            Some(iv) => (now.saturating_sub(self.t0) as f64 / iv) as u64 + 1,
            None => sent + BATCH,
        };
        Some(due.min(self.messages.unwrap_or(u64::MAX)))
    }

    /// When message number `seq` is due.
    fn at(&self, seq: u64) -> u64 {
        match self.interval_ns {
            Some(iv) => self.t0 + (seq as f64 * iv) as u64,
            None => self.t0,
        }
    }

    fn payload(&self, rng: &mut client::Rng) -> Vec<u8> {
        let mut p = vec![0u8; self.size];
        rng.fill(&mut p[STAMP_LEN..]);
        p
    }
}

/// Publishes frames on a WebSocket; returns how many were written. A reader task on the same
/// socket discards what the server sends back and answers its pings.
async fn ws_publisher(ctx: &Rc<Ctx>, conn: Conn, id: u64, pace: Pace) -> u64 {
    let Conn {
        stream,
        mut reader,
        mut rng,
        ..
    } = conn;
    let (mut rd, mut wr) = stream.into_split();
    let (control_tx, mut control) = mpsc::unbounded_channel::<Vec<u8>>();
    let ended = Rc::new(Cell::new(false));
    {
        let ctx = ctx.clone();
        let ended = ended.clone();
        let mut rng = rng.clone();
        tokio::task::spawn_local(async move {
            let mut w = ChannelWriter(control_tx);
            let label = read_loop(&mut rd, &mut w, &mut reader, &mut rng, |_, _| {}).await;
            ended.set(true);
            ctx.shared.ended(label);
        });
    }
    let mut payload = pace.payload(&mut rng);
    let mut out = Vec::with_capacity(BATCH as usize * (pace.size + 14));
    let mut sent = 0u64;
    loop {
        while let Ok(bytes) = control.try_recv() {
            out.extend_from_slice(&bytes);
        }
        let now = now_ns();
        let Some(due) = pace.due(now, sent) else {
            break;
        };
        let upto = due.min(sent + BATCH);
        for seq in sent..upto {
            Stamp {
                sent_ns: now,
                seq,
                id: id as u32,
            }
            .write(&mut payload);
            client::encode_frame(&mut out, OP_BINARY, &payload, rng.mask());
        }
        if !out.is_empty() {
            // A server that stops reading the publisher must not hang the run.
            let label =
                match tokio::time::timeout(ctx.plan.connect_timeout, wr.write_all(&out)).await {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(client::io_label(&e)),
                    Err(_) => Some("write timeout".to_string()),
                };
            if let Some(label) = label {
                Shared::count(&ctx.shared.publish_errors, label);
                break;
            }
            out.clear();
            ctx.shared.sent.set(ctx.shared.sent.get() + (upto - sent));
            sent = upto;
        }
        if ended.get() {
            break;
        }
        if upto >= due && pace.interval_ns.is_some() {
            tokio::select! {
                _ = tokio::time::sleep(until(pace.at(sent))) => {}
                Some(bytes) = control.recv() => out.extend_from_slice(&bytes),
            }
        }
    }
    // Keep answering pings until the worker ends; dropping the write half would close it.
    tokio::task::spawn_local(async move {
        while let Some(bytes) = control.recv().await {
            if wr.write_all(&bytes).await.is_err() {
                return;
            }
        }
    });
    sent
}

/// Publishes with one `POST` per message, each awaited before the next (which keeps the
/// order); returns how many got a 2xx answer.
async fn http_publisher(ctx: &Rc<Ctx>, mut poster: Poster, id: u64, pace: Pace) -> u64 {
    let mut rng = ctx.rng(id ^ 0x5eed);
    let mut payload = pace.payload(&mut rng);
    let timeout = ctx.plan.connect_timeout;
    let mut sent = 0u64;
    let mut seq = 0u64;
    let mut errors = 0u32;
    loop {
        let now = now_ns();
        let Some(due) = pace.due(now, seq) else {
            break;
        };
        if seq >= due {
            tokio::time::sleep(until(pace.at(seq))).await;
            continue;
        }
        Stamp {
            sent_ns: now,
            seq,
            id: id as u32,
        }
        .write(&mut payload);
        seq += 1;
        let label = match tokio::time::timeout(timeout, poster.post(&payload, false)).await {
            Ok(Ok(r)) if (200..300).contains(&r.status) => None,
            Ok(Ok(r)) => Some(format!("HTTP {}", r.status)),
            Ok(Err(e)) => Some(super::failure_label(&e)),
            Err(_) => Some("timeout".into()),
        };
        match label {
            None => {
                sent += 1;
                errors = 0;
                ctx.shared.sent.set(ctx.shared.sent.get() + 1);
            }
            Some(l) => {
                Shared::count(&ctx.shared.publish_errors, l);
                errors += 1;
                if errors >= MAX_POST_ERRORS {
                    break;
                }
            }
        }
    }
    sent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishers_are_spread_round_robin() {
        assert_eq!(publishers_on(0, 3, 7), 3);
        assert_eq!(publishers_on(1, 3, 7), 2);
        assert_eq!(publishers_on(2, 3, 7), 2);
        assert_eq!(publishers_on(0, 4, 1), 1);
        assert_eq!(publishers_on(3, 4, 1), 0);
    }

    #[test]
    fn pacing_sends_what_is_due_and_stops() {
        let p = Pace {
            t0: 1_000,
            end_ns: Some(1_000 + 1_000_000),
            interval_ns: Some(100_000.0),
            messages: None,
            size: 20,
        };
        assert_eq!(p.due(1_000, 0), Some(1));
        assert_eq!(p.due(1_000 + 250_000, 1), Some(3));
        assert_eq!(p.at(3), 1_000 + 300_000);
        assert_eq!(p.due(1_000 + 1_000_000, 10), None);
        let counted = Pace {
            messages: Some(5),
            end_ns: None,
            interval_ns: None,
            ..p
        };
        assert_eq!(counted.due(0, 0), Some(5));
        assert_eq!(counted.due(0, 5), None);
    }
}
