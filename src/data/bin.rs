//! `.bin` token files (nanoGPT convention, DESIGN.md): raw little-endian
//! uint16 (or uint32) tokens. Window w = tokens[w*(S+1) .. (w+1)*(S+1)];
//! global step t uses windows t*B .. t*B+B-1, wrapping over whole windows;
//! replica r takes rows r*B/R .. (r+1)*B/R - 1. The file is memory-mapped,
//! so its size does not matter.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The width of one token in a `.bin` file: `data.token_dtype` in a run
/// config, spelt by the serde names `u16` (nanoGPT) and `u32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenWidth {
    U16,
    U32,
}

impl std::str::FromStr for TokenWidth {
    type Err = serde::de::value::Error;
    fn from_str(s: &str) -> std::result::Result<TokenWidth, Self::Err> {
        use serde::de::IntoDeserializer;
        serde::Deserialize::deserialize(s.into_deserializer())
    }
}

impl TokenWidth {
    fn bytes(self) -> usize {
        match self {
            TokenWidth::U16 => 2,
            TokenWidth::U32 => 4,
        }
    }
}

pub struct TokenFile {
    path: PathBuf,
    map: memmap2::Mmap,
    width: TokenWidth,
}

impl TokenFile {
    pub fn open(path: &Path, width: TokenWidth) -> Result<TokenFile> {
        let file = File::open(path).with_context(|| path.display().to_string())?;
        let len = file
            .metadata()
            .with_context(|| path.display().to_string())?
            .len();
        if len % width.bytes() as u64 != 0 {
            bail!(
                "{}: {len} bytes is not a whole number of {:?} tokens (wrong data.token_dtype?)",
                path.display(),
                width
            );
        }
        // SAFETY: the file is opened read-only; a concurrent writer could
        // change the bytes under us, which only changes token values.
        let map =
            unsafe { memmap2::Mmap::map(&file) }.with_context(|| path.display().to_string())?;
        Ok(TokenFile {
            path: path.to_path_buf(),
            map,
            width,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn num_tokens(&self) -> usize {
        self.map.len() / self.width.bytes()
    }

    pub fn token(&self, i: usize) -> u32 {
        let b = &self.map[i * self.width.bytes()..];
        match self.width {
            TokenWidth::U16 => u16::from_le_bytes([b[0], b[1]]) as u32,
            TokenWidth::U32 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        }
    }

    /// Whole windows of `seq + 1` tokens in the file.
    pub fn num_windows(&self, seq: i64) -> i64 {
        (self.num_tokens() / (seq as usize + 1)) as i64
    }

    /// Refuses a file that cannot fill one batch, or whose tokens are not
    /// below `vocab`.
    pub fn check(&self, seq: i64, batch: i64, vocab: i64) -> Result<()> {
        let windows = self.num_windows(seq);
        if windows < batch {
            bail!(
                "{}: {} tokens make {windows} windows of {} tokens, fewer than one batch of {batch} sequences",
                self.path.display(),
                self.num_tokens(),
                seq + 1
            );
        }
        // Sample the file (all of it when small) for out-of-vocabulary ids.
        let n = self.num_tokens();
        let stride = (n / 1_000_000).max(1);
        if let Some(i) = (0..n)
            .step_by(stride)
            .find(|&i| self.token(i) as i64 >= vocab)
        {
            bail!(
                "{}: token {} at position {i} is >= model.vocab_size {vocab}",
                self.path.display(),
                self.token(i)
            );
        }
        Ok(())
    }

    /// Rows `first .. first + count` of global batch `step` ([count, S+1],
    /// row-major, as i32), wrapping over whole windows.
    pub fn batch_rows(&self, step: i64, batch: i64, seq: i64, first: i64, count: i64) -> Vec<i32> {
        let windows = self.num_windows(seq);
        let w = (seq + 1) as usize;
        let mut out = Vec::with_capacity(count as usize * w);
        for row in first..first + count {
            let window = ((step * batch + row) % windows) as usize;
            out.extend((window * w..(window + 1) * w).map(|i| self.token(i) as i32));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(tokens: &[u16]) -> PathBuf {
        let p = std::env::temp_dir().join(format!(
            "sharedmoe-bin-{}-{}.bin",
            std::process::id(),
            tokens.len()
        ));
        std::fs::write(
            &p,
            tokens
                .iter()
                .flat_map(|t| t.to_le_bytes())
                .collect::<Vec<u8>>(),
        )
        .unwrap();
        p
    }

    #[test]
    fn windows_batches_and_wrapping() {
        let p = write(&(0..20).collect::<Vec<u16>>());
        let f = TokenFile::open(&p, TokenWidth::U16).unwrap();
        assert_eq!(f.num_windows(3), 5); // windows of 4 tokens
                                         // step 1, batch 2: windows 2 and 3
        assert_eq!(
            f.batch_rows(1, 2, 3, 0, 2),
            vec![8, 9, 10, 11, 12, 13, 14, 15]
        );
        // step 2, batch 3: windows 6, 7, 8 wrap to 1, 2, 3; replica 1 of 3 takes row 1.
        assert_eq!(f.batch_rows(2, 3, 3, 1, 1), vec![8, 9, 10, 11]);
        f.check(3, 5, 20).unwrap();
        let e = f.check(3, 6, 20).unwrap_err().to_string();
        assert!(
            e.contains("5 windows") && e.contains("fewer than one batch of 6"),
            "{e}"
        );
        let e = f.check(3, 2, 10).unwrap_err().to_string();
        assert!(e.contains(">= model.vocab_size 10"), "{e}");
        std::fs::remove_file(p).unwrap();
        let odd = std::env::temp_dir().join(format!("sharedmoe-odd-{}.bin", std::process::id()));
        std::fs::write(&odd, [1u8, 2, 3]).unwrap();
        let e = TokenFile::open(&odd, TokenWidth::U16)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("3 bytes"), "{e}");
        std::fs::remove_file(odd).unwrap();
    }
}
