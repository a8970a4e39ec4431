//! OOM events: which container's cgroup had a process killed for memory.
//!
//! With cgroup v2 the kernel counts OOM kills in each cgroup's
//! `memory.events` (`oom_kill N`) and notifies inotify watchers when the
//! file changes. One thread reads one inotify instance for every
//! container and queues an event whenever a count rises; the shim
//! long-polls them with `GetOomEvent`. (cgroup v1 has no such file: on a
//! v1 host, containers are created but not watched.)

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::sync::mpsc;

#[derive(Debug)]
struct Watched {
    container_id: String,
    events_file: PathBuf,
    oom_kills: u64,
}

/// The OOM watcher of all containers.
pub struct OomWatcher {
    inotify: Inotify,
    watched: Mutex<HashMap<WatchDescriptor, Watched>>,
    sender: mpsc::UnboundedSender<String>,
    receiver: tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>,
}

impl std::fmt::Debug for OomWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OomWatcher").finish_non_exhaustive()
    }
}

/// The `oom_kill` count in a `memory.events` file (0 if absent).
pub fn oom_kills(events_file: &Path) -> u64 {
    std::fs::read_to_string(events_file)
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

impl OomWatcher {
    /// Starts the watcher thread.
    pub fn start() -> std::io::Result<Arc<OomWatcher>> {
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC)?;
        let (sender, receiver) = mpsc::unbounded_channel();
        let watcher = Arc::new(OomWatcher {
            inotify,
            watched: Mutex::new(HashMap::new()),
            sender,
            receiver: tokio::sync::Mutex::new(receiver),
        });
        let worker = watcher.clone();
        std::thread::Builder::new()
            .name("oom-watcher".into())
            .spawn(move || worker.run())?;
        Ok(watcher)
    }

    fn run(&self) {
        loop {
            let events = match self.inotify.read_events() {
                Ok(events) => events,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    eprintln!("moat-agent: OOM watcher stopped: {e}");
                    return;
                }
            };
            let mut watched = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
            for event in events {
                let Some(entry) = watched.get_mut(&event.wd) else {
                    continue;
                };
                let now = oom_kills(&entry.events_file);
                if now > entry.oom_kills {
                    entry.oom_kills = now;
                    let _ = self.sender.send(entry.container_id.clone());
                }
            }
        }
    }

    /// Watches the cgroup directory of a container, if it has
    /// `memory.events` (cgroup v2). Returns whether it is watched.
    pub fn watch(&self, container_id: &str, cgroup_dir: &Path) -> std::io::Result<bool> {
        let events_file = cgroup_dir.join("memory.events");
        if !events_file.exists() {
            return Ok(false);
        }
        let wd = self
            .inotify
            .add_watch(&events_file, AddWatchFlags::IN_MODIFY)?;
        self.watched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                wd,
                Watched {
                    container_id: container_id.to_string(),
                    oom_kills: oom_kills(&events_file),
                    events_file,
                },
            );
        Ok(true)
    }

    /// Stops watching a container.
    pub fn unwatch(&self, container_id: &str) {
        let mut watched = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
        let wds: Vec<WatchDescriptor> = watched
            .iter()
            .filter(|(_, w)| w.container_id == container_id)
            .map(|(wd, _)| *wd)
            .collect();
        for wd in wds {
            watched.remove(&wd);
            // The cgroup may already be gone, which removes the watch.
            let _ = self.inotify.rm_watch(wd);
        }
    }

    /// Waits for the next OOM kill and returns the container's ID.
    pub async fn next(&self) -> Option<String> {
        self.receiver.lock().await.recv().await
    }
}
