//! The one-shot helper that creates a container or execs into one.
//!
//! libcontainer forks with raw `clone3` and then runs ordinary Rust in
//! the child, which is unsafe in a multi-threaded process (the agent
//! runs tokio). So the agent re-executes itself as a single-threaded
//! helper for exactly the calls that clone:
//!
//! ```text
//! moat-agent create-container ROOT ID BUNDLE CONSOLE_SOCKET|-
//! moat-agent exec-process     ROOT ID PROCESS_JSON CONSOLE_SOCKET|-
//! ```
//!
//! The helper's stdin, stdout and stderr become the process's stdio
//! (unless a console socket gives it a terminal). It reports on fd 3,
//! one line: `ok PID` or `error MESSAGE`, then exits; the new process is
//! reparented to the agent, which reaps it.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;

/// The fd on which the helper reports.
pub const REPORT_FD: i32 = 3;

/// The helper's subcommand names.
pub const CREATE: &str = "create-container";
/// See [`CREATE`].
pub const EXEC: &str = "exec-process";

/// Runs the helper if `args` (without argv\[0\]) name it; `None` if not.
pub fn run_if_helper(args: &[String]) -> Option<i32> {
    let command = args.first()?;
    if command != CREATE && command != EXEC {
        return None;
    }
    // SAFETY: the agent hands fd 3 to the helper for its report; nothing
    // else in this process owns it.
    let report = unsafe { OwnedFd::from_raw_fd(REPORT_FD) };
    // The container must not inherit the report pipe.
    // SAFETY: fcntl on an fd this process owns.
    unsafe { libc::fcntl(REPORT_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    // The container inherits the agent's limit unless its spec sets one:
    // put back the one the agent started with.
    let line =
        match crate::limits::restore_original_nofile().and_then(|()| run(command, &args[1..])) {
            Ok(pid) => format!("ok {pid}\n"),
            Err(e) => format!("error {}\n", e.replace('\n', " ")),
        };
    let mut report = std::fs::File::from(report);
    let _ = report.write_all(line.as_bytes());
    Some(if line.starts_with("ok") { 0 } else { 1 })
}

fn run(command: &str, args: &[String]) -> Result<i32, String> {
    let [root, id, path, console] = args else {
        return Err(format!(
            "{command}: expected ROOT ID PATH CONSOLE_SOCKET|-, got {args:?}"
        ));
    };
    let console = (console != "-").then(|| PathBuf::from(console));
    let builder = ContainerBuilder::new(id.clone(), SyscallType::default())
        .with_root_path(root)
        .map_err(|e| format!("state directory {root}: {e}"))?
        .with_console_socket(console.as_ref());
    if command == CREATE {
        let container = builder
            .as_init(path)
            .with_systemd(false)
            .with_detach(true)
            .build()
            .map_err(|e| format!("create container {id:?}: {}", describe(&e)))?;
        container
            .pid()
            .map(|pid| pid.as_raw())
            .ok_or_else(|| format!("create container {id:?}: no init PID"))
    } else {
        builder
            .as_tenant()
            .with_process(Some(path))
            .with_detach(true)
            .build()
            .map(|pid| pid.as_raw())
            .map_err(|e| format!("exec in container {id:?}: {}", describe(&e)))
    }
}

/// libcontainer's errors, with their causes (its Display often stops at
/// "failed to create container").
fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
