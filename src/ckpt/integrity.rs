//! What makes a checkpoint's bytes trustworthy: the sha256 and size of
//! every file, recorded in `state.json` when it is written and checked when
//! it is read, and finite values in every tensor (a NaN or infinite weight
//! is never written and never loaded: it is a diverged or corrupted state,
//! not one to continue).

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// One file's fingerprint in `state.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub sha256: String,
    pub bytes: u64,
}

impl FileDigest {
    pub fn of(bytes: &[u8]) -> FileDigest {
        FileDigest {
            sha256: crate::digest::sha256_hex(bytes),
            bytes: bytes.len() as u64,
        }
    }
}

/// Checks every file `digests` names against its recorded size and sha256.
/// `files` holds the checkpoint's files (name, bytes); `where_` names the
/// checkpoint in errors.
pub fn check_digests(
    where_: &str,
    digests: &BTreeMap<String, FileDigest>,
    files: &[(String, Vec<u8>)],
) -> Result<()> {
    for (name, want) in digests {
        let Some((_, bytes)) = files.iter().find(|(n, _)| n == name) else {
            bail!("{where_}{name}: missing (state.json records it)");
        };
        let got = FileDigest::of(bytes);
        if got.bytes != want.bytes {
            bail!(
                "{where_}{name}: {} bytes, but state.json records {}: the file is truncated or was changed",
                got.bytes,
                want.bytes
            );
        }
        if got.sha256 != want.sha256 {
            bail!(
                "{where_}{name}: sha256 {} does not match the {} recorded in state.json: the file is corrupt or was changed",
                got.sha256,
                want.sha256
            );
        }
    }
    Ok(())
}

/// Where the first non-finite value of a tensor is, and how many there are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NonFinite {
    pub first: usize,
    pub count: usize,
}

/// The non-finite values among little-endian f32 `bytes`, if any.
pub fn non_finite_le_f32(bytes: &[u8]) -> Option<NonFinite> {
    scan(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
    )
}

/// The non-finite values among `values`, if any.
pub fn non_finite(values: &[f32]) -> Option<NonFinite> {
    scan(values.iter().copied())
}

fn scan(values: impl Iterator<Item = f32>) -> Option<NonFinite> {
    let mut found: Option<NonFinite> = None;
    for (i, v) in values.enumerate() {
        if !v.is_finite() {
            match &mut found {
                Some(f) => f.count += 1,
                None => found = Some(NonFinite { first: i, count: 1 }),
            }
        }
    }
    found
}

/// The error for tensor `name` of `file` holding non-finite values.
pub fn non_finite_error(file: &str, name: &str, len: usize, nf: NonFinite) -> anyhow::Error {
    anyhow::anyhow!(
        "{file}: tensor `{name}` holds {} non-finite value(s) of {len} (the first at index {}): \
         a diverged or corrupted state",
        nf.count,
        nf.first
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_catch_one_flipped_bit_and_truncation() {
        let data = vec![7u8; 1000];
        let digests = BTreeMap::from([("model.safetensors".to_string(), FileDigest::of(&data))]);
        let ok = vec![("model.safetensors".to_string(), data.clone())];
        check_digests("", &digests, &ok).unwrap();
        let mut flipped = data.clone();
        flipped[500] ^= 0x01;
        let e = check_digests("", &digests, &[("model.safetensors".into(), flipped)]).unwrap_err();
        assert!(e.to_string().contains("sha256"), "{e}");
        let e = check_digests(
            "",
            &digests,
            &[("model.safetensors".into(), data[..999].to_vec())],
        )
        .unwrap_err();
        assert!(e.to_string().contains("999 bytes"), "{e}");
        let e = check_digests("", &digests, &[]).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }

    #[test]
    fn finds_every_kind_of_non_finite_value() {
        assert_eq!(non_finite(&[1.0, -2.0, f32::MAX, f32::MIN_POSITIVE]), None);
        let v = [0.0, f32::NAN, 1.0, f32::INFINITY, f32::NEG_INFINITY];
        assert_eq!(non_finite(&v), Some(NonFinite { first: 1, count: 3 }));
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(non_finite_le_f32(&bytes), non_finite(&v));
    }
}
