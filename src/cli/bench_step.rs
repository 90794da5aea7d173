//! `sharedmoe bench step --config C`: the compiled training step on this
//! machine, next to the same model, batch and recipe under `jax.jit` with
//! donated state (benches/peers/step_jax.py), measured in the same run.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};

use crate::model::ExpertCompute;
use crate::train::run::{device_peak_flops, flops_per_token, open_client};
use crate::train::trainer::fresh_checkpoint;
use crate::train::{Config, Trainer};

/// Median step time (s) of `steps` timed steps after 2 warm-ups, on
/// random tokens.
fn time_steps(cfg: &Config, experts: ExpertCompute, steps: usize) -> Result<f64> {
    let client = open_client(cfg, None)?;
    let start = fresh_checkpoint(cfg, 0);
    let t0 = Instant::now();
    let mut trainer = Trainer::with_experts(cfg.clone(), client, &start, experts)?;
    tracing::info!("compiled in {:.1}s", t0.elapsed().as_secs_f64());
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
    Ok(times[times.len() / 2])
}

/// Runs the JAX peer if `target/bench-venv` exists; returns
/// (variant, median step seconds) lines it printed.
fn jax_peer(cfg: &Config, steps: usize) -> Result<Vec<(String, f64)>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join("target/bench-venv/bin/python");
    if !python.exists() {
        println!(
            "peer (JAX): not installed; run scripts/bench-peers.sh to compare in the same run"
        );
        return Ok(vec![]);
    }
    let spec = serde_json::json!({
        "model": cfg.model,
        "train": cfg.train,
        "steps": steps,
    });
    let out = Command::new(python)
        .arg(root.join("benches/peers/step_jax.py"))
        .arg(spec.to_string())
        // The peer runs where we run.
        .env("JAX_PLATFORMS", &cfg.run.backend)
        .output()
        .context("running benches/peers/step_jax.py")?;
    // A variant that dies (e.g. ragged_dot running out of memory at full
    // size) leaves the lines of the variants that finished.
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        println!(
            "peer (JAX) exited with {} before finishing all variants (out of memory?): {last}",
            out.status
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            match (it.next(), it.next(), it.next()) {
                (Some("median_step_s"), Some(v), Some(s)) => {
                    s.parse().ok().map(|s| (v.to_string(), s))
                }
                _ => None,
            }
        })
        .collect())
}

pub fn step(cfg: &Config, steps: usize) -> Result<()> {
    let t = &cfg.train;
    let tokens = (t.global_batch * t.seq_len) as f64;
    let fpt = flops_per_token(cfg);
    println!(
        "config: {:?} d={} layers={} vocab={} | batch {} x {} tokens, {} replica(s), {} accumulation step(s)",
        cfg.model.ffn,
        cfg.model.hidden_size,
        cfg.model.num_layers,
        cfg.model.vocab_size,
        t.global_batch,
        t.seq_len,
        t.replicas,
        cfg.accumulation_steps()
    );
    println!(
        "model FLOPs per token: {:.3e} (6 x used params + 12 x layers x seq x hidden)",
        fpt
    );
    let peak = device_peak_flops(&open_client(cfg, None)?).map(|p| p * t.replicas as f64);
    if let Some(p) = peak {
        println!("device peak for MFU: {:.1} GFLOP/s (documented for accelerators, measured matmul on CPU)", p / 1e9);
    }
    let report = |name: &str, secs: f64| {
        let mfu = peak
            .map(|p| format!("  MFU {:.1}%", 100.0 * tokens * fpt / secs / p))
            .unwrap_or_default();
        println!(
            "{name:<22} step {:>9.2} ms  {:>10.0} tokens/s  {:>8.2} GFLOP/s{mfu}",
            secs * 1e3,
            tokens / secs,
            tokens * fpt / secs / 1e9
        );
    };
    let ours = time_steps(
        cfg,
        ExpertCompute::Routed {
            block: cfg.model.moe_block_size,
        },
        steps,
    )?;
    report(
        if cfg.model.is_moe() {
            "sharedmoe (routed)"
        } else {
            "sharedmoe"
        },
        ours,
    );
    if cfg.model.is_moe() {
        let dense = time_steps(cfg, ExpertCompute::Dense, steps)?;
        report("sharedmoe (dense exp.)", dense);
        println!("routed / dense-experts step time: {:.2}", ours / dense);
    }
    let peers = jax_peer(cfg, steps)?;
    for (variant, secs) in &peers {
        report(&format!("jax ({variant})"), *secs);
    }
    if let Some((variant, best)) = peers.iter().min_by(|a, b| a.1.total_cmp(&b.1)) {
        println!(
            "ratio ours / JAX (best peer: {variant}): {:.2}",
            ours / best
        );
    }
    Ok(())
}
