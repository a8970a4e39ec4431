//! sandbox-check: the shim's pod VM (`moat_shim::sandbox`) end to end on a
//! KVM host: a pod boots from a config file with its CRI-derived size,
//! a container runs from a rootfs and a volume that reach the guest over
//! virtio-fs, and teardown leaves no process, mount or file. Then the two
//! failed boots: an agent that never answers (timeout) and a guest that
//! dies at boot (the VMM's exit with the console's last words), each
//! leaving nothing. Last, a pod whose shim died without teardown is
//! removed by `cleanup` (containerd's `delete` action), twice over.
//!
//!   sandbox-check --vmm V --kernel K --initramfs I --virtiofsd F --work DIR
//!
//! Prints `PASS name` or `FAIL name: why` per scenario; exits 1 on any FAIL.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use moat_protocol::agent::*;
use moat_shim::config::{Config, CRI_CPU_PERIOD, CRI_CPU_QUOTA, CRI_MEMORY};
use moat_shim::mounts::{mount_points_below, mount_rootfs, unmount_all_below, RootfsMount};
use moat_shim::sandbox::{Sandbox, SandboxError};

#[derive(Debug, Parser)]
struct Args {
    /// moat-vmm.
    #[arg(long)]
    vmm: PathBuf,
    /// The guest kernel.
    #[arg(long)]
    kernel: PathBuf,
    /// The agent initramfs.
    #[arg(long)]
    initramfs: PathBuf,
    /// virtiofsd.
    #[arg(long)]
    virtiofsd: PathBuf,
    /// A scratch directory (made, and removed at the end).
    #[arg(long)]
    work: PathBuf,
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(60_000_000_000)
}

fn config(args: &Args, kernel_args: &str, boot_timeout_ms: u64) -> Result<Config, String> {
    let text = format!(
        r#"
        [vm]
        vmm = {vmm:?}
        kernel = {kernel:?}
        initramfs = {initramfs:?}
        kernel_args = {kernel_args:?}
        default_vcpus = 1
        default_memory_mib = 256
        max_vcpus = 2
        max_memory_mib = 1024
        agent_boot_timeout_ms = {boot_timeout_ms}
        [virtiofs]
        virtiofsd = {virtiofsd:?}
        "#,
        vmm = args.vmm,
        kernel = args.kernel,
        initramfs = args.initramfs,
        virtiofsd = args.virtiofsd,
    );
    let path = args.work.join("config.toml");
    std::fs::write(&path, text).map_err(|e| format!("write {}: {e}", path.display()))?;
    Config::load(&path).map_err(|e| e.to_string())
}

/// Processes whose command line names `needle`.
fn processes_naming(needle: &Path) -> Vec<String> {
    let needle = needle.to_string_lossy().into_owned();
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(&needle) {
                found.push(format!("{}: {cmdline}", name.to_string_lossy()));
            }
        }
    }
    found
}

/// Nothing of the pod at `dir` is left: no process, mount or file.
fn nothing_left(dir: &Path) -> Result<(), String> {
    let procs = processes_naming(dir);
    if !procs.is_empty() {
        return Err(format!("processes left: {procs:?}"));
    }
    let mounts = mount_points_below(dir).map_err(|e| e.to_string())?;
    if !mounts.is_empty() {
        return Err(format!("mounts left: {mounts:?}"));
    }
    if dir.exists() {
        return Err(format!("{} left", dir.display()));
    }
    Ok(())
}

async fn pod_runs_a_container(args: &Args) -> Result<(), String> {
    let config = config(args, "quiet", 120_000)?;
    // One CPU and 64 MiB of limits: 1 + 1 vCPUs, 256 + 64 MiB.
    let annotations: BTreeMap<String, String> = [
        (CRI_CPU_QUOTA, "100000"),
        (CRI_CPU_PERIOD, "100000"),
        (CRI_MEMORY, "67108864"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let size = config.vm_size(&annotations).map_err(|e| e.to_string())?;
    if (size.vcpus, size.memory_mib) != (2, 320) {
        return Err(format!("size {size:?}, want 2 vCPUs and 320 MiB"));
    }
    let dir = args.work.join("pod-a");
    let started = Instant::now();
    let sandbox = Sandbox::start(&config, "pod-a", &dir, size)
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "sandbox-check: pod-a ready after {} ms ({} vCPUs, {} MiB)",
        started.elapsed().as_millis(),
        size.vcpus,
        size.memory_mib
    );
    let result = run_container(args, &sandbox).await;
    let (vmm, virtiofsd) = (sandbox.vmm_pid(), sandbox.virtiofsd_pid());
    let stopped = sandbox.stop().await.map_err(|e| e.to_string());
    result?;
    let status = stopped?;
    println!("sandbox-check: pod-a stopped, moat-vmm {status:?}, pids were {vmm:?} {virtiofsd:?}");
    nothing_left(&dir)
}

async fn run_container(args: &Args, sandbox: &Sandbox) -> Result<(), String> {
    let image = args.work.join("image");
    let rootfs_src =
        moat_tests::agent_suite::busybox_rootfs(&image).map_err(|e| format!("rootfs: {e}"))?;
    let bundle_rootfs = args.work.join("bundle/rootfs");
    std::fs::create_dir_all(&bundle_rootfs).map_err(|e| e.to_string())?;
    // containerd's native snapshotter hands a read-only bind like this.
    mount_rootfs(
        &[RootfsMount {
            fstype: "bind".into(),
            source: rootfs_src.display().to_string(),
            options: vec!["rbind".into(), "ro".into()],
        }],
        &bundle_rootfs,
    )
    .map_err(|e| e.to_string())?;
    let volume = args.work.join("volume");
    std::fs::create_dir_all(&volume).map_err(|e| e.to_string())?;
    std::fs::write(volume.join("in"), "from the host\n").map_err(|e| e.to_string())?;

    let result = async {
        let mut spec = moat_tests::agent_suite::spec(&[
            "sh",
            "-c",
            "uname -r; cat /data/in; echo written in the guest > /data/out",
        ]);
        let mounts = spec["mounts"].as_array_mut().ok_or("spec without mounts")?;
        mounts.push(serde_json::json!({
            "destination": "/data", "type": "bind",
            "source": volume.display().to_string(), "options": ["rbind", "rw"]
        }));
        let parsed: Vec<oci_spec::runtime::Mount> =
            serde_json::from_value(spec["mounts"].clone()).map_err(|e| e.to_string())?;
        let (guest_mounts, guest_rootfs) = sandbox
            .share()
            .add_container("c1", &bundle_rootfs, &parsed)
            .map_err(|e| e.to_string())?;
        spec["mounts"] = serde_json::to_value(&guest_mounts).map_err(|e| e.to_string())?;
        let agent = sandbox.agent();
        agent
            .create_container(
                ctx(),
                &CreateContainerRequest {
                    container_id: "c1".into(),
                    oci_spec_json: spec.to_string().into_bytes(),
                    rootfs: Some(Mount {
                        source: guest_rootfs,
                        fstype: "bind".into(),
                        ..Default::default()
                    })
                    .into(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("create: {e}"))?;
        agent
            .start_container(
                ctx(),
                &StartContainerRequest {
                    container_id: "c1".into(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("start: {e}"))?;
        let mut out = Vec::new();
        loop {
            let chunk = agent
                .read_stdout(
                    ctx(),
                    &ReadStreamRequest {
                        container_id: "c1".into(),
                        max_len: 65536,
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| format!("read stdout: {e}"))?;
            if chunk.data.is_empty() {
                break;
            }
            out.extend_from_slice(&chunk.data);
        }
        let waited = agent
            .wait_process(
                ctx(),
                &WaitProcessRequest {
                    container_id: "c1".into(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("wait: {e}"))?;
        agent
            .remove_container(
                ctx(),
                &RemoveContainerRequest {
                    container_id: "c1".into(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("remove: {e}"))?;
        let out = String::from_utf8_lossy(&out).into_owned();
        let host_release =
            std::fs::read_to_string("/proc/sys/kernel/osrelease").map_err(|e| e.to_string())?;
        let lines: Vec<&str> = out.lines().collect();
        println!(
            "sandbox-check: container printed {out:?}, exit {}",
            waited.status
        );
        if waited.status != 0 {
            return Err(format!("container exited {}: {out:?}", waited.status));
        }
        if lines
            .first()
            .map_or(true, |r| r.is_empty() || *r == host_release.trim())
        {
            return Err(format!(
                "guest kernel release {:?} should differ from the host's {:?}",
                lines.first(),
                host_release.trim()
            ));
        }
        if lines.get(1) != Some(&"from the host") {
            return Err(format!(
                "the volume's file read {:?} in the guest",
                lines.get(1)
            ));
        }
        let written = std::fs::read_to_string(volume.join("out"))
            .map_err(|e| format!("host read of the guest's write: {e}"))?;
        if written != "written in the guest\n" {
            return Err(format!("host sees {written:?} from the guest's write"));
        }
        Ok::<(), String>(())
    }
    .await;
    let removed = sandbox
        .share()
        .remove_container("c1")
        .map_err(|e| e.to_string());
    let unmounted = unmount_all_below(&bundle_rootfs).map_err(|e| e.to_string());
    result.and(removed).and(unmounted)
}

async fn agent_that_never_answers_times_out(args: &Args) -> Result<(), String> {
    // The agent listens on another port, so nothing answers on the shim's.
    let config = config(args, "quiet moat.agent_port=2000", 8_000)?;
    let size = config
        .vm_size(&BTreeMap::new())
        .map_err(|e| e.to_string())?;
    let dir = args.work.join("pod-b");
    let started = Instant::now();
    match Sandbox::start(&config, "pod-b", &dir, size).await {
        Ok(sandbox) => {
            let _ = sandbox.stop().await;
            Err("started, though nothing answers on the agent port".into())
        }
        Err(SandboxError::AgentTimeout { timeout_ms, .. }) => {
            let took = started.elapsed().as_millis();
            println!("sandbox-check: pod-b refused after {took} ms (timeout {timeout_ms} ms)");
            if !(8_000..=8_000 + 15_000).contains(&took) {
                return Err(format!("took {took} ms for an 8000 ms timeout"));
            }
            nothing_left(&dir)
        }
        Err(other) => Err(format!("expected the agent timeout, got: {other}")),
    }
}

async fn guest_that_dies_at_boot_is_reported(args: &Args) -> Result<(), String> {
    // An empty share tag (the later word wins) makes the agent, PID 1,
    // refuse to start: the guest panics and moat-vmm exits.
    let config = config(args, "moat.share=", 60_000)?;
    let size = config
        .vm_size(&BTreeMap::new())
        .map_err(|e| e.to_string())?;
    let dir = args.work.join("pod-c");
    match Sandbox::start(&config, "pod-c", &dir, size).await {
        Ok(sandbox) => {
            let _ = sandbox.stop().await;
            Err("started with a bad share tag".into())
        }
        Err(e @ SandboxError::VmmExited { .. }) => {
            let text = e.to_string();
            println!(
                "sandbox-check: pod-c: {}",
                text.lines().next().unwrap_or("")
            );
            if !text.contains("not a virtio-fs tag") {
                return Err(format!(
                    "the error does not quote the agent's complaint: {text}"
                ));
            }
            nothing_left(&dir)
        }
        Err(other) => Err(format!("expected the VMM's exit, got: {other}")),
    }
}

async fn dead_shims_pod_is_cleaned_up(args: &Args) -> Result<(), String> {
    let config = config(args, "quiet", 120_000)?;
    let size = config
        .vm_size(&BTreeMap::new())
        .map_err(|e| e.to_string())?;
    let dir = args.work.join("pod-d");
    let sandbox = Sandbox::start(&config, "pod-d", &dir, size)
        .await
        .map_err(|e| e.to_string())?;
    let (vmm, virtiofsd) = (sandbox.vmm_pid(), sandbox.virtiofsd_pid());
    // The shim dies: nothing of it runs its teardown.
    std::mem::forget(sandbox);
    if processes_naming(&dir).len() < 2 {
        return Err(format!(
            "moat-vmm and virtiofsd should still run: {:?}",
            processes_naming(&dir)
        ));
    }
    let started = Instant::now();
    moat_shim::sandbox::cleanup(&dir)
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "sandbox-check: pod-d cleaned up after its shim died in {} ms (pids {vmm:?} {virtiofsd:?})",
        started.elapsed().as_millis()
    );
    nothing_left(&dir)?;
    // Twice, as containerd may.
    moat_shim::sandbox::cleanup(&dir)
        .await
        .map_err(|e| format!("second cleanup: {e}"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = std::fs::create_dir_all(&args.work) {
        eprintln!("sandbox-check: {}: {e}", args.work.display());
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sandbox-check: tokio: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = false;
    let results = runtime.block_on(async {
        vec![
            ("pod_runs_a_container", pod_runs_a_container(&args).await),
            (
                "agent_that_never_answers_times_out",
                agent_that_never_answers_times_out(&args).await,
            ),
            (
                "guest_that_dies_at_boot_is_reported",
                guest_that_dies_at_boot_is_reported(&args).await,
            ),
            (
                "dead_shims_pod_is_cleaned_up",
                dead_shims_pod_is_cleaned_up(&args).await,
            ),
        ]
    });
    // The dead shim's pod left its forgotten tasks and children behind
    // in this runtime, as a killed shim would; do not wait on them.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    for (name, result) in results {
        match result {
            Ok(()) => println!("PASS {name}"),
            Err(e) => {
                failed = true;
                println!("FAIL {name}: {e}");
            }
        }
    }
    // Only a work directory with nothing mounted in it is removed.
    if mount_points_below(&args.work).is_ok_and(|m| m.is_empty()) {
        let _ = std::fs::remove_dir_all(&args.work);
    }
    eprintln!("sandbox-check: done");
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
