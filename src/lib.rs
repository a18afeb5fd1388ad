//! roomcast: a WebSocket edge relay for real-time rooms.
//!
//! Start at `server::run`; ARCHITECTURE.md has the map. Module per concept:
//! `config` (settings), `server` (accept loop, background tasks, shutdown), `relay` (the shared
//! state), `http` (routes and upgrade checks), `connection` (one socket's task), `frame` (RFC 6455
//! codec), `protocol` (JSON), `outbox` (per-connection queue), `hub` (rooms, history, presence),
//! `broker` (the publish seam and the in-memory broker), `broker_redis` (several nodes through
//! Redis), `address` (per source address state), `audit` (the audit log), `metrics`, `limits`,
//! `rate` (windows), `log` (the logger and the access lines), `tls` (direct TLS: certificate,
//! reload, the session after the upgrade).

pub mod address;
pub mod alloc;
pub mod api;
pub mod audit;
pub mod broker;
pub mod broker_redis;
pub mod config;
pub mod connection;
pub mod frame;
pub mod http;
pub mod hub;
pub mod limits;
pub mod log;
pub mod metrics;
pub mod outbox;
pub mod protocol;
pub mod rate;
pub mod reactor;
pub mod relay;
pub mod server;
pub mod slab;
pub mod socket;
pub mod ticket;
pub mod tls;
