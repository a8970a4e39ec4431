//! The shim's configuration file and the sizing of a pod's VM.
//!
//! This module owns `/etc/moat/config.toml` (or the file containerd's
//! runtime options name): which binaries and guest assets a pod uses, the
//! default and maximum VM size, the agent's boot timeout, virtiofsd's
//! options, and which `io.moat.` annotations a pod may set. It also turns a
//! sandbox's OCI annotations (the CRI's `io.kubernetes.cri.sandbox-*` and
//! the allowed `io.moat.*`) into the [`VmSize`] the VM boots with.
//!
//! Sizing follows Kata's rule: the defaults plus the pod's limits (the CPU
//! quota rounded up to whole vCPUs, the memory limit rounded up to MiB),
//! clamped to the maximums, so a pod without limits gets the defaults and
//! no pod gets more than the node's operator allows.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the shim looks when containerd's runtime options name no file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/moat/config.toml";

/// The CRI annotation giving the pod's CPU quota (µs per period; 0 or
/// negative: no limit).
pub const CRI_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
/// The CRI annotation giving the pod's CPU period (µs).
pub const CRI_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
/// The CRI annotation giving the pod's memory limit (bytes; 0: no limit).
pub const CRI_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
/// The prefix of moat's own per-pod annotations.
pub const MOAT_ANNOTATION_PREFIX: &str = "io.moat.";

/// The smallest guest memory the agent and a container can live in.
pub const MIN_MEMORY_MIB: u64 = 64;
/// vCPUs moat-vmm can give one guest.
pub const MAX_VCPUS: u32 = 64;
/// The longest agent boot timeout a config may ask for.
pub const MAX_AGENT_BOOT_TIMEOUT_MS: u64 = 600_000;

/// What went wrong reading the config or sizing a pod.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read moat config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has unknown or mistyped keys.
    #[error("moat config {path} is malformed: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, which names the key and line.
        message: String,
    },
    /// A value is out of range or inconsistent with another.
    #[error("moat config {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },
    /// An annotation's value is not what its key takes.
    #[error("annotation {key}={value:?}: {message}")]
    BadAnnotation {
        /// The annotation key.
        key: String,
        /// Its value.
        value: String,
        /// What it should be.
        message: String,
    },
    /// An `io.moat.` annotation the config does not allow, or moat does
    /// not know.
    #[error("annotation {key} is not allowed: {message}")]
    AnnotationNotAllowed {
        /// The annotation key.
        key: String,
        /// Why (unknown, or not in `[annotations] allowed`).
        message: String,
    },
}

/// The whole config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The VM: binaries, guest assets, sizes and timeouts.
    pub vm: VmConfig,
    /// virtiofsd, which serves each pod's shared directory.
    pub virtiofs: VirtiofsConfig,
    /// Which `io.moat.` annotations pods may set.
    #[serde(default)]
    pub annotations: AnnotationConfig,
    /// How each pod's moat-vmm and virtiofsd are confined.
    #[serde(default)]
    pub jail: JailConfig,
}

/// `[jail]`: moat-vmm runs as `uid`:`gid` with no capabilities, in new
/// mount, PID, IPC and UTS namespaces, pivot_rooted into a per-pod
/// directory; it and virtiofsd share a cgroup of the pod's own under
/// `cgroup_parent` whose `memory.max` is the guest's memory plus
/// `memory_overhead_mib`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailConfig {
    /// moat-vmm's user ID (not 0).
    #[serde(default = "default_jail_id")]
    pub uid: u32,
    /// moat-vmm's group ID (not 0).
    #[serde(default = "default_jail_id")]
    pub gid: u32,
    /// The cgroup v2 directory each pod's cgroup is made under.
    #[serde(default = "default_cgroup_parent")]
    pub cgroup_parent: PathBuf,
    /// What the pod's cgroup may use beyond the guest's memory, MiB: the
    /// VMM's and virtiofsd's own memory and the page cache of the share.
    #[serde(default = "default_memory_overhead_mib")]
    pub memory_overhead_mib: u64,
    /// The most tasks (processes and threads) the pod's cgroup may hold.
    #[serde(default = "default_pids_max")]
    pub pids_max: u32,
}

impl Default for JailConfig {
    fn default() -> Self {
        Self {
            uid: default_jail_id(),
            gid: default_jail_id(),
            cgroup_parent: default_cgroup_parent(),
            memory_overhead_mib: default_memory_overhead_mib(),
            pids_max: default_pids_max(),
        }
    }
}

/// The fewest tasks a pod's cgroup may be limited to: moat-vmm's
/// vCPU and device threads and virtiofsd's.
const MIN_PIDS_MAX: u32 = 32;

fn default_jail_id() -> u32 {
    64_000
}
fn default_cgroup_parent() -> PathBuf {
    PathBuf::from("/sys/fs/cgroup/moat")
}
fn default_memory_overhead_mib() -> u64 {
    160
}
fn default_pids_max() -> u32 {
    256
}

/// `[vm]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The moat-vmm binary.
    pub vmm: PathBuf,
    /// The guest kernel (ELF vmlinux).
    pub kernel: PathBuf,
    /// The guest initramfs, whose /init is moat-agent.
    pub initramfs: PathBuf,
    /// Extra guest kernel command line, appended to moat-vmm's.
    #[serde(default)]
    pub kernel_args: String,
    /// vCPUs of a pod without a CPU limit.
    #[serde(default = "default_vcpus")]
    pub default_vcpus: u32,
    /// Guest memory of a pod without a memory limit, MiB.
    #[serde(default = "default_memory_mib")]
    pub default_memory_mib: u64,
    /// The most vCPUs any pod gets.
    #[serde(default = "default_max_vcpus")]
    pub max_vcpus: u32,
    /// The most guest memory any pod gets, MiB.
    #[serde(default = "default_max_memory_mib")]
    pub max_memory_mib: u64,
    /// How long the agent may take from VMM start to its first answered
    /// health check before the sandbox fails, ms.
    #[serde(default = "default_agent_boot_timeout_ms")]
    pub agent_boot_timeout_ms: u64,
    /// Extra moat-vmm arguments, after the shim's own (debugging, e.g.
    /// `--no-seccomp`).
    #[serde(default)]
    pub vmm_args: Vec<String>,
}

/// `[virtiofs]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtiofsConfig {
    /// The virtiofsd binary (crates.io virtiofsd 1.14).
    pub virtiofsd: PathBuf,
    /// virtiofsd's `--cache`.
    #[serde(default)]
    pub cache: CacheMode,
    /// virtiofsd's `--thread-pool-size` (0: serve requests on the queue
    /// thread, the fastest measured on 2 cores).
    #[serde(default)]
    pub thread_pool_size: u32,
}

/// virtiofsd's cache modes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// `--cache=auto` (virtiofsd's default).
    #[default]
    Auto,
    /// `--cache=never`.
    Never,
    /// `--cache=metadata`.
    Metadata,
    /// `--cache=always`.
    Always,
}

impl CacheMode {
    /// The value virtiofsd's `--cache` takes.
    pub fn as_arg(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Never => "never",
            Self::Metadata => "metadata",
            Self::Always => "always",
        }
    }
}

/// `[annotations]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnnotationConfig {
    /// The `io.moat.` annotations (without the prefix) a pod may set, from
    /// [`OVERRIDABLE`]. None by default: a pod's size then comes only from
    /// its CRI resources.
    #[serde(default)]
    pub allowed: Vec<String>,
}

/// The `io.moat.` annotations moat knows (without the prefix): the pod's
/// vCPUs, its memory in MiB, and the agent boot timeout in ms. Each is
/// still clamped to the config's maximums.
pub const OVERRIDABLE: [&str; 3] = ["vcpus", "memory_mib", "agent_boot_timeout_ms"];

fn default_vcpus() -> u32 {
    1
}
fn default_memory_mib() -> u64 {
    256
}
fn default_max_vcpus() -> u32 {
    4
}
fn default_max_memory_mib() -> u64 {
    8192
}
fn default_agent_boot_timeout_ms() -> u64 {
    30_000
}

/// What a pod's VM boots with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// The agent's boot timeout, ms.
    pub agent_boot_timeout_ms: u64,
}

impl Config {
    /// Reads and checks the config at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and checks config text; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        config.check(path)?;
        Ok(config)
    }

    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let vm = &self.vm;
        for (key, file) in [
            ("vm.vmm", &vm.vmm),
            ("vm.kernel", &vm.kernel),
            ("vm.initramfs", &vm.initramfs),
            ("virtiofs.virtiofsd", &self.virtiofs.virtiofsd),
        ] {
            if !file.is_absolute() {
                return Err(invalid(format!(
                    "{key} = {:?} must be an absolute path",
                    file.display()
                )));
            }
        }
        if vm.default_vcpus == 0 || vm.default_vcpus > vm.max_vcpus {
            return Err(invalid(format!(
                "vm.default_vcpus = {} must be between 1 and vm.max_vcpus ({})",
                vm.default_vcpus, vm.max_vcpus
            )));
        }
        if vm.max_vcpus > MAX_VCPUS {
            return Err(invalid(format!(
                "vm.max_vcpus = {} is more than moat-vmm's {MAX_VCPUS}",
                vm.max_vcpus
            )));
        }
        if vm.default_memory_mib < MIN_MEMORY_MIB || vm.default_memory_mib > vm.max_memory_mib {
            return Err(invalid(format!(
                "vm.default_memory_mib = {} must be between {MIN_MEMORY_MIB} and \
                 vm.max_memory_mib ({})",
                vm.default_memory_mib, vm.max_memory_mib
            )));
        }
        if vm.agent_boot_timeout_ms == 0 || vm.agent_boot_timeout_ms > MAX_AGENT_BOOT_TIMEOUT_MS {
            return Err(invalid(format!(
                "vm.agent_boot_timeout_ms = {} must be between 1 and {MAX_AGENT_BOOT_TIMEOUT_MS}",
                vm.agent_boot_timeout_ms
            )));
        }
        let jail = &self.jail;
        if jail.uid == 0 || jail.gid == 0 {
            return Err(invalid(format!(
                "jail.uid = {} and jail.gid = {} must not be 0: moat-vmm never runs as root",
                jail.uid, jail.gid
            )));
        }
        if !jail.cgroup_parent.is_absolute() {
            return Err(invalid(format!(
                "jail.cgroup_parent = {:?} must be an absolute path",
                jail.cgroup_parent.display()
            )));
        }
        if jail.pids_max < MIN_PIDS_MAX {
            return Err(invalid(format!(
                "jail.pids_max = {} is below {MIN_PIDS_MAX}, too few for moat-vmm's and virtiofsd's threads",
                jail.pids_max
            )));
        }
        for name in &self.annotations.allowed {
            if !OVERRIDABLE.contains(&name.as_str()) {
                return Err(invalid(format!(
                    "annotations.allowed names {name:?}, which moat does not know \
                     (it knows {})",
                    OVERRIDABLE.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// The size of a pod's VM from its sandbox's OCI annotations: the
    /// defaults plus the CRI limits, then the allowed `io.moat.`
    /// overrides, each clamped to the maximums. Refuses an `io.moat.`
    /// annotation that moat does not know or the config does not allow,
    /// and CRI values that are not numbers.
    pub fn vm_size(&self, annotations: &BTreeMap<String, String>) -> Result<VmSize, ConfigError> {
        let vm = &self.vm;
        let mut size = VmSize {
            vcpus: vm.default_vcpus,
            memory_mib: vm.default_memory_mib,
            agent_boot_timeout_ms: vm.agent_boot_timeout_ms,
        };
        let quota = cri_number(annotations, CRI_CPU_QUOTA)?;
        let period = cri_number(annotations, CRI_CPU_PERIOD)?;
        if let (Some(quota), Some(period)) = (quota, period) {
            if quota > 0 && period > 0 {
                let limit = quota.unsigned_abs().div_ceil(period.unsigned_abs());
                size.vcpus = clamp_vcpus(u64::from(size.vcpus).saturating_add(limit), vm);
            }
        }
        if let Some(bytes) = cri_number(annotations, CRI_MEMORY)? {
            if bytes > 0 {
                let mib = bytes.unsigned_abs().div_ceil(1 << 20);
                size.memory_mib = size.memory_mib.saturating_add(mib).min(vm.max_memory_mib);
            }
        }
        for (key, value) in annotations {
            let Some(name) = key.strip_prefix(MOAT_ANNOTATION_PREFIX) else {
                continue;
            };
            if !OVERRIDABLE.contains(&name) {
                return Err(ConfigError::AnnotationNotAllowed {
                    key: key.clone(),
                    message: format!(
                        "moat knows only {}",
                        OVERRIDABLE
                            .map(|n| format!("{MOAT_ANNOTATION_PREFIX}{n}"))
                            .join(", ")
                    ),
                });
            }
            if !self.annotations.allowed.iter().any(|a| a == name) {
                return Err(ConfigError::AnnotationNotAllowed {
                    key: key.clone(),
                    message: "the moat config's [annotations] allowed does not list it".into(),
                });
            }
            let number = value
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| ConfigError::BadAnnotation {
                    key: key.clone(),
                    value: value.clone(),
                    message: "expected a whole number above 0".into(),
                })?;
            match name {
                "vcpus" => size.vcpus = clamp_vcpus(number, vm),
                "memory_mib" => size.memory_mib = number.clamp(MIN_MEMORY_MIB, vm.max_memory_mib),
                _ => size.agent_boot_timeout_ms = number.min(MAX_AGENT_BOOT_TIMEOUT_MS),
            }
        }
        Ok(size)
    }
}

fn clamp_vcpus(vcpus: u64, vm: &VmConfig) -> u32 {
    u32::try_from(vcpus.min(u64::from(vm.max_vcpus))).unwrap_or(vm.max_vcpus)
}

/// A CRI annotation as a signed number, or None when absent.
fn cri_number(
    annotations: &BTreeMap<String, String>,
    key: &str,
) -> Result<Option<i64>, ConfigError> {
    annotations
        .get(key)
        .map(|value| {
            value
                .trim()
                .parse::<i64>()
                .map_err(|e| ConfigError::BadAnnotation {
                    key: key.to_string(),
                    value: value.clone(),
                    message: format!("expected a whole number: {e}"),
                })
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [vm]
        vmm = "/usr/local/bin/moat-vmm"
        kernel = "/usr/local/share/moat/vmlinux"
        initramfs = "/usr/local/share/moat/agent-initramfs.cpio.gz"
        [virtiofs]
        virtiofsd = "/usr/local/libexec/moat/virtiofsd"
    "#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/moat/config.toml"))
    }

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn with_allowed(allowed: &str) -> Config {
        parse(&format!(
            "{MINIMAL}\n[annotations]\nallowed = [{allowed}]\n"
        ))
        .unwrap()
    }

    #[test]
    fn minimal_config_takes_the_defaults() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.vm.default_vcpus, 1);
        assert_eq!(config.vm.default_memory_mib, 256);
        assert_eq!(config.vm.max_vcpus, 4);
        assert_eq!(config.vm.max_memory_mib, 8192);
        assert_eq!(config.vm.agent_boot_timeout_ms, 30_000);
        assert_eq!(config.virtiofs.cache, CacheMode::Auto);
        assert_eq!(config.virtiofs.thread_pool_size, 0);
        assert!(config.annotations.allowed.is_empty());
    }

    #[test]
    fn malformed_config_names_the_file_and_the_key() {
        let err = parse("[vm]\nvmm = 3\n").unwrap_err().to_string();
        assert!(err.contains("/etc/moat/config.toml is malformed"), "{err}");
        assert!(err.contains("vmm"), "{err}");
        let err = parse(&format!("{MINIMAL}\n[extra]\nx = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("extra"), "{err}");
        let err = parse(&MINIMAL.replace("[virtiofs]", "[virtiofs]\ncache = \"sometimes\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sometimes"), "{err}");
    }

    #[test]
    fn inconsistent_values_are_refused_by_key() {
        for (extra, key) in [
            ("default_vcpus = 0", "vm.default_vcpus"),
            ("default_vcpus = 5", "vm.default_vcpus"),
            ("max_vcpus = 100\ndefault_vcpus = 1", "vm.max_vcpus"),
            ("default_memory_mib = 16", "vm.default_memory_mib"),
            ("max_memory_mib = 128", "vm.default_memory_mib"),
            ("agent_boot_timeout_ms = 0", "vm.agent_boot_timeout_ms"),
        ] {
            let text = MINIMAL.replace("[vm]", &format!("[vm]\n{extra}"));
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
        let text = MINIMAL.replace("vmm = \"/usr/local/bin/moat-vmm\"", "vmm = \"moat-vmm\"");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("vm.vmm") && err.contains("absolute"), "{err}");
        let text = format!("{MINIMAL}\n[annotations]\nallowed = [\"kernel\"]\n");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("\"kernel\""), "{err}");
        for (jail, key) in [
            ("uid = 0", "jail.uid"),
            ("gid = 0", "jail.gid"),
            ("cgroup_parent = \"moat\"", "jail.cgroup_parent"),
            ("pids_max = 4", "jail.pids_max"),
        ] {
            let text = format!("{MINIMAL}\n[jail]\n{jail}\n");
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(key), "{jail}: {err}");
        }
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.jail, JailConfig::default());
        assert_ne!(config.jail.uid, 0);
    }

    #[test]
    fn no_limits_gives_the_defaults() {
        let config = parse(MINIMAL).unwrap();
        let size = config.vm_size(&BTreeMap::new()).unwrap();
        assert_eq!(
            size,
            VmSize {
                vcpus: 1,
                memory_mib: 256,
                agent_boot_timeout_ms: 30_000
            }
        );
        // The CRI's "no limit" values.
        let size = config
            .vm_size(&annotations(&[
                (CRI_CPU_QUOTA, "0"),
                (CRI_CPU_PERIOD, "100000"),
                (CRI_MEMORY, "0"),
            ]))
            .unwrap();
        assert_eq!((size.vcpus, size.memory_mib), (1, 256));
        let size = config
            .vm_size(&annotations(&[
                (CRI_CPU_QUOTA, "-1"),
                (CRI_CPU_PERIOD, "100000"),
            ]))
            .unwrap();
        assert_eq!(size.vcpus, 1);
    }

    #[test]
    fn cri_limits_add_to_the_defaults_rounded_up() {
        let config = parse(MINIMAL).unwrap();
        // 1.5 CPUs → 2 more vCPUs; 100 MiB + 1 byte → 101 MiB more.
        let size = config
            .vm_size(&annotations(&[
                (CRI_CPU_QUOTA, "150000"),
                (CRI_CPU_PERIOD, "100000"),
                (CRI_MEMORY, &((100 << 20) + 1).to_string()),
            ]))
            .unwrap();
        assert_eq!((size.vcpus, size.memory_mib), (3, 256 + 101));
    }

    #[test]
    fn cri_limits_are_clamped_to_the_maximums() {
        let config = parse(MINIMAL).unwrap();
        let size = config
            .vm_size(&annotations(&[
                (CRI_CPU_QUOTA, &i64::MAX.to_string()),
                (CRI_CPU_PERIOD, "1"),
                (CRI_MEMORY, &i64::MAX.to_string()),
            ]))
            .unwrap();
        assert_eq!((size.vcpus, size.memory_mib), (4, 8192));
    }

    #[test]
    fn non_numeric_cri_values_are_refused_by_key() {
        let config = parse(MINIMAL).unwrap();
        let err = config
            .vm_size(&annotations(&[(CRI_MEMORY, "1Gi")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains(CRI_MEMORY) && err.contains("1Gi"), "{err}");
    }

    #[test]
    fn moat_annotations_need_the_configs_permission() {
        let config = parse(MINIMAL).unwrap();
        let err = config
            .vm_size(&annotations(&[("io.moat.vcpus", "2")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("io.moat.vcpus") && err.contains("allowed"),
            "{err}"
        );
        let config = with_allowed("\"memory_mib\"");
        assert!(config
            .vm_size(&annotations(&[("io.moat.vcpus", "2")]))
            .is_err());
        let size = config
            .vm_size(&annotations(&[("io.moat.memory_mib", "512")]))
            .unwrap();
        assert_eq!(size.memory_mib, 512);
    }

    #[test]
    fn unknown_moat_annotations_are_refused() {
        let config = with_allowed("\"vcpus\", \"memory_mib\"");
        let err = config
            .vm_size(&annotations(&[("io.moat.kernel", "/tmp/evil")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("io.moat.kernel") && err.contains("knows only"),
            "{err}"
        );
    }

    #[test]
    fn moat_overrides_are_clamped_and_checked() {
        let config = with_allowed("\"vcpus\", \"memory_mib\", \"agent_boot_timeout_ms\"");
        let size = config
            .vm_size(&annotations(&[
                ("io.moat.vcpus", "64"),
                ("io.moat.memory_mib", "1"),
                ("io.moat.agent_boot_timeout_ms", "99999999"),
            ]))
            .unwrap();
        assert_eq!(
            size,
            VmSize {
                vcpus: 4,
                memory_mib: MIN_MEMORY_MIB,
                agent_boot_timeout_ms: MAX_AGENT_BOOT_TIMEOUT_MS
            }
        );
        for bad in ["0", "-1", "two", ""] {
            let err = config
                .vm_size(&annotations(&[("io.moat.vcpus", bad)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains("io.moat.vcpus"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_example_config_parses_to_the_defaults() {
        let example = parse(include_str!("../config.example.toml")).unwrap();
        let minimal = parse(MINIMAL).unwrap();
        assert_eq!(example.vm.kernel_args, "quiet");
        assert_eq!(
            VmConfig {
                kernel_args: String::new(),
                ..example.vm.clone()
            },
            minimal.vm
        );
        assert_eq!(example.virtiofs, minimal.virtiofs);
        assert_eq!(example.annotations, minimal.annotations);
        assert_eq!(example.jail, minimal.jail);
    }

    #[test]
    fn cache_mode_maps_to_virtiofsd_arguments() {
        let text = MINIMAL.replace(
            "[virtiofs]",
            "[virtiofs]\ncache = \"never\"\nthread_pool_size = 4",
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.virtiofs.cache.as_arg(), "never");
        assert_eq!(config.virtiofs.thread_pool_size, 4);
    }
}
