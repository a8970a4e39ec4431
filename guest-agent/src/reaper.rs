//! Reaping every child of the agent and keeping their exit statuses.
//!
//! As PID 1 of the guest (or a child subreaper on the host) the agent
//! inherits every orphan, including each container's init once the
//! one-shot helper that created it exits. One thread owns `waitpid(-1)`:
//! nothing else in the agent may wait for a child (no `Child::wait`, no
//! `tokio::process`), or the two would race for statuses. Exits are kept
//! by PID until the engine takes them, so a process that exits before
//! the engine has registered it loses nothing.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, or 128 + signal for a process a signal killed
    /// (the shell's and containerd's convention).
    pub status: i32,
    /// When the reaper saw it.
    pub at: SystemTime,
}

/// Unclaimed exits older than this are dropped once the table is large:
/// they belong to orphans nobody asked about.
const UNCLAIMED_TTL: Duration = Duration::from_secs(600);
const PRUNE_ABOVE: usize = 4096;

/// The exit table and the thread filling it.
#[derive(Debug, Default)]
pub struct Reaper {
    exits: Mutex<HashMap<i32, Exit>>,
    exited: tokio::sync::Notify,
    spawned: (Mutex<bool>, Condvar),
}

impl Reaper {
    /// Starts the reaper thread.
    pub fn start() -> std::io::Result<Arc<Reaper>> {
        let reaper = Arc::new(Reaper::default());
        let worker = reaper.clone();
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || worker.run())?;
        Ok(reaper)
    }

    fn run(&self) {
        loop {
            let mut raw = 0;
            // SAFETY: waitpid with a valid status pointer.
            let pid = unsafe { libc::waitpid(-1, &mut raw, 0) };
            if pid > 0 {
                self.record(pid, decode_status(raw));
                continue;
            }
            let errno = std::io::Error::last_os_error().raw_os_error();
            if errno == Some(libc::ECHILD) {
                // No children: sleep until one is spawned. The timeout
                // covers children the agent did not spawn itself (orphans
                // reparented to it).
                let (lock, cvar) = &self.spawned;
                let guard = lock.lock().unwrap_or_else(PoisonError::into_inner);
                let (mut guard, _) = cvar
                    .wait_timeout_while(guard, Duration::from_millis(200), |spawned| !*spawned)
                    .unwrap_or_else(PoisonError::into_inner);
                *guard = false;
            }
        }
    }

    fn record(&self, pid: i32, status: i32) {
        let now = SystemTime::now();
        {
            let mut exits = self.exits.lock().unwrap_or_else(PoisonError::into_inner);
            if exits.len() > PRUNE_ABOVE {
                exits.retain(|_, exit| {
                    now.duration_since(exit.at).unwrap_or_default() < UNCLAIMED_TTL
                });
            }
            exits.insert(pid, Exit { status, at: now });
        }
        self.exited.notify_waiters();
    }

    /// Tells the reaper a child now exists, so it stops idling.
    pub fn child_spawned(&self) {
        let (lock, cvar) = &self.spawned;
        *lock.lock().unwrap_or_else(PoisonError::into_inner) = true;
        cvar.notify_one();
    }

    /// The exit of `pid`, if it has ended.
    pub fn exit_of(&self, pid: i32) -> Option<Exit> {
        self.exits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&pid)
            .copied()
    }

    /// Waits for `pid` to end. The exit stays in the table until
    /// [`Reaper::forget`], so every waiter sees it.
    pub async fn wait(&self, pid: i32) -> Exit {
        loop {
            let notified = self.exited.notified();
            tokio::pin!(notified);
            // Register before looking, so an exit between the look and the
            // wait still wakes this waiter.
            notified.as_mut().enable();
            if let Some(exit) = self.exit_of(pid) {
                return exit;
            }
            notified.await;
        }
    }

    /// Waits for `pid` to end, at most `timeout`.
    pub async fn wait_timeout(&self, pid: i32, timeout: Duration) -> Option<Exit> {
        tokio::time::timeout(timeout, self.wait(pid)).await.ok()
    }

    /// Drops the exit of `pid` if it was recorded before `when`: it
    /// belongs to an earlier process with the same PID.
    pub fn forget_older_than(&self, pid: i32, when: SystemTime) {
        let mut exits = self.exits.lock().unwrap_or_else(PoisonError::into_inner);
        if exits.get(&pid).is_some_and(|exit| exit.at < when) {
            exits.remove(&pid);
        }
    }

    /// Drops the exit of `pid` once nobody will ask for it again.
    pub fn forget(&self, pid: i32) {
        self.exits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&pid);
    }
}

/// The shell's status for a raw `waitpid` status.
pub fn decode_status(raw: i32) -> i32 {
    if libc::WIFEXITED(raw) {
        libc::WEXITSTATUS(raw)
    } else if libc::WIFSIGNALED(raw) {
        128 + libc::WTERMSIG(raw)
    } else {
        // Stopped or continued: waitpid without WUNTRACED never says so.
        255
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_pid_drops_only_the_stale_exit() {
        let reaper = Reaper::default();
        reaper.record(4242, 1);
        let after_first = SystemTime::now() + Duration::from_millis(1);
        reaper.forget_older_than(4242, after_first);
        assert_eq!(
            reaper.exit_of(4242),
            None,
            "the earlier process's exit is stale"
        );
        let before_second = SystemTime::now() - Duration::from_secs(1);
        reaper.record(4242, 7);
        reaper.forget_older_than(4242, before_second);
        assert_eq!(
            reaper.exit_of(4242).map(|e| e.status),
            Some(7),
            "a fresh exit stays"
        );
    }

    #[test]
    fn statuses_follow_the_shell_convention() {
        assert_eq!(decode_status(3 << 8), 3);
        assert_eq!(decode_status(libc::SIGKILL), 137);
        assert_eq!(decode_status(libc::SIGTERM), 143);
    }
}
