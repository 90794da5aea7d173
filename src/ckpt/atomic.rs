//! Writing a directory of files so that a reader sees the old directory
//! or the new one, never a mix: a temporary sibling, every file and the
//! directory fsynced, renamed into place (the old one moved aside, then
//! removed), the parent fsynced. Checkpoints and Hugging Face exports are
//! both written this way.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// Writes `bytes` to `path` and fsyncs it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", path.display()))
}

/// Fsyncs a directory, so that the entries renamed into it last.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

/// Replaces the directory `dir` (created if absent) by one holding exactly
/// `files` (name, bytes). A failed write (a full disk) removes its partial
/// copy, so that it does not take up the space the next attempt needs, and
/// leaves `dir` as it was.
pub fn install_dir<N: AsRef<str>>(dir: &Path, files: &[(N, Vec<u8>)]) -> Result<()> {
    install_dir_with(dir, |tmp| write_dir(tmp, files))
}

/// [`install_dir`] for files written by `write` into the (existing, empty)
/// temporary directory it is given, which must fsync them: for contents
/// streamed to disk rather than held in memory.
pub fn install_dir_with<T>(dir: &Path, write: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = dir
        .file_name()
        .with_context(|| format!("{}: the path has no name", dir.display()))?
        .to_string_lossy()
        .to_string();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    let written = fs::create_dir_all(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))
        .and_then(|()| write(&tmp))
        .and_then(|t| sync_dir(&tmp).map(|()| t));
    let value = match written {
        Ok(v) => v,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if dir.exists() {
        fs::rename(dir, &old).with_context(|| format!("moving the old {} aside", dir.display()))?;
    }
    fs::rename(&tmp, dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    sync_dir(parent)?;
    if old.exists() {
        fs::remove_dir_all(&old)?;
    }
    Ok(value)
}

fn write_dir<N: AsRef<str>>(tmp: &Path, files: &[(N, Vec<u8>)]) -> Result<()> {
    for (file, bytes) in files {
        write_synced(&tmp.join(file.as_ref()), bytes)?;
    }
    Ok(())
}
