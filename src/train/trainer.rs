//! Device-resident training state and one call per optimizer step.
//!
//! Parameters, both Adam moments and the step counter live on every
//! replica's device between steps and are donated to the step program, so
//! XLA updates them in place; only the batch goes up and four scalars come
//! back per step.

use anyhow::{bail, Context, Result};

use crate::ckpt::{Checkpoint, Tensors, TrainingState};
use crate::graph::{Compiled, HostTensor};
use crate::model::{init_params, ExpertCompute};
use crate::runtime::{Arg, Buffer, Client};

use super::config::Config;
use super::step::{eval_step, train_step, StepLayout};

/// What one step reports (SPEC "loss" = cross-entropy).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepMetrics {
    pub ce: f64,
    pub aux: f64,
    pub grad_norm: f64,
    pub lr: f64,
}

pub struct Trainer {
    pub cfg: Config,
    client: Client,
    layout: StepLayout,
    step_program: Compiled,
    eval_program: Compiled,
    /// Per replica: params[n], m[n], v[n], step.
    state: Vec<Vec<Buffer>>,
    step: i64,
    seed: u64,
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
    let config_toml = cfg.to_toml();
    Checkpoint {
        params,
        adam_m: zeros.clone(),
        adam_v: zeros,
        state: TrainingState {
            format: 1,
            step: 0,
            tokens_seen: 0,
            next_batch: 0,
            data_cursor: None,
            tokenizer_sha256: None,
            seed,
            config_sha256: crate::ckpt::sha256_hex(&config_toml),
            config_toml,
        },
    }
}

fn upload(client: &Client, device: usize, tensors: &Tensors) -> Result<Vec<Buffer>> {
    let dev = &client.devices()[device];
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
        let replicas = cfg.train.replicas as usize;
        if client.devices().len() < replicas {
            bail!(
                "train.replicas = {replicas} but the client has {} devices",
                client.devices().len()
            );
        }
        let layout = StepLayout::new(&cfg);
        let step_program = train_step(&cfg, experts)?
            .compile(&client)
            .context("compiling the train step")?;
        let eval_program = eval_step(&cfg, experts)?
            .compile(&client)
            .context("compiling the eval step")?;
        let mut state = Vec::with_capacity(replicas);
        for r in 0..replicas {
            let mut bufs = upload(&client, r, &start.params)?;
            bufs.extend(upload(&client, r, &start.adam_m)?);
            bufs.extend(upload(&client, r, &start.adam_v)?);
            bufs.push(client.buffer_from_host(
                &[start.state.step as i32],
                &[],
                &client.devices()[r],
            )?);
            state.push(bufs);
        }
        Ok(Trainer {
            cfg,
            client,
            layout,
            step_program,
            eval_program,
            state,
            step: start.state.step,
            seed: start.state.seed,
        })
    }

    /// Optimizer steps done so far.
    pub fn step_count(&self) -> i64 {
        self.step
    }

    /// Sequences per replica per step: [A, M, S+1].
    fn replica_shape(&self) -> Vec<i64> {
        let t = &self.cfg.train;
        vec![self.cfg.accumulation_steps(), t.micro_batch, t.seq_len + 1]
    }

    /// Runs one optimizer step. `rows[r]` holds replica r's share of the
    /// global batch (B/R windows of S+1 tokens, row-major).
    pub fn train_step(&mut self, rows: &[Vec<i32>]) -> Result<StepMetrics> {
        let shape = self.replica_shape();
        let per_replica: usize = shape.iter().product::<i64>() as usize;
        if rows.len() != self.state.len() || rows.iter().any(|r| r.len() != per_replica) {
            bail!(
                "batch: expected {} replicas x {per_replica} tokens",
                self.state.len()
            );
        }
        let mut args = Vec::with_capacity(rows.len());
        for (r, state) in std::mem::take(&mut self.state).into_iter().enumerate() {
            let windows =
                self.client
                    .buffer_from_host(&rows[r], &shape, &self.client.devices()[r])?;
            let mut list: Vec<Arg> = state.into_iter().map(Arg::Donated).collect();
            list.push(Arg::Donated(windows));
            args.push(list);
        }
        let outputs = self.step_program.execute(args)?;
        let m = self.layout.metrics_index();
        let scalar = |b: &Buffer| -> Result<f64> { Ok(b.to_host::<f32>()?[0] as f64) };
        let metrics = StepMetrics {
            ce: scalar(&outputs[0][m])?,
            aux: scalar(&outputs[0][m + 1])?,
            grad_norm: scalar(&outputs[0][m + 2])?,
            lr: scalar(&outputs[0][m + 3])?,
        };
        self.state = outputs
            .into_iter()
            .map(|mut o| {
                o.truncate(m);
                o
            })
            .collect();
        self.step += 1;
        Ok(metrics)
    }

    /// Validation loss of one micro-batch per replica ([M, S+1] each):
    /// (ce, aux) averaged over replicas.
    pub fn eval(&self, rows: &[Vec<i32>]) -> Result<(f64, f64)> {
        let t = &self.cfg.train;
        let n = self.layout.n();
        let mut owned = vec![];
        for (r, row) in rows.iter().enumerate() {
            owned.push(self.client.buffer_from_host(
                row,
                &[t.micro_batch, t.seq_len + 1],
                &self.client.devices()[r],
            )?);
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
        Ok((
            out[0][0].to_host::<f32>()?[0] as f64,
            out[0][1].to_host::<f32>()?[0] as f64,
        ))
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
        let config_toml = self.cfg.to_toml();
        let tokens_per_step = self.cfg.train.global_batch * self.cfg.train.seq_len;
        Ok(Checkpoint {
            params: read(0)?,
            adam_m: read(n)?,
            adam_v: read(2 * n)?,
            state: TrainingState {
                format: 1,
                step: self.step,
                tokens_seen: self.step * tokens_per_step,
                next_batch,
                data_cursor: None,
                tokenizer_sha256: None,
                seed: self.seed,
                config_sha256: crate::ckpt::sha256_hex(&config_toml),
                config_toml,
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
