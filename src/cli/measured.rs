//! Child processes measured from outside: exit status, stdout and the
//! child's own peak resident memory (`wait4`'s `ru_maxrss`), so that each
//! benchmark variant's memory is its own and not the largest of a run.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// What a finished child left.
pub struct Measured {
    /// Exit code 0.
    pub success: bool,
    /// "exit status 1", "killed by signal 9 (out of memory?)".
    pub status: String,
    pub stdout: String,
    /// Peak resident set size of the child, in bytes.
    pub peak_rss: u64,
    pub wall: Duration,
}

/// Runs `cmd` to completion with stdout captured (stderr is inherited, so
/// its progress and logs show) and returns its status and peak RSS.
pub fn run(cmd: &mut Command) -> Result<Measured> {
    let began = Instant::now();
    // Reaped by the wait4 below: std's wait gives no rusage.
    #[allow(clippy::zombie_processes)]
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let mut stdout = String::new();
    // The variants print a few lines; reading to the end before waiting
    // cannot block on a full pipe.
    child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut stdout)
        .context("reading the child's stdout")?;
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid value; wait4 fills it for our own
    // child, which nothing else has waited for.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    if pid != child.id() as i32 {
        anyhow::bail!("waiting for {cmd:?}: {}", std::io::Error::last_os_error());
    }
    let (success, status) = if libc::WIFEXITED(status) {
        let code = libc::WEXITSTATUS(status);
        (code == 0, format!("exit status {code}"))
    } else if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        let hint = if sig == libc::SIGKILL {
            " (out of memory?)"
        } else {
            ""
        };
        (false, format!("killed by signal {sig}{hint}"))
    } else {
        (false, format!("wait status {status}"))
    };
    Ok(Measured {
        success,
        status,
        stdout,
        // Linux reports kilobytes.
        peak_rss: usage.ru_maxrss as u64 * 1024,
        wall: began.elapsed(),
    })
}
