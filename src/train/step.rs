//! The whole optimizer step as ONE compiled program, and the evaluation
//! program.
//!
//! Step program, per replica (R replicas, A accumulation steps, M sequences
//! per micro-batch, S sequence length, n parameter tensors):
//!   inputs:  params[n], adam_m[n], adam_v[n] (f32), step (i32 scalar),
//!            windows [A, M, S+1] (i32) -- all but windows donated
//!   outputs: params'[n], adam_m'[n], adam_v'[n], step + 1,
//!            ce, aux, grad_norm, lr (f32 scalars; ce/aux of this step's
//!            batch before the update, averaged over the global batch)
//! Reads like the recipe: accumulate gradients over A micro-batches in a
//! loop, average, all-reduce across replicas, clip to the global norm,
//! AdamW with the scheduled learning rate.

use crate::graph::{grad, DType, Function, Graph, Result, Tensor, TensorType};
use crate::model::{param_specs, ExpertCompute, ParamSpec, Transformer};

use super::config::Config;
use super::optimizer::{clip_by_global_norm, AdamW};
use super::schedule::Schedule;

/// Index layout of the step program's arguments and results.
#[derive(Clone, Debug)]
pub struct StepLayout {
    pub specs: Vec<ParamSpec>,
}

impl StepLayout {
    pub fn new(cfg: &Config) -> StepLayout {
        StepLayout {
            specs: param_specs(&cfg.model),
        }
    }

    pub fn n(&self) -> usize {
        self.specs.len()
    }

    /// Arguments: params, m, v, step, windows.
    pub fn step_index(&self) -> usize {
        3 * self.n()
    }

    /// Results after the state: ce, aux, grad_norm, lr.
    pub fn metrics_index(&self) -> usize {
        3 * self.n() + 1
    }
}

fn declare_params(g: &Graph, specs: &[ParamSpec], prefix: &str) -> Result<Vec<Tensor>> {
    specs
        .iter()
        .map(|s| {
            g.param(
                &format!("{prefix}{}", s.name),
                TensorType::new(DType::F32, &s.dims),
            )
        })
        .collect()
}

/// Mean over replicas of a per-replica value.
fn replica_mean(t: &Tensor, replicas: i64) -> Result<Tensor> {
    if replicas == 1 {
        return Ok(t.clone());
    }
    t.all_reduce_sum()?.mul_scalar(1.0 / replicas as f64)
}

/// Traces the training step for `cfg` (see the module docs for the
/// signature).
pub fn train_step(cfg: &Config, experts: ExpertCompute) -> Result<Function> {
    let layout = StepLayout::new(cfg);
    let specs = &layout.specs;
    let t = &cfg.train;
    let (a, m, s) = (cfg.accumulation_steps(), t.micro_batch, t.seq_len);
    let g = Graph::new();
    let params = declare_params(&g, specs, "")?;
    let adam_m = declare_params(&g, specs, "adam_m.")?;
    let adam_v = declare_params(&g, specs, "adam_v.")?;
    let step = g.param("step", TensorType::scalar(DType::I32))?;
    let windows = g.param("windows", TensorType::new(DType::I32, &[a, m, s + 1]))?;
    let named: Vec<(String, Tensor)> = specs
        .iter()
        .map(|p| p.name.clone())
        .zip(params.iter().cloned())
        .collect();
    let compute = cfg.compute_dtype();

    // Accumulate gradient sums over the A micro-batches.
    let zero = g.scalar(0.0, DType::F32)?;
    let mut init: Vec<Tensor> = vec![g.scalar(0.0, DType::I32)?, zero.clone(), zero.clone()];
    for p in &params {
        init.push(p.zeros_like()?);
    }
    // One micro-batch: (ce, aux, gradients), accumulated into `acc`.
    let micro_step = |i: &Tensor, acc: &[Tensor]| -> Result<Vec<Tensor>> {
        let zero_i = i.scalar_like(0.0)?;
        let batch = windows
            .dynamic_slice(&[i, &zero_i, &zero_i], &[1, m, s + 1])?
            .reshape(&[m, s + 1])?;
        let model = Transformer::new(&cfg.model, &named, compute).with_expert_compute(experts);
        let loss = model.loss(&batch)?;
        let refs: Vec<&Tensor> = params.iter().collect();
        let grads = grad(&loss.total, &refs)?;
        let mut next = vec![
            i.add_scalar(1.0)?,
            acc[0].add(&loss.ce.convert(DType::F32)?)?,
            acc[1].add(&loss.aux.convert(DType::F32)?)?,
        ];
        for (sum, gr) in acc[2..].iter().zip(&grads) {
            next.push(sum.add(&gr.convert(DType::F32)?)?);
        }
        Ok(next)
    };
    // A single micro-batch needs no loop (XLA then sees one straight-line
    // program and can fuse across what would be the loop boundary).
    let accumulated = if a == 1 {
        micro_step(&init[0], &init[1..])?
    } else {
        let init_refs: Vec<&Tensor> = init.iter().collect();
        g.while_loop(
            &init_refs,
            |st| st[0].lt(&st[0].scalar_like(a as f64)?),
            |st| micro_step(&st[0], &st[1..]),
        )?
    };
    let inv_a = 1.0 / a as f64;
    let ce = replica_mean(&accumulated[1].mul_scalar(inv_a)?, t.replicas)?;
    let aux = replica_mean(&accumulated[2].mul_scalar(inv_a)?, t.replicas)?;
    let grads = accumulated[3..]
        .iter()
        .map(|gsum| replica_mean(&gsum.mul_scalar(inv_a)?, t.replicas))
        .collect::<Result<Vec<_>>>()?;

    let (grads, grad_norm) = clip_by_global_norm(&grads, t.grad_clip)?;
    let schedule = Schedule {
        peak: t.lr,
        final_lr: t.min_lr,
        warmup: t.warmup_steps,
        total: t.steps,
    };
    let lr = schedule.traced(&step)?;
    let count = step.add_scalar(1.0)?.convert(DType::F32)?;
    let adamw = AdamW {
        beta1: t.beta1,
        beta2: t.beta2,
        eps: t.eps,
        weight_decay: t.weight_decay,
    };
    let (mut new_p, mut new_m, mut new_v) = (vec![], vec![], vec![]);
    for (k, spec) in specs.iter().enumerate() {
        let u = adamw.update(
            &params[k],
            &grads[k],
            &adam_m[k],
            &adam_v[k],
            &lr,
            &count,
            spec.decays(),
        )?;
        new_p.push(u.param);
        new_m.push(u.m);
        new_v.push(u.v);
    }
    let next_step = step.add_scalar(1.0)?;
    let mut outs: Vec<&Tensor> = new_p.iter().chain(&new_m).chain(&new_v).collect();
    outs.extend([&next_step, &ce, &aux, &grad_norm, &lr]);
    let donated: Vec<usize> = (0..=layout.step_index()).collect();
    g.build(&outs)?
        .with_replicas(t.replicas as usize)
        .with_name("train_step")
        .donate(&donated)
}

/// Traces the evaluation program: params[n], windows [M, S+1] -> ce, aux
/// (averaged over replicas).
pub fn eval_step(cfg: &Config, experts: ExpertCompute) -> Result<Function> {
    let specs = param_specs(&cfg.model);
    let g = Graph::new();
    let params = declare_params(&g, &specs, "")?;
    let windows = g.param(
        "windows",
        TensorType::new(DType::I32, &[cfg.train.micro_batch, cfg.train.seq_len + 1]),
    )?;
    let named: Vec<(String, Tensor)> = specs.iter().map(|p| p.name.clone()).zip(params).collect();
    let model =
        Transformer::new(&cfg.model, &named, cfg.compute_dtype()).with_expert_compute(experts);
    let loss = model.loss(&windows)?;
    let ce = replica_mean(&loss.ce.convert(DType::F32)?, cfg.train.replicas)?;
    let aux = replica_mean(&loss.aux.convert(DType::F32)?, cfg.train.replicas)?;
    Ok(g.build(&[&ce, &aux])?
        .with_replicas(cfg.train.replicas as usize)
        .with_name("eval_step"))
}
