//! `sharedmoe bench parity --config C --set run.backend=cuda`: the first
//! steps on the accelerator in its compute dtype (bf16 with `auto`) next to
//! the same steps on the CPU in f32, from the same initial state and the
//! same batches; every loss must agree within `--tolerance` (relative).
//! Then the accelerator's median step time, tokens/s and MFU (`bench step`).

use anyhow::{bail, Result};

use super::bench::BenchArgs;

use crate::runtime::Backend;
use crate::train::batches::{Batches, DataPosition};
use crate::train::client::open_client;
use crate::train::config::ComputeDtype;
use crate::train::trainer::fresh_checkpoint;
use crate::train::{Config, Trainer};

/// Per-step cross-entropy of `steps` steps of `cfg` from seed 0.
fn first_losses(cfg: &Config, steps: usize) -> Result<Vec<f64>> {
    let client = open_client(cfg, None)?;
    let mut trainer = Trainer::new(cfg.clone(), client, &fresh_checkpoint(cfg, 0))?;
    let mut batches = Batches::open(cfg, &DataPosition::default(), 0..cfg.train.replicas)?;
    (0..steps)
        .map(|_| Ok(trainer.train_step(&batches.next(cfg)?)?.ce))
        .collect()
}

pub fn parity(args: &BenchArgs, cfg: &Config) -> Result<()> {
    let (steps, tolerance) = (args.steps, args.tolerance);
    if cfg.run.backend == Backend::Cpu && cfg.compute_dtype() == crate::graph::DType::F32 {
        bail!(
            "nothing to compare: this is the CPU f32 reference itself; pass --set run.backend=cuda \
             (or tpu), or --set train.compute_dtype=bf16 to check bf16 on the CPU"
        );
    }
    let mut reference = cfg.clone();
    reference.run.backend = Backend::Cpu;
    reference.train.compute_dtype = ComputeDtype::F32;
    println!(
        "{} ({:?} compute) vs cpu (f32), {steps} steps from the same state and batches",
        cfg.run.backend,
        cfg.compute_dtype()
    );
    let accel = first_losses(cfg, steps)?;
    let cpu = first_losses(&reference, steps)?;
    let mut worst: f64 = 0.0;
    for (i, (a, c)) in accel.iter().zip(&cpu).enumerate() {
        let rel = (a - c).abs() / c.abs();
        // A NaN loss on either side counts as the worst difference.
        worst = if rel.is_nan() {
            f64::INFINITY
        } else {
            worst.max(rel)
        };
        println!("step {i}: loss {a:.5} vs {c:.5}  rel {rel:.2e}");
    }
    if worst > tolerance {
        bail!("losses differ by up to {worst:.2e} (relative), more than {tolerance:.0e}");
    }
    println!("max relative difference {worst:.2e} <= {tolerance:.0e}: ok");
    // Timed over 10 steps whatever the number of compared steps.
    let timed = BenchArgs {
        steps: 10,
        ..args.clone()
    };
    super::bench_step::step(&timed, cfg)
}
