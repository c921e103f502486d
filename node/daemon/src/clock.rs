//! The one place the daemon reads the clock.
//!
//! The core gets one time for both its timers and its timestamps. Timers must follow a
//! monotonic clock: were they to follow the wall clock, a backward step of the wall clock
//! (an NTP fix of a clock that ran ahead) would freeze every sync, stall check, checkpoint
//! and redial for as long as the step. So the time handed out runs at the monotonic clock's
//! rate from the wall-clock time it was last anchored at, and takes a forward step of the
//! wall clock at once. After a backward step the node's timestamps stay ahead of the wall
//! clock by the step until the daemon restarts; timestamps are claimed by authors and play
//! no part in verdicts.

use mesh_core::Instant;

/// Time for the core: never backwards, never standing still.
#[derive(Debug)]
pub struct Clock {
    /// Wall-clock milliseconds at `anchor`.
    anchor_ms: u64,
    anchor: std::time::Instant,
    last: u64,
}

impl Default for Clock {
    #[allow(clippy::disallowed_methods)]
    fn default() -> Clock {
        Clock {
            anchor_ms: wall_ms(),
            anchor: std::time::Instant::now(),
            last: 0,
        }
    }
}

#[allow(clippy::disallowed_methods)]
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

impl Clock {
    /// Milliseconds since the Unix epoch, as described in the module doc.
    #[allow(clippy::disallowed_methods)]
    pub fn now(&mut self) -> Instant {
        self.at(wall_ms(), std::time::Instant::now())
    }

    /// The time for a wall-clock reading and a monotonic one.
    fn at(&mut self, wall: u64, monotonic: std::time::Instant) -> Instant {
        let elapsed = monotonic.saturating_duration_since(self.anchor).as_millis() as u64;
        let running = self.anchor_ms.saturating_add(elapsed);
        if wall > running {
            // The wall clock stepped forward (or ran faster): follow it.
            self.anchor_ms = wall;
            self.anchor = monotonic;
        }
        self.last = self.last.max(running.max(wall));
        Instant::from_millis(self.last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    #[allow(clippy::disallowed_methods)]
    fn a_backward_step_of_the_wall_clock_does_not_stop_time() {
        let start = std::time::Instant::now();
        let mut clock = Clock {
            anchor_ms: 10_000_000,
            anchor: start,
            last: 0,
        };
        assert_eq!(clock.at(10_000_000, start).as_millis(), 10_000_000);
        // The wall clock goes back an hour while 5 s pass: time runs on by 5 s.
        let later = start + Duration::from_secs(5);
        assert_eq!(
            clock.at(10_000_000 - 3_600_000, later).as_millis(),
            10_005_000
        );
        let later = start + Duration::from_secs(6);
        assert_eq!(
            clock.at(10_000_000 - 3_599_000, later).as_millis(),
            10_006_000
        );
        // A forward step is taken at once.
        assert_eq!(clock.at(20_000_000, later).as_millis(), 20_000_000);
        let later = start + Duration::from_secs(7);
        assert_eq!(clock.at(20_000_000, later).as_millis(), 20_001_000);
    }
}
