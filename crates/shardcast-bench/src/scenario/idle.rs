//! `idle` inside one worker: open its share of connections (connection `i` on topic `i % T`)
//! and hold them, answering pings, until `Stop`. The server's memory is read by the parent
//! (`worker.rs`), not here.

use std::rc::Rc;

use super::{Conn, Ctx, Link, read_loop};
use crate::Error;
use crate::worker::{Job, ToWorker, WorkerResult};

/// An idle connection's read buffer: pings and the odd message.
const IDLE_READ_BUF: usize = 512;

pub async fn run(ctx: &Rc<Ctx>, link: &mut Link) -> Result<WorkerResult, Error> {
    let Job::Idle(job) = &ctx.plan.job else {
        return Err(Error::BadArgs("idle run without an idle plan".into()));
    };
    let conns: Vec<_> = ctx
        .share(job.connections)
        .map(|i| ctx.dial(i, job.topics))
        .collect::<Result<_, Error>>()?;
    super::open_all(ctx, conns, IDLE_READ_BUF, |conn| {
        tokio::task::spawn_local(hold(ctx.clone(), conn));
    })
    .await;
    super::ready(ctx, link, false);
    super::wait_start(ctx, link, false).await?;
    while !matches!(link.recv().await?, ToWorker::Stop) {}
    ctx.shared.mark_cpu_end();
    let (u, s) = crate::sys::self_cpu();
    Ok(ctx.shared.result(u + s))
}

/// Holds one connection open: counts what arrives, answers pings, notes how it ends.
async fn hold(ctx: Rc<Ctx>, conn: Conn) {
    let Conn {
        mut stream,
        mut reader,
        mut rng,
        ..
    } = conn;
    let (mut rd, mut wr) = stream.split();
    let shared = &ctx.shared;
    let label = read_loop(&mut rd, &mut wr, &mut reader, &mut rng, |_, _| {
        shared.deliveries.set(shared.deliveries.get() + 1);
    })
    .await;
    ctx.shared.ended(label);
}
