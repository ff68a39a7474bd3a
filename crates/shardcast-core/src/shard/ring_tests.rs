//! Property tests of the topic ring and the outbox against the model in `ring_model.rs`:
//! random joins, leaves, publishes (some skipping one client), control frames, partial
//! writes of random sizes, trims and closes.

use proptest::prelude::*;

use super::ring_model::{RingModel, RingOp};

fn op() -> impl Strategy<Value = RingOp> {
    prop_oneof![
        2 => Just(RingOp::Join),
        1 => (0..8usize).prop_map(RingOp::Leave),
        6 => (1..300usize, prop::option::weighted(0.2, 0..8usize))
            .prop_map(|(n, s)| RingOp::Publish(n, s)),
        2 => (0..8usize).prop_map(RingOp::Control),
        6 => (0..8usize, 0..2000usize).prop_map(|(c, n)| RingOp::Write(c, n)),
        1 => Just(RingOp::Trim),
        1 => (0..8usize, any::<bool>()).prop_map(|(c, all)| RingOp::Close(c, all)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_client_reads_exactly_its_frames_in_order(ops in prop::collection::vec(op(), 1..200)) {
        let mut world = RingModel::default();
        for op in ops {
            world.apply(op);
        }
        world.finish();
    }
}
