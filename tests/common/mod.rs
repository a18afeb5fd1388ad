//! The one harness of the integration tests: start the real `roomcast` binary (and, for
//! multi-node tests, real Redis and nginx) on loopback ports and talk to them over real sockets.
//! Every test file says `mod common; use common::*;`.
//!
//! - `relay`: [`Relay`] owns a relay process (environment cleared via [`RELAY_ENV`], stderr kept
//!   and printed when a test fails, killed on drop, signals, restart on the same port);
//!   [`RelayBuilder`] starts one or several nodes with the same settings.
//! - `client`: [`Client`], a JSON-event WebSocket client (answers pings, counts frames and bytes).
//! - `raw`: [`RawClient`], RFC 6455 by hand for frame-level tests and misbehaving clients.
//! - `http`: plain HTTP/1.1 to any [`Endpoint`] (relay, nginx, Prometheus).
//! - `metrics`: [`Exposition`], the one `/metrics` parser, and [`metric`] / [`wait_for_metric`] /
//!   [`Relay::wait_metrics`] on top of it.
//! - `services`: [`RedisServer`] and [`Nginx`].
//! - `tls`: a test CA and server certificates (openssl CLI), a rustls client trusting it, WSS
//!   ([`Client::connect_tls_to`]) and HTTPS ([`https_get`]).
//! - `process`: spawning children tied to the test process, output capture, free ports, temp dirs.
//! - `checks`, `dashboard`: value checks; the Grafana dashboard's PromQL.
//!
//! Every wait is bounded by a timeout; helpers panic with a message saying what was expected.
//! The harness is compiled into every test binary, each of which uses only part of it.
#![allow(dead_code)]

mod checks;
mod client;
mod dashboard;
mod http;
mod metrics;
mod process;
mod raw;
mod relay;
mod services;
mod tls;

use std::time::Duration;

// Each test binary uses part of the harness; what it does not use must not warn.
#[allow(unused_imports)]
pub use {
    checks::*, client::*, dashboard::*, http::*, metrics::*, process::*, raw::*, relay::*,
    services::*, tls::*,
};

/// Token every relay started by [`Relay::start`] requires (unless a test overrides CHAT_TOKEN).
pub const TOKEN: &str = "contract-test-token";
/// Default bound on waiting for one event.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longer bound of the strict `expect_*` helpers and of metrics polling: scripts that check
/// exact counts wait generously rather than flake on a loaded machine.
pub const WAIT: Duration = Duration::from_secs(10);
/// Bound on the relay printing its startup line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on one plain HTTP exchange.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
