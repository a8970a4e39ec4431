//! bench-agent: the container engine against runc, side by side on this
//! host. Each run takes one container through its whole life: create,
//! start, `true` exits, delete; moat through moat-agent's API on a Unix
//! socket (as the shim reaches it, minus the vsock hop), runc with
//! `runc run` on the same bundle. Runs alternate, and the medians and
//! their ratio are printed (below 1: moat is faster).
//!
//!   bench-agent AGENT_BINARY [RUNS]   (root)

use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use moat_tests::agent_suite::{busybox_rootfs, spec, Connector, Suite, Target};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let agent = args
        .first()
        .ok_or("usage: bench-agent AGENT_BINARY [RUNS]")?;
    let runs: usize = args
        .get(1)
        .map(|r| r.parse().map_err(|e| format!("RUNS {r:?}: {e}")))
        .transpose()?
        .unwrap_or(30);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("bench-agent runs real containers: it needs root".into());
    }
    let dir = std::env::temp_dir().join(format!("moat-bench-agent-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let rootfs = busybox_rootfs(&dir).map_err(|e| format!("busybox rootfs: {e}"))?;
    let bundle = dir.join("bundle");
    std::fs::create_dir_all(&bundle).map_err(|e| e.to_string())?;
    let mut runc_spec = spec(&["true"]);
    runc_spec["root"]["path"] = serde_json::json!(rootfs);
    std::fs::write(bundle.join("config.json"), runc_spec.to_string()).map_err(|e| e.to_string())?;

    let socket = dir.join("agent.sock");
    let mut child = Command::new(agent)
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--cgroup-parent")
        .arg(format!("/moat-bench-{}", std::process::id()))
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("start {agent}: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let result = runtime.block_on(async {
        let suite = Suite::new(Target {
            connector: Connector::Unix(socket.to_string_lossy().into_owned()),
            rootfs: rootfs.to_string_lossy().into_owned(),
            state_dir: dir.join("state").to_string_lossy().into_owned(),
            cgroup_v2: false,
            guest: false,
            prefix: "bench-".into(),
        })?;
        let (mut moat, mut runc) = (Vec::new(), Vec::new());
        // One warm-up each, not counted.
        for i in 0..=runs {
            let start = Instant::now();
            let done = suite.run(&format!("m{i}"), &spec(&["true"])).await?;
            let moat_time = start.elapsed();
            if done.status != 0 {
                return Err(format!("moat run {i}: status {}", done.status));
            }
            let start = Instant::now();
            let status = Command::new("runc")
                .arg("--root")
                .arg(dir.join("runc"))
                .args(["run", "--bundle"])
                .arg(&bundle)
                .arg(format!("bench-runc-{}-{i}", std::process::id()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .status()
                .map_err(|e| format!("runc (Debian's runc package): {e}"))?;
            let runc_time = start.elapsed();
            if !status.success() {
                return Err(format!("runc run {i}: {status}"));
            }
            if i > 0 {
                println!(
                    "run {i:3}: moat {:7.1} ms   runc {:7.1} ms",
                    ms(moat_time),
                    ms(runc_time)
                );
                moat.push(moat_time);
                runc.push(runc_time);
            }
        }
        Ok((median(moat), median(runc)))
    });
    let _ = child.kill();
    let _ = child.wait();
    let parent = format!("moat-bench-{}", std::process::id());
    for controller in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let _ = std::fs::remove_dir(controller.path().join(&parent));
    }
    let _ = std::fs::remove_dir(std::path::Path::new("/sys/fs/cgroup").join(&parent));
    let _ = std::fs::remove_dir_all(&dir);
    let (moat, runc) = result?;
    println!("container create → start → exit → delete, median of {runs} runs");
    println!("| | moat-agent | runc | moat/runc |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| lifecycle ms | {:.1} | {:.1} | {:.2} |",
        ms(moat),
        ms(runc),
        moat.as_secs_f64() / runc.as_secs_f64()
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
