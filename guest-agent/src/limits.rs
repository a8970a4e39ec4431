//! The agent's own file descriptor limit, and what its containers inherit.
//!
//! The agent holds three pipes (or a terminal) per process it runs, plus
//! its connections, so the kernel's default of 1,024 descriptors would cap
//! a pod at a few hundred processes. The agent raises its limit to the
//! kernel's maximum at start; the helper that creates each container
//! puts the original limit back first, so a container whose spec sets no
//! `RLIMIT_NOFILE` inherits what it would have without moat.

use std::io;

/// The environment variable carrying the original limit (`SOFT:HARD`)
/// from the agent to its helpers.
pub const ORIGINAL_NOFILE_ENV: &str = "MOAT_AGENT_ORIGINAL_NOFILE";

/// The most the agent asks for, whatever `fs.nr_open` allows.
const NOFILE_WANTED: u64 = 1 << 20;

fn get_nofile() -> io::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid rlimit pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit)
}

fn set_nofile(soft: u64, hard: u64) -> io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit with a valid rlimit pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Raises the agent's `RLIMIT_NOFILE` to `fs.nr_open` (at most 2^20; to
/// its hard limit where raising that is not permitted) and records the
/// original for the helpers. Call it before any thread starts
/// (it sets an environment variable). Returns the new soft limit.
pub fn raise_nofile() -> Result<u64, String> {
    let original = get_nofile().map_err(|e| format!("getrlimit(RLIMIT_NOFILE): {e}"))?;
    std::env::set_var(
        ORIGINAL_NOFILE_ENV,
        format!("{}:{}", original.rlim_cur, original.rlim_max),
    );
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(original.rlim_max);
    let wanted = nr_open.min(NOFILE_WANTED).max(original.rlim_cur);
    if set_nofile(wanted, wanted.max(original.rlim_max)).is_ok() {
        return Ok(wanted);
    }
    // Without CAP_SYS_RESOURCE (a host test in a container) only the
    // soft limit can rise, up to the hard one.
    set_nofile(original.rlim_max, original.rlim_max).map_err(|e| {
        format!(
            "setrlimit(RLIMIT_NOFILE, {}): {e} (raising it to {wanted} was refused too)",
            original.rlim_max
        )
    })?;
    Ok(original.rlim_max)
}

/// Parses the `SOFT:HARD` value of [`ORIGINAL_NOFILE_ENV`].
fn parse_original(value: &str) -> Result<(u64, u64), String> {
    value
        .split_once(':')
        .and_then(|(soft, hard)| Some((soft.parse::<u64>().ok()?, hard.parse::<u64>().ok()?)))
        .filter(|(soft, hard)| soft <= hard)
        .ok_or_else(|| {
            format!("{ORIGINAL_NOFILE_ENV}={value:?} is not SOFT:HARD with SOFT <= HARD")
        })
}

/// In a helper: puts back the limit the agent started with, if it left
/// one in the environment.
pub fn restore_original_nofile() -> Result<(), String> {
    let Ok(value) = std::env::var(ORIGINAL_NOFILE_ENV) else {
        return Ok(());
    };
    let (soft, hard) = parse_original(&value)?;
    set_nofile(soft, hard).map_err(|e| format!("setrlimit(RLIMIT_NOFILE, {soft}:{hard}): {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_original_limit_is_parsed_or_refused_by_name() {
        assert_eq!(parse_original("1024:4096"), Ok((1024, 4096)));
        for bad in ["12x:4096", "1024", "4096:1024", ""] {
            let err = parse_original(bad).expect_err(bad);
            assert!(err.contains(ORIGINAL_NOFILE_ENV), "{err}");
        }
    }
}
