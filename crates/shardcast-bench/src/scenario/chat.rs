//! `chat` inside one worker: its share of the room's clients. On each `Round(n)` every client
//! sends one message stamped with `n`; the worker reports `RoundDone(n)` once each of its
//! clients has received the round's messages from every client. The parent's barrier across
//! workers lives in `worker.rs`.

use std::cell::Cell;
use std::rc::Rc;

use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, mpsc, watch};

use super::{ChannelWriter, Conn, Ctx, Link, read_loop};
use crate::Error;
use crate::client::{self, OP_BINARY};
use crate::payload::{STAMP_LEN, Stamp, now_ns};
use crate::worker::{ChatJob, FromWorker, ToWorker, WorkerResult};

/// A client's progress through the rounds.
struct Client {
    /// The last round this client has received in full.
    done: Cell<u64>,
}

/// What every client task of the worker shares.
struct Room {
    per_round: u64,
    clients: Vec<Rc<Client>>,
    notify: Notify,
    errors: Cell<u64>,
}

pub async fn run(ctx: &Rc<Ctx>, job: &ChatJob, link: &mut Link) -> Result<WorkerResult, Error> {
    let conns: Vec<_> = ctx
        .share(job.clients)
        .map(|i| ctx.dial(i, 1))
        .collect::<Result<_, Error>>()?;
    let (round_tx, round_rx) = watch::channel(0u64);
    let mut room = Room {
        per_round: if job.echo {
            job.clients
        } else {
            job.clients - 1
        },
        clients: Vec::new(),
        notify: Notify::new(),
        errors: Cell::new(0),
    };
    let mut opened = Vec::new();
    super::open_all(ctx, conns, 16 * 1024, |conn| opened.push(conn)).await;
    for _ in &opened {
        room.clients.push(Rc::new(Client { done: Cell::new(0) }));
    }
    let room = Rc::new(room);
    for (i, conn) in opened.into_iter().enumerate() {
        tokio::task::spawn_local(client(
            ctx.clone(),
            room.clone(),
            i,
            conn,
            round_rx.clone(),
            job.size,
        ));
    }
    super::ready(ctx, link, job.rounds.is_none());
    super::wait_start(ctx, link, job.rounds.is_none()).await?;
    // The round sent and not yet reported done. A client that ended never completes one; the
    // parent's round timeout then ends the run with `Stop`.
    let mut pending: Option<u64> = None;
    loop {
        if let Some(n) = pending
            && room.clients.iter().all(|c| c.done.get() >= n)
        {
            link.send(FromWorker::RoundDone(n));
            pending = None;
        }
        tokio::select! {
            msg = link.recv() => match msg? {
                ToWorker::Round(n) => {
                    let _ = round_tx.send(n);
                    pending = Some(n);
                }
                ToWorker::Stop => break,
                _ => {}
            },
            _ = room.notify.notified(), if pending.is_some() => {}
        }
    }
    ctx.shared.mark_cpu_end();
    let (u, s) = crate::sys::self_cpu();
    let mut result = ctx.shared.result(u + s);
    result.chat_errors = room.errors.get();
    Ok(result)
}

/// One client: sends its message when a round starts, counts the round's messages as they
/// arrive. Counting is by the round in each stamp: a client may receive round `n + 1` from
/// faster clients before it has been told to send its own.
async fn client(
    ctx: Rc<Ctx>,
    room: Rc<Room>,
    slot: usize,
    conn: Conn,
    mut rounds: watch::Receiver<u64>,
    size: usize,
) {
    let Some(me) = room.clients.get(slot).cloned() else {
        return;
    };
    let Conn {
        stream,
        mut reader,
        mut rng,
        index,
        server,
    } = conn;
    let (mut rd, mut wr) = stream.into_split();
    let (control_tx, mut control) = mpsc::unbounded_channel::<Vec<u8>>();
    // The sender: one message per round, and the answers to pings, in order.
    let mut send_rng = rng.clone();
    let sender = tokio::task::spawn_local(async move {
        let mut payload = vec![0u8; size];
        send_rng.fill(&mut payload[STAMP_LEN..]);
        let mut out = Vec::with_capacity(size + 14);
        loop {
            out.clear();
            tokio::select! {
                changed = rounds.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let n = *rounds.borrow_and_update();
                    Stamp { sent_ns: now_ns(), seq: n, id: index as u32 }.write(&mut payload);
                    client::encode_frame(&mut out, OP_BINARY, &payload, send_rng.mask());
                }
                bytes = control.recv() => match bytes {
                    Some(b) => out.extend_from_slice(&b),
                    None => return,
                },
            }
            if wr.write_all(&out).await.is_err() {
                return;
            }
        }
    });
    let shared = &ctx.shared;
    let mut count = 0u64; // of round done + 1
    let mut early = 0u64; // of round done + 2
    let mut w = ChannelWriter(control_tx);
    let label = read_loop(&mut rd, &mut w, &mut reader, &mut rng, |stamp, now| {
        let Some(stamp) = stamp else {
            room.errors.set(room.errors.get() + 1);
            return;
        };
        shared.delivered(server, stamp.sent_ns, now);
        let done = me.done.get();
        if stamp.seq == done + 1 {
            count += 1;
            if count == room.per_round {
                me.done.set(done + 1);
                count = early;
                early = 0;
                room.notify.notify_one();
            }
        } else if stamp.seq == done + 2 {
            early += 1;
        } else {
            room.errors.set(room.errors.get() + 1);
        }
    })
    .await;
    sender.abort();
    ctx.shared.ended(label);
}
