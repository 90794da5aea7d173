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
//! per micro-batch, S sequence length, n parameter tensors of which t are
//! trained, `train.trainable`):
//!   inputs:  params[n], adam_m[t], adam_v[t] (f32), step (i32 scalar),
//!            windows [A, N*M, S+1] (i32, split over the devices), stop
//!            [N] (f32: each device's process votes to stop after the
//!            step) -- all but the frozen params are donated
//!   outputs: the trained params'[t], adam_m'[t], adam_v'[t], step + 1
//!            (frozen parameters are read only: no gradient, no moments,
//!            not returned), then the f32
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

use crate::ckpt::shards::Group;
use crate::graph::{grad, DType, Function, Graph, Result, Sharding, Tensor, TensorType};
use crate::model::{ExpertCompute, Loss, ParamSpec, Params, Transformer};

use super::config::{Config, Objective};
use super::optimizer::{clip_by_global_norm, AdamW};
use super::schedule::Schedule;
use super::sharding::StepMesh;
use super::trainable::trainable_indices;

/// The parameters a step program takes, as a tree and in argument order,
/// and which of them it trains (`train.trainable`).
#[derive(Clone, Debug)]
pub struct StepLayout {
    pub tree: Params<ParamSpec>,
    pub specs: Vec<ParamSpec>,
    /// Positions in `specs` of the trained parameters, increasing; the
    /// others are frozen (no gradient, no moments, never written).
    pub trainable: Vec<usize>,
}

impl StepLayout {
    /// The layout of `cfg`, whose `train.trainable` was validated.
    pub fn new(cfg: &Config) -> StepLayout {
        let tree = Params::spec(&cfg.model);
        let specs: Vec<ParamSpec> = tree.leaves().into_iter().cloned().collect();
        let trainable = trainable_indices(&specs, &cfg.train.trainable)
            .expect("train.trainable is checked by Config::validate");
        StepLayout {
            tree,
            specs,
            trainable,
        }
    }

    /// Parameter tensors.
    pub fn n(&self) -> usize {
        self.specs.len()
    }

    /// Trained parameter tensors (each with two moments).
    pub fn t(&self) -> usize {
        self.trainable.len()
    }

    /// The trained parameters' specs (also the moments' shapes).
    pub fn trainable_specs(&self) -> Vec<ParamSpec> {
        self.trainable
            .iter()
            .map(|&k| self.specs[k].clone())
            .collect()
    }

    /// The state arguments: params (n), m and v (t each), step.
    pub fn state_len(&self) -> usize {
        self.n() + 2 * self.t() + 1
    }

    /// The state a step writes, in result order: the trained params, m,
    /// v, step (3t + 1 results).
    pub fn updated_len(&self) -> usize {
        3 * self.t() + 1
    }

    /// Where each updated result goes in the state arguments (also the
    /// arguments a step donates): the trained params' positions, then
    /// every moment, then the step.
    pub fn updated_positions(&self) -> Vec<usize> {
        let mut at = self.trainable.clone();
        at.extend(self.n()..self.state_len());
        at
    }

    /// What state position `pos` is to a step: a frozen parameter (the
    /// j-th), or the j-th of the updated state.
    pub fn slot(&self, pos: usize) -> Slot {
        if pos < self.n() {
            match self.trainable.binary_search(&pos) {
                Ok(j) => Slot::Updated(j),
                Err(j) => Slot::Frozen(pos - j),
            }
        } else {
            Slot::Updated(self.t() + pos - self.n())
        }
    }

    /// The state tensors of `group` as (state position, spec): every
    /// parameter, or the trained parameters' moments.
    pub fn group(&self, group: Group) -> Vec<(usize, &ParamSpec)> {
        let (n, t) = (self.n(), self.t());
        let moments = |base: usize| {
            self.trainable
                .iter()
                .enumerate()
                .map(|(j, &k)| (base + j, &self.specs[k]))
                .collect()
        };
        match group {
            Group::Params => self.specs.iter().enumerate().collect(),
            Group::AdamM => moments(n),
            Group::AdamV => moments(n + t),
        }
    }

    /// Where each parameter lies on `mesh`, in argument order.
    pub fn param_shardings(&self, mesh: &StepMesh) -> Result<Vec<Sharding>> {
        self.specs.iter().map(|s| mesh.param(s)).collect()
    }

    /// Where the trained parameters (and their gradients and moments) lie.
    pub fn trainable_shardings(&self, mesh: &StepMesh) -> Result<Vec<Sharding>> {
        self.trainable
            .iter()
            .map(|&k| mesh.param(&self.specs[k]))
            .collect()
    }

    /// Where the state lies: params, m, v like their parameters, the step
    /// counter on every device.
    pub fn state_shardings(&self, mesh: &StepMesh) -> Result<Vec<Sharding>> {
        let mut all = self.param_shardings(mesh)?;
        let moments = self.trainable_shardings(mesh)?;
        all.extend(moments.iter().cloned());
        all.extend(moments);
        all.push(mesh.replicated(0));
        Ok(all)
    }

    /// Where the updated state lies (see [`updated_positions`](Self::updated_positions)).
    pub fn updated_shardings(&self, mesh: &StepMesh) -> Result<Vec<Sharding>> {
        let state = self.state_shardings(mesh)?;
        Ok(self
            .updated_positions()
            .into_iter()
            .map(|k| state[k].clone())
            .collect())
    }
}

/// Where a state position lives between steps (see [`StepLayout::slot`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// The j-th frozen parameter: lent to every step, never donated.
    Frozen(usize),
    /// The j-th tensor of the updated state: donated and returned.
    Updated(usize),
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

/// What a program returns before its scalars.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorResults {
    None,
    /// The trained parameters' gradients (t).
    Gradients,
    /// The updated state (3t + 1, [`StepLayout::updated_positions`]).
    UpdatedState,
}

/// Where a program's results are: `tensors` results first (the updated
/// state, or the gradients), then one f32 scalar per entry of `scalars`.
/// Declared once here, used by the tracer to order the results and by the
/// trainer to read them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepOutputs {
    pub what: TensorResults,
    pub tensors: usize,
    pub scalars: &'static [StepScalar],
}

impl StepOutputs {
    /// [`train_step`]: the updated state, then ce, aux, grad_norm, lr,
    /// applied, stop votes.
    pub fn fused(layout: &StepLayout) -> StepOutputs {
        use StepScalar::*;
        StepOutputs {
            what: TensorResults::UpdatedState,
            tensors: layout.updated_len(),
            scalars: &[Ce, Aux, GradNorm, Lr, Applied, StopVotes],
        }
    }

    /// [`gradient_step`]: the trained parameters' gradients, then ce and
    /// aux.
    pub fn gradient(layout: &StepLayout) -> StepOutputs {
        StepOutputs {
            what: TensorResults::Gradients,
            tensors: layout.t(),
            scalars: &[StepScalar::Ce, StepScalar::Aux],
        }
    }

    /// [`update_step`]: the updated state, then grad_norm, lr, applied.
    pub fn update(layout: &StepLayout) -> StepOutputs {
        use StepScalar::*;
        StepOutputs {
            what: TensorResults::UpdatedState,
            tensors: layout.updated_len(),
            scalars: &[GradNorm, Lr, Applied],
        }
    }

    /// [`eval_step`]: ce and aux.
    pub fn eval() -> StepOutputs {
        StepOutputs {
            what: TensorResults::None,
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
    /// gradients, as their parameters), the scalars on every device.
    fn shardings(&self, layout: &StepLayout, mesh: &StepMesh) -> Result<Vec<Sharding>> {
        let mut all = match self.what {
            TensorResults::None => vec![],
            TensorResults::Gradients => layout.trainable_shardings(mesh)?,
            TensorResults::UpdatedState => layout.updated_shardings(mesh)?,
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

/// `train.objective` of `model` on windows [M, S+1].
fn objective_loss(cfg: &Config, model: Transformer, windows: &Tensor) -> Result<Loss> {
    match cfg.train.objective {
        Objective::Lm => model.loss(windows),
        Objective::RouterDistill => model.with_teacher_routing()?.distill_loss(windows),
    }
}

/// The step's arguments (see the module docs).
struct StepInputs {
    /// Every parameter (n).
    params: Vec<Tensor>,
    /// The trained parameters' moments (t each).
    adam_m: Vec<Tensor>,
    adam_v: Vec<Tensor>,
    step: Tensor,
}

/// The trained parameters' tensors declared as `prefix` + their names,
/// in order.
fn declare_trainable(g: &Graph, layout: &StepLayout, prefix: &str) -> Result<Vec<Tensor>> {
    layout
        .trainable_specs()
        .iter()
        .map(|s| {
            g.param(
                &format!("{prefix}{}", s.name),
                TensorType::new(DType::F32, &s.dims),
            )
        })
        .collect()
}

fn declare_state(g: &Graph, layout: &StepLayout) -> Result<StepInputs> {
    Ok(StepInputs {
        params: declare_params(g, &layout.tree, "")?,
        adam_m: declare_trainable(g, layout, "adam_m.")?,
        adam_v: declare_trainable(g, layout, "adam_v.")?,
        step: g.param("step", TensorType::scalar(DType::I32))?,
    })
}

/// (ce, aux, gradients of the trained parameters), each the mean over the
/// A micro-batches of `windows` [A, N*M, S+1] (N: the mesh's devices). Each gradient sum is
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
    let grad_shardings = layout.trainable_shardings(mesh)?;
    let trained: Vec<&Tensor> = layout.trainable.iter().map(|&k| &params[k]).collect();
    let tree = layout.tree.with_leaves(params.to_vec())?;
    let compute = cfg.compute_dtype();

    // Accumulate gradient sums over the A micro-batches.
    let zero = g.scalar(0.0, DType::F32)?;
    let mut init: Vec<Tensor> = vec![g.scalar(0.0, DType::I32)?, zero.clone(), zero.clone()];
    for p in &trained {
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
        let loss = objective_loss(cfg, model, &batch)?;
        // Frozen parameters get no gradient: the backward pass traces
        // only what reaches the trained ones.
        let grads = grad(&loss.total, &trained)?;
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

/// What the update traces: the updated state (the trained params', m',
/// v', step + 1; [`StepLayout::updated_positions`]) and the step's
/// scalars.
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
    let layout = StepLayout::new(cfg);
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
    let mut old_p = vec![];
    for (j, &k) in layout.trainable.iter().enumerate() {
        let u = adamw.update(
            &state.params[k],
            &grads[j],
            &state.adam_m[j],
            &state.adam_v[j],
            &lr,
            &count,
            layout.specs[k].decays(),
        )?;
        old_p.push(state.params[k].clone());
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
    let mut next = keep(new_p, &old_p)?;
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
    let state = declare_state(&g, &layout)?;
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
    let donated = layout.updated_positions();
    g.build(&outs)?
        .with_name("train_step")
        .donate(&donated)?
        .partitioned(&mesh.mesh, inputs, results.shardings(&layout, mesh)?)
}

/// The first half of a step whose devices span several processes that
/// XLA cannot connect (the CPU plugin), over this process's `mesh`:
/// params[n], windows -> grads[t] (trained parameters), ce, aux ([`StepOutputs::gradient`]),
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

/// The second half: params[n], m[t], v[t], step, grads[t] (the job's mean
/// gradients of the trained parameters), losses [ce, aux] (the job's
/// means, for the divergence guard) -> trained params'[t], m', v', step +
/// 1, then grad_norm, lr, applied ([`StepOutputs::update`]). The state
/// but the frozen params is donated, as in [`train_step`].
pub fn update_step(cfg: &Config, mesh: &StepMesh) -> Result<Function> {
    let layout = StepLayout::new(cfg);
    let g = Graph::new();
    let state = declare_state(&g, &layout)?;
    let grads = declare_trainable(&g, &layout, "grad.")?;
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
    inputs.extend(layout.trainable_shardings(mesh)?);
    inputs.push(mesh.replicated(1));
    let donated = layout.updated_positions();
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
    let loss = objective_loss(cfg, model, &windows)?;
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
