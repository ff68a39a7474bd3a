//! Time in a shard: the tick clock, the timer entries of its wheel (ping, pong deadline, write
//! check, close deadline, expiry) and what each does when it fires (`on_tick`), and the end of the
//! shard's life: the paced drain (`drain_step`) and the immediate shutdown.
//!
//! What does not live here: the wheel itself (`crate::wheel`), how a close proceeds once
//! started (`lifecycle.rs`), and the interval that calls `on_tick` (`mod.rs`, `Shard::run`).

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::Shard;
use super::lifecycle::{CLOSE_GRACE, closing_reason};
use crate::DisconnectReason;
use crate::frame::{self, close_code};

#[derive(Debug, Clone, Copy)]
pub(super) enum TimerKind {
    /// Send a heartbeat ping.
    Ping,
    /// The pong deadline of the last ping.
    PongDeadline,
    /// Check whether a blocked write has made progress.
    WriteCheck,
    /// A close has had its time; free the client.
    CloseDeadline,
    /// The expiry the client was reserved with (its token's) has come: close it with 4010.
    Expiry,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Timer {
    pub(super) key: usize,
    pub(super) id: u64,
    pub(super) kind: TimerKind,
}

/// A drain in progress: the clients still to close and the pace to close them at.
pub(super) struct Drain {
    /// Clients open when the drain began, still to be closed (some may have left since).
    pending: Vec<(usize, u64)>,
    total: usize,
    start: Instant,
    until: Instant,
    deadline: Instant,
}

impl Shard {
    pub(super) fn now_tick(&self) -> u64 {
        (self.start.elapsed().as_nanos() / self.tick.as_nanos().max(1)) as u64
    }

    pub(super) fn ticks(&self, d: Duration) -> u64 {
        let n = d.as_nanos().div_ceil(self.tick.as_nanos().max(1));
        // Only an expiry centuries away gets near this: it then never fires.
        u64::try_from(n).unwrap_or(u64::MAX)
    }

    /// The first tick at or after `at`.
    pub(super) fn tick_of(&self, at: Instant) -> u64 {
        self.ticks(at.saturating_duration_since(self.start))
    }

    pub(super) fn on_tick(&mut self) {
        let now = self.now_tick();
        let mut fired = std::mem::take(&mut self.fired);
        self.wheel.advance(now, &mut fired);
        let c = &self.config;
        let (ping_every, pong_within, write_timeout) = (
            self.ticks(c.ping_interval),
            self.ticks(c.pong_timeout),
            self.ticks(c.write_timeout),
        );
        for Timer { key, id, kind } in fired.drain(..) {
            let Some(c) = self.client_mut(key, id) else {
                continue;
            };
            let open = c.is_open();
            match kind {
                TimerKind::Ping if open => {
                    c.conn.alive.store(false, Ordering::Relaxed);
                    self.wheel.schedule(
                        now + pong_within,
                        Timer {
                            key,
                            id,
                            kind: TimerKind::PongDeadline,
                        },
                    );
                    self.enqueue_control(key, frame::ping());
                }
                TimerKind::PongDeadline if open => {
                    if c.conn.alive.load(Ordering::Relaxed) {
                        let next = (now + ping_every).saturating_sub(pong_within);
                        self.wheel.schedule(
                            next,
                            Timer {
                                key,
                                id,
                                kind: TimerKind::Ping,
                            },
                        );
                    } else {
                        tracing::debug!(shard = self.index, key, "pong timeout");
                        self.begin_close(
                            key,
                            close_code::PONG_TIMEOUT,
                            "pong timeout",
                            DisconnectReason::PongTimeout,
                            CLOSE_GRACE,
                        );
                    }
                }
                TimerKind::WriteCheck => match c.stalled_since {
                    Some(since) if now >= since + write_timeout => {
                        let why = if open {
                            DisconnectReason::WriteTimeout
                        } else {
                            closing_reason(c)
                        };
                        tracing::debug!(shard = self.index, key, "write timeout");
                        self.finalize(key, why);
                    }
                    Some(since) => self
                        .wheel
                        .schedule(since + write_timeout, Timer { key, id, kind }),
                    None => c.write_check_pending = false,
                },
                TimerKind::CloseDeadline => {
                    let why = closing_reason(c);
                    self.finalize(key, why);
                }
                TimerKind::Expiry if open => {
                    tracing::debug!(shard = self.index, key, "token expired");
                    self.begin_close(
                        key,
                        close_code::TOKEN_EXPIRED,
                        "token expired",
                        DisconnectReason::TokenExpired,
                        CLOSE_GRACE,
                    );
                }
                _ => {}
            }
        }
        self.fired = fired;
        self.drain_step();
        self.end_batch();
    }

    /// Starts a drain (`ShardMsg::Drain`): no new clients, and the ones open now closed
    /// evenly until `until`, each with until `deadline` to finish.
    pub(super) fn drain(&mut self, until: Instant, deadline: Instant) {
        self.draining = true;
        let pending: Vec<(usize, u64)> = self
            .clients
            .iter()
            .filter(|(_, c)| c.is_open())
            .map(|(k, c)| (k, c.id))
            .collect();
        self.drain = Some(Drain {
            total: pending.len(),
            pending,
            start: Instant::now(),
            until,
            deadline,
        });
        self.drain_step();
    }

    /// Closes the share of the drain that is due by now: by time `t`, the fraction
    /// `(t - start) / (until - start)` of the clients. Called on the message and every tick.
    pub(super) fn drain_step(&mut self) {
        let Some(d) = &mut self.drain else {
            return;
        };
        let now = Instant::now();
        let due = if now >= d.until {
            d.total
        } else {
            let done = (now - d.start).as_secs_f64() / (d.until - d.start).as_secs_f64();
            (d.total as f64 * done).ceil() as usize
        };
        let closed = d.total - d.pending.len();
        let take = due.saturating_sub(closed).min(d.pending.len());
        let batch = d.pending.split_off(d.pending.len() - take);
        let grace = d.deadline.saturating_duration_since(now);
        if d.pending.is_empty() {
            self.drain = None;
        }
        for (key, id) in batch {
            if self.client_mut(key, id).is_some() {
                self.going_away(key, grace);
            }
        }
    }

    /// Closes a client for the shutdown (1001), keeping its backlog ahead of the close frame.
    fn going_away(&mut self, key: usize, grace: Duration) {
        self.begin_close(
            key,
            close_code::GOING_AWAY,
            "going away",
            DisconnectReason::Shutdown,
            grace,
        );
    }

    /// Closes every open client with 1001 at once, each with the short close grace. Also
    /// ends a drain in progress.
    pub(super) fn shutdown(&mut self) {
        self.draining = true;
        self.drain = None;
        let keys: Vec<usize> = self.clients.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.going_away(key, CLOSE_GRACE);
        }
        self.end_batch();
    }
}
