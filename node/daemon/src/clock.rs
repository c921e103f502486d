//! The one place the daemon reads the clock.

use mesh_core::Instant;

/// Wall-clock time for the core, never running backwards.
#[derive(Debug, Default)]
pub struct Clock {
    last: u64,
}

impl Clock {
    /// Milliseconds since the Unix epoch, at least the last value returned: the core may
    /// see a clock that stands still, never one that goes back.
    #[allow(clippy::disallowed_methods)]
    pub fn now(&mut self) -> Instant {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_millis() as u64);
        self.last = self.last.max(ms);
        Instant::from_millis(self.last)
    }
}
