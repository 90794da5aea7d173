//! `sharedmoe compress --ckpt D --out O [--sparsity 0.5 | --pattern 2:4]
//! [--method sparsegpt|magnitude] [--quant none|bf16|nf4 [--double-quant]]`:
//! post-training compression of a dense checkpoint's block linears (q, k,
//! v, o, gate, up, down; the embeddings, head and norms stay as they are,
//! as in the references).
//!
//! SparseGPT (Frantar & Alistarh 2023) prunes the blocks in order, each
//! from calibration statistics of its inputs with the earlier blocks
//! already pruned: the Gram matrices come from the compiled forward on the
//! configured backend ([`gram_program`]), the OBS solve runs on the host
//! in f64 ([`crate::compress::sparsegpt`]). NF4 follows bitsandbytes
//! ([`crate::compress::nf4`]); the output is a compressed checkpoint
//! ([`crate::ckpt::compressed`]) that `eval`, `generate`, `checkpoint
//! inspect` and `checkpoint export-hf` read.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::ckpt::{self, compressed};
use crate::compress::sparsegpt::{self, Hessian, Sparsity};
use crate::graph::HostTensor;
use crate::model::calibration::{gram_program, linears, LinearInput};
use crate::model::stored::{Storage, StoredTensor};
use crate::model::{param_specs, FfnKind, ParamSpec, Params, Role};
use crate::runtime::Arg;
use crate::train::client::open_client_with;
use crate::train::Config;

use super::eval::{checkpoint_config, eval_batches, training_batches};

#[derive(clap::Args, Debug, Clone)]
pub struct CompressArgs {
    /// The dense checkpoint to compress.
    #[arg(long)]
    pub ckpt: PathBuf,
    /// The compressed checkpoint to write (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    /// Fraction of every block linear's weights to remove (unstructured).
    #[arg(long, conflicts_with = "pattern")]
    pub sparsity: Option<f64>,
    /// n:m structured sparsity instead, e.g. 2:4 (n of every m consecutive
    /// inputs of each output removed).
    #[arg(long)]
    pub pattern: Option<String>,
    /// How pruned weights are chosen.
    #[arg(long, value_enum, default_value = "sparsegpt")]
    pub method: Method,
    /// How the block linears are stored: none (f32), bf16 (every tensor),
    /// nf4 (bitsandbytes 4-bit NormalFloat, blocks of 64).
    #[arg(long, value_enum, default_value = "none")]
    pub quant: Quant,
    /// NF4 with the block scales themselves quantised to 8 bits (QLoRA's
    /// double quantisation: 4.127 bits per weight instead of 4.5).
    #[arg(long)]
    pub double_quant: bool,
    /// Calibration text for SparseGPT: parquet files, directories or globs
    /// (default: the first rows of the run's training order, which its
    /// validation rows never overlap).
    #[arg(long)]
    pub calib: Vec<PathBuf>,
    /// tokenizer.json for --calib (default: the run's; an imported model
    /// has none).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Calibration sequences.
    #[arg(long, default_value_t = 128)]
    pub samples: usize,
    /// Tokens per calibration sequence (default: the run's train.seq_len;
    /// the reference's 2048 is LLaMA's context).
    #[arg(long)]
    pub seq: Option<i64>,
    /// PJRT plugin path (overrides discovery).
    #[arg(long)]
    pub plugin: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Sparsegpt,
    Magnitude,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quant {
    None,
    Bf16,
    Nf4,
}

impl CompressArgs {
    /// The sparsity asked for, if any.
    pub fn sparsity(&self) -> Result<Option<Sparsity>> {
        match (self.sparsity, &self.pattern) {
            (Some(f), None) => Ok(Some(Sparsity::Unstructured(f))),
            (None, Some(p)) => {
                let s: Sparsity = p.parse()?;
                if !matches!(s, Sparsity::NofM { .. }) {
                    bail!(
                        "--pattern {p}: expected n:m such as 2:4 (use --sparsity for a fraction)"
                    );
                }
                Ok(Some(s))
            }
            (None, None) => Ok(None),
            (Some(_), Some(_)) => bail!("--sparsity and --pattern exclude each other"),
        }
    }

    /// How parameter `spec` is stored.
    fn storage(&self, spec: &ParamSpec) -> Storage {
        let block_linear = matches!(spec.role, Role::Attention | Role::Mlp);
        match self.quant {
            Quant::None => Storage::F32,
            Quant::Bf16 => Storage::BF16,
            Quant::Nf4 if block_linear => Storage::Nf4 {
                double_quant: self.double_quant,
            },
            Quant::Nf4 => Storage::F32,
        }
    }

    /// What goes into config.json as `compression`.
    fn recipe(
        &self,
        sparsity: Option<Sparsity>,
        calibration: Option<&Calibration>,
    ) -> serde_json::Value {
        serde_json::json!({
            "source": self.ckpt.display().to_string(),
            "pruning": sparsity.map(|s| serde_json::json!({
                "method": format!("{:?}", self.method).to_lowercase(),
                "sparsity": s.to_string(),
                "blocksize": sparsegpt::BLOCKSIZE,
                "percdamp": sparsegpt::PERCDAMP,
            })),
            "calibration": calibration.map(|c| serde_json::json!({
                "source": c.source,
                "sequences": c.sequences,
                "seq": c.seq,
            })),
            "quantization": match self.quant {
                Quant::None => serde_json::Value::Null,
                Quant::Bf16 => "bf16".into(),
                Quant::Nf4 if self.double_quant => "nf4 + double quantisation".into(),
                Quant::Nf4 => "nf4".into(),
            },
        })
    }
}

/// What one block linear's pruning did (logged, and returned for reports).
#[derive(Clone, Debug)]
pub struct LinearReport {
    pub name: String,
    pub pruned: usize,
    pub total: usize,
    /// ||W X - W' X||^2 / ||W X||^2 over the calibration inputs (SparseGPT
    /// only: magnitude pruning has no calibration).
    pub relative_error: Option<f64>,
}

pub fn run(a: &CompressArgs) -> Result<()> {
    let reports = compress(a)?;
    let (pruned, total) = reports
        .iter()
        .fold((0, 0), |(p, t), r| (p + r.pruned, t + r.total));
    if total > 0 {
        println!(
            "pruned {pruned} of {total} block-linear weights ({:.1}%)",
            100.0 * pruned as f64 / total as f64
        );
    }
    print!("{}", super::checkpoint::inspect(&a.out)?);
    Ok(())
}

/// Compresses `a.ckpt` into `a.out`; the per-linear pruning reports.
pub fn compress(a: &CompressArgs) -> Result<Vec<LinearReport>> {
    if a.out.exists() {
        bail!(
            "{}: already exists; compress writes a new checkpoint",
            a.out.display()
        );
    }
    let sparsity = a.sparsity()?;
    if a.double_quant && a.quant != Quant::Nf4 {
        bail!("--double-quant quantises NF4's block scales: it needs --quant nf4");
    }
    let cfg = checkpoint_config(&a.ckpt)?;
    if cfg.model.ffn != FfnKind::Dense {
        bail!(
            "{}: compress works on dense (LLaMA) checkpoints; this model's FFN is {:?}",
            a.ckpt.display(),
            cfg.model.ffn
        );
    }
    let specs = param_specs(&cfg.model);
    let mut checkpoint = ckpt::load(&a.ckpt, &specs, ckpt::Purpose::Weights)?;
    let mut calibration = None;
    let reports = match (sparsity, a.method) {
        (None, _) => vec![],
        (Some(s), Method::Magnitude) => prune_magnitude(&cfg, &mut checkpoint.params, s)?,
        (Some(s), Method::Sparsegpt) => {
            let calib =
                Calibration::read(&cfg, &a.calib, a.tokenizer.as_deref(), a.samples, a.seq)?;
            let reports =
                prune_sparsegpt(&cfg, &mut checkpoint.params, s, &calib, a.plugin.as_deref())?;
            calibration = Some(calib);
            reports
        }
    };
    let stored: Vec<(ParamSpec, StoredTensor)> = specs
        .iter()
        .zip(&checkpoint.params)
        .map(|(spec, (_, dims, values))| {
            (
                spec.clone(),
                StoredTensor::encode(values, dims, a.storage(spec)),
            )
        })
        .collect();
    compressed::save(
        &a.out,
        &cfg.model,
        cfg.train.seq_len,
        &stored,
        &checkpoint.state,
        &a.recipe(sparsity, calibration.as_ref()),
    )?;
    Ok(reports)
}

/// The block linears of every layer, as (layer, index into the flat
/// parameter list, the input they read), in checkpoint order.
fn block_linears(cfg: &Config) -> Vec<Vec<(usize, LinearInput)>> {
    let specs = param_specs(&cfg.model);
    let index = |s: &ParamSpec| specs.iter().position(|p| p.name == s.name).expect("a spec");
    Params::spec(&cfg.model)
        .layers
        .iter()
        .map(|layer| {
            linears(layer)
                .into_iter()
                .map(|(s, input)| (index(s), input))
                .collect()
        })
        .collect()
}

fn prune_magnitude(
    cfg: &Config,
    params: &mut ckpt::Tensors,
    sparsity: Sparsity,
) -> Result<Vec<LinearReport>> {
    let mut reports = vec![];
    for layer in block_linears(cfg) {
        for (k, _) in layer {
            let (name, dims, w) = &mut params[k];
            let (rows, cols) = (dims[0] as usize, dims[1] as usize);
            let outcome = sparsegpt::magnitude(w, rows, cols, sparsity)
                .with_context(|| format!("magnitude pruning of {name}"))?;
            reports.push(LinearReport {
                name: name.clone(),
                pruned: outcome.pruned,
                total: rows * cols,
                relative_error: None,
            });
        }
    }
    Ok(reports)
}

/// Calibration sequences: `sequences` rows of `seq` tokens, in batches of
/// `batch` rows.
pub struct Calibration {
    /// Where they came from (for the record).
    pub source: String,
    pub sequences: usize,
    pub seq: i64,
    pub batch: i64,
    /// [batch * seq] tokens per batch.
    pub batches: Vec<Vec<i32>>,
}

impl Calibration {
    /// Rows per program call: the largest of 8, 4, 2, 1 dividing `samples`.
    fn batch_rows(samples: usize) -> i64 {
        [8, 4, 2, 1]
            .into_iter()
            .find(|b| samples % b == 0)
            .expect("1 divides") as i64
    }

    /// `samples` sequences of `seq` tokens (default the run's) from the
    /// parquet files `calib`, or else from the start of the run's training
    /// order.
    pub fn read(
        cfg: &Config,
        calib: &[PathBuf],
        tokenizer: Option<&Path>,
        samples: usize,
        seq: Option<i64>,
    ) -> Result<Calibration> {
        if samples == 0 {
            bail!("--samples 0: SparseGPT needs calibration sequences");
        }
        let seq = seq.unwrap_or(cfg.train.seq_len);
        let batch = Self::batch_rows(samples);
        let mut c = cfg.clone();
        c.train.seq_len = seq;
        c.train.micro_batch = batch;
        c.train.replicas = 1;
        c.train.global_batch = batch;
        let wanted = samples / batch as usize;
        let (grouped, source) = if calib.is_empty() {
            (
                training_batches(&c, wanted)?,
                "the run's training order".to_string(),
            )
        } else {
            let shown: Vec<String> = calib.iter().map(|p| p.display().to_string()).collect();
            (
                eval_batches(&mut c, calib, tokenizer, wanted)?,
                shown.join(", "),
            )
        };
        if grouped.len() < wanted {
            bail!(
                "calibration: {} sequences of {seq} tokens asked for, the data holds {}",
                samples,
                grouped.len() * batch as usize
            );
        }
        // Rows of seq + 1 tokens (inputs and targets): the inputs are all a
        // forward needs.
        let batches = grouped
            .iter()
            .map(|g| {
                g.concat()
                    .chunks_exact(seq as usize + 1)
                    .flat_map(|row| row[..seq as usize].to_vec())
                    .collect()
            })
            .collect();
        Ok(Calibration {
            source,
            sequences: samples,
            seq,
            batch,
            batches,
        })
    }
}

/// SparseGPT over the blocks in order: block l's Hessians come from a pass
/// over the calibration sequences with blocks 0..l already pruned (the
/// reference's sequential mode), then each of its linears is pruned.
fn prune_sparsegpt(
    cfg: &Config,
    params: &mut ckpt::Tensors,
    sparsity: Sparsity,
    calib: &Calibration,
    plugin: Option<&Path>,
) -> Result<Vec<LinearReport>> {
    let client = open_client_with(cfg, plugin, 1)?;
    let dev = &client.devices()[0];
    let layers = block_linears(cfg);
    let bar = indicatif::ProgressBar::new(layers.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("sparsegpt {bar:30} layer {pos}/{len} {elapsed}")
            .expect("a valid template"),
    );
    let mut reports = vec![];
    for (l, layer) in layers.iter().enumerate() {
        let program = gram_program(&cfg.model, calib.batch, calib.seq, l as i64)?
            .compile(&client)
            .with_context(|| format!("compiling layer {l}'s calibration program"))?;
        let hessians = layer_hessians(&client, dev, &program, params, calib)?;
        for &(k, input) in layer {
            let (name, dims, w) = &mut params[k];
            let (rows, cols) = (dims[0] as usize, dims[1] as usize);
            let hessian = &hessians[input as usize];
            let dense = w.clone();
            let outcome = sparsegpt::sparsegpt(
                w,
                rows,
                cols,
                hessian,
                sparsity,
                sparsegpt::BLOCKSIZE,
                sparsegpt::PERCDAMP,
            )
            .with_context(|| format!("SparseGPT on {name}"))?;
            // ||WX - W'X||^2 / ||WX||^2, and what magnitude pruning of the
            // same layer to the same sparsity would leave, for scale. H is
            // the Gram matrix times 2/n, which the ratio does not see.
            let error = |pruned: &[f32]| {
                sparsegpt::reconstruction_error(&dense, pruned, rows, cols, &hessian.h)
            };
            let signal = error(&vec![0.0; dense.len()]).max(f64::MIN_POSITIVE);
            let relative = |pruned: &[f32]| error(pruned) / signal;
            let mut by_magnitude = dense.clone();
            sparsegpt::magnitude(&mut by_magnitude, rows, cols, sparsity)?;
            let relative_error = relative(w);
            tracing::info!(
                "layer {l} {name}: pruned {} of {}, relative reconstruction error {relative_error:.3e} \
                 (magnitude pruning: {:.3e})",
                outcome.pruned,
                rows * cols,
                relative(&by_magnitude)
            );
            reports.push(LinearReport {
                name: name.clone(),
                pruned: outcome.pruned,
                total: rows * cols,
                relative_error: Some(relative_error),
            });
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(reports)
}

/// One layer's SparseGPT Hessian for each [`LinearInput`] (in
/// [`LinearInput::ALL`] order), accumulated from the Gram matrices of every
/// calibration batch, with the current `params`, by that layer's `program`.
fn layer_hessians(
    client: &crate::runtime::Client,
    dev: &crate::runtime::Device,
    program: &crate::graph::Compiled,
    params: &ckpt::Tensors,
    calib: &Calibration,
) -> Result<Vec<Hessian>> {
    let weights = params
        .iter()
        .map(|(_, dims, v)| Ok(client.buffer_from_host(v, dims, dev)?))
        .collect::<Result<Vec<_>>>()?;
    let per_layer = LinearInput::ALL.len();
    let mut out: Vec<Option<Hessian>> = (0..per_layer).map(|_| None).collect();
    for tokens in &calib.batches {
        let tokens = client.buffer_from_host(tokens, &[calib.batch, calib.seq], dev)?;
        let args = weights
            .iter()
            .chain(std::iter::once(&tokens))
            .map(Arg::Borrowed)
            .collect();
        let results = program.execute(vec![args])?.remove(0);
        for (j, buffer) in results.iter().enumerate() {
            let g = HostTensor::from_buffer(buffer)?.to_f64();
            let cols = (g.len() as f64).sqrt() as usize;
            out[j]
                .get_or_insert_with(|| Hessian::new(cols))
                .add(&g, calib.batch as usize);
        }
    }
    out.into_iter()
        .map(|o| o.context("no calibration batch"))
        .collect()
}
