//! `shardcast top` in a real pseudo-terminal (tmux): against a running node with a subscriber
//! and a steady publisher, and a node that is down, the screen shows the live node first with
//! its connection and a non-zero delivery rate, and the dead one as down. Needs tmux (Debian
//! `tmux`), so it is ignored in plain `cargo test`; `.ci/run` installs it and runs it.

use crate::common;

use std::process::Command;
use std::time::{Duration, Instant};

use shardcast::{Opcode, Topic};

/// The pane's text, as a person would see it.
fn capture(session: &str) -> String {
    let out = Command::new("tmux")
        .args(["capture-pane", "-p", "-t", session])
        .output()
        .expect("tmux runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Kills the tmux session however the test ends.
struct Session(String);

impl Drop for Session {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs tmux (Debian: apt-get install tmux); .ci/run runs it"]
async fn top_shows_a_busy_node_first_and_a_dead_one_as_down() {
    let server = common::start(common::config()).await;
    let _subscriber = server.connect("/ws/top").await;
    let relay = server.relay.clone();
    let topic = Topic::new("top").expect("a valid topic");
    // A steady publisher for as long as the test runs: about 100 messages a second.
    let publisher = tokio::spawn(async move {
        loop {
            let _ = relay.publish(&topic, Opcode::Text, b"tick").await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    // A port nothing listens on: bind one, then let it go.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let session = Session(format!("shardcast-top-{}", std::process::id()));
    let command = format!(
        "{} top --url http://{}/metrics --url {dead} --interval 200ms",
        env!("CARGO_BIN_EXE_shardcast"),
        server.addr
    );
    let started = Command::new("tmux")
        .args([
            "new-session",
            "-d",
            "-x",
            "150",
            "-y",
            "20",
            "-s",
            &session.0,
            &command,
        ])
        .status()
        .expect("tmux runs");
    assert!(started.success(), "tmux new-session failed");
    let live = format!("{}", server.addr);
    let deadline = Instant::now() + Duration::from_secs(15);
    let screen = loop {
        let screen = capture(&session.0);
        let rows: Vec<&str> = screen
            .lines()
            .skip_while(|l| !l.starts_with("NODE"))
            .skip(1)
            .collect();
        let busy = rows.first().is_some_and(|r| {
            let cols: Vec<&str> = r.split_whitespace().collect();
            // NODE CONNS PUB/S DELIV/S ...: one connection, deliveries flowing.
            cols.first() == Some(&live.as_str())
                && cols.get(1) == Some(&"1")
                && cols.get(3).is_some_and(|d| *d != "0")
        });
        if busy && rows.get(1).is_some_and(|r| r.contains("down:")) {
            break screen;
        }
        assert!(
            Instant::now() < deadline,
            "top never showed the busy node first and the dead one down:\n{screen}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(screen.contains("1/2 nodes up"), "{screen}");
    publisher.abort();
    server.stop().await;
}
