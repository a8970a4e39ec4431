//! Why a VM stopped, and the one-shot signal that carries it from whichever
//! vCPU or device saw it first to the thread that tears the VM down; and
//! the host signals that reach the VMM (SIGTERM and SIGINT stop it,
//! SIGUSR1 asks for a report of its devices' state).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// The reason a VM stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest asked for a reset (the i8042 reset line or KVM's reset
    /// event), which is how Linux reboots with `reboot=k`: a microVM has
    /// nothing to reboot into, so, as in Firecracker, this is the guest
    /// ending its own VM on purpose.
    GuestReset,
    /// The guest kernel powered the machine off.
    GuestPowerOff,
    /// The guest kernel panicked; the text is its panic line.
    GuestPanic(String),
    /// A vCPU triple-faulted: the guest's CPU state was beyond repair.
    TripleFault {
        /// Which vCPU.
        vcpu: usize,
        /// Where it was.
        rip: u64,
    },
    /// A vCPU failed in a way the VMM cannot resume from.
    VcpuFailure(String),
    /// The host asked the VMM to stop (SIGTERM or SIGINT, by number).
    HostSignal(i32),
}

/// moat-vmm's exit statuses. A seccomp violation kills the process with
/// SIGSYS instead, which its parent sees as a signal, not a status.
pub mod exit_status {
    /// The guest powered off or rebooted, or the host asked it to stop.
    pub const CLEAN: u8 = 0;
    /// The VMM could not build or run the VM (bad config, host error).
    pub const VMM_ERROR: u8 = 1;
    /// The guest kernel panicked.
    pub const GUEST_PANIC: u8 = 10;
    /// A vCPU triple-faulted.
    pub const TRIPLE_FAULT: u8 = 11;
    /// A vCPU failed (KVM could not run it, or an exit the VMM cannot handle).
    pub const VCPU_FAILURE: u8 = 12;
}

impl ExitReason {
    /// Whether the VM ended the way a guest or the host is allowed to end
    /// it; every other end is a crash.
    pub fn is_clean(&self) -> bool {
        self.exit_status() == exit_status::CLEAN
    }

    /// The status moat-vmm exits with for this reason (see [`exit_status`]).
    pub fn exit_status(&self) -> u8 {
        match self {
            ExitReason::GuestReset | ExitReason::GuestPowerOff | ExitReason::HostSignal(_) => {
                exit_status::CLEAN
            }
            ExitReason::GuestPanic(_) => exit_status::GUEST_PANIC,
            ExitReason::TripleFault { .. } => exit_status::TRIPLE_FAULT,
            ExitReason::VcpuFailure(_) => exit_status::VCPU_FAILURE,
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::GuestReset => write!(f, "the guest rebooted"),
            ExitReason::GuestPowerOff => write!(f, "the guest powered off"),
            ExitReason::GuestPanic(line) => write!(f, "guest kernel panic: {line}"),
            ExitReason::TripleFault { vcpu, rip } => {
                write!(f, "triple fault on vCPU {vcpu} at rip {rip:#x}")
            }
            ExitReason::VcpuFailure(what) => write!(f, "vCPU failure: {what}"),
            ExitReason::HostSignal(signal) => write!(f, "host signal {signal}"),
        }
    }
}

/// What SIGUSR1 prints, one line each: set once the devices exist, and
/// taken away again when the VM stops.
pub type StateReport = Arc<Mutex<Option<Box<dyn Fn() -> Vec<String> + Send>>>>;

/// Turns SIGTERM and SIGINT into a stop of the VM, so that the VMM tears
/// it down (vCPUs stopped, devices dropped, the vsock socket and any tap
/// it created removed) instead of dying where it stands, and SIGUSR1 into
/// `report`'s lines on stderr (`moat-vmm: state: …`), which the VM
/// survives. It blocks the three signals in the calling thread, which
/// every thread started afterwards inherits, and waits for them on a
/// thread of its own: call it before starting any other thread.
pub fn stop_on_host_signals(stop: &StopSignal, report: StateReport) -> std::io::Result<()> {
    // SAFETY: sigset_t is plain old data, initialised by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; SIGTERM and SIGINT are valid signals.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGUSR1);
    }
    // SAFETY: `set` is valid and the old mask is not wanted.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    let stop = stop.clone();
    crate::threads::spawn(
        crate::seccomp::ThreadKind::Signals,
        "moat_signals".into(),
        move || loop {
            let mut signal = 0;
            // SAFETY: `set` is valid and `signal` a valid place for the result.
            if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
                continue;
            }
            if signal == libc::SIGUSR1 {
                crate::seccomp::selftest_point(crate::seccomp::ThreadKind::Signals);
                let report = report.lock().unwrap_or_else(|p| p.into_inner());
                match report.as_ref() {
                    Some(lines) => {
                        for line in lines() {
                            crate::log_line!("moat-vmm: state: {line}");
                        }
                    }
                    None => crate::log_line!(
                        "moat-vmm: state: no VM to report on (not built yet, or stopping)"
                    ),
                }
                continue;
            }
            stop.raise(ExitReason::HostSignal(signal));
            return;
        },
    )?;
    Ok(())
}

/// Something to do when a VM's stop is raised.
type StopHook = Box<dyn Fn() + Send>;

/// A one-shot, first-writer-wins stop request shared by all VM threads.
#[derive(Clone, Default)]
pub struct StopSignal {
    inner: Arc<(Mutex<Option<ExitReason>>, Condvar)>,
    /// Called once the signal is raised (the spawner's stop).
    hooks: Arc<Mutex<Vec<StopHook>>>,
    /// The guest kernel's panic line, once the console has shown one: the
    /// reset that a panic ends in (`panic=N`) is then the panic's.
    panic_line: Arc<Mutex<Option<String>>>,
    // Lock-free copy of "a reason is set", checked by vCPUs on every exit.
    raised: Arc<AtomicBool>,
}

impl std::fmt::Debug for StopSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopSignal")
            .field("reason", &self.reason())
            .finish_non_exhaustive()
    }
}

impl StopSignal {
    /// A signal nobody has raised yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Notes that the guest kernel panicked (its panic line): a guest
    /// reset or triple fault raised after this is reported as
    /// [`ExitReason::GuestPanic`].
    pub fn note_guest_panic(&self, line: String) {
        self.panic_line
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get_or_insert(line);
    }

    /// The panic line noted by [`Self::note_guest_panic`], if any.
    pub fn guest_panic(&self) -> Option<String> {
        self.panic_line
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Records `reason` unless another reason came first, and wakes the waiter.
    pub fn raise(&self, reason: ExitReason) {
        // A panic ends in a reset: i8042, or a triple fault when the
        // keyboard controller's reset falls through (reboot=k) or reboot=t.
        let reason = match (reason, self.guest_panic()) {
            (ExitReason::GuestReset | ExitReason::TripleFault { .. }, Some(line)) => {
                ExitReason::GuestPanic(line)
            }
            (reason, _) => reason,
        };
        let (lock, cvar) = &*self.inner;
        let mut slot = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
        }
        self.raised.store(true, Ordering::Release);
        cvar.notify_all();
        drop(slot);
        for hook in self.hooks.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            hook();
        }
    }

    /// Calls `hook` when the signal is raised (at once if it was already).
    pub fn on_raise(&self, hook: impl Fn() + Send + 'static) {
        let mut hooks = self.hooks.lock().unwrap_or_else(|p| p.into_inner());
        if self.is_raised() {
            hook();
        }
        hooks.push(Box::new(hook));
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
    fn a_reset_after_a_panic_is_the_panics() {
        let signal = StopSignal::new();
        signal.note_guest_panic("Kernel panic - not syncing: x".into());
        signal.note_guest_panic("a later one".into());
        signal.raise(ExitReason::GuestReset);
        assert_eq!(
            signal.reason(),
            Some(ExitReason::GuestPanic(
                "Kernel panic - not syncing: x".into()
            ))
        );
        let signal = StopSignal::new();
        signal.note_guest_panic("Kernel panic - not syncing: y".into());
        signal.raise(ExitReason::TripleFault { vcpu: 0, rip: 0 });
        assert!(matches!(signal.reason(), Some(ExitReason::GuestPanic(_))));
    }

    #[test]
    fn crashes_have_statuses_of_their_own() {
        assert!(ExitReason::GuestReset.is_clean());
        assert!(ExitReason::GuestPowerOff.is_clean());
        assert!(ExitReason::HostSignal(libc::SIGTERM).is_clean());
        let crashes = [
            ExitReason::GuestPanic("Kernel panic - not syncing: x".into()),
            ExitReason::TripleFault { vcpu: 0, rip: 0 },
            ExitReason::VcpuFailure("x".into()),
        ];
        let mut statuses: Vec<u8> = crashes.iter().map(ExitReason::exit_status).collect();
        assert!(crashes.iter().all(|c| !c.is_clean()));
        statuses.dedup();
        assert_eq!(statuses.len(), 3, "{statuses:?}");
        assert!(!statuses.contains(&exit_status::VMM_ERROR));
    }
}
