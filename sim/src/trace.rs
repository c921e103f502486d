//! The run's trace: a hash over every effect every node returns (each message's bytes,
//! storage request, completion and disconnect), which two runs of one seed must share, and
//! with `--verbose` the lines a person reads.

use mesh_core::Effect;
use mesh_core::storage::StorageRequest;

use crate::world::Ms;

/// The trace of one run.
pub(crate) struct Trace {
    hash: u64,
    lines: Vec<String>,
}

impl Default for Trace {
    fn default() -> Trace {
        Trace {
            // FNV-1a's offset basis.
            hash: 0xcbf2_9ce4_8422_2325,
            lines: Vec::new(),
        }
    }
}

impl Trace {
    /// Mixes one effect of `node` at `now` into the hash (FNV-1a over its bytes).
    pub(crate) fn effect(&mut self, now: Ms, node: usize, effect: &Effect) {
        let mut hash = self.hash;
        let mut mix = |bytes: &[u8]| {
            for byte in bytes {
                hash ^= u64::from(*byte);
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
        };
        mix(&now.to_le_bytes());
        mix(&(node as u64).to_le_bytes());
        match effect {
            Effect::Send { to, bytes } => {
                mix(b"send");
                mix(to.as_bytes());
                mix(bytes);
            }
            Effect::Storage { op, request } => {
                mix(b"storage");
                mix(&op.0.to_le_bytes());
                if let StorageRequest::Append { envelopes } = request {
                    envelopes.iter().for_each(|envelope| mix(envelope));
                }
            }
            Effect::Complete { id, result } => {
                mix(b"complete");
                mix(&id.0.to_le_bytes());
                mix(&[u8::from(result.is_ok())]);
            }
            Effect::Disconnect { peer, .. } => {
                mix(b"disconnect");
                mix(peer.as_bytes());
            }
            Effect::Emit(_) => mix(b"emit"),
        }
        self.hash = hash;
    }

    /// Adds a line to the verbose trace.
    pub(crate) fn line(&mut self, line: String) {
        self.lines.push(line);
    }

    /// The hash so far.
    pub(crate) fn hash(&self) -> u64 {
        self.hash
    }

    /// The verbose trace's lines.
    pub(crate) fn lines(&self) -> &[String] {
        &self.lines
    }
}
