//! Byte-level tokenisation (vocabulary 256): the simplest real tokenizer,
//! enough to train the tiny configs on any text with no tokenizer file.
//! Writes `train.bin` and `val.bin` (u16, DESIGN.md layout), holding out
//! the last `val_fraction` of the bytes.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Summary of what was written.
#[derive(Debug, PartialEq, Eq)]
pub struct Written {
    pub train_tokens: usize,
    pub val_tokens: usize,
    pub train: PathBuf,
    pub val: PathBuf,
}

pub fn text_to_byte_tokens(
    inputs: &[PathBuf],
    out_dir: &Path,
    val_fraction: f64,
) -> Result<Written> {
    if !(0.0..1.0).contains(&val_fraction) {
        bail!("--val-fraction {val_fraction}: expected a value in [0, 1)");
    }
    let mut bytes = vec![];
    for p in inputs {
        bytes.extend(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?);
    }
    if bytes.is_empty() {
        bail!("no input bytes (inputs: {inputs:?})");
    }
    let cut = bytes.len() - (bytes.len() as f64 * val_fraction) as usize;
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let write = |name: &str, part: &[u8]| -> Result<PathBuf> {
        let path = out_dir.join(name);
        let tmp = out_dir.join(format!(".{name}.tmp"));
        super::prepare::remove_stale_temp(&tmp)?;
        let data: Vec<u8> = part
            .iter()
            .flat_map(|&b| (b as u16).to_le_bytes())
            .collect();
        let written = std::fs::write(&tmp, data)
            .with_context(|| format!("writing {}", tmp.display()))
            .and_then(|()| {
                std::fs::rename(&tmp, &path)
                    .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
            });
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written?;
        Ok(path)
    };
    Ok(Written {
        train_tokens: cut,
        val_tokens: bytes.len() - cut,
        train: write("train.bin", &bytes[..cut])?,
        val: write("val.bin", &bytes[cut..])?,
    })
}
