//! Per source address state: the publish rate shared by every connection from one address, and
//! how many connections the address holds (`MAX_CONNECTIONS_PER_IP`).
//!
//! A connection's own rate window starts afresh when it reconnects, so a client that reconnects
//! every few messages would never meet it. The window here belongs to the address instead, and
//! outlives the connections: an entry stays while any connection from its address is open and
//! until its window has run out, then the sweeper (run with the heartbeat) removes it. The map is
//! therefore bounded by the open connections plus the addresses seen within one rate window.
//!
//! The address is the peer's, or the client named by `X-Forwarded-For` when the peer is one of
//! `TRUSTED_PROXIES` (see `http.rs`). This module does not look at requests.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;

use crate::rate::Window;

/// One source address's shared state (held by each of its connections).
#[derive(Debug)]
pub struct AddressState {
    ip: IpAddr,
    publish: Mutex<Window>,
    /// Connections open (or upgrading) from this address.
    connections: AtomicU32,
}

impl AddressState {
    /// The source address (canonical: an IPv4-mapped IPv6 address is its IPv4 address).
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// Count one published message; false when the address is over `limit` in this window.
    pub fn allow_publish(&self, now_ms: u32, window_ms: u32, limit: u32) -> bool {
        let mut w = self.publish.lock().unwrap_or_else(|p| p.into_inner());
        !w.over(now_ms, window_ms, limit)
    }

    fn window_over(&self, now_ms: u32, window_ms: u32) -> bool {
        let w = self.publish.lock().unwrap_or_else(|p| p.into_inner());
        w.ended(now_ms, window_ms)
    }
}

/// One connection's hold on its address's share: counted while it lives (from before the 101
/// until the connection ends), given back on drop.
#[derive(Debug)]
pub struct AddressSlot {
    state: Arc<AddressState>,
}

impl AddressSlot {
    /// Take one of `ip`'s connection slots; `None` when it already holds `max` (0: no limit).
    pub fn take(state: Arc<AddressState>, max: u32) -> Option<AddressSlot> {
        let taken = state
            .connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (max == 0 || n < max).then_some(n + 1)
            });
        taken.ok().map(|_| AddressSlot { state })
    }

    /// Connections this address holds now (this one included).
    pub fn held(&self) -> u32 {
        self.state.connections.load(Ordering::Acquire)
    }
}

impl std::ops::Deref for AddressSlot {
    type Target = AddressState;
    fn deref(&self) -> &AddressState {
        &self.state
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        self.state.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Every source address with an open connection or a running window.
#[derive(Debug, Default)]
pub struct Addresses {
    map: DashMap<IpAddr, Arc<AddressState>>,
}

impl Addresses {
    /// The state of `ip`, created if needed.
    pub fn get(&self, ip: IpAddr, now_ms: u32) -> Arc<AddressState> {
        let ip = crate::config::canonical(ip);
        self.map
            .entry(ip)
            .or_insert_with(|| {
                Arc::new(AddressState {
                    ip,
                    publish: Mutex::new(Window::new(now_ms)),
                    connections: AtomicU32::new(0),
                })
            })
            .clone()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Forget addresses with no open connection whose window has run out.
    pub fn sweep(&self, now_ms: u32, window_ms: u32) {
        self.map
            .retain(|_, s| Arc::strong_count(s) > 1 || !s.window_over(now_ms, window_ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_is_shared_by_every_connection_of_an_address() {
        let a = Addresses::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let first = a.get(ip, 0);
        assert!(first.allow_publish(0, 10_000, 2));
        drop(first);
        let again = a.get(ip, 5);
        assert!(again.allow_publish(5, 10_000, 2));
        assert!(
            !again.allow_publish(6, 10_000, 2),
            "a reconnect does not reset it"
        );
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert!(!a.get(mapped, 7).allow_publish(7, 10_000, 2));
    }

    #[test]
    fn sweeping_keeps_open_addresses_and_running_windows() {
        let a = Addresses::default();
        let open = a.get("192.0.2.1".parse().unwrap(), 0);
        let closed = a.get("192.0.2.2".parse().unwrap(), 0);
        closed.allow_publish(0, 10_000, 5);
        drop(closed);
        a.sweep(5_000, 10_000);
        assert_eq!(a.len(), 2, "the closed address's window still runs");
        a.sweep(10_000, 10_000);
        assert_eq!(a.len(), 1);
        drop(open);
        a.sweep(20_000, 10_000);
        assert!(a.is_empty());
    }
}
