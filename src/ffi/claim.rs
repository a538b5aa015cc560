//! One call at a time on a handle that changes: the handle holds its state in a `Mutex`, and
//! every call claims it without waiting. A call made while another thread's call holds it is
//! refused with `BEIT_ERR_BUSY` (nothing done), and a handle whose state a panicking call left
//! half-changed (a poisoned mutex) refuses every later call with `BEIT_ERR_INTERNAL`.

use std::sync::{Mutex, MutexGuard, TryLockError};

use super::status::{beit_status, FfiError, FfiResult};

/// What a claimed handle is called in the messages, and how a host recovers from a poisoned one.
pub(crate) struct HandleKind {
    /// The handle in words, after "the": "trainer", "dVAE trainer".
    pub name: &'static str,
    /// What to do with a handle an earlier panic left unusable, completing "free it and ...".
    pub recovery: &'static str,
}

/// Claims `state` for the call `call` (named first in the messages) without waiting: the guard
/// ends the claim when dropped, also when the call fails or panics.
pub(crate) fn claim_state<'a, T>(state: &'a Mutex<T>, call: &str, kind: &HandleKind) -> FfiResult<MutexGuard<'a, T>> {
    let name = kind.name;
    match state.try_lock() {
        Ok(guard) => Ok(guard),
        Err(TryLockError::WouldBlock) => Err(FfiError::new(
            beit_status::BEIT_ERR_BUSY,
            format!(
                "{call}: the {name} is busy with another call (a {name} takes one call at a time: serialise the \
                 calls of several threads, or retry later; a progress callback may not call into the {name} it \
                 reports on); nothing was done"
            ),
        )),
        Err(TryLockError::Poisoned(_)) => Err(FfiError::new(
            beit_status::BEIT_ERR_INTERNAL,
            format!(
                "{call}: the {name} is unusable: an earlier call on it failed part-way with an internal error (a \
                 libbeit panic, reported then as BEIT_ERR_INTERNAL), so its state may be inconsistent; free it \
                 and {}",
                kind.recovery
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIND: HandleKind = HandleKind { name: "widget", recovery: "make another widget" };

    #[test]
    fn a_held_state_is_busy_and_a_poisoned_one_is_unusable() {
        let state = Mutex::new(5);
        {
            let _held = claim_state(&state, "first", &KIND).unwrap();
            let err = claim_state(&state, "beit_widget_poke", &KIND).unwrap_err();
            assert_eq!(err.status, beit_status::BEIT_ERR_BUSY);
            assert!(err.message.starts_with("beit_widget_poke: the widget is busy") && err.message.contains("nothing"));
        }
        assert_eq!(*claim_state(&state, "again", &KIND).unwrap(), 5, "the claim ends with its guard");
        let panicked = std::thread::scope(|s| {
            s.spawn(|| {
                let _claim = claim_state(&state, "doomed", &KIND).unwrap();
                panic!("a bug while the widget is claimed");
            })
            .join()
        });
        assert!(panicked.is_err());
        let err = claim_state(&state, "beit_widget_poke", &KIND).unwrap_err();
        assert_eq!(err.status, beit_status::BEIT_ERR_INTERNAL);
        assert!(
            err.message.contains("the widget is unusable") && err.message.ends_with("free it and make another widget")
        );
    }
}
