//! Starting moat-vmm's device threads, each under its own seccomp filter.
//!
//! A thread keeps its creator's seccomp filter on top of its own, so a
//! device worker started where a vCPU activates the device would be held
//! to the vCPU's filter too. Instead, once the VM runs, every device
//! thread is started by the main thread ([`Spawner::serve`], Cloud
//! Hypervisor's model): a vCPU thread (marked by [`route_to_spawner`])
//! sends the thread's body over a channel and waits for its handle.
//! Every other thread, and a vCPU in a program with no spawner (tests,
//! fuzzing), starts threads where it is.

use std::cell::Cell;
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;

use crate::seccomp::{self, ThreadKind};

type Body = Box<dyn FnOnce() + Send + 'static>;

struct Request {
    name: String,
    body: Body,
    reply: mpsc::Sender<std::io::Result<JoinHandle<()>>>,
}

/// What a thread sends the spawner: a request, or "stop serving".
enum Message {
    Spawn(Request),
    Stop,
}

/// The registered spawner's channel: `None` before one registers, and
/// `Some(None)` once it stopped serving.
type Registry = Mutex<Option<Option<mpsc::Sender<Message>>>>;

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(None))
}

thread_local! {
    static ROUTED: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread as one whose thread starts go to the
/// registered spawner (a vCPU, whose filter its children must not hold).
pub fn route_to_spawner() {
    ROUTED.with(|r| r.set(true));
}

/// The main thread's end of the spawn channel.
pub struct Spawner {
    receiver: mpsc::Receiver<Message>,
}

impl Spawner {
    /// Registers the calling thread as the one that starts device threads
    /// for routed threads from now on. Requests queue until
    /// [`Spawner::serve`] runs.
    pub fn register() -> Self {
        let (sender, receiver) = mpsc::channel();
        *registry().lock().unwrap_or_else(|p| p.into_inner()) = Some(Some(sender));
        Self { receiver }
    }

    /// A handle that ends [`Spawner::serve`] when its `stop` is called.
    pub fn stopper(&self) -> SpawnerStop {
        let sender = registry()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .flatten();
        SpawnerStop { sender }
    }

    /// Closes without serving (the VM failed to start): requests already
    /// made and any made later fail at once.
    pub fn close(self) {
        *registry().lock().unwrap_or_else(|p| p.into_inner()) = Some(None);
    }

    /// Starts the threads asked for until a [`SpawnerStop`] says stop; then
    /// closes, so a routed request that comes later fails at once instead
    /// of waiting for ever or starting under a vCPU's filter.
    pub fn serve(self) {
        for message in &self.receiver {
            match message {
                Message::Spawn(request) => {
                    let handle = std::thread::Builder::new()
                        .name(request.name)
                        .spawn(request.body);
                    let _ = request.reply.send(handle);
                }
                Message::Stop => break,
            }
        }
        *registry().lock().unwrap_or_else(|p| p.into_inner()) = Some(None);
        // Requests still queued are dropped with their reply channels:
        // their senders see an error.
    }
}

/// Ends the spawner's service; cheap to clone, callable from any thread.
#[derive(Clone)]
pub struct SpawnerStop {
    sender: Option<mpsc::Sender<Message>>,
}

impl SpawnerStop {
    /// Asks the spawner to stop serving.
    pub fn stop(&self) {
        if let Some(sender) = &self.sender {
            let _ = sender.send(Message::Stop);
        }
    }
}

/// Starts `body` on a thread named `name` that first installs `kind`'s
/// seccomp filter; through the spawner if the calling thread is routed
/// and a spawner was registered. A filter that cannot be installed ends
/// the VMM: a device thread never runs unconfined.
pub fn spawn(
    kind: ThreadKind,
    name: String,
    body: impl FnOnce() + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    let body: Body = Box::new(move || {
        if let Err(e) = seccomp::apply(kind) {
            crate::log_line!("moat-vmm: error: {e}");
            std::process::exit(1);
        }
        body()
    });
    let gone = || std::io::Error::other("the VMM is stopping: no more threads are started");
    let registered = if ROUTED.with(Cell::get) {
        registry().lock().unwrap_or_else(|p| p.into_inner()).clone()
    } else {
        None
    };
    let sender = match registered {
        None => return std::thread::Builder::new().name(name).spawn(body),
        Some(None) => return Err(gone()),
        Some(Some(sender)) => sender,
    };
    let (reply, answer) = mpsc::channel();
    sender
        .send(Message::Spawn(Request { name, body, reply }))
        .map_err(|_| gone())?;
    answer.recv().map_err(|_| gone())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_a_routed_thread_asks_for_start_on_the_serving_thread() {
        // Filters stay off in tests (the library's default).
        assert_eq!(crate::seccomp::mode(), crate::seccomp::Mode::Off);
        let spawner = Spawner::register();
        let stopper = spawner.stopper();
        let serving = std::thread::current().id();
        let asker = std::thread::spawn(move || {
            route_to_spawner();
            let (tx, rx) = mpsc::channel();
            let handle = spawn(
                ThreadKind::QueueWorker,
                "moat_test_child".into(),
                move || {
                    let _ = tx.send(std::thread::current().name().map(String::from));
                },
            )
            .unwrap();
            // The serving thread started it: it is that thread's child,
            // which the handle cannot show; its name and the fact that
            // the serving thread was busy in serve() do.
            handle.join().unwrap();
            let name = rx.recv().unwrap();
            stopper.stop();
            // Once the spawner stopped, a routed request fails at once.
            while spawn(ThreadKind::QueueWorker, "late".into(), || {}).is_ok() {
                std::thread::yield_now();
            }
            name
        });
        spawner.serve();
        assert_eq!(std::thread::current().id(), serving);
        assert_eq!(asker.join().unwrap().as_deref(), Some("moat_test_child"));
        // A thread that is not routed starts threads where it is.
        let handle = spawn(ThreadKind::QueueWorker, "moat_after".into(), || {}).unwrap();
        handle.join().unwrap();
    }
}
