//! Logging: the subscriber (text or JSON lines on stderr; colour only on a terminal and never
//! with NO_COLOR or in JSON), and the access lines an operator reads to learn what happened to a
//! client: one per refused request and one per closed WebSocket, at info, under the target
//! `roomcast::access` (so `RUST_LOG=info,roomcast::access=warn` silences them).
//!
//! Access lines are held to LOG_LINES_PER_SECOND per kind, so a flood of refused upgrades (or a
//! mass disconnect) cannot fill a disk: past the limit a line is only counted, by reason, and
//! [`flush_suppressed`] (called by the server a second after the first line left out) writes one
//! line with the counts.
//!
//! The functions here take no URI, query string or header map, only values that are safe to
//! show: a token, ticket or query string cannot reach the log through them. Free text that a
//! client chose (a path, an Origin) is cut short and reduced to printable ASCII, so it cannot
//! forge a line or carry terminal escapes. Nothing here logs per message; that is counted in
//! metrics instead.

use std::borrow::Cow;
use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::config::{LogFormat, LogSettings};
use crate::metrics::{Rejection, CLOSE_CODES};

/// The target of every access line (refusals, closes and their suppression summaries).
pub const ACCESS: &str = "roomcast::access";

/// The longest client-chosen value (path, Origin) a line shows.
const CLIENT_TEXT_MAX_CHARS: usize = 100;

/// Why logging could not start.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("RUST_LOG is not a valid log filter: {0}")]
    Filter(String),
    #[error("a logger is already installed: {0}")]
    Installed(String),
}

/// Install the process's logger from `settings`. Call once, from the binary.
pub fn init(settings: &LogSettings) -> Result<(), LogError> {
    LINES_PER_SECOND.store(settings.lines_per_second, Ordering::Relaxed);
    let filter = tracing_subscriber::EnvFilter::try_new(&settings.filter)
        .map_err(|e| LogError::Filter(e.to_string()))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match settings.format {
        LogFormat::Text => builder
            .with_ansi(!settings.no_color && std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .with_ansi(false)
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
    installed.map_err(|e| LogError::Installed(e.to_string()))
}

/// A request the relay answered with an error status instead of serving it.
#[derive(Debug, Clone, Copy)]
pub struct Refusal<'a> {
    pub status: u16,
    pub reason: Rejection,
    /// The TCP peer (a proxy's address when the client came through one).
    pub peer: SocketAddr,
    /// The client's address when a trusted proxy named another one in X-Forwarded-For.
    pub client: Option<IpAddr>,
    /// The request path; never the query string.
    pub path: &'a str,
    /// Whether it asked for a WebSocket (else it is the plain GET probe of /chat).
    pub upgrade: bool,
    /// What exactly was wrong, when that helps and is no secret: `token_missing`,
    /// `token_wrong`, or the Origin that is not allowed.
    pub detail: Option<&'a str>,
}

/// Log a refused request (at most LOG_LINES_PER_SECOND such lines a second).
pub fn refusal(r: &Refusal<'_>) {
    let reason = Rejection::ALL
        .iter()
        .position(|&x| x == r.reason)
        .expect("ALL lists every variant");
    if !REFUSALS.admit(reason, now_secs(), LINES_PER_SECOND.load(Ordering::Relaxed)) {
        return;
    }
    tracing::info!(
        target: ACCESS,
        status = r.status,
        reason = %r.reason.label(),
        upgrade = r.upgrade,
        peer = %r.peer,
        client = r.client.map(tracing::field::display),
        path = %client_text(r.path),
        detail = r.detail.map(|d| tracing::field::display(client_text(d))),
        "refused"
    );
}

/// A WebSocket that ended, for [`connection_closed`].
#[derive(Debug, Clone, Copy)]
pub struct Closed<'a> {
    /// The close code counted in `roomcast_connections_closed_total` (1006: no close frame).
    pub code: u16,
    /// Why, as a short label without spaces: `peer_closed`, `dropped`, `heartbeat`, `shutdown`,
    /// `slow_consumer`, `abuse`, `protocol`, a `metrics::Limit` label, ...
    pub reason: &'a str,
    /// Which side sent the first close frame: `peer` or `relay` (or `none` when it was dropped).
    pub by: &'a str,
    pub room: &'a str,
    /// Time since the upgrade.
    pub age: Duration,
    /// The client's address (the peer, or X-Forwarded-For from a trusted proxy).
    pub peer: IpAddr,
    /// The id the relay gave the connection in its greeting.
    pub client_id: u64,
}

/// Log a closed WebSocket (at most LOG_LINES_PER_SECOND such lines a second). Called once per
/// connection, when its close code is counted.
pub fn connection_closed(c: &Closed<'_>) {
    let code = CLOSE_CODES
        .iter()
        .position(|&x| x == c.code)
        .unwrap_or(CLOSE_CODES.len());
    if !CLOSES.admit(code, now_secs(), LINES_PER_SECOND.load(Ordering::Relaxed)) {
        return;
    }
    tracing::info!(
        target: ACCESS,
        code = c.code,
        reason = %client_text(c.reason),
        by = %client_text(c.by),
        room = %client_text(c.room),
        age_ms = c.age.as_millis() as u64,
        peer = %c.peer,
        client_id = c.client_id,
        "closed"
    );
}

/// Woken when a line is first left out since the last summary.
static SUPPRESSING: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Resolves once an access line has been left out since the last summary: the server then
/// waits a second and calls [`flush_suppressed`]. A relay that suppresses nothing never wakes
/// for it.
pub async fn suppressing() {
    SUPPRESSING.notified().await
}

/// Write one line per kind of access line that was left out since the last call, with the
/// counts by reason (refusals) or close code (closes). The server calls this a second after
/// [`suppressing`] resolves.
pub fn flush_suppressed() {
    if let Some((total, by)) = REFUSALS.take_suppressed(|i| Rejection::ALL[i].label().into()) {
        tracing::info!(target: ACCESS, kind = %"refused", suppressed = total, by = %by, "access lines suppressed (LOG_LINES_PER_SECOND)");
    }
    let code_label = |i: usize| {
        CLOSE_CODES
            .get(i)
            .map_or(Cow::Borrowed("other"), |c| Cow::Owned(c.to_string()))
    };
    if let Some((total, by)) = CLOSES.take_suppressed(code_label) {
        tracing::info!(target: ACCESS, kind = %"closed", suppressed = total, by = %by, "access lines suppressed (LOG_LINES_PER_SECOND)");
    }
}

static LINES_PER_SECOND: AtomicU32 = AtomicU32::new(50);
static REFUSALS: Gate<{ Rejection::ALL.len() }> = Gate::new();
static CLOSES: Gate<{ CLOSE_CODES.len() + 1 }> = Gate::new();

/// Whole seconds since the first access line: the windows of the gates.
fn now_secs() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs()
}

/// Lines of one kind per one-second window, and the count of those left out, by reason.
struct Gate<const N: usize> {
    window: AtomicU64,
    lines: AtomicU32,
    suppressed: [AtomicU64; N],
}

impl<const N: usize> Gate<N> {
    const fn new() -> Self {
        Gate {
            window: AtomicU64::new(0),
            lines: AtomicU32::new(0),
            suppressed: [const { AtomicU64::new(0) }; N],
        }
    }

    /// May a line for reason `index` be written in second `now`? If not, it is counted.
    /// (Approximate under a race at a window's edge by a line or two; never unbounded.)
    fn admit(&self, index: usize, now: u64, per_second: u32) -> bool {
        let window = self.window.load(Ordering::Relaxed);
        if window != now
            && self
                .window
                .compare_exchange(window, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.lines.store(0, Ordering::Relaxed);
        }
        if self.lines.fetch_add(1, Ordering::Relaxed) < per_second {
            return true;
        }
        if self.suppressed[index.min(N - 1)].fetch_add(1, Ordering::Relaxed) == 0 {
            SUPPRESSING.notify_one();
        }
        false
    }

    /// The suppressed lines since the last call: total and `label=count,...`; `None` if none.
    fn take_suppressed(&self, label: impl Fn(usize) -> Cow<'static, str>) -> Option<(u64, String)> {
        let mut total = 0;
        let mut by = String::new();
        for (i, count) in self.suppressed.iter().enumerate() {
            let n = count.swap(0, Ordering::Relaxed);
            if n > 0 {
                total += n;
                if !by.is_empty() {
                    by.push(',');
                }
                by.push_str(&format!("{}={n}", label(i)));
            }
        }
        (total > 0).then_some((total, by))
    }
}

/// A value a client chose, made safe for one log line: printable ASCII without spaces, at most
/// `CLIENT_TEXT_MAX_CHARS` characters (others become `?`; a cut is marked with `...`).
fn client_text(s: &str) -> Cow<'_, str> {
    let clean = s.len() <= CLIENT_TEXT_MAX_CHARS && s.bytes().all(|b| b.is_ascii_graphic());
    if clean {
        return Cow::Borrowed(s);
    }
    let mut out: String = s
        .chars()
        .take(CLIENT_TEXT_MAX_CHARS)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect();
    if s.chars().count() > CLIENT_TEXT_MAX_CHARS {
        out.push_str("...");
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Run `f` with a subscriber of `format` writing into a buffer; returns what it wrote.
    fn capture(format: LogFormat, f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().expect("not poisoned").extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let builder = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false);
        match format {
            LogFormat::Text => tracing::subscriber::with_default(builder.finish(), f),
            LogFormat::Json => {
                tracing::subscriber::with_default(builder.json().flatten_event(true).finish(), f)
            }
        }
        let bytes = buf.0.lock().expect("not poisoned").clone();
        String::from_utf8(bytes).expect("UTF-8 log")
    }

    fn closed() -> Closed<'static> {
        Closed {
            code: 1008,
            reason: "control_frames",
            by: "relay",
            room: "lobby",
            age: Duration::from_millis(1234),
            peer: "192.0.2.7".parse().expect("ip"),
            client_id: 42,
        }
    }

    #[test]
    fn a_close_line_has_code_reason_room_age_and_peer_in_both_formats() {
        let text = capture(LogFormat::Text, || connection_closed(&closed()));
        for part in [
            "roomcast::access",
            "closed",
            "code=1008",
            "reason=control_frames",
            "by=relay",
            "room=lobby",
            "age_ms=1234",
            "peer=192.0.2.7",
            "client_id=42",
        ] {
            assert!(text.contains(part), "{part} in {text}");
        }
        let json = capture(LogFormat::Json, || connection_closed(&closed()));
        let v: serde_json::Value = serde_json::from_str(json.trim()).expect("one JSON object");
        assert_eq!(v["message"], "closed");
        assert_eq!(v["target"], ACCESS);
        assert_eq!(v["code"], 1008);
        assert_eq!(v["room"], "lobby");
        assert_eq!(v["age_ms"], 1234);
        assert_eq!(v["peer"], "192.0.2.7");
    }

    #[test]
    fn client_chosen_text_cannot_forge_lines_or_escape_to_the_terminal() {
        let text = capture(LogFormat::Text, || {
            connection_closed(&Closed {
                room: "a\nINFO fake line \u{1b}[31mred",
                ..closed()
            })
        });
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(!text.contains('\u{1b}'), "{text:?}");
        assert_eq!(client_text(&"x".repeat(150)).len(), 103);
    }

    #[test]
    fn a_refusal_line_has_status_reason_and_peer_and_no_absent_fields() {
        let refused = Refusal {
            status: 403,
            reason: Rejection::ForbiddenOrigin,
            peer: "192.0.2.9:5555".parse().expect("addr"),
            client: None,
            path: "/chat",
            upgrade: true,
            detail: Some("https://evil.example"),
        };
        let text = capture(LogFormat::Text, || refusal(&refused));
        for part in [
            "refused",
            "status=403",
            "reason=forbidden_origin",
            "upgrade=true",
            "peer=192.0.2.9:5555",
            "path=/chat",
            "detail=https://evil.example",
        ] {
            assert!(text.contains(part), "{part} in {text}");
        }
        assert!(!text.contains("client="), "{text}");
    }

    #[test]
    fn a_gate_admits_its_lines_per_second_and_counts_the_rest_by_reason() {
        let gate: Gate<3> = Gate::new();
        let admitted = (0..10).filter(|i| gate.admit(i % 2, 7, 4)).count();
        assert_eq!(admitted, 4);
        assert!(gate.admit(2, 8, 4), "a new second admits again");
        let (total, by) = gate
            .take_suppressed(|i| Cow::Owned(format!("r{i}")))
            .expect("some were suppressed");
        assert_eq!((total, by.as_str()), (6, "r0=3,r1=3"));
        assert!(
            gate.take_suppressed(|_| "x".into()).is_none(),
            "counts are taken once"
        );
        let quiet: Gate<1> = Gate::new();
        assert!(!quiet.admit(0, 1, 0), "0 lines a second: only summaries");
    }
}
