//! The `roomcast` binary: settings, logging, the audit log, the listeners (public and
//! `ADMIN_ADDR`), the start line, the signals (SIGHUP reopens the audit log and reloads the TLS
//! certificate), then `server::serve`.

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
static GLOBAL: roomcast::alloc::RelayAlloc = roomcast::alloc::RelayAlloc;

/// Pending connections the kernel may hold for us during a connect storm.
const LISTEN_BACKLOG: u32 = 4096;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let explicit_origins = args.allowed_origins.is_some();
    let mut settings = Settings::from_args(args)?;
    roomcast::log::init(&settings.log)?;
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
            let admin = match settings.admin_addr {
                Some(admin) => Some(
                    tokio::net::TcpListener::bind(admin)
                        .await
                        .with_context(|| format!("binding ADMIN_ADDR {admin}"))?,
                ),
                None => None,
            };
            settings.fix_default_origins(explicit_origins, addr.port());
            let max = *settings.max_connections.get_or_insert(relay::default_max_connections(nofile));
            if settings.uses_dev_token() {
                tracing::warn!("CHAT_TOKEN is the development token 'dev-token', so the relay serves this machine only; set CHAT_TOKEN (and HOST) to serve others");
            }
            // Install the signal handlers before announcing readiness: a SIGTERM right after the
            // start line must drain, not kill, and a SIGHUP must reopen the audit log and reload
            // the certificate.
            let shutdown = stop_signals()?;
            on_sighup(relay_audit.clone(), settings.tls.clone())?;
            server::start_reactors().context("starting the connection reactors")?;
            let mut stdout = std::io::stdout().lock();
            let url = roomcast::config::start_url(addr, settings.tls.is_some());
            writeln!(stdout, "roomcast listening on {url} (max connections {max}, open-file limit {nofile})")?;
            if let Some(admin) = &admin {
                writeln!(stdout, "roomcast admin listening on http://{} (/metrics, /healthz, /readyz)", admin.local_addr()?)?;
            }
            stdout.flush()?;
            drop(stdout);
            // The Redis URL may carry a password: only whether there is one is logged.
            let broker = if settings.redis_url.is_some() {
                "redis"
            } else if settings.redis_cluster_nodes.is_some() {
                "redis-cluster"
            } else {
                "memory"
            };
            let audit_log = settings.audit_log.as_ref().map(ToString::to_string);
            let tls_cert = settings.tls.as_ref().map(|t| t.cert_path().display().to_string());
            tracing::info!(%addr, max_connections = max, open_file_limit = nofile, max_handshakes_per_second = settings.max_handshakes_per_second, origins = ?settings.allowed_origins, broker, audit_log, tls_cert, "ready");
            let listeners = server::Listeners { public: listener, admin };
            server::serve(listeners, settings, Some(prometheus), relay_audit, shutdown).await?;
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

/// The shutdown triggers: SIGTERM begins a shutdown with its lame-duck wait (LAME_DUCK_MS);
/// SIGINT (Ctrl-C at a terminal), or a second signal during the wait, begins or hurries it
/// without the wait. The handlers are installed when this returns.
fn stop_signals() -> std::io::Result<
    server::Shutdown<impl std::future::Future<Output = ()>, impl std::future::Future<Output = ()>>,
> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // 0: running; 1: shutting down; 2: shutting down without the lame-duck wait.
    let (tx, rx) = tokio::sync::watch::channel(0u8);
    tokio::spawn(async move {
        loop {
            let interrupt = tokio::select! {
                _ = int.recv() => true,
                _ = term.recv() => false,
            };
            let hurry = interrupt || *tx.borrow() > 0;
            tx.send_replace(if hurry { 2 } else { 1 });
        }
    });
    let mut begin = rx.clone();
    let mut now = rx;
    Ok(server::Shutdown {
        begin: async move {
            let _ = begin.wait_for(|state| *state >= 1).await;
        },
        now: async move {
            let _ = now.wait_for(|state| *state >= 2).await;
        },
    })
}
