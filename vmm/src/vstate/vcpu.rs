//! vCPUs: their boot configuration, their run loop on a named thread of
//! their own, how the VMM kicks them out of the guest to stop them, and
//! the registers each reports on request (the SIGUSR1 state report).

use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{CpuId, Msrs, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::x86_64::{cpuid, interrupts, msr, regs};
use crate::devices::Bus;
use crate::shutdown::{ExitReason, StopSignal};

/// Bumped to ask every vCPU thread to print its registers (the VMM's
/// state report, SIGUSR1); each thread prints once per new value.
static REGS_REQUEST: AtomicU64 = AtomicU64::new(0);

/// Asks the vCPU threads `threads` (their pthread IDs) to print their
/// registers on stderr: kicks them out of `KVM_RUN`, so that even a vCPU
/// that KVM keeps busy in the kernel answers.
pub fn request_register_report(threads: &[libc::pthread_t]) {
    REGS_REQUEST.fetch_add(1, Ordering::SeqCst);
    for thread in threads {
        // SAFETY: the IDs are of vCPU threads that have not been joined
        // (the VM clears the list under the report's lock before it joins
        // them), so each ID is valid, if perhaps of a thread that has just
        // ended; the kick signal's handler does nothing.
        unsafe { libc::pthread_kill(*thread, kick_signal()) };
    }
}

/// How long `stop_vcpus` keeps kicking a vCPU thread before giving up on it.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);
const KICK_INTERVAL: Duration = Duration::from_millis(5);

/// Errors creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {index}: cannot {what}: {source}")]
    Kvm {
        /// The vCPU's index.
        index: u8,
        /// The step that failed.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer MSRs than it was given.
    #[error("vCPU {index}: KVM set only {set} of {wanted} boot MSRs")]
    Msrs {
        /// The vCPU's index.
        index: u8,
        /// How many KVM set.
        set: usize,
        /// How many were given.
        wanted: usize,
    },
    /// The boot state could not be written to guest memory.
    #[error("vCPU {index}: {source}")]
    BootState {
        /// The vCPU's index.
        index: u8,
        /// What failed.
        source: regs::RegsError,
    },
    /// The vCPU kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    KickHandler(vmm_sys_util::errno::Error),
    /// The vCPU thread could not be started.
    #[error("vCPU {index}: cannot start its thread: {source}")]
    Spawn {
        /// The vCPU's index.
        index: u8,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The buses a vCPU routes its I/O exits to.
#[derive(Clone)]
pub struct Buses {
    /// Port I/O.
    pub pio: Bus,
    /// Memory-mapped I/O.
    pub mmio: Bus,
}

/// What a vCPU needs to know about the VM to configure itself.
#[derive(Debug, Clone, Copy)]
pub struct BootSpec {
    /// Guest physical address of the kernel's 64-bit entry point.
    pub entry: u64,
    /// How many vCPUs the VM has.
    pub vcpu_count: u8,
    /// Whether KVM emulates the TSC-deadline timer.
    pub tsc_deadline: bool,
}

/// One vCPU, ready to run.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
}

impl Vcpu {
    /// Creates vCPU `index` in `vm`.
    pub fn new(vm: &VmFd, index: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Kvm {
                index,
                what: "create it",
                source,
            })?;
        Ok(Self { index, fd })
    }

    fn kvm_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let index = self.index;
        move |source| VcpuError::Kvm {
            index,
            what,
            source,
        }
    }

    /// Gives the vCPU its CPUID, MSRs, LAPIC and — for the boot vCPU — the
    /// registers of the kernel's 64-bit entry. Other vCPUs wait for the
    /// kernel's INIT/SIPI like real application processors.
    pub fn configure(
        &self,
        mem: &GuestMemoryMmap,
        supported_cpuid: &CpuId,
        spec: BootSpec,
    ) -> Result<(), VcpuError> {
        let mut cpuid = supported_cpuid.clone();
        cpuid::apply_vcpu_cpuid(
            cpuid.as_mut_slice(),
            cpuid::VcpuTopology {
                index: self.index,
                count: spec.vcpu_count,
                tsc_deadline: spec.tsc_deadline,
            },
        );
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.kvm_err("set its CPUID"))?;

        let entries = msr::boot_msr_entries();
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Msrs {
            index: self.index,
            set: 0,
            wanted: entries.len(),
        })?;
        let set = self
            .fd
            .set_msrs(&msrs)
            .map_err(self.kvm_err("set its MSRs"))?;
        if set != entries.len() {
            return Err(VcpuError::Msrs {
                index: self.index,
                set,
                wanted: entries.len(),
            });
        }

        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(self.kvm_err("read its LAPIC"))?;
        interrupts::set_lint(&mut lapic);
        self.fd
            .set_lapic(&lapic)
            .map_err(self.kvm_err("set its LAPIC"))?;

        if self.index == 0 {
            self.fd
                .set_regs(&regs::boot_regs(spec.entry))
                .map_err(self.kvm_err("set its registers"))?;
            self.fd
                .set_fpu(&regs::boot_fpu())
                .map_err(self.kvm_err("set its FPU"))?;
            let sregs = self
                .fd
                .get_sregs()
                .map_err(self.kvm_err("read its special registers"))?;
            let sregs =
                regs::setup_boot_sregs(mem, sregs).map_err(|source| VcpuError::BootState {
                    index: self.index,
                    source,
                })?;
            self.fd
                .set_sregs(&sregs)
                .map_err(self.kvm_err("set its special registers"))?;
        }
        Ok(())
    }

    /// Runs the vCPU on a thread named `moat_vcpu<N>` until `stop` is raised.
    pub fn start(self, buses: Buses, stop: StopSignal) -> Result<JoinHandle<()>, VcpuError> {
        let index = self.index;
        std::thread::Builder::new()
            .name(format!("moat_vcpu{index}"))
            .spawn(move || self.run_loop(&buses, &stop))
            .map_err(|source| VcpuError::Spawn { index, source })
    }

    /// Prints where the guest is on this vCPU, for the state report.
    fn report_registers(&self, exits: u64) {
        let index = self.index;
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => crate::log_line!(
                "moat-vmm: state: vCPU {index}: rip {:#x} rsp {:#x} rflags {:#x} rax {:#x} rcx {:#x} \
                 rdx {:#x} rsi {:#x} rdi {:#x} cs {:#x} cr0 {:#x} cr3 {:#x} efer {:#x}; \
                 {exits} exits to the VMM so far",
                r.rip, r.rsp, r.rflags, r.rax, r.rcx, r.rdx, r.rsi, r.rdi, s.cs.selector, s.cr0,
                s.cr3, s.efer
            ),
            (Err(e), _) | (_, Err(e)) => {
                crate::log_line!("moat-vmm: state: vCPU {index}: cannot read its registers: {e}")
            }
        }
    }

    fn run_loop(mut self, buses: &Buses, stop: &StopSignal) {
        let index = self.index;
        let fail =
            |what: String| stop.raise(ExitReason::VcpuFailure(format!("vCPU {index}: {what}")));
        // Device threads this vCPU activates are started by the main
        // thread, so they never hold this thread's filter.
        crate::threads::route_to_spawner();
        if let Err(e) = crate::seccomp::apply(crate::seccomp::ThreadKind::Vcpu) {
            fail(e.to_string());
            return;
        }
        let mut reported = REGS_REQUEST.load(Ordering::SeqCst);
        let mut exits = 0u64;
        while !stop.is_raised() {
            let request = REGS_REQUEST.load(Ordering::Relaxed);
            if request != reported {
                reported = request;
                self.report_registers(exits);
            }
            exits += 1;
            match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => buses.pio.read(u64::from(port), data),
                Ok(VcpuExit::IoOut(port, data)) => buses.pio.write(u64::from(port), data),
                Ok(VcpuExit::MmioRead(addr, data)) => buses.mmio.read(addr, data),
                Ok(VcpuExit::MmioWrite(addr, data)) => buses.mmio.write(addr, data),
                Ok(VcpuExit::Intr) => {}
                // A triple fault resets a PC; for a microVM it is a crash
                // (Linux's reboot=t ends this way on purpose, and still
                // gets the crash status: the guest's own choice of death).
                Ok(VcpuExit::Shutdown) => {
                    let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or_default();
                    crate::log_line!("moat-vmm: vCPU {index}: triple fault at rip {rip:#x}");
                    stop.raise(ExitReason::TripleFault {
                        vcpu: usize::from(index),
                        rip,
                    });
                }
                // With the in-kernel LAPIC KVM handles HLT itself; an exit
                // here means the guest halted for good.
                Ok(VcpuExit::Hlt) => stop.raise(ExitReason::GuestPowerOff),
                Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => stop.raise(ExitReason::GuestPowerOff),
                    KVM_SYSTEM_EVENT_RESET => stop.raise(ExitReason::GuestReset),
                    other => fail(format!("unexpected system event {other}")),
                },
                Ok(VcpuExit::FailEntry(reason, cpu)) => fail(format!(
                    "KVM could not enter the guest (hardware entry failure reason {reason:#x} on host CPU {cpu})"
                )),
                Ok(VcpuExit::InternalError) => {
                    let suberror = internal_error_suberror(&mut self.fd);
                    fail(format!(
                        "KVM internal error (suberror {suberror}{}); the guest cannot continue",
                        if suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
                            ": instruction emulation failed"
                        } else {
                            ""
                        }
                    ))
                }
                Ok(other) => fail(format!("unexpected KVM exit {other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => fail(format!("KVM_RUN failed: {e}")),
            }
        }
    }
}

fn internal_error_suberror(fd: &mut VcpuFd) -> u32 {
    let run = fd.get_kvm_run();
    // SAFETY: KVM filled the `internal` member of the exit union, since the
    // exit reason is KVM_EXIT_INTERNAL_ERROR; it is plain old data.
    unsafe { run.__bindgen_anon_1.internal.suberror }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the (empty) handler whose delivery interrupts `KVM_RUN`.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), kick_handler).map_err(VcpuError::KickHandler)
}

/// Stops the vCPU threads after `stop` was raised: kicks each one out of
/// the guest until it notices, and joins it. Returns how many threads did
/// not stop in time (they die with the process).
pub fn stop_vcpus(threads: Vec<JoinHandle<()>>) -> usize {
    let deadline = Instant::now() + STOP_TIMEOUT;
    let mut stuck = 0;
    for thread in threads {
        // A kick can land just before the thread enters KVM_RUN, so repeat it.
        while !thread.is_finished() && Instant::now() < deadline {
            let _ = thread.kill(kick_signal());
            std::thread::sleep(KICK_INTERVAL);
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            stuck += 1;
        }
    }
    stuck
}
