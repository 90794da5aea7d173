//! One process per run directory: an advisory lock (`flock`) on
//! `RUN_DIR/sharedmoe.lock`, held by `train` and by the coordinator for as
//! long as they write there. Two writers would interleave `metrics.jsonl`
//! and overwrite each other's checkpoints, so the second is refused with
//! the holder's pid, host and start time.
//!
//! The kernel releases a `flock` when its process dies, however it dies, so
//! a lock file left by a killed run is free; its contents (the dead holder)
//! are only reported when the lock is taken over. Where the file system has
//! no `flock` (some FUSE mounts) the recorded pid is checked instead, which
//! is only sound on the same host.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The lock file's name inside a run directory.
pub const LOCK_FILE: &str = "sharedmoe.lock";

/// Who holds a run directory (the lock file's contents).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    pub host: String,
    /// Unix seconds.
    pub started: u64,
    /// What the holder is (`train`, `coordinator`).
    pub role: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} pid {} on host {}, started {}",
            self.role,
            self.pid,
            self.host,
            utc(self.started)
        )
    }
}

/// `seconds` since the epoch as `YYYY-MM-DD HH:MM:SS UTC`.
fn utc(seconds: u64) -> String {
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let days = (seconds / 86_400) as i64;
    let rem = seconds % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn this_host() -> String {
    hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// Whether process `pid` exists on this host.
fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The exclusive lock on a run directory; released when dropped (and by
/// the kernel if the process dies).
#[derive(Debug)]
pub struct RunLock {
    file: File,
    path: PathBuf,
}

impl RunLock {
    /// Takes `run_dir`'s lock for `role`, or refuses with who holds it.
    pub fn acquire(run_dir: &Path, role: &str) -> Result<RunLock> {
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        let path = run_dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mut text = String::new();
        // SAFETY: flock on an open descriptor we own.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if locked != 0 {
            let err = std::io::Error::last_os_error();
            file.read_to_string(&mut text).ok();
            let holder = serde_json::from_str::<Holder>(&text).ok();
            match err.raw_os_error() {
                Some(libc::EWOULDBLOCK) => {
                    let who =
                        holder.map_or_else(|| "another process".to_string(), |h| h.to_string());
                    bail!(
                        "{} is in use by {who}: two runs in one directory would overwrite each \
                         other's checkpoints and metrics (wait for it to end, stop it, or choose \
                         another run.dir)",
                        run_dir.display()
                    );
                }
                Some(libc::ENOLCK | libc::EOPNOTSUPP | libc::ENOSYS) => {
                    // No flock here: fall back to the recorded pid.
                    if let Some(h) = holder.filter(|h| h.host == this_host() && alive(h.pid)) {
                        if h.pid != std::process::id() {
                            bail!(
                                "{} is in use by {h} (this file system has no flock; the holder's \
                                 pid is alive)",
                                run_dir.display()
                            );
                        }
                    }
                    tracing::warn!(
                        "{}: no flock on this file system ({err}); the lock is a pid file only",
                        path.display()
                    );
                }
                _ => return Err(err).with_context(|| format!("locking {}", path.display())),
            }
        } else {
            file.read_to_string(&mut text).ok();
            if let Ok(h) = serde_json::from_str::<Holder>(&text) {
                tracing::warn!(
                    "taking over the lock of {} from {h}, which is no longer running",
                    run_dir.display()
                );
            }
        }
        let me = Holder {
            pid: std::process::id(),
            host: this_host(),
            started: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            role: role.to_string(),
        };
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        file.write_all(serde_json::to_string(&me)?.as_bytes())?;
        file.sync_all()
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(RunLock { file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // An empty file says "released cleanly"; the kernel drops the flock
        // when the descriptor closes.
        let _ = self.file.set_len(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_798_761_599), "2026-12-31 23:59:59 UTC");
    }

    #[test]
    fn a_second_lock_in_one_process_is_refused_and_freed_on_drop() {
        let dir = std::env::temp_dir().join(format!("sharedmoe-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = RunLock::acquire(&dir, "train").unwrap();
        // flock locks belong to the open file description: a second open
        // in the same process conflicts too.
        let e = RunLock::acquire(&dir, "train").unwrap_err().to_string();
        assert!(e.contains("is in use by train pid"), "{e}");
        assert!(e.contains(&std::process::id().to_string()), "{e}");
        drop(first);
        assert_eq!(std::fs::read(dir.join(LOCK_FILE)).unwrap().len(), 0);
        let again = RunLock::acquire(&dir, "coordinator").unwrap();
        drop(again);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
