//! The host's KVM and one VM on it: opening `/dev/kvm` (and refusing one
//! that cannot run an ordinary guest), creating the VM with its in-kernel
//! interrupt controllers and PIT.

use std::path::Path;

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};

use crate::arch::x86_64::layout::KVM_TSS_ADDRESS;

const KVM_DEVICE: &str = "/dev/kvm";
const KVM_API_VERSION: i32 = 12;

/// What the host's `/dev/kvm` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmHostKind {
    /// Backed by VT-x or AMD-V: runs ordinary guests.
    Hardware,
    /// PVM (pagetable-based virtual machine, module `kvm_pvm`): runs only
    /// PVM-enabled guest kernels.
    Pvm,
    /// No `vmx` or `svm` CPU flag: whatever serves `/dev/kvm` emulates.
    NoHardwareVirtualization,
}

/// Classifies the host from its loaded modules and its CPU flags.
pub fn kvm_host_kind(sys_module: &Path, cpuinfo: &str) -> KvmHostKind {
    if sys_module.join("kvm_pvm").exists() {
        return KvmHostKind::Pvm;
    }
    let has_flag = |flag: &str| {
        cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == flag))
    };
    if has_flag("vmx") || has_flag("svm") {
        KvmHostKind::Hardware
    } else {
        KvmHostKind::NoHardwareVirtualization
    }
}

/// Errors opening KVM or creating a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open {KVM_DEVICE}: {0} (is KVM enabled and the kvm module loaded, and may this user open it?)")]
    OpenKvm(kvm_ioctls::Error),
    /// The host's KVM is PVM.
    #[error(
        "{KVM_DEVICE} on this host is PVM (module kvm_pvm), which runs only PVM-enabled guest kernels \
         and cannot boot an ordinary Linux guest; run moat-vmm on a host with VT-x or AMD-V, or \
         inside the KVM test harness (tests/harness/kvm-run)"
    )]
    PvmHost,
    /// The host CPU lacks hardware virtualization.
    #[error(
        "this host's CPU has no VT-x or AMD-V (no vmx or svm flag in /proc/cpuinfo), so {KVM_DEVICE} \
         cannot run an ordinary guest; run moat-vmm on a host with hardware virtualization, or \
         inside the KVM test harness (tests/harness/kvm-run)"
    )]
    NoHardwareVirtualization,
    /// The KVM API version is not the stable one.
    #[error("KVM API version {0} is not the supported version {KVM_API_VERSION}")]
    ApiVersion(i32),
    /// KVM lacks a capability the VMM relies on.
    #[error("KVM lacks the capability {0}, which moat-vmm needs")]
    MissingCapability(&'static str),
    /// A VM set-up ioctl failed.
    #[error("cannot {what}: {source}")]
    Setup {
        /// The step that failed.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
}

const REQUIRED_CAPS: [(Cap, &str); 7] = [
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
];

/// Opens `/dev/kvm` after checking that the host can run an ordinary guest,
/// and checks the API version and capabilities moat-vmm relies on.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    match kvm_host_kind(Path::new("/sys/module"), &cpuinfo) {
        KvmHostKind::Hardware => {}
        KvmHostKind::Pvm => return Err(VmError::PvmHost),
        KvmHostKind::NoHardwareVirtualization => return Err(VmError::NoHardwareVirtualization),
    }
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION {
        return Err(VmError::ApiVersion(version));
    }
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCapability(name));
        }
    }
    Ok(kvm)
}

/// Creates a VM with the in-kernel IOAPIC, PIC and PIT, and the TSS that
/// Intel hosts need.
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    let setup = |what| move |source| VmError::Setup { what, source };
    let vm = kvm.create_vm().map_err(setup("create a KVM VM"))?;
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(setup("set the TSS address"))?;
    vm.create_irq_chip()
        .map_err(setup("create the in-kernel interrupt controllers"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(setup("create the in-kernel PIT"))?;
    Ok(vm)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn modules(names: &[&str]) -> tempdir::TempDir {
        let dir = tempdir::TempDir::new();
        for name in names {
            std::fs::create_dir(dir.path().join(name)).unwrap();
        }
        dir
    }

    /// A throwaway directory for the test's fake `/sys/module`.
    mod tempdir {
        use std::path::{Path, PathBuf};
        pub struct TempDir(PathBuf);
        impl TempDir {
            pub fn new() -> Self {
                let dir = std::env::temp_dir().join(format!(
                    "moat-vm-test-{}-{:?}",
                    std::process::id(),
                    std::thread::current().id()
                ));
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir).unwrap();
                Self(dir)
            }
            pub fn path(&self) -> &Path {
                &self.0
            }
        }
        impl Drop for TempDir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    const SVM_CPU: &str = "processor\t: 0\nflags\t\t: fpu vme svm npt\n";
    const PLAIN_CPU: &str = "processor\t: 0\nflags\t\t: fpu vme hypervisor\n";

    #[test]
    fn pvm_module_means_pvm_even_with_svm_flags() {
        let dir = modules(&["kvm", "kvm_pvm"]);
        assert_eq!(kvm_host_kind(dir.path(), SVM_CPU), KvmHostKind::Pvm);
    }

    #[test]
    fn svm_or_vmx_flag_means_hardware() {
        let dir = modules(&["kvm", "kvm_amd"]);
        assert_eq!(kvm_host_kind(dir.path(), SVM_CPU), KvmHostKind::Hardware);
        let vmx = SVM_CPU.replace("svm", "vmx");
        assert_eq!(kvm_host_kind(dir.path(), &vmx), KvmHostKind::Hardware);
    }

    #[test]
    fn no_virtualization_flag_is_detected() {
        let dir = modules(&["kvm"]);
        assert_eq!(
            kvm_host_kind(dir.path(), PLAIN_CPU),
            KvmHostKind::NoHardwareVirtualization
        );
        // A flag name inside another word does not count.
        let tricky = "flags\t\t: fpu svm_lock\n";
        assert_eq!(
            kvm_host_kind(dir.path(), tricky),
            KvmHostKind::NoHardwareVirtualization
        );
    }

    #[test]
    fn pvm_error_tells_what_to_do() {
        let msg = VmError::PvmHost.to_string();
        assert!(msg.contains("PVM"), "{msg}");
        assert!(msg.contains("tests/harness/kvm-run"), "{msg}");
    }
}
