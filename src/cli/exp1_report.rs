//! `summary.md` of `experiment exp1`: the thesis's table 3.4 beside this
//! run's numbers, the seed noise of the difference, a verdict derived from
//! them, every run's figures, the loss plots and what the shared experts
//! learned.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::model::routing::{uniform_overlap, RoutingStats};
use crate::train::Config;

/// Thesis section 3.2, table 3.4 (Experiment 1 on a TPU v4-32).
pub mod thesis {
    /// SPEC.md's exact counts for the thesis's "125M" and "50M" models.
    pub const DENSE_PARAMS: i64 = 137_841_408;
    pub const MOE_PARAMS: i64 = 49_642_240;
    /// "Final loss" of table 3.4.
    pub const DENSE_LOSS: f64 = 3.12;
    pub const MOE_LOSS: f64 = 3.15;
    /// 12,000 steps of 512 sequences x 1,024 tokens, for each model.
    pub const TOKENS: i64 = 12_000 * 512 * 1024;
}

/// What a run's metrics.jsonl says.
#[derive(Debug, Default, Clone)]
pub struct RunStats {
    pub steps: usize,
    pub tokens: i64,
    /// Mean cross-entropy of the last 10% of steps (at least 1).
    pub final_train: f64,
    pub final_val: Option<f64>,
    pub median_tokens_per_s: f64,
    pub median_mfu: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn run_stats(run: &Path) -> Result<RunStats> {
    let path = run.join("metrics.jsonl");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut rows = vec![];
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
        rows.push(v);
    }
    if rows.is_empty() {
        bail!("{}: no metrics rows", path.display());
    }
    let f = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_f64());
    let tail = (rows.len() / 10).max(1);
    let losses: Vec<f64> = rows[rows.len() - tail..]
        .iter()
        .filter_map(|r| f(r, "loss"))
        .collect();
    let mfu: Vec<f64> = rows.iter().filter_map(|r| f(r, "mfu")).collect();
    Ok(RunStats {
        steps: rows.len(),
        tokens: rows.last().and_then(|r| r["tokens"].as_i64()).unwrap_or(0),
        final_train: losses.iter().sum::<f64>() / losses.len() as f64,
        final_val: rows.iter().rev().find_map(|r| f(r, "val_loss")),
        median_tokens_per_s: median(rows.iter().filter_map(|r| f(r, "tokens_per_s")).collect()),
        median_mfu: (!mfu.is_empty()).then(|| median(mfu)),
    })
}

/// One trained run of the experiment.
pub struct Run {
    /// The model's label ("dense", "sharedmoe", ...).
    pub label: &'static str,
    /// 0 for the dense baseline, 1 for the shared MoE.
    pub model: usize,
    /// The seed's index (train.seed = the config's seed + index).
    pub seed: u32,
    pub cfg: Config,
    pub params: i64,
    pub active_params: i64,
    /// Seconds spent on the run (compile, train, eval, experts) by every
    /// invocation of the experiment so far.
    pub wall_s: f64,
    pub stats: RunStats,
    /// The routing analysis of a shared-MoE run's final checkpoint, and
    /// the directory of its plots.
    pub experts: Option<(RoutingStats, PathBuf)>,
}

/// The difference shared MoE - dense of final validation CE, paired by
/// seed (both models of a seed see the same batches), and each model's
/// spread over seeds.
#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    /// [dense, shared MoE] final val CE, one per seed.
    pub val: [Vec<f64>; 2],
    /// Shared MoE minus dense, per seed.
    pub diffs: Vec<f64>,
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// max - min (0 for fewer than two values).
fn spread(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let (lo, hi) = v
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        });
    hi - lo
}

impl Comparison {
    /// Pairs the runs by seed; None if a run has no validation loss or a
    /// seed lacks one of the models.
    pub fn of(runs: &[Run]) -> Option<Comparison> {
        let mut seeds: Vec<u32> = runs.iter().map(|r| r.seed).collect();
        seeds.sort();
        seeds.dedup();
        let mut val = [vec![], vec![]];
        for s in seeds {
            for (m, v) in val.iter_mut().enumerate() {
                let run = runs.iter().find(|r| r.seed == s && r.model == m)?;
                v.push(run.stats.final_val?);
            }
        }
        let diffs = val[1].iter().zip(&val[0]).map(|(b, a)| b - a).collect();
        Some(Comparison { val, diffs })
    }

    pub fn seeds(&self) -> usize {
        self.diffs.len()
    }

    pub fn mean_diff(&self) -> f64 {
        mean(&self.diffs)
    }

    /// The noise a difference must exceed to mean something: the larger
    /// of the two models' seed spreads of final val CE.
    pub fn seed_spread(&self) -> f64 {
        spread(&self.val[0]).max(spread(&self.val[1]))
    }

    /// One plain sentence: does this run support, contradict or fail to
    /// decide the thesis's claim (the shared MoE matches the dense model)?
    pub fn verdict(&self) -> String {
        let d = self.mean_diff();
        let noise = self.seed_spread();
        let dense = mean(&self.val[0]);
        if self.seeds() < 2 {
            return format!(
                "This run cannot decide the thesis's claim: with one seed there is no measure of \
                 the noise, so the difference of {d:+.3} nats cannot be judged (run with --seeds 2)."
            );
        }
        if d.abs() <= noise {
            format!(
                "This run supports the thesis's claim at this scale: the shared MoE's validation CE \
                 differs from the dense model's by {d:+.3} nats, which is within the seed spread \
                 ({noise:.3}), so the two models cannot be told apart (nor could a gap smaller than \
                 that spread)."
            )
        } else if d > 0.0 {
            format!(
                "This run contradicts the thesis's claim at this scale: the shared MoE ends {d:.3} \
                 nats ({:.1}%) behind the dense model, more than the seed spread ({noise:.3}) and \
                 than the thesis's gap of {:.2}.",
                100.0 * d / dense,
                thesis::MOE_LOSS - thesis::DENSE_LOSS
            )
        } else {
            format!(
                "This run supports the thesis's claim at this scale, and more: the shared MoE ends \
                 {:.3} nats ahead of the dense model, more than the seed spread ({noise:.3}).",
                -d
            )
        }
    }
}

/// 1234567 -> "1,234,567".
fn grouped(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// A count in words a reader takes in at once: 6.29B, 1.64M, 52.4k.
fn short(n: f64) -> String {
    match n.abs() {
        x if x >= 1e9 => format!("{:.2}B", n / 1e9),
        x if x >= 1e6 => format!("{:.2}M", n / 1e6),
        x if x >= 1e4 => format!("{:.1}k", n / 1e3),
        _ => format!("{n:.0}"),
    }
}

/// The whole of summary.md. `runs` in training order; `scale` names it;
/// `out` is summary.md's directory (image links are relative to it).
pub fn summary(runs: &[Run], scale: &str, out: &Path) -> Result<String> {
    let Some(first) = runs.first() else {
        bail!("no runs to summarise");
    };
    let mut s = String::new();
    writeln!(
        s,
        "# Experiment 1 ({scale} scale): dense baseline vs shared MoE\n"
    )?;
    let c = &first.cfg;
    let seeds = runs.iter().map(|r| r.seed).max().unwrap_or(0) + 1;
    writeln!(
        s,
        "Same data order and recipe for both models: {} steps of {} sequences x {} tokens, AdamW lr {} -> {} \
         (warmup {}), {} replica(s), backend {}. Validation: held-out documents (data.val_fraction = {}), \
         every {} steps. {seeds} seed(s): seed i sets train.seed = {} + i, which draws both the \
         initial weights and the data order; the two models of one seed see the same batches. \
         Wall time of all {} runs: {:.1} min.\n",
        c.train.steps,
        c.train.global_batch,
        c.train.seq_len,
        c.train.lr,
        c.train.min_lr,
        c.train.warmup_steps,
        c.train.replicas,
        c.run.backend,
        c.data.val_fraction,
        c.train.eval_every,
        c.train.seed,
        runs.len(),
        runs.iter().map(|r| r.wall_s).sum::<f64>() / 60.0
    )?;
    let comparison = Comparison::of(runs);
    writeln!(s, "## Result\n")?;
    match &comparison {
        Some(cmp) => writeln!(s, "**{}**\n", cmp.verdict())?,
        None => writeln!(
            s,
            "**This run cannot decide the thesis's claim: a run has no validation loss \
             (train.eval_every = 0 or fewer steps than it).**\n"
        )?,
    }
    thesis_table(&mut s, runs, comparison.as_ref())?;
    runs_table(&mut s, runs)?;
    writeln!(
        s,
        "## Loss curves\n\nOne curve per seed, in its model's colour.\n\n\
         ![train loss](loss_train.png)\n\n![validation loss](loss_val.png)\n"
    )?;
    experts_section(&mut s, runs, out)?;
    Ok(s)
}

/// Per model: (parameters, mean tokens seen) over its runs.
fn model_figures(runs: &[Run], model: usize) -> Option<(i64, f64)> {
    let mine: Vec<&Run> = runs.iter().filter(|r| r.model == model).collect();
    let first = mine.first()?;
    let tokens = mine.iter().map(|r| r.stats.tokens as f64).sum::<f64>() / mine.len() as f64;
    Some((first.params, tokens))
}

fn thesis_table(s: &mut String, runs: &[Run], cmp: Option<&Comparison>) -> Result<()> {
    let (Some((dense_p, dense_t)), Some((moe_p, moe_t))) =
        (model_figures(runs, 0), model_figures(runs, 1))
    else {
        bail!("exp1 needs runs of both models to summarise");
    };
    let val = |m: usize| {
        cmp.map_or("-".to_string(), |c| {
            let v = &c.val[m];
            if v.len() > 1 {
                format!(
                    "{:.4} (mean of {}; spread {:.4})",
                    mean(v),
                    v.len(),
                    spread(v)
                )
            } else {
                format!("{:.4}", v[0])
            }
        })
    };
    let diff = cmp.map_or("-".to_string(), |c| {
        let per_seed: Vec<String> = c.diffs.iter().map(|d| format!("{d:+.4}")).collect();
        if c.seeds() > 1 {
            format!(
                "{:+.4} (per seed: {}; spread {:.4})",
                c.mean_diff(),
                per_seed.join(", "),
                spread(&c.diffs)
            )
        } else {
            per_seed.join(", ")
        }
    });
    writeln!(
        s,
        "| | thesis (table 3.4) | this run |\n|---|---:|---:|\n\
         | dense baseline: parameters | 125M ({}) | {} |\n\
         | shared MoE: parameters | 50M ({}) | {} |\n\
         | parameter ratio dense / shared MoE | {:.2} | {:.2} |\n\
         | dense baseline: final loss | {:.2} | {} |\n\
         | shared MoE: final loss | {:.2} | {} |\n\
         | difference shared MoE - dense | {:+.2} | {} |\n\
         | seed spread (largest max - min of a model's final val CE) | not reported | {} |\n\
         | tokens seen, per model | {} (12,000 x 512 x 1,024) | {} / {} |\n\
         | tokens per parameter: dense / shared MoE | {:.1} / {:.1} | {:.3} / {:.3} |\n",
        grouped(thesis::DENSE_PARAMS),
        grouped(dense_p),
        grouped(thesis::MOE_PARAMS),
        grouped(moe_p),
        thesis::DENSE_PARAMS as f64 / thesis::MOE_PARAMS as f64,
        dense_p as f64 / moe_p as f64,
        thesis::DENSE_LOSS,
        val(0),
        thesis::MOE_LOSS,
        val(1),
        thesis::MOE_LOSS - thesis::DENSE_LOSS,
        diff,
        cmp.filter(|c| c.seeds() > 1)
            .map_or("- (one seed)".into(), |c| format!("{:.4}", c.seed_spread())),
        short(thesis::TOKENS as f64),
        short(dense_t),
        short(moe_t),
        thesis::TOKENS as f64 / thesis::DENSE_PARAMS as f64,
        thesis::TOKENS as f64 / thesis::MOE_PARAMS as f64,
        dense_t / dense_p as f64,
        moe_t / moe_p as f64,
    )?;
    writeln!(
        s,
        "Our final loss is the last validation cross-entropy (held-out documents); the thesis's \
         \"final loss\" is not said to be train or validation loss. Its 0.03 gap is one run per \
         model, with no seed spread. This run saw {:.3}% of the thesis's tokens per model.\n",
        100.0 * dense_t / thesis::TOKENS as f64
    )?;
    Ok(())
}

fn runs_table(s: &mut String, runs: &[Run]) -> Result<()> {
    writeln!(
        s,
        "## Runs\n\n| model | seed | parameters | used per token | tokens seen | final train CE | final val CE | wall time | tokens/s | MFU |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    for r in runs {
        let st = &r.stats;
        writeln!(
            s,
            "| {} | {} | {} | {} | {} | {:.4} | {} | {:.0} s | {:.0} | {} |",
            r.label,
            r.seed,
            r.params,
            r.active_params,
            st.tokens,
            st.final_train,
            st.final_val.map_or("-".into(), |v| format!("{v:.4}")),
            r.wall_s,
            st.median_tokens_per_s,
            st.median_mfu
                .map_or("-".into(), |m| format!("{:.1}%", m * 100.0)),
        )?;
    }
    writeln!(
        s,
        "\nFinal train CE: mean over the last 10% of steps. Tokens/s and MFU: medians over steps; MFU = \
         achieved model FLOP/s (6 x parameters used per token + attention) over the devices' peak (the \
         documented bf16 peak on TPU/GPU, a measured f32 matmul on CPU). Wall time: compilation, \
         validation and the experts analysis included, summed over the invocations that worked on \
         the run (an interrupted experiment resumes where it stopped).\n"
    )?;
    Ok(())
}

/// The share of routing choices below which an expert does not count as
/// used at a layer: a quarter of the uniform share 1/E.
pub fn used_threshold(experts: usize) -> f64 {
    0.25 / experts as f64
}

fn experts_section(s: &mut String, runs: &[Run], out: &Path) -> Result<()> {
    let analysed: Vec<(&Run, &RoutingStats, &PathBuf)> = runs
        .iter()
        .filter_map(|r| r.experts.as_ref().map(|(st, dir)| (r, st, dir)))
        .collect();
    let Some(&(first, st, dir)) = analysed.first() else {
        return Ok(());
    };
    let rel = |p: PathBuf| {
        p.strip_prefix(out)
            .map(Path::to_path_buf)
            .unwrap_or(p)
            .display()
            .to_string()
    };
    let (e, k) = (st.experts, st.k);
    writeln!(
        s,
        "## What the shared experts learned\n\n\
         The ONE router of the shared block, run at every layer of each shared-MoE run's final \
         checkpoint over its validation batches ({} tokens for seed {}; `sharedmoe experts`). \
         Plots of seed {}: share of tokens sent to each expert at each layer, and for two layers \
         the share of tokens whose top-{k} sets intersect.\n\n\
         ![experts per layer]({})\n\n![layer overlap]({})\n",
        st.tokens,
        first.seed,
        first.seed,
        rel(dir.join("expert_heatmap.png")),
        rel(dir.join("layer_overlap.png")),
    )?;
    let threshold = used_threshold(e);
    let mut header = "| layer |".to_string();
    let mut rule = "|---:|".to_string();
    for (r, _, _) in &analysed {
        header += &format!(
            " experts used, seed {} | effective experts, seed {} |",
            r.seed, r.seed
        );
        rule += "---:|---:|";
    }
    writeln!(
        s,
        "How many of the {e} experts every layer uses: \"used\" = receives at least {:.2}% of \
         the layer's routing choices (a quarter of the uniform share); \"effective\" = exp of the \
         entropy of the layer's shares ({e} for uniform routing, 1 for a single expert).\n\n{header}\n{rule}",
        100.0 * threshold
    )?;
    for l in 0..st.layers {
        let mut row = format!("| {l} |");
        for (_, stats, _) in &analysed {
            row += &format!(
                " {} | {:.1} |",
                stats.experts_used(l, threshold),
                stats.effective_experts(l)
            );
        }
        writeln!(s, "{row}")?;
    }
    writeln!(s)?;
    let chance = uniform_overlap(e, k);
    for (r, stats, _) in &analysed {
        let Some((o, mean)) = stats
            .layer_overlap()
            .and_then(|o| Some((o, o.between_layers()?)))
        else {
            continue;
        };
        let pair = if stats.layers > 10 {
            format!(
                "; layers 3 and 10 (from 0): {:.1}%",
                100.0 * o.overlap(3, 10)
            )
        } else {
            String::new()
        };
        writeln!(
            s,
            "- Seed {}: a token's top-{k} sets at two different layers share an expert for {:.1}% \
             of tokens on average{pair}; a token against another token: {:.1}%; uniform random \
             routing: {:.1}%.",
            r.seed,
            100.0 * mean.overlap,
            100.0 * mean.other_token,
            100.0 * chance
        )?;
    }
    writeln!(
        s,
        "\nThe CSVs beside the plots hold every number (`expert_counts.csv`, `layer_overlap.csv`)."
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmp(dense: &[f64], moe: &[f64]) -> Comparison {
        Comparison {
            val: [dense.to_vec(), moe.to_vec()],
            diffs: moe.iter().zip(dense).map(|(b, a)| b - a).collect(),
        }
    }

    #[test]
    fn verdict_follows_the_numbers() {
        // Difference 0.02, seed spread 0.05: cannot be told apart.
        let v = cmp(&[4.00, 4.05], &[4.03, 4.06]).verdict();
        assert!(
            v.contains("supports") && v.contains("+0.020") && v.contains("0.050"),
            "{v}"
        );
        // Behind by 0.3 with a spread of 0.02: contradicts.
        let v = cmp(&[4.00, 4.02], &[4.30, 4.32]).verdict();
        assert!(v.contains("contradicts") && v.contains("0.300 nats"), "{v}");
        // Ahead by more than the spread.
        let v = cmp(&[4.30, 4.31], &[4.00, 4.02]).verdict();
        assert!(v.contains("ahead") && v.contains("0.295"), "{v}");
        // One seed: no noise estimate.
        let v = cmp(&[4.0], &[4.3]).verdict();
        assert!(
            v.contains("cannot decide") && v.contains("--seeds 2"),
            "{v}"
        );
    }

    #[test]
    fn spreads_and_numbers() {
        let c = cmp(&[4.0, 4.1, 3.9], &[4.2, 4.2, 4.25]);
        assert!((c.seed_spread() - 0.2).abs() < 1e-12);
        assert!((c.mean_diff() - (0.2 + 0.1 + 0.35) / 3.0).abs() < 1e-12);
        assert_eq!(spread(&[1.0]), 0.0);
        assert_eq!(grouped(137_841_408), "137,841,408");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(-1000), "-1,000");
        assert_eq!(short(6_291_456_000.0), "6.29B");
        assert_eq!(short(1_638_400.0), "1.64M");
        assert_eq!(used_threshold(16), 1.0 / 64.0);
    }
}
