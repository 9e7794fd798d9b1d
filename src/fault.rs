//! Test-only fault injection (cargo feature `fault-injection`, off by default): makes
//! the N-th *device call* from now fail, so that tests can check that every state change
//! involving the device is atomic (see the failure contract in `docs/ARCHITECTURE.md`).
//!
//! A device call is a point where the cache hands work to its device that may fail for
//! reasons the caller does not control (an upload, a kernel launch, a read-back): the
//! device page-table scatter, each `DeviceLru` operation, each host-tier operation and
//! `begin_step`'s uploads. Calls are counted per thread, so tests running in parallel do
//! not disturb each other. An injected failure is an [`Error::Candle`](crate::Error)
//! whose message names the call and says it was injected; it fires once.
//!
//! Without the feature only the crate-private hook exists, and it does nothing.

#[cfg(feature = "fault-injection")]
mod imp {
    use std::cell::Cell;

    thread_local! {
        static CALLS: Cell<u64> = const { Cell::new(0) };
        static FAIL_AT: Cell<Option<u64>> = const { Cell::new(None) };
    }

    /// Makes the `n`-th device call from now on this thread fail (`n = 1`: the next one);
    /// `n = 0` disarms.
    pub fn fail_nth_device_call(n: u64) {
        FAIL_AT.with(|f| f.set((n > 0).then(|| CALLS.with(Cell::get) + n)));
    }

    /// Disarms a pending failure.
    pub fn clear() {
        FAIL_AT.with(|f| f.set(None));
    }

    /// `true` while a failure is armed and has not fired yet.
    pub fn armed() -> bool {
        FAIL_AT.with(Cell::get).is_some()
    }

    /// Device calls made on this thread so far.
    pub fn device_calls() -> u64 {
        CALLS.with(Cell::get)
    }

    pub(crate) fn device_call(what: &'static str) -> crate::Result<()> {
        let n = CALLS.with(|c| {
            c.set(c.get() + 1);
            c.get()
        });
        if FAIL_AT.with(Cell::get) == Some(n) {
            FAIL_AT.with(|f| f.set(None));
            return Err(crate::Error::Candle(candle_core::Error::Msg(format!(
                "{what}: injected failure of device call {n} (feature fault-injection)"
            ))));
        }
        Ok(())
    }
}

#[cfg(feature = "fault-injection")]
pub use imp::{armed, clear, device_calls, fail_nth_device_call};

#[cfg(feature = "fault-injection")]
pub(crate) use imp::device_call;

/// The hook at every device call: a no-op without the `fault-injection` feature.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub(crate) fn device_call(_what: &'static str) -> crate::Result<()> {
    Ok(())
}
