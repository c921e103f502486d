//! Fault shapes drawn from the run's one rng: the world asks, in its order, and applies
//! what comes back (and schedules it). Every draw of a fault's timing and target is here;
//! the order of the calls is the world's, and it is part of every seed's trace.

use std::time::Duration;

use crate::rng::SimRng;
use crate::world::Ms;

/// A node's clock skew, up to `max_ms` either way (none when `max_ms` is 0: no draw).
pub(crate) fn draw_skew(rng: &mut SimRng, max_ms: u64) -> i64 {
    match max_ms {
        0 => 0,
        max => rng.range(0, 2 * max + 1) as i64 - max as i64,
    }
}

/// When the next fault of a kind follows, a random wait of mean `every`.
pub(crate) fn draw_next(rng: &mut SimRng, every: Duration) -> Ms {
    rng.exponential_ms(every.as_millis() as f64)
}

/// Which of `count` nodes a crash or a pause strikes.
pub(crate) fn draw_target(rng: &mut SimRng, count: usize) -> usize {
    rng.index(count)
}

/// How long a crashed node stays down.
pub(crate) fn draw_downtime(rng: &mut SimRng) -> Ms {
    rng.range(500, 8000)
}

/// How a crash leaves the node's disk: whether the append in flight is torn, and the
/// draw that decides how much of it stays.
pub(crate) fn draw_crash_damage(rng: &mut SimRng) -> (bool, u64) {
    let torn = rng.chance(0.5);
    let keep = rng.next_u64();
    (torn, keep)
}

/// How long a paused node stays frozen.
pub(crate) fn draw_pause(rng: &mut SimRng) -> Ms {
    rng.range(500, 5000)
}

/// How long a partition lasts.
pub(crate) fn draw_partition_length(rng: &mut SimRng) -> Ms {
    rng.range(2000, 10_000)
}

/// How long after a restart or a heal a node dials a peer.
pub(crate) fn draw_dial_delay(rng: &mut SimRng, max: Ms) -> Ms {
    rng.range(0, max)
}

/// A network cut among `count` nodes, as the directed pairs whose messages are lost: one
/// node alone, two random sides, or one node whose messages to everyone vanish (theirs
/// still arrive).
pub(crate) fn draw_cut(rng: &mut SimRng, count: usize) -> Vec<(usize, usize)> {
    let mut cut = Vec::new();
    match rng.range(0, 3) {
        0 => {
            let alone = rng.index(count);
            for other in (0..count).filter(|other| *other != alone) {
                cut.push((alone, other));
                cut.push((other, alone));
            }
        }
        1 => {
            let side: Vec<bool> = (0..count).map(|_| rng.chance(0.5)).collect();
            for a in 0..count {
                for b in 0..count {
                    if side[a] != side[b] {
                        cut.push((a, b));
                    }
                }
            }
        }
        _ => {
            let mute = rng.index(count);
            for other in (0..count).filter(|other| *other != mute) {
                cut.push((mute, other));
            }
        }
    }
    cut
}
