//! `compress::sparsegpt` against the published reference: a float64
//! transcription of IST-DASLab/sparsegpt's `add_batch` / `fasterprune` and
//! of wanda's `prune_magnitude` (`tests/python/sparsegpt_ref.py`, run on
//! CPU torch in `target/torch-venv`). A random layer and correlated
//! calibration inputs with one dead input column are generated here; our
//! Hessian (fed per-batch Gram matrices through `Hessian::add`) must equal
//! `add_batch`'s, our masks the reference's exactly, our weights its
//! weights to 1e-4 relative, for 50% and 2:4, on a layer whose last block
//! is partial (200 columns) and one of three blocks (300 columns).
//!
//! Without Python: SparseGPT must reconstruct the layer's outputs better
//! than magnitude pruning at the same sparsity on correlated inputs (the
//! case the OBS update exists for).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use sharedmoe::compress::sparsegpt::{
    magnitude, reconstruction_error, sparsegpt, Hessian, Sparsity, BLOCKSIZE, PERCDAMP,
};

/// A linear layer and its calibration batches.
struct Layer {
    rows: usize,
    cols: usize,
    w: Vec<f32>,
    /// Per batch: how many sequences it holds and its inputs
    /// `[sequences * seqlen, cols]`.
    batches: Vec<(usize, Vec<f64>)>,
    seqlen: usize,
}

impl Layer {
    /// Random weights; inputs correlated along the input dimension
    /// (AR(1) with coefficient 0.9, per-column scales spread over e^±1),
    /// with input column `dead` all zeros.
    fn random(
        seed: u64,
        rows: usize,
        cols: usize,
        sequences: &[usize],
        seqlen: usize,
        dead: Option<usize>,
    ) -> Self {
        let mut rng = common::rng(seed);
        let w = common::normal(&mut rng, rows * cols)
            .iter()
            .map(|&x| x as f32)
            .collect();
        let scales: Vec<f64> = common::normal(&mut rng, cols)
            .iter()
            .map(|z| (0.5 * z).exp())
            .collect();
        let batches = sequences
            .iter()
            .map(|&s| (s, correlated_inputs(&mut rng, s * seqlen, &scales, dead)))
            .collect();
        Layer {
            rows,
            cols,
            w,
            batches,
            seqlen,
        }
    }

    /// `sum x x^T` over all calibration tokens.
    fn gram(&self) -> Vec<f64> {
        let mut g = vec![0.0; self.cols * self.cols];
        for (_, x) in &self.batches {
            add_gram(&mut g, x, self.cols);
        }
        g
    }

    /// The Hessian as our calibration programs build it: one Gram matrix
    /// per batch through `Hessian::add`.
    fn hessian(&self) -> Hessian {
        let mut h = Hessian::new(self.cols);
        for (sequences, x) in &self.batches {
            let mut g = vec![0.0; self.cols * self.cols];
            add_gram(&mut g, x, self.cols);
            h.add(&g, *sequences);
        }
        h
    }
}

fn correlated_inputs(
    rng: &mut ChaCha8Rng,
    tokens: usize,
    scales: &[f64],
    dead: Option<usize>,
) -> Vec<f64> {
    let cols = scales.len();
    let z = common::normal(rng, tokens * cols);
    let mut x = vec![0.0; tokens * cols];
    for t in 0..tokens {
        let mut prev = 0.0;
        for j in 0..cols {
            prev = 0.9 * prev + (1.0f64 - 0.81).sqrt() * z[t * cols + j];
            x[t * cols + j] = prev * scales[j];
        }
        if let Some(d) = dead {
            x[t * cols + d] = 0.0;
        }
    }
    x
}

/// `g += sum over the rows x of xs of x x^T`.
fn add_gram(g: &mut [f64], xs: &[f64], cols: usize) {
    for x in xs.chunks(cols) {
        for (i, &xi) in x.iter().enumerate() {
            for (gij, &xj) in g[i * cols..(i + 1) * cols].iter_mut().zip(x) {
                *gij += xi * xj;
            }
        }
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("sharedmoe-sparsegpt-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn bytes<T: bytemuck::Pod>(v: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

/// Writes the reference's input file for `layer` pruned to `sparsity`.
fn write_case(path: &Path, layer: &Layer, sparsity: Sparsity) {
    let w = bytes(&layer.w);
    let xs: Vec<(String, Vec<u8>, Vec<usize>)> = layer
        .batches
        .iter()
        .enumerate()
        .map(|(i, (s, x))| {
            (
                format!("x{i}"),
                bytes(x),
                vec![*s, layer.seqlen, layer.cols],
            )
        })
        .collect();
    let mut views = vec![(
        "w".to_string(),
        TensorView::new(Dtype::F32, vec![layer.rows, layer.cols], &w).unwrap(),
    )];
    for (name, data, shape) in &xs {
        views.push((
            name.clone(),
            TensorView::new(Dtype::F64, shape.clone(), data).unwrap(),
        ));
    }
    let spec = match sparsity {
        Sparsity::Unstructured(p) => p.to_string(),
        Sparsity::NofM { n, m } => format!("{n}:{m}"),
    };
    let meta = HashMap::from([
        ("sparsity".to_string(), spec),
        ("blocksize".to_string(), BLOCKSIZE.to_string()),
        ("percdamp".to_string(), PERCDAMP.to_string()),
    ]);
    safetensors::serialize_to_file(views, &Some(meta), path).unwrap();
}

/// The reference's outputs for one case file.
struct Reference {
    h: Vec<f64>,
    sparsegpt: Vec<f64>,
    loss: f64,
    magnitude: Vec<f32>,
}

/// Runs the transcription on `cases` (one Python process) and reads back
/// its outputs.
fn run_reference(cases: &[PathBuf]) -> Vec<Reference> {
    let python = common::torch_python();
    let out = std::process::Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/sparsegpt_ref.py"))
        .args(cases)
        .output()
        .expect("running the torch venv's python");
    assert!(
        out.status.success(),
        "sparsegpt_ref.py: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    cases
        .iter()
        .map(|case| {
            let path = case.with_extension("out.safetensors");
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let st = SafeTensors::deserialize(&data).unwrap();
            let f64s = |name: &str| -> Vec<f64> {
                let t = st.tensor(name).unwrap();
                assert_eq!(t.dtype(), Dtype::F64, "{name}");
                t.data()
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                    .collect()
            };
            let mag = st.tensor("magnitude").unwrap();
            assert_eq!(mag.dtype(), Dtype::F32, "magnitude");
            Reference {
                h: f64s("h"),
                sparsegpt: f64s("sparsegpt"),
                loss: f64s("loss")[0],
                magnitude: mag
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
            }
        })
        .collect()
}

/// `max |a - b| / max |b|`, with the index of the largest difference.
fn max_rel(a: &[f64], b: &[f64]) -> (f64, usize) {
    let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let (k, d) = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .enumerate()
        .fold(
            (0, 0.0),
            |best, (k, d)| if d > best.1 { (k, d) } else { best },
        );
    (d / scale, k)
}

/// Our SparseGPT and magnitude results on `layer` for each sparsity must
/// match the reference's.
fn check_against_reference(name: &str, layer: &Layer, sparsities: &[Sparsity]) {
    let dir = temp_dir(name);
    let cases: Vec<PathBuf> = sparsities
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            let path = dir.join(format!("case{i}.safetensors"));
            write_case(&path, layer, s);
            path
        })
        .collect();
    let references = run_reference(&cases);
    let (rows, cols) = (layer.rows, layer.cols);
    let hessian = layer.hessian();
    for (&sparsity, reference) in sparsities.iter().zip(&references) {
        let case = format!("{name} {rows}x{cols} {sparsity}");
        let (rel, k) = max_rel(&hessian.h, &reference.h);
        assert!(
            rel < 1e-12,
            "{case}: H[{},{}]: ours {}, add_batch {} (max relative difference {rel:.2e})",
            k / cols,
            k % cols,
            hessian.h[k],
            reference.h[k]
        );

        let mut ours = layer.w.clone();
        let outcome = sparsegpt(
            &mut ours, rows, cols, &hessian, sparsity, BLOCKSIZE, PERCDAMP,
        )
        .unwrap();
        let ours: Vec<f64> = ours.iter().map(|&x| x as f64).collect();
        check_weights(&case, cols, &ours, &reference.sparsegpt);
        let zeros = reference.sparsegpt.iter().filter(|&&x| x == 0.0).count();
        assert_eq!(outcome.pruned, zeros, "{case}: pruned count");
        let loss_rel = (outcome.obs_loss - reference.loss).abs() / reference.loss;
        assert!(
            loss_rel < 1e-9,
            "{case}: SparseGPT loss: ours {}, reference {} ({loss_rel:.2e} relative)",
            outcome.obs_loss,
            reference.loss
        );

        let mut mag = layer.w.clone();
        magnitude(&mut mag, rows, cols, sparsity).unwrap();
        for (k, (a, b)) in mag.iter().zip(&reference.magnitude).enumerate() {
            assert!(
                a.to_bits() == b.to_bits(),
                "{case}: magnitude weight [{},{}]: ours {a}, reference {b}",
                k / cols,
                k % cols
            );
        }
        eprintln!(
            "{case}: {} of {} pruned, weights within {:.2e} of the reference (max relative), \
             loss {} vs {}",
            outcome.pruned,
            rows * cols,
            max_rel(&ours, &reference.sparsegpt).0,
            outcome.obs_loss,
            reference.loss
        );
    }
    // Kept when a check fails, for a look at the files.
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same zero pattern exactly, and every weight within 1e-4 of the
/// reference's: relative to the largest weight overall and, per element,
/// relative to itself (floored at 1e-3 of the largest).
fn check_weights(case: &str, cols: usize, ours: &[f64], reference: &[f64]) {
    let at = |k: usize| format!("[{},{}]", k / cols, k % cols);
    for (k, (a, b)) in ours.iter().zip(reference).enumerate() {
        assert!(
            (*a == 0.0) == (*b == 0.0),
            "{case}: mask differs at {}: ours {a}, reference {b}",
            at(k)
        );
    }
    let (rel, k) = max_rel(ours, reference);
    assert!(
        rel < 1e-4,
        "{case}: weight {}: ours {}, reference {} (max |a-b| / max |b| = {rel:.2e})",
        at(k),
        ours[k],
        reference[k]
    );
    let floor = 1e-3 * reference.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    for (k, (a, b)) in ours.iter().zip(reference).enumerate() {
        let err = (a - b).abs() / b.abs().max(floor);
        assert!(
            err < 1e-4,
            "{case}: weight {}: ours {a}, reference {b} ({err:.2e} relative)",
            at(k)
        );
    }
}

const BOTH: [Sparsity; 2] = [Sparsity::Unstructured(0.5), Sparsity::NofM { n: 2, m: 4 }];

#[test]
fn matches_reference_with_a_partial_last_block() {
    // 200 = 128 + 72 columns; 6 sequences of 40 tokens in 3 batches.
    let layer = Layer::random(1, 48, 200, &[2, 1, 3], 40, Some(17));
    check_against_reference("partial-block", &layer, &BOTH);
}

#[test]
fn matches_reference_over_three_blocks() {
    // 300 = 128 + 128 + 44 columns; the dead input in the middle block.
    let layer = Layer::random(2, 40, 300, &[1, 3, 2, 2], 40, Some(150));
    check_against_reference("three-blocks", &layer, &BOTH);
}

#[test]
fn sparsegpt_reconstructs_better_than_magnitude() {
    let layer = Layer::random(3, 64, 256, &[4, 4], 64, None);
    let (rows, cols) = (layer.rows, layer.cols);
    let gram = layer.gram();
    let hessian = layer.hessian();
    for sparsity in BOTH {
        let mut sg = layer.w.clone();
        sparsegpt(&mut sg, rows, cols, &hessian, sparsity, BLOCKSIZE, PERCDAMP).unwrap();
        let mut mag = layer.w.clone();
        magnitude(&mut mag, rows, cols, sparsity).unwrap();
        let e_sg = reconstruction_error(&layer.w, &sg, rows, cols, &gram);
        let e_mag = reconstruction_error(&layer.w, &mag, rows, cols, &gram);
        eprintln!(
            "{rows}x{cols} {sparsity}: ||WX - W'X||^2 sparsegpt {e_sg:.4e}, magnitude {e_mag:.4e}"
        );
        assert!(
            e_sg < e_mag,
            "{rows}x{cols} {sparsity}: SparseGPT's reconstruction error {e_sg} is not below \
             magnitude pruning's {e_mag}"
        );
    }
}
