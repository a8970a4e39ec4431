//! The pod guest (`make guest`: the project kernel and an initramfs whose
//! /init is moat-agent) boots in moat-vmm and answers a health check over
//! the hybrid vsock, the shim's only way in; and the agent's client suite
//! runs real containers in it, with the cgroup v2 cases (OOM events,
//! cpu and pids limits, stats). Runs through the KVM harness.

mod common;

use common::{guest_vmlinux, kvm_run, repo_root, test_tool, vmm_binary};

fn guest_initramfs(name: &str) -> std::path::PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| repo_root().join("target"), std::path::PathBuf::from);
    let initramfs = target.join("moat-guest").join(name);
    assert!(
        initramfs.is_file(),
        "{} is missing: build it with `make guest`",
        initramfs.display()
    );
    initramfs
}

#[test]
fn agent_answers_health_check_over_vsock_after_boot() {
    let initramfs = guest_initramfs("agent-initramfs.cpio.gz");
    let check = test_tool("agent-check");
    // agent-check starts with the VMM, so its time is VMM start to the
    // first answered health check.
    let script = format!(
        r#"set -u
        rm -f /tmp/agent.sock
        {vmm} --kernel {kernel} --initramfs {initramfs} --memory 256 \
            --vsock cid=3,path=/tmp/agent.sock --append "quiet moat.hostname=pod-test" \
            >/tmp/agent-vm.out 2>&1 &
        vm=$!
        timeout 90 {check} /tmp/agent.sock 1024 60; echo "agent-check exit: $?"
        kill -TERM $vm; timeout 20 tail --pid=$vm -f /dev/null || kill -KILL $vm
        wait $vm; echo "vm exit status: $?"
        cat /tmp/agent-vm.out"#,
        vmm = vmm_binary().display(),
        kernel = guest_vmlinux().display(),
        initramfs = initramfs.display(),
        check = check.display(),
    );
    let run = kvm_run(&["bash", "-c", &script]);
    let all = run.describe();
    assert_eq!(run.code, 0, "kvm-run's own exit (124: L1 timed out)\n{all}");
    assert!(run.stdout.contains("agent-check exit: 0"), "{all}");
    assert!(
        run.stdout.contains("health check ok after") && run.stdout.contains("(api version 2)"),
        "{all}"
    );
    assert!(
        run.stdout
            .contains("moat-agent: serving on vsock://-1:1024"),
        "{all}"
    );
    assert!(run.stdout.contains("vm exit status: 0"), "{all}");
    if let Some(line) = run.line_after("agent ready: ") {
        eprintln!("agent ready: {line}");
    }
}

#[test]
fn agent_client_suite_runs_real_containers_in_the_guest() {
    let initramfs = guest_initramfs("agent-test-initramfs.cpio.gz");
    let suite = test_tool("agent-suite");
    let filter = std::env::var("MOAT_SUITE_FILTER").unwrap_or_default();
    let script = format!(
        r#"set -u
        rm -f /tmp/agent.sock
        {vmm} --kernel {kernel} --initramfs {initramfs} --memory 512 --vcpus 2 \
            --vsock cid=3,path=/tmp/agent.sock --append "quiet moat.hostname=pod-test" \
            >/tmp/agent-vm.out 2>&1 &
        vm=$!
        timeout 90 {check} /tmp/agent.sock 1024 60 >/dev/null
        timeout 400 {suite} /tmp/agent.sock 1024 /busybox {filter} >/tmp/suite.out 2>&1
        status=$?; echo "agent-suite exit: $status"
        # A failed suite: where the guest's vCPUs and devices stand now.
        if [ $status != 0 ]; then kill -USR1 $vm; sleep 2; kill -USR1 $vm; sleep 1; fi
        kill -TERM $vm; timeout 20 tail --pid=$vm -f /dev/null || kill -KILL $vm
        wait $vm; echo "vm exit status: $?"
        cat /tmp/suite.out
        echo "--- guest console ---"
        cat /tmp/agent-vm.out"#,
        vmm = vmm_binary().display(),
        kernel = guest_vmlinux().display(),
        initramfs = initramfs.display(),
        check = test_tool("agent-check").display(),
        suite = suite.display(),
    );
    let run = kvm_run(&["bash", "-c", &script]);
    let all = run.describe();
    assert_eq!(run.code, 0, "kvm-run's own exit (124: L1 timed out)\n{all}");
    for line in run
        .stdout
        .lines()
        .filter(|l| l.starts_with("PASS") || l.starts_with("FAIL"))
    {
        eprintln!("{line}");
    }
    assert!(run.stdout.contains("agent-suite exit: 0"), "{all}");
    assert!(!run.stdout.contains("FAIL "), "{all}");
    if filter.is_empty() {
        for case in [
            "oom_event",
            "limits_v2",
            "guest_clock",
            "many_containers",
            "bad_input",
        ] {
            assert!(
                run.stdout.contains(&format!("PASS {case} ")),
                "{case} did not pass: {all}"
            );
        }
    }
    assert!(run.stdout.contains("vm exit status: 0"), "{all}");
}

/// The shim's pod VM (`moat_shim::sandbox`, driven by the `sandbox-check`
/// tool): a pod boots from a config file with its CRI-derived size, a
/// container runs from a rootfs and a volume that reach the guest over
/// virtio-fs, and every teardown (after a stop, an agent boot timeout, a
/// guest that dies at boot, the cleanup of a pod whose shim died) leaves
/// no process, mount or file.
#[test]
fn shim_sandbox_boots_a_pod_runs_a_container_and_leaves_nothing() {
    let initramfs = guest_initramfs("agent-initramfs.cpio.gz");
    let check = test_tool("sandbox-check");
    let virtiofsd = common::virtiofsd();
    let vmm = vmm_binary();
    let kernel = guest_vmlinux();
    let run = kvm_run(&[
        check.to_str().expect("utf-8 path"),
        "--vmm",
        vmm.to_str().expect("utf-8 path"),
        "--kernel",
        kernel.to_str().expect("utf-8 path"),
        "--initramfs",
        initramfs.to_str().expect("utf-8 path"),
        "--virtiofsd",
        virtiofsd.to_str().expect("utf-8 path"),
        "--work",
        "/tmp/sandbox-check",
    ]);
    let all = run.describe();
    for line in run
        .stdout
        .lines()
        .filter(|l| l.starts_with("sandbox-check: "))
    {
        eprintln!("{line}");
    }
    for case in [
        "pod_runs_a_container",
        "agent_that_never_answers_times_out",
        "guest_that_dies_at_boot_is_reported",
        "dead_shims_pod_is_cleaned_up",
    ] {
        assert!(
            run.stdout.contains(&format!("PASS {case}")),
            "{case}: {all}"
        );
    }
    assert_eq!(run.code, 0, "{all}");
}
