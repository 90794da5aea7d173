//! `sharedmoe bench runtime` (also `cargo bench --bench runtime`).
//!
//! Prints, each as the median of repeated runs on the CPU plugin:
//! - compile time of a tiny program and its per-execute overhead;
//! - one step of a 2-layer MLP (forward + backward + SGD) on [256, 512]
//!   inputs, traced, differentiated and compiled into one program, with
//!   parameters donated and kept on device.
//!
//! When a JAX peer is available (`scripts/bench-peers.sh` installs it into
//! `target/bench-venv`), the same MLP step is timed in JAX in the same run
//! and the ratio is printed.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::graph::{grad, DType, Graph, HostTensor, TensorType};
use crate::runtime::{Arg, Buffer, Client};

const BATCH: i64 = 256;
const WIDTH: i64 = 512;
const LR: f64 = 1e-3;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn fmt(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.1} us")
    } else {
        format!("{:.3} ms", us / 1000.0)
    }
}

fn tiny_program_mlir() -> String {
    let g = Graph::new();
    let x = g.param("x", TensorType::new(DType::F32, &[4])).unwrap();
    let y = x.mul(&x).unwrap().add_scalar(1.0).unwrap();
    g.build(&[&y]).unwrap().to_mlir().unwrap()
}

fn bench_tiny(client: &Client) {
    let mlir = tiny_program_mlir();
    let compile: Vec<Duration> = (0..10)
        .map(|_| {
            let t = Instant::now();
            client.compile(&mlir, &Default::default()).expect("compile");
            t.elapsed()
        })
        .collect();
    let exe = client.compile(&mlir, &Default::default()).unwrap();
    let dev = &client.devices()[0];
    let x = client
        .buffer_from_host(&[1f32, 2.0, 3.0, 4.0], &[4], dev)
        .unwrap();
    for _ in 0..200 {
        exe.execute(&[&[&x]]).unwrap();
    }
    let exec: Vec<Duration> = (0..2000)
        .map(|_| {
            let t = Instant::now();
            let out = exe.execute(&[&[&x]]).unwrap();
            drop(out);
            t.elapsed()
        })
        .collect();
    println!(
        "tiny program: compile {} (median of 10), execute {} (median of 2000)",
        fmt(median(compile)),
        fmt(median(exec))
    );
}

/// Params w1 [512, 512], b1 [512], w2 [512, 512], b2 [512]; batch x, y.
/// loss = mean((relu(x w1 + b1) w2 + b2 - y)^2); returns new params, loss.
fn mlp_step_function() -> crate::graph::Function {
    let g = Graph::new();
    let f = |d: &[i64]| TensorType::new(DType::F32, d);
    let w1 = g.param("w1", f(&[WIDTH, WIDTH])).unwrap();
    let b1 = g.param("b1", f(&[WIDTH])).unwrap();
    let w2 = g.param("w2", f(&[WIDTH, WIDTH])).unwrap();
    let b2 = g.param("b2", f(&[WIDTH])).unwrap();
    let x = g.param("x", f(&[BATCH, WIDTH])).unwrap();
    let y = g.param("y", f(&[BATCH, WIDTH])).unwrap();
    let h = x.matmul(&w1).unwrap().add(&b1).unwrap();
    let h = h.maximum(&h.zeros_like().unwrap()).unwrap();
    let out = h.matmul(&w2).unwrap().add(&b2).unwrap();
    let loss = out.sub(&y).unwrap().square().unwrap().mean_all().unwrap();
    let params = [&w1, &b1, &w2, &b2];
    let grads = grad(&loss, &params).unwrap();
    let mut outs: Vec<_> = params
        .iter()
        .zip(&grads)
        .map(|(p, g)| p.sub(&g.mul_scalar(LR).unwrap()).unwrap())
        .collect();
    outs.push(loss);
    let refs: Vec<_> = outs.iter().collect();
    g.build(&refs)
        .unwrap()
        .with_name("mlp_step")
        .donate(&[0, 1, 2, 3])
        .unwrap()
}

fn bench_mlp(client: &Client) -> Duration {
    let func = mlp_step_function();
    let t = Instant::now();
    let step = func.compile(client).expect("compile mlp step");
    println!("mlp step: trace+emit+compile {}", fmt(t.elapsed()));
    let types = func.param_types();
    let init = |i: usize| {
        let n = types[i].num_elements() as usize;
        let vals: Vec<f64> = (0..n)
            .map(|k| ((k * 7919 + i * 104729) % 1000) as f64 / 1000.0 - 0.5)
            .collect();
        HostTensor::from_f64(&vals, types[i].clone())
            .unwrap()
            .to_device(client, 0)
            .unwrap()
    };
    let mut params: Vec<Buffer> = (0..4).map(init).collect();
    let (x, y) = (init(4), init(5));
    let mut times = vec![];
    for i in 0..30 {
        let t = Instant::now();
        let mut args: Vec<Arg> = params.drain(..).map(Arg::Donated).collect();
        args.push(Arg::Borrowed(&x));
        args.push(Arg::Borrowed(&y));
        let mut outs = step.execute(vec![args]).unwrap().remove(0);
        let loss = outs.pop().unwrap().to_host::<f32>().unwrap()[0];
        params = outs;
        if i >= 5 {
            times.push(t.elapsed());
        }
        assert!(loss.is_finite());
    }
    let m = median(times);
    let flops = 3.0 * 2.0 * 2.0 * (BATCH * WIDTH * WIDTH) as f64;
    println!(
        "mlp step [{BATCH}, {WIDTH}] 2 layers fwd+bwd+SGD: {} (median of 25), {:.2} GFLOP/s",
        fmt(m),
        flops / m.as_secs_f64() / 1e9
    );
    m
}

/// Runs the JAX peer if its venv exists; returns its median step time.
fn jax_peer() -> Option<Duration> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join("target/bench-venv/bin/python");
    if !python.exists() {
        println!(
            "peer (JAX): not installed; run scripts/bench-peers.sh to compare in the same run"
        );
        return None;
    }
    let out = Command::new(python)
        .arg(root.join("benches/peers/mlp_jax.py"))
        .args([BATCH.to_string(), WIDTH.to_string()])
        .env("JAX_PLATFORMS", "cpu")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let secs: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("median_step_s "))?
        .trim()
        .parse()
        .ok()?;
    println!(
        "peer (JAX {}) mlp step: {}",
        text.lines()
            .find_map(|l| l.strip_prefix("jax "))
            .unwrap_or("?"),
        fmt(Duration::from_secs_f64(secs))
    );
    Some(Duration::from_secs_f64(secs))
}

#[derive(clap::Args, Clone, Debug)]
pub struct BenchArgs {
    /// Which benchmark: `runtime`, `step`, `parity`, `data` or `dist`.
    pub which: String,
    /// Config for `step` and `parity` (TOML).
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Config overrides for `step`, e.g. --set model.hidden_size=256.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Timed steps (after 2 warm-up steps); for `parity`, compared steps.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// (`step`) also print each compiled step program's memory breakdown
    /// (arguments, outputs, aliased, temporaries, code); the peak RSS of
    /// each variant's process and the compiled total are always printed.
    #[arg(long)]
    pub memory: bool,
    /// (`step`, internal) run only this variant in this process and print
    /// its result: how `step` measures each variant's memory on its own.
    #[arg(long, hide = true)]
    pub variant: Option<String>,
    /// (`parity`) largest relative difference of the losses.
    #[arg(long, default_value_t = 1e-2)]
    pub tolerance: f64,
    /// Parquet files, directories or globs for `data`.
    #[arg(long, default_value = "data/fineweb-sample")]
    pub data: Vec<std::path::PathBuf>,
    /// tokenizer.json for `data`.
    #[arg(long, default_value = "data/tokenizer.json")]
    pub tokenizer: std::path::PathBuf,
    /// Sequence length for `data` (rows of S+1 tokens).
    #[arg(long, default_value_t = 1024)]
    pub seq_len: usize,
    /// Timed passes for `data` and `dist` (after one warm-up pass).
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Worker-process counts for `dist`'s all-reduce.
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    pub processes: Vec<u32>,
    /// (`allreduce-worker`, started by `dist`) the coordinator's address.
    #[arg(long, hide = true)]
    pub coordinator: Option<String>,
    /// (`allreduce-worker`) floats per all-reduce.
    #[arg(long, hide = true)]
    pub len: Option<usize>,
}

impl BenchArgs {
    /// `--config` with `--set` overrides (for `step` and `parity`).
    fn load_config(&self) -> anyhow::Result<crate::train::Config> {
        let Some(path) = &self.config else {
            anyhow::bail!("bench {} needs --config", self.which)
        };
        crate::train::Config::load(path, &self.overrides)
    }
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    match args.which.as_str() {
        "runtime" => runtime(),
        "step" => super::bench_step::step(args, &args.load_config()?),
        "parity" => super::bench_parity::parity(args, &args.load_config()?),
        "data" => super::bench_data::data(&args.data, &args.tokenizer, args.seq_len, args.repeats),
        "dist" => {
            let default = std::path::PathBuf::from("configs/sharedmoe50m.toml");
            let config = args.config.as_ref().unwrap_or(&default);
            super::bench_dist::dist(config, &args.processes, args.repeats)
        }
        "allreduce-worker" => super::bench_dist::all_reduce_worker(
            args.coordinator.as_deref().unwrap_or_default(),
            args.len.unwrap_or(1 << 20),
            args.repeats,
        ),
        other => {
            anyhow::bail!(
                "unknown benchmark `{other}` (available: runtime, step, parity, data, dist)"
            )
        }
    }
}

/// Compile/execute overheads and the MLP step, with the JAX peer's ratio.
pub fn runtime() -> anyhow::Result<()> {
    let client = Client::cpu(1)?;
    println!(
        "platform: {} ({} device)",
        client.platform_name(),
        client.devices().len()
    );
    bench_tiny(&client);
    let ours = bench_mlp(&client);
    if let Some(peer) = jax_peer() {
        println!(
            "ratio sharedmoe / JAX step time: {:.2}",
            ours.as_secs_f64() / peer.as_secs_f64()
        );
    }
    Ok(())
}
