//! The `roomcast` binary: settings, logging, the audit log, the listener, signals (SIGHUP reopens
//! the audit log and reloads the TLS certificate), then `server::run`.

use std::io::Write;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpSocket;

use roomcast::audit::{Audit, AuditSettings};
use roomcast::config::{Args, Settings};
use roomcast::tls::Tls;
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
    let prometheus = metrics::install_recorder().context("installing the metrics recorder")?;
    // Opened before the start line: a path that cannot be opened stops the start, with its reason.
    let audit = match &settings.audit_log {
        None => None,
        Some(target) => Some(
            Audit::start(
                target.clone(),
                AuditSettings::from_settings(&settings),
                &metrics::Metrics::new(),
            )
            .with_context(|| format!("opening the audit log {target} (AUDIT_LOG)"))?,
        ),
    };
    let relay_audit = audit.clone();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = settings.worker_threads {
        runtime.worker_threads(workers);
    }
    let served = runtime
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
            if settings.uses_dev_token() {
                tracing::warn!("CHAT_TOKEN is the development token 'dev-token'; set CHAT_TOKEN before exposing this relay");
            }
            // Install the signal handlers before announcing readiness: a SIGTERM right after the
            // start line must drain, not kill, and a SIGHUP must reopen the audit log and reload
            // the certificate.
            let shutdown = shutdown_signal()?;
            on_sighup(relay_audit.clone(), settings.tls.clone())?;
            let scheme = settings.scheme();
            let mut stdout = std::io::stdout().lock();
            writeln!(stdout, "roomcast listening on {scheme}://{addr} (max connections {max}, open-file limit {nofile})")?;
            stdout.flush()?;
            drop(stdout);
            // The Redis URL may carry a password: only whether there is one is logged.
            let broker = if settings.redis_url.is_some() { "redis" } else { "memory" };
            let audit_log = settings.audit_log.as_ref().map(ToString::to_string);
            let tls_cert = settings.tls.as_ref().map(|t| t.cert_path().display().to_string());
            tracing::info!(%addr, max_connections = max, open_file_limit = nofile, origins = ?settings.allowed_origins, broker, audit_log, tls_cert, "ready");
            server::run(listener, settings, Some(prometheus), relay_audit, shutdown).await?;
            tracing::info!("stopped");
            Ok(())
        });
    // After the drain, or a failed start: what the connections recorded is written before the
    // process exits (a blocked disk holds the exit for at most audit::SHUTDOWN_WAIT).
    if let Some(audit) = &audit {
        audit.shutdown();
    }
    served
}

/// On every SIGHUP: reopen the audit log (logrotate renames the file, then signals) and reload
/// the TLS certificate and key (certbot and other ACME clients renew the files, then signal).
/// One handler does both. Installed only when there is something to do: otherwise SIGHUP keeps
/// its default action.
fn on_sighup(audit: Option<Audit>, tls: Option<Arc<Tls>>) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    if audit.is_none() && tls.is_none() {
        return Ok(());
    }
    let mut hangup = signal(SignalKind::hangup())?;
    let metrics = metrics::Metrics::new();
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            if let Some(audit) = &audit {
                tracing::info!("SIGHUP: reopening the audit log");
                audit.reopen();
            }
            if let Some(tls) = &tls {
                // Reading two small files: quick enough for a worker, and rare.
                match tls.reload() {
                    Ok(()) => {
                        metrics.tls_reloads.increment(1);
                        tracing::info!(cert = %tls.cert_path().display(), "SIGHUP: TLS certificate reloaded");
                    }
                    Err(e) => {
                        metrics.tls_reload_failures.increment(1);
                        tracing::error!(error = %e, "SIGHUP: TLS certificate reload failed; still serving the previous certificate");
                    }
                }
            }
        }
    });
    Ok(())
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
