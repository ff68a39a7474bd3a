//! Why requests are refused, and the counters of it. A leaf: the handshake checks, the
//! HTTP handlers, the relay and the metrics rendering all use it, and it uses none of them.

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a request was refused: the label of its counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    NotFound,
    MethodNotAllowed,
    BadTopic,
    NotWebSocket,
    BadVersion,
    BadKey,
    Unauthorized,
    Forbidden,
    Origin,
    TooLarge,
    BadBody,
    ConnectionLimit,
    PerIpLimit,
    ShuttingDown,
    HeadersTooLarge,
    HandshakeTimeout,
    TlsHandshake,
    /// A request head hyper could not parse (bad request line, header bytes or version);
    /// hyper answers 400 itself, or nothing to an HTTP/2 preface.
    BadRequest,
}

impl RejectReason {
    pub const ALL: [RejectReason; 18] = [
        Self::NotFound,
        Self::MethodNotAllowed,
        Self::BadTopic,
        Self::NotWebSocket,
        Self::BadVersion,
        Self::BadKey,
        Self::Unauthorized,
        Self::Forbidden,
        Self::Origin,
        Self::TooLarge,
        Self::BadBody,
        Self::ConnectionLimit,
        Self::PerIpLimit,
        Self::ShuttingDown,
        Self::HeadersTooLarge,
        Self::HandshakeTimeout,
        Self::TlsHandshake,
        Self::BadRequest,
    ];

    /// The label used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::BadTopic => "bad_topic",
            Self::NotWebSocket => "not_websocket",
            Self::BadVersion => "bad_version",
            Self::BadKey => "bad_key",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::Origin => "origin",
            Self::TooLarge => "too_large",
            Self::BadBody => "bad_body",
            Self::ConnectionLimit => "connection_limit",
            Self::PerIpLimit => "per_ip_limit",
            Self::ShuttingDown => "shutting_down",
            Self::HeadersTooLarge => "headers_too_large",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::TlsHandshake => "tls_handshake",
            Self::BadRequest => "bad_request",
        }
    }
}

/// Refused requests by reason, counted with relaxed atomics: refusals are rare next to
/// deliveries and come from every connection task, so there is no shard to own them.
#[derive(Debug, Default)]
pub(crate) struct Rejections([AtomicU64; RejectReason::ALL.len()]);

impl Rejections {
    pub(crate) fn record(&self, why: RejectReason) {
        self.0[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> RejectionCounts {
        RejectionCounts(self.0.each_ref().map(|a| a.load(Ordering::Relaxed)))
    }
}

/// A copy of the refusal counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RejectionCounts([u64; RejectReason::ALL.len()]);

impl RejectionCounts {
    pub fn get(&self, why: RejectReason) -> u64 {
        self.0[why as usize]
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_slot_and_label() {
        // The counters index by discriminant, so `ALL` must list the variants in order.
        for (i, why) in RejectReason::ALL.into_iter().enumerate() {
            assert_eq!(why as usize, i, "{why:?}");
        }
        let labels: std::collections::HashSet<_> =
            RejectReason::ALL.iter().map(|w| w.as_str()).collect();
        assert_eq!(labels.len(), RejectReason::ALL.len());
        assert_eq!(RejectReason::BadRequest.as_str(), "bad_request");
    }
}
