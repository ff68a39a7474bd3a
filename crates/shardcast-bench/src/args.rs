//! Command-line flags of `shardcast bench`, `sub` and `pub`. `cli.rs` embeds these structs;
//! turning them into a run plan lives in `worker.rs`, not here.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use shardcast_core::units::parse_duration;

/// Drive a WebSocket broadcast server (any server, through URL templates) and measure it.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// Parses `bench`'s arguments as the command line would: for the library API and tests.
#[derive(Debug, Parser)]
#[command(name = "bench")]
struct BenchLine {
    #[command(flatten)]
    bench: BenchArgs,
}

impl BenchArgs {
    /// Parses `bench`'s arguments, scenario first: `["fanout", "--subscribers", "10"]`.
    pub fn parse_from<I, T>(args: I) -> Result<BenchArgs, super::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let line = std::iter::once(std::ffi::OsString::from("bench"))
            .chain(args.into_iter().map(Into::into));
        BenchLine::try_parse_from(line)
            .map(|l| l.bench)
            .map_err(|e| super::Error::BadArgs(e.to_string()))
    }
}

#[derive(Debug, Clone, Subcommand)]
pub enum Scenario {
    /// N subscribers on T topics, P publishers at a rate: deliveries/s, latency, loss, order.
    Fanout(FanoutArgs),
    /// N clients in one room; each sends one message per round, a round ends at N² deliveries.
    Chat(ChatArgs),
    /// Open N connections and hold them, answering pings; server RSS per connection.
    Idle(IdleArgs),
    /// Handshakes per second and their latency.
    Connect(ConnectArgs),
    /// Hold N connections, churn them for --duration, watch the server's /metrics; assert that
    /// RSS, descriptors and tasks return to the baseline and that every probe was answered.
    Soak(Box<SoakArgs>),
}

impl Scenario {
    pub fn common(&self) -> &CommonArgs {
        match self {
            Scenario::Fanout(a) => &a.common,
            Scenario::Chat(a) => &a.common,
            Scenario::Idle(a) => &a.common,
            Scenario::Connect(a) => &a.common,
            Scenario::Soak(a) => &a.common,
        }
    }
}

/// Flags every scenario takes.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// WebSocket URL template for subscribers and clients; `{topic}` is replaced by the topic.
    /// Repeat it to spread the connections over several servers (say, the nodes of a cluster):
    /// each topic's subscribers, and chat's clients, go round robin over the URLs.
    #[arg(long = "url", default_value = "ws://127.0.0.1:8080/ws/{topic}")]
    pub urls: Vec<String>,
    /// Extra request header for every handshake and POST, as 'Name: value' (repeatable).
    #[arg(long = "header", short = 'H')]
    pub headers: Vec<String>,
    /// How long to measure, after the warmup.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// How long to run before measuring; results in this time are discarded.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Seed for masks, handshake keys and payload filler.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Worker processes [default: one per 15000 connections, at least 1].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub workers: Option<u32>,
    /// Connections per source address 127.0.0.2, .3, ...; 0 lets the kernel choose.
    #[arg(long, default_value_t = 10_000)]
    pub conns_per_addr: u32,
    /// Handshakes in flight at once while connecting, per worker.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub connect_concurrency: u32,
    /// A handshake that takes longer than this fails.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Also report this server process's CPU time (and for `idle`, its RSS per connection).
    /// Repeat it for a server of several processes, or several servers: the figures are sums.
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,
    /// Write the result as JSON to this file, or to stdout with `-`.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No progress bar and no human summary (the JSON, if asked for, is still written).
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// Topic names are this prefix followed by the topic's index.
    #[arg(long, default_value = "bench")]
    pub topic_prefix: String,
}

/// A rate in messages per second, or `max`: as fast as the server takes them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    PerSecond(f64),
    Max,
}

fn parse_rate(s: &str) -> Result<Rate, String> {
    if s.eq_ignore_ascii_case("max") {
        return Ok(Rate::Max);
    }
    match s.parse::<f64>() {
        Ok(r) if r > 0.0 && r.is_finite() => Ok(Rate::PerSecond(r)),
        _ => Err("expected a positive number of messages per second, or `max`".into()),
    }
}

#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Subscriber connections, spread round robin over the topics.
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub subscribers: u32,
    /// Topics.
    #[arg(long, short = 't', default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub topics: u32,
    /// Publishers, spread round robin over the topics.
    #[arg(long, short = 'p', default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub publishers: u32,
    /// Total messages per second over all publishers (each sends rate/P), or `max`.
    #[arg(long, short = 'r', default_value = "100", value_parser = parse_rate)]
    pub rate: Rate,
    /// Payload bytes per message (at least 20: the stamp).
    #[arg(long, short = 's', default_value_t = 64)]
    pub size: u32,
    /// Each publisher sends exactly this many messages, then the run ends (no warmup).
    #[arg(long)]
    pub messages: Option<u64>,
    /// Where publishers send: a ws:// template (frames on publisher connections) or an
    /// http:// template (one POST per message) [default: the first --url].
    #[arg(long)]
    pub publish_url: Option<String>,
    /// Content-Type of HTTP publishes.
    #[arg(long, default_value = "application/octet-stream")]
    pub content_type: String,
    /// Kernel send buffer of each WebSocket publisher (SO_SNDBUF). Small, so that `--rate max`
    /// is as fast as the server reads, not as fast as the kernel buffers.
    #[arg(long, default_value = "64KiB", value_parser = shardcast_core::units::parse_size)]
    pub publisher_buffer: usize,
    /// After publishing stops, how long to wait for deliveries still in flight.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Clients in the room.
    #[arg(long, short = 'n', default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    pub clients: u32,
    /// Payload bytes per message (at least 20: the stamp).
    #[arg(long, short = 's', default_value_t = 20)]
    pub size: u32,
    /// Run exactly this many rounds, then stop (no warmup).
    #[arg(long)]
    pub rounds: Option<u64>,
    /// The server does not send a client its own messages: a round is N × (N - 1) deliveries.
    #[arg(long)]
    pub no_echo: bool,
    /// A round that does not complete within this time ends the run.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub round_timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Connections to open and hold.
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub connections: u32,
    /// Topics the connections are spread over.
    #[arg(long, short = 't', default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub topics: u32,
    /// Wait this long after the last handshake before reading the server's memory.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub settle: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Stop after this many handshakes in all (no warmup) [default: run for --duration].
    #[arg(long, short = 'n')]
    pub connections: Option<u64>,
    /// Handshakes in flight at once, per worker.
    #[arg(long, short = 'c', default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,
}

/// How the soak's churned connections go, as weights: `abrupt=2,close=2,slow=1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mix {
    /// Dropped without a close frame (half with a TCP reset, half with a FIN).
    pub abrupt: u32,
    /// Closed with a close frame (1000), waiting for the server's.
    pub close: u32,
    /// Replaced by a slow reader on a flooded topic that stops reading until the server drops it.
    pub slow: u32,
}

/// Parses `--mix`: comma-separated `name=weight`; names not given weigh 0; not all 0.
pub fn parse_mix(s: &str) -> Result<Mix, String> {
    let mut mix = Mix {
        abrupt: 0,
        close: 0,
        slow: 0,
    };
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, weight) = part
            .split_once('=')
            .ok_or_else(|| format!("`{part}`: expected name=weight"))?;
        let weight: u32 = weight
            .trim()
            .parse()
            .map_err(|_| format!("`{part}`: the weight must be a whole number"))?;
        match name.trim() {
            "abrupt" => mix.abrupt = weight,
            "close" => mix.close = weight,
            "slow" => mix.slow = weight,
            other => return Err(format!("`{other}`: expected abrupt, close or slow")),
        }
    }
    if u64::from(mix.abrupt) + u64::from(mix.close) + u64::from(mix.slow) == 0 {
        return Err("at least one weight must be above 0".into());
    }
    Ok(mix)
}

#[derive(Debug, Clone, Args)]
pub struct SoakArgs {
    /// `--duration` is how long the churn lasts; `--warmup` is not used (the baseline is
    /// taken once the connections are open and `--settle` has passed).
    #[command(flatten)]
    pub common: CommonArgs,
    /// Connections held; churned ones are replaced, so about this many stay open.
    #[arg(long, short = 'n', default_value_t = 15_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub connections: u32,
    /// Topics the connections are spread over (connection `i` on topic `i % T`).
    #[arg(long, short = 't', default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub topics: u32,
    /// Connections churned per second over all workers: each one leaves as `--mix` says and
    /// is replaced.
    #[arg(long, default_value_t = 200.0)]
    pub churn_rate: f64,
    /// How churned connections leave, as weights.
    #[arg(long, default_value = "abrupt=2,close=2,slow=1", value_parser = parse_mix)]
    pub mix: Mix,
    /// Messages per second POSTed over the topics, round robin (0: none).
    #[arg(long, default_value_t = 100.0)]
    pub publish_rate: f64,
    /// Payload bytes of those messages.
    #[arg(long, default_value_t = 64)]
    pub size: u32,
    /// Topics only slow readers subscribe to, flooded all along (nobody else listens).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub slow_topics: u32,
    /// Messages per second POSTed to each slow topic.
    #[arg(long, default_value_t = 20.0)]
    pub slow_rate: f64,
    /// Payload bytes of a slow topic's messages.
    #[arg(long, default_value = "16KiB", value_parser = shardcast_core::units::parse_size)]
    pub slow_size: usize,
    /// How long a slow reader stops reading; then it reads what is left, expecting the
    /// server's close (4008, or the write timeout's) within 10 s.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub slow_stall: Duration,
    /// Where to POST the messages and probes [default: the first --url's host, /publish/{topic}].
    #[arg(long)]
    pub publish_url: Option<String>,
    /// The server's metrics [default: the first --url's host, /metrics].
    #[arg(long)]
    pub metrics_url: Option<String>,
    /// Time between two samples of the server's metrics.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub sample_interval: Duration,
    /// Time between two probes (a POST to the probe topic, received by the probe subscriber).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub probe_interval: Duration,
    /// A probe not received within this time is unanswered.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub probe_timeout: Duration,
    /// Once the connections are back to the baseline's count, wait this long before sampling
    /// (the baseline waits as long after the first connections are open).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub settle: Duration,
    /// After the churn stops, how long the connections may take to return to the baseline.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub recover_timeout: Duration,
}

/// How `sub` prints binary messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BinaryFormat {
    Hex,
    Base64,
}

/// Print each message received on a WebSocket, one per line.
#[derive(Debug, Clone, Args)]
pub struct SubArgs {
    /// ws:// URL to subscribe to.
    pub url: String,
    /// Exit after this many messages.
    #[arg(long, short = 'n')]
    pub count: Option<u64>,
    /// How binary messages are printed (text messages are printed as they are).
    #[arg(long, value_enum, default_value = "hex")]
    pub binary: BinaryFormat,
    /// Extra request header, as 'Name: value' (repeatable).
    #[arg(long = "header", short = 'H')]
    pub headers: Vec<String>,
    /// A handshake that takes longer than this fails.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
}

/// Publish MSG, or each line of stdin, over WebSocket (ws://) or HTTP POST (http://).
#[derive(Debug, Clone, Args)]
pub struct PubArgs {
    /// ws:// URL to send frames on, or http:// URL to POST to.
    pub url: String,
    /// The message; without it, each line of stdin is one message.
    pub message: Option<String>,
    /// Content-Type of HTTP publishes.
    #[arg(long, default_value = "text/plain")]
    pub content_type: String,
    /// Send binary frames instead of text frames (WebSocket only).
    #[arg(long)]
    pub binary: bool,
    /// Extra request header, as 'Name: value' (repeatable).
    #[arg(long = "header", short = 'H')]
    pub headers: Vec<String>,
    /// A handshake or request that takes longer than this fails.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
}
