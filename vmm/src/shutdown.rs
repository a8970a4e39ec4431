//! Why a VM stopped, and the one-shot signal that carries it from whichever
//! vCPU or device saw it first to the thread that tears the VM down.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// The reason a VM stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest asked for a reset (i8042 reset line or a triple fault):
    /// for a microVM that is the end of its life.
    GuestReset,
    /// The guest kernel powered the machine off.
    GuestPowerOff,
    /// A vCPU failed in a way the VMM cannot resume from.
    VcpuFailure(String),
}

impl ExitReason {
    /// Whether the VM ended the way a guest is allowed to end it.
    pub fn is_clean(&self) -> bool {
        matches!(self, ExitReason::GuestReset | ExitReason::GuestPowerOff)
    }
}

/// A one-shot, first-writer-wins stop request shared by all VM threads.
#[derive(Debug, Clone, Default)]
pub struct StopSignal {
    inner: Arc<(Mutex<Option<ExitReason>>, Condvar)>,
    // Lock-free copy of "a reason is set", checked by vCPUs on every exit.
    raised: Arc<AtomicBool>,
}

impl StopSignal {
    /// A signal nobody has raised yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `reason` unless another reason came first, and wakes the waiter.
    pub fn raise(&self, reason: ExitReason) {
        let (lock, cvar) = &*self.inner;
        let mut slot = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
        }
        self.raised.store(true, Ordering::Release);
        cvar.notify_all();
    }

    /// Whether the signal was raised; cheap enough for a vCPU's hot loop.
    pub fn is_raised(&self) -> bool {
        self.raised.load(Ordering::Acquire)
    }

    /// The reason, if the signal was raised.
    pub fn reason(&self) -> Option<ExitReason> {
        let (lock, _) = &*self.inner;
        lock.lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Blocks until the signal is raised and returns its reason.
    pub fn wait(&self) -> ExitReason {
        let (lock, cvar) = &*self.inner;
        let mut slot = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        loop {
            if let Some(reason) = slot.clone() {
                return reason;
            }
            slot = cvar
                .wait(slot)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_wakes_the_waiter() {
        let signal = StopSignal::new();
        assert_eq!(signal.reason(), None);
        assert!(!signal.is_raised());
        let waiter = {
            let signal = signal.clone();
            std::thread::spawn(move || signal.wait())
        };
        signal.raise(ExitReason::GuestPowerOff);
        signal.raise(ExitReason::VcpuFailure("late".into()));
        assert_eq!(waiter.join().unwrap(), ExitReason::GuestPowerOff);
        assert_eq!(signal.reason(), Some(ExitReason::GuestPowerOff));
        assert!(signal.is_raised());
    }

    #[test]
    fn only_guest_exits_are_clean() {
        assert!(ExitReason::GuestReset.is_clean());
        assert!(ExitReason::GuestPowerOff.is_clean());
        assert!(!ExitReason::VcpuFailure("x".into()).is_clean());
    }
}
