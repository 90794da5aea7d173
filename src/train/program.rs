//! The traced programs of training: the whole optimizer step as ONE
//! compiled program (or its two halves, for processes XLA cannot
//! connect), and the evaluation program. What runs them step after step is
//! [`super::trainer`] and [`super::step_loop`].
//!
//! Each is one SPMD program over the job's mesh ([`StepMesh`]): written on
//! the global shapes, with the shardings of its arguments and results
//! (`train::sharding`) and a constraint on each gradient, so that XLA's
//! partitioner splits it over the devices and inserts the collectives
//! (compiled with 1 replica x N partitions, as JAX compiles since pmap
//! went).
//!
//! Step program (N devices, A accumulation steps, M sequences per device
//! per micro-batch, S sequence length, n parameter tensors):
//!   inputs:  params[n], adam_m[n], adam_v[n] (f32), step (i32 scalar),
//!            windows [A, N*M, S+1] (i32, split over the devices), stop
//!            [N] (f32: each device's process votes to stop after the
//!            step) -- the state is donated
//!   outputs: params'[n], adam_m'[n], adam_v'[n], step + 1, then the f32
//!            scalars of [`StepOutputs::fused`]: ce, aux, grad_norm, lr
//!            (ce/aux of this step's batch before the update, averaged over
//!            the global batch), applied (1 or 0, see below), stop votes
//!            (summed over every device of the job, so that all hosts of a
//!            pod stop after the same step)
//! Reads like the recipe: accumulate gradients over A micro-batches in a
//! loop, average, clip to the global norm, AdamW with the scheduled
//! learning rate.
//!
//! The divergence guard is part of the program: when the loss, the aux
//! loss, the gradient norm or any updated parameter is not finite, the
//! update is not applied (parameters and moments come back unchanged, the
//! step counter still advances) and `applied` is 0. A NaN therefore never
//! reaches the state, and so never a checkpoint; the host decides whether
//! to stop or go on (`train.on_nonfinite`).

use crate::graph::{grad, DType, Function, Graph, Result, Sharding, Tensor, TensorType};
use crate::model::{ExpertCompute, ParamSpec, Params, Transformer};

use super::config::Config;
use super::optimizer::{clip_by_global_norm, AdamW};
use super::schedule::Schedule;
use super::sharding::StepMesh;

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

    /// Where each parameter lies on `mesh`, in argument order.
    pub fn param_shardings(&self, mesh: &StepMesh) -> Result<Vec<Sharding>> {
        self.specs.iter().map(|s| mesh.param(s)).collect()
    }

    /// Where the state lies: params, m, v like the parameters, the step
    /// counter on every device.
    pub fn state_shardings(&self, mesh: &StepMesh) -> Result<Vec<Sharding>> {
        let params = self.param_shardings(mesh)?;
        let mut all = params.clone();
        all.extend(params.iter().cloned());
        all.extend(params);
        all.push(mesh.replicated(0));
        Ok(all)
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

    /// Where the results lie: the tensors as the state (or, for the
    /// gradient program, as the parameters), the scalars on every device.
    fn shardings(&self, layout: &StepLayout, mesh: &StepMesh) -> Result<Vec<Sharding>> {
        let mut all = match self.tensors {
            0 => vec![],
            n if n == layout.n() => layout.param_shardings(mesh)?,
            _ => layout.state_shardings(mesh)?,
        };
        all.extend(self.scalars.iter().map(|_| mesh.replicated(0)));
        Ok(all)
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

/// (ce, aux, gradients), each the mean over the A micro-batches of
/// `windows` [A, N*M, S+1] (N: the mesh's devices). Each gradient sum is
/// kept where its parameter lies (`grad_shardings`), so that under fsdp
/// the partitioner reduce-scatters it rather than holding it whole.
fn trace_gradients(
    g: &Graph,
    cfg: &Config,
    experts: ExpertCompute,
    mesh: &StepMesh,
    params: &[Tensor],
    windows: &Tensor,
) -> Result<(Tensor, Tensor, Vec<Tensor>)> {
    let t = &cfg.train;
    let (a, s) = (cfg.accumulation_steps(), t.seq_len);
    let m = t.micro_batch * mesh.devices() as i64;
    let layout = StepLayout::new(cfg);
    let grad_shardings = layout.param_shardings(mesh)?;
    let tree = layout.tree.with_leaves(params.to_vec())?;
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
        let model = Transformer::new(&cfg.model, &tree, compute)?
            .with_expert_compute(experts)
            .with_moe_per_device(&mesh.mesh)?;
        let loss = model.loss(&batch)?;
        let refs: Vec<&Tensor> = params.iter().collect();
        let grads = grad(&loss.total, &refs)?;
        let mut next = vec![
            i.add_scalar(1.0)?,
            acc[0].add(&loss.ce.convert(DType::F32)?)?,
            acc[1].add(&loss.aux.convert(DType::F32)?)?,
        ];
        for ((sum, gr), on) in acc[2..].iter().zip(&grads).zip(&grad_shardings) {
            next.push(sum.add(&gr.convert(DType::F32)?.with_sharding(on)?)?);
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

/// The step's batch: [A, N*M, S+1], device d's sequences at rows
/// d*M..(d+1)*M of every micro-batch.
fn declare_windows(g: &Graph, cfg: &Config, mesh: &StepMesh) -> Result<Tensor> {
    let t = &cfg.train;
    let rows = t.micro_batch * mesh.devices() as i64;
    let shape = [cfg.accumulation_steps(), rows, t.seq_len + 1];
    g.param("windows", TensorType::new(DType::I32, &shape))
}

/// Traces the training step for `cfg` over the job's `mesh` (see the
/// module docs for the signature).
pub fn train_step(cfg: &Config, experts: ExpertCompute, mesh: &StepMesh) -> Result<Function> {
    let layout = StepLayout::new(cfg);
    let devices = mesh.devices() as i64;
    let g = Graph::new();
    let state = declare_state(&g, &layout.tree)?;
    let windows = declare_windows(&g, cfg, mesh)?;
    let stop = g.param("stop", TensorType::new(DType::F32, &[devices]))?;
    let (ce, aux, grads) = trace_gradients(&g, cfg, experts, mesh, &state.params, &windows)?;
    let votes = stop.sum_all()?;
    let u = trace_update(cfg, &state, &grads, &ce, &aux)?;
    let results = StepOutputs::fused(&layout);
    let outs = results.results(&u.state, |s| match s {
        StepScalar::Ce => &ce,
        StepScalar::Aux => &aux,
        StepScalar::GradNorm => &u.grad_norm,
        StepScalar::Lr => &u.lr,
        StepScalar::Applied => &u.applied,
        StepScalar::StopVotes => &votes,
    });
    let mut inputs = layout.state_shardings(mesh)?;
    inputs.push(mesh.batch(3, 1)?);
    inputs.push(mesh.batch(1, 0)?);
    let donated: Vec<usize> = (0..layout.state_len()).collect();
    g.build(&outs)?
        .with_name("train_step")
        .donate(&donated)?
        .partitioned(&mesh.mesh, inputs, results.shardings(&layout, mesh)?)
}

/// The first half of a step whose devices span several processes that
/// XLA cannot connect (the CPU plugin), over this process's `mesh`:
/// params[n], windows -> grads[n], ce, aux ([`StepOutputs::gradient`]),
/// each the mean over this process's batch. The caller averages them
/// across processes before [`update_step`].
pub fn gradient_step(cfg: &Config, experts: ExpertCompute, mesh: &StepMesh) -> Result<Function> {
    let layout = StepLayout::new(cfg);
    let g = Graph::new();
    let params = declare_params(&g, &layout.tree, "")?;
    let windows = declare_windows(&g, cfg, mesh)?;
    let (ce, aux, grads) = trace_gradients(&g, cfg, experts, mesh, &params, &windows)?;
    let results = StepOutputs::gradient(&layout);
    let outs = results.results(&grads, |s| match s {
        StepScalar::Ce => &ce,
        StepScalar::Aux => &aux,
        other => unreachable!("{other:?} is not declared for this program"),
    });
    let mut inputs = layout.param_shardings(mesh)?;
    inputs.push(mesh.batch(3, 1)?);
    g.build(&outs)?.with_name("gradient_step").partitioned(
        &mesh.mesh,
        inputs,
        results.shardings(&layout, mesh)?,
    )
}

/// The second half: params[n], m[n], v[n], step, grads[n] (the job's mean
/// gradients), losses [ce, aux] (the job's means, for the divergence
/// guard) -> params', m', v', step + 1, then grad_norm, lr, applied
/// ([`StepOutputs::update`]). Everything but the gradients and losses is
/// donated, as in [`train_step`].
pub fn update_step(cfg: &Config, mesh: &StepMesh) -> Result<Function> {
    let layout = StepLayout::new(cfg);
    let g = Graph::new();
    let state = declare_state(&g, &layout.tree)?;
    let grads = declare_params(&g, &layout.tree, "grad.")?;
    let losses = g.param("losses", TensorType::new(DType::F32, &[2]))?;
    let ce = losses.slice(&[0], &[1], &[1])?.reshape(&[])?;
    let aux = losses.slice(&[1], &[2], &[1])?.reshape(&[])?;
    let u = trace_update(cfg, &state, &grads, &ce, &aux)?;
    let results = StepOutputs::update(&layout);
    let outs = results.results(&u.state, |s| match s {
        StepScalar::GradNorm => &u.grad_norm,
        StepScalar::Lr => &u.lr,
        StepScalar::Applied => &u.applied,
        other => unreachable!("{other:?} is not declared for this program"),
    });
    let mut inputs = layout.state_shardings(mesh)?;
    inputs.extend(layout.param_shardings(mesh)?);
    inputs.push(mesh.replicated(1));
    let donated: Vec<usize> = (0..layout.state_len()).collect();
    g.build(&outs)?
        .with_name("update_step")
        .donate(&donated)?
        .partitioned(&mesh.mesh, inputs, results.shardings(&layout, mesh)?)
}

/// Traces the evaluation program over `mesh`: params[n], windows [N*M,
/// S+1] (split over the devices) -> ce, aux ([`StepOutputs::eval`]), the
/// means over the batch.
pub fn eval_step(cfg: &Config, experts: ExpertCompute, mesh: &StepMesh) -> Result<Function> {
    let layout = StepLayout::new(cfg);
    let g = Graph::new();
    let params = layout.tree.declare(&g, "")?;
    let rows = cfg.train.micro_batch * mesh.devices() as i64;
    let windows = g.param(
        "windows",
        TensorType::new(DType::I32, &[rows, cfg.train.seq_len + 1]),
    )?;
    let model = Transformer::new(&cfg.model, &params, cfg.compute_dtype())?
        .with_expert_compute(experts)
        .with_moe_per_device(&mesh.mesh)?;
    let loss = model.loss(&windows)?;
    let ce = loss.ce.convert(DType::F32)?;
    let aux = loss.aux.convert(DType::F32)?;
    let results = StepOutputs::eval();
    let outs = results.results(&[], |s| match s {
        StepScalar::Ce => &ce,
        StepScalar::Aux => &aux,
        other => unreachable!("{other:?} is not declared for this program"),
    });
    let mut inputs = layout.param_shardings(mesh)?;
    inputs.push(mesh.batch(2, 0)?);
    g.build(&outs)?.with_name("eval_step").partitioned(
        &mesh.mesh,
        inputs,
        results.shardings(&layout, mesh)?,
    )
}
