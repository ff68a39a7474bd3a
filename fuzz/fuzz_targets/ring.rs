//! Drives the engine's topic ring and client outboxes (`shardcast_core::internals::RingModel`)
//! with arbitrary joins, leaves, publishes (some excluding one client), control frames,
//! partial writes of any size, trims and closes. The model panics unless every client reads
//! exactly the frames published since it joined and not excluded for it, in order and byte
//! for byte, its control frames whole between them, and a closed client a prefix of them
//! followed by its close frame. At the end every client writes everything it has left.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use shardcast_core::internals::{RingModel, RingOp};

#[derive(Arbitrary, Debug)]
enum Op {
    Join,
    Leave(u8),
    /// Payload length (at least 4 bytes, for the sequence number) and the client to exclude.
    Publish(u16, Option<u8>),
    Control(u8),
    /// Client, bytes the kernel takes.
    Write(u8, u16),
    Trim,
    Close(u8, bool),
}

fuzz_target!(|ops: Vec<Op>| {
    let mut model = RingModel::default();
    for op in ops.into_iter().take(512) {
        model.apply(match op {
            Op::Join => RingOp::Join,
            Op::Leave(c) => RingOp::Leave(c.into()),
            Op::Publish(n, skip) => RingOp::Publish(usize::from(n).max(1), skip.map(usize::from)),
            Op::Control(c) => RingOp::Control(c.into()),
            Op::Write(c, n) => RingOp::Write(c.into(), n.into()),
            Op::Trim => RingOp::Trim,
            Op::Close(c, all) => RingOp::Close(c.into(), all),
        });
    }
    model.finish();
});
