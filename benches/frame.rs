//! Frame codec micro-benchmarks: server frame encoding, and parsing masked client frames with
//! our buffer-free `FrameReader` versus fastwebsockets' own reader.
//!
//! Run with `cargo bench --bench frame`.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use fastwebsockets::{OpCode, Role, WebSocket};
use shardcast::Opcode;
use shardcast::reader::{Event, FrameReader};

/// Frames in one parsed stream; one iteration of a "read" benchmark parses all of them.
const FRAMES: usize = 1000;
/// The server reads its socket into a 64 KiB scratch buffer and feeds what it got.
const CHUNK: usize = 64 * 1024;
const OP_BINARY: u8 = 0x2;

/// `FRAMES` binary client frames of `size` bytes each, back to back.
fn wire(size: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..size).map(|i| (i * 7 % 256) as u8).collect();
    let frame = shardcast::frame::client_frame(true, OP_BINARY, &payload);
    frame.repeat(FRAMES)
}

/// Parses `wire` with `FrameReader` in `CHUNK`-sized feeds, as `conn.rs` does, and returns
/// the number of messages. `events` is reused across calls, like the connection's own Vec.
fn read_shardcast(wire: &[u8], events: &mut Vec<Event>) -> usize {
    let mut reader = FrameReader::new(1 << 20);
    let mut messages = 0;
    for chunk in wire.chunks(CHUNK) {
        reader.feed(chunk, events).expect("valid client frames");
        for event in events.drain(..) {
            if let Event::Message { payload, .. } = event {
                black_box(&payload);
                messages += 1;
            }
        }
    }
    messages
}

/// Parses `wire` with fastwebsockets as a server over an in-memory stream (reads come from the
/// slice, writes go nowhere) and returns the number of messages.
async fn read_fastwebsockets(wire: &[u8]) -> usize {
    let stream = tokio::io::join(wire, tokio::io::sink());
    let mut ws = WebSocket::after_handshake(stream, Role::Server);
    ws.set_max_message_size(1 << 20);
    let mut messages = 0;
    for _ in 0..FRAMES {
        let frame = ws.read_frame().await.expect("valid client frames");
        if frame.opcode == OpCode::Binary {
            black_box(&frame.payload);
            messages += 1;
        }
    }
    messages
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    for size in [16usize, 1024, 65536] {
        let payload = vec![0xA5u8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &payload, |b, p| {
            b.iter(|| shardcast::frame::encode(Opcode::Binary, black_box(p)))
        });
    }
    group.finish();
}

fn read(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("tokio runtime");
    let mut group = c.benchmark_group("read");
    group.throughput(Throughput::Elements(FRAMES as u64));
    for size in [16usize, 1024] {
        let wire = wire(size);
        let mut events = Vec::new();
        // Both parsers must see every message, checked once outside the timed loops.
        let ours = read_shardcast(&wire, &mut events);
        let theirs = rt.block_on(read_fastwebsockets(&wire));
        assert_eq!(
            (ours, theirs),
            (FRAMES, FRAMES),
            "message counts, size {size}"
        );

        group.bench_with_input(BenchmarkId::new("FrameReader", size), &wire, |b, w| {
            b.iter(|| read_shardcast(w, &mut events))
        });
        group.bench_with_input(BenchmarkId::new("fastwebsockets", size), &wire, |b, w| {
            b.iter(|| rt.block_on(read_fastwebsockets(w)))
        });
    }
    group.finish();
}

criterion_group!(benches, encode, read);
criterion_main!(benches);
