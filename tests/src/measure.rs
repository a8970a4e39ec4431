//! Measuring one run of a VMM from the outside: time from spawn until a
//! marker line appears on its standard output, total run time, and peak
//! RSS from the kernel's accounting of the child.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What one run measured.
#[derive(Debug, Clone, Copy)]
pub struct RunSample {
    /// Spawn to the marker line on stdout.
    pub to_marker: Duration,
    /// Spawn to process exit.
    pub total: Duration,
    /// Peak resident set size of the process, in KiB.
    pub max_rss_kib: u64,
}

/// Errors measuring a run.
#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    /// The command could not be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The marker never appeared.
    #[error("{program}: no line containing {marker:?} within {timeout:?}; last output: {tail}")]
    NoMarker {
        /// The program.
        program: String,
        /// The marker looked for.
        marker: String,
        /// How long it waited.
        timeout: Duration,
        /// The last lines it printed.
        tail: String,
    },
    /// The process did not exit in time after the marker.
    #[error("{program}: still running {0:?} after its marker; killed", timeout)]
    NoExit {
        /// The program.
        program: String,
        /// How long it waited.
        timeout: Duration,
    },
    /// The process failed.
    #[error("{program}: exited with status {status}; last output: {tail}")]
    Failed {
        /// The program.
        program: String,
        /// Its wait status.
        status: i32,
        /// The last lines it printed.
        tail: String,
    },
}

/// Waits for `pid` (a child of this process) for up to `timeout`, and
/// returns its wait status and peak RSS, or `None` if it is still running.
fn wait_with_rusage(pid: libc::pid_t, timeout: Duration) -> Option<(i32, u64)> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut status = 0;
        // SAFETY: rusage is plain old data that wait4 fills in.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: pid is our own unreaped child; status and usage are valid
        // out-pointers for the duration of the call.
        let reaped = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if reaped == pid {
            return Some((status, usage.ru_maxrss as u64));
        }
        if reaped < 0 || Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `command` (stdout is captured, stderr discarded) and measures the
/// time until a stdout line contains `marker`, then waits for it to exit
/// with one of `ok_statuses`. The child is killed if it overruns `timeout`
/// at either step.
pub fn run_to_marker(
    mut command: Command,
    marker: &str,
    timeout: Duration,
    ok_statuses: &[i32],
) -> Result<RunSample, MeasureError> {
    let program = command.get_program().to_string_lossy().into_owned();
    let start = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| MeasureError::Spawn {
            program: program.clone(),
            source,
        })?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let (seen_tx, seen_rx) = mpsc::channel();
    let marker_owned = marker.to_string();
    let reader = std::thread::spawn(move || {
        let mut tail: Vec<String> = Vec::new();
        let mut sent = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !sent && line.contains(&marker_owned) {
                let _ = seen_tx.send(Instant::now());
                sent = true;
            }
            tail.push(line);
            if tail.len() > 5 {
                tail.remove(0);
            }
        }
        tail.join(" | ")
    });
    let pid = child.id() as libc::pid_t;
    let seen = seen_rx.recv_timeout(timeout);
    let Ok(seen_at) = seen else {
        let _ = child.kill();
        let _ = wait_with_rusage(pid, Duration::from_secs(5));
        let tail = reader.join().unwrap_or_default();
        return Err(MeasureError::NoMarker {
            program,
            marker: marker.into(),
            timeout,
            tail,
        });
    };
    let Some((status, max_rss_kib)) = wait_with_rusage(pid, timeout) else {
        let _ = child.kill();
        let _ = wait_with_rusage(pid, Duration::from_secs(5));
        return Err(MeasureError::NoExit { program, timeout });
    };
    let total = start.elapsed();
    let tail = reader.join().unwrap_or_default();
    if !libc::WIFEXITED(status) || !ok_statuses.contains(&libc::WEXITSTATUS(status)) {
        return Err(MeasureError::Failed {
            program,
            status,
            tail,
        });
    }
    Ok(RunSample {
        to_marker: seen_at - start,
        total,
        max_rss_kib,
    })
}

/// The first line of `qemu --version`, to name the peer in a report.
pub fn qemu_version(qemu: &std::path::Path) -> String {
    Command::new(qemu)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "unknown version".into())
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let n = sorted.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Runs `program` with `args` to its end; an error names the command and
/// its stderr when it fails.
pub fn sh(program: &str, args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Waits up to `timeout` for `child` to exit, then kills it; returns
/// whether it exited by itself.
pub fn wait_or_kill(child: &mut std::process::Child, timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn marker_time_total_time_and_rss_are_measured() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo starting; sleep 0.2; echo READY-MARK; sleep 0.2"]);
        let sample = run_to_marker(cmd, "READY-MARK", Duration::from_secs(10), &[0]).unwrap();
        assert!(sample.to_marker >= Duration::from_millis(200), "{sample:?}");
        assert!(
            sample.total >= sample.to_marker + Duration::from_millis(200),
            "{sample:?}"
        );
        assert!(sample.max_rss_kib > 0);
    }

    #[test]
    fn missing_marker_is_an_error_naming_it() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo only-this"]);
        let err = run_to_marker(cmd, "NEVER", Duration::from_secs(2), &[0])
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"NEVER\""), "{err}");
        assert!(err.contains("only-this"), "{err}");
    }

    #[test]
    fn failing_command_is_an_error() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo MARK; exit 3"]);
        let err = run_to_marker(cmd, "MARK", Duration::from_secs(5), &[0]).unwrap_err();
        assert!(matches!(err, MeasureError::Failed { .. }), "{err}");
    }
}
