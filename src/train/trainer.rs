//! Device-resident training state and one call per optimizer step.
//!
//! Parameters, both Adam moments and the step counter live on the devices
//! between steps, each device holding its block of each tensor as the
//! mesh says (`train::sharding`: whole copies under `data`, shards under
//! `fsdp`), and are donated to the step program, so XLA updates them in
//! place; only each device's sequences go up and a few scalars come back
//! per step. Checkpoints are whole tensors, so a run resumes on any mesh.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::ckpt::shards::{Group, Shard, ShardIndex};
use crate::ckpt::{Checkpoint, Tensors, TrainingState};
use crate::graph::{place_shard, shard_of, Compiled, DType, HostTensor, Sharding, TensorType};
use crate::model::{init_params, ExpertCompute};
use crate::runtime::{Arg, Buffer, Client, Device, MemoryStats};

use super::config::Config;
use super::exchange::CrossProcessSum;
use super::placement::Placement;
use super::program::{
    eval_step, gradient_step, train_step, update_step, Slot, StepLayout, StepOutputs, StepScalar,
};
use super::sharding::StepMesh;

/// What one step reports (SPEC "loss" = cross-entropy).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepMetrics {
    pub ce: f64,
    pub aux: f64,
    pub grad_norm: f64,
    pub lr: f64,
    /// The step's update was applied; false when the divergence guard kept
    /// the state because the loss, a gradient or an updated parameter was
    /// not finite (see `train::program`).
    pub applied: bool,
    /// Some process of the job voted to stop after this step (see
    /// [`Trainer::set_stop_vote`]); every process sees the same answer.
    pub stop: bool,
}

/// How the step's devices are connected.
enum StepPrograms {
    /// Every device of the job in one program; XLA inserts the
    /// collectives.
    Fused {
        program: Compiled,
        /// Each local device's block of the stop-vote argument: [no, yes]
        /// (f32 [1] holding 0 or 1), uploaded once and lent to every step.
        votes: [Vec<Buffer>; 2],
    },
    /// This process's devices in two programs with a host-side sum across
    /// processes in between (CPU multi-process jobs: the data axis spans
    /// the processes, each runs its share of the mesh).
    Split {
        gradient: Compiled,
        update: Compiled,
        across: Box<dyn CrossProcessSum>,
    },
}

pub struct Trainer {
    pub cfg: Config,
    client: Client,
    /// This process's devices and their places in the programs' mesh
    /// (`placement.local`).
    placement: Placement,
    layout: StepLayout,
    /// The mesh the programs are partitioned over: the job's, or for the
    /// split step this process's share.
    mesh: StepMesh,
    /// Where each state tensor lies on `mesh` (params, m, v, step).
    state_shardings: Vec<Sharding>,
    programs: StepPrograms,
    eval_program: Compiled,
    /// Per local device: its blocks of the state.
    state: Vec<DeviceState>,
    step: i64,
    seed: u64,
    /// Steps of the run whose update the divergence guard skipped.
    nonfinite_steps: i64,
    /// This process's stop vote, summed over the job inside the fused step.
    stop_vote: Option<Arc<AtomicBool>>,
}

/// One device's blocks of the state (params[n], m[t], v[t], step), split
/// by what a step does with them.
struct DeviceState {
    /// The frozen parameters, in order: lent to every step.
    frozen: Vec<Buffer>,
    /// The trained parameters, m, v and the step, in the step's result
    /// order ([`StepLayout::updated_positions`]): donated and replaced.
    updated: Vec<Buffer>,
}

impl DeviceState {
    /// Splits the device's blocks in state order.
    fn new(layout: &StepLayout, state: Vec<Buffer>) -> DeviceState {
        let (mut frozen, mut updated) = (vec![], vec![]);
        for (pos, b) in state.into_iter().enumerate() {
            match layout.slot(pos) {
                Slot::Frozen(_) => frozen.push(b),
                Slot::Updated(_) => updated.push(b),
            }
        }
        DeviceState { frozen, updated }
    }

    /// The block at state position `pos`.
    fn at(&self, layout: &StepLayout, pos: usize) -> &Buffer {
        match layout.slot(pos) {
            Slot::Frozen(j) => &self.frozen[j],
            Slot::Updated(j) => &self.updated[j],
        }
    }

    /// Every parameter, lent (eval, the gradient program).
    fn params<'a>(&'a self, layout: &StepLayout) -> Vec<Arg<'a>> {
        (0..layout.n())
            .map(|pos| Arg::Borrowed(self.at(layout, pos)))
            .collect()
    }

    /// The whole state as a step's arguments: the frozen parameters lent,
    /// the rest donated; `updated` are this device's updated buffers.
    fn step_args<'a>(
        frozen: &'a [Buffer],
        updated: Vec<Buffer>,
        layout: &StepLayout,
    ) -> Vec<Arg<'a>> {
        let (mut f, mut u) = (frozen.iter(), updated.into_iter());
        (0..layout.state_len())
            .map(|pos| match layout.slot(pos) {
                Slot::Frozen(_) => Arg::Borrowed(f.next().expect("one per frozen slot")),
                Slot::Updated(_) => Arg::Donated(u.next().expect("one per updated slot")),
            })
            .collect()
    }
}

/// Per device, what XLA's buffer assignment gives the step: the fused
/// program's, or for the split step (two programs run one after the other)
/// the update program's arguments and outputs (the whole state and the
/// gradients), the larger of the two programs' temporaries, and both
/// programs' code.
fn step_memory(programs: &StepPrograms) -> Option<MemoryStats> {
    match programs {
        StepPrograms::Fused { program, .. } => program.executable().memory_stats(),
        StepPrograms::Split {
            gradient, update, ..
        } => {
            let (g, u) = (
                gradient.executable().memory_stats()?,
                update.executable().memory_stats()?,
            );
            Some(MemoryStats {
                temporaries: g.temporaries.max(u.temporaries),
                generated_code: g.generated_code + u.generated_code,
                ..u
            })
        }
    }
}

/// A device scalar (f32) as f64.
fn scalar(b: &Buffer) -> Result<f64> {
    Ok(b.to_host::<f32>()?[0] as f64)
}

/// A fresh state: initial parameters from `seed`, zero moments for the
/// trained ones, step 0.
pub fn fresh_checkpoint(cfg: &Config, seed: u64) -> Checkpoint {
    let params: Tensors = init_params(&cfg.model, seed)
        .into_iter()
        .map(|(s, v)| (s.name, s.dims, v))
        .collect();
    let zeros = zero_moments(&StepLayout::new(cfg));
    Checkpoint {
        params,
        adam_m: zeros.clone(),
        adam_v: zeros,
        state: initial_state(cfg, seed),
    }
}

/// Moments of zero for the trained parameters of `layout`.
fn zero_moments(layout: &StepLayout) -> Tensors {
    layout
        .trainable_specs()
        .into_iter()
        .map(|s| {
            let len = s.dims.iter().product::<i64>() as usize;
            (s.name, s.dims, vec![0.0; len])
        })
        .collect()
}

/// The moments of `start` that `layout` trains with, in its order. A
/// checkpoint of weights only (no optimizer file) starts them at zero;
/// one with moments must hold exactly the trained parameters' (a
/// checkpoint whose run trained other tensors cannot continue this one).
fn moments_for(layout: &StepLayout, start: &Checkpoint) -> Result<(Tensors, Tensors)> {
    if start.adam_m.is_empty() && start.adam_v.is_empty() {
        let zeros = zero_moments(layout);
        return Ok((zeros.clone(), zeros));
    }
    let want: Vec<&str> = layout
        .group(Group::AdamM)
        .iter()
        .map(|(_, s)| s.name.as_str())
        .collect();
    for (what, set) in [("adam_m", &start.adam_m), ("adam_v", &start.adam_v)] {
        let have: Vec<&str> = set.iter().map(|(n, _, _)| n.as_str()).collect();
        if have != want {
            let extra: Vec<&&str> = have.iter().filter(|n| !want.contains(n)).collect();
            let missing: Vec<&&str> = want.iter().filter(|n| !have.contains(n)).collect();
            bail!(
                "the checkpoint's {what} moments are for other tensors than train.trainable                  selects (in the checkpoint only: {extra:?}; trained but without moments:                  {missing:?}); start a new run from its weights with --init"
            );
        }
    }
    Ok((start.adam_m.clone(), start.adam_v.clone()))
}

/// The training state of step 0 of a run of `cfg` from `seed`: what a
/// checkpoint records besides the tensors (the data position and the
/// tokenizer's digest are filled in by the loop, the file digests when it
/// is written).
pub(crate) fn initial_state(cfg: &Config, seed: u64) -> TrainingState {
    TrainingState::fresh(cfg.to_toml(), cfg.data.shards, seed)
}

/// Takes the step program's own devices (`PJRT_LoadedExecutable_
/// AddressableDevices`, the order of its argument lists) as the devices
/// every buffer of the run is uploaded to; they must be the placement's
/// devices in mesh order, or blocks would reach the wrong devices.
fn adopt_devices(placement: &mut Placement, program: &Compiled) -> Result<()> {
    let ids = |d: &[Device]| d.iter().map(|d| d.id()).collect::<Vec<_>>();
    let (theirs, ours) = (ids(program.devices()), ids(&placement.devices));
    if theirs != ours {
        bail!(
            "the compiled step runs on devices {theirs:?}, the placement of its mesh is {ours:?}: \
             the plugin ordered the program's devices otherwise"
        );
    }
    placement.devices = program.devices().to_vec();
    Ok(())
}

/// Each local device's blocks of the state of `start` (params, the
/// trained ones' m and v, then the step counter), device i being the
/// mesh's device `first + i`.
fn upload_state(
    client: &Client,
    devices: &[Device],
    first: usize,
    layout: &StepLayout,
    shardings: &[Sharding],
    start: &Checkpoint,
) -> Result<Vec<DeviceState>> {
    let (adam_m, adam_v) = moments_for(layout, start)?;
    let tensors: Vec<_> = start.params.iter().chain(&adam_m).chain(&adam_v).collect();
    devices
        .iter()
        .enumerate()
        .map(|(i, dev)| {
            let mut bufs = tensors
                .iter()
                .zip(shardings)
                .map(|((name, dims, v), on)| {
                    let block = on.shard_dims(dims)?;
                    let part = shard_of(on, dims, v, first + i)
                        .with_context(|| format!("the block of `{name}` for device {i}"))?;
                    Ok(client.buffer_from_host(&part, &block, dev)?)
                })
                .collect::<Result<Vec<Buffer>>>()?;
            bufs.push(client.buffer_from_host(&[start.state.step as i32], &[], dev)?);
            Ok(DeviceState::new(layout, bufs))
        })
        .collect()
}

/// Assembles one whole tensor (`name`, `dims`, lying as `on`) from the
/// local devices' blocks: `block(i)` is local device i's (the mesh's
/// device `first + i`), each block read once, from the first local device
/// that holds it. Fails when the local devices do not hold every block (a
/// process of a multi-host job holds only its share).
fn gather(
    (name, dims): (&str, &[i64]),
    on: &Sharding,
    first: usize,
    devices: usize,
    block: impl Fn(usize) -> Result<Vec<f32>>,
) -> Result<Vec<f32>> {
    let len: i64 = dims.iter().product();
    let mut full = vec![0f32; len as usize];
    let block_len: i64 = on.shard_dims(dims)?.iter().product();
    let mut seen = Vec::new();
    for i in 0..devices {
        let at = on.shard_offsets(dims, first + i)?;
        if seen.contains(&at) {
            continue;
        }
        place_shard(on, dims, &block(i)?, first + i, &mut full)?;
        seen.push(at);
    }
    if seen.len() as i64 * block_len != len {
        bail!(
            "`{name}`: this process's {devices} devices hold {} of its {} blocks",
            seen.len(),
            len / block_len
        );
    }
    Ok(full)
}

/// The block at `offsets` of a tensor of `dims` under `on`, as a
/// checkpoint shard names it: its place along the one split dimension.
fn shard_index(on: &Sharding, dims: &[i64], offsets: &[i64]) -> Result<ShardIndex> {
    let block = on.shard_dims(dims)?;
    let split: Vec<usize> = on
        .tiles()
        .iter()
        .enumerate()
        .filter(|&(_, &t)| t > 1)
        .map(|(d, _)| d)
        .collect();
    match split[..] {
        [] => Ok(ShardIndex::whole()),
        [dim] => Ok(ShardIndex {
            dim,
            index: (offsets[dim] / block[dim]) as usize,
            parts: on.tiles()[dim],
        }),
        _ => bail!(
            "split along several dimensions ({split:?}): a checkpoint shard is split along one"
        ),
    }
}

impl Trainer {
    /// Compiles the step and eval programs over the job's mesh and places
    /// each device's blocks of `start` on it.
    pub fn new(cfg: Config, client: Client, start: &Checkpoint) -> Result<Trainer> {
        let experts = ExpertCompute::Routed {
            block: cfg.model.moe_block_size,
        };
        Trainer::with_experts(cfg, client, start, experts)
    }

    /// Like [`new`](Self::new) with a chosen expert evaluation (benchmarks).
    pub fn with_experts(
        cfg: Config,
        client: Client,
        start: &Checkpoint,
        experts: ExpertCompute,
    ) -> Result<Trainer> {
        Trainer::build(cfg, client, start, experts, None)
    }

    /// A trainer for one of several processes whose devices XLA cannot
    /// connect: this process runs its share of the mesh (`mesh.data /
    /// across.processes()` x `mesh.fsdp` devices) and averages gradients
    /// with the others through `across`.
    pub fn across_processes(
        cfg: Config,
        client: Client,
        start: &Checkpoint,
        across: Box<dyn CrossProcessSum>,
    ) -> Result<Trainer> {
        let experts = ExpertCompute::Routed {
            block: cfg.model.moe_block_size,
        };
        Trainer::build(cfg, client, start, experts, Some(across))
    }

    fn build(
        cfg: Config,
        client: Client,
        start: &Checkpoint,
        experts: ExpertCompute,
        across: Option<Box<dyn CrossProcessSum>>,
    ) -> Result<Trainer> {
        let total = cfg.train.replicas as usize;
        let layout = StepLayout::new(&cfg);
        let job_mesh = StepMesh::of(&cfg)?;
        // One program over every device of the job (on a multi-host
        // client, every host's chips), or, when XLA cannot connect the
        // processes, this process's share of the data axis with a host-side
        // sum between two programs.
        let (placement, mesh, programs) = match across {
            None => {
                let mut placement = Placement::job(&client, total)?;
                let program = train_step(&cfg, experts, &job_mesh)?
                    .compile_on(&client, Some(&placement.assignment))
                    .context("compiling the train step")?;
                adopt_devices(&mut placement, &program)?;
                let votes = [0f32, 1.0].map(|v| {
                    placement
                        .devices
                        .iter()
                        .map(|dev| Ok(client.buffer_from_host(&[v], &[1], dev)?))
                        .collect::<Result<Vec<Buffer>>>()
                });
                let [no, yes] = votes;
                let programs = StepPrograms::Fused {
                    program,
                    votes: [no?, yes?],
                };
                (placement, job_mesh, programs)
            }
            Some(across) => {
                let processes = across.processes();
                let (data, fsdp) = (job_mesh.data, job_mesh.fsdp);
                if data % processes != 0 {
                    bail!(
                        "mesh.data = {data} is not divisible by the {processes} processes of the job \
                         (their devices are connected through the host, along the data axis)"
                    );
                }
                let mesh = StepMesh::new(data / processes, fsdp)?;
                let devices = mesh.devices();
                let mut placement = Placement::local(&client, devices).with_context(|| {
                    format!(
                        "this process drives {devices} devices (mesh.data = {data} over \
                         {processes} processes, mesh.fsdp = {fsdp})"
                    )
                })?;
                let on = Some(placement.assignment.as_slice());
                let gradient = gradient_step(&cfg, experts, &mesh)?
                    .compile_on(&client, on)
                    .context("compiling the gradient step")?;
                let update = update_step(&cfg, &mesh)?
                    .compile_on(&client, on)
                    .context("compiling the update step")?;
                adopt_devices(&mut placement, &gradient)?;
                let programs = StepPrograms::Split {
                    gradient,
                    update,
                    across,
                };
                (placement, mesh, programs)
            }
        };
        // Programs compiled, state not uploaded yet: refuse a step that
        // cannot fit now, with XLA's figure, rather than be killed later.
        if let Some(stats) = step_memory(&programs) {
            super::memory::check_compiled_step(&cfg, &stats, &placement.devices)?;
        }
        let eval_program = eval_step(&cfg, experts, &mesh)?
            .compile_on(&client, Some(&placement.assignment))
            .context("compiling the eval step")?;
        let state_shardings = layout.state_shardings(&mesh)?;
        let first = placement.local.start;
        let state = upload_state(
            &client,
            &placement.devices,
            first,
            &layout,
            &state_shardings,
            start,
        )?;
        Ok(Trainer {
            cfg,
            client,
            placement,
            layout,
            mesh,
            state_shardings,
            programs,
            eval_program,
            state,
            step: start.state.step,
            seed: start.state.seed,
            nonfinite_steps: start.state.nonfinite_steps,
            stop_vote: None,
        })
    }

    /// Votes to stop after the current step while `flag` is set: the fused
    /// step sums the votes of every device, so that in a multi-host job
    /// all processes see [`StepMetrics::stop`] in the same step (a process
    /// stopping alone would leave the others waiting in a collective).
    pub fn set_stop_vote(&mut self, flag: Arc<AtomicBool>) {
        self.stop_vote = Some(flag);
    }

    /// What XLA's buffer assignment gives the step program(s) per device.
    pub fn step_memory(&self) -> Option<MemoryStats> {
        step_memory(&self.programs)
    }

    /// Optimizer steps done so far.
    pub fn step_count(&self) -> i64 {
        self.step
    }

    /// The mesh the step runs over (this process's share for a split
    /// step).
    pub fn mesh(&self) -> &StepMesh {
        &self.mesh
    }

    /// Sequences of one device per step: [A, M, S+1].
    fn device_shape(&self) -> Vec<i64> {
        let t = &self.cfg.train;
        vec![self.cfg.accumulation_steps(), t.micro_batch, t.seq_len + 1]
    }

    /// Runs one optimizer step. `rows[i]` holds local device i's share of
    /// the global batch (its B/N windows of S+1 tokens, row-major [A, M,
    /// S+1]).
    pub fn train_step(&mut self, rows: &[Vec<i32>]) -> Result<StepMetrics> {
        let shape = self.device_shape();
        let per_device: usize = shape.iter().product::<i64>() as usize;
        if rows.len() != self.state.len() || rows.iter().any(|r| r.len() != per_device) {
            bail!(
                "batch: expected {} devices x {per_device} tokens",
                self.state.len()
            );
        }
        let windows = rows
            .iter()
            .zip(&self.placement.devices)
            .map(|(r, dev)| Ok(self.client.buffer_from_host(r, &shape, dev)?))
            .collect::<Result<Vec<Buffer>>>()?;
        if matches!(self.programs, StepPrograms::Split { .. }) {
            return self.split_step(windows);
        }
        let StepPrograms::Fused { program, votes } = &self.programs else {
            unreachable!("checked above")
        };
        let vote = self
            .stop_vote
            .as_ref()
            .is_some_and(|f| f.load(Ordering::Relaxed));
        let updated: Vec<Vec<Buffer>> = self
            .state
            .iter_mut()
            .map(|d| std::mem::take(&mut d.updated))
            .collect();
        let args = self
            .state
            .iter()
            .zip(updated)
            .zip(windows.into_iter().zip(&votes[vote as usize]))
            .map(|((d, updated), (w, v))| {
                let mut list = DeviceState::step_args(&d.frozen, updated, &self.layout);
                list.push(Arg::Donated(w));
                list.push(Arg::Borrowed(v));
                list
            })
            .collect();
        let outputs = program.execute(args)?;
        let layout = StepOutputs::fused(&self.layout);
        let read = |s: StepScalar| scalar(&outputs[0][layout.index(s)]);
        let metrics = StepMetrics {
            ce: read(StepScalar::Ce)?,
            aux: read(StepScalar::Aux)?,
            grad_norm: read(StepScalar::GradNorm)?,
            lr: read(StepScalar::Lr)?,
            applied: read(StepScalar::Applied)? > 0.0,
            stop: read(StepScalar::StopVotes)? > 0.0,
        };
        self.keep_state(outputs, metrics.applied);
        Ok(metrics)
    }

    /// Steps of the run whose update was skipped as non-finite.
    pub fn nonfinite_steps(&self) -> i64 {
        self.nonfinite_steps
    }

    /// The step's outputs minus the scalars become the updated state; one
    /// step done.
    fn keep_state(&mut self, outputs: Vec<Vec<Buffer>>, applied: bool) {
        let updated = self.layout.updated_len();
        for (d, mut o) in self.state.iter_mut().zip(outputs) {
            o.truncate(updated);
            d.updated = o;
        }
        self.step += 1;
        if !applied {
            self.nonfinite_steps += 1;
        }
    }

    /// The trained parameters' names and whole dims, in order (the
    /// gradients').
    fn trained_dims(&self) -> Vec<(String, Vec<i64>)> {
        self.layout
            .trainable_specs()
            .into_iter()
            .map(|s| (s.name, s.dims))
            .collect()
    }

    /// The step as gradient program, host-side mean across processes,
    /// update program.
    fn split_step(&mut self, windows: Vec<Buffer>) -> Result<StepMetrics> {
        let specs = self.trained_dims();
        let grad_shardings = self.layout.trainable_shardings(&self.mesh)?;
        let args = self
            .state
            .iter()
            .zip(windows)
            .map(|(state, w)| {
                let mut list = state.params(&self.layout);
                list.push(Arg::Donated(w));
                list
            })
            .collect();
        let StepPrograms::Split {
            gradient,
            update,
            across,
        } = &mut self.programs
        else {
            unreachable!("called for split programs only")
        };
        let means = gradient.execute(args)?;
        // This process's mean gradients, whole, then ce and aux (on every
        // device alike), as one flat vector summed with the other
        // processes' and divided by their count: the job's means.
        let first = self.placement.local.start;
        let mut flat: Vec<f32> = Vec::new();
        for (k, (name, dims)) in specs.iter().enumerate() {
            let on = &grad_shardings[k];
            let whole = gather((name, dims), on, first, means.len(), |i| {
                Ok(means[i][k].to_host::<f32>()?)
            })?;
            flat.extend(whole);
        }
        let results = StepOutputs::gradient(&self.layout);
        let grad_len = flat.len();
        for s in results.scalars {
            flat.push(means[0][results.index(*s)].to_host::<f32>()?[0]);
        }
        across.sum(&mut flat)?;
        let inv = 1.0 / across.processes() as f32;
        flat.iter_mut().for_each(|x| *x *= inv);
        // Each scalar is one element after the gradients.
        let at = |s: StepScalar| grad_len + results.index(s) - results.tensors;
        let (ce, aux) = (
            flat[at(StepScalar::Ce)] as f64,
            flat[at(StepScalar::Aux)] as f64,
        );
        // The update step's `losses` argument: [ce, aux].
        let losses = [ce as f32, aux as f32];
        let mut args = Vec::with_capacity(self.state.len());
        let updated: Vec<Vec<Buffer>> = self
            .state
            .iter_mut()
            .map(|d| std::mem::take(&mut d.updated))
            .collect();
        for (i, ((state, updated), dev)) in self
            .state
            .iter()
            .zip(updated)
            .zip(&self.placement.devices)
            .enumerate()
        {
            let mut list = DeviceState::step_args(&state.frozen, updated, &self.layout);
            let mut offset = 0;
            for ((_, dims), on) in specs.iter().zip(&grad_shardings) {
                let len = dims.iter().product::<i64>() as usize;
                let block = on.shard_dims(dims)?;
                let part = shard_of(on, dims, &flat[offset..offset + len], first + i)?;
                let g = self.client.buffer_from_host(&part, &block, dev)?;
                list.push(Arg::Donated(g));
                offset += len;
            }
            list.push(Arg::Donated(self.client.buffer_from_host(
                &losses,
                &[2],
                dev,
            )?));
            args.push(list);
        }
        let outputs = update.execute(args)?;
        let layout = StepOutputs::update(&self.layout);
        let read = |s: StepScalar| scalar(&outputs[0][layout.index(s)]);
        let metrics = StepMetrics {
            ce,
            aux,
            grad_norm: read(StepScalar::GradNorm)?,
            lr: read(StepScalar::Lr)?,
            applied: read(StepScalar::Applied)? > 0.0,
            // The host sum carried the votes (`CrossProcessSum`).
            stop: false,
        };
        self.keep_state(outputs, metrics.applied);
        Ok(metrics)
    }

    /// Validation loss of one micro-batch per local device ([M, S+1]
    /// each): (ce, aux) averaged over the job's devices.
    pub fn eval(&mut self, rows: &[Vec<i32>]) -> Result<(f64, f64)> {
        let t = &self.cfg.train;
        let mut owned = vec![];
        if rows.len() != self.placement.devices.len() {
            bail!(
                "eval batch: {} rows for {} local devices",
                rows.len(),
                self.placement.devices.len()
            );
        }
        for (row, dev) in rows.iter().zip(&self.placement.devices) {
            owned.push(
                self.client
                    .buffer_from_host(row, &[t.micro_batch, t.seq_len + 1], dev)?,
            );
        }
        let args: Vec<Vec<Arg>> = self
            .state
            .iter()
            .zip(&owned)
            .map(|(s, w)| {
                let mut list = s.params(&self.layout);
                list.push(Arg::Borrowed(w));
                list
            })
            .collect();
        let out = self.eval_program.execute(args)?;
        let results = StepOutputs::eval();
        let read =
            |s: StepScalar| -> Result<f32> { Ok(out[0][results.index(s)].to_host::<f32>()?[0]) };
        let mut means = [read(StepScalar::Ce)?, read(StepScalar::Aux)?];
        if let StepPrograms::Split { across, .. } = &mut self.programs {
            across.sum(&mut means)?;
            let inv = 1.0 / across.processes() as f32;
            means.iter_mut().for_each(|x| *x *= inv);
        }
        Ok((means[0] as f64, means[1] as f64))
    }

    /// The whole state, read from this process's devices (each block once).
    pub fn checkpoint(&self, next_batch: i64) -> Result<Checkpoint> {
        Ok(Checkpoint {
            params: self.read_group(Group::Params)?,
            adam_m: self.read_group(Group::AdamM)?,
            adam_v: self.read_group(Group::AdamV)?,
            state: self.training_state(next_batch),
        })
    }

    /// State tensor `at` (a state position), whole, from this process's
    /// devices.
    fn read_whole(&self, at: usize, name: &str, dims: &[i64]) -> Result<Vec<f32>> {
        let first = self.placement.local.start;
        gather(
            (name, dims),
            &self.state_shardings[at],
            first,
            self.state.len(),
            |i| Ok(self.state[i].at(&self.layout, at).to_host::<f32>()?),
        )
    }

    /// One of the state's tensor sets, whole, from this process's devices.
    fn read_group(&self, group: Group) -> Result<Tensors> {
        self.layout
            .group(group)
            .into_iter()
            .map(|(at, s)| {
                let whole = self.read_whole(at, &s.name, &s.dims)?;
                Ok((s.name.clone(), s.dims.clone(), whole))
            })
            .collect()
    }

    /// What a checkpoint of the step reached records besides the tensors
    /// (the data position and the tokenizer's digest are the caller's).
    pub fn training_state(&self, next_batch: i64) -> TrainingState {
        let tokens_per_step = self.cfg.train.global_batch * self.cfg.train.seq_len;
        TrainingState {
            step: self.step,
            tokens_seen: self.step * tokens_per_step,
            next_batch,
            nonfinite_steps: self.nonfinite_steps,
            ..initial_state(&self.cfg, self.seed)
        }
    }

    /// The blocks of the state that this process, rank `rank` of `ranks`,
    /// sends the coordinator for a checkpoint of the job; the ranks' shares
    /// make up the whole state once. Only local devices are read.
    /// - One program over the job's mesh (TPU, GPU): each block goes from
    ///   the first device of the mesh that holds it, so a block copied
    ///   over the data axis is sent once, by the process of that device.
    /// - Processes joined by the host (CPU): each holds the whole state;
    ///   tensor i (params, then m, then v) goes from rank i % ranks.
    pub fn owned_shards(&self, rank: usize, ranks: usize) -> Result<Vec<Shard>> {
        let joined_by_host = matches!(self.programs, StepPrograms::Split { .. });
        let first = self.placement.local.start;
        let mut out = vec![];
        for group in Group::ALL {
            for (at, spec) in self.layout.group(group) {
                let (name, dims) = (spec.name.clone(), spec.dims.clone());
                let shard = |index, values| Shard {
                    group,
                    name: name.clone(),
                    index,
                    values,
                };
                if joined_by_host {
                    if at % ranks == rank {
                        out.push(shard(
                            ShardIndex::whole(),
                            self.read_whole(at, &name, &dims)?,
                        ));
                    }
                    continue;
                }
                let on = &self.state_shardings[at];
                for i in (0..self.state.len()).filter(|&i| on.copy_index(first + i) == 0) {
                    let offsets = on.shard_offsets(&dims, first + i)?;
                    let index =
                        shard_index(on, &dims, &offsets).with_context(|| format!("`{name}`"))?;
                    out.push(shard(
                        index,
                        self.state[i].at(&self.layout, at).to_host::<f32>()?,
                    ));
                }
            }
        }
        Ok(out)
    }

    /// The parameters, whole, as host tensors (for tests and checks).
    pub fn params(&self) -> Result<Vec<HostTensor>> {
        self.read_group(Group::Params)?
            .into_iter()
            .map(|(_, dims, v)| {
                let values: Vec<f64> = v.iter().map(|&x| x as f64).collect();
                Ok(HostTensor::from_f64(
                    &values,
                    TensorType::new(DType::F32, &dims),
                )?)
            })
            .collect()
    }

    /// Bytes of each local device's blocks of the parameters and both
    /// Adam moments, as the devices report them.
    pub fn state_bytes_per_device(&self) -> Result<Vec<usize>> {
        let tensors = self.layout.state_len() - 1;
        self.state
            .iter()
            .map(|d| {
                (0..tensors)
                    .map(|at| Ok(d.at(&self.layout, at).on_device_size()?))
                    .sum::<Result<usize>>()
            })
            .collect()
    }
}
