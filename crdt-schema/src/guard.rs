//! Running Automerge on bytes from outside without letting it take the node down.
//!
//! Automerge 0.12 panics on some validly framed inputs (an op naming an actor or object
//! that does not exist, among others: `../shared/reviews/security-2026-12.md`, finding 1).
//! Every call that hands Automerge foreign bytes runs through [`no_panic`], which turns a
//! panic into a [`VerifyError::Change`]. Callers run it on copies, so a panic half-way
//! through leaves nothing they keep in a broken state.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::change::VerifyError;

/// Runs `work`; a panic inside it becomes an error naming `what`.
///
/// `AssertUnwindSafe` is sound here because callers pass closures that own or borrow only
/// values they discard when an error comes back.
pub(crate) fn no_panic<T>(
    what: &str,
    work: impl FnOnce() -> Result<T, VerifyError>,
) -> Result<T, VerifyError> {
    let outer = GUARDED.with(|guarded| guarded.replace(true));
    let result = catch_unwind(AssertUnwindSafe(work));
    GUARDED.with(|guarded| guarded.set(outer));
    match result {
        Ok(result) => result,
        Err(payload) => {
            let detail = payload
                .downcast_ref::<&str>()
                .map(|text| (*text).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".to_owned());
            Err(VerifyError::Change(format!(
                "automerge panicked {what}: {}",
                detail.chars().take(200).collect::<String>()
            )))
        }
    }
}

thread_local! {
    /// Whether this thread is inside [`no_panic`].
    static GUARDED: Cell<bool> = const { Cell::new(false) };
}

/// Installs a panic hook that stays silent for panics [`no_panic`] catches (they become
/// errors, counted and reported by the node) and hands every other panic to the hook that
/// was installed before. For binaries (the daemon, the simulator); a library sets no hook.
pub fn quiet_guarded_panics() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !GUARDED.with(Cell::get) {
            previous(info);
        }
    }));
}
