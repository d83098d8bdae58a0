//! The gateway as a process of its own, configured by a TOML file: what
//! `benches/wrk_vs_nginx.sh` measures against nginx with `wrk`.
//!
//! ```sh
//! cargo run --profile release-lto --example gateway_bench_server --features gateway -- gateway.toml
//! cargo run --profile release-lto --example gateway_bench_server --features gateway -- gateway.toml \
//!     --workers 2 --runtime threads --cpu-affinity auto
//! ```
//!
//! Serves `[gateway] listen` (every service listed in `[[services]]`: no discovery) until
//! it gets `SIGINT` or `SIGTERM`, then shuts down gracefully (Unix only). `--workers N` (default 1) and `--runtime`:
//!
//! - `threads` (the default): [`Gateway::spawn_threads_with`], N threads each with a
//!   current-thread runtime and an `SO_REUSEPORT` listener, as nginx runs its workers,
//!   pinned to CPUs as `--cpu-affinity` says ([`CpuAffinity`]: `auto`, the default,
//!   pins one thread per CPU when there are as many threads as CPUs; `pin`; `off`);
//! - `multi`: one multi-thread tokio runtime with N workers, serving one listener.
//!
//! It prints `listening on <addr>` once it accepts connections.

use std::num::NonZeroUsize;

use seawall::BoxError;
use seawall::gateway::{CpuAffinity, Discovery, Gateway, GatewayConfig};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Runtime {
    Threads,
    Multi,
}

fn usage() -> BoxError {
    "usage: gateway_bench_server CONFIG.toml [--workers N] [--runtime threads|multi] \
     [--cpu-affinity auto|pin|off]"
        .into()
}

fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let mut path = None;
    let mut workers = NonZeroUsize::MIN;
    let mut runtime = Runtime::Threads;
    let mut affinity = CpuAffinity::default();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--workers" => {
                workers = args.next().ok_or_else(usage)?.parse()?;
            }
            "--runtime" => {
                runtime = match args.next().as_deref() {
                    Some("threads") => Runtime::Threads,
                    Some("multi") => Runtime::Multi,
                    _ => return Err(usage()),
                };
            }
            "--cpu-affinity" => {
                affinity = match args.next().as_deref() {
                    Some("auto") => CpuAffinity::Auto,
                    Some("pin") => CpuAffinity::Pin,
                    Some("off") => CpuAffinity::Off,
                    _ => return Err(usage()),
                };
            }
            _ if path.is_none() && !arg.starts_with('-') => path = Some(arg),
            _ => return Err(usage()),
        }
    }
    let config = GatewayConfig::from_file(path.ok_or_else(usage)?)?;
    let listen = config.gateway.listen;
    match runtime {
        Runtime::Multi => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers.get())
            .enable_all()
            .build()?
            .block_on(async move {
                let listener = tokio::net::TcpListener::bind(listen).await?;
                let gateway = Gateway::build(config, Discovery::Static).await?;
                let handle = gateway.spawn(listener);
                println!("listening on {}", handle.local_addr());
                stopped().await;
                handle.shutdown().await;
                Ok(())
            }),
        Runtime::Threads => {
            // This thread's runtime builds the gateway and sweeps idle upstream
            // connections; the requests are served on the gateway's own threads.
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(async move {
                    let gateway = Gateway::build(config, Discovery::Static).await?;
                    let threads = gateway.spawn_threads_with(listen, workers, affinity)?;
                    println!("listening on {}", threads.local_addr());
                    stopped().await;
                    tokio::task::spawn_blocking(move || threads.shutdown()).await?;
                    Ok(())
                })
        }
    }
}

/// Resolves on `SIGINT` or `SIGTERM`.
async fn stopped() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
