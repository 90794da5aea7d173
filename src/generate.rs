//! Text generation from a checkpoint: one compiled decoding step per token
//! ([`model::decode`](crate::model::decode)) with key/value caches kept on
//! the device (donated, updated in place), greedy or sampled (temperature,
//! top-k) from a seeded RNG. A reference path without the cache recomputes
//! the whole sequence every step.

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::ckpt::Tensors;
use crate::graph::Compiled;
use crate::model::decode::{decode_step_program, full_forward_program};
use crate::model::stored::{HostArray, StoredTensor};
use crate::model::{param_specs, ModelConfig, ParamSpec};
use crate::runtime::{Arg, Buffer, Client, Device};

/// How the next token is chosen.
#[derive(Clone, Debug)]
pub struct Sampling {
    /// 0: greedy (argmax).
    pub temperature: f64,
    /// Sample among the k most likely tokens only (0: all).
    pub top_k: usize,
    pub seed: u64,
}

pub struct Generator {
    cfg: ModelConfig,
    client: Client,
    /// Longest sequence (prompt + generated) the caches hold.
    max_len: i64,
    decode: Compiled,
    full: Compiled,
    params: Vec<Buffer>,
}

impl Generator {
    /// Compiles the decoding step (and the cache-free reference) for
    /// sequences of up to `max_len` tokens and uploads `params` (f32).
    pub fn new(
        client: &Client,
        cfg: &ModelConfig,
        params: &Tensors,
        max_len: i64,
    ) -> Result<Generator> {
        let stored: Vec<(ParamSpec, StoredTensor)> = param_specs(cfg)
            .into_iter()
            .zip(params)
            .map(|(s, (_, _, v))| (s, StoredTensor::F32(v.clone())))
            .collect();
        Generator::stored(client, cfg, &stored, max_len)
    }

    /// [`new`](Self::new) for parameters as a compressed checkpoint stores
    /// them (bf16, NF4): uploaded as stored, dequantised in the programs.
    pub fn stored(
        client: &Client,
        cfg: &ModelConfig,
        params: &[(ParamSpec, StoredTensor)],
        max_len: i64,
    ) -> Result<Generator> {
        let layout: Vec<_> = params.iter().map(|(_, t)| t.storage()).collect();
        let decode = decode_step_program(cfg, &layout, max_len)?
            .compile(client)
            .context("compiling the decoding step")?;
        let full = full_forward_program(cfg, &layout, max_len)?
            .compile(client)
            .context("compiling the full forward")?;
        let params = upload_stored(client, &client.devices()[0], params)?;
        Ok(Generator {
            cfg: cfg.clone(),
            client: client.clone(),
            max_len,
            decode,
            full,
            params,
        })
    }

    /// Continues `prompt` by up to `max_tokens` tokens (stopping after
    /// `stop` when given); returns only the new tokens. `cached: false`
    /// recomputes the whole sequence for every token (the reference).
    pub fn generate(
        &self,
        prompt: &[u32],
        max_tokens: usize,
        sampling: &Sampling,
        stop: Option<u32>,
        cached: bool,
    ) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            bail!("an empty prompt: generation needs at least one token");
        }
        let total = prompt.len() + max_tokens;
        if total as i64 > self.max_len {
            bail!(
                "prompt ({} tokens) + {max_tokens} new tokens exceed the {} this generator was built for",
                prompt.len(),
                self.max_len
            );
        }
        let mut rng = ChaCha8Rng::seed_from_u64(sampling.seed);
        let mut seq: Vec<u32> = prompt.to_vec();
        let mut caches = if cached {
            Some(self.empty_caches()?)
        } else {
            None
        };
        // With the cache, the prompt goes through the decoding step token
        // by token; its last logits choose the first new token.
        let mut logits = vec![];
        if let Some(c) = &mut caches {
            for (i, &t) in prompt.iter().enumerate() {
                logits = self.decode_step(t, i as i64, c)?;
            }
        }
        let mut out = vec![];
        while out.len() < max_tokens {
            if caches.is_none() {
                logits = self.full_logits(&seq)?;
            }
            let next = choose(&logits, sampling, &mut rng);
            out.push(next);
            seq.push(next);
            if Some(next) == stop || out.len() == max_tokens {
                break;
            }
            if let Some(c) = &mut caches {
                logits = self.decode_step(next, seq.len() as i64 - 1, c)?;
            }
        }
        Ok(out)
    }

    fn empty_caches(&self) -> Result<Vec<Buffer>> {
        let c = &self.cfg;
        let dims = [1, c.num_kv_heads, self.max_len, c.head_dim()];
        let zeros = vec![0f32; dims.iter().product::<i64>() as usize];
        let dev = &self.client.devices()[0];
        (0..2 * c.num_layers)
            .map(|_| Ok(self.client.buffer_from_host(&zeros, &dims, dev)?))
            .collect()
    }

    /// Logits after `token` at `pos`; the caches are replaced by their
    /// updated versions.
    fn decode_step(&self, token: u32, pos: i64, caches: &mut Vec<Buffer>) -> Result<Vec<f32>> {
        let dev = &self.client.devices()[0];
        let token = self
            .client
            .buffer_from_host(&[token as i32], &[1, 1], dev)?;
        let pos = self.client.buffer_from_host(&[pos as i32], &[], dev)?;
        let mut args: Vec<Arg> = self.params.iter().map(Arg::Borrowed).collect();
        args.extend([Arg::Borrowed(&token), Arg::Borrowed(&pos)]);
        // Caches are paired per layer in the program: k.0, v.0, k.1, ...;
        // keep them in that order here too.
        args.extend(std::mem::take(caches).into_iter().map(Arg::Donated));
        let mut out = self.decode.execute(vec![args])?.remove(0);
        let rest = out.split_off(1);
        *caches = rest;
        Ok(out[0].to_host::<f32>()?)
    }

    /// The reference: the last position's logits from the whole sequence.
    fn full_logits(&self, seq: &[u32]) -> Result<Vec<f32>> {
        let mut padded: Vec<i32> = seq.iter().map(|&t| t as i32).collect();
        padded.resize(self.max_len as usize, 0);
        let dev = &self.client.devices()[0];
        let tokens = self
            .client
            .buffer_from_host(&padded, &[1, self.max_len], dev)?;
        let mut args: Vec<Arg> = self.params.iter().map(Arg::Borrowed).collect();
        args.push(Arg::Borrowed(&tokens));
        let all = self.full.execute(vec![args])?[0][0].to_host::<f32>()?;
        let v = self.cfg.vocab_size as usize;
        let at = seq.len() - 1;
        Ok(all[at * v..(at + 1) * v].to_vec())
    }
}

/// Uploads stored parameters as the programs of
/// [`declare_stored_params`](crate::model::stored::declare_stored_params)
/// take them: one buffer per program input, in order.
pub fn upload_stored(
    client: &Client,
    device: &Device,
    params: &[(ParamSpec, StoredTensor)],
) -> Result<Vec<Buffer>> {
    let mut buffers = vec![];
    for (spec, t) in params {
        for array in t.host_arrays(&spec.dims) {
            buffers.push(match array {
                HostArray::F32(v, dims) => client.buffer_from_host(v, &dims, device)?,
                HostArray::BF16(v, dims) => client.buffer_from_host(v, &dims, device)?,
                HostArray::U8(v, dims) => client.buffer_from_host(v, &dims, device)?,
            });
        }
    }
    Ok(buffers)
}

/// The next token from `logits`: argmax at temperature 0, else a draw from
/// softmax(logits / T) over the top-k.
pub fn choose(logits: &[f32], s: &Sampling, rng: &mut ChaCha8Rng) -> u32 {
    let argmax = || {
        let mut best = 0;
        for (i, &x) in logits.iter().enumerate() {
            if x > logits[best] {
                best = i;
            }
        }
        best as u32
    };
    if s.temperature <= 0.0 {
        return argmax();
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if s.top_k > 0 {
        order.truncate(s.top_k);
    }
    let top = logits[order[0]] as f64;
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - top) / s.temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut r = rng.gen::<f64>() * total;
    for (w, &i) in weights.iter().zip(&order) {
        if r < *w {
            return i as u32;
        }
        r -= w;
    }
    *order.last().expect("at least one token") as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum_and_top_1_sampling_equals_greedy() {
        let logits = [0.5f32, 2.0, -1.0, 2.0];
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let greedy = Sampling {
            temperature: 0.0,
            top_k: 0,
            seed: 0,
        };
        assert_eq!(choose(&logits, &greedy, &mut rng), 1);
        let top1 = Sampling {
            temperature: 1.0,
            top_k: 1,
            seed: 0,
        };
        for _ in 0..20 {
            assert_eq!(choose(&logits, &top1, &mut rng), 1);
        }
    }

    #[test]
    fn sampling_follows_the_softmax() {
        // logits ln(1), ln(3): probabilities 1/4 and 3/4.
        let logits = [0.0f32, 3f32.ln()];
        let s = Sampling {
            temperature: 1.0,
            top_k: 0,
            seed: 0,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        let n = 20_000;
        let ones = (0..n)
            .filter(|_| choose(&logits, &s, &mut rng) == 1)
            .count();
        let p = ones as f64 / n as f64;
        assert!((p - 0.75).abs() < 0.015, "{p}");
    }
}
