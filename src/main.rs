//! The `roomcast` binary: settings, logging, the listener, then `server::run`.

use std::io::Write;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpSocket;

use roomcast::config::{Args, Settings};
use roomcast::{limits, metrics, relay, server};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Pending connections the kernel may hold for us during a connect storm.
const LISTEN_BACKLOG: u32 = 4096;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let explicit_origins = args.allowed_origins.is_some();
    let mut settings = Settings::from_args(args)?;
    let nofile = limits::raise_nofile_limit();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = settings.worker_threads {
        runtime.worker_threads(workers);
    }
    runtime
        .enable_all()
        .on_thread_park(roomcast::alloc::trim_if_due)
        .build()
        .context("starting the runtime")?
        .block_on(async move {
            let socket = if settings.listen_addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
            socket.set_reuseaddr(true)?;
            socket.bind(settings.listen_addr).with_context(|| format!("binding {}", settings.listen_addr))?;
            let listener = socket.listen(LISTEN_BACKLOG)?;
            let addr = listener.local_addr()?;
            settings.fix_default_origins(explicit_origins, addr.port());
            let max = *settings.max_connections.get_or_insert(relay::default_max_connections(nofile));
            let prometheus = metrics::install_recorder().context("installing the metrics recorder")?;
            if settings.uses_dev_token() {
                tracing::warn!("CHAT_TOKEN is the development token 'dev-token'; set CHAT_TOKEN before exposing this relay");
            }
            // Install the signal handlers before announcing readiness: a SIGTERM right after the
            // start line must drain, not kill.
            let shutdown = shutdown_signal()?;
            let mut stdout = std::io::stdout().lock();
            writeln!(stdout, "roomcast listening on http://{addr} (max connections {max}, open-file limit {nofile})")?;
            stdout.flush()?;
            drop(stdout);
            // The Redis URL may carry a password: only whether there is one is logged.
            let broker = if settings.redis_url.is_some() { "redis" } else { "memory" };
            tracing::info!(%addr, max_connections = max, open_file_limit = nofile, origins = ?settings.allowed_origins, broker, "ready");
            server::run(listener, settings, Some(prometheus), shutdown).await?;
            tracing::info!("stopped");
            Ok(())
        })
}

/// A future that resolves on SIGINT or SIGTERM; the handlers are installed when this returns.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}
