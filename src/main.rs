//! The `shardcast` binary: parse the command line, set up logging and limits, serve until
//! SIGINT or SIGTERM. Everything else lives in the library.
//!
//! Exit codes: 0 after a clean shutdown, 1 when serving fails (for example the address is in
//! use), 2 for a bad flag or value. The same for `bench`, `sub` and `pub` (1: the run failed).

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use shardcast::cli::{Cli, Command};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse(); // exits with code 2 on a bad flag
    let args = match cli.command {
        Some(Command::Serve(args)) => args,
        None => cli.serve,
        Some(tool) => return loadgen(tool),
    };
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("shardcast: {e}");
            return ExitCode::from(2);
        }
    };
    // Logs go to stderr: stdout is left to subcommands that print data.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shardcast: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(config: shardcast::Config) -> anyhow::Result<()> {
    // Many connections need many descriptors; the soft limit is often far below the hard one.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(nofile = n, "raised the open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the tokio runtime")?;
    runtime.block_on(async move {
        // Install the handlers before announcing readiness, so an early signal is not fatal.
        let shutdown = shutdown_signal().context("failed to install signal handlers")?;
        let addr = config.listen;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| shardcast::Error::Bind { addr, source })?;
        tracing::info!(%addr, shards = config.shards, "shardcast listening");
        shardcast::run(listener, config, shutdown).await?;
        Ok(())
    })
}

/// A future that completes on the first SIGINT or SIGTERM.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => tracing::info!("SIGINT received"),
            _ = term.recv() => tracing::info!("SIGTERM received"),
        }
    })
}

/// `bench`, `sub`, `pub` and the hidden bench worker: exit 2 for bad arguments, 1 for failure.
fn loadgen(command: Command) -> ExitCode {
    use shardcast::loadgen;
    let result = match command {
        Command::Bench(args) => loadgen::run_bench(&args)
            .and_then(|report| loadgen::report::emit(&report, args.scenario.common())),
        Command::Sub(args) => loadgen::tools::run_sub(&args).map(drop),
        Command::Pub(args) => loadgen::tools::run_pub(&args).map(drop),
        Command::BenchWorker => loadgen::run_worker_process(),
        Command::Serve(_) => Ok(()), // dispatched by `main`
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shardcast: {e}");
            ExitCode::from(if e.is_bad_args() { 2 } else { 1 })
        }
    }
}
