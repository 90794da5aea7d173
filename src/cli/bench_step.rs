//! `sharedmoe bench step --config C`: the compiled training step on this
//! machine, next to the same model, batch and recipe under `jax.jit` with
//! donated state (benches/peers/step_jax.py), measured in the same run.
//!
//! On N > 1 devices each of our variants runs twice, under mesh.data = N
//! (each device a whole copy of the state) and mesh.fsdp = N (a shard
//! each), and their ratio is printed.
//!
//! Every variant (ours routed, ours with every expert computed densely,
//! each JAX variant) runs in its own process, so its peak RSS is its own;
//! each also reports what its compiled step program needs according to
//! XLA's buffer assignment (`CompiledMemoryStats`, JAX's
//! `memory_analysis()`).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::bench::BenchArgs;
use super::measured;
use crate::model::ExpertCompute;
use crate::runtime::MemoryStats;
use crate::train::client::open_client;
use crate::train::mfu::{device_peak_flops, flops_per_token};
use crate::train::trainer::fresh_checkpoint;
use crate::train::{Config, Trainer};

/// The line a variant's process prints its result on.
const RESULT: &str = "bench-step-result";

/// One variant's result, as its process prints it (JSON after [`RESULT`]).
#[derive(Debug, Serialize, Deserialize)]
struct VariantResult {
    variant: String,
    /// Median step time in seconds.
    step_s: f64,
    /// The compiled step's memory per device, in bytes (XLA's buffer
    /// assignment), where the backend reports it.
    compiled: Option<MemoryStats>,
}

/// Our step variants.
fn our_variants(cfg: &Config) -> Vec<(&'static str, ExpertCompute)> {
    let routed = ExpertCompute::Routed {
        block: cfg.model.moe_block_size,
    };
    if cfg.model.is_moe() {
        vec![("routed", routed), ("dense-experts", ExpertCompute::Dense)]
    } else {
        vec![("dense", routed)]
    }
}

/// Median step time (s) of `steps` timed steps after 2 warm-ups, on
/// random tokens, and the step program's compiled memory.
fn time_steps(
    cfg: &Config,
    experts: ExpertCompute,
    steps: usize,
) -> Result<(f64, Option<MemoryStats>)> {
    let client = open_client(cfg, None)?;
    let start = fresh_checkpoint(cfg, 0);
    let t0 = Instant::now();
    let mut trainer = Trainer::with_experts(cfg.clone(), client, &start, experts)?;
    drop(start); // on the device now, as in `train`
    tracing::info!("compiled in {:.1}s", t0.elapsed().as_secs_f64());
    let memory = trainer.step_memory();
    let t = &cfg.train;
    let per = (t.global_batch / t.replicas * (t.seq_len + 1)) as usize;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mut times = vec![];
    for i in 0..steps + 2 {
        let rows: Vec<Vec<i32>> = (0..t.replicas)
            .map(|_| {
                (0..per)
                    .map(|_| rng.gen_range(0..cfg.model.vocab_size as i32))
                    .collect()
            })
            .collect();
        let began = Instant::now();
        trainer.train_step(&rows)?;
        if i >= 2 {
            times.push(began.elapsed().as_secs_f64());
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok((times[times.len() / 2], memory))
}

/// The child side: one of our variants, result on stdout.
fn run_variant(cfg: &Config, name: &str, steps: usize) -> Result<()> {
    let variants = our_variants(cfg);
    let Some(&(variant, experts)) = variants.iter().find(|(n, _)| *n == name) else {
        anyhow::bail!(
            "--variant {name}: this model's variants are {:?}",
            variants.iter().map(|v| v.0).collect::<Vec<_>>()
        );
    };
    let (step_s, memory) = time_steps(cfg, experts, steps)?;
    let result = VariantResult {
        variant: variant.into(),
        step_s,
        compiled: memory,
    };
    println!("{RESULT} {}", serde_json::to_string(&result)?);
    Ok(())
}

/// A variant's process as it ended.
struct Outcome {
    side: &'static str,
    variant: String,
    result: Option<VariantResult>,
    peak_rss: u64,
    status: String,
}

fn results_in(stdout: &str) -> Vec<VariantResult> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix(RESULT))
        .filter_map(|j| serde_json::from_str(j.trim()).ok())
        .collect()
}

fn measure(side: &'static str, variant: &str, cmd: &mut Command) -> Result<Outcome> {
    let m = measured::run(cmd)?;
    let result = results_in(&m.stdout).into_iter().next();
    Ok(Outcome {
        side,
        variant: variant.to_string(),
        result,
        peak_rss: m.peak_rss,
        status: if m.success {
            "ok".into()
        } else {
            format!("{} after {:.0} s", m.status, m.wall.as_secs_f64())
        },
    })
}

/// JAX's variants for this model (see step_jax.py).
fn jax_variants(cfg: &Config) -> &'static [&'static str] {
    if cfg.model.is_moe() {
        &["masked-dense", "ragged-dot"]
    } else {
        &["dense"]
    }
}

fn gib(bytes: f64) -> f64 {
    bytes / (1u64 << 30) as f64
}

pub fn step(args: &BenchArgs, cfg: &Config) -> Result<()> {
    if let Some(name) = &args.variant {
        return run_variant(cfg, name, args.steps);
    }
    let t = &cfg.train;
    let fpt = flops_per_token(cfg);
    println!(
        "config: {:?} d={} layers={} vocab={} | batch {} x {} tokens, {} device(s), {} accumulation step(s), {:?}",
        cfg.model.ffn,
        cfg.model.hidden_size,
        cfg.model.num_layers,
        cfg.model.vocab_size,
        t.global_batch,
        t.seq_len,
        t.replicas,
        cfg.accumulation_steps(),
        t.compute_dtype,
    );
    println!(
        "model FLOPs per token: {:.3e} (6 x used params + 12 x layers x seq x hidden)",
        fpt
    );
    let peak = device_peak_flops(&open_client(cfg, None)?).map(|p| p * t.replicas as f64);
    if let Some(p) = peak {
        println!("device peak for MFU: {:.1} GFLOP/s (documented for accelerators, measured matmul on CPU)", p / 1e9);
    }
    let outcomes = measure_all(args, cfg)?;
    print_times(cfg, &outcomes, peak);
    if args.memory {
        print_memory(&outcomes);
    }
    print_mesh_ratios(cfg, &outcomes);
    print_ratios(&outcomes);
    Ok(())
}

/// The meshes our variants run on: for N > 1 devices, data = N and
/// fsdp = N (the same devices holding whole copies of the state, or a
/// shard each); one device is one mesh.
fn meshes(cfg: &Config) -> Vec<(i64, i64)> {
    match cfg.train.replicas {
        1 => vec![(1, 1)],
        n => vec![(n, 1), (1, n)],
    }
}

/// Our variant's name on a mesh, as the tables show it.
fn mesh_label(cfg: &Config, variant: &str, (data, fsdp): (i64, i64)) -> String {
    if cfg.train.replicas == 1 {
        return variant.into();
    }
    if fsdp == 1 {
        format!("{variant}, data={data}")
    } else {
        format!("{variant}, fsdp={fsdp}")
    }
}

/// fsdp = N against data = N for each of our variants.
fn print_mesh_ratios(cfg: &Config, outcomes: &[Outcome]) {
    let [data, fsdp] = match meshes(cfg)[..] {
        [a, b] => [a, b],
        _ => return,
    };
    let find = |label: &str| {
        outcomes
            .iter()
            .find(|o| o.side == "sharedmoe" && o.variant == label)
            .and_then(|o| o.result.as_ref().map(|r| (o, r)))
    };
    for (variant, _) in our_variants(cfg) {
        let (Some((od, rd)), Some((of, rf))) = (
            find(&mesh_label(cfg, variant, data)),
            find(&mesh_label(cfg, variant, fsdp)),
        ) else {
            continue;
        };
        let compiled = match (rf.compiled, rd.compiled) {
            (Some(a), Some(b)) => format!("{:.2}", a.live() as f64 / b.live() as f64),
            _ => "-".into(),
        };
        println!(
            "ratio fsdp={} / data={} ({variant}): time {:.2}, peak RSS {:.2}, compiled per device {compiled}",
            fsdp.1,
            data.0,
            rf.step_s / rd.step_s,
            of.peak_rss as f64 / od.peak_rss as f64,
        );
    }
}

/// Each of our variants, then each of JAX's (when its venv is installed),
/// in a child process of its own.
fn measure_all(args: &BenchArgs, cfg: &Config) -> Result<Vec<Outcome>> {
    let mut outcomes = vec![];
    let me = std::env::current_exe().context("finding this executable")?;
    for (variant, _) in our_variants(cfg) {
        for mesh in meshes(cfg) {
            let mut cmd = Command::new(&me);
            cmd.args(["bench", "step", "--variant", variant, "--steps"])
                .arg(args.steps.to_string());
            if let Some(c) = &args.config {
                cmd.arg("--config").arg(c);
            }
            for s in &args.overrides {
                cmd.arg("--set").arg(s);
            }
            cmd.arg("--set")
                .arg(format!("mesh.data={}", mesh.0))
                .arg("--set")
                .arg(format!("mesh.fsdp={}", mesh.1));
            let label = mesh_label(cfg, variant, mesh);
            outcomes.push(measure("sharedmoe", &label, &mut cmd)?);
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join("target/bench-venv/bin/python");
    if !python.exists() {
        println!(
            "peer (JAX): not installed; run scripts/bench-peers.sh to compare in the same run"
        );
        return Ok(outcomes);
    }
    let spec = serde_json::json!({
        "model": cfg.model,
        "train": cfg.train,
        "steps": args.steps,
    });
    for variant in jax_variants(cfg) {
        let mut cmd = Command::new(&python);
        cmd.arg(root.join("benches/peers/step_jax.py"))
            .arg(spec.to_string())
            .arg(variant)
            // The peer runs where we run.
            .env("JAX_PLATFORMS", cfg.run.backend.to_string());
        outcomes.push(measure("jax", variant, &mut cmd)?);
    }
    Ok(outcomes)
}

/// Step time, tokens/s, GFLOP/s, MFU (against `peak`, the job's FLOP/s),
/// peak RSS and compiled memory of every variant.
fn print_times(cfg: &Config, outcomes: &[Outcome], peak: Option<f64>) {
    let tokens = (cfg.train.global_batch * cfg.train.seq_len) as f64;
    let fpt = flops_per_token(cfg);
    println!(
        "{:<36} {:>10} {:>10} {:>9} {:>6} {:>10} {:>10}",
        "variant", "step ms", "tokens/s", "GFLOP/s", "MFU", "peak RSS", "compiled"
    );
    for o in outcomes {
        let name = format!("{} ({})", o.side, o.variant);
        let rss = format!("{:.2} GiB", gib(o.peak_rss as f64));
        let Some(r) = &o.result else {
            println!(
                "{name:<36} {:>10} {:>10} {:>9} {:>6} {rss:>10}   {}",
                "-", "-", "-", "-", o.status
            );
            continue;
        };
        let mfu = peak
            .map(|p| format!("{:.1}%", 100.0 * tokens * fpt / r.step_s / p))
            .unwrap_or_else(|| "-".into());
        let compiled = r
            .compiled
            .map(|c| format!("{:.2} GiB", gib(c.live() as f64)))
            .unwrap_or_else(|| "-".into());
        println!(
            "{name:<36} {:>10.1} {:>10.0} {:>9.2} {mfu:>6} {rss:>10} {compiled:>10}",
            r.step_s * 1e3,
            tokens / r.step_s,
            tokens * fpt / r.step_s / 1e9,
        );
    }
}

/// XLA's buffer assignment of each variant's compiled step.
fn print_memory(outcomes: &[Outcome]) {
    println!("compiled step memory per device (XLA buffer assignment), GiB:");
    println!(
        "{:<36} {:>9} {:>9} {:>9} {:>11} {:>9}",
        "variant", "arguments", "outputs", "aliased", "temporaries", "code"
    );
    for o in outcomes {
        if let Some(c) = o.result.as_ref().and_then(|r| r.compiled) {
            println!(
                "{:<36} {:>9.3} {:>9.3} {:>9.3} {:>11.3} {:>9.3}",
                format!("{} ({})", o.side, o.variant),
                gib(c.arguments as f64),
                gib(c.outputs as f64),
                gib(c.aliased as f64),
                gib(c.temporaries as f64),
                gib(c.generated_code as f64),
            );
        }
    }
}

/// Ours (the default variant) against every peer that finished.
fn print_ratios(outcomes: &[Outcome]) {
    let Some(ours) = outcomes.first().filter(|o| o.result.is_some()) else {
        return;
    };
    let mine = ours.result.as_ref().expect("filtered");
    let peers: Vec<&Outcome> = outcomes.iter().filter(|o| o.side == "jax").collect();
    for p in &peers {
        let ratio = |a: f64, b: f64| format!("{:.2}", a / b);
        match &p.result {
            Some(r) => println!(
                "ratio ours ({}) / jax ({}): time {}, peak RSS {}, compiled {}",
                ours.variant,
                p.variant,
                ratio(mine.step_s, r.step_s),
                ratio(ours.peak_rss as f64, p.peak_rss as f64),
                match (mine.compiled, r.compiled) {
                    (Some(a), Some(b)) => ratio(a.live() as f64, b.live() as f64),
                    _ => "-".into(),
                }
            ),
            None => println!(
                "jax ({}) did not finish ({}; peak RSS {:.2} GiB); ours did in {:.2} GiB",
                p.variant,
                p.status,
                gib(p.peak_rss as f64),
                gib(ours.peak_rss as f64)
            ),
        }
    }
    if let Some(best) = peers
        .iter()
        .filter_map(|p| p.result.as_ref().map(|r| (p, r)))
        .min_by(|a, b| a.1.step_s.total_cmp(&b.1.step_s))
    {
        println!(
            "ratio ours / JAX (best peer: {}): {:.2}",
            best.0.variant,
            mine.step_s / best.1.step_s
        );
    }
}
