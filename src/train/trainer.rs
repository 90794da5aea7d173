//! Device-resident training state and one call per optimizer step.
//!
//! Parameters, both Adam moments and the step counter live on every
//! replica's device between steps and are donated to the step program, so
//! XLA updates them in place; only the batch goes up and four scalars come
//! back per step.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::ckpt::{Checkpoint, Tensors, TrainingState};
use crate::graph::{Compiled, HostTensor};
use crate::model::{init_params, ExpertCompute};
use crate::runtime::{Arg, Buffer, Client, Device, MemoryStats};

use super::config::Config;
use super::exchange::CrossProcessSum;
use super::placement::Placement;
use super::program::{
    eval_step, gradient_step, train_step, update_step, StepLayout, StepOutputs, StepScalar,
};

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

/// How the step's replicas are connected.
enum StepPrograms {
    /// Every replica of the job in one program; XLA all-reduces.
    Fused {
        program: Compiled,
        /// The stop-vote argument on each local device: [no, yes] (f32
        /// scalars 0 and 1), uploaded once and lent to every step.
        votes: [Vec<Buffer>; 2],
    },
    /// This process's replicas in two programs with a host-side sum across
    /// processes in between (CPU multi-process jobs).
    Split {
        gradient: Compiled,
        update: Compiled,
        across: Box<dyn CrossProcessSum>,
    },
}

pub struct Trainer {
    pub cfg: Config,
    client: Client,
    /// This process's replicas and their devices.
    placement: Placement,
    layout: StepLayout,
    programs: StepPrograms,
    eval_program: Compiled,
    /// Per local replica: params[n], m[n], v[n], step.
    state: Vec<Vec<Buffer>>,
    step: i64,
    seed: u64,
    /// Steps of the run whose update the divergence guard skipped.
    nonfinite_steps: i64,
    /// This process's stop vote, summed over the job inside the fused step.
    stop_vote: Option<Arc<AtomicBool>>,
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

/// A fresh state: initial parameters from `seed`, zero moments, step 0.
pub fn fresh_checkpoint(cfg: &Config, seed: u64) -> Checkpoint {
    let params: Tensors = init_params(&cfg.model, seed)
        .into_iter()
        .map(|(s, v)| (s.name, s.dims, v))
        .collect();
    let zeros: Tensors = params
        .iter()
        .map(|(n, d, v)| (n.clone(), d.clone(), vec![0.0; v.len()]))
        .collect();
    Checkpoint {
        params,
        adam_m: zeros.clone(),
        adam_v: zeros,
        state: initial_state(cfg, seed),
    }
}

/// The training state of step 0 of a run of `cfg` from `seed`: what a
/// checkpoint records besides the tensors (the data position and the
/// tokenizer's digest are filled in by the loop, the file digests when it
/// is written).
fn initial_state(cfg: &Config, seed: u64) -> TrainingState {
    let config_toml = cfg.to_toml();
    TrainingState {
        format: crate::ckpt::FORMAT,
        step: 0,
        tokens_seen: 0,
        next_batch: 0,
        data_cursors: Default::default(),
        data_shards: cfg.data.shards,
        tokenizer_sha256: None,
        seed,
        config_sha256: crate::ckpt::sha256_hex(&config_toml),
        config_toml,
        nonfinite_steps: 0,
        files: Default::default(),
    }
}

/// Takes the step program's own devices (`PJRT_LoadedExecutable_
/// AddressableDevices`, the order of its argument lists) as the devices
/// every buffer of the run is uploaded to; they must be the placement's
/// replicas' devices in replica order, or data would reach other replicas.
fn adopt_devices(placement: &mut Placement, program: &Compiled) -> Result<()> {
    let ids = |d: &[Device]| d.iter().map(|d| d.id()).collect::<Vec<_>>();
    let (theirs, ours) = (ids(program.devices()), ids(&placement.devices));
    if theirs != ours {
        bail!(
            "the compiled step runs on devices {theirs:?}, the placement of its replicas is {ours:?}: \
             the plugin ordered the program's devices otherwise"
        );
    }
    placement.devices = program.devices().to_vec();
    Ok(())
}

fn upload(client: &Client, dev: &Device, tensors: &Tensors) -> Result<Vec<Buffer>> {
    tensors
        .iter()
        .map(|(_, dims, v)| Ok(client.buffer_from_host(v, dims, dev)?))
        .collect()
}

impl Trainer {
    /// Compiles the step and eval programs and places `start` on every
    /// replica's device.
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
    /// connect: this process drives `train.replicas / across.processes()`
    /// replicas and sums gradients with the others through `across`.
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
        // One program over every replica of the job (on a multi-host client,
        // every host's chips), or, when XLA cannot connect the processes,
        // this process's share with a host-side sum between two programs.
        let (placement, programs, eval_replicas) = match across {
            None => {
                let mut placement = Placement::job(&client, total)?;
                let program = train_step(&cfg, experts)?
                    .compile_on(&client, Some(&placement.assignment))
                    .context("compiling the train step")?;
                adopt_devices(&mut placement, &program)?;
                let votes = [0f32, 1.0].map(|v| {
                    placement
                        .devices
                        .iter()
                        .map(|dev| Ok(client.buffer_from_host(&[v], &[], dev)?))
                        .collect::<Result<Vec<Buffer>>>()
                });
                let [no, yes] = votes;
                let programs = StepPrograms::Fused {
                    program,
                    votes: [no?, yes?],
                };
                (placement, programs, total)
            }
            Some(across) => {
                let processes = across.processes();
                if total % processes != 0 {
                    bail!(
                        "train.replicas = {total} is not divisible by the {processes} processes of the job"
                    );
                }
                let replicas = total / processes;
                let mut placement = Placement::local(&client, replicas).with_context(|| {
                    format!(
                        "this process drives {replicas} replicas (train.replicas = {total} over \
                         {processes} processes)"
                    )
                })?;
                let on = Some(placement.assignment.as_slice());
                let gradient = gradient_step(&cfg, experts, replicas)?
                    .compile_on(&client, on)
                    .context("compiling the gradient step")?;
                let update = update_step(&cfg, replicas)?
                    .compile_on(&client, on)
                    .context("compiling the update step")?;
                adopt_devices(&mut placement, &gradient)?;
                let programs = StepPrograms::Split {
                    gradient,
                    update,
                    across,
                };
                (placement, programs, replicas)
            }
        };
        // Programs compiled, state not uploaded yet: refuse a step that
        // cannot fit now, with XLA's figure, rather than be killed later.
        if let Some(stats) = step_memory(&programs) {
            super::memory::check_compiled_step(&cfg, &stats, &placement.devices)?;
        }
        let eval_program = eval_step(&cfg, experts, eval_replicas)?
            .compile_on(&client, Some(&placement.assignment))
            .context("compiling the eval step")?;
        let mut state = Vec::with_capacity(placement.devices.len());
        for dev in &placement.devices {
            let mut bufs = upload(&client, dev, &start.params)?;
            bufs.extend(upload(&client, dev, &start.adam_m)?);
            bufs.extend(upload(&client, dev, &start.adam_v)?);
            bufs.push(client.buffer_from_host(&[start.state.step as i32], &[], dev)?);
            state.push(bufs);
        }
        Ok(Trainer {
            cfg,
            client,
            placement,
            layout,
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
    /// step sums the votes of every replica, so that in a multi-host job
    /// all processes see [`StepMetrics::stop`] in the same step (a process
    /// stopping alone would leave the others waiting in a collective).
    pub fn set_stop_vote(&mut self, flag: Arc<AtomicBool>) {
        self.stop_vote = Some(flag);
    }

    /// Optimizer steps done so far.
    /// What XLA's buffer assignment gives the step program(s) per device.
    pub fn step_memory(&self) -> Option<MemoryStats> {
        step_memory(&self.programs)
    }

    pub fn step_count(&self) -> i64 {
        self.step
    }

    /// Sequences per replica per step: [A, M, S+1].
    fn replica_shape(&self) -> Vec<i64> {
        let t = &self.cfg.train;
        vec![self.cfg.accumulation_steps(), t.micro_batch, t.seq_len + 1]
    }

    /// Runs one optimizer step. `rows[r]` holds local replica r's share of
    /// the global batch (B/R windows of S+1 tokens, row-major).
    pub fn train_step(&mut self, rows: &[Vec<i32>]) -> Result<StepMetrics> {
        let shape = self.replica_shape();
        let per_replica: usize = shape.iter().product::<i64>() as usize;
        if rows.len() != self.state.len() || rows.iter().any(|r| r.len() != per_replica) {
            bail!(
                "batch: expected {} replicas x {per_replica} tokens",
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
        let args = std::mem::take(&mut self.state)
            .into_iter()
            .zip(windows.into_iter().zip(&votes[vote as usize]))
            .map(|(state, (w, v))| {
                let mut list: Vec<Arg> = state.into_iter().map(Arg::Donated).collect();
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

    /// The step's outputs minus the scalars become the state; one step
    /// done.
    fn keep_state(&mut self, outputs: Vec<Vec<Buffer>>, applied: bool) {
        let state = self.layout.state_len();
        self.state = outputs
            .into_iter()
            .map(|mut o| {
                o.truncate(state);
                o
            })
            .collect();
        self.step += 1;
        if !applied {
            self.nonfinite_steps += 1;
        }
    }

    /// The step as gradient program, host-side sum across processes,
    /// update program.
    fn split_step(&mut self, windows: Vec<Buffer>) -> Result<StepMetrics> {
        let StepPrograms::Split {
            gradient,
            update,
            across,
        } = &mut self.programs
        else {
            unreachable!("called for split programs only")
        };
        let n = self.layout.n();
        let args = self
            .state
            .iter()
            .zip(windows)
            .map(|(state, w)| {
                let mut list: Vec<Arg> = state[..n].iter().map(Arg::Borrowed).collect();
                list.push(Arg::Donated(w));
                list
            })
            .collect();
        let sums = gradient.execute(args)?;
        // Local replicas hold identical sums: replica 0's go to the host as
        // one flat vector in the program's result order (the gradients,
        // then ce and aux), summed with the other processes', and are
        // divided by the job's replica count for the mean.
        let mut flat: Vec<f32> = Vec::new();
        for b in &sums[0] {
            flat.extend(b.to_host::<f32>()?);
        }
        across.sum(&mut flat)?;
        let inv = 1.0 / self.cfg.train.replicas as f32;
        flat.iter_mut().for_each(|x| *x *= inv);
        let results = StepOutputs::gradient(&self.layout);
        let grad_len: usize = self
            .layout
            .specs
            .iter()
            .map(|s| s.num_elements() as usize)
            .sum();
        // Each scalar is one element after the gradients.
        let at = |s: StepScalar| grad_len + results.index(s) - results.tensors;
        let (ce, aux) = (
            flat[at(StepScalar::Ce)] as f64,
            flat[at(StepScalar::Aux)] as f64,
        );
        // The update step's `losses` argument: [ce, aux].
        let losses = [ce as f32, aux as f32];
        let mut args = Vec::with_capacity(self.state.len());
        for (state, dev) in std::mem::take(&mut self.state)
            .into_iter()
            .zip(&self.placement.devices)
        {
            let mut list: Vec<Arg> = state.into_iter().map(Arg::Donated).collect();
            let mut offset = 0;
            for spec in &self.layout.specs {
                let len = spec.dims.iter().product::<i64>() as usize;
                let g =
                    self.client
                        .buffer_from_host(&flat[offset..offset + len], &spec.dims, dev)?;
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

    /// Validation loss of one micro-batch per local replica ([M, S+1]
    /// each): (ce, aux) averaged over the job's replicas.
    pub fn eval(&mut self, rows: &[Vec<i32>]) -> Result<(f64, f64)> {
        let t = &self.cfg.train;
        let n = self.layout.n();
        let mut owned = vec![];
        if rows.len() != self.placement.devices.len() {
            bail!(
                "eval batch: {} rows for {} local replicas",
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
                s[..n]
                    .iter()
                    .chain(std::iter::once(w))
                    .map(Arg::Borrowed)
                    .collect()
            })
            .collect();
        let out = self.eval_program.execute(args)?;
        let results = StepOutputs::eval();
        let read =
            |s: StepScalar| -> Result<f32> { Ok(out[0][results.index(s)].to_host::<f32>()?[0]) };
        let mut sums = [read(StepScalar::Ce)?, read(StepScalar::Aux)?];
        if let StepPrograms::Split { across, .. } = &mut self.programs {
            across.sum(&mut sums)?;
        }
        let inv = 1.0 / self.cfg.train.replicas as f64;
        Ok((sums[0] as f64 * inv, sums[1] as f64 * inv))
    }

    /// Downloads replica 0's state (replicas hold identical copies).
    pub fn checkpoint(&self, next_batch: i64) -> Result<Checkpoint> {
        let n = self.layout.n();
        let s = &self.state[0];
        let read = |offset: usize| -> Result<Tensors> {
            self.layout
                .specs
                .iter()
                .enumerate()
                .map(|(i, spec)| {
                    Ok((
                        spec.name.clone(),
                        spec.dims.clone(),
                        s[offset + i].to_host::<f32>()?,
                    ))
                })
                .collect()
        };
        let tokens_per_step = self.cfg.train.global_batch * self.cfg.train.seq_len;
        Ok(Checkpoint {
            params: read(0)?,
            adam_m: read(n)?,
            adam_v: read(2 * n)?,
            state: TrainingState {
                step: self.step,
                tokens_seen: self.step * tokens_per_step,
                next_batch,
                nonfinite_steps: self.nonfinite_steps,
                ..initial_state(&self.cfg, self.seed)
            },
        })
    }

    /// Parameters of replica `r` as host tensors (for tests and checks).
    pub fn params_of_replica(&self, r: usize) -> Result<Vec<HostTensor>> {
        let n = self.layout.n();
        self.state[r][..n]
            .iter()
            .map(|b| Ok(HostTensor::from_buffer(b)?))
            .collect()
    }
}
