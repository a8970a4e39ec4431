//! Byte streams whose content can be checked at the far end: a seeded
//! pseudo-random generator (cheap enough for a TCG guest), SHA-256 of what
//! was sent or received, and an echo round trip.

use std::io::{self, Read, Write};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// A deterministic stream of bytes (xorshift64*), the same for a seed
/// however it is split into reads.
pub struct PatternStream {
    state: u64,
    word: [u8; 8],
    /// Bytes of `word` already handed out.
    used: usize,
}

impl PatternStream {
    /// The stream for `seed` (any value; 0 is mapped to a fixed non-zero one).
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed.max(1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            word: [0; 8],
            used: 8,
        }
    }

    /// Fills `buf` with the next bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for byte in buf.iter_mut() {
            if self.used == 8 {
                self.state ^= self.state >> 12;
                self.state ^= self.state << 25;
                self.state ^= self.state >> 27;
                self.word = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
                self.used = 0;
            }
            *byte = self.word[self.used];
            self.used += 1;
        }
    }
}

/// Lower-case hex of a digest.
pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// How long a host-side transfer may make no progress before it counts as
/// stalled: far below the harness's run timeout, so that a stall is
/// reported (and the VMM's device state dumped) while the VM still runs.
pub const HOST_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The same for the guest's side: longer than the host's, so that the
/// host notices a stall first and the guest's report follows it.
pub const GUEST_STALL_TIMEOUT: Duration = Duration::from_secs(45);

/// Whether `e` is a socket timeout, i.e. the transfer made no progress.
pub fn is_stall(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A socket whose reads and writes can be bounded in time: one that makes
/// no progress for the bound then fails with a timeout ([`is_stall`]).
pub trait BoundedSocket {
    /// Sets the read and write timeouts to `limit`.
    fn bound(&self, limit: Duration) -> io::Result<()>;
}

impl BoundedSocket for std::net::TcpStream {
    fn bound(&self, limit: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(limit))?;
        self.set_write_timeout(Some(limit))
    }
}

impl BoundedSocket for std::os::unix::net::UnixStream {
    fn bound(&self, limit: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(limit))?;
        self.set_write_timeout(Some(limit))
    }
}

fn with_progress(e: io::Error, what: &str, done: u64) -> io::Error {
    let stalled = if is_stall(&e) {
        " (stalled: no progress within the socket timeout)"
    } else {
        ""
    };
    io::Error::new(e.kind(), format!("{e} after {done} bytes {what}{stalled}"))
}

/// Writes `total` pattern bytes for `seed` to `out`; returns their SHA-256.
/// An error says how many bytes had gone and whether the stream stalled.
pub fn send_pattern(out: &mut impl Write, seed: u64, total: u64) -> io::Result<String> {
    let mut pattern = PatternStream::new(seed);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = total;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        pattern.fill(&mut buf[..n]);
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| with_progress(e, "sent", total - left))?;
        left -= n as u64;
    }
    out.flush().map_err(|e| with_progress(e, "sent", total))?;
    Ok(hex(&hasher.finalize()))
}

/// Reads `input` to its end; returns the byte count and SHA-256. An error
/// says how many bytes had come and whether the stream stalled.
pub fn receive_all(input: &mut impl Read) -> io::Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(with_progress(e, "received", total)),
        }
    }
    Ok((total, hex(&hasher.finalize())))
}

/// Echoes `stream` back to itself until the peer stops sending.
pub fn echo<S: Read + Write>(stream: &mut S) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => {
                stream.write_all(&buf[..n])?;
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Sends `total` pattern bytes for `seed` on `writer` while `reader`
/// (the same connection) reads the echo; fails unless the echo is exact.
pub fn echo_round_trip<W, R>(
    mut writer: W,
    mut reader: R,
    seed: u64,
    total: u64,
    finish: impl FnOnce(W) + Send + 'static,
) -> io::Result<()>
where
    W: Write + Send + 'static,
    R: Read,
{
    let sender = std::thread::spawn(move || -> io::Result<()> {
        send_pattern(&mut writer, seed, total)?;
        finish(writer);
        Ok(())
    });
    let mut expected = PatternStream::new(seed);
    let mut got = vec![0u8; 64 * 1024];
    let mut want = vec![0u8; 64 * 1024];
    let mut seen = 0u64;
    while seen < total {
        let n = reader.read(&mut got)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("echo ended after {seen} of {total} bytes"),
            ));
        }
        expected.fill(&mut want[..n]);
        if let Some(i) = (0..n).find(|&i| got[i] != want[i]) {
            let end = (i + 8).min(n);
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "echo differs at byte {} (read of {n} at {seen}): got {} want {}",
                    seen + i as u64,
                    hex(&got[i..end]),
                    hex(&want[i..end])
                ),
            ));
        }
        seen += n as u64;
    }
    sender
        .join()
        .map_err(|_| io::Error::other("sender panicked"))??;
    Ok(())
}

/// Runs `count` echo round trips of `total` bytes at once, each on its
/// own connection from `connect(i)` with pattern seed `seed_base + i`;
/// fails with every connection's error if any fails.
pub fn concurrent_echo_clients<C>(
    count: u64,
    seed_base: u64,
    total: u64,
    connect: C,
) -> Result<(), String>
where
    C: Fn(u64) -> io::Result<std::os::unix::net::UnixStream> + Send + Sync + 'static,
{
    let connect = std::sync::Arc::new(connect);
    let clients: Vec<_> = (0..count)
        .map(|i| {
            let connect = connect.clone();
            std::thread::spawn(move || -> Result<(), String> {
                let conn = connect(i).map_err(|e| format!("connect {i}: {e}"))?;
                let writer = conn.try_clone().map_err(|e| e.to_string())?;
                echo_round_trip(writer, conn, seed_base + i, total, |w| {
                    let _ = w.shutdown(std::net::Shutdown::Write);
                })
                .map_err(|e| format!("connection {i}: {e}"))
            })
        })
        .collect();
    let failures: Vec<String> = clients
        .into_iter()
        .filter_map(|c| c.join().unwrap_or_else(|_| Err("panicked".into())).err())
        .collect();
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_deterministic_and_split_independent() {
        let mut a = PatternStream::new(7);
        let mut whole = [0u8; 24];
        a.fill(&mut whole);
        let mut b = PatternStream::new(7);
        let mut parts = [0u8; 24];
        b.fill(&mut parts[..3]);
        b.fill(&mut parts[3..13]);
        b.fill(&mut parts[13..]);
        assert_eq!(whole, parts);
        let mut c = PatternStream::new(8);
        let mut other = [0u8; 24];
        c.fill(&mut other);
        assert_ne!(whole, other);
    }

    #[test]
    fn sent_and_received_hashes_agree() {
        let mut sent = Vec::new();
        let hash = send_pattern(&mut sent, 3, 200_000).unwrap();
        let (n, received) = receive_all(&mut sent.as_slice()).unwrap();
        assert_eq!((n, received), (200_000, hash));
    }

    #[test]
    fn a_silent_peer_is_reported_as_a_stall_with_the_bytes_so_far() {
        let (mut writer, mut reader) = std::os::unix::net::UnixStream::pair().unwrap();
        writer.write_all(&[1u8; 1000]).unwrap();
        reader
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let err = receive_all(&mut reader).unwrap_err();
        assert!(is_stall(&err), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("after 1000 bytes received (stalled"), "{msg}");
    }

    #[test]
    fn echo_round_trip_over_a_socket_pair() {
        let (client, mut server) = std::os::unix::net::UnixStream::pair().unwrap();
        let echoer = std::thread::spawn(move || echo(&mut server).unwrap());
        let writer = client.try_clone().unwrap();
        echo_round_trip(writer, client, 5, 300_000, |w| {
            w.shutdown(std::net::Shutdown::Write).unwrap()
        })
        .unwrap();
        assert_eq!(echoer.join().unwrap(), 300_000);
    }
}
