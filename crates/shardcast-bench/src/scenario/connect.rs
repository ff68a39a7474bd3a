//! `connect` inside one worker: `concurrency` loops that each open a connection, time its
//! handshake, and drop it, until the worker's share of `--connections` or the deadline.
//! Handshake rates and percentiles are merged in `report.rs`.

use std::cell::Cell;
use std::rc::Rc;

use super::{Ctx, Link};
use crate::Error;
use crate::payload::now_ns;
use crate::worker::{ConnectJob, FromWorker, ToWorker, WorkerResult};

pub async fn run(ctx: &Rc<Ctx>, job: &ConnectJob, link: &mut Link) -> Result<WorkerResult, Error> {
    super::ready(ctx, link, job.connections.is_none());
    let t0 = super::wait_start(ctx, link, job.connections.is_none()).await?;
    let end_ns = match job.connections {
        Some(_) => u64::MAX,
        None => t0 + (ctx.plan.warmup + ctx.plan.duration).as_nanos() as u64,
    };
    let quota = job.connections.map_or(u64::MAX, |n| {
        let r = ctx.share(n);
        r.end - r.start
    });
    let started = Rc::new(Cell::new(0u64));
    let workers = u64::from(ctx.plan.workers);
    let mut loops = Vec::new();
    for _ in 0..job.concurrency {
        let (ctx, started) = (ctx.clone(), started.clone());
        loops.push(tokio::task::spawn_local(async move {
            loop {
                let k = started.get();
                if k >= quota || now_ns() >= end_ns {
                    return;
                }
                started.set(k + 1);
                // Distinct across workers, so source addresses rotate over the whole run.
                let index = k * workers + u64::from(ctx.index);
                let Ok(dial) = ctx.dial(index, 1) else {
                    return;
                };
                let ep = &ctx.servers[dial.server].endpoint;
                let begin = now_ns();
                if let Some(conn) =
                    super::open(&ctx, ep, dial.server, index, &dial.target, 256).await
                {
                    let end = now_ns();
                    ctx.shared.handshakes.set(ctx.shared.handshakes.get() + 1);
                    ctx.shared.opened_on(dial.server);
                    ctx.shared.measure(dial.server, begin, end);
                    ctx.shared.open.set(ctx.shared.open.get().saturating_sub(1));
                    drop(conn);
                }
            }
        }));
    }
    for l in loops {
        let _ = l.await;
    }
    ctx.shared.mark_cpu_end();
    link.send(FromWorker::Ready);
    while !matches!(link.recv().await?, ToWorker::Stop) {}
    let (u, s) = crate::sys::self_cpu();
    Ok(ctx.shared.result(u + s))
}
