//! Metrics: the plain histogram shards keep, and the Prometheus rendering of a [`Stats`]
//! snapshot for `GET /metrics`.
//!
//! Nothing here is touched on the delivery path. Shards count in plain fields and the relay
//! in a few relaxed atomics per publish or per connection; a scrape asks every shard for a
//! copy (`Relay::stats`) and renders it with `prometheus-client`.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use shardcast_core::Histogram;

use crate::process::Process;
use crate::reject::RejectReason;
use crate::{DisconnectReason, Stats};

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Renders `stats` in the OpenMetrics text format: the node's series prefixed `shardcast_`,
/// and the usual `process_*` series (descriptors, resident memory) under their own names.
pub fn render(mut stats: Stats) -> String {
    let mut registry = Registry::default();
    if let Some(p) = stats.process.take() {
        registry.register_collector(Box::new(p));
    }
    registry
        .sub_registry_with_prefix("shardcast")
        .register_collector(Box::new(Snapshot(stats)));
    let mut out = String::new();
    // Writing into a String cannot fail, and every metric below encodes infallibly.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

#[derive(Debug)]
struct Snapshot(Stats);

impl Collector for Process {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        gauge(
            &mut enc,
            "process_open_fds",
            "Open file descriptors",
            self.open_fds as i64,
        )?;
        gauge(
            &mut enc,
            "process_max_fds",
            "The soft limit on open file descriptors",
            self.max_fds as i64,
        )?;
        let m = ConstGauge::new(self.resident_bytes as i64);
        m.encode(enc.encode_descriptor(
            "process_resident_memory",
            "Resident memory",
            Some(&Unit::Bytes),
            m.metric_type(),
        )?)
    }
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: u64,
) -> std::fmt::Result {
    let m = ConstCounter::new(v);
    m.encode(enc.encode_descriptor(name, help, unit, m.metric_type())?)
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let m = ConstGauge::new(v);
    m.encode(enc.encode_descriptor(name, help, None, m.metric_type())?)
}

fn histogram(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: &Unit,
    h: &Histogram,
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, Some(unit), MetricType::Histogram)?;
    m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
        h.sum(),
        h.count(),
        &h.buckets(),
        None,
    )
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.0;
        gauge(
            &mut enc,
            "ready",
            "1 while /readyz answers 200; 0 once the drain has started",
            i64::from(s.ready),
        )?;
        gauge(
            &mut enc,
            "max_connections",
            "The --max-connections limit",
            s.max_connections as i64,
        )?;
        if let Some(tasks) = s.tokio_tasks {
            gauge(
                &mut enc,
                "tokio_tasks",
                "Tasks alive on the tokio runtime (connection readers, shards, HTTP connections)",
                tasks as i64,
            )?;
        }
        {
            let mut m = enc.encode_descriptor(
                "build_info",
                "The running version, as a label",
                None,
                MetricType::Gauge,
            )?;
            let labels = [("version", env!("CARGO_PKG_VERSION"))];
            ConstGauge::new(1).encode(m.encode_family(&labels)?)?;
        }
        {
            let mut m = enc.encode_descriptor(
                "connections",
                "WebSocket clients held by each shard, including those closing",
                None,
                MetricType::Gauge,
            )?;
            for (shard, n) in s.shard_connections.iter().enumerate() {
                let labels = [("shard", shard.to_string())];
                ConstGauge::new(*n as i64).encode(m.encode_family(&labels)?)?;
            }
        }
        counter(
            &mut enc,
            "connections_opened",
            "WebSocket connections accepted",
            None,
            s.connections_opened,
        )?;
        {
            let mut m = enc.encode_descriptor(
                "disconnects",
                "WebSocket clients disconnected, by reason",
                None,
                MetricType::Counter,
            )?;
            for why in DisconnectReason::ALL {
                let labels = [("reason", why.as_str())];
                ConstCounter::new(s.disconnects.get(why)).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "handshake_rejections",
                "Requests refused before or instead of an upgrade, by reason",
                None,
                MetricType::Counter,
            )?;
            for why in RejectReason::ALL {
                let labels = [("reason", why.as_str())];
                ConstCounter::new(s.rejections.get(why)).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "messages_published",
                "Messages accepted by the publish function, by source",
                None,
                MetricType::Counter,
            )?;
            for (source, n) in [
                ("ws", s.published_ws),
                ("http", s.published_http),
                ("api", s.published_api),
                ("bus", s.published_bus),
            ] {
                let labels = [("source", source)];
                ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
            }
        }
        counter(
            &mut enc,
            "deliveries",
            "Frames delivered: each frame appended to a ring, once per subscriber of the ring",
            None,
            s.deliveries,
        )?;
        counter(
            &mut enc,
            "bytes_sent",
            "Bytes written to client sockets",
            None,
            s.bytes_sent,
        )?;
        gauge(
            &mut enc,
            "topics",
            "Topics with at least one subscriber",
            s.topics as i64,
        )?;
        histogram(
            &mut enc,
            "send_queue",
            "Bytes queued per client, sampled at scrape time",
            &Unit::Bytes,
            &s.send_queue,
        )?;
        histogram(
            &mut enc,
            "publish_fanout",
            "Time from a publish to the end of its enqueue on each interested shard",
            &Unit::Seconds,
            &s.publish_fanout,
        )?;
        if let Some(bus) = &s.bus {
            encode_bus(&mut enc, bus)?;
        }
        if let Some(jwks) = &s.jwks {
            encode_jwks(&mut enc, jwks)?;
        }
        Ok(())
    }
}

/// The `shardcast_jwks_*` series, present only with `--jwt-jwks-url`.
fn encode_jwks(enc: &mut DescriptorEncoder, j: &crate::JwksStats) -> std::fmt::Result {
    {
        let mut m = enc.encode_descriptor(
            "jwks_fetches",
            "Fetches of the JWKS, by result (error: the last good keys stayed in force)",
            None,
            MetricType::Counter,
        )?;
        for (result, n) in [("ok", j.fetched), ("error", j.failed)] {
            ConstCounter::new(n).encode(m.encode_family(&[("result", result)])?)?;
        }
    }
    gauge(
        enc,
        "jwks_keys",
        "Signing keys of the JWKS in force",
        j.keys as i64,
    )
}

/// The `shardcast_bus_*` series, present only on a node started with `--bus`.
fn encode_bus(enc: &mut DescriptorEncoder, b: &crate::BusStats) -> std::fmt::Result {
    gauge(
        enc,
        "bus_connected",
        "1 while a bus session is up (subscribed and probing), else 0",
        i64::from(b.connected),
    )?;
    gauge(
        enc,
        "bus_subscriptions",
        "Broker channels this node is subscribed to, one per topic with a local subscriber",
        b.subscriptions as i64,
    )?;
    for (name, help, v) in [
        (
            "bus_reconnects",
            "Bus sessions established after a previous one was lost",
            b.reconnects,
        ),
        (
            "bus_published",
            "Messages the broker accepted from this node",
            b.published,
        ),
        (
            "bus_received",
            "Messages from other nodes received and delivered locally",
            b.received,
        ),
        (
            "bus_dropped_own",
            "This node's own messages that came back from the broker, dropped",
            b.dropped_own,
        ),
        (
            "bus_dropped_disconnected",
            "Messages delivered locally only because no bus session was up",
            b.dropped_disconnected,
        ),
        (
            "bus_dropped_full",
            "Messages delivered locally only because the bus queue was full (broker slow or stalled)",
            b.dropped_full,
        ),
        (
            "bus_rejected",
            "Messages from the broker that were unreadable, for no known topic, or lost by a lagging reader",
            b.rejected,
        ),
        (
            "bus_stall_detected",
            "Stall probes that did not come back in time; each restarted the session",
            b.stall_detected,
        ),
    ] {
        counter(enc, name, help, None, v)?;
    }
    histogram(
        enc,
        "bus_round_trip",
        "Round trip of the stall probe through the broker",
        &Unit::Seconds,
        &b.round_trip,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every series the operations issue lists has its `# TYPE` line, and each of the seven
    /// disconnect reasons its own sample, carrying that reason's count.
    #[test]
    fn every_listed_series_has_its_type_and_every_disconnect_reason_its_sample() {
        let mut stats = Stats {
            ready: true,
            max_connections: 500,
            tokio_tasks: Some(42),
            process: Some(Process {
                open_fds: 12,
                max_fds: 1024,
                resident_bytes: 4096,
            }),
            ..Stats::default()
        };
        stats.engine.shard_connections = vec![3, 4];
        let reasons = [
            "client_close",
            "slow_consumer",
            "pong_timeout",
            "protocol_error",
            "write_timeout",
            "shutdown",
            "rate_limited",
            "token_expired",
        ];
        assert_eq!(DisconnectReason::ALL.len(), reasons.len());
        // A distinct count per reason (1 to 8), so a label on the wrong value shows.
        for (i, why) in DisconnectReason::ALL.into_iter().enumerate() {
            for _ in 0..=i {
                stats.engine.disconnects.record(why);
            }
        }
        let text = render(stats);
        for reason in reasons {
            let n = DisconnectReason::ALL
                .iter()
                .position(|w| w.as_str() == reason)
                .unwrap_or_else(|| panic!("no disconnect reason {reason}"))
                + 1;
            let sample = format!("shardcast_disconnects_total{{reason=\"{reason}\"}} {n}\n");
            assert!(text.contains(&sample), "{sample} missing from:\n{text}");
        }
        for ty in [
            "# TYPE shardcast_connections gauge",
            "# TYPE shardcast_connections_opened counter",
            "# TYPE shardcast_disconnects counter",
            "# TYPE shardcast_handshake_rejections counter",
            "# TYPE shardcast_messages_published counter",
            "# TYPE shardcast_deliveries counter",
            "# TYPE shardcast_bytes_sent counter",
            "# TYPE shardcast_topics gauge",
            "# TYPE shardcast_send_queue_bytes histogram",
            "# TYPE shardcast_publish_fanout_seconds histogram",
        ] {
            assert!(text.lines().any(|l| l == ty), "{ty} missing from:\n{text}");
        }
        // `connections` is per shard.
        for sample in [
            "shardcast_connections{shard=\"0\"} 3",
            "shardcast_connections{shard=\"1\"} 4",
            "shardcast_ready 1\n",
            "shardcast_max_connections 500\n",
            "shardcast_tokio_tasks 42\n",
            "shardcast_build_info{version=\"",
            "\nprocess_open_fds 12\n",
            "\nprocess_max_fds 1024\n",
            "\nprocess_resident_memory_bytes 4096\n",
        ] {
            assert!(text.contains(sample), "{sample} missing from:\n{text}");
        }
    }

    #[test]
    fn rendering_names_every_series() {
        let text = render(Stats::default());
        for name in [
            "shardcast_connections",
            "shardcast_connections_opened_total",
            "shardcast_disconnects_total{reason=\"slow_consumer\"}",
            "shardcast_disconnects_total{reason=\"rate_limited\"}",
            "shardcast_handshake_rejections_total{reason=\"unauthorized\"}",
            "shardcast_messages_published_total{source=\"ws\"}",
            "shardcast_messages_published_total{source=\"http\"}",
            "shardcast_deliveries_total",
            "shardcast_bytes_sent_total",
            "shardcast_topics",
            "shardcast_send_queue_bytes_bucket",
            "shardcast_publish_fanout_seconds_bucket",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        assert!(
            !text.contains("shardcast_bus_"),
            "standalone: no bus series"
        );
        let text = render(Stats {
            bus: Some(crate::BusStats::default()),
            ..Stats::default()
        });
        for name in [
            "shardcast_messages_published_total{source=\"bus\"}",
            "shardcast_bus_connected 0",
            "shardcast_bus_subscriptions 0",
            "shardcast_bus_reconnects_total",
            "shardcast_bus_published_total",
            "shardcast_bus_received_total",
            "shardcast_bus_dropped_own_total",
            "shardcast_bus_dropped_disconnected_total",
            "shardcast_bus_dropped_full_total",
            "shardcast_bus_rejected_total",
            "shardcast_bus_stall_detected_total",
            "shardcast_bus_round_trip_seconds_bucket",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
