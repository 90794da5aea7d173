//! `sharedmoe experiment exp1|exp2`: the thesis's experiments as a
//! researcher runs them; exp2 lives in `exp2`. Experiment 1: Both models (the dense baseline and the shared MoE) on the same
//! data order with the same recipe, for one or more seeds, validation every
//! `train.eval_every` steps on the held-out split; then the routing of
//! every shared-MoE run's final checkpoint (`experts`). One output
//! directory holds the runs, the loss plots and `summary.md`
//! (`exp1_report`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::dist::launch::{launch_local, LaunchOptions};
use crate::model::{active_params_per_token, count_params, FfnKind};
use crate::train::{self, Config, StartFrom};

use super::eval::CheckpointRows;
use super::exp1_report::{run_stats, summary, Run};
use super::plot::{plot_runs, Curve};

#[derive(clap::Args, Debug)]
pub struct ExperimentArgs {
    /// exp1: dense baseline vs shared MoE; exp2: a per-layer MoE's experts
    /// merged into one pool with a global router, then pruned.
    #[arg(value_enum)]
    pub name: Experiment,
    /// exp1 -- tiny: toy models on the shipped sample (CPU, minutes; the CI
    /// check); small: both models with the full architecture (12 layers,
    /// 16 experts top-2, GQA, factorised embeddings) at d = 192 on the
    /// shipped text (CPU, about an hour and a half for 2 seeds); full: the
    /// SPEC recipe (configs/dense125m.toml, configs/sharedmoe50m.toml).
    /// exp2 -- tiny: an 8 x 16-expert MoE on the shipped sample (CPU,
    /// 20-25 minutes); full: Qwen3-30B-A3B (--from-hf) on a TPU v4-32.
    /// compress -- the dense model of exp1 at this scale (default small).
    /// Default: tiny for exp1 and exp2.
    #[arg(long, value_enum)]
    pub scale: Option<Scale>,
    /// compress: the dense checkpoint to compress (default: exp1's dense
    /// model at --scale, trained first if its run is not complete).
    #[arg(long)]
    pub ckpt: Option<PathBuf>,
    /// exp2: start from this per-layer MoE checkpoint instead of training
    /// the scale's source model.
    #[arg(long, conflicts_with = "from_hf")]
    pub from: Option<PathBuf>,
    /// exp2: start from this Hugging Face Qwen3-MoE directory (imported
    /// into the output directory first).
    #[arg(long)]
    pub from_hf: Option<PathBuf>,
    /// Seeds per model (seed i: train.seed + i, which draws the initial
    /// weights and the data order). Default: 2 at small scale, else 1.
    #[arg(long)]
    pub seeds: Option<u32>,
    /// cpu, cuda or tpu (default: the configs').
    #[arg(long)]
    pub backend: Option<String>,
    /// Worker processes per model (a coordinator and N workers on this
    /// machine); 1 trains in this process.
    #[arg(long, default_value_t = 1)]
    pub workers: u32,
    /// Output directory (default runs/exp1-<scale>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Config overrides applied to both models, e.g. --set train.steps=100.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// PJRT plugin path (overrides discovery).
    #[arg(long)]
    pub plugin: Option<PathBuf>,
}

/// The experiments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Experiment {
    Exp1,
    Exp2,
    /// The second seed: SparseGPT pruning and NF4 quantisation of a dense
    /// model, every variant's perplexity, size and decoding speed.
    Compress,
}

impl ExperimentArgs {
    /// `--scale`, or the experiment's default: small for compress (the
    /// dense model with the full architecture), tiny otherwise.
    pub fn scale(&self) -> Scale {
        self.scale.unwrap_or(match self.name {
            Experiment::Compress => Scale::Small,
            Experiment::Exp1 | Experiment::Exp2 => Scale::Tiny,
        })
    }
}

/// The sizes the experiments come in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scale {
    Tiny,
    Small,
    Full,
}

/// One model of the experiment: its label (run directories, legends) and
/// config file.
pub(super) struct Model {
    pub label: &'static str,
    pub config: &'static str,
}

impl Scale {
    pub fn name(self) -> &'static str {
        match self {
            Scale::Tiny => "tiny",
            Scale::Small => "small",
            Scale::Full => "full",
        }
    }

    /// The dense baseline, then the shared MoE.
    pub(super) fn models(self) -> [Model; 2] {
        let m = |label, config| Model { label, config };
        match self {
            Scale::Tiny => [
                m("dense", "configs/tiny-dense.toml"),
                m("sharedmoe", "configs/tiny-sharedmoe.toml"),
            ],
            Scale::Small => [
                m("dense", "configs/small-dense.toml"),
                m("sharedmoe", "configs/small-sharedmoe.toml"),
            ],
            Scale::Full => [
                m("dense125m", "configs/dense125m.toml"),
                m("sharedmoe50m", "configs/sharedmoe50m.toml"),
            ],
        }
    }

    /// Two seeds where a run is cheap enough to measure the noise of the
    /// difference; one where it is a smoke test (tiny) or costs a pod
    /// (full).
    fn default_seeds(self) -> u32 {
        match self {
            Scale::Small => 2,
            Scale::Tiny | Scale::Full => 1,
        }
    }
}

/// `--workers N` on a one-device config: N replicas, one per worker, each
/// with 1/N of the micro-batch, so the global batch and the recipe stay
/// the same. Any other replica count is left to the config's validation.
fn spread_over_workers(cfg: &mut Config, workers: u32) {
    let n = i64::from(workers);
    let t = &mut cfg.train;
    if n > 1 && t.replicas == 1 && t.micro_batch % n == 0 {
        tracing::info!(
            "--workers {n}: train.replicas = {n}, train.micro_batch = {} per replica (global batch {} as before)",
            t.micro_batch / n,
            t.global_batch
        );
        t.replicas = n;
        t.micro_batch /= n;
    }
}

/// A run's directory under the experiment's: `<label>-seed<i>`.
pub(super) fn run_dir(out: &Path, label: &str, seed: u32) -> PathBuf {
    out.join(format!("{label}-seed{seed}"))
}

pub fn run(a: &ExperimentArgs) -> Result<()> {
    match a.name {
        Experiment::Exp1 => run_exp1(a),
        Experiment::Exp2 => super::exp2::run(a),
        Experiment::Compress => super::exp_compress::run(a),
    }
}

fn run_exp1(a: &ExperimentArgs) -> Result<()> {
    if a.from.is_some() || a.from_hf.is_some() || a.ckpt.is_some() {
        bail!("--from, --from-hf and --ckpt are exp2's and compress's: exp1 trains both of its models from scratch");
    }
    let seeds = a.seeds.unwrap_or(a.scale().default_seeds());
    if seeds == 0 {
        bail!("--seeds 0: expected at least 1");
    }
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("runs/exp1-{}", a.scale().name())));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let models = a.scale().models();
    let mut base = vec![];
    for m in &models {
        let mut sets = a.overrides.clone();
        if let Some(b) = &a.backend {
            sets.push(format!("run.backend={b}"));
        }
        let mut cfg = Config::load(Path::new(m.config), &sets)?;
        spread_over_workers(&mut cfg, a.workers);
        base.push(cfg);
    }
    // Same data order and recipe: everything but the model must agree.
    let recipe = |c: &Config| {
        let mut c = c.clone();
        c.model = base[0].model.clone();
        c.run.dir = PathBuf::new();
        c.to_toml()
    };
    if recipe(&base[0]) != recipe(&base[1]) {
        bail!(
            "the two configs of exp1 differ beyond the model; they must share [train], [data] and [run] \
             so both models see the same batches"
        );
    }
    // Seed by seed, so that an interrupted experiment has whole pairs.
    let mut runs = vec![];
    for seed in 0..seeds {
        for (index, (m, cfg)) in models.iter().zip(&base).enumerate() {
            let mut cfg = cfg.clone();
            cfg.run.dir = run_dir(&out, m.label, seed);
            cfg.train.seed += u64::from(seed);
            tracing::info!(
                "exp1 {} seed {seed}: {} parameters, {} steps of {} tokens",
                m.label,
                count_params(&cfg.model),
                cfg.train.steps,
                cfg.train.global_batch * cfg.train.seq_len
            );
            let started = Instant::now();
            let last = train_run(&cfg, a)?;
            let experts = if cfg.model.ffn == FfnKind::SharedMoe {
                let dir = cfg.run.dir.join("experts");
                let rows = CheckpointRows::validation(last, a.plugin.clone());
                let analysis = super::experts::analyse(&rows, &dir)?;
                Some((analysis.stats, dir))
            } else {
                None
            };
            runs.push(Run {
                label: m.label,
                model: index,
                seed,
                params: count_params(&cfg.model),
                active_params: active_params_per_token(&cfg.model),
                wall_s: add_wall_time(&cfg.run.dir, started.elapsed().as_secs_f64())?,
                stats: run_stats(&cfg.run.dir)?,
                experts,
                cfg,
            });
        }
    }
    let curves: Vec<Curve> = runs
        .iter()
        .map(|r| Curve {
            label: if seeds > 1 {
                format!("{} ({seeds} seeds)", r.label)
            } else {
                r.label.to_string()
            },
            dir: r.cfg.run.dir.clone(),
            colour: r.model,
        })
        .collect();
    let plots = plot_runs(&curves, &out)?;
    let summary = summary(&runs, a.scale().name(), &out)?;
    let path = out.join("summary.md");
    std::fs::write(&path, &summary).with_context(|| format!("writing {}", path.display()))?;
    println!("{summary}");
    for p in plots.iter().chain(std::iter::once(&path)) {
        println!("wrote {}", p.display());
    }
    Ok(())
}

/// Adds `seconds` to the time the experiment has spent on the run in
/// `dir` (its `exp1_wall_time.json`, so that a resumed experiment reports
/// the whole) and returns the total.
fn add_wall_time(dir: &Path, seconds: f64) -> Result<f64> {
    let path = dir.join("exp1_wall_time.json");
    let before = match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["seconds"].as_f64())
            .with_context(|| format!("{}: expected {{\"seconds\": <number>}}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0.0,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let total = before + seconds;
    std::fs::write(&path, serde_json::json!({ "seconds": total }).to_string())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(total)
}

/// Trains one run to its last step (continuing from its newest checkpoint
/// if there is one) and returns that final checkpoint.
fn train_run(cfg: &Config, a: &ExperimentArgs) -> Result<PathBuf> {
    if a.workers <= 1 {
        return train::train(cfg, &StartFrom::default(), a.plugin.as_deref());
    }
    // The job's config as a file the coordinator reads.
    let dir = &cfg.run.dir;
    std::fs::create_dir_all(dir)?;
    let config = dir.join("job.toml");
    std::fs::write(&config, cfg.to_toml())?;
    let mut worker_args = vec![];
    if let Some(p) = &a.plugin {
        worker_args.extend(["--plugin".to_string(), p.display().to_string()]);
    }
    let status = launch_local(&LaunchOptions {
        workers: a.workers,
        config_args: vec!["--config".into(), config.display().to_string()],
        run_dir: dir.clone(),
        coordinator_args: vec![],
        worker_args,
        max_worker_restarts: 3,
    })?;
    if !status.success() {
        bail!("exp1 {}: the job failed ({status})", dir.display());
    }
    match crate::ckpt::rundir::latest(dir) {
        Some(last) if crate::ckpt::rundir::step_of(&last) == Some(cfg.train.steps) => Ok(last),
        other => bail!(
            "exp1 {}: the job finished, but its newest checkpoint is {:?}, not step {}",
            dir.display(),
            other,
            cfg.train.steps
        ),
    }
}
