//! moat-vmm's seccomp filters: one default-deny filter per kind of thread
//! (Firecracker's model), each installed by the thread itself before it
//! touches guest input, with `ioctl`, `socket`, `fcntl`, `tgkill` and
//! `prctl` checked down to their arguments. A call outside a thread's
//! filter kills the whole VMM with SIGSYS.
//!
//! Threads inherit their creator's filter, and the kernel runs every
//! filter a thread holds. So device workers and the vhost-user watchdog
//! are started by the main thread (see [`crate::threads`]), whose filter
//! is the union of its children's plus its own, and never by a vCPU;
//! each child then narrows itself to its own.
//!
//! `moat-vmm --no-seccomp` turns the filters off, for debugging only.
//! The hidden `moat-vmm --seccomp-selftest <kind>` makes the named thread
//! kind make a forbidden call (an AF_INET socket) right after its filter
//! is in (the signal thread: at its first SIGUSR1): the test hook that
//! shows each filter kills.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The kinds of thread moat-vmm runs, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The main thread: builds the VM, starts device threads for the
    /// vCPUs, waits, and tears everything down.
    Main,
    /// The thread that waits for SIGTERM, SIGINT and SIGUSR1.
    Signals,
    /// A vCPU: runs the guest and emulates its port and MMIO accesses,
    /// including device activation.
    Vcpu,
    /// A virtio-block or virtio-rng worker.
    QueueWorker,
    /// The virtio-net worker (tap and queues).
    Net,
    /// The vsock muxer (host Unix sockets and queues).
    Vsock,
    /// A virtio-fs share's worker (watches the vhost-user backend).
    Fs,
    /// The watchdog of one vhost-user exchange.
    VhostWatchdog,
}

impl ThreadKind {
    /// Every kind, in a fixed order.
    pub const ALL: [ThreadKind; 8] = [
        ThreadKind::Main,
        ThreadKind::Signals,
        ThreadKind::Vcpu,
        ThreadKind::QueueWorker,
        ThreadKind::Net,
        ThreadKind::Vsock,
        ThreadKind::Fs,
        ThreadKind::VhostWatchdog,
    ];

    /// The kind a name (as [`ThreadKind::name`] spells it) stands for.
    pub fn from_name(name: &str) -> Option<ThreadKind> {
        ThreadKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The kind's name, as `--seccomp-selftest` and reports spell it.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Signals => "signals",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::QueueWorker => "queue-worker",
            ThreadKind::Net => "net",
            ThreadKind::Vsock => "vsock",
            ThreadKind::Fs => "fs",
            ThreadKind::VhostWatchdog => "vhost-watchdog",
        }
    }
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter's rules are malformed (a bug in this module).
    #[error("seccomp filter of the {kind} thread: {source}")]
    Build {
        /// The thread kind.
        kind: &'static str,
        /// What seccompiler said.
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter of the {kind} thread: {source}")]
    Install {
        /// The thread kind.
        kind: &'static str,
        /// What seccompiler said.
        source: seccompiler::Error,
    },
}

/// Whether filters are installed, and what a violation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Filters on: a violation kills the VMM (`moat-vmm`'s default).
    Kill,
    /// Filters on, but a violation is only logged by the kernel (audit
    /// type 1326); for finding what a filter lacks.
    Log,
    /// No filters (`--no-seccomp`, and the library's default).
    Off,
}

/// Off until the `moat-vmm` binary turns filters on: tests and fuzz
/// targets that drive devices in their own process keep no filters.
static MODE: AtomicU8 = AtomicU8::new(2);

/// Sets the mode for every filter installed from now on.
pub fn set_mode(mode: Mode) {
    MODE.store(
        match mode {
            Mode::Kill => 0,
            Mode::Log => 1,
            Mode::Off => 2,
        },
        Ordering::SeqCst,
    );
}

/// The mode filters are installed in.
pub fn mode() -> Mode {
    match MODE.load(Ordering::SeqCst) {
        0 => Mode::Kill,
        1 => Mode::Log,
        _ => Mode::Off,
    }
}

static SELFTEST: OnceLock<ThreadKind> = OnceLock::new();

/// Makes threads of `kind` break their filter once it is installed (the
/// self-test); set once, before the VM starts.
pub fn set_selftest(kind: ThreadKind) {
    let _ = SELFTEST.set(kind);
}

fn selftest_kind() -> Option<ThreadKind> {
    SELFTEST.get().copied()
}

/// Installs `kind`'s filter on the calling thread (unless the mode is
/// [`Mode::Off`]). For the self-test, the thread then makes a call no
/// filter allows.
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    let action = match mode() {
        Mode::Off => return Ok(()),
        Mode::Kill => SeccompAction::KillProcess,
        Mode::Log => SeccompAction::Log,
    };
    let program = program(kind, action)?;
    seccompiler::apply_filter(&program).map_err(|source| SeccompError::Install {
        kind: kind.name(),
        source,
    })?;
    // The signal thread's test waits for SIGUSR1, so that a running VM
    // (a pod with tasks) can be made to break its filter.
    if kind != ThreadKind::Signals {
        selftest_point(kind);
    }
    Ok(())
}

/// For the self-test: if `kind` is the kind under test, makes a call no
/// filter allows (the thread's filter should kill the VMM there).
pub fn selftest_point(kind: ThreadKind) {
    if selftest_kind() == Some(kind) {
        crate::log_line!(
            "moat-vmm: seccomp self-test: the {} thread opens an AF_INET socket",
            kind.name()
        );
        // SAFETY: socket takes no pointers; a leaked fd does not matter
        // in a process that is meant to die here.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        crate::log_line!(
            "moat-vmm: seccomp self-test: the {} thread is still alive",
            kind.name()
        );
    }
}

/// How many system calls `kind`'s filter lets through (each counted
/// once, whatever its argument rules).
pub fn syscall_count(kind: ThreadKind) -> usize {
    rules(kind).len()
}

/// `kind`'s filter, compiled to BPF, with `mismatch` for calls outside it.
pub fn program(kind: ThreadKind, mismatch: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let build = |source| SeccompError::Build {
        kind: kind.name(),
        source,
    };
    let filter = SeccompFilter::new(
        rules(kind),
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    filter.try_into().map_err(build)
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

fn allow(rules: &mut Rules, calls: &[libc::c_long]) {
    for &call in calls {
        rules.insert(call, Vec::new());
    }
}

/// One rule: argument `index` equals `value`.
fn arg_eq(index: u8, value: u64) -> SeccompRule {
    let condition = SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
        .unwrap_or_else(|e| unreachable!("argument index {index} is below 6: {e}"));
    SeccompRule::new(vec![condition]).unwrap_or_else(|e| unreachable!("one condition: {e}"))
}

/// Adds rules letting `call` through when argument `index` is one of `values`.
fn allow_arg(rules: &mut Rules, call: libc::c_long, index: u8, values: &[u64]) {
    let entry = rules.entry(call).or_default();
    entry.extend(values.iter().map(|&v| arg_eq(index, v)));
}

/// ioctl request numbers (`_IO`, `_IOR`, `_IOW` of <asm-generic/ioctl.h>).
mod ioctls {
    const fn io(kind: u64, nr: u64) -> u64 {
        (kind << 8) | nr
    }
    const fn ior(kind: u64, nr: u64, size: usize) -> u64 {
        (2 << 30) | ((size as u64) << 16) | (kind << 8) | nr
    }
    const fn iow(kind: u64, nr: u64, size: usize) -> u64 {
        (1 << 30) | ((size as u64) << 16) | (kind << 8) | nr
    }
    const KVMIO: u64 = 0xae;
    /// Runs the vCPU.
    pub const KVM_RUN: u64 = io(KVMIO, 0x80);
    /// Reads the general registers (triple-fault and state reports).
    pub const KVM_GET_REGS: u64 = ior(KVMIO, 0x81, std::mem::size_of::<kvm_bindings::kvm_regs>());
    /// Reads the special registers (state reports).
    pub const KVM_GET_SREGS: u64 = ior(KVMIO, 0x83, std::mem::size_of::<kvm_bindings::kvm_sregs>());
    /// Sets a tap's offloads, when a virtio-net driver accepts features.
    pub const TUNSETOFFLOAD: u64 = iow(b'T' as u64, 208, std::mem::size_of::<u32>());
    /// Sets or clears a file's O_NONBLOCK (std's `set_nonblocking`).
    pub const FIONBIO: u64 = 0x5421;
}

/// What every thread needs: memory for the allocator, locks, time,
/// stderr and eventfd writes, signal returns, and ending the thread (or,
/// on a panic, aborting the process with SIGABRT sent to itself).
fn common(rules: &mut Rules) {
    allow(
        rules,
        &[
            libc::SYS_brk,
            libc::SYS_mmap,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_mprotect,
            libc::SYS_madvise,
            libc::SYS_futex,
            libc::SYS_sched_yield,
            libc::SYS_clock_gettime,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            libc::SYS_restart_syscall,
            libc::SYS_rt_sigreturn,
            libc::SYS_rt_sigprocmask,
            libc::SYS_sigaltstack,
            libc::SYS_getrandom,
            libc::SYS_write,
            libc::SYS_close,
            libc::SYS_gettid,
            libc::SYS_getpid,
            // A panic's report asks for it; the panic should end in its
            // own SIGABRT with its message, not in SIGSYS.
            libc::SYS_getcwd,
            libc::SYS_exit,
            libc::SYS_exit_group,
        ],
    );
    // Debug builds of std check that an fd is open before closing it.
    allow_arg(rules, libc::SYS_fcntl, 1, &[libc::F_GETFD as u64]);
    // Signals only to this process: abort's SIGABRT, and the vCPU kick.
    // SAFETY: getpid takes no arguments and cannot fail.
    let pid = unsafe { libc::getpid() } as u64;
    allow_arg(rules, libc::SYS_tgkill, 0, &[pid]);
}

/// The calls of an epoll loop over eventfds.
fn event_loop(rules: &mut Rules) {
    allow(
        rules,
        &[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_read,
        ],
    );
}

fn rules(kind: ThreadKind) -> Rules {
    let mut rules = Rules::new();
    common(&mut rules);
    match kind {
        ThreadKind::Main => {
            // It starts every device thread, so it holds their calls too
            // (a child runs its creator's filter as well as its own).
            for child in [
                ThreadKind::QueueWorker,
                ThreadKind::Net,
                ThreadKind::Vsock,
                ThreadKind::Fs,
                ThreadKind::VhostWatchdog,
            ] {
                for (call, chain) in rules_of_child(child) {
                    merge(&mut rules, call, chain);
                }
            }
            // Starting a thread, which then names itself and installs its
            // own filter.
            allow(
                &mut rules,
                &[
                    libc::SYS_clone,
                    libc::SYS_clone3,
                    libc::SYS_set_robust_list,
                    libc::SYS_rseq,
                    libc::SYS_sched_getaffinity,
                    libc::SYS_seccomp,
                ],
            );
            allow_arg(
                &mut rules,
                libc::SYS_prctl,
                0,
                &[libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64],
            );
            // Teardown: sockets it made are removed, and virtio-fs says
            // goodbye to virtiofsd (its exchange's watchdog holds a copy
            // of the socket).
            allow(&mut rules, &[libc::SYS_unlink, libc::SYS_unlinkat]);
            allow_arg(
                &mut rules,
                libc::SYS_fcntl,
                1,
                &[libc::F_DUPFD_CLOEXEC as u64],
            );
        }
        ThreadKind::Signals => {
            allow(&mut rules, &[libc::SYS_rt_sigtimedwait]);
        }
        ThreadKind::Vcpu => {
            allow_arg(
                &mut rules,
                libc::SYS_ioctl,
                1,
                &[
                    ioctls::KVM_RUN,
                    ioctls::KVM_GET_REGS,
                    ioctls::KVM_GET_SREGS,
                    ioctls::TUNSETOFFLOAD,
                ],
            );
            // Device activation runs here: a worker's eventfd and epoll
            // set, a copy of the vsock listener, and the vhost-user
            // exchange with virtiofsd (its thread comes from the main
            // thread, by a channel).
            allow(
                &mut rules,
                &[
                    libc::SYS_read,
                    libc::SYS_eventfd2,
                    libc::SYS_epoll_create1,
                    libc::SYS_epoll_ctl,
                    libc::SYS_sendmsg,
                    libc::SYS_recvmsg,
                    libc::SYS_recvfrom,
                    libc::SYS_sendto,
                ],
            );
            allow_arg(
                &mut rules,
                libc::SYS_fcntl,
                1,
                &[libc::F_DUPFD_CLOEXEC as u64, libc::F_GETFL as u64],
            );
        }
        other => {
            for (call, chain) in rules_of_child(other) {
                merge(&mut rules, call, chain);
            }
        }
    }
    rules
}

/// A device thread's own calls, beyond [`common`].
fn rules_of_child(kind: ThreadKind) -> Rules {
    let mut rules = Rules::new();
    match kind {
        ThreadKind::QueueWorker => {
            event_loop(&mut rules);
            allow(
                &mut rules,
                &[
                    libc::SYS_pread64,
                    libc::SYS_pwrite64,
                    libc::SYS_preadv,
                    libc::SYS_pwritev,
                    libc::SYS_fdatasync,
                    libc::SYS_fsync,
                ],
            );
        }
        ThreadKind::Net => {
            event_loop(&mut rules);
            allow(&mut rules, &[libc::SYS_readv, libc::SYS_writev]);
        }
        ThreadKind::Vsock => {
            event_loop(&mut rules);
            allow(
                &mut rules,
                &[
                    libc::SYS_accept4,
                    libc::SYS_connect,
                    libc::SYS_recvfrom,
                    libc::SYS_sendto,
                    libc::SYS_shutdown,
                ],
            );
            allow_arg(&mut rules, libc::SYS_socket, 0, &[libc::AF_UNIX as u64]);
            allow_arg(&mut rules, libc::SYS_ioctl, 1, &[ioctls::FIONBIO]);
        }
        ThreadKind::Fs => {
            event_loop(&mut rules);
            allow(
                &mut rules,
                &[
                    libc::SYS_sendmsg,
                    libc::SYS_recvmsg,
                    libc::SYS_recvfrom,
                    libc::SYS_sendto,
                    libc::SYS_shutdown,
                ],
            );
        }
        ThreadKind::VhostWatchdog => {
            allow(&mut rules, &[libc::SYS_shutdown]);
        }
        ThreadKind::Main | ThreadKind::Signals | ThreadKind::Vcpu => {}
    }
    rules
}

/// Adds `chain` for `call`: an unconditional allow (empty chain) wins
/// over argument rules.
fn merge(rules: &mut Rules, call: i64, chain: Vec<SeccompRule>) {
    match rules.get_mut(&call) {
        Some(existing) if existing.is_empty() => {}
        Some(_) if chain.is_empty() => {
            rules.insert(call, chain);
        }
        Some(existing) => existing.extend(chain),
        None => {
            rules.insert(call, chain);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles() {
        for kind in ThreadKind::ALL {
            let program = program(kind, SeccompAction::KillProcess).unwrap();
            assert!(!program.is_empty(), "{}", kind.name());
            assert!(syscall_count(kind) > 10, "{}", kind.name());
            println!(
                "{}: {} system calls, {} BPF instructions",
                kind.name(),
                syscall_count(kind),
                program.len()
            );
        }
    }

    #[test]
    fn the_main_filter_holds_every_call_of_the_threads_it_starts() {
        let main = rules(ThreadKind::Main);
        for kind in [
            ThreadKind::QueueWorker,
            ThreadKind::Net,
            ThreadKind::Vsock,
            ThreadKind::Fs,
            ThreadKind::VhostWatchdog,
        ] {
            for call in rules(kind).keys() {
                assert!(
                    main.contains_key(call),
                    "main lacks syscall {call} of {}",
                    kind.name()
                );
            }
        }
    }

    #[test]
    fn no_thread_may_open_a_network_socket_or_exec() {
        for kind in ThreadKind::ALL {
            let rules = rules(kind);
            assert!(!rules.contains_key(&libc::SYS_execve), "{}", kind.name());
            assert!(!rules.contains_key(&libc::SYS_ptrace), "{}", kind.name());
            if let Some(chain) = rules.get(&libc::SYS_socket) {
                assert!(!chain.is_empty(), "{}: socket unchecked", kind.name());
            }
        }
    }

    /// Runs `body` on a fresh thread under `kind`'s filter with the
    /// violation action `Errno(EPERM)`, so a refused call is visible
    /// without killing the test process.
    fn under_filter<T: Send + 'static>(
        kind: ThreadKind,
        body: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        std::thread::spawn(move || {
            let program = program(kind, SeccompAction::Errno(libc::EPERM as u32)).unwrap();
            seccompiler::apply_filter(&program).unwrap();
            body()
        })
        .join()
        .unwrap()
    }

    #[test]
    fn a_vsock_thread_may_open_unix_sockets_but_not_inet_ones() {
        let (unix, inet) = under_filter(ThreadKind::Vsock, || {
            // SAFETY: socket takes no pointers; both fds are closed below.
            let unix = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            // SAFETY: as above.
            let inet = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            let errno = std::io::Error::last_os_error().raw_os_error();
            for fd in [unix, inet] {
                if fd >= 0 {
                    // SAFETY: fd is ours.
                    unsafe { libc::close(fd) };
                }
            }
            (unix, (inet, errno))
        });
        assert!(unix >= 0);
        assert_eq!(inet, (-1, Some(libc::EPERM)));
    }

    #[test]
    fn a_vcpu_thread_may_not_use_ioctls_it_has_no_need_for() {
        let errno = under_filter(ThreadKind::Vcpu, || {
            // TIOCGWINSZ on stderr: an ioctl outside the vCPU's list.
            let mut size: libc::winsize =
                // SAFETY: winsize is plain old data.
                unsafe { std::mem::zeroed() };
            // SAFETY: TIOCGWINSZ writes one winsize into `size`.
            let rc = unsafe { libc::ioctl(2, libc::TIOCGWINSZ, &mut size) };
            (rc, std::io::Error::last_os_error().raw_os_error())
        });
        assert_eq!(errno, (-1, Some(libc::EPERM)));
    }
}
