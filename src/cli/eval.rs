//! `sharedmoe eval --ckpt D [--data P... --tokenizer T]`: cross-entropy and
//! perplexity of a checkpoint. Without `--data`, on the run's own fixed
//! validation batches (the numbers `val_loss` logged during training);
//! with it, on every document of those parquet files once, in file order.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};

use crate::ckpt;
use crate::data::parquet::{all_row_groups, expand_inputs};
use crate::data::stream::{StreamOptions, TokenStream};
use crate::data::tokenizer;
use crate::graph::{Function, HostTensor};
use crate::model::param_specs;
use crate::runtime::Arg;
use crate::train::batches::{Batches, DataPosition};
use crate::train::client::{open_client, open_client_with};
use crate::train::{Config, Trainer};

/// A checkpoint and the rows to run it on (shared by `eval` and `experts`).
#[derive(clap::Args, Debug)]
pub struct CheckpointRows {
    /// Checkpoint directory.
    #[arg(long)]
    pub ckpt: PathBuf,
    /// Parquet files, directories or globs (default: the run's validation
    /// batches).
    #[arg(long)]
    pub data: Vec<PathBuf>,
    /// tokenizer.json for --data (default: the run's).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// At most this many batches of train.replicas x micro_batch rows.
    #[arg(long)]
    pub batches: Option<usize>,
    /// Without --data: the run's held-out validation rows (val), or the
    /// first rows of its training order (train: calibration data for
    /// `reap` that the validation score never sees; `--batches`, default
    /// 16).
    #[arg(long, value_enum, default_value = "val")]
    pub split: Split,
    /// PJRT plugin path (overrides discovery).
    #[arg(long)]
    pub plugin: Option<PathBuf>,
}

/// Which of the run's own rows [`CheckpointRows`] reads.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Split {
    #[default]
    Val,
    Train,
}

/// Training-order batches read by `--split train` without `--batches`.
pub const DEFAULT_TRAIN_BATCHES: usize = 16;

impl CheckpointRows {
    /// The run's validation rows for checkpoint `ckpt`, all of them.
    pub fn validation(ckpt: PathBuf, plugin: Option<PathBuf>) -> CheckpointRows {
        CheckpointRows {
            ckpt,
            data: vec![],
            tokenizer: None,
            batches: None,
            split: Split::Val,
            plugin,
        }
    }

    /// The checkpoint's run config, scoring next-token loss whatever the
    /// run optimised (a router-distillation run's checkpoint is evaluated
    /// as the model it is).
    pub fn config(&self) -> Result<Config> {
        let mut cfg = checkpoint_config(&self.ckpt)?;
        cfg.train.objective = crate::train::config::Objective::Lm;
        Ok(cfg)
    }

    /// The checkpoint (checked against `cfg`) and the batches to run it on;
    /// `cfg`'s data section is pointed at them.
    pub fn load(&self, cfg: &mut Config) -> Result<(ckpt::Checkpoint, Vec<Vec<Vec<i32>>>)> {
        let checkpoint = ckpt::load(&self.ckpt, &param_specs(&cfg.model), ckpt::Purpose::Weights)?;
        Ok((checkpoint, self.batches(cfg)?))
    }

    /// The batches to run the checkpoint on, grouped [batch][replica] ->
    /// rows; `cfg`'s data section is pointed at them.
    pub fn batches(&self, cfg: &mut Config) -> Result<Vec<Vec<Vec<i32>>>> {
        let max = self.batches.unwrap_or(match self.split {
            Split::Val => usize::MAX,
            Split::Train => DEFAULT_TRAIN_BATCHES,
        });
        if self.split == Split::Train && self.data.is_empty() {
            training_batches(cfg, max)
        } else {
            eval_batches(cfg, &self.data, self.tokenizer.as_deref(), max)
        }
    }
}

/// Compiles `program` (the checkpoint's parameters in `param_specs`
/// order, then windows [M, S+1]; `model::routing::trace_program`) for one
/// device and runs it on every row group of `batches`, handing each
/// call's results to `each`. For the analyses `experts` and `reap`.
pub fn run_over_rows(
    cfg: &Config,
    checkpoint: &ckpt::Checkpoint,
    batches: &[Vec<Vec<i32>>],
    plugin: Option<&Path>,
    program: Function,
    mut each: impl FnMut(Vec<HostTensor>) -> Result<()>,
) -> Result<()> {
    let t = &cfg.train;
    let client = open_client_with(cfg, plugin, 1)?;
    let program = program.compile(&client)?;
    let dev = &client.devices()[0];
    let params = param_specs(&cfg.model)
        .iter()
        .zip(&checkpoint.params)
        .map(|(s, (name, dims, v))| {
            if *name != s.name {
                bail!("checkpoint tensor `{name}` where `{}` was expected", s.name);
            }
            Ok(client.buffer_from_host(v, dims, dev)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let bar = indicatif::ProgressBar::new(batches.iter().flatten().count() as u64);
    for rows in batches.iter().flatten() {
        let windows = client.buffer_from_host(rows, &[t.micro_batch, t.seq_len + 1], dev)?;
        let args = params
            .iter()
            .chain(std::iter::once(&windows))
            .map(Arg::Borrowed)
            .collect();
        let outs = program.execute(vec![args])?;
        let host = outs[0]
            .iter()
            .map(HostTensor::from_buffer)
            .collect::<std::result::Result<Vec<_>, _>>()?;
        each(host)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub rows: CheckpointRows,
}

/// Mean CE over the batches, and how many rows of S+1 tokens were scored.
pub struct EvalResult {
    pub ce: f64,
    pub rows: usize,
    pub tokens: usize,
}

pub fn run(a: &EvalArgs) -> Result<()> {
    let r = evaluate(a)?;
    println!(
        "{}: cross-entropy {:.4} nats/token, perplexity {:.2} ({} rows, {} predicted tokens)",
        a.rows.ckpt.display(),
        r.ce,
        r.ce.exp(),
        r.rows,
        r.tokens
    );
    Ok(())
}

/// The rows of every document of `cfg.data.parquet`, once, in file order,
/// cut as in training, grouped [batch][replica] -> rows.
fn all_documents(cfg: &Config, max_batches: usize) -> Result<Vec<Vec<Vec<i32>>>> {
    let (t, d) = (&cfg.train, &cfg.data);
    let tk = Arc::new(tokenizer::load(&d.tokenizer)?);
    let (groups, _) = all_row_groups(&expand_inputs(&d.parquet)?, d.on_bad_file)?;
    let mut stream = TokenStream::open(
        groups,
        tk,
        StreamOptions::single_pass((t.seq_len + 1) as usize, t.seed),
        None,
    )?;
    let per_replica = t.micro_batch as usize;
    let mut batches = vec![];
    'fill: while batches.len() < max_batches {
        let mut batch = vec![];
        for _ in 0..t.replicas {
            let mut rows = Vec::with_capacity(per_replica * (t.seq_len + 1) as usize);
            for _ in 0..per_replica {
                match stream.next_row()? {
                    Some(r) => rows.extend(r.into_iter().map(|x| x as i32)),
                    None => break 'fill, // a partial batch is not scored
                }
            }
            batch.push(rows);
        }
        batches.push(batch);
    }
    Ok(batches)
}

/// The first `max` micro-batch groups of the run's training order (from
/// step 0, as a fresh run reads them), [batch][replica] -> rows: each
/// global batch cut into its accumulation steps.
pub fn training_batches(cfg: &Config, max: usize) -> Result<Vec<Vec<Vec<i32>>>> {
    let t = &cfg.train;
    let mut train = Batches::open(cfg, &DataPosition::default(), 0..t.replicas)?;
    let width = (t.micro_batch * (t.seq_len + 1)) as usize;
    let mut batches = vec![];
    while batches.len() < max {
        let global = train.next(cfg)?;
        for a in 0..cfg.accumulation_steps() as usize {
            if batches.len() == max {
                break;
            }
            let part = |rows: &Vec<i32>| rows[a * width..(a + 1) * width].to_vec();
            batches.push(global.iter().map(part).collect());
        }
    }
    Ok(batches)
}

/// The training config stored in checkpoint `dir`'s state.json.
pub fn checkpoint_config(dir: &Path) -> Result<Config> {
    let state_path = dir.join("state.json");
    let state: ckpt::TrainingState = serde_json::from_slice(
        &std::fs::read(&state_path).with_context(|| format!("reading {}", state_path.display()))?,
    )
    .with_context(|| format!("{}: not a valid state.json", state_path.display()))?;
    Config::parse(&state.config_toml, &[])
        .map_err(|e| anyhow!("{}: the checkpoint's config: {e}", state_path.display()))
}

/// What `eval` scores, grouped [batch][replica] -> rows of S+1 tokens, at
/// most `max` batches: the run's validation batches when `data` is empty,
/// else every document of those parquet files (tokenised with `tokenizer`,
/// default the run's); `cfg`'s data section is pointed at them.
pub fn eval_batches(
    cfg: &mut Config,
    data: &[PathBuf],
    tokenizer: Option<&Path>,
    max: usize,
) -> Result<Vec<Vec<Vec<i32>>>> {
    let batches = if data.is_empty() {
        if cfg.train.eval_every == 0 {
            cfg.train.eval_every = 1; // (only to build the validation batches)
        }
        let val = Batches::open(cfg, &DataPosition::default(), 0..cfg.train.replicas)?;
        if val.validation().is_empty() {
            bail!("the run has no validation data (data.val_fraction = 0 or data.val_bin unset): pass --data");
        }
        val.validation()
            .iter()
            .take(max)
            .cloned()
            .collect::<Vec<_>>()
    } else {
        cfg.data.parquet = data.to_vec();
        cfg.data.train_bin = PathBuf::new();
        if let Some(t) = tokenizer {
            cfg.data.tokenizer = t.to_path_buf();
        }
        all_documents(cfg, max)?
    };
    if batches.is_empty() {
        bail!(
            "not one batch of {} x {} rows of {} tokens in the data",
            cfg.train.replicas,
            cfg.train.micro_batch,
            cfg.train.seq_len + 1
        );
    }
    Ok(batches)
}

pub fn evaluate(a: &EvalArgs) -> Result<EvalResult> {
    let mut cfg = a.rows.config()?;
    let specs = param_specs(&cfg.model);
    let batches = a.rows.batches(&mut cfg)?;
    let plugin = a.rows.plugin.as_deref();
    let ce = if ckpt::compressed::is_compressed(&a.rows.ckpt)? {
        let weights = ckpt::compressed::load(&a.rows.ckpt, &specs)?;
        mean_ce_stored(&cfg, &weights.params, &batches, plugin)?
    } else {
        let checkpoint = ckpt::load(&a.rows.ckpt, &specs, ckpt::Purpose::Weights)?;
        let client = open_client(&cfg, plugin)?;
        let mut trainer = Trainer::new(cfg.clone(), client, &checkpoint)?;
        let mut total = 0.0;
        for b in &batches {
            total += trainer.eval(b)?.0;
        }
        total / batches.len() as f64
    };
    if !ce.is_finite() {
        // Finite weights can still overflow (a run on the edge of
        // divergence): a NaN perplexity is a failure, not a result.
        bail!(
            "{}: the cross-entropy is {ce}: the model's outputs overflow on this data",
            a.rows.ckpt.display()
        );
    }
    let rows = batches.len() * (cfg.train.replicas * cfg.train.micro_batch) as usize;
    Ok(EvalResult {
        ce,
        rows,
        tokens: rows * cfg.train.seq_len as usize,
    })
}

/// The mean next-token cross-entropy of stored (compressed) weights over
/// `batches` ([batch][replica] -> rows of S+1 tokens; a batch's replicas
/// are one program call), dequantised inside the program: what `eval`
/// reports for a compressed checkpoint, averaged per batch as `Trainer::eval`.
pub fn mean_ce_stored(
    cfg: &Config,
    params: &[(crate::model::ParamSpec, crate::model::stored::StoredTensor)],
    batches: &[Vec<Vec<i32>>],
    plugin: Option<&Path>,
) -> Result<f64> {
    let t = &cfg.train;
    let rows = t.replicas * t.micro_batch;
    let layout: Vec<_> = params.iter().map(|(_, p)| p.storage()).collect();
    let client = open_client_with(cfg, plugin, 1)?;
    let program = crate::model::stored::loss_program(&cfg.model, &layout, rows, t.seq_len)?
        .compile(&client)
        .context("compiling the loss over stored weights")?;
    let dev = &client.devices()[0];
    let weights = crate::generate::upload_stored(&client, dev, params)?;
    let mut total = 0.0;
    for batch in batches {
        let flat: Vec<i32> = batch.concat();
        let windows = client.buffer_from_host(&flat, &[rows, t.seq_len + 1], dev)?;
        let args = weights
            .iter()
            .chain(std::iter::once(&windows))
            .map(Arg::Borrowed)
            .collect();
        let out = program.execute(vec![args])?;
        total += out[0][0].to_host::<f32>()?[0] as f64;
    }
    Ok(total / batches.len() as f64)
}
