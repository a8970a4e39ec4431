//! stdio: containerd's FIFOs on the host side, the agent's streams on the
//! guest side.
//!
//! This module owns the copying for one process: each output stream the
//! agent sends (`OutputStream`) goes to its FIFO until the stream ends,
//! and the stdin FIFO goes to the agent's `WriteStdin` until end of file,
//! which becomes `CloseStdin`. Nothing is buffered here beyond one chunk:
//! a slow reader of a FIFO holds back the agent's stream, and through it
//! the process's pipe, so a container cannot make the shim hold its
//! output.

use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use moat_protocol::agent::{CloseStdinRequest, OutputStreamRequest, WriteStreamRequest};
use moat_protocol::agent_ttrpc::AgentServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The most one `WriteStdin` call carries.
const STDIN_CHUNK: usize = 64 * 1024;

/// What went wrong copying one stream.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    /// A FIFO could not be opened.
    #[error("open {path}: {source}")]
    Open {
        /// The FIFO.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Writing to or reading from a FIFO failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// Read or write.
        what: &'static str,
        /// The FIFO.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The agent refused or the VM went away.
    #[error("agent {what} for {container}/{exec}: {source}")]
    Agent {
        /// The call.
        what: &'static str,
        /// The container.
        container: String,
        /// The exec, empty for the init.
        exec: String,
        /// The error.
        source: ttrpc::Error,
    },
}

/// Copies one of the agent's output streams (`stderr` or stdout) of
/// process `container`/`exec` to the FIFO or file at `path`, until the
/// stream ends. Returns the bytes copied.
pub async fn copy_output(
    agent: AgentServiceClient,
    container: String,
    exec: String,
    stderr: bool,
    path: PathBuf,
) -> Result<u64, StdioError> {
    let mut out = open_output(&path).await?;
    let request = OutputStreamRequest {
        container_id: container.clone(),
        exec_id: exec.clone(),
        stderr,
        ..Default::default()
    };
    let agent_error = |what, source| StdioError::Agent {
        what,
        container: container.clone(),
        exec: exec.clone(),
        source,
    };
    let mut stream = agent
        .output_stream(ttrpc::context::Context::default(), &request)
        .await
        .map_err(|e| agent_error("output stream", e))?;
    let mut copied = 0u64;
    while let Some(chunk) = stream
        .recv()
        .await
        .map_err(|e| agent_error("output stream", e))?
    {
        if chunk.data.is_empty() {
            continue;
        }
        out.write_all(&chunk.data)
            .await
            .map_err(|source| StdioError::Io {
                what: "write",
                path: path.clone(),
                source,
            })?;
        copied += chunk.data.len() as u64;
    }
    out.flush().await.map_err(|source| StdioError::Io {
        what: "flush",
        path: path.clone(),
        source,
    })?;
    Ok(copied)
}

/// Where output goes: a FIFO through tokio's pipe (readiness-based, so
/// an aborted copy really stops), or a regular file.
type Output = Box<dyn tokio::io::AsyncWrite + Unpin + Send>;

/// Opens where output goes: a FIFO read and write, so the open never
/// waits for a reader and a reader that has not come yet loses nothing;
/// a regular file (containerd's binary log drivers write to one) for
/// appending.
async fn open_output(path: &Path) -> Result<Output, StdioError> {
    let open_error = |source| StdioError::Open {
        path: path.to_path_buf(),
        source,
    };
    let is_fifo = std::fs::metadata(path)
        .map(|m| m.file_type().is_fifo())
        .unwrap_or(false);
    if is_fifo {
        let sender = tokio::net::unix::pipe::OpenOptions::new()
            .read_write(true)
            .open_sender(path)
            .map_err(open_error)?;
        return Ok(Box::new(sender));
    }
    let file = tokio::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .await
        .map_err(open_error)?;
    Ok(Box::new(file))
}

/// Copies the stdin FIFO at `path` to process `container`/`exec` through
/// `WriteStdin`, and closes the process's stdin at end of file. Returns
/// the bytes copied.
pub async fn copy_stdin(
    agent: AgentServiceClient,
    container: String,
    exec: String,
    path: PathBuf,
) -> Result<u64, StdioError> {
    let open_path = path.clone();
    // A blocking open returns once containerd's side is open, so the
    // first read cannot see an end of file that only means "no writer
    // yet". unblock_stdin ends the wait when the process goes first.
    let file = tokio::task::spawn_blocking(move || {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&open_path)
    })
    .await
    .map_err(|e| StdioError::Open {
        path: path.clone(),
        source: std::io::Error::other(e),
    })?
    .map_err(|source| StdioError::Open {
        path: path.clone(),
        source,
    })?;
    let mut input =
        tokio::net::unix::pipe::Receiver::from_file(file).map_err(|source| StdioError::Open {
            path: path.clone(),
            source,
        })?;
    let mut buf = vec![0u8; STDIN_CHUNK];
    let mut copied = 0u64;
    loop {
        let n = input
            .read(&mut buf)
            .await
            .map_err(|source| StdioError::Io {
                what: "read",
                path: path.clone(),
                source,
            })?;
        if n == 0 {
            break;
        }
        let mut sent = 0;
        while sent < n {
            let request = WriteStreamRequest {
                container_id: container.clone(),
                exec_id: exec.clone(),
                data: buf[sent..n].to_vec(),
                ..Default::default()
            };
            let wrote = agent
                .write_stdin(ttrpc::context::Context::default(), &request)
                .await
                .map_err(|source| StdioError::Agent {
                    what: "write stdin",
                    container: container.clone(),
                    exec: exec.clone(),
                    source,
                })?;
            if wrote.len == 0 {
                return Err(StdioError::Io {
                    what: "write",
                    path: path.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::WriteZero,
                        "the agent took no bytes of stdin",
                    ),
                });
            }
            sent += wrote.len as usize;
        }
        copied += n as u64;
    }
    close_stdin(&agent, &container, &exec).await?;
    Ok(copied)
}

/// Closes process `container`/`exec`'s stdin in the guest.
pub async fn close_stdin(
    agent: &AgentServiceClient,
    container: &str,
    exec: &str,
) -> Result<(), StdioError> {
    let request = CloseStdinRequest {
        container_id: container.to_string(),
        exec_id: exec.to_string(),
        ..Default::default()
    };
    agent
        .close_stdin(ttrpc::context::with_timeout(10_000_000_000), &request)
        .await
        .map(|_| ())
        .map_err(|source| StdioError::Agent {
            what: "close stdin",
            container: container.to_string(),
            exec: exec.to_string(),
            source,
        })
}

/// Ends a [`copy_stdin`] still waiting to open its FIFO (containerd never
/// opened its side): opening the write side completes that open, and the
/// copy then sees end of file. A FIFO nobody reads is left alone.
pub fn unblock_stdin(path: &Path) {
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path);
}
