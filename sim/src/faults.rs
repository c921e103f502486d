//! Fault shapes drawn from the run's one rng: the world asks, in its order, and applies
//! what comes back.

use crate::rng::SimRng;

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
