//! The `shardcast` binary: parse the command line (and the `--config` file), set up logging
//! and limits, serve until SIGINT or SIGTERM. Everything else lives in the library.
//!
//! Exit codes: 0 after a clean shutdown, 1 when serving fails (for example the address is in
//! use), 2 for a bad flag, value or configuration file. The same for `bench`, `sub` and `pub`
//! (1: the run failed).

use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches};
use shardcast::cli::{self, Cli, Command};
use shardcast::{LogFormat, Prepared, Stop};
use tokio::sync::watch;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Descriptors kept back from `--max-connections` for listeners, logs and HTTP-only clients.
const RESERVED_FDS: u64 = 64;

fn main() -> ExitCode {
    let matches = Cli::command().get_matches(); // exits with code 2 on a bad flag
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let print_only = match cli.command {
        Some(Command::Serve(_)) | None => false,
        Some(Command::Config(_)) => true,
        Some(tool) => return loadgen(tool),
    };
    // Flags, variables and the file become a checked configuration in one step; the key
    // and certificate files are read here, once (exit 2 if they are bad).
    let resolved = cli::resolve(Cli::command(), std::env::args_os().collect()).and_then(|r| {
        let prepared = r.config.clone().prepare()?;
        Ok((r, prepared))
    });
    let (resolved, prepared) = match resolved {
        Ok(r) => r,
        Err(e) => {
            eprintln!("shardcast: {e}");
            return ExitCode::from(2);
        }
    };
    if print_only {
        print!("{}", resolved.to_toml());
        return ExitCode::SUCCESS;
    }
    init_logging(prepared.config().log_format);
    match run(prepared) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shardcast: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Logs go to stderr (stdout is left to subcommands that print data), filtered by
/// `RUST_LOG` (default `info`).
fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // A closed stderr must not take the server down: tracing-subscriber would report the
    // failed write with `eprint!`, which panics when stderr itself is the problem.
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(prepared: Prepared) -> anyhow::Result<()> {
    let config = prepared.config().clone();
    // Many connections need many descriptors; the soft limit is often far below the hard one.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(nofile) => {
            let per_client = if config.tls.is_some() { 3 } else { 1 };
            let fits = nofile.saturating_sub(RESERVED_FDS) / per_client;
            if config.max_connections as u64 > fits {
                tracing::warn!(
                    max_connections = config.max_connections,
                    nofile,
                    fits,
                    "--max-connections is above what the open-file limit allows; raise the hard \
                     limit (LimitNOFILE= in systemd, ulimit -Hn) or lower --max-connections"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    tracing::info!(?config, "effective configuration");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the tokio runtime")?;
    runtime.block_on(async move {
        // Install the handlers before announcing readiness, so an early signal is not fatal.
        let stop = stop_signals().context("failed to install signal handlers")?;
        let addr = config.listen;
        let listener = shardcast::bind(addr)?;
        let metrics = config.metrics_listen.map(shardcast::bind).transpose()?;
        let shards = config.shards;
        let addr = listener.local_addr().unwrap_or(addr); // the real port when 0 was asked
        let mut server = shardcast::Server::prepared(listener, prepared)?;
        if let Some(m) = metrics {
            server = server.with_metrics_listener(m);
        }
        tracing::info!(%addr, shards, "shardcast listening");
        server.run_with(stop).await?;
        Ok(())
    })
}

/// The man page (`shardcast.1`: the serve flags and the subcommands) and the bash, zsh and fish
/// completions, generated from the one clap definition, for the Debian package.
fn write_assets(dir: &std::path::Path) -> std::io::Result<()> {
    use clap_complete::Shell;
    let cmd = Cli::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    std::fs::create_dir_all(dir.join("completions"))?;
    std::fs::write(dir.join("shardcast.1"), page)?;
    for (shell, file) in [
        (Shell::Bash, "shardcast.bash"),
        (Shell::Zsh, "_shardcast"),
        (Shell::Fish, "shardcast.fish"),
    ] {
        let mut out = std::fs::File::create(dir.join("completions").join(file))?;
        clap_complete::generate(shell, &mut cmd.clone(), "shardcast", &mut out);
    }
    Ok(())
}

/// The first SIGINT or SIGTERM asks for a drain, the second for an immediate stop.
fn stop_signals() -> std::io::Result<watch::Receiver<Stop>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let (tx, rx) = watch::channel(Stop::Run);
    tokio::spawn(async move {
        for level in [Stop::Drain, Stop::Now] {
            tokio::select! {
                _ = int.recv() => tracing::info!("SIGINT received"),
                _ = term.recv() => tracing::info!("SIGTERM received"),
            }
            let _ = tx.send(level);
        }
        // Keep the sender: a dropped one would read as a drain request.
        std::future::pending::<()>().await;
    });
    Ok(rx)
}

/// `bench`, `sub`, `pub`, `top` and the hidden bench worker: exit 2 for bad arguments, 1 for failure.
fn loadgen(command: Command) -> ExitCode {
    use shardcast::loadgen;
    let result = match command {
        Command::Bench(args) => loadgen::run_bench(&args).and_then(|report| {
            loadgen::report::emit(&report, args.scenario.common())?;
            // After the report: a failed soak exits 1 with its reasons, its figures printed.
            report.verdict()
        }),
        Command::Sub(args) => loadgen::tools::run_sub(&args).map(drop),
        Command::Pub(args) => loadgen::tools::run_pub(&args).map(drop),
        Command::Top(args) => loadgen::run_top(&args),
        Command::Assets { dir } => {
            return match write_assets(&dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!(
                        "shardcast: failed to write assets to {}: {e}",
                        dir.display()
                    );
                    ExitCode::from(1)
                }
            };
        }
        Command::BenchWorker => loadgen::run_worker_process(),
        Command::Serve(_) | Command::Config(_) => Ok(()), // dispatched by `main`
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shardcast: {e}");
            ExitCode::from(if e.is_bad_args() { 2 } else { 1 })
        }
    }
}
