//! Fixed-window counters: the per-connection rate limit and abuse limit.
//!
//! Eight bytes per window: a start stamp in milliseconds of the relay's clock (`Relay::now_ms`)
//! and a count, rather than an `Instant` (16 bytes) or a log of timestamps (8 bytes per allowed
//! message). Wrapping arithmetic keeps it right when the `u32` clock wraps after 49 days.

/// Counts events in fixed windows of a given length.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    start_ms: u32,
    count: u32,
}

impl Window {
    pub fn new(now_ms: u32) -> Window {
        Window {
            start_ms: now_ms,
            count: 0,
        }
    }

    /// Count one event; true when the window now holds more than `limit`.
    pub fn over(&mut self, now_ms: u32, window_ms: u32, limit: u32) -> bool {
        if now_ms.wrapping_sub(self.start_ms) >= window_ms {
            self.start_ms = now_ms;
            self.count = 0;
        }
        self.count = self.count.saturating_add(1);
        self.count > limit
    }

    /// Whether the window that holds the counted events has run out by `now_ms`.
    pub fn ended(&self, now_ms: u32, window_ms: u32) -> bool {
        now_ms.wrapping_sub(self.start_ms) >= window_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_allows_the_limit_then_refuses_until_it_rolls() {
        let mut w = Window::new(0);
        for _ in 0..20 {
            assert!(!w.over(0, 10_000, 20));
        }
        assert!(w.over(1_000, 10_000, 20));
        assert!(!w.over(11_000, 10_000, 20));
    }

    #[test]
    fn window_survives_the_millisecond_clock_wrapping() {
        let mut w = Window::new(u32::MAX - 5);
        assert!(!w.over(u32::MAX - 5, 10_000, 1));
        assert!(w.over(3, 10_000, 1), "9 ms later, still the same window");
        assert!(!w.over(10_000, 10_000, 1));
    }
}
