//! containerd-shim-moat-v2 end to end: a real containerd 1.6 (Debian's)
//! starts the shim for `io.containerd.moat.v2`, and ctr drives it
//! (`tests/shim/ctr-suite`), in the KVM harness. Each case of the suite
//! is asserted here by name, so a case that silently stops running fails.

mod common;

use common::{guest_vmlinux, kvm_run_within, repo_root, test_tool, vmm_binary};

/// What each suite may take in L1 (the ctr suite runs about 10 minutes
/// under TCG, the CRI suite 20 to 30, mostly pod starts).
const SUITE_TIMEOUT_SECS: u32 = 2700;

/// The shim's config file for the harness: the guest assets under test.
fn moat_config() -> std::path::PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| repo_root().join("target"), std::path::PathBuf::from);
    let initramfs = target.join("moat-guest/agent-initramfs.cpio.gz");
    assert!(
        initramfs.is_file(),
        "{} is missing: build it with `make guest`",
        initramfs.display()
    );
    let text = format!(
        "[vm]\nvmm = {vmm:?}\nkernel = {kernel:?}\ninitramfs = {initramfs:?}\n\
         kernel_args = \"quiet\"\ndefault_vcpus = 1\ndefault_memory_mib = 256\n\
         max_vcpus = 2\nmax_memory_mib = 1024\nagent_boot_timeout_ms = 60000\n\
         [virtiofs]\nvirtiofsd = {virtiofsd:?}\n",
        vmm = vmm_binary(),
        kernel = guest_vmlinux(),
        virtiofsd = common::virtiofsd(),
    );
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("moat-shim-test.toml");
    std::fs::write(&path, text).expect("write the shim's test config");
    path
}

/// Runs a suite script of `tests/shim/` in the harness with the shim's
/// directory, the test config and `extra` arguments, echoes its case
/// lines, and asserts that each of `cases` passed and the suite exited 0.
fn run_suite(script: &str, work: &str, extra: &[&str], cases: &[&str]) {
    let shim = test_tool("containerd-shim-moat-v2");
    let config = moat_config();
    let suite = repo_root().join("tests/shim").join(script);
    let mut args = vec![
        suite.to_str().expect("utf-8 path"),
        work,
        shim.parent().and_then(|p| p.to_str()).expect("utf-8 path"),
        config.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    let run = kvm_run_within(&args, SUITE_TIMEOUT_SECS);
    let all = run.describe();
    for line in run.stdout.lines().filter(|l| {
        l.starts_with("PASS ")
            || l.starts_with("FAIL ")
            || l.contains("-suite: ")
            || l.starts_with("cri-check: ")
    }) {
        eprintln!("{line}");
    }
    for case in cases {
        // A case may add a note in parentheses after its name.
        assert!(
            run.stdout
                .lines()
                .any(|l| l == format!("PASS {case}") || l.starts_with(&format!("PASS {case} ("))),
            "{case}: {all}"
        );
    }
    assert_eq!(run.code, 0, "{all}");
}

/// Every case of `tests/shim/ctr-suite`: exit codes (0, 3, 137 after a
/// SIGKILL), stdin through `cat` and its end of file, 10 MiB of output
/// byte-exact, output of containers that exit at once, `ctr run -t` and a
/// tty exec whose window size follows, ps, kill of all processes, pause and resume,
/// metrics from the guest's cgroups, two containers in one VM (same boot
/// ID), read-only and writable bind mounts, and moat-vmm killed under a
/// running task and exec (both exit 137 within the bound); then the
/// faults: a missing entrypoint, an nfs mount and a malformed moat config
/// each refused with an error naming it, a guest kernel panic reported as
/// one in the shim's log (with moat-vmm's status 10), virtiofsd killed (the pod stops), and the shim
/// killed with SIGKILL (containerd's delete action takes its VM down);
/// `make install`'s script, after which a container runs from the
/// installed config and files; a config.json with a namespace type no
/// runtime knows, refused naming it; and a 384 MiB image read whole in a
/// 256 MiB VM; a seccomp violation in a running pod's VMM, reported by the
/// shim as such; and the VMM's jail as the host sees it (uid, gid, no
/// capabilities, its root, namespaces, cgroup and limits); and a guest
/// whose RAM a container fills, held by the pod's cgroup with no OOM kill.
/// containerd holds no more fds after the cases than before them.
/// After every case no moat process, mount, pod state, pod cgroup or task
/// is left.
#[test]
fn ctr_drives_pods_in_microvms_through_containerd() {
    run_suite(
        "ctr-suite",
        "/tmp/ctr-suite",
        &[],
        &[
            "echo_in_a_guest_kernel",
            "vmm_is_jailed",
            "exit_codes",
            "stdin_reaches_the_container",
            "ten_mib_of_output_arrive_exactly",
            "output_of_a_container_that_exits_at_once",
            "tty_exec_follows_the_window_size",
            "ps_kill_all_pause_resume_metrics",
            "two_containers_share_one_vm",
            "bind_mounts_read_only_and_writable",
            "vmm_killed_exits_every_task",
            "refusals_are_clear_and_leave_nothing",
            "guest_panic_is_reported",
            "seccomp_violation_stops_the_pod",
            "virtiofsd_killed_stops_the_pod",
            "shim_killed_then_containerd_cleans_up",
            "install_puts_moat_in_place",
            "malformed_spec_is_refused",
            "image_bigger_than_the_vm",
            "guest_memory_filled_stays_in_the_pod_cgroup",
            "containerd_holds_no_more_fds",
        ],
    );
}

/// Every case of `tests/shim/cri-suite`, through containerd's CRI plugin
/// with handler `moat` and the project's CRI client (`cri-check`): a
/// host-network pod's whole lifecycle with ExecSync and the CRI log file
/// (its VM has no NIC), two containers in one VM sharing a host
/// volume, a container restarted in its pod, 50 exec probes with the
/// agent's fd count flat; on CNI's bridge network (Debian's reference
/// plugins): a container reaching the host and reached on its IPv4 and
/// IPv6 addresses, two moat pods and a runc pod reaching each other and a
/// hostPort (portmap) reaching a moat pod, 64 MiB each way with equal
/// SHA-256s to the host found by a hosts-file name, with the pod's DNS
/// settings; 20 networked pod cycles each leaving nothing (no process,
/// pod state, cgroup, network namespace, veth or host-local address); and
/// 20 networked pods started and removed at once, leaving nothing; and
/// `kill -9 1` from a root container in the VM's PID namespace, which the
/// agent (the guest's init) survives, the pod still working.
#[test]
fn cri_runs_pods_in_microvms_through_containerd() {
    let cri_check = test_tool("cri-check");
    run_suite(
        "cri-suite",
        "/tmp/cri-suite",
        &[cri_check.to_str().expect("utf-8 path")],
        &[
            "pod_lifecycle",
            "two_containers_one_vm_and_a_shared_volume",
            "container_restarts_in_its_pod",
            "exec_probes_keep_the_agent_flat",
            "pod_network_both_ways",
            "pods_reach_each_other_and_a_host_port",
            "bulk_each_way_hosts_file_and_dns",
            "pod_cycles_leave_nothing",
            "agent_survives_kill_9_from_the_guest",
            "nothing_left_after_the_cri_cases",
        ],
    );
}
