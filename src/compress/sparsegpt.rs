//! SparseGPT and magnitude pruning of one linear layer, on the host.
//!
//! SparseGPT is Frantar & Alistarh, "SparseGPT: Massive Language Models Can
//! Be Accurately Pruned in One-Shot" (ICML 2023). [`sparsegpt`] follows the
//! published implementation, `SparseGPT.fasterprune` in IST-DASLab/sparsegpt
//! `sparsegpt.py`, rule for rule, and [`Hessian::add`] follows its
//! `add_batch`; `tests/sparsegpt.rs` checks both against a float64
//! transcription of that file (`tests/python/sparsegpt_ref.py`). The baseline
//! [`magnitude`] is `prune_magnitude` of locuslab/wanda (`lib/prune.py`).
//!
//! A layer is `y = x W^T` with `W` `[rows = out, cols = in]`, row-major f32.
//! The arithmetic is f64 throughout (the reference runs in f32 on a GPU);
//! only the result is stored back as f32.
//!
//! The reference's selection rules, kept exactly because they decide ties:
//! - unstructured `p`: per block of [`BLOCKSIZE`] columns, the scores
//!   `w^2 / diag(Hinv)^2` of the whole block (all rows) are sorted, the
//!   value at index `int(numel * p)` is the threshold and every score `<=` it
//!   is pruned: `int(numel * p) + 1` weights, more on ties. Magnitude does
//!   the same over the whole matrix with `|w|`. Deliberate deviation: `p = 0`
//!   prunes nothing (the reference would still prune the smallest weight).
//! - `n:m`: groups of `m` consecutive input columns, aligned to the block
//!   start; the `n` smallest scores of each row's group are pruned
//!   (`torch.topk(largest=False)`; among equal scores we take the lower
//!   column, torch leaves that order unspecified). SparseGPT scores a group
//!   when the sweep reaches it, i.e. after the updates from the block's
//!   earlier columns, exactly like the reference.
//!
//! Cost: one factorisation of the `cols x cols` Hessian (`cols^3 / 2`
//! multiply-adds, see `linalg::inverse_upper_cholesky`) and the lazy block
//! updates (`rows * cols^2 / 2`). Both run in parallel (rayon) over rows of
//! the matrix being updated; every element is computed in an order that does
//! not depend on the split, so results are bitwise deterministic for any
//! number of threads.

use std::fmt;
use std::str::FromStr;

use anyhow::{ensure, Result};
use rayon::prelude::*;

/// Columns per SparseGPT block (`blocksize` of `fasterprune`).
pub const BLOCKSIZE: usize = 128;
/// Hessian dampening as a fraction of its mean diagonal (`percdamp`).
pub const PERCDAMP: f64 = 0.01;

/// Rows of the weight matrix per parallel task: enough for the block
/// update to reuse `Hinv`'s rows from cache, few enough to spread a small
/// layer over the threads.
const ROW_CHUNK: usize = 32;

/// Which weights a layer loses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sparsity {
    /// This fraction of the weights, in `[0, 1)`.
    Unstructured(f64),
    /// `n` of every `m` consecutive weights of a row (2:4 for sparse tensor
    /// cores).
    NofM { n: usize, m: usize },
}

impl Sparsity {
    /// Refuses a fraction outside `[0, 1)` and an `n:m` without
    /// `1 <= n <= m`.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Sparsity::Unstructured(p) => ensure!(
                (0.0..1.0).contains(&p),
                "sparsity fraction {p} is outside [0, 1)"
            ),
            Sparsity::NofM { n, m } => {
                ensure!(m >= 1 && n >= 1, "{n}:{m} sparsity needs 1 <= n <= m");
                ensure!(
                    n <= m,
                    "{n}:{m} sparsity prunes more than m: n = {n} > m = {m}"
                );
            }
        }
        Ok(())
    }

    /// [`Self::validate`], and for `n:m` that the groups tile a row of
    /// `cols` inputs.
    fn validate_for(&self, rows: usize, cols: usize) -> Result<()> {
        self.validate()?;
        if let Sparsity::NofM { n, m } = *self {
            ensure!(
                cols % m == 0,
                "{n}:{m} sparsity needs the input dimension to be a multiple of {m}; \
                 the {rows}x{cols} layer has {cols} inputs"
            );
        }
        Ok(())
    }
}

impl FromStr for Sparsity {
    type Err = anyhow::Error;

    /// `0.5`, `50%` or `2:4`.
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim();
        let bad = || {
            anyhow::anyhow!(
                "invalid sparsity {s:?}: expected a fraction in [0, 1) such as 0.5, \
                 a percentage such as 50%, or n:m such as 2:4"
            )
        };
        let sparsity = if let Some((n, m)) = t.split_once(':') {
            let (n, m) = (
                n.trim().parse().map_err(|_| bad())?,
                m.trim().parse().map_err(|_| bad())?,
            );
            Sparsity::NofM { n, m }
        } else if let Some(pct) = t.strip_suffix('%') {
            Sparsity::Unstructured(pct.trim().parse::<f64>().map_err(|_| bad())? / 100.0)
        } else {
            Sparsity::Unstructured(t.parse().map_err(|_| bad())?)
        };
        sparsity
            .validate()
            .map_err(|e| anyhow::anyhow!("invalid sparsity {s:?}: {e}"))?;
        Ok(sparsity)
    }
}

impl fmt::Display for Sparsity {
    /// `50%` (up to 4 decimals, trailing zeros dropped) or `2:4`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Sparsity::Unstructured(p) => {
                let pct = format!("{:.4}", p * 100.0);
                write!(f, "{}%", pct.trim_end_matches('0').trim_end_matches('.'))
            }
            Sparsity::NofM { n, m } => write!(f, "{n}:{m}"),
        }
    }
}

/// What pruning one layer did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PruneOutcome {
    /// Weights outside the mask (`kept + pruned = rows * cols`).
    pub kept: usize,
    /// Weights the mask set to zero.
    pub pruned: usize,
    /// SparseGPT's own error estimate, the sum of its `Losses`
    /// (`sum (w - q)^2 / Hinv[i,i]^2 / 2`); 0 for magnitude pruning.
    pub obs_loss: f64,
}

impl PruneOutcome {
    fn from_pruned(total: usize, pruned: usize, obs_loss: f64) -> Self {
        PruneOutcome {
            kept: total - pruned,
            pruned,
            obs_loss,
        }
    }
}

/// The layer Hessian `H = (2 / nsamples) sum x x^T` over the calibration
/// tokens, `cols x cols` row-major, accumulated like SparseGPT's
/// `add_batch`: a running mean over sequences (`nsamples` counts
/// sequences, not tokens).
#[derive(Clone, Debug)]
pub struct Hessian {
    pub cols: usize,
    pub h: Vec<f64>,
    pub nsamples: usize,
}

impl Hessian {
    pub fn new(cols: usize) -> Self {
        Hessian {
            cols,
            h: vec![0.0; cols * cols],
            nsamples: 0,
        }
    }

    /// Adds one calibration batch: `gram` = the sum over its tokens of
    /// `x x^T` (`cols x cols`), `sequences` = how many sequences it held
    /// (`add_batch`'s `tmp`). As there, `H *= n / (n + tmp)`, `n += tmp`,
    /// `H += (2 / n) gram` (the reference scales the inputs by `sqrt(2/n)`
    /// before its product; same value).
    ///
    /// # Panics
    /// If `gram` is not `cols x cols` or `sequences` is 0: both are bugs of
    /// the caller, not of the data.
    pub fn add(&mut self, gram: &[f64], sequences: usize) {
        assert_eq!(
            gram.len(),
            self.cols * self.cols,
            "Hessian::add: a Gram matrix of {} values for a {c}x{c} Hessian",
            gram.len(),
            c = self.cols
        );
        assert!(sequences > 0, "Hessian::add: a batch of 0 sequences");
        let total = self.nsamples + sequences;
        let keep = self.nsamples as f64 / total as f64;
        let scale = 2.0 / total as f64;
        self.h
            .par_iter_mut()
            .zip(gram.par_iter())
            .for_each(|(h, g)| *h = *h * keep + scale * g);
        self.nsamples = total;
    }
}

/// Prunes `w` (`rows x cols`, row-major) in place with SparseGPT: columns
/// left to right in blocks of `blocksize`, each pruned weight's error
/// spread over the not-yet-pruned weights of its row through the inverse
/// Hessian (the OBS update). See the module doc for the selection rules.
pub fn sparsegpt(
    w: &mut [f32],
    rows: usize,
    cols: usize,
    hessian: &Hessian,
    sparsity: Sparsity,
    blocksize: usize,
    percdamp: f64,
) -> Result<PruneOutcome> {
    check_layer(w.len(), rows, cols)?;
    sparsity.validate_for(rows, cols)?;
    ensure!(
        hessian.cols == cols && hessian.h.len() == cols * cols,
        "the Hessian is {}x{} ({} values) but the {rows}x{cols} layer has {cols} inputs",
        hessian.cols,
        hessian.cols,
        hessian.h.len()
    );
    ensure!(
        hessian.nsamples > 0,
        "the Hessian of the {rows}x{cols} layer has seen no calibration data"
    );
    ensure!(blocksize > 0, "SparseGPT block size 0");
    if let Sparsity::NofM { n, m } = sparsity {
        ensure!(
            blocksize % m == 0,
            "{n}:{m} groups would straddle SparseGPT's blocks of {blocksize} columns"
        );
    }
    ensure!(
        percdamp.is_finite() && percdamp >= 0.0,
        "percdamp {percdamp} must be finite and >= 0"
    );

    let mut wd: Vec<f64> = w.iter().map(|&x| x as f64).collect();
    let (h, dead) = damped_hessian(&hessian.h, cols, percdamp);
    for row in wd.chunks_mut(cols) {
        for &d in &dead {
            row[d] = 0.0;
        }
    }
    let hinv = linalg::inverse_upper_cholesky(h, cols).map_err(|e| {
        anyhow::anyhow!(
            "SparseGPT on the {rows}x{cols} layer: the Hessian is not positive definite \
             after dampening by {percdamp} of its mean diagonal (Cholesky pivot {:e} at \
             input column {}; factorised from the last column); more calibration data or \
             a larger percdamp may help",
            e.pivot,
            e.column
        )
    })?;

    let mut mask = vec![false; rows * cols];
    let mut losses = vec![0.0; rows];
    for i1 in (0..cols).step_by(blocksize) {
        let block = Block {
            i1,
            i2: (i1 + blocksize).min(cols),
            cols,
            hinv: &hinv,
        };
        let rule = block.rule(&wd, sparsity);
        wd.par_chunks_mut(ROW_CHUNK * cols)
            .zip(mask.par_chunks_mut(ROW_CHUNK * cols))
            .zip(losses.par_chunks_mut(ROW_CHUNK))
            .for_each(|((w, mask), losses)| block.prune_rows(w, mask, losses, rule));
    }

    for (dst, src) in w.iter_mut().zip(&wd) {
        *dst = *src as f32;
    }
    let outcome = PruneOutcome::from_pruned(rows * cols, count_pruned(&mask), losses.iter().sum());
    Ok(outcome)
}

/// Prunes `w` (`rows x cols`) in place by magnitude, wanda's
/// `prune_magnitude`: unstructured, every `|w| <=` the value at index
/// `int(numel * p)` of the layer's sorted `|W|`; `n:m`, the `n` smallest
/// `|w|` of each group. No weight is updated.
pub fn magnitude(
    w: &mut [f32],
    rows: usize,
    cols: usize,
    sparsity: Sparsity,
) -> Result<PruneOutcome> {
    check_layer(w.len(), rows, cols)?;
    sparsity.validate_for(rows, cols)?;
    let pruned = match sparsity {
        Sparsity::Unstructured(p) => {
            match sorted_at_fraction(w.iter().map(|x| x.abs() as f64).collect(), p) {
                None => 0,
                Some(t) => w
                    .par_iter_mut()
                    .map(|x| {
                        let prune = x.abs() as f64 <= t;
                        if prune {
                            *x = 0.0;
                        }
                        prune as usize
                    })
                    .sum(),
            }
        }
        Sparsity::NofM { n, m } => w
            .par_chunks_mut(cols)
            .map(|row| {
                let mut groups = GroupScratch::new(m);
                let mut mask = vec![false; cols];
                for (g, wg) in row.chunks(m).enumerate() {
                    groups.mark_smallest(
                        wg.iter().map(|x| x.abs() as f64),
                        n,
                        &mut mask[g * m..][..m],
                    );
                }
                for (x, &prune) in row.iter_mut().zip(&mask) {
                    if prune {
                        *x = 0.0;
                    }
                }
                count_pruned(&mask)
            })
            .sum(),
    };
    Ok(PruneOutcome::from_pruned(rows * cols, pruned, 0.0))
}

/// `||W X - W' X||_F^2 = tr((W - W') G (W - W')^T)` for the Gram matrix
/// `G = sum x x^T` (`cols x cols`) of the calibration inputs: how far the
/// pruned layer's outputs moved.
///
/// # Panics
/// On sizes that do not match `rows x cols`.
pub fn reconstruction_error(
    w: &[f32],
    pruned: &[f32],
    rows: usize,
    cols: usize,
    gram: &[f64],
) -> f64 {
    assert!(
        w.len() == rows * cols && pruned.len() == rows * cols && gram.len() == cols * cols,
        "reconstruction_error: {} weights, {} pruned weights and a Gram of {} values \
         for a {rows}x{cols} layer",
        w.len(),
        pruned.len(),
        gram.len()
    );
    let per_row: Vec<f64> = w
        .par_chunks(cols)
        .zip(pruned.par_chunks(cols))
        .map(|(a, b)| {
            let d: Vec<f64> = a
                .iter()
                .zip(b)
                .map(|(&x, &y)| x as f64 - y as f64)
                .collect();
            gram.chunks(cols)
                .zip(&d)
                .filter(|(_, &di)| di != 0.0)
                .map(|(g, &di)| di * dot(g, &d))
                .sum()
        })
        .collect();
    per_row.iter().sum()
}

fn check_layer(len: usize, rows: usize, cols: usize) -> Result<()> {
    ensure!(
        rows > 0 && cols > 0,
        "cannot prune an empty {rows}x{cols} layer"
    );
    ensure!(
        len == rows * cols,
        "a {rows}x{cols} layer needs {} weights, got {len}",
        rows * cols
    );
    Ok(())
}

fn count_pruned(mask: &[bool]) -> usize {
    mask.iter().filter(|&&m| m).count()
}

/// `H` read from its lower triangle into a full symmetric copy (so the
/// factorisation sees what `torch.linalg.cholesky` sees), with the
/// reference's fixes: a dead input (`H[d,d] == 0`) gets `H[d,d] = 1` (its
/// weights are zeroed by the caller), then `percdamp * mean(diag H)` is
/// added to the diagonal. Returns the copy and the dead inputs.
fn damped_hessian(h: &[f64], n: usize, percdamp: f64) -> (Vec<f64>, Vec<usize>) {
    let mut a = vec![0.0; n * n];
    a.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        for (j, v) in row.iter_mut().enumerate() {
            *v = if j <= i { h[i * n + j] } else { h[j * n + i] };
        }
    });
    let dead: Vec<usize> = (0..n).filter(|&d| a[d * n + d] == 0.0).collect();
    for &d in &dead {
        a[d * n + d] = 1.0;
    }
    let damp = percdamp * (0..n).map(|i| a[i * n + i]).sum::<f64>() / n as f64;
    for i in 0..n {
        a[i * n + i] += damp;
    }
    (a, dead)
}

/// `sorted(values)[int(len * p)]`, the threshold both references take
/// (`torch.sort(x.flatten())[0][int(x.numel() * p)]`); `None` for `p = 0`.
fn sorted_at_fraction(mut values: Vec<f64>, p: f64) -> Option<f64> {
    if p == 0.0 || values.is_empty() {
        return None;
    }
    let k = ((values.len() as f64 * p) as usize).min(values.len() - 1);
    let (_, v, _) = values.select_nth_unstable_by(k, f64::total_cmp);
    Some(*v)
}

/// Scratch for choosing the pruned weights of one `n:m` group.
struct GroupScratch {
    scores: Vec<f64>,
    order: Vec<usize>,
}

impl GroupScratch {
    fn new(m: usize) -> Self {
        GroupScratch {
            scores: Vec::with_capacity(m),
            order: Vec::with_capacity(m),
        }
    }

    /// Sets `mask[j]` for the `n` smallest of the group's `scores`, the
    /// lower index first among equals (`torch.topk(largest=False)` +
    /// `scatter_`).
    fn mark_smallest(&mut self, scores: impl Iterator<Item = f64>, n: usize, mask: &mut [bool]) {
        self.scores.clear();
        self.scores.extend(scores);
        self.order.clear();
        self.order.extend(0..self.scores.len());
        let s = &self.scores;
        self.order.sort_by(|&a, &b| s[a].total_cmp(&s[b]));
        for &j in &self.order[..n] {
            mask[j] = true;
        }
    }
}

/// How one block chooses its pruned weights.
#[derive(Clone, Copy)]
enum Rule {
    /// Unstructured `p = 0`.
    Nothing,
    /// Unstructured: scores `<=` this, decided at the block start.
    Threshold(f64),
    /// `n:m`, decided group by group during the sweep.
    Groups { n: usize, m: usize },
}

/// One block `[i1, i2)` of columns and the upper Cholesky factor `Hinv`
/// of `H^-1` (`cols x cols`).
struct Block<'a> {
    i1: usize,
    i2: usize,
    cols: usize,
    hinv: &'a [f64],
}

impl Block<'_> {
    fn len(&self) -> usize {
        self.i2 - self.i1
    }

    /// `Hinv[i1 + i, i1 + i]`.
    fn diag(&self, i: usize) -> f64 {
        let k = self.i1 + i;
        self.hinv[k * self.cols + k]
    }

    /// `Hinv[i1 + i, i1 + i .. i2]`: the in-block part of row `i` from the
    /// diagonal on.
    fn hinv_row(&self, i: usize) -> &[f64] {
        let k = self.i1 + i;
        &self.hinv[k * self.cols + k..k * self.cols + self.i2]
    }

    /// SparseGPT's score of a weight in block column `i`:
    /// `w^2 / Hinv[i,i]^2`, the OBS error of zeroing it.
    fn score(&self, w: f64, i: usize) -> f64 {
        let d = self.diag(i);
        w * w / (d * d)
    }

    /// The block's rule; unstructured thresholds are taken over the scores
    /// of all rows as the block starts (`mask1 = tmp <= thresh`).
    fn rule(&self, w: &[f64], sparsity: Sparsity) -> Rule {
        match sparsity {
            Sparsity::NofM { n, m } => Rule::Groups { n, m },
            Sparsity::Unstructured(p) => {
                let scores = w
                    .chunks(self.cols)
                    .flat_map(|row| {
                        row[self.i1..self.i2]
                            .iter()
                            .enumerate()
                            .map(|(i, &x)| self.score(x, i))
                    })
                    .collect();
                sorted_at_fraction(scores, p).map_or(Rule::Nothing, Rule::Threshold)
            }
        }
    }

    /// Prunes the block's columns of a chunk of rows (`w`, `mask`: whole
    /// rows; `losses`: one per row), then applies the block's lazy update
    /// to the rows' later columns: `W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]`.
    fn prune_rows(&self, w: &mut [f64], mask: &mut [bool], losses: &mut [f64], rule: Rule) {
        let (cols, count) = (self.cols, self.len());
        let mut err = vec![0.0; losses.len() * count];
        let mut sweep = Sweep::new(count, rule);
        for (r, loss) in losses.iter_mut().enumerate() {
            *loss += sweep.run(
                self,
                &mut w[r * cols + self.i1..r * cols + self.i2],
                &mut mask[r * cols + self.i1..r * cols + self.i2],
                &mut err[r * count..(r + 1) * count],
            );
        }
        let i2 = self.i2;
        linalg::gemm_sub(
            losses.len(),
            cols - i2,
            count,
            &err,
            count,
            &self.hinv[self.i1 * cols + i2..],
            cols,
            &mut w[i2..],
            cols,
        );
    }
}

/// Per-task scratch of the column sweep through one block of one row.
struct Sweep {
    rule: Rule,
    q: Vec<f64>,
    groups: GroupScratch,
}

impl Sweep {
    fn new(count: usize, rule: Rule) -> Self {
        let m = if let Rule::Groups { m, .. } = rule {
            m
        } else {
            0
        };
        Sweep {
            rule,
            q: vec![0.0; count],
            groups: GroupScratch::new(m),
        }
    }

    /// The reference's inner loop over `i` for one row: `w1` = `W1[r, :]`
    /// (becomes `Q1[r, :]`), `mask1` its mask, `err1` gets `Err1[r, :]`.
    /// Returns the row's `sum(Losses1[r, :]) / 2`.
    fn run(&mut self, block: &Block, w1: &mut [f64], mask1: &mut [bool], err1: &mut [f64]) -> f64 {
        if let Rule::Threshold(t) = self.rule {
            for (i, (m, &x)) in mask1.iter_mut().zip(w1.iter()).enumerate() {
                *m = block.score(x, i) <= t;
            }
        }
        let mut loss = 0.0;
        for i in 0..w1.len() {
            if let Rule::Groups { n, m } = self.rule {
                if i % m == 0 {
                    let scores = w1[i..i + m]
                        .iter()
                        .enumerate()
                        .map(|(j, &x)| block.score(x, i + j));
                    self.groups.mark_smallest(scores, n, &mut mask1[i..i + m]);
                }
            }
            let (x, d) = (w1[i], block.diag(i));
            let q = if mask1[i] { 0.0 } else { x };
            self.q[i] = q;
            loss += (x - q) * (x - q) / (d * d);
            let e = (x - q) / d;
            if e != 0.0 {
                // W1[:, i:] -= err1 * Hinv1[i, i:]; a kept weight has e = 0.
                linalg::sub_scaled(&mut w1[i..], e, block.hinv_row(i));
            }
            err1[i] = e;
        }
        w1.copy_from_slice(&self.q);
        loss / 2.0
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Dense f64 kernels on row-major `n x n` matrices: the Cholesky
/// factorisation, the inverse of a lower-triangular matrix and the
/// `C -= A B` product they and the block update share.
mod linalg {
    use rayon::prelude::*;

    use super::ROW_CHUNK;

    /// Panel width of the blocked factorisation and inverse.
    const NB: usize = 128;
    /// Rows x columns of `C` one register tile of [`gemm_sub`] holds.
    const MR: usize = 4;
    const NR: usize = 4;
    /// Column strip width when a triangular solve runs over columns.
    const STRIP: usize = 256;

    /// A Cholesky pivot that is not positive.
    #[derive(Debug)]
    pub struct NotPositiveDefinite {
        /// Its column in the matrix the failing function was given.
        pub column: usize,
        pub pivot: f64,
    }

    /// The upper-triangular `U` with positive diagonal and `U^T U = H^-1`
    /// for the symmetric positive definite `h` (`n x n`, full), what the
    /// reference computes as `cholesky(cholesky_inverse(cholesky(H)),
    /// upper=True)` (about `n^3` multiply-adds).
    ///
    /// Computed as `U = P L^-1 P` with `L L^T = P H P` and `P` the
    /// reversal permutation (`U^T U = P L^-T L^-1 P = P (P H P)^-1 P =
    /// H^-1`; the factor is unique): one Cholesky and one triangular
    /// inverse, `n^3 / 2` multiply-adds, with no explicit `H^-1` to lose
    /// accuracy in. Reversing both axes of a row-major matrix is reversing
    /// its storage.
    pub fn inverse_upper_cholesky(
        mut h: Vec<f64>,
        n: usize,
    ) -> Result<Vec<f64>, NotPositiveDefinite> {
        h.reverse();
        cholesky(&mut h, n).map_err(|e| NotPositiveDefinite {
            column: n - 1 - e.column,
            ..e
        })?;
        let mut u = lower_inverse(&h, n);
        u.reverse();
        Ok(u)
    }

    /// In place: `a`'s lower triangle (the rest is not read) becomes `L`
    /// with `L L^T = A`; the strict upper triangle is zeroed. Blocked,
    /// right-looking: factor a diagonal block, solve the panel below it,
    /// subtract the panel's outer product from the trailing matrix.
    pub fn cholesky(a: &mut [f64], n: usize) -> Result<(), NotPositiveDefinite> {
        for k0 in (0..n).step_by(NB) {
            let k1 = (k0 + NB).min(n);
            factor_diagonal_block(a, n, k0, k1)?;
            solve_panel(a, n, k0, k1);
            update_trailing(a, n, k0, k1);
        }
        a.par_chunks_mut(n)
            .enumerate()
            .for_each(|(i, row)| row[i + 1..].fill(0.0));
        Ok(())
    }

    /// Unblocked right-looking Cholesky of `a[k0..k1, k0..k1]`.
    fn factor_diagonal_block(
        a: &mut [f64],
        n: usize,
        k0: usize,
        k1: usize,
    ) -> Result<(), NotPositiveDefinite> {
        for j in k0..k1 {
            let pivot = a[j * n + j];
            if !(pivot > 0.0 && pivot.is_finite()) {
                return Err(NotPositiveDefinite { column: j, pivot });
            }
            let d = pivot.sqrt();
            a[j * n + j] = d;
            for i in j + 1..k1 {
                a[i * n + j] /= d;
            }
            for i in j + 1..k1 {
                let lij = a[i * n + j];
                for t in j + 1..=i {
                    a[i * n + t] -= lij * a[t * n + j];
                }
            }
        }
        Ok(())
    }

    /// `L[k1.., k0..k1] = A[k1.., k0..k1] L[k0..k1, k0..k1]^-T`, row by row
    /// in parallel.
    fn solve_panel(a: &mut [f64], n: usize, k0: usize, k1: usize) {
        let nb = k1 - k0;
        // The diagonal block transposed, so that its columns are rows.
        let mut lt = vec![0.0; nb * nb];
        for i in 0..nb {
            for t in 0..=i {
                lt[t * nb + i] = a[(k0 + i) * n + k0 + t];
            }
        }
        a[k1 * n..].par_chunks_mut(n).for_each(|row| {
            let x = &mut row[k0..k1];
            for t in 0..nb {
                x[t] /= lt[t * nb + t];
                let xt = x[t];
                sub_scaled(&mut x[t + 1..], xt, &lt[t * nb + t + 1..(t + 1) * nb]);
            }
        });
    }

    /// `A[k1.., k1..] -= L21 L21^T` on and below the diagonal, with
    /// `L21 = L[k1.., k0..k1]`; each chunk of rows updates the columns up
    /// to its last row (a few entries above the diagonal are written and
    /// later zeroed).
    fn update_trailing(a: &mut [f64], n: usize, k0: usize, k1: usize) {
        let (nb, m) = (k1 - k0, n - k1);
        if m == 0 {
            return;
        }
        let mut panel = vec![0.0; m * nb];
        let mut panel_t = vec![0.0; nb * m];
        for i in 0..m {
            for t in 0..nb {
                let v = a[(k1 + i) * n + k0 + t];
                panel[i * nb + t] = v;
                panel_t[t * m + i] = v;
            }
        }
        a[k1 * n..]
            .par_chunks_mut(ROW_CHUNK * n)
            .enumerate()
            .for_each(|(c, rows)| {
                let r0 = c * ROW_CHUNK;
                let mc = rows.len() / n;
                gemm_sub(
                    mc,
                    r0 + mc,
                    nb,
                    &panel[r0 * nb..],
                    nb,
                    &panel_t,
                    m,
                    &mut rows[k1..],
                    n,
                );
            });
    }

    /// `L^-1` of the lower-triangular `l` (`n x n`), lower-triangular.
    /// Blocked forward substitution of `L X = I`, right-looking: solve a
    /// block row, subtract its contribution from all rows below (in
    /// parallel over those rows).
    pub fn lower_inverse(l: &[f64], n: usize) -> Vec<f64> {
        let mut x = vec![0.0; n * n];
        for i in 0..n {
            x[i * n + i] = 1.0;
        }
        for i0 in (0..n).step_by(NB) {
            let i1 = (i0 + NB).min(n);
            solve_diagonal_block(&mut x, l, n, i0, i1);
            // X[i1.., ..i1] -= L[i1.., i0..i1] X[i0..i1, ..i1]
            let (top, bottom) = x.split_at_mut(i1 * n);
            let xi = &top[i0 * n..];
            bottom
                .par_chunks_mut(ROW_CHUNK * n)
                .enumerate()
                .for_each(|(c, rows)| {
                    let r0 = i1 + c * ROW_CHUNK;
                    gemm_sub(
                        rows.len() / n,
                        i1,
                        i1 - i0,
                        &l[r0 * n + i0..],
                        n,
                        xi,
                        n,
                        rows,
                        n,
                    );
                });
        }
        x
    }

    /// `X[i0..i1, ..i1] = L[i0..i1, i0..i1]^-1 X[i0..i1, ..i1]`, in
    /// parallel over strips of columns.
    fn solve_diagonal_block(x: &mut [f64], l: &[f64], n: usize, i0: usize, i1: usize) {
        let nb = i1 - i0;
        let lb: Vec<f64> = (i0..i1)
            .flat_map(|r| l[r * n + i0..r * n + i1].iter().copied())
            .collect();
        let mut strips: Vec<Vec<&mut [f64]>> = Vec::new();
        for row in x[i0 * n..i1 * n].chunks_mut(n) {
            for (s, piece) in row[..i1].chunks_mut(STRIP).enumerate() {
                if s == strips.len() {
                    strips.push(Vec::with_capacity(nb));
                }
                strips[s].push(piece);
            }
        }
        strips.into_par_iter().for_each(|mut rows| {
            for r in 0..nb {
                let (done, rest) = rows.split_at_mut(r);
                let row = &mut *rest[0];
                for (t, xt) in done.iter().enumerate() {
                    sub_scaled(row, lb[r * nb + t], xt);
                }
                let d = lb[r * nb + r];
                row.iter_mut().for_each(|v| *v /= d);
            }
        });
    }

    /// `y -= a * x` elementwise (over the shorter of the two).
    pub fn sub_scaled(y: &mut [f64], a: f64, x: &[f64]) {
        for (y, x) in y.iter_mut().zip(x) {
            *y -= a * x;
        }
    }

    /// `C -= A B` for `C` `m x n`, `A` `m x k`, `B` `k x n`, row-major
    /// with leading dimensions `ldc`, `lda`, `ldb`. Serial; callers split
    /// `C` by rows. Every element is `c - (sum over p in order of a_p
    /// b_p)`, whichever tile computes it, so the split cannot change a
    /// result. No blocking over `k`: every use here is a rank-`NB` or
    /// rank-`blocksize` update, whose strip of `B` stays in cache.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_sub(
        m: usize,
        n: usize,
        k: usize,
        a: &[f64],
        lda: usize,
        b: &[f64],
        ldb: usize,
        c: &mut [f64],
        ldc: usize,
    ) {
        for j0 in (0..n).step_by(NR) {
            let nr = NR.min(n - j0);
            for i0 in (0..m).step_by(MR) {
                let mr = MR.min(m - i0);
                let (a, b, c) = (&a[i0 * lda..], &b[j0..], &mut c[i0 * ldc + j0..]);
                if mr == MR && nr == NR {
                    tile::<MR, NR>(k, a, lda, b, ldb, c, ldc);
                } else {
                    edge_tile(mr, nr, k, a, lda, b, ldb, c, ldc);
                }
            }
        }
    }

    /// One full `R x C` tile of [`gemm_sub`], its sums in registers.
    #[inline(always)]
    fn tile<const R: usize, const C: usize>(
        k: usize,
        a: &[f64],
        lda: usize,
        b: &[f64],
        ldb: usize,
        c: &mut [f64],
        ldc: usize,
    ) {
        let a_rows: [&[f64]; R] = std::array::from_fn(|r| &a[r * lda..r * lda + k]);
        let mut acc = [[0.0f64; C]; R];
        for p in 0..k {
            let bp: &[f64; C] = b[p * ldb..p * ldb + C].try_into().unwrap();
            for r in 0..R {
                let ar = a_rows[r][p];
                for j in 0..C {
                    acc[r][j] += ar * bp[j];
                }
            }
        }
        for r in 0..R {
            for j in 0..C {
                c[r * ldc + j] -= acc[r][j];
            }
        }
    }

    /// A partial tile at the bottom or right edge: the same sums.
    #[allow(clippy::too_many_arguments)]
    fn edge_tile(
        mr: usize,
        nr: usize,
        k: usize,
        a: &[f64],
        lda: usize,
        b: &[f64],
        ldb: usize,
        c: &mut [f64],
        ldc: usize,
    ) {
        for r in 0..mr {
            for j in 0..nr {
                let acc = (0..k).fold(0.0, |acc, p| acc + a[r * lda + p] * b[p * ldb + j]);
                c[r * ldc + j] -= acc;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(n: usize, seed: u64) -> Vec<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
    }

    /// `X^T X + n I` for a random `n x n` X: well conditioned SPD.
    fn spd(n: usize, seed: u64) -> Vec<f64> {
        let x = random(n * n, seed);
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = (0..n).map(|t| x[t * n + i] * x[t * n + j]).sum::<f64>();
            }
            a[i * n + i] += n as f64;
        }
        a
    }

    fn matmul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
        let mut c = vec![0.0; n * n];
        for i in 0..n {
            for t in 0..n {
                for j in 0..n {
                    c[i * n + j] += a[i * n + t] * b[t * n + j];
                }
            }
        }
        c
    }

    fn transpose(a: &[f64], n: usize) -> Vec<f64> {
        (0..n * n).map(|k| a[(k % n) * n + k / n]).collect()
    }

    fn assert_identity(a: &[f64], n: usize, tol: f64, what: &str) {
        for i in 0..n {
            for j in 0..n {
                let want = if i == j { 1.0 } else { 0.0 };
                let got = a[i * n + j];
                assert!(
                    (got - want).abs() < tol,
                    "{what}[{i},{j}] = {got}, want {want}"
                );
            }
        }
    }

    #[test]
    fn cholesky_of_a_hand_computed_3x3() {
        // The textbook example: L = [[2,0,0],[6,1,0],[-8,5,3]], exact in f64.
        let mut a = vec![4.0, 12.0, -16.0, 12.0, 37.0, -43.0, -16.0, -43.0, 98.0];
        linalg::cholesky(&mut a, 3).unwrap();
        assert_eq!(a, vec![2.0, 0.0, 0.0, 6.0, 1.0, 0.0, -8.0, 5.0, 3.0]);
    }

    #[test]
    fn inverse_upper_cholesky_of_a_hand_computed_2x2() {
        // H = [[4,2],[2,3]], H^-1 = [[3,-2],[-2,4]] / 8; U = [[a,b],[0,c]]
        // with a^2 = 3/8, ab = -2/8, b^2 + c^2 = 4/8.
        let u = linalg::inverse_upper_cholesky(vec![4.0, 2.0, 2.0, 3.0], 2).unwrap();
        let a = (3.0f64 / 8.0).sqrt();
        let b = -0.25 / a;
        let c = (0.5 - b * b).sqrt();
        for (got, want) in u.iter().zip([a, b, 0.0, c]) {
            assert!((got - want).abs() < 1e-15, "{u:?} vs {:?}", [a, b, 0.0, c]);
        }
    }

    #[test]
    fn blocked_factorisations_over_several_panels() {
        // 300 = two full panels of 128 and a partial one.
        let n = 300;
        let h = spd(n, 1);
        let mut l = h.clone();
        linalg::cholesky(&mut l, n).unwrap();
        let llt = matmul(&l, &transpose(&l, n), n);
        for (k, (got, want)) in llt.iter().zip(&h).enumerate() {
            assert!(
                (got - want).abs() < 1e-9 * want.abs().max(1.0),
                "L L^T[{k}] = {got}, want {want}"
            );
        }
        let x = linalg::lower_inverse(&l, n);
        assert_identity(&matmul(&x, &l, n), n, 1e-12, "L^-1 L");
        let u = linalg::inverse_upper_cholesky(h.clone(), n).unwrap();
        for i in 0..n {
            assert!(u[i * n + i] > 0.0, "U[{i},{i}] = {}", u[i * n + i]);
            assert!(
                u[i * n..i * n + i].iter().all(|&v| v == 0.0),
                "U row {i} not upper"
            );
        }
        assert_identity(
            &matmul(&matmul(&transpose(&u, n), &u, n), &h, n),
            n,
            1e-12,
            "U^T U H",
        );
    }

    #[test]
    fn not_positive_definite_names_the_column() {
        // Column 1 is a copy of column 0: the pivot of column 0 vanishes
        // when factorising from the last column.
        let h = vec![1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0];
        let e = linalg::inverse_upper_cholesky(h, 3).unwrap_err();
        assert_eq!(e.column, 0, "{e:?}");
        let mut w = vec![1.0f32; 6];
        let hess = Hessian {
            cols: 3,
            h: vec![1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0],
            nsamples: 1,
        };
        let msg = sparsegpt(
            &mut w,
            2,
            3,
            &hess,
            Sparsity::Unstructured(0.5),
            BLOCKSIZE,
            0.0,
        )
        .unwrap_err()
        .to_string();
        assert!(
            msg.contains("2x3 layer")
                && msg.contains("not positive definite")
                && msg.contains("column 0"),
            "{msg}"
        );
    }

    #[test]
    fn sparsity_parses_and_displays() {
        assert_eq!(
            "0.5".parse::<Sparsity>().unwrap(),
            Sparsity::Unstructured(0.5)
        );
        assert_eq!(
            " 50% ".parse::<Sparsity>().unwrap(),
            Sparsity::Unstructured(0.5)
        );
        assert_eq!(
            "2:4".parse::<Sparsity>().unwrap(),
            Sparsity::NofM { n: 2, m: 4 }
        );
        assert_eq!(Sparsity::Unstructured(0.5).to_string(), "50%");
        assert_eq!(Sparsity::Unstructured(0.125).to_string(), "12.5%");
        assert_eq!(Sparsity::Unstructured(0.3).to_string(), "30%");
        assert_eq!(Sparsity::Unstructured(0.0).to_string(), "0%");
        assert_eq!(Sparsity::NofM { n: 2, m: 4 }.to_string(), "2:4");
        for s in ["0.5", "2:4", "62.5%", "1:8"] {
            let p: Sparsity = s.parse().unwrap();
            assert_eq!(p.to_string().parse::<Sparsity>().unwrap(), p, "{s}");
        }
        for (bad, says) in [
            ("half", "expected a fraction"),
            ("1.0", "outside [0, 1)"),
            ("-0.1", "outside [0, 1)"),
            ("100%", "outside [0, 1)"),
            ("NaN", "outside [0, 1)"),
            ("3:2", "n = 3 > m = 2"),
            ("0:4", "1 <= n <= m"),
            ("2:x", "expected a fraction"),
        ] {
            let msg = bad.parse::<Sparsity>().unwrap_err().to_string();
            assert!(
                msg.contains(&format!("{bad:?}")) && msg.contains(says),
                "{bad}: {msg}"
            );
        }
    }

    #[test]
    fn n_of_m_leaves_exactly_n_zeros_per_group() {
        let (rows, cols) = (16, 64);
        let w0: Vec<f32> = random(rows * cols, 2).iter().map(|&x| x as f32).collect();
        let cols_h = cols;
        let x = random(200 * cols, 3);
        let mut hess = Hessian::new(cols_h);
        hess.add(&gram(&x, cols), 4);
        for (n, m) in [(2, 4), (1, 4), (4, 8), (3, 4)] {
            let s = Sparsity::NofM { n, m };
            let mut mag = w0.clone();
            let mut sg = w0.clone();
            let om = magnitude(&mut mag, rows, cols, s).unwrap();
            let os = sparsegpt(&mut sg, rows, cols, &hess, s, BLOCKSIZE, PERCDAMP).unwrap();
            for (what, w, o) in [("magnitude", &mag, om), ("sparsegpt", &sg, os)] {
                assert_eq!(o.pruned, rows * cols / m * n, "{what} {s}");
                assert_eq!(o.kept + o.pruned, rows * cols);
                for (g, group) in w.chunks(m).enumerate() {
                    let zeros = group.iter().filter(|&&v| v == 0.0).count();
                    assert_eq!(zeros, n, "{what} {s}: group {g} {group:?}");
                }
            }
            // Magnitude zeroes the n smallest |w| and leaves the rest alone.
            for (g, (pruned, orig)) in mag.chunks(m).zip(w0.chunks(m)).enumerate() {
                let mut order: Vec<usize> = (0..m).collect();
                order.sort_by(|&a, &b| orig[a].abs().total_cmp(&orig[b].abs()));
                for (rank, &j) in order.iter().enumerate() {
                    let want = if rank < n { 0.0 } else { orig[j] };
                    assert_eq!(pruned[j], want, "{s} group {g} column {j}");
                }
            }
        }
    }

    fn gram(x: &[f64], cols: usize) -> Vec<f64> {
        let mut g = vec![0.0; cols * cols];
        for t in x.chunks(cols) {
            for i in 0..cols {
                linalg::sub_scaled(&mut g[i * cols..(i + 1) * cols], -t[i], t);
            }
        }
        g
    }

    #[test]
    fn magnitude_unstructured_prunes_up_to_the_sorted_index_with_ties() {
        // 10 weights, p = 0.35: int(3.5) = 3, the threshold is the 4th
        // smallest |w| = 0.4, and its tie -0.4 goes too: 5 pruned.
        let w0 = [0.9f32, -0.1, 0.4, 0.2, -0.4, 0.7, 0.5, -0.3, 0.8, 0.6];
        let mut w = w0;
        let o = magnitude(&mut w, 2, 5, Sparsity::Unstructured(0.35)).unwrap();
        assert_eq!(
            o,
            PruneOutcome {
                kept: 5,
                pruned: 5,
                obs_loss: 0.0
            }
        );
        assert_eq!(w, [0.9, 0.0, 0.0, 0.0, 0.0, 0.7, 0.5, 0.0, 0.8, 0.6]);
        // Without ties: int(numel * p) + 1 (the element at the index goes).
        let mut w: Vec<f32> = random(1000, 4).iter().map(|&x| x as f32).collect();
        let o = magnitude(&mut w, 10, 100, Sparsity::Unstructured(0.5)).unwrap();
        assert_eq!(
            (o.pruned, w.iter().filter(|&&v| v == 0.0).count()),
            (501, 501)
        );
        // p = 0 prunes nothing.
        let mut w = w0;
        assert_eq!(
            magnitude(&mut w, 2, 5, Sparsity::Unstructured(0.0))
                .unwrap()
                .pruned,
            0
        );
        assert_eq!(w, w0);
    }

    #[test]
    fn hessian_is_the_running_mean_of_add_batch() {
        // Batches of 2 and 1 sequences: H = (2/3) (G1 + G2).
        let g1 = vec![1.0, 2.0, 2.0, 5.0];
        let g2 = vec![3.0, -1.0, -1.0, 4.0];
        let mut h = Hessian::new(2);
        h.add(&g1, 2);
        h.add(&g2, 1);
        assert_eq!(h.nsamples, 3);
        for (k, got) in h.h.iter().enumerate() {
            let want = 2.0 / 3.0 * (g1[k] + g2[k]);
            assert!((got - want).abs() < 1e-15, "H[{k}] = {got}, want {want}");
        }
    }

    #[test]
    fn bad_inputs_are_refused_by_name() {
        let mut w = vec![1.0f32; 12];
        let h = Hessian {
            cols: 4,
            h: vec![1.0; 16],
            nsamples: 1,
        };
        let err = |r: Result<PruneOutcome>| r.unwrap_err().to_string();
        let s = Sparsity::Unstructured(0.5);
        assert!(err(magnitude(&mut w, 3, 5, s)).contains("3x5 layer needs 15 weights, got 12"));
        assert!(err(sparsegpt(&mut w, 2, 6, &h, s, 128, 0.01)).contains("Hessian is 4x4"));
        assert!(
            err(magnitude(&mut w, 2, 6, Sparsity::NofM { n: 2, m: 4 })).contains("multiple of 4")
        );
        assert!(
            err(magnitude(&mut w, 3, 4, Sparsity::NofM { n: 5, m: 4 })).contains("n = 5 > m = 4")
        );
        assert!(
            err(magnitude(&mut w, 3, 4, Sparsity::Unstructured(1.0))).contains("outside [0, 1)")
        );
        assert!(err(sparsegpt(
            &mut w,
            3,
            4,
            &h,
            Sparsity::NofM { n: 2, m: 4 },
            6,
            0.01
        ))
        .contains("straddle"));
        assert!(err(sparsegpt(&mut w, 3, 4, &Hessian::new(4), s, 128, 0.01))
            .contains("no calibration data"));
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let (rows, cols) = (70, 300);
        let w0: Vec<f32> = random(rows * cols, 5).iter().map(|&x| x as f32).collect();
        let mut hess = Hessian::new(cols);
        hess.add(&spd(cols, 6), 3);
        let run = |threads: usize, s: Sparsity| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut w = w0.clone();
                let o = sparsegpt(&mut w, rows, cols, &hess, s, BLOCKSIZE, PERCDAMP).unwrap();
                (w, o)
            })
        };
        for s in [Sparsity::Unstructured(0.5), Sparsity::NofM { n: 2, m: 4 }] {
            let (w1, o1) = run(1, s);
            let (w3, o3) = run(3, s);
            assert_eq!(o1, o3, "{s}");
            assert!(
                w1.iter().zip(&w3).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{s}: weights differ"
            );
        }
    }

    /// Ad-hoc timings (release): `cargo test --release --lib
    /// compress::sparsegpt::tests::timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn timing() {
        use std::time::Instant;
        for (rows, cols) in [(512, 512), (1536, 512), (2048, 2048), (4096, 4096)] {
            let tokens = cols + 512;
            let x = random(tokens * cols, 7);
            let t = Instant::now();
            // G = X^T X as G -= (-X^T) X, with the kernel the pruning uses.
            let neg_xt: Vec<f64> = (0..cols * tokens)
                .map(|k| -x[(k % tokens) * cols + k / tokens])
                .collect();
            let mut g = vec![0.0; cols * cols];
            g.par_chunks_mut(ROW_CHUNK * cols)
                .enumerate()
                .for_each(|(c, gc)| {
                    let (r0, mc) = (c * ROW_CHUNK, gc.len() / cols);
                    for p0 in (0..tokens).step_by(BLOCKSIZE) {
                        let k = BLOCKSIZE.min(tokens - p0);
                        let a = &neg_xt[r0 * tokens + p0..];
                        linalg::gemm_sub(mc, cols, k, a, tokens, &x[p0 * cols..], cols, gc, cols);
                    }
                });
            let t_gram = t.elapsed();
            let mut hess = Hessian::new(cols);
            hess.add(&g, 8);
            let t = Instant::now();
            let (h, _) = damped_hessian(&hess.h, cols, PERCDAMP);
            let _ = linalg::inverse_upper_cholesky(h, cols).unwrap();
            let t_inv = t.elapsed();
            let w0: Vec<f32> = random(rows * cols, 8).iter().map(|&x| x as f32).collect();
            for s in [Sparsity::Unstructured(0.5), Sparsity::NofM { n: 2, m: 4 }] {
                let mut w = w0.clone();
                let t = Instant::now();
                sparsegpt(&mut w, rows, cols, &hess, s, BLOCKSIZE, PERCDAMP).unwrap();
                let t_all = t.elapsed();
                let mut w = w0.clone();
                let t = Instant::now();
                magnitude(&mut w, rows, cols, s).unwrap();
                let t_mag = t.elapsed();
                eprintln!(
                    "{rows}x{cols} {s}: sparsegpt {t_all:.2?} (inverse factor {t_inv:.2?}), \
                     magnitude {t_mag:.2?}; gram of {tokens} tokens {t_gram:.2?}; {} threads",
                    rayon::current_num_threads()
                );
            }
        }
    }
}
