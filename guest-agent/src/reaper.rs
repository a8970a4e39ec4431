//! Reaping every child of the agent and handing each exit to the process
//! it belongs to.
//!
//! As PID 1 of the guest (or a child subreaper on the host) the agent
//! inherits every orphan, including each container's init once the
//! one-shot helper that created it exits. One thread owns reaping:
//! nothing else in the agent may wait for a child (no `Child::wait`, no
//! `tokio::process`), or the two would race for statuses.
//!
//! Every process the agent starts gets its own exit record
//! ([`ProcessExit`]), registered with [`Reaper::watch`] once its PID is
//! known; the reaper fills that record and forgets the PID. An exit seen
//! before its process was registered (a process that ended at once) waits
//! in a small table of unclaimed exits, stamped with a reap sequence
//! number taken under the same lock as the reaping itself. A registration
//! claims only an exit reaped after its [`SpawnMark`], so the exit of an
//! earlier process that had the same PID is never handed to a new one,
//! and no wall-clock step can reorder them.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, or 128 + signal for a process a signal killed
    /// (the shell's and containerd's convention).
    pub status: i32,
    /// When the reaper saw it (wall clock, for reports only).
    pub at: SystemTime,
}

/// Unclaimed exits older than this are dropped once the table is large:
/// they belong to orphans nobody asked about.
const UNCLAIMED_TTL: Duration = Duration::from_secs(600);
/// The unclaimed table is pruned above this many entries, and never
/// holds more than it (the oldest go first).
pub const UNCLAIMED_MAX: usize = 4096;

/// The exit record of one process the agent started.
#[derive(Debug, Default)]
pub struct ProcessExit {
    exit: Mutex<Option<Exit>>,
    exited: tokio::sync::Notify,
}

impl ProcessExit {
    /// The exit, if the process has ended.
    pub fn get(&self) -> Option<Exit> {
        *self.exit.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, exit: Exit) {
        *self.exit.lock().unwrap_or_else(PoisonError::into_inner) = Some(exit);
        self.exited.notify_waiters();
    }

    /// Waits for the process to end; every waiter sees the exit.
    pub async fn wait(&self) -> Exit {
        loop {
            let notified = self.exited.notified();
            tokio::pin!(notified);
            // Register before looking, so an exit between the look and the
            // wait still wakes this waiter.
            notified.as_mut().enable();
            if let Some(exit) = self.get() {
                return exit;
            }
            notified.await;
        }
    }

    /// Waits for the process to end, at most `timeout`.
    pub async fn wait_timeout(&self, timeout: Duration) -> Option<Exit> {
        tokio::time::timeout(timeout, self.wait()).await.ok()
    }
}

/// A point in the reaper's sequence, taken before a process is spawned:
/// only exits reaped after it can be that process's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SpawnMark(u64);

#[derive(Debug)]
struct Unclaimed {
    exit: Exit,
    seq: u64,
    seen: Instant,
}

#[derive(Debug, Default)]
struct State {
    /// Sequence number of the last reaped exit.
    seq: u64,
    /// Registered processes whose exit has not been seen yet.
    watched: HashMap<i32, Arc<ProcessExit>>,
    /// Exits of PIDs nobody has registered (yet).
    unclaimed: HashMap<i32, Unclaimed>,
}

/// The exit records and the thread filling them.
#[derive(Debug, Default)]
pub struct Reaper {
    state: Mutex<State>,
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

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn run(&self) {
        loop {
            // Wait for a child to end without reaping it, so that the
            // reaping below and its sequence number happen under one lock
            // hold, ordered against every SpawnMark.
            // SAFETY: an all-zero siginfo_t is a valid value.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid with a valid siginfo pointer; WNOWAIT leaves
            // the child waitable.
            let ready =
                unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
            if ready == 0 {
                self.reap_ready();
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

    /// Reaps every child that has ended, under the state lock.
    fn reap_ready(&self) {
        let mut state = self.state();
        loop {
            let mut raw = 0;
            // SAFETY: waitpid with a valid status pointer.
            let pid = unsafe { libc::waitpid(-1, &mut raw, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            state.record(pid, decode_status(raw), Instant::now());
        }
    }

    /// Tells the reaper a child now exists, so it stops idling.
    pub fn child_spawned(&self) {
        let (lock, cvar) = &self.spawned;
        *lock.lock().unwrap_or_else(PoisonError::into_inner) = true;
        cvar.notify_one();
    }

    /// Marks the present point of the reap sequence; take it before
    /// spawning a process and pass it to [`Reaper::watch`].
    pub fn mark(&self) -> SpawnMark {
        SpawnMark(self.state().seq)
    }

    /// Registers a process spawned after `mark` and returns its exit
    /// record. An exit of `pid` reaped before `mark` belongs to an earlier
    /// process and is dropped; one reaped after it is this process's.
    pub fn watch(&self, pid: i32, mark: SpawnMark) -> Arc<ProcessExit> {
        let record = Arc::new(ProcessExit::default());
        let mut state = self.state();
        match state.unclaimed.remove(&pid) {
            Some(early) if early.seq > mark.0 => {
                record.set(early.exit);
                return record;
            }
            _ => {}
        }
        state.watched.insert(pid, record.clone());
        record
    }

    /// Sends `signal` to `pid`, whose exit record is `exit`, unless it has
    /// already been reaped: returns `Ok(false)` then. Reaping happens under
    /// the same lock, so the process cannot be reaped, nor its PID handed
    /// to another process, between the look and the kill(2); a look
    /// without the lock raced the reaper, and the kill then failed with
    /// ESRCH (or could reach a new process with the reused PID).
    pub fn signal_unreaped(
        &self,
        pid: i32,
        exit: &ProcessExit,
        signal: i32,
    ) -> std::io::Result<bool> {
        let _reaping = self.state();
        if exit.get().is_some() {
            return Ok(false);
        }
        // SAFETY: kill(2) with a PID that has not been reaped (checked
        // under the reap lock), so it is still this process's.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(true)
    }

    /// How many exits wait unclaimed, and how many processes are watched.
    pub fn counts(&self) -> (usize, usize) {
        let state = self.state();
        (state.unclaimed.len(), state.watched.len())
    }
}

impl State {
    fn record(&mut self, pid: i32, status: i32, seen: Instant) {
        self.seq += 1;
        let exit = Exit {
            status,
            at: SystemTime::now(),
        };
        if let Some(record) = self.watched.remove(&pid) {
            record.set(exit);
            return;
        }
        if self.unclaimed.len() >= UNCLAIMED_MAX {
            self.unclaimed
                .retain(|_, old| seen.duration_since(old.seen) < UNCLAIMED_TTL);
        }
        if self.unclaimed.len() >= UNCLAIMED_MAX {
            // Still full of fresh orphans: drop the oldest half.
            let mut seqs: Vec<u64> = self.unclaimed.values().map(|u| u.seq).collect();
            seqs.sort_unstable();
            let keep_from = seqs[seqs.len() / 2];
            self.unclaimed.retain(|_, old| old.seq >= keep_from);
        }
        self.unclaimed.insert(
            pid,
            Unclaimed {
                exit,
                seq: self.seq,
                seen,
            },
        );
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

    fn record(reaper: &Reaper, pid: i32, status: i32) {
        reaper.state().record(pid, status, Instant::now());
    }

    #[test]
    fn an_exit_reaped_before_the_mark_is_not_the_new_process() {
        let reaper = Reaper::default();
        record(&reaper, 4242, 1);
        let mark = reaper.mark();
        let exit = reaper.watch(4242, mark);
        assert_eq!(exit.get(), None, "the earlier process's exit is stale");
        record(&reaper, 4242, 7);
        assert_eq!(exit.get().map(|e| e.status), Some(7), "its own exit");
        assert_eq!(reaper.counts(), (0, 0), "nothing left behind");
    }

    #[test]
    fn an_exit_reaped_before_registration_is_claimed() {
        let reaper = Reaper::default();
        let mark = reaper.mark();
        record(&reaper, 4243, 3);
        let exit = reaper.watch(4243, mark);
        assert_eq!(exit.get().map(|e| e.status), Some(3));
        assert_eq!(reaper.counts(), (0, 0));
    }

    #[test]
    fn a_reused_pid_gets_a_record_of_its_own() {
        let reaper = Reaper::default();
        let first = reaper.watch(4244, reaper.mark());
        record(&reaper, 4244, 0);
        let second = reaper.watch(4244, reaper.mark());
        record(&reaper, 4244, 137);
        assert_eq!(first.get().map(|e| e.status), Some(0));
        assert_eq!(second.get().map(|e| e.status), Some(137));
    }

    #[test]
    fn a_reaped_process_is_not_signalled() {
        let reaper = Reaper::default();
        let me = i32::try_from(std::process::id()).expect("PID fits i32");
        let exit = reaper.watch(me, reaper.mark());
        // Signal 0 only checks the target exists: this process does.
        assert!(reaper.signal_unreaped(me, &exit, 0).expect("kill(me, 0)"));
        record(&reaper, me, 143);
        assert!(!reaper
            .signal_unreaped(me, &exit, 0)
            .expect("no kill once reaped"));
    }

    #[test]
    fn a_wall_clock_step_does_not_reorder_exits() {
        // Sequence numbers, not SystemTime, decide; an exit stamped with a
        // wall-clock time far in the future before the mark stays stale.
        let reaper = Reaper::default();
        record(&reaper, 4245, 9);
        reaper
            .state()
            .unclaimed
            .get_mut(&4245)
            .expect("recorded")
            .exit
            .at = SystemTime::now() + Duration::from_secs(86_400);
        let exit = reaper.watch(4245, reaper.mark());
        assert_eq!(exit.get(), None);
    }

    #[test]
    fn unclaimed_exits_are_bounded() {
        let reaper = Reaper::default();
        for pid in 1..=(UNCLAIMED_MAX as i32 * 3) {
            record(&reaper, pid, 0);
        }
        let (unclaimed, watched) = reaper.counts();
        assert!(
            unclaimed <= UNCLAIMED_MAX,
            "{unclaimed} unclaimed exits kept, bound {UNCLAIMED_MAX}"
        );
        assert_eq!(watched, 0);
        // The newest survive the pruning.
        let newest = reaper.watch(UNCLAIMED_MAX as i32 * 3, SpawnMark(0));
        assert!(newest.get().is_some());
    }

    #[test]
    fn statuses_follow_the_shell_convention() {
        assert_eq!(decode_status(3 << 8), 3);
        assert_eq!(decode_status(libc::SIGKILL), 137);
        assert_eq!(decode_status(libc::SIGTERM), 143);
    }
}
