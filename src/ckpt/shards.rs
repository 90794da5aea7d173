//! Checkpoint tensors in pieces: which slice of a full tensor a shard
//! holds ([`ShardIndex`]), cutting and placing those slices, and putting a
//! whole [`Checkpoint`] back together from the shards that several
//! processes send. The assembly refuses anything that is not an exact
//! tiling of every tensor (unknown, missing, duplicated, overlapping or
//! wrongly sized shards), naming the tensor, so a checkpoint is never built
//! from a hole filled with zeros.
//!
//! Pure data: no I/O, no transport. The coordinator receives the shards
//! (`dist`) and turns the assembled checkpoint into files with
//! [`super::to_files`].

use std::collections::HashMap;
use std::fmt;

use anyhow::{bail, ensure, Result};

use super::{Checkpoint, Tensors, TrainingState};
use crate::graph::{copy_block, place_block};

/// Which part of a full tensor a shard holds: part `index` of `parts`
/// equal slices along `dim` (parts == 1: the whole tensor, dim ignored = 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardIndex {
    pub dim: usize,
    pub index: usize,
    pub parts: usize,
}

impl ShardIndex {
    pub fn whole() -> ShardIndex {
        ShardIndex {
            dim: 0,
            index: 0,
            parts: 1,
        }
    }

    /// The sharded dimension; `None` for a whole tensor.
    fn split_dim(&self) -> Option<usize> {
        (self.parts != 1).then_some(self.dim)
    }

    /// The shard's dims for a tensor of `full` dims (errors if `dim` is out
    /// of range or not divisible by parts).
    pub fn shard_dims(&self, full: &[i64]) -> Result<Vec<i64>> {
        self.check(full)?;
        let mut dims = full.to_vec();
        if let Some(d) = self.split_dim() {
            dims[d] /= self.parts as i64;
        }
        Ok(dims)
    }

    /// Checks the index against a tensor of `full` dims.
    fn check(&self, full: &[i64]) -> Result<()> {
        ensure!(self.parts >= 1, "{self}: a tensor has at least one part");
        ensure!(self.index < self.parts, "{self}: no such part");
        if let Some(&neg) = full.iter().find(|&&d| d < 0) {
            bail!("dims {full:?}: negative dimension {neg}");
        }
        let Some(d) = self.split_dim() else {
            return Ok(());
        };
        if d >= full.len() {
            bail!(
                "{self}: dim {d} is out of range for a tensor of dims {full:?} ({} dims)",
                full.len()
            );
        }
        if full[d] % self.parts as i64 != 0 {
            bail!(
                "{self}: dim {d} of dims {full:?} ({}) is not divisible into {} parts",
                full[d],
                self.parts
            );
        }
        Ok(())
    }

    /// Where the shard starts in each dimension of a tensor of `full`
    /// dims.
    fn offsets(&self, full: &[i64]) -> Result<Vec<i64>> {
        let block = self.shard_dims(full)?;
        let mut at = vec![0; full.len()];
        if let Some(d) = self.split_dim() {
            at[d] = self.index as i64 * block[d];
        }
        Ok(at)
    }

    /// The shard's dims and offsets in a tensor of `full_dims`, with the
    /// lengths of the full tensor and of the shard checked.
    fn locate(
        &self,
        full_dims: &[i64],
        full_len: usize,
        part_len: usize,
    ) -> Result<(Vec<i64>, Vec<i64>)> {
        let block = self.shard_dims(full_dims)?;
        let count = |d: &[i64]| d.iter().product::<i64>() as usize;
        ensure!(
            full_len == count(full_dims),
            "dims {full_dims:?} hold {} values, the full tensor has {full_len}",
            count(full_dims)
        );
        ensure!(
            part_len == count(&block),
            "{self} of dims {full_dims:?} holds {} values, got {part_len}",
            count(&block)
        );
        let at = self.offsets(full_dims)?;
        Ok((block, at))
    }

    /// Copies this shard's values out of a full row-major tensor.
    pub fn slice(&self, full_dims: &[i64], full: &[f32]) -> Result<Vec<f32>> {
        let len = self.shard_dims(full_dims)?.iter().product::<i64>() as usize;
        let (block, at) = self.locate(full_dims, full.len(), len)?;
        Ok(copy_block(full_dims, &block, &at, full)?)
    }

    /// Writes `part` (this shard's values) into `full` at this shard's place.
    pub fn place(&self, full_dims: &[i64], part: &[f32], full: &mut [f32]) -> Result<()> {
        let (block, at) = self.locate(full_dims, full.len(), part.len())?;
        Ok(place_block(full_dims, &block, &at, part, full)?)
    }

    /// The range of the split dimension this shard covers, of `len`.
    fn span(&self, len: usize) -> (usize, usize) {
        let n = len / self.parts;
        (self.index * n, (self.index + 1) * n)
    }
}

impl fmt::Display for ShardIndex {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self.split_dim() {
            None => write!(f, "the whole tensor"),
            Some(d) => write!(f, "part {} of {} along dim {d}", self.index, self.parts),
        }
    }
}

/// Which of a checkpoint's tensor sets a shard belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Group {
    Params,
    AdamM,
    AdamV,
}

impl Group {
    pub const ALL: [Group; 3] = [Group::Params, Group::AdamM, Group::AdamV];
}

impl fmt::Display for Group {
    /// As the checkpoint's files name them.
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Group::Params => "params",
            Group::AdamM => "adam_m",
            Group::AdamV => "adam_v",
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Shard {
    pub group: Group,
    pub name: String,
    pub index: ShardIndex,
    pub values: Vec<f32>,
}

/// Assembles full tensors of `group` from shards, in `specs` order
/// (`specs`: (name, full dims), e.g. from the model's ParamSpecs). Shards
/// of other groups are ignored. Refuses, naming the tensor, group and
/// part: a shard of an unknown tensor, a shard whose length does not
/// match, two shards of the same part (duplicated), shards of one tensor
/// with different `parts`/`dim` that do not tile it, and any missing part.
pub fn assemble(group: Group, specs: &[(String, Vec<i64>)], shards: &[Shard]) -> Result<Tensors> {
    let position: HashMap<&str, usize> = specs
        .iter()
        .enumerate()
        .map(|(i, (name, _))| (name.as_str(), i))
        .collect();
    let mut of_tensor: Vec<Vec<&Shard>> = vec![vec![]; specs.len()];
    for s in shards.iter().filter(|s| s.group == group) {
        let Some(&i) = position.get(s.name.as_str()) else {
            bail!(
                "{group} tensor `{}` ({}): no such tensor in this model",
                s.name,
                s.index
            );
        };
        of_tensor[i].push(s);
    }
    specs
        .iter()
        .zip(of_tensor)
        .map(|((name, dims), mut parts)| {
            let at = || format!("{group} tensor `{name}` {dims:?}");
            parts.sort_by_key(|s| s.index);
            check_tiling(dims, &parts).map_err(|e| e.context(at()))?;
            let len = dims.iter().product::<i64>().max(0) as usize;
            let mut full = vec![0.0f32; len];
            for s in parts {
                s.index
                    .place(dims, &s.values, &mut full)
                    .map_err(|e| e.context(format!("{}: {}", at(), s.index)))?;
            }
            Ok((name.clone(), dims.clone(), full))
        })
        .collect()
}

/// Whether `parts` (sorted by index) cover a tensor of `dims` exactly once:
/// one split dimension (or whole shards), spans that neither overlap nor
/// leave a gap.
fn check_tiling(dims: &[i64], parts: &[&Shard]) -> Result<()> {
    if parts.is_empty() {
        bail!("missing: no shard holds it");
    }
    for s in parts {
        s.index.check(dims)?;
    }
    for w in parts.windows(2) {
        if same_part(&w[0].index, &w[1].index) {
            bail!("{} duplicated: two shards hold it", w[0].index);
        }
    }
    let split: Vec<usize> = parts.iter().filter_map(|s| s.index.split_dim()).collect();
    if let Some(&d) = split.iter().find(|&&d| d != split[0]) {
        bail!(
            "shards split along dims {} and {d} do not tile it (they overlap)",
            split[0]
        );
    }
    // Whole shards span everything; with them the split dim is moot.
    let len = split.first().map_or(1, |&d| dims[d] as usize);
    let mut spans: Vec<((usize, usize), &ShardIndex)> = parts
        .iter()
        .map(|s| match s.index.split_dim() {
            None => ((0, len), &s.index),
            Some(_) => (s.index.span(len), &s.index),
        })
        .collect();
    spans.sort();
    let dim = split.first().copied().unwrap_or(0);
    let mut covered = 0;
    for ((start, end), index) in spans {
        if start < covered {
            bail!("{index} overlaps another shard (duplicated values)");
        }
        if start > covered {
            bail!(
                "{}: no shard holds it",
                missing(dim, covered, start, len, parts)
            );
        }
        covered = end;
    }
    if covered < len {
        bail!(
            "{}: no shard holds it",
            missing(dim, covered, len, len, parts)
        );
    }
    Ok(())
}

/// Two indices for the same slice (whole tensors whatever their `dim`).
fn same_part(a: &ShardIndex, b: &ShardIndex) -> bool {
    a == b || (a.parts == 1 && b.parts == 1)
}

/// Names the gap `[from, to)` along `dim`: as a part when every shard has
/// the same `parts`, else as a range.
fn missing(dim: usize, from: usize, to: usize, len: usize, parts: &[&Shard]) -> String {
    let p = parts[0].index.parts;
    if parts.iter().all(|s| s.index.parts == p) {
        let n = len / p;
        let names: Vec<String> = (from / n..to / n).map(|i| i.to_string()).collect();
        format!("part {} of {p} along dim {dim} missing", names.join(", "))
    } else {
        format!("values {from}..{to} of dim {dim} ({len}) missing")
    }
}

/// All three groups into a Checkpoint with the given TrainingState: every
/// parameter of `params`, the moments of the `trained` ones.
pub fn assemble_checkpoint(
    params: &[(String, Vec<i64>)],
    trained: &[(String, Vec<i64>)],
    state: TrainingState,
    shards: Vec<Shard>,
) -> Result<Checkpoint> {
    Ok(Checkpoint {
        params: assemble(Group::Params, params, &shards)?,
        adam_m: assemble(Group::AdamM, trained, &shards)?,
        adam_v: assemble(Group::AdamV, trained, &shards)?,
        state,
    })
}

/// The whole-tensor shards of `ckpt` that rank `rank` of `ranks` sends:
/// tensor i of the flat order params, adam_m, adam_v goes to rank i %
/// ranks (spreads the upload over the ranks when every rank holds the
/// whole state, as in CPU multi-process jobs). Empty for a rank outside
/// `0..ranks`.
pub fn round_robin(ckpt: &Checkpoint, rank: usize, ranks: usize) -> Vec<Shard> {
    let groups = [
        (Group::Params, &ckpt.params),
        (Group::AdamM, &ckpt.adam_m),
        (Group::AdamV, &ckpt.adam_v),
    ];
    groups
        .into_iter()
        .flat_map(|(group, tensors)| tensors.iter().map(move |t| (group, t)))
        .enumerate()
        .filter(|(i, _)| ranks > 0 && i % ranks == rank)
        .map(|(_, (group, (name, _, values)))| Shard {
            group,
            name: name.clone(),
            index: ShardIndex::whole(),
            values: values.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIMS: [i64; 3] = [4, 2, 8];

    /// 0, 1, 2, ...: every value names its own row-major position.
    fn iota(n: usize) -> Vec<f32> {
        (0..n).map(|i| i as f32).collect()
    }

    /// The reference: shard values by explicit (i, j, k) coordinates.
    fn reference(at: ShardIndex) -> Vec<f32> {
        let [a, b, c] = DIMS.map(|d| d as usize);
        let mut out = vec![];
        for i in 0..a {
            for j in 0..b {
                for k in 0..c {
                    let coord = [i, j, k];
                    let keep = at.parts == 1 || {
                        let n = [a, b, c][at.dim] / at.parts;
                        coord[at.dim] / n == at.index
                    };
                    if keep {
                        out.push((i * b * c + j * c + k) as f32);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn slice_and_place_match_the_reference_along_every_dim() {
        let full = iota(64);
        for (dim, &len) in DIMS.iter().enumerate() {
            for parts in [1, 2, 4] {
                if len as usize % parts != 0 {
                    let at = ShardIndex {
                        dim,
                        index: 0,
                        parts,
                    };
                    assert!(at.slice(&DIMS, &full).is_err(), "{at}");
                    continue;
                }
                let mut rebuilt = vec![f32::NAN; 64];
                for index in 0..parts {
                    let at = ShardIndex { dim, index, parts };
                    let part = at.slice(&DIMS, &full).unwrap();
                    assert_eq!(part, reference(at), "{at}");
                    let dims = at.shard_dims(&DIMS).unwrap();
                    assert_eq!(dims.iter().product::<i64>() as usize, part.len(), "{at}");
                    at.place(&DIMS, &part, &mut rebuilt).unwrap();
                }
                assert_eq!(rebuilt, full, "dim {dim}, {parts} parts");
            }
        }
    }

    #[test]
    fn bad_indices_and_lengths_are_errors_not_panics() {
        let full = iota(64);
        let at = |dim, index, parts| ShardIndex { dim, index, parts };
        assert!(at(3, 0, 2).shard_dims(&DIMS).is_err());
        assert!(at(1, 0, 4).shard_dims(&DIMS).is_err());
        assert!(at(0, 2, 2).slice(&DIMS, &full).is_err());
        assert!(at(0, 0, 0).slice(&DIMS, &full).is_err());
        assert!(at(0, 0, 2).slice(&DIMS, &full[1..]).is_err());
        let mut out = vec![0.0; 64];
        assert!(at(0, 0, 2).place(&DIMS, &[0.0; 31], &mut out).is_err());
        assert!(ShardIndex::whole().place(&[-1], &[], &mut []).is_err());
        // A scalar is one whole value.
        assert_eq!(ShardIndex::whole().slice(&[], &[5.0]).unwrap(), [5.0]);
    }

    fn specs() -> Vec<(String, Vec<i64>)> {
        vec![
            ("embed".into(), DIMS.to_vec()),
            ("norm".into(), vec![8]),
            ("scale".into(), vec![]),
        ]
    }

    fn original() -> Checkpoint {
        let tensors = |base: f32| -> Tensors {
            specs()
                .into_iter()
                .map(|(n, d)| {
                    let len = d.iter().product::<i64>() as usize;
                    let v = iota(len).into_iter().map(|x| x + base).collect();
                    (n, d, v)
                })
                .collect()
        };
        Checkpoint {
            params: tensors(0.0),
            adam_m: tensors(1000.0),
            adam_v: tensors(2000.0),
            state: serde_json::from_str(
                r#"{"format": 2, "step": 3, "tokens_seen": 96, "next_batch": 3,
                    "seed": 0, "config_toml": "", "config_sha256": ""}"#,
            )
            .unwrap(),
        }
    }

    /// `c` cut as a sharded trainer would: the 3-d tensor in 4 parts along
    /// dim 2, the vector in 2, the scalar whole.
    fn cut(c: &Checkpoint) -> Vec<Shard> {
        let mut out = vec![];
        for (group, tensors) in [
            (Group::Params, &c.params),
            (Group::AdamM, &c.adam_m),
            (Group::AdamV, &c.adam_v),
        ] {
            for (name, dims, values) in tensors {
                let (dim, parts) = match dims.len() {
                    3 => (2, 4),
                    1 => (0, 2),
                    _ => (0, 1),
                };
                for index in 0..parts {
                    let index = ShardIndex { dim, index, parts };
                    let values = index.slice(dims, values).unwrap();
                    out.push(Shard {
                        group,
                        name: name.clone(),
                        index,
                        values,
                    });
                }
            }
        }
        out
    }

    fn same(a: &Checkpoint, b: &Checkpoint) -> bool {
        (&a.params, &a.adam_m, &a.adam_v, &a.state) == (&b.params, &b.adam_m, &b.adam_v, &b.state)
    }

    #[test]
    fn assembly_from_shuffled_shards_is_the_original() {
        let c = original();
        let mut shards = cut(&c);
        // A fixed shuffle: reversed, then every third moved to the front.
        shards.reverse();
        let (front, back): (Vec<_>, Vec<_>) = shards
            .into_iter()
            .enumerate()
            .partition(|(i, _)| i % 3 == 0);
        let shuffled: Vec<Shard> = front.into_iter().chain(back).map(|(_, s)| s).collect();
        let got = assemble_checkpoint(&specs(), &specs(), c.state.clone(), shuffled).unwrap();
        assert!(same(&got, &c));
        // Round robin over 3 ranks: every tensor once, from one rank.
        let all: Vec<Shard> = (0..3).flat_map(|r| round_robin(&c, r, 3)).collect();
        assert_eq!(all.len(), 9);
        assert_eq!(round_robin(&c, 0, 3).len(), 3);
        assert!(round_robin(&c, 3, 3).is_empty() && round_robin(&c, 0, 0).is_empty());
        let got = assemble_checkpoint(&specs(), &specs(), c.state.clone(), all).unwrap();
        assert!(same(&got, &c));
    }

    /// The error of assembling `edit`ed shards of the original.
    fn refusal(edit: impl FnOnce(&mut Vec<Shard>)) -> String {
        let c = original();
        let mut shards = cut(&c);
        edit(&mut shards);
        match assemble_checkpoint(&specs(), &specs(), c.state.clone(), shards) {
            Ok(_) => panic!("assembled"),
            Err(e) => format!("{e:#}"),
        }
    }

    fn find(shards: &[Shard], group: Group, name: &str, index: usize) -> usize {
        shards
            .iter()
            .position(|s| s.group == group && s.name == name && s.index.index == index)
            .unwrap()
    }

    fn says(e: &str, words: &[&str]) {
        for w in words {
            assert!(e.contains(w), "`{w}` not in: {e}");
        }
    }

    #[test]
    fn missing_duplicated_wrong_and_unknown_shards_are_refused_by_name() {
        let e = refusal(|s| {
            let i = find(s, Group::AdamM, "embed", 1);
            s.remove(i);
        });
        says(
            &e,
            &["adam_m tensor `embed`", "part 1 of 4 along dim 2 missing"],
        );
        let e = refusal(|s| {
            let i = find(s, Group::AdamV, "embed", 3);
            s.remove(i);
        });
        says(
            &e,
            &["adam_v tensor `embed`", "part 3 of 4 along dim 2 missing"],
        );
        let e = refusal(|s| s.retain(|s| !(s.group == Group::Params && s.name == "scale")));
        says(&e, &["params tensor `scale`", "missing"]);

        let e = refusal(|s| {
            let i = find(s, Group::Params, "norm", 0);
            s.push(s[i].clone());
        });
        says(
            &e,
            &["params tensor `norm`", "part 0 of 2 along dim 0 duplicated"],
        );
        // A whole copy next to the parts overlaps them.
        let e = refusal(|s| {
            s.push(Shard {
                group: Group::AdamV,
                name: "norm".into(),
                index: ShardIndex::whole(),
                values: vec![0.0; 8],
            })
        });
        says(&e, &["adam_v tensor `norm`", "overlaps"]);
        // Parts of one tensor along two dims.
        let e = refusal(|s| {
            let i = find(s, Group::Params, "embed", 0);
            s[i].index.dim = 0;
            s[i].values.truncate(0);
        });
        says(&e, &["params tensor `embed`", "dims 0 and 2"]);

        let e = refusal(|s| {
            let i = find(s, Group::AdamM, "norm", 1);
            s[i].values.pop();
        });
        says(&e, &["adam_m tensor `norm`", "part 1 of 2", "got 3"]);
        let e = refusal(|s| {
            let i = find(s, Group::Params, "norm", 1);
            s[i].name = "norms".into();
        });
        says(&e, &["params tensor `norms`", "no such tensor"]);
    }

    #[test]
    fn mixed_part_counts_along_one_dim_tile_when_they_cover_it_once() {
        let c = original();
        let (dims, full) = (&c.params[0].1, &c.params[0].2);
        let piece = |index, parts| {
            let index = ShardIndex {
                dim: 0,
                index,
                parts,
            };
            Shard {
                group: Group::Params,
                name: "embed".into(),
                index,
                values: index.slice(dims, full).unwrap(),
            }
        };
        let spec = &specs()[..1];
        let got = assemble(
            Group::Params,
            spec,
            &[piece(1, 2), piece(0, 4), piece(1, 4)],
        )
        .unwrap();
        assert_eq!(&got[0].2, full);
        let e = assemble(
            Group::Params,
            spec,
            &[piece(0, 2), piece(1, 4), piece(3, 4)],
        );
        says(&format!("{:#}", e.unwrap_err()), &["`embed`", "overlaps"]);
        let e = assemble(Group::Params, spec, &[piece(0, 2), piece(3, 4)]);
        says(
            &format!("{:#}", e.unwrap_err()),
            &["`embed`", "values 2..3 of dim 0 (4) missing"],
        );
    }
}
