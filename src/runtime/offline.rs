//! A process cut off from every network, for initialising libtpu on a
//! machine without TPU chips (ahead-of-time compilation).
//!
//! libtpu's `PJRT_Plugin_Initialize` asks the cloud metadata server for the
//! TPU's topology unless `TPU_SKIP_MDS_QUERY` is set, and it may reach for
//! other hosts. [`Offline::enter`] moves the process into a fresh network
//! namespace (only a loopback interface, which is down: nothing can be
//! reached, not even 169.254.169.254), checks that it is there, and sets
//! `TPU_SKIP_MDS_QUERY=1`. An [`Offline`] value is the proof that
//! [`Plugin::initialize_offline`](super::Plugin::initialize_offline) asks
//! for; it re-checks the namespace before initialising.

use super::error::{Error, Result};

/// Proof that this process (its calling thread and every thread it starts
/// later) has no network but loopback and that libtpu skips the metadata
/// query. Made only by [`Offline::enter`] or [`Offline::verify`].
#[derive(Debug)]
pub struct Offline {
    /// How the namespace came to be, for the log (private, so that no
    /// code outside this module can build the proof).
    how: String,
}

const CTX: &str = "cutting this process off the network for offline compilation";

/// Network interfaces of the calling thread's network namespace, from
/// `/proc/thread-self/net/dev`.
pub fn interfaces() -> Result<Vec<String>> {
    let text = std::fs::read_to_string("/proc/thread-self/net/dev")
        .or_else(|_| std::fs::read_to_string("/proc/self/net/dev"))
        .map_err(|e| Error::new(CTX, format!("reading /proc/thread-self/net/dev: {e}")))?;
    Ok(parse_net_dev(&text))
}

/// Interface names from the text of `/proc/net/dev` (two header lines,
/// then `name: counters...`).
fn parse_net_dev(text: &str) -> Vec<String> {
    text.lines()
        .skip(2)
        .filter_map(|l| l.split_once(':').map(|(name, _)| name.trim().to_string()))
        .filter(|n| !n.is_empty())
        .collect()
}

/// Threads of this process (`Threads:` in `/proc/self/status`).
fn thread_count() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
}

fn os_error() -> String {
    std::io::Error::last_os_error().to_string()
}

/// Maps uid/gid 0 in a new user namespace to the caller's (as `unshare -r`).
fn map_root(uid: u32, gid: u32) -> std::result::Result<(), String> {
    let write = |path: &str, text: String| {
        std::fs::write(path, text).map_err(|e| format!("writing {path}: {e}"))
    };
    // Writing gid_map unprivileged needs setgroups denied first (absent on old kernels).
    let _ = std::fs::write("/proc/self/setgroups", "deny");
    write("/proc/self/uid_map", format!("0 {uid} 1"))?;
    write("/proc/self/gid_map", format!("0 {gid} 1"))
}

impl Offline {
    /// How the namespace came to be (`unshare(CLONE_NEWNET)`, ...).
    pub fn how(&self) -> &str {
        &self.how
    }

    /// Moves this process into a fresh network namespace (as root:
    /// `unshare(CLONE_NEWNET)`; otherwise with a new user namespace too,
    /// `CLONE_NEWUSER | CLONE_NEWNET`, as `unshare -rn`), checks that it
    /// has no interface but `lo`, and sets `TPU_SKIP_MDS_QUERY=1`.
    ///
    /// Must run while the process has a single thread: a namespace is a
    /// per-thread attribute, so threads started before it would keep the
    /// network. Anything that cannot be done is an error saying why, and
    /// the caller must not go on.
    pub fn enter() -> Result<Offline> {
        match thread_count() {
            Some(1) => {}
            Some(n) => {
                return Err(Error::new(
                    CTX,
                    format!(
                        "the process already runs {n} threads, which would keep the network; \
                         the namespace must be created before any thread starts"
                    ),
                ))
            }
            None => {
                return Err(Error::new(
                    CTX,
                    "cannot read /proc/self/status to count this process's threads",
                ))
            }
        }
        // SAFETY: unshare and getuid/getgid only change or read this
        // process's own attributes.
        let how = if unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0 {
            "unshare(CLONE_NEWNET)".to_string()
        } else {
            let as_root = os_error();
            let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
            if unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) } != 0 {
                return Err(Error::new(
                    CTX,
                    format!(
                        "cannot create a network namespace (unshare(CLONE_NEWNET): {as_root}; \
                         unshare(CLONE_NEWUSER|CLONE_NEWNET): {}); refusing to initialise libtpu, \
                         which could query the cloud metadata server. Run as root, or allow \
                         unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, \
                         or on Ubuntu 24.04 kernel.apparmor_restrict_unprivileged_userns=0)",
                        os_error()
                    ),
                ));
            }
            if let Err(e) = map_root(uid, gid) {
                tracing::debug!("user namespace without an id mapping: {e}");
            }
            "unshare(CLONE_NEWUSER|CLONE_NEWNET)".to_string()
        };
        // Single-threaded here (checked above), so changing the
        // environment races with nothing.
        std::env::set_var("TPU_SKIP_MDS_QUERY", "1");
        let mut proof = Offline::verify()?;
        proof.how = how;
        Ok(proof)
    }

    /// Checks, without changing anything, that the calling thread's
    /// network namespace has no interface but `lo` and that
    /// `TPU_SKIP_MDS_QUERY=1` is set (e.g. a process started under
    /// `unshare -rn` with the variable).
    pub fn verify() -> Result<Offline> {
        let found = interfaces()?;
        let others: Vec<&String> = found.iter().filter(|n| n.as_str() != "lo").collect();
        if !others.is_empty() {
            return Err(Error::new(
                CTX,
                format!(
                    "this process can reach a network (interfaces {}); refusing to initialise \
                     libtpu, which could query the cloud metadata server",
                    others
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        if std::env::var("TPU_SKIP_MDS_QUERY").as_deref() != Ok("1") {
            return Err(Error::new(
                CTX,
                "TPU_SKIP_MDS_QUERY is not 1; refusing to initialise libtpu, which would query \
                 the cloud metadata server",
            ));
        }
        Ok(Offline {
            how: "an existing network namespace".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_dev_names() {
        let text = "Inter-|   Receive                            |  Transmit\n \
            face |bytes    packets errs drop fifo frame compressed multicast|bytes\n    \
            lo:       0       0    0    0    0     0          0         0        0\n  \
            eth0: 1234 5 0 0 0 0 0 0 99\n";
        assert_eq!(parse_net_dev(text), vec!["lo", "eth0"]);
    }
}
