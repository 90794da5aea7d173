//! The traced programs of training: the whole optimizer step as ONE
//! compiled program (or its two halves, for processes XLA cannot
//! connect), and the evaluation program. What runs them step after step is
//! [`super::trainer`] and [`super::step_loop`].
//!
//! Step program, per replica (R replicas, A accumulation steps, M sequences
//! per micro-batch, S sequence length, n parameter tensors):
//!   inputs:  params[n], adam_m[n], adam_v[n] (f32), step (i32 scalar),
//!            windows [A, M, S+1] (i32), stop (f32 scalar: this process
//!            votes to stop after the step) -- the state is donated
//!   outputs: params'[n], adam_m'[n], adam_v'[n], step + 1, then the f32
//!            scalars of [`StepOutputs::fused`]: ce, aux, grad_norm, lr
//!            (ce/aux of this step's batch before the update, averaged over
//!            the global batch), applied (1 or 0, see below), stop votes
//!            (summed over every replica of the job, so that all hosts of a
//!            pod stop after the same step)
//! Reads like the recipe: accumulate gradients over A micro-batches in a
//! loop, average, all-reduce across replicas, clip to the global norm,
//! AdamW with the scheduled learning rate.
//!
//! The divergence guard is part of the program: when the loss, the aux
//! loss, the gradient norm or any updated parameter is not finite, the
//! update is not applied (parameters and moments come back unchanged, the
//! step counter still advances) and `applied` is 0. A NaN therefore never
//! reaches the state, and so never a checkpoint; the host decides whether
//! to stop or go on (`train.on_nonfinite`).

use crate::graph::{grad, DType, Function, Graph, Result, Tensor, TensorType};
use crate::model::{ExpertCompute, ParamSpec, Params, Transformer};

use super::config::Config;
use super::optimizer::{clip_by_global_norm, AdamW};
use super::schedule::Schedule;

/// The parameters a step program takes, as a tree and in argument order.
#[derive(Clone, Debug)]
pub struct StepLayout {
    pub tree: Params<ParamSpec>,
    pub specs: Vec<ParamSpec>,
}

impl StepLayout {
    pub fn new(cfg: &Config) -> StepLayout {
        let tree = Params::spec(&cfg.model);
        let specs = tree.leaves().into_iter().cloned().collect();
        StepLayout { tree, specs }
    }

    /// Parameter tensors.
    pub fn n(&self) -> usize {
        self.specs.len()
    }

    /// The state arguments and results: params, m, v (n each), step.
    pub fn state_len(&self) -> usize {
        3 * self.n() + 1
    }
}

/// A scalar result of a step program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepScalar {
    /// Mean next-token cross-entropy of the step's batch.
    Ce,
    /// Mean balance loss.
    Aux,
    /// The global gradient norm before clipping.
    GradNorm,
    /// The learning rate the update used.
    Lr,
    /// 1 when the update was applied, 0 when the divergence guard kept the
    /// state.
    Applied,
    /// Stop votes summed over the job.
    StopVotes,
}

/// Where a program's results are: `tensors` results first (the state, or
/// the gradients), then one f32 scalar per entry of `scalars`. Declared
/// once here, used by the tracer to order the results and by the trainer
/// to read them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepOutputs {
    pub tensors: usize,
    pub scalars: &'static [StepScalar],
}

impl StepOutputs {
    /// [`train_step`]: the state, then ce, aux, grad_norm, lr, applied,
    /// stop votes.
    pub fn fused(layout: &StepLayout) -> StepOutputs {
        use StepScalar::*;
        StepOutputs {
            tensors: layout.state_len(),
            scalars: &[Ce, Aux, GradNorm, Lr, Applied, StopVotes],
        }
    }

    /// [`gradient_step`]: the gradients, then ce and aux.
    pub fn gradient(layout: &StepLayout) -> StepOutputs {
        StepOutputs {
            tensors: layout.n(),
            scalars: &[StepScalar::Ce, StepScalar::Aux],
        }
    }

    /// [`update_step`]: the state, then grad_norm, lr, applied.
    pub fn update(layout: &StepLayout) -> StepOutputs {
        use StepScalar::*;
        StepOutputs {
            tensors: layout.state_len(),
            scalars: &[GradNorm, Lr, Applied],
        }
    }

    /// [`eval_step`]: ce and aux.
    pub fn eval() -> StepOutputs {
        StepOutputs {
            tensors: 0,
            scalars: &[StepScalar::Ce, StepScalar::Aux],
        }
    }

    /// The result index of `s`. Panics when this program does not return
    /// it: a mismatch between the tracer and its reader is a bug.
    pub fn index(&self, s: StepScalar) -> usize {
        let at = self.scalars.iter().position(|&x| x == s);
        self.tensors + at.unwrap_or_else(|| panic!("{s:?} is not a result of {self:?}"))
    }

    /// The results in this order: `tensors`, then `scalar(s)` for each
    /// scalar.
    fn results<'t>(
        &self,
        tensors: &'t [Tensor],
        scalar: impl Fn(StepScalar) -> &'t Tensor,
    ) -> Vec<&'t Tensor> {
        assert_eq!(tensors.len(), self.tensors, "results of {self:?}");
        let mut out: Vec<&Tensor> = tensors.iter().collect();
        out.extend(self.scalars.iter().map(|&s| scalar(s)));
        out
    }
}

/// The flat tensors of `tree`'s shape declared as `prefix` + their names.
fn declare_params(g: &Graph, tree: &Params<ParamSpec>, prefix: &str) -> Result<Vec<Tensor>> {
    Ok(tree
        .declare(g, prefix)?
        .leaves()
        .into_iter()
        .cloned()
        .collect())
}

/// Sum over the replicas of this program (a no-op for one replica).
fn replica_sum(t: &Tensor, replicas: usize) -> Result<Tensor> {
    if replicas == 1 {
        return Ok(t.clone());
    }
    t.all_reduce_sum()
}

/// Mean over replicas of a per-replica value.
fn replica_mean(t: &Tensor, replicas: usize) -> Result<Tensor> {
    replica_sum(t, replicas)?.mul_scalar(1.0 / replicas as f64)
}

/// The step's arguments (see the module docs).
struct StepInputs {
    params: Vec<Tensor>,
    adam_m: Vec<Tensor>,
    adam_v: Vec<Tensor>,
    step: Tensor,
}

fn declare_state(g: &Graph, tree: &Params<ParamSpec>) -> Result<StepInputs> {
    Ok(StepInputs {
        params: declare_params(g, tree, "")?,
        adam_m: declare_params(g, tree, "adam_m.")?,
        adam_v: declare_params(g, tree, "adam_v.")?,
        step: g.param("step", TensorType::scalar(DType::I32))?,
    })
}

/// One replica's (ce, aux, gradients), each the mean over its A
/// micro-batches of `windows` [A, M, S+1].
fn trace_gradients(
    g: &Graph,
    cfg: &Config,
    experts: ExpertCompute,
    params: &[Tensor],
    windows: &Tensor,
) -> Result<(Tensor, Tensor, Vec<Tensor>)> {
    let t = &cfg.train;
    let (a, m, s) = (cfg.accumulation_steps(), t.micro_batch, t.seq_len);
    let tree = Params::spec(&cfg.model).with_leaves(params.to_vec())?;
    let compute = cfg.compute_dtype();

    // Accumulate gradient sums over the A micro-batches.
    let zero = g.scalar(0.0, DType::F32)?;
    let mut init: Vec<Tensor> = vec![g.scalar(0.0, DType::I32)?, zero.clone(), zero.clone()];
    for p in params {
        init.push(p.zeros_like()?);
    }
    // One micro-batch: (ce, aux, gradients), accumulated into `acc`.
    let micro_step = |i: &Tensor, acc: &[Tensor]| -> Result<Vec<Tensor>> {
        let zero_i = i.scalar_like(0.0)?;
        let batch = windows
            .dynamic_slice(&[i, &zero_i, &zero_i], &[1, m, s + 1])?
            .reshape(&[m, s + 1])?;
        let model = Transformer::new(&cfg.model, &tree, compute)?.with_expert_compute(experts);
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
    let ce = accumulated[1].mul_scalar(inv_a)?;
    let aux = accumulated[2].mul_scalar(inv_a)?;
    let grads = accumulated[3..]
        .iter()
        .map(|gsum| gsum.mul_scalar(inv_a))
        .collect::<Result<Vec<_>>>()?;
    Ok((ce, aux, grads))
}

/// What the update traces: the new state (params', m', v', step + 1) and
/// the step's scalars.
struct Update {
    state: Vec<Tensor>,
    grad_norm: Tensor,
    lr: Tensor,
    /// f32 1 when the update was applied, 0 when the guard kept the state.
    applied: Tensor,
}

/// Clipping and AdamW from the batch-mean gradients, guarded: the update
/// is applied only if `ce`, `aux`, the gradient norm and every updated
/// parameter are finite (see the module docs).
fn trace_update(
    cfg: &Config,
    state: &StepInputs,
    grads: &[Tensor],
    ce: &Tensor,
    aux: &Tensor,
) -> Result<Update> {
    let specs = StepLayout::new(cfg).specs;
    let t = &cfg.train;
    let (grads, grad_norm) = clip_by_global_norm(grads, t.grad_clip)?;
    let schedule = Schedule {
        peak: t.lr,
        final_lr: t.min_lr,
        warmup: t.warmup_steps,
        total: t.steps,
    };
    let lr = schedule.traced(&state.step)?;
    let count = state.step.add_scalar(1.0)?.convert(DType::F32)?;
    let adamw = AdamW {
        beta1: t.beta1,
        beta2: t.beta2,
        eps: t.eps,
        weight_decay: t.weight_decay,
    };
    let (mut new_p, mut new_m, mut new_v) = (vec![], vec![], vec![]);
    for (k, spec) in specs.iter().enumerate() {
        let u = adamw.update(
            &state.params[k],
            &grads[k],
            &state.adam_m[k],
            &state.adam_v[k],
            &lr,
            &count,
            spec.decays(),
        )?;
        new_p.push(u.param);
        new_m.push(u.m);
        new_v.push(u.v);
    }
    // One sum over every updated parameter: non-finite iff some value is
    // (or the sum overflows f32, which only a diverging run reaches).
    let mut param_sum = new_p[0].sum_all()?;
    for p in &new_p[1..] {
        param_sum = param_sum.add(&p.sum_all()?)?;
    }
    let sound = ce
        .is_finite()?
        .and(&aux.is_finite()?)?
        .and(&grad_norm.is_finite()?)?
        .and(&param_sum.is_finite()?)?;
    let keep = |new: Vec<Tensor>, old: &[Tensor]| -> Result<Vec<Tensor>> {
        new.iter()
            .zip(old)
            .map(|(n, o)| sound.select(n, o))
            .collect()
    };
    let mut next = keep(new_p, &state.params)?;
    next.extend(keep(new_m, &state.adam_m)?);
    next.extend(keep(new_v, &state.adam_v)?);
    next.push(state.step.add_scalar(1.0)?);
    let one = lr.scalar_like(1.0)?;
    Ok(Update {
        state: next,
        grad_norm,
        lr,
        applied: sound.select(&one, &one.zeros_like()?)?,
    })
}

fn declare_windows(g: &Graph, cfg: &Config) -> Result<Tensor> {
    let t = &cfg.train;
    let shape = [cfg.accumulation_steps(), t.micro_batch, t.seq_len + 1];
    g.param("windows", TensorType::new(DType::I32, &shape))
}

/// Traces the training step for `cfg` with every replica of the job in
/// this one program (see the module docs for the signature).
pub fn train_step(cfg: &Config, experts: ExpertCompute) -> Result<Function> {
    let layout = StepLayout::new(cfg);
    let replicas = cfg.train.replicas as usize;
    let g = Graph::new();
    let state = declare_state(&g, &layout.tree)?;
    let windows = declare_windows(&g, cfg)?;
    let stop = g.param("stop", TensorType::new(DType::F32, &[]))?;
    let (ce, aux, grads) = trace_gradients(&g, cfg, experts, &state.params, &windows)?;
    let votes = replica_sum(&stop, replicas)?;
    let ce = replica_mean(&ce, replicas)?;
    let aux = replica_mean(&aux, replicas)?;
    let grads = grads
        .iter()
        .map(|gr| replica_mean(gr, replicas))
        .collect::<Result<Vec<_>>>()?;
    let u = trace_update(cfg, &state, &grads, &ce, &aux)?;
    let outs = StepOutputs::fused(&layout).results(&u.state, |s| match s {
        StepScalar::Ce => &ce,
        StepScalar::Aux => &aux,
        StepScalar::GradNorm => &u.grad_norm,
        StepScalar::Lr => &u.lr,
        StepScalar::Applied => &u.applied,
        StepScalar::StopVotes => &votes,
    });
    let donated: Vec<usize> = (0..layout.state_len()).collect();
    g.build(&outs)?
        .with_replicas(replicas)
        .with_name("train_step")
        .donate(&donated)
}

/// The first half of a step whose replicas span several processes that
/// XLA cannot connect (the CPU plugin): params[n], windows -> grads[n],
/// ce, aux ([`StepOutputs::gradient`]), each SUMMED over this program's
/// `local` replicas (identical on all of them). The caller sums across
/// processes and divides by the job's replica count before
/// [`update_step`].
pub fn gradient_step(cfg: &Config, experts: ExpertCompute, local: usize) -> Result<Function> {
    let layout = StepLayout::new(cfg);
    let g = Graph::new();
    let params = declare_params(&g, &layout.tree, "")?;
    let windows = declare_windows(&g, cfg)?;
    let (ce, aux, grads) = trace_gradients(&g, cfg, experts, &params, &windows)?;
    let grads = grads
        .iter()
        .map(|gr| replica_sum(gr, local))
        .collect::<Result<Vec<_>>>()?;
    let (ce, aux) = (replica_sum(&ce, local)?, replica_sum(&aux, local)?);
    let outs = StepOutputs::gradient(&layout).results(&grads, |s| match s {
        StepScalar::Ce => &ce,
        StepScalar::Aux => &aux,
        other => unreachable!("{other:?} is not declared for this program"),
    });
    Ok(g.build(&outs)?
        .with_replicas(local)
        .with_name("gradient_step"))
}

/// The second half: params[n], m[n], v[n], step, grads[n] (the job's mean
/// gradients), losses [ce, aux] (the job's means, for the divergence
/// guard) -> params', m', v', step + 1, then grad_norm, lr, applied
/// ([`StepOutputs::update`]). Everything
/// but the gradients and losses is donated, as in [`train_step`].
pub fn update_step(cfg: &Config, local: usize) -> Result<Function> {
    let layout = StepLayout::new(cfg);
    let g = Graph::new();
    let state = declare_state(&g, &layout.tree)?;
    let grads = declare_params(&g, &layout.tree, "grad.")?;
    let losses = g.param("losses", TensorType::new(DType::F32, &[2]))?;
    let ce = losses.slice(&[0], &[1], &[1])?.reshape(&[])?;
    let aux = losses.slice(&[1], &[2], &[1])?.reshape(&[])?;
    let u = trace_update(cfg, &state, &grads, &ce, &aux)?;
    let outs = StepOutputs::update(&layout).results(&u.state, |s| match s {
        StepScalar::GradNorm => &u.grad_norm,
        StepScalar::Lr => &u.lr,
        StepScalar::Applied => &u.applied,
        other => unreachable!("{other:?} is not declared for this program"),
    });
    let donated: Vec<usize> = (0..layout.state_len()).collect();
    g.build(&outs)?
        .with_replicas(local)
        .with_name("update_step")
        .donate(&donated)
}

/// Traces the evaluation program: params[n], windows [M, S+1] -> ce, aux
/// ([`StepOutputs::eval`]), SUMMED over the program's `local` replicas
/// (the caller divides by the job's replica count, after summing across
/// processes if there are several).
pub fn eval_step(cfg: &Config, experts: ExpertCompute, local: usize) -> Result<Function> {
    let g = Graph::new();
    let params = crate::model::declare_params(&g, &cfg.model)?;
    let windows = g.param(
        "windows",
        TensorType::new(DType::I32, &[cfg.train.micro_batch, cfg.train.seq_len + 1]),
    )?;
    let model =
        Transformer::new(&cfg.model, &params, cfg.compute_dtype())?.with_expert_compute(experts);
    let loss = model.loss(&windows)?;
    let ce = replica_sum(&loss.ce.convert(DType::F32)?, local)?;
    let aux = replica_sum(&loss.aux.convert(DType::F32)?, local)?;
    let outs = StepOutputs::eval().results(&[], |s| match s {
        StepScalar::Ce => &ce,
        StepScalar::Aux => &aux,
        other => unreachable!("{other:?} is not declared for this program"),
    });
    Ok(g.build(&outs)?.with_replicas(local).with_name("eval_step"))
}
