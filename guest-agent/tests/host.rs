//! The agent binary on the host, serving on a Unix socket (`--listen`)
//! in a network namespace of its own, running real containers (busybox)
//! with real namespaces and cgroups (v1 here): the whole client suite,
//! then a check that nothing was left behind.
//!
//! Needs root; without it the test fails, it does not skip.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use moat_tests::agent_suite::{busybox_rootfs, Connector, Suite, Target};

/// PIDs whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    let mut kids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The fields after the command name, which is in parentheses.
        let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
        let ppid: u32 = after
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if ppid == parent {
            kids.push(pid);
        }
    }
    kids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_suite_passes_against_the_agent_on_the_host() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test needs root: it runs real containers");
    let dir = std::env::temp_dir().join(format!("moat-agent-host-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let rootfs = busybox_rootfs(&dir).expect("busybox rootfs from /bin/busybox (busybox-static)");
    let state = dir.join("state");
    let socket = dir.join("agent.sock");
    let cgroup_parent = format!("/moat-test-{}", std::process::id());
    let mut agent = Command::new("unshare")
        .arg("--net")
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_moat-agent"))
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .arg("--state-dir")
        .arg(&state)
        .arg("--cgroup-parent")
        .arg(&cgroup_parent)
        .stdout(Stdio::null())
        .spawn()
        .expect("unshare (util-linux)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "agent did not listen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let suite = Suite::new(Target {
        connector: Connector::Unix(socket.to_string_lossy().into_owned()),
        rootfs: rootfs.to_string_lossy().into_owned(),
        state_dir: state.to_string_lossy().into_owned(),
        cgroup_v2: false,
        guest: false,
        prefix: "h-".into(),
    })
    .unwrap();
    let filter = std::env::var("MOAT_SUITE_FILTER").ok();
    let outcomes = suite.run_all(filter.as_deref()).await;
    let mut failures = Vec::new();
    for outcome in &outcomes {
        match &outcome.result {
            Ok(()) => eprintln!(
                "PASS {} ({:.1} s)",
                outcome.name,
                outcome.elapsed.as_secs_f64()
            ),
            Err(e) => {
                eprintln!("FAIL {}: {e}", outcome.name);
                failures.push(outcome.name);
            }
        }
    }

    // Nothing left behind: no mounts under the state directory, no
    // container cgroups, no processes under the agent.
    let mounts = std::fs::read_to_string(format!("/proc/{}/mountinfo", agent.id())).unwrap();
    let leaked_mounts: Vec<&str> = mounts
        .lines()
        .filter(|l| l.contains(&*state.to_string_lossy()))
        .collect();
    let mut leaked_cgroups = Vec::new();
    for controller in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let parent = controller
            .path()
            .join(cgroup_parent.trim_start_matches('/'));
        if let Ok(entries) = std::fs::read_dir(&parent) {
            for entry in entries.flatten() {
                if entry.path().is_dir() {
                    leaked_cgroups.push(entry.path());
                }
            }
        }
    }
    let leaked_processes = children_of(agent.id());
    agent.kill().unwrap();
    agent.wait().unwrap();
    for controller in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let _ = std::fs::remove_dir(
            controller
                .path()
                .join(cgroup_parent.trim_start_matches('/')),
        );
    }
    assert!(failures.is_empty(), "failed cases: {failures:?}");
    if filter.is_none() {
        assert!(outcomes.len() >= 14, "only {} cases ran", outcomes.len());
    }
    assert!(leaked_mounts.is_empty(), "mounts left: {leaked_mounts:#?}");
    assert!(
        leaked_cgroups.is_empty(),
        "cgroups left: {leaked_cgroups:#?}"
    );
    assert!(
        leaked_processes.is_empty(),
        "processes left: {leaked_processes:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
