//! From documents to training rows: the validation hold-out, sharding of
//! row groups across workers, and packing token streams into rows of S+1
//! tokens joined by the end-of-text token.

use super::parquet::RowGroupRef;

/// FNV-1a, a stable hash (unlike std's, it never changes between builds).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// True for the stable `fraction` of documents held out for validation,
/// chosen by hashing the document's id (or its text when it has none).
pub fn is_validation(id: Option<&str>, text: &str, fraction: f64) -> bool {
    let key = id.unwrap_or(text);
    (avalanche(fnv1a(key.as_bytes())) as f64 / u64::MAX as f64) < fraction
}

/// The splitmix64 finaliser: FNV-1a leaves the high bits nearly unchanged
/// between keys that differ only in their last bytes (`<urn:uuid:17>`,
/// `<urn:uuid:18>`), and the hold-out test reads the high bits.
fn avalanche(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

/// The row groups worker `rank` of `workers` reads: every row group goes
/// to exactly one worker (round robin over the given order, which callers
/// shuffle by seed), so uneven counts differ by at most one row group.
pub fn shard(groups: &[RowGroupRef], rank: usize, workers: usize) -> Vec<RowGroupRef> {
    groups
        .iter()
        .enumerate()
        .filter(|(i, _)| i % workers == rank)
        .map(|(_, g)| g.clone())
        .collect()
}

/// Deterministic shuffle of row groups for `seed` (Fisher-Yates driven
/// by a splitmix64 stream).
pub fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    };
    for i in (1..items.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

/// Packs documents into rows of `row_len` (= S + 1) tokens: each
/// document's tokens followed by the end-of-text token, one continuous
/// stream cut into rows. The partial row at the end stays buffered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packer {
    row_len: usize,
    eot: u32,
    pending: Vec<u32>,
}

impl Packer {
    pub fn new(row_len: usize, eot: u32) -> Packer {
        Packer {
            row_len,
            eot,
            pending: Vec::with_capacity(row_len),
        }
    }

    /// Adds one document; returns the rows it completed.
    pub fn push(&mut self, tokens: &[u32]) -> Vec<Vec<u32>> {
        let mut rows = vec![];
        for &t in tokens.iter().chain(std::iter::once(&self.eot)) {
            self.pending.push(t);
            if self.pending.len() == self.row_len {
                rows.push(std::mem::replace(
                    &mut self.pending,
                    Vec::with_capacity(self.row_len),
                ));
            }
        }
        rows
    }

    /// Tokens waiting for the next row (reported, not silently dropped, at
    /// the end of an epoch).
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn packing_joins_documents_with_eot() {
        let mut p = Packer::new(4, 99);
        assert!(p.push(&[1, 2]).is_empty());
        assert_eq!(
            p.push(&[3, 4, 5, 6]),
            vec![vec![1, 2, 99, 3], vec![4, 5, 6, 99]]
        );
        assert_eq!(p.push(&[7]), Vec::<Vec<u32>>::new());
        assert_eq!(p.pending(), 2);
    }

    #[test]
    fn shards_are_disjoint_and_complete() {
        let groups: Vec<RowGroupRef> = (0..13)
            .map(|i| RowGroupRef {
                file: PathBuf::from(format!("f{}", i / 4)),
                index: i % 4,
                rows: 10,
            })
            .collect();
        for w in 1..=5 {
            let mut seen: Vec<RowGroupRef> = (0..w).flat_map(|r| shard(&groups, r, w)).collect();
            seen.sort_by(|a, b| (&a.file, a.index).cmp(&(&b.file, b.index)));
            assert_eq!(seen, groups, "W = {w}");
            let sizes: Vec<usize> = (0..w).map(|r| shard(&groups, r, w).len()).collect();
            assert!(
                sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1,
                "{sizes:?}"
            );
        }
    }

    #[test]
    fn holdout_is_stable_and_near_the_fraction() {
        let ids: Vec<String> = (0..20_000).map(|i| format!("<urn:uuid:{i:08x}>")).collect();
        let held: Vec<bool> = ids
            .iter()
            .map(|id| is_validation(Some(id), "", 0.005))
            .collect();
        let again: Vec<bool> = ids
            .iter()
            .map(|id| is_validation(Some(id), "", 0.005))
            .collect();
        assert_eq!(held, again);
        let n = held.iter().filter(|&&h| h).count();
        assert!((60..=140).contains(&n), "{n} of 20000 held out at 0.5%");
        // Keys that differ only in their last characters spread too.
        let n = (0..20_000)
            .filter(|i| is_validation(Some(&format!("<urn:{i}>")), "", 0.2))
            .count();
        assert!((3_700..=4_300).contains(&n), "{n} of 20000 held out at 20%");
        // Without an id the text decides.
        assert_eq!(
            is_validation(None, "abc", 0.5),
            is_validation(None, "abc", 0.5)
        );
    }

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let mut a: Vec<u32> = (0..50).collect();
        let mut b = a.clone();
        shuffle(&mut a, 7);
        shuffle(&mut b, 7);
        assert_eq!(a, b);
        let mut c: Vec<u32> = (0..50).collect();
        shuffle(&mut c, 8);
        assert_ne!(a, c);
        a.sort();
        assert_eq!(a, (0..50).collect::<Vec<_>>());
    }
}
