//! `sharedmoe experiment exp2 --scale tiny|full`: the thesis's Experiment 2
//! (section 3.3) end to end, as the separate commands of the README's
//! "Experiment 2" section run it:
//! 0. the source per-layer MoE: trained from the scale's config (tiny),
//!    `--from CKPT`, or `--from-hf DIR` (imported first);
//! 1. `checkpoint convert-pool`: one pool, a random sigmoid router G;
//! 2. stage 1, `train.objective = "router_distill"`: G imitates the
//!    original routers on their own slices;
//! 3. stage 2: G alone trained on next-token loss;
//! 4. `reap` over the pool, and per layer over the original model, on
//!    calibration rows from the start of the training order (never the
//!    validation rows that score the variants);
//! 5. `checkpoint prune` at each fraction, by REAP and by frequency, of the
//!    pool and (the REAP paper's baseline) of every original layer;
//! 6. stage 3: G fine-tuned on each REAP-pruned pool;
//! 7. `eval` of every variant on the same validation rows, `experts` on the
//!    distilled and router-trained pools; `exp2_report` writes
//!    `summary.md`, `results.json` and the plots.
//!
//! Every step's output stays in the output directory: a rerun skips what
//! is complete and resumes an interrupted training stage from its newest
//! checkpoint. Full scale first compiles the router-training step for a
//! TPU v4-32 with `sharedmoe compile` (offline) and reports the memory per
//! chip; the stages themselves need the TPU VM.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::ckpt;
use crate::model::{param_specs, FfnKind, ModelConfig, PoolScope, RouterScore};
use crate::runtime::tpu_present;
use crate::train::config::Objective;
use crate::train::{self, Config, StartFrom};

use super::convert_pool::{ConvertPoolArgs, ScoreArg};
use super::eval::{checkpoint_config, evaluate, CheckpointRows, EvalArgs, Split};
use super::exp2_report::{self, Method, Report, Variant};
use super::experiment::{ExperimentArgs, Scale};
use super::prune::{Criterion, PruneArgs};
use super::reap::ReapArgs;

/// The global router: the only tensor stages 1-3 train.
pub const GLOBAL_ROUTER: &str = "model.pool.router.weight";

/// One training stage's schedule (warmup: [`WARMUP_FRACTION`] of the
/// steps; validation five times a stage).
#[derive(Clone, Copy, Debug)]
struct Stage {
    steps: i64,
    lr: f64,
    min_lr: f64,
    /// 0: only at the end.
    checkpoint_every: i64,
}

const WARMUP_FRACTION: f64 = 0.1;

/// What a scale runs.
struct Recipe {
    /// The per-layer MoE trained when neither --from nor --from-hf is given.
    source: Option<&'static str>,
    /// A config whose batch shape (train.seq_len, global_batch,
    /// micro_batch) and mesh the stages use; None: the source run's.
    batch_from: Option<&'static str>,
    distill: Stage,
    router: Stage,
    finetune: Stage,
    /// Fractions of the experts removed (of the pool, or of every layer).
    fractions: [f64; 4],
    /// Calibration micro-batches for REAP.
    calibration_batches: usize,
}

impl Recipe {
    fn of(scale: Scale) -> Result<Recipe> {
        match scale {
            // Stage learning rates well above the thesis's 1e-4: G has
            // hundreds of steps here, not thousands.
            Scale::Tiny => Ok(Recipe {
                source: Some("configs/exp2-tiny-moe.toml"),
                batch_from: None,
                distill: Stage {
                    steps: 150,
                    lr: 1e-2,
                    min_lr: 1e-3,
                    checkpoint_every: 0,
                },
                router: Stage {
                    steps: 300,
                    lr: 1e-3,
                    min_lr: 1e-4,
                    checkpoint_every: 0,
                },
                finetune: Stage {
                    steps: 200,
                    lr: 1e-3,
                    min_lr: 1e-4,
                    checkpoint_every: 0,
                },
                fractions: FRACTIONS,
                calibration_batches: 32,
            }),
            Scale::Small => bail!("exp2 comes in --scale tiny and --scale full"),
            // The thesis's router recipe (configs/qwen3-30b-a3b.toml):
            // batch 64 x 2048, lr 1e-4 with warmup.
            Scale::Full => Ok(Recipe {
                source: None,
                batch_from: Some(FULL_RECIPE),
                distill: Stage {
                    steps: 500,
                    lr: 1e-3,
                    min_lr: 1e-4,
                    checkpoint_every: 100,
                },
                router: Stage {
                    steps: 2000,
                    lr: 1e-4,
                    min_lr: 1e-5,
                    checkpoint_every: 200,
                },
                finetune: Stage {
                    steps: 500,
                    lr: 1e-4,
                    min_lr: 1e-5,
                    checkpoint_every: 100,
                },
                fractions: FRACTIONS,
                calibration_batches: 128,
            }),
        }
    }
}

/// The pruning ratios the thesis asks for.
const FRACTIONS: [f64; 4] = [0.25, 0.5, 0.8, 0.9];

/// A fraction as the percent in directory names and labels.
pub fn percent(f: f64) -> u32 {
    (f * 100.0).round() as u32
}

/// The experiment in progress: its arguments, directory and the time
/// each step took.
struct Exp2<'a> {
    a: &'a ExperimentArgs,
    out: PathBuf,
    recipe: Recipe,
    timings: Vec<(String, f64)>,
}

pub fn run(a: &ExperimentArgs) -> Result<()> {
    let recipe = Recipe::of(a.scale())?;
    if a.seeds.is_some_and(|s| s != 1) || a.workers > 1 {
        bail!("exp2 runs one seed in one process (--seeds and --workers are exp1's)");
    }
    if a.ckpt.is_some() {
        bail!("--ckpt is compress's: exp2 starts from --from CKPT or --from-hf DIR");
    }
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("runs/exp2-{}", a.scale().name())));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut exp = Exp2 {
        a,
        out,
        recipe,
        timings: vec![],
    };
    let started = Instant::now();
    let plan = match a.scale() {
        Scale::Full => match exp.plan_or_stop()? {
            Some(plan) => Some(plan),
            None => return Ok(()),
        },
        _ => None,
    };
    let original = exp.timed("source model", |e| e.source())?;
    let pooled = exp.timed("convert-pool", |e| e.convert(&original))?;
    let distilled = exp.timed("stage 1: distillation", |e| {
        e.train_stage(
            &pooled,
            "distill",
            e.recipe.distill,
            Objective::RouterDistill,
        )
    })?;
    let own_layers = exp.timed("the distilled pool, each layer on its own experts", |e| {
        e.own_layers_view(&distilled)
    })?;
    let router = exp.timed("stage 2: router LM training", |e| {
        e.train_stage(&distilled, "router", e.recipe.router, Objective::Lm)
    })?;
    let [pool_reap, layer_reap] = exp.timed("REAP statistics", |e| {
        let pool = e.reap(&router, "reap-pool.json")?;
        let layers = e.reap(&original, "reap-per-layer.json")?;
        Ok([pool, layers])
    })?;
    let mut to_score = vec![
        (Method::Original, 0.0, original.clone()),
        (Method::Pooled, 0.0, pooled.clone()),
        (Method::DistilledOwnLayers, 0.0, own_layers),
        (Method::Distilled, 0.0, distilled.clone()),
        (Method::RouterTrained, 0.0, router.clone()),
    ];
    exp.timed("pruning", |e| {
        for f in e.recipe.fractions {
            for (method, src, stats, by) in [
                (Method::PoolReap, &router, &pool_reap, Criterion::Reap),
                (
                    Method::PoolFrequency,
                    &router,
                    &pool_reap,
                    Criterion::Frequency,
                ),
                (Method::LayerReap, &original, &layer_reap, Criterion::Reap),
                (
                    Method::LayerFrequency,
                    &original,
                    &layer_reap,
                    Criterion::Frequency,
                ),
            ] {
                let dir = e.prune(src, stats, f, by, method)?;
                to_score.push((method, f, dir));
            }
        }
        Ok(())
    })?;
    exp.timed("stage 3: fine-tuning the pruned pools", |e| {
        for f in e.recipe.fractions {
            let pruned = e.pruned_dir(Method::PoolReap, f);
            let name = format!("finetune/pool-reap-{}", percent(f));
            let tuned = e.train_stage(&pruned, &name, e.recipe.finetune, Objective::Lm)?;
            to_score.push((Method::PoolReapTuned, f, tuned));
        }
        Ok(())
    })?;
    let variants = exp.timed("evaluation", |e| {
        to_score
            .iter()
            .map(|(method, f, dir)| e.evaluate(*method, *f, dir))
            .collect::<Result<Vec<_>>>()
    })?;
    let (distilled_routing, router_routing) = exp.timed("routing statistics", |e| {
        Ok((
            e.routing(&distilled, "distill")?,
            e.routing(&router, "router")?,
        ))
    })?;
    let pooled_cfg = checkpoint_config(&router)?;
    exp.timings
        .push(("total".into(), started.elapsed().as_secs_f64()));
    let original_model = checkpoint_config(&original)?.model;
    let report = Report {
        scale: a.scale().name(),
        source: describe_source(a, &original, &original_model),
        original: original_model,
        pooled: pooled_cfg.model,
        variants,
        distilled: distilled_routing,
        router: router_routing,
        distill_run: exp.out.join("distill"),
        calibration_batches: exp.recipe.calibration_batches,
        timings: exp.timings.clone(),
        plan,
    };
    let files = exp2_report::write(&report, &exp.out)?;
    print!("{}", std::fs::read_to_string(&files[0])?);
    for f in files {
        println!("wrote {}", f.display());
    }
    Ok(())
}

/// One line on where the original model came from.
fn describe_source(a: &ExperimentArgs, original: &Path, m: &ModelConfig) -> String {
    let what = format!(
        "{} layers, {} MoE layers x {} experts, top-{}",
        m.num_layers,
        m.expert_layers().len(),
        m.num_experts,
        m.experts_per_token
    );
    match (&a.from, &a.from_hf) {
        (Some(c), _) => format!("`{}` ({what})", c.display()),
        (_, Some(h)) => format!("`{}`, imported ({what})", h.display()),
        _ => format!("trained here, `{}` ({what})", original.display()),
    }
}

impl Exp2<'_> {
    /// Runs one step of the experiment, logging and recording its time.
    fn timed<T>(&mut self, what: &str, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        tracing::info!("exp2: {what}");
        let started = Instant::now();
        let r = f(self).with_context(|| format!("exp2 {what}"))?;
        let s = started.elapsed().as_secs_f64();
        tracing::info!("exp2: {what} done in {s:.1}s");
        self.timings.push((what.to_string(), s));
        Ok(r)
    }

    /// `--set` overrides and `--backend`: all of them for the source
    /// model; without `model.*` for the stages, whose model is the
    /// checkpoint's.
    fn overrides(&self, with_model: bool) -> Vec<String> {
        let mut sets: Vec<String> = self
            .a
            .overrides
            .iter()
            .filter(|s| with_model || !s.trim_start().starts_with("model."))
            .cloned()
            .collect();
        if let Some(b) = &self.a.backend {
            sets.push(format!("run.backend={b}"));
        }
        sets
    }

    fn user_set(&self, key: &str) -> bool {
        self.a
            .overrides
            .iter()
            .any(|s| s.split('=').next().is_some_and(|k| k.trim() == key))
    }

    /// The per-layer MoE checkpoint the experiment starts from.
    fn source(&mut self) -> Result<PathBuf> {
        let checked = |dir: PathBuf| -> Result<PathBuf> {
            let m = checkpoint_config(&dir)?.model;
            if m.ffn != FfnKind::Moe {
                bail!(
                    "{}: model.ffn = {:?}; Experiment 2 starts from a per-layer MoE (ffn = \"moe\")",
                    dir.display(),
                    m.ffn
                );
            }
            Ok(dir)
        };
        if let Some(c) = &self.a.from {
            return checked(c.clone());
        }
        if let Some(hf) = &self.a.from_hf {
            let dir = self.out.join("original-import");
            if !dir.join("state.json").is_file() {
                super::import_hf::run(&super::import_hf::ImportHfArgs {
                    hf_dir: hf.clone(),
                    out: dir.clone(),
                    seq_len: None,
                })?;
            }
            return checked(dir);
        }
        let Some(config) = self.recipe.source else {
            bail!(
                "exp2 --scale {} needs --from-hf DIR (Qwen3-30B-A3B) or --from CKPT",
                self.a.scale().name()
            );
        };
        let mut cfg = Config::load(Path::new(config), &self.overrides(true))?;
        cfg.run.dir = self.out.join("original");
        checked(train::train(
            &cfg,
            &StartFrom::default(),
            self.a.plugin.as_deref(),
        )?)
    }

    /// The pooled checkpoint (step 0, random G) of `original`.
    fn convert(&mut self, original: &Path) -> Result<PathBuf> {
        let dir = self.out.join("pooled");
        if !dir.join("state.json").is_file() {
            super::convert_pool::run(&ConvertPoolArgs {
                src: original.to_path_buf(),
                out: dir.clone(),
                seed: 0,
                score: ScoreArg::Sigmoid,
            })?;
        }
        Ok(dir)
    }

    /// Trains G alone from checkpoint `from` into run `out/name` (resuming
    /// the run if it has checkpoints); returns its final checkpoint.
    fn train_stage(
        &mut self,
        from: &Path,
        name: &str,
        stage: Stage,
        objective: Objective,
    ) -> Result<PathBuf> {
        let mut base = checkpoint_config(from)?;
        if let Some(recipe) = self.recipe.batch_from {
            let r = Config::load(Path::new(recipe), &[])?;
            base.train.seq_len = r.train.seq_len;
            base.train.global_batch = r.train.global_batch;
            base.train.micro_batch = r.train.micro_batch;
            base.mesh = r.mesh;
        }
        let t = &mut base.train;
        t.steps = stage.steps;
        t.lr = stage.lr;
        t.min_lr = stage.min_lr;
        t.warmup_steps = 0; // (set below, once the steps are final)
        t.checkpoint_every = stage.checkpoint_every;
        t.objective = objective;
        t.trainable = vec![GLOBAL_ROUTER.into()];
        base.run.dir = self.out.join(name);
        let mut cfg = Config::parse(&base.to_toml(), &self.overrides(false))
            .with_context(|| format!("the {name} stage's config"))?;
        let steps = cfg.train.steps;
        if !self.user_set("train.warmup_steps") {
            cfg.train.warmup_steps = (steps as f64 * WARMUP_FRACTION) as i64;
        }
        if !self.user_set("train.eval_every") {
            cfg.train.eval_every = (steps / 5).max(1);
        }
        let start = StartFrom {
            // A run with checkpoints continues; a new one starts from `from`.
            init: ckpt::rundir::latest(&cfg.run.dir)
                .is_none()
                .then(|| from.to_path_buf()),
            ..StartFrom::default()
        };
        train::train(&cfg, &start, self.a.plugin.as_deref())
    }

    /// The distilled pool with every layer restricted to the experts that
    /// came from it (`pool_scope = "layer"`, same tensors): what stage 1
    /// achieved on the slices it trains, before G routes over the whole
    /// pool.
    fn own_layers_view(&mut self, distilled: &Path) -> Result<PathBuf> {
        let dir = self.out.join("distilled-own-layers");
        if !dir.join("state.json").is_file() {
            let mut cfg = checkpoint_config(distilled)?;
            let mut c = ckpt::load(distilled, &param_specs(&cfg.model), ckpt::Purpose::Weights)?;
            cfg.model.pool_scope = PoolScope::Layer;
            c.state.record_config(cfg.to_toml());
            ckpt::save(&dir, &cfg.model, cfg.train.seq_len, &c)?;
        }
        Ok(dir)
    }

    /// `sharedmoe reap` on `ckpt`'s calibration rows into `out/file`.
    fn reap(&mut self, ckpt: &Path, file: &str) -> Result<PathBuf> {
        let path = self.out.join(file);
        if !path.is_file() {
            super::reap::run(&ReapArgs {
                rows: CheckpointRows {
                    split: Split::Train,
                    batches: Some(self.recipe.calibration_batches),
                    ..CheckpointRows::validation(ckpt.to_path_buf(), self.a.plugin.clone())
                },
                out: Some(path.clone()),
            })?;
        }
        Ok(path)
    }

    fn pruned_dir(&self, method: Method, fraction: f64) -> PathBuf {
        self.out
            .join("pruned")
            .join(format!("{}-{}", method.slug(), percent(fraction)))
    }

    /// `checkpoint prune` of `src` by `by` with `fraction` removed.
    fn prune(
        &mut self,
        src: &Path,
        stats: &Path,
        fraction: f64,
        by: Criterion,
        method: Method,
    ) -> Result<PathBuf> {
        let dir = self.pruned_dir(method, fraction);
        if !dir.join("state.json").is_file() {
            super::prune::run(&PruneArgs {
                ckpt: src.to_path_buf(),
                stats: stats.to_path_buf(),
                keep_fraction: None,
                remove_fraction: Some(fraction),
                by,
                out: dir.clone(),
            })?;
        }
        Ok(dir)
    }

    /// Validation cross-entropy of one variant.
    fn evaluate(&self, method: Method, removed: f64, ckpt: &Path) -> Result<Variant> {
        let m = checkpoint_config(ckpt)?.model;
        let r = evaluate(&EvalArgs {
            rows: CheckpointRows::validation(ckpt.to_path_buf(), self.a.plugin.clone()),
        })?;
        tracing::info!(
            "exp2 eval: {} {}%: CE {:.4}",
            method.label(),
            percent(removed),
            r.ce
        );
        Ok(Variant {
            method,
            removed,
            experts: total_experts(&m),
            ce: r.ce,
            tokens: r.tokens,
            ckpt: ckpt.to_path_buf(),
        })
    }

    /// `experts` on a pooled checkpoint, into `out/experts/<name>`.
    fn routing(&self, ckpt: &Path, name: &str) -> Result<crate::model::routing::RoutingStats> {
        let rows = CheckpointRows::validation(ckpt.to_path_buf(), self.a.plugin.clone());
        Ok(super::experts::analyse(&rows, &self.out.join("experts").join(name))?.stats)
    }

    /// Full scale: the plan, when the stages can run here; else it goes
    /// into summary.md alone, and the experiment ends (Ok(None): no TPU
    /// chips here) or fails (the step does not fit).
    fn plan_or_stop(&mut self) -> Result<Option<String>> {
        let (plan, fits) = self.full_scale_plan()?;
        let why = if !fits {
            format!(
                "the pooled model's router-training step does not fit a {PLAN_TOPOLOGY} chip (the \
                 plan above); the stages need expert parallelism, which this framework does not \
                 have yet"
            )
        } else if !tpu_present() {
            format!(
                "this machine has no TPU chips: run the same command on a TPU {PLAN_TOPOLOGY} VM \
                 for the stages"
            )
        } else {
            return Ok(Some(plan));
        };
        let path = self.out.join("summary.md");
        let text = format!("# Experiment 2 (full)\n\n{plan}\nStages not run: {why}.\n");
        std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
        println!("{text}\nwrote {}", path.display());
        if fits {
            return Ok(None);
        }
        bail!("exp2 full: {why}");
    }

    /// Full scale: the pooled Qwen3-30B-A3B's router step compiled for a
    /// v4-32 by `sharedmoe compile` (a child process: libtpu is initialised
    /// offline, before any thread exists), as the plan section of
    /// summary.md, and whether it fits.
    fn full_scale_plan(&mut self) -> Result<(String, bool)> {
        let source = match (&self.a.from_hf, &self.a.from) {
            (Some(hf), _) => {
                let hf = crate::ckpt::hf::HfCheckpoint::open(hf)?;
                crate::ckpt::hf::model_config(&hf.config, &hf.dir.join("config.json"))?
            }
            (None, Some(c)) => checkpoint_config(c)?.model,
            (None, None) => ModelConfig::qwen3_30b_a3b(),
        };
        let pooled = ckpt::pool::pooled_model(&source, RouterScore::Sigmoid)?;
        let mut cfg = Config::load(Path::new(FULL_RECIPE), &[])?;
        cfg.model = pooled;
        cfg.train.trainable = vec![GLOBAL_ROUTER.into()];
        cfg.run.dir = self.out.join("router");
        if cfg.mesh.fsdp == 1 {
            // 122 GB of f32 weights: sharded over every chip of the slice.
            cfg.mesh.fsdp = PLAN_CHIPS;
        }
        let toml = self.out.join("plan-router.toml");
        std::fs::write(&toml, cfg.to_toml())
            .with_context(|| format!("writing {}", toml.display()))?;
        let json = self.out.join("plan-v4-32.json");
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(["compile", "--topology", PLAN_TOPOLOGY, "--config"])
            .arg(&toml)
            .arg("--json")
            .arg(&json);
        for s in &self.a.overrides {
            cmd.args(["--set", s]);
        }
        if let Some(p) = &self.a.plugin {
            cmd.arg("--plugin").arg(p);
        }
        tracing::info!("exp2 full: {cmd:?}");
        let started = Instant::now();
        let status = cmd.status().context("running sharedmoe compile")?;
        self.timings
            .push(("compile for v4-32".into(), started.elapsed().as_secs_f64()));
        let figures = std::fs::read_to_string(&json).ok();
        let text = exp2_report::plan(&cfg, PLAN_TOPOLOGY, status.success(), figures.as_deref())?;
        Ok((text, status.success()))
    }
}

/// The thesis's router recipe at full scale.
const FULL_RECIPE: &str = "configs/qwen3-30b-a3b.toml";
/// The slice the full-scale plan is compiled for.
pub const PLAN_TOPOLOGY: &str = "v4-32";
const PLAN_CHIPS: i64 = 16;

/// Experts in the model: the pool, or every MoE layer's together.
pub fn total_experts(m: &ModelConfig) -> usize {
    match m.ffn {
        FfnKind::Moe => (m.num_experts as usize) * m.expert_layers().len(),
        _ => m.num_experts as usize,
    }
}
