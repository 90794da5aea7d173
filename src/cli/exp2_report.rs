//! What `experiment exp2` writes: `summary.md` (the validation table of
//! every variant, the verdict on the thesis's 80-90% hypothesis, the pool's
//! universal / dead / long-tail experts, where each depth's routing mass
//! comes from, the steps' times), `results.json` (the same figures for
//! scripts), `pruning_curve.png` and `expert_origin.png`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;

use crate::model::routing::RoutingStats;
use crate::model::{count_params, ModelConfig};
use crate::train::Config;

use super::eval::checkpoint_config;
use super::exp1_report::used_threshold;
use super::experts::{draw_heatmap, Heatmap};
use super::plot::{colour, legend, register_fonts, HEIGHT, WIDTH};

/// What produced a variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// The per-layer MoE the experiment starts from.
    Original,
    /// Converted, with the random global router (before stage 1).
    Pooled,
    /// After stage 1, every layer restricted to its own experts.
    DistilledOwnLayers,
    /// After stage 1 (router distillation).
    Distilled,
    /// After stage 2 (router LM training).
    RouterTrained,
    PoolReap,
    /// PoolReap, then stage 3.
    PoolReapTuned,
    PoolFrequency,
    /// The original model, the same fraction removed in every layer.
    LayerReap,
    LayerFrequency,
}

impl Method {
    pub fn label(self) -> &'static str {
        match self {
            Method::Original => "original per-layer MoE",
            Method::Pooled => "pooled, random G",
            Method::DistilledOwnLayers => "distilled G, each layer on its own experts",
            Method::Distilled => "pooled after distillation",
            Method::RouterTrained => "pooled after router LM training",
            Method::PoolReap => "pool + REAP",
            Method::PoolReapTuned => "pool + REAP + fine-tune",
            Method::PoolFrequency => "pool + frequency",
            Method::LayerReap => "per-layer REAP (original)",
            Method::LayerFrequency => "per-layer frequency (original)",
        }
    }

    /// Directory names of the pruned checkpoints.
    pub fn slug(self) -> &'static str {
        match self {
            Method::Original => "original",
            Method::Pooled => "pooled",
            Method::DistilledOwnLayers => "distilled-own-layers",
            Method::Distilled => "distilled",
            Method::RouterTrained => "router",
            Method::PoolReap => "pool-reap",
            Method::PoolReapTuned => "pool-reap-tuned",
            Method::PoolFrequency => "pool-frequency",
            Method::LayerReap => "layer-reap",
            Method::LayerFrequency => "layer-frequency",
        }
    }

    /// The unpruned model a pruning line starts from (its 0% point).
    fn unpruned(self) -> Option<Method> {
        match self {
            Method::PoolReap | Method::PoolReapTuned | Method::PoolFrequency => {
                Some(Method::RouterTrained)
            }
            Method::LayerReap | Method::LayerFrequency => Some(Method::Original),
            _ => None,
        }
    }
}

/// The pruning lines, in legend order.
const CURVES: [Method; 5] = [
    Method::PoolReap,
    Method::PoolReapTuned,
    Method::PoolFrequency,
    Method::LayerReap,
    Method::LayerFrequency,
];

/// One evaluated model.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Variant {
    pub method: Method,
    /// Fraction of the experts removed (of the pool, or of every layer).
    pub removed: f64,
    /// Experts left in the model (the pool's, or all layers' together).
    pub experts: usize,
    /// Validation cross-entropy, nats per token.
    pub ce: f64,
    /// Predicted tokens scored.
    pub tokens: usize,
    pub ckpt: PathBuf,
}

/// Everything the report is made from.
pub struct Report {
    pub scale: &'static str,
    /// Where the original model came from, in words.
    pub source: String,
    pub original: ModelConfig,
    pub pooled: ModelConfig,
    pub variants: Vec<Variant>,
    /// Routing of the pool after stage 1 and after stage 2.
    pub distilled: RoutingStats,
    pub router: RoutingStats,
    pub distill_run: PathBuf,
    pub calibration_batches: usize,
    /// (step, seconds), the last the total.
    pub timings: Vec<(String, f64)>,
    /// Full scale: the compile plan (markdown).
    pub plan: Option<String>,
}

/// A pruned model "keeps quality" when its perplexity is within this
/// factor of the original's.
pub const KEPT_PERPLEXITY: f64 = 1.05;

impl Report {
    fn find(&self, method: Method, removed: f64) -> Option<&Variant> {
        self.variants
            .iter()
            .find(|v| v.method == method && (v.removed - removed).abs() < 1e-9)
    }

    fn original_ce(&self) -> f64 {
        self.find(Method::Original, 0.0).map_or(f64::NAN, |v| v.ce)
    }

    /// The fractions pruned, increasing.
    fn fractions(&self) -> Vec<f64> {
        let mut f: Vec<f64> = self
            .variants
            .iter()
            .filter(|v| v.method == Method::PoolReap)
            .map(|v| v.removed)
            .collect();
        f.sort_by(f64::total_cmp);
        f
    }

    /// The line of `method`: (fraction removed, CE), from its unpruned 0.
    fn curve(&self, method: Method) -> Vec<(f64, f64)> {
        let mut points: Vec<(f64, f64)> = method
            .unpruned()
            .and_then(|u| self.find(u, 0.0))
            .map(|v| (0.0, v.ce))
            .into_iter()
            .collect();
        for f in self.fractions() {
            if let Some(v) = self.find(method, f) {
                points.push((f, v.ce));
            }
        }
        points
    }

    /// The largest fraction at which any of `methods` keeps quality.
    fn largest_kept(&self, methods: &[Method]) -> Option<f64> {
        let limit = self.original_ce() + KEPT_PERPLEXITY.ln();
        self.fractions()
            .into_iter()
            .filter(|&f| {
                methods
                    .iter()
                    .filter_map(|&m| self.find(m, f))
                    .any(|v| v.ce <= limit)
            })
            .fold(None, |best, f| Some(best.map_or(f, |b: f64| b.max(f))))
    }
}

/// The experiment's answer to the thesis's hypothesis (80-90% of a global
/// pool can go with quality kept, against 20-50% per layer), as one
/// sentence.
pub fn verdict(r: &Report) -> String {
    let pool = r.largest_kept(&[Method::PoolReap, Method::PoolReapTuned]);
    let layer = r.largest_kept(&[Method::LayerReap]);
    // "up to 50% removed" / "at none of the ratios".
    let pct = |f: Option<f64>| match f {
        Some(f) => format!("up to {}% removed", super::exp2::percent(f)),
        None => "at none of the ratios".into(),
    };
    let kept = format!(
        "perplexity within {:.0}% of the original",
        (KEPT_PERPLEXITY - 1.0) * 100.0
    );
    let (p, l) = (pct(pool), pct(layer));
    let unpruned = r
        .find(Method::RouterTrained, 0.0)
        .map_or(String::new(), |v| {
            format!(
                "; the unpruned pool itself is {:+.4} nats from the original",
                v.ce - r.original_ce()
            )
        });
    let tail = format!(
        "(one seed at {} scale; \"quality kept\" = {kept} on the same validation rows{unpruned})",
        r.scale
    );
    if layer.is_some_and(|f| f >= 0.9) {
        format!(
            "Cannot decide: even per-layer REAP keeps {kept} with 90% of every layer's experts \
             removed, so at this scale the experts carry too little of the model to separate \
             global from per-layer pruning {tail}."
        )
    } else if pool.is_some_and(|f| f >= 0.8) && layer.map_or(true, |f| f < 0.8) {
        format!("Supports: the global pool keeps {kept} {p}, per-layer REAP only {l} {tail}.")
    } else if pool.is_some_and(|f| f >= 0.8) {
        format!(
            "Cannot decide: the global pool keeps {kept} {p}, but per-layer REAP also does {l}, \
             so global competition is not what allows it here {tail}."
        )
    } else if pool.unwrap_or(0.0) > layer.unwrap_or(0.0) {
        format!(
            "Contradicts the 80-90% figure: the global pool keeps {kept} only {p} (per-layer \
             REAP: {l}, so the direction holds) {tail}."
        )
    } else {
        format!("Contradicts: the global pool keeps {kept} {p}, per-layer REAP {l} {tail}.")
    }
}

/// How the pool's experts are used across depths.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ExpertClasses {
    /// Used at 25% or more of the layers.
    pub universal: usize,
    /// Never chosen at any layer.
    pub dead: usize,
    /// Chosen somewhere, but used at fewer than 25% of the layers.
    pub long_tail: usize,
    /// Layers an expert must be used at to be universal.
    pub universal_layers: usize,
}

/// An expert is "used" at a layer when it gets at least
/// `used_threshold(P)` of that layer's routing choices (a quarter of the
/// uniform share, as Experiment 1's report).
pub fn expert_classes(s: &RoutingStats) -> ExpertClasses {
    let threshold = used_threshold(s.experts);
    let universal_layers = (s.layers as f64 * 0.25).ceil().max(1.0) as usize;
    let mut c = ExpertClasses {
        universal: 0,
        dead: 0,
        long_tail: 0,
        universal_layers,
    };
    for e in 0..s.experts {
        let used = (0..s.layers)
            .filter(|&l| s.choice_share(l, e) >= threshold)
            .count();
        if (0..s.layers).all(|l| s.counts[l][e] == 0) {
            c.dead += 1;
        } else if used >= universal_layers {
            c.universal += 1;
        } else {
            c.long_tail += 1;
        }
    }
    c
}

/// [i][j]: the share of layer i's routing mass that goes to experts that
/// came from layer j (`pool_origin`), rows and columns in the order of
/// the traced layers. Off the diagonal: reuse across depths.
pub fn origin_shares(s: &RoutingStats, origin: &[[i64; 2]]) -> Result<Vec<Vec<f64>>> {
    if origin.len() != s.experts {
        return Err(anyhow!(
            "pool_origin has {} entries for a pool of {} experts",
            origin.len(),
            s.experts
        ));
    }
    let column = |layer: i64| s.layer_ids.iter().position(|&l| l as i64 == layer);
    let mut shares = vec![vec![0.0; s.layers]; s.layers];
    for (i, row) in shares.iter_mut().enumerate() {
        let total: f64 = (0..s.experts).map(|e| s.mass(i, e)).sum();
        for (e, &[layer, _]) in origin.iter().enumerate() {
            let j = column(layer).with_context(|| {
                format!("pool expert {e} came from layer {layer}, which has no router")
            })?;
            if total > 0.0 {
                row[j] += s.mass(i, e) / total;
            }
        }
    }
    Ok(shares)
}

/// The mean over layers of the mass that goes to other layers' experts.
pub fn cross_depth_share(shares: &[Vec<f64>]) -> f64 {
    let n = shares.len().max(1) as f64;
    shares
        .iter()
        .enumerate()
        .map(|(i, row)| 1.0 - row[i])
        .sum::<f64>()
        / n
}

/// Writes summary.md, results.json, pruning_curve.png and
/// expert_origin.png into `out`; returns their paths (summary first).
pub fn write(r: &Report, out: &Path) -> Result<Vec<PathBuf>> {
    register_fonts()?;
    let origin = origin_shares(&r.router, &r.pooled.pool_origin)?;
    let curve = out.join("pruning_curve.png");
    draw_pruning_curve(r, &curve)?;
    let origin_png = out.join("expert_origin.png");
    draw_heatmap(
        &origin_png,
        &Heatmap {
            title: "Share of each layer's routing mass going to experts from each layer \
                    (pool after router training)"
                .into(),
            x_desc: "layer the expert came from",
            y_desc: "layer routing",
            bar_desc: "share of routing mass",
            values: &origin,
            row_names: &r.router.layer_ids,
            col_names: &r.router.layer_ids,
            range: (0.0, 1.0),
        },
    )?;
    let summary = out.join("summary.md");
    let text = summary_text(r, &origin)?;
    std::fs::write(&summary, text).with_context(|| format!("writing {}", summary.display()))?;
    let results = out.join("results.json");
    let json = serde_json::json!({
        "scale": r.scale,
        "variants": r.variants,
        "kept_perplexity_factor": KEPT_PERPLEXITY,
        "verdict": verdict(r),
        "experts_after_router_training": expert_classes(&r.router),
        "experts_after_distillation": expert_classes(&r.distilled),
        "origin_shares": origin,
        "timings_s": r.timings,
    });
    std::fs::write(&results, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", results.display()))?;
    Ok(vec![summary, results, curve, origin_png])
}

/// The first and last distillation loss of stage 1 (`aux` in its
/// metrics.jsonl), if it logged any.
fn distill_losses(run: &Path) -> Option<(f64, f64)> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).ok()?;
    let aux: Vec<f64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("aux").and_then(|a| a.as_f64()))
        .collect();
    Some((*aux.first()?, *aux.last()?))
}

/// One stage's recipe in words, from its final checkpoint's config.
fn stage_recipe(ckpt: &Path) -> Result<String> {
    let Config { train: t, .. } = checkpoint_config(ckpt)?;
    Ok(format!(
        "{} steps of {} x {} tokens, lr {:e} -> {:e} (cosine, {} warmup steps), trained: {}",
        t.steps,
        t.global_batch,
        t.seq_len,
        t.lr,
        t.min_lr,
        t.warmup_steps,
        t.trainable.join(", ")
    ))
}

fn summary_text(r: &Report, origin: &[Vec<f64>]) -> Result<String> {
    let mut s = String::new();
    let (o, p) = (&r.original, &r.pooled);
    let original_ce = r.original_ce();
    let tokens = r.variants.first().map_or(0, |v| v.tokens);
    writeln!(
        s,
        "# Experiment 2 ({}): one pool of experts for every layer\n",
        r.scale
    )?;
    if let Some(plan) = &r.plan {
        writeln!(s, "{plan}")?;
    }
    writeln!(s, "- original: {}", r.source)?;
    writeln!(
        s,
        "- pooled: one pool of {} experts (top-{}, weights normalised among the chosen) with a \
         sigmoid global router G of {} parameters; {} parameters in all",
        p.num_experts,
        p.experts_per_token,
        p.num_experts * p.hidden_size,
        count_params(p)
    )?;
    let stage = |m: Method| r.find(m, 0.0).map(|v| v.ckpt.clone());
    for (name, m) in [
        ("stage 1 (router distillation)", Method::Distilled),
        ("stage 2 (router LM)", Method::RouterTrained),
    ] {
        if let Some(c) = stage(m) {
            writeln!(s, "- {name}: {}", stage_recipe(&c)?)?;
        }
    }
    if let Some(v) = r
        .variants
        .iter()
        .find(|v| v.method == Method::PoolReapTuned)
    {
        writeln!(s, "- stage 3 (after pruning): {}", stage_recipe(&v.ckpt)?)?;
    }
    if let Some((first, last)) = distill_losses(&r.distill_run) {
        writeln!(
            s,
            "- distillation loss (Bernoulli KL summed over each layer's experts): {first:.4} -> \
             {last:.4}"
        )?;
    }
    writeln!(
        s,
        "- REAP and frequency: {} micro-batches from the start of the training order; every \
         variant scored on the same {tokens} validation tokens",
        r.calibration_batches
    )?;
    writeln!(
        s,
        "\n## Validation cross-entropy\n\n| model | experts removed | experts left | val CE | \
         perplexity | CE - original |\n|---|---:|---:|---:|---:|---:|"
    )?;
    for v in &r.variants {
        writeln!(
            s,
            "| {} | {}% | {} | {:.4} | {:.2} | {:+.4} |",
            v.method.label(),
            super::exp2::percent(v.removed),
            v.experts,
            v.ce,
            v.ce.exp(),
            v.ce - original_ce
        )?;
    }
    writeln!(
        s,
        "\n(per-layer rows: the fraction is removed from each of the {} MoE layers of {} \
         experts; pool rows: from the one pool of {}.)\n\n![pruning curve](pruning_curve.png)\n",
        o.expert_layers().len(),
        o.num_experts,
        p.num_experts
    )?;
    writeln!(s, "## The hypothesis\n\n{}\n", verdict(r))?;
    let classes = expert_classes(&r.router);
    let before = expert_classes(&r.distilled);
    let distilled_origin = origin_shares(&r.distilled, &p.pool_origin)?;
    writeln!(
        s,
        "## The pool's experts\n\nAfter router training, of {} experts: **{} universal** (used at \
         {} or more of the {} layers, i.e. 25%), **{} dead** (never chosen), **{} long tail** \
         (chosen, but used at fewer layers). After distillation: {} universal, {} dead, {} long \
         tail. \"Used\" at a layer: at least {:.3}% of its routing choices (a quarter of the \
         uniform share).\n",
        p.num_experts,
        classes.universal,
        classes.universal_layers,
        r.router.layers,
        classes.dead,
        classes.long_tail,
        before.universal,
        before.dead,
        before.long_tail,
        used_threshold(p.num_experts as usize) * 100.0
    )?;
    writeln!(
        s,
        "Reuse across depths: on average {:.1}% of a layer's routing mass goes to experts that \
         came from another layer after router training ({:.1}% after distillation).\n\n\
         ![expert origin](expert_origin.png)\n",
        cross_depth_share(origin) * 100.0,
        cross_depth_share(&distilled_origin) * 100.0
    )?;
    writeln!(
        s,
        "## Time\n\nOf this invocation (a step found complete from an earlier one costs \
         nothing):\n\n| step | seconds |\n|---|---:|"
    )?;
    for (what, secs) in &r.timings {
        writeln!(s, "| {what} | {secs:.0} |")?;
    }
    Ok(s)
}

/// Val CE against the fraction of experts removed, one line per method,
/// the original model's CE and the quality limit as horizontal lines.
fn draw_pruning_curve(r: &Report, path: &Path) -> Result<()> {
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    let e = |err| anyhow!("drawing {}: {err}", path.display());
    root.fill(&WHITE).map_err(e)?;
    let lines: Vec<(Method, Vec<(f64, f64)>)> = CURVES.iter().map(|&m| (m, r.curve(m))).collect();
    let original = r.original_ce();
    let limit = original + KEPT_PERPLEXITY.ln();
    let ys = lines
        .iter()
        .flat_map(|(_, l)| l.iter().map(|p| p.1))
        .chain([original, limit])
        .filter(|y| y.is_finite());
    let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
        (a.min(y), b.max(y))
    });
    let pad = ((hi - lo) * 0.05).max(0.01);
    let mut c = ChartBuilder::on(&root)
        .caption(
            "Validation loss after pruning (Experiment 2)",
            ("sans-serif", 32),
        )
        .margin(20)
        .x_label_area_size(60)
        .y_label_area_size(90)
        .build_cartesian_2d(0.0..1.0f64, (lo - pad)..(hi + pad))
        .map_err(e)?;
    c.configure_mesh()
        .x_desc("fraction of experts removed")
        .y_desc("validation cross-entropy")
        .axis_desc_style(("sans-serif", 24))
        .label_style(("sans-serif", 18))
        .light_line_style(RGBColor(235, 235, 235))
        .bold_line_style(RGBColor(210, 210, 210))
        .x_label_formatter(&|x| format!("{:.0}%", x * 100.0))
        .y_label_formatter(&|y| format!("{y:.2}"))
        .draw()
        .map_err(e)?;
    for (y, label, grey) in [
        (original, "original model".to_string(), RGBColor(90, 90, 90)),
        (
            limit,
            format!("original + ln {KEPT_PERPLEXITY} (quality kept below)"),
            RGBColor(170, 170, 170),
        ),
    ] {
        c.draw_series(DashedLineSeries::new(
            [(0.0, y), (1.0, y)],
            10,
            6,
            grey.stroke_width(2),
        ))
        .map_err(e)?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 30, y)], grey.stroke_width(2)));
    }
    for (i, (m, points)) in lines.iter().enumerate() {
        let col = colour(i);
        c.draw_series(LineSeries::new(points.iter().copied(), col.stroke_width(3)))
            .map_err(e)?
            .label(m.label())
            .legend(move |(x, y)| {
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(0, 0), (30, 0)], col.stroke_width(3))
                    + Circle::new((15, 0), 5, col.filled())
            });
        c.draw_series(points.iter().map(|&p| Circle::new(p, 5, col.filled())))
            .map_err(e)?;
    }
    legend(&mut c, SeriesLabelPosition::UpperLeft)?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Full scale: the plan section of summary.md from `sharedmoe compile`'s
/// JSON (`figures`; None when it wrote none).
pub fn plan(cfg: &Config, topology: &str, compiled: bool, figures: Option<&str>) -> Result<String> {
    let m = &cfg.model;
    let t = &cfg.train;
    let gib = |b: f64| b / (1u64 << 30) as f64;
    let mut s = String::new();
    writeln!(s, "## Full-scale plan ({topology})\n")?;
    writeln!(
        s,
        "The pooled model: {} experts ({} MoE layers x {}), {} parameters, of which the global \
         router G ({} x {} = {}) is the only trained tensor. Experts, attention, norms and \
         embeddings are frozen: no gradient, no Adam moments; everything is sharded over \
         mesh.fsdp = {} chips. Batch {} x {} tokens, micro-batch {}.\n",
        m.num_experts,
        m.num_experts / m.pool_source_experts.max(1),
        m.pool_source_experts,
        count_params(m),
        m.num_experts,
        m.hidden_size,
        m.num_experts * m.hidden_size,
        cfg.mesh.fsdp,
        t.global_batch,
        t.seq_len,
        t.micro_batch
    )?;
    let Some(text) = figures else {
        writeln!(
            s,
            "`sharedmoe compile --topology {topology}` wrote no figures (it {}); see its output \
             above.",
            if compiled { "succeeded" } else { "failed" }
        )?;
        return Ok(s);
    };
    let f: serde_json::Value = serde_json::from_str(text).context("sharedmoe compile's JSON")?;
    let num = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    writeln!(
        s,
        "`sharedmoe compile --topology {topology}` (offline, libtpu): {} chips with {:.2} GiB of \
         HBM each; parameters + Adam state {:.2} GiB per chip.\n",
        f["chips"],
        gib(num(&f, "hbm_bytes")),
        gib(num(&f, "state_bytes_per_chip"))
    )?;
    writeln!(
        s,
        "| step | micro-batch | arguments | outputs | temporaries | total per chip | fits |\n\
         |---|---:|---:|---:|---:|---:|---|"
    )?;
    for (name, step) in [("train", &f["train"]), ("eval", &f["eval"])] {
        if step.is_null() {
            continue;
        }
        match step["refused"].as_str() {
            Some(why) => writeln!(
                s,
                "| {name} | {} | | | | XLA refused: {} | false |",
                step["micro_batch"],
                why.lines().next().unwrap_or("").replace('|', "/")
            )?,
            None => writeln!(
                s,
                "| {name} | {} | {:.2} GiB | {:.2} GiB | {:.2} GiB | {:.2} GiB | {} |",
                step["micro_batch"],
                gib(num(step, "arguments")),
                gib(num(step, "outputs")),
                gib(num(step, "temporaries")),
                gib(num(step, "total")),
                step["fits"]
            )?,
        }
    }
    match f["largest_fitting_micro_batch"].as_i64() {
        Some(mb) => writeln!(s, "\nThe largest micro-batch that fits: {mb}.")?,
        None if f["fits"] == serde_json::json!(false) => {
            // Every layer may route to any pool expert, so under FSDP alone
            // a layer's step gathers the whole pool.
            let pool_bf16 =
                (m.num_experts * 3 * m.hidden_size * m.expert_intermediate_size * 2) as f64;
            writeln!(
                s,
                "\nIt does not fit at any micro-batch. Why: every layer may route to any of the {} \
                 experts, so with the pool sharded only over FSDP each layer's step gathers the \
                 whole pool, {:.1} GiB in bf16, more than a chip holds. A global pool of this size \
                 needs expert parallelism (the pool split over an expert mesh axis, tokens sent to \
                 their experts' chips by all-to-all), which the mesh does not have yet.",
                m.num_experts,
                gib(pool_bf16)
            )?
        }
        None => {}
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::routing::LayerChoices;

    /// A pool of 4 experts (from layers 0, 0, 2, 2) routed top-1 at layers
    /// 0 and 2 for 4 tokens with weight 1.
    fn routed(at0: [usize; 4], at2: [usize; 4]) -> RoutingStats {
        let mut s = RoutingStats::shared_at(vec![0, 2], 4, 1);
        let choices = |e: [usize; 4]| LayerChoices {
            experts: e.to_vec(),
            weights: vec![1.0; 4],
        };
        s.add(&[choices(at0), choices(at2)]).unwrap();
        s
    }

    const ORIGIN: [[i64; 2]; 4] = [[0, 0], [0, 1], [2, 0], [2, 1]];

    #[test]
    fn origin_shares_split_each_layers_mass_by_where_its_experts_came_from() {
        // Top-2 at layers 0 and 2, two tokens each. Layer 0: experts 0
        // (from layer 0) with weight 0.9 and 3 (from layer 2) with 0.1.
        // Layer 2: experts 2 (own) with 0.6 and 1 (from layer 0) with 0.4.
        // By mass, not by count (which would give halves everywhere).
        let mut s = RoutingStats::shared_at(vec![0, 2], 4, 2);
        let choices = |a, wa, b, wb| LayerChoices {
            experts: vec![a, b, a, b],
            weights: vec![wa, wb, wa, wb],
        };
        s.add(&[choices(0, 0.9, 3, 0.1), choices(2, 0.6, 1, 0.4)])
            .unwrap();
        let shares = origin_shares(&s, &ORIGIN).unwrap();
        let want = [[0.9, 0.1], [0.4, 0.6]];
        for (got, want) in shares.iter().flatten().zip(want.iter().flatten()) {
            assert!((got - want).abs() < 1e-12, "{shares:?}");
        }
        assert!((cross_depth_share(&shares) - (0.1 + 0.4) / 2.0).abs() < 1e-12);
        // An origin table of the wrong size, or naming a layer without a
        // router, is refused.
        assert!(origin_shares(&s, &ORIGIN[..3]).is_err());
        let mut bad = ORIGIN;
        bad[0] = [1, 0];
        let err = origin_shares(&s, &bad).unwrap_err().to_string();
        assert!(err.contains("layer 1"), "{err}");
    }

    #[test]
    fn experts_are_universal_dead_or_long_tail() {
        // 2 layers: universal = used at >= ceil(0.5) = 1 layer. Expert 0 is
        // used at both, expert 1 at one, expert 3 nowhere; expert 2 gets
        // 1 of 4 choices at layer 2, above the threshold 0.25/4.
        let s = routed([0, 0, 1, 1], [0, 0, 0, 2]);
        let c = expert_classes(&s);
        assert_eq!(
            c,
            ExpertClasses {
                universal: 3,
                dead: 1,
                long_tail: 0,
                universal_layers: 1
            }
        );
        // 8 layers: universal needs 2. One token per layer: expert 0 at
        // every layer, expert 1 at layer 0 only; 2 and 3 never.
        let mut s = RoutingStats::shared_at((0..8).collect(), 4, 1);
        let one = |e| LayerChoices {
            experts: vec![e],
            weights: vec![1.0],
        };
        let mut layers: Vec<LayerChoices> = (0..8).map(|_| one(0)).collect();
        layers[0] = one(1);
        s.add(&layers).unwrap();
        let c = expert_classes(&s);
        assert_eq!(
            (c.universal, c.long_tail, c.dead, c.universal_layers),
            (1, 1, 2, 2)
        );
    }

    fn report(ces: &[(Method, f64, f64)]) -> Report {
        let variant = |&(method, removed, ce): &(Method, f64, f64)| Variant {
            method,
            removed,
            experts: 0,
            ce,
            tokens: 1,
            ckpt: PathBuf::new(),
        };
        Report {
            scale: "tiny",
            source: String::new(),
            original: ModelConfig::preset("tiny-moe").unwrap(),
            pooled: ModelConfig::preset("tiny-moe").unwrap(),
            variants: ces.iter().map(variant).collect(),
            distilled: RoutingStats::new(1, 1, 1),
            router: RoutingStats::new(1, 1, 1),
            distill_run: PathBuf::new(),
            calibration_batches: 1,
            timings: vec![],
            plan: None,
        }
    }

    /// The original at CE 3.0, the pool's REAP lines and per-layer REAP
    /// at 25/50/80/90% with the given CEs.
    fn pruned(pool: [f64; 4], tuned: [f64; 4], layer: [f64; 4]) -> Report {
        let mut v = vec![
            (Method::Original, 0.0, 3.0),
            (Method::RouterTrained, 0.0, 3.01),
        ];
        for (i, f) in [0.25, 0.5, 0.8, 0.9].into_iter().enumerate() {
            v.push((Method::PoolReap, f, pool[i]));
            v.push((Method::PoolReapTuned, f, tuned[i]));
            v.push((Method::LayerReap, f, layer[i]));
        }
        report(&v)
    }

    #[test]
    fn the_verdict_follows_the_largest_ratio_that_keeps_quality() {
        // The limit: 3.0 + ln 1.05 = 3.0488.
        let bad = 3.2;
        let supports = pruned(
            [3.01, 3.02, bad, bad],
            [3.01, 3.02, 3.04, bad],
            [3.01, bad, bad, bad],
        );
        assert_eq!(
            supports.largest_kept(&[Method::PoolReap, Method::PoolReapTuned]),
            Some(0.8)
        );
        assert_eq!(supports.largest_kept(&[Method::LayerReap]), Some(0.25));
        let v = verdict(&supports);
        assert!(v.starts_with("Supports"), "{v}");
        assert!(
            v.contains("up to 80% removed, per-layer REAP only up to 25% removed"),
            "{v}"
        );
        assert!(
            v.contains("the unpruned pool itself is +0.0100 nats"),
            "{v}"
        );

        let v = verdict(&pruned([3.0; 4], [3.0; 4], [3.04; 4]));
        assert!(v.starts_with("Cannot decide: even per-layer REAP"), "{v}");

        let v = verdict(&pruned(
            [3.0, 3.0, 3.0, bad],
            [bad; 4],
            [3.0, 3.0, 3.0, bad],
        ));
        assert!(v.starts_with("Cannot decide: the global pool"), "{v}");

        let v = verdict(&pruned(
            [3.0, 3.0, bad, bad],
            [bad; 4],
            [3.0, bad, bad, bad],
        ));
        assert!(v.starts_with("Contradicts the 80-90% figure"), "{v}");

        let v = verdict(&pruned([bad; 4], [bad; 4], [3.0, bad, bad, bad]));
        assert!(
            v.starts_with("Contradicts: ")
                && v.contains("at none of the ratios, per-layer REAP up to 25%"),
            "{v}"
        );
    }

    #[test]
    fn a_pruning_line_starts_at_its_unpruned_model() {
        let r = pruned([3.1, 3.2, 3.3, 3.4], [3.0; 4], [3.5; 4]);
        assert_eq!(
            r.curve(Method::PoolReap),
            vec![(0.0, 3.01), (0.25, 3.1), (0.5, 3.2), (0.8, 3.3), (0.9, 3.4)]
        );
        assert_eq!(r.curve(Method::LayerReap)[0], (0.0, 3.0));
        assert!(r.curve(Method::PoolFrequency) == vec![(0.0, 3.01)]);
    }
}
