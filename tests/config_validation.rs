//! Bad config values, overflowing model sizes and models too large for the
//! machine are refused up front by real `sharedmoe` processes, naming the
//! field or giving the figure; `train.grad_clip = 0` turns clipping off.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{client, sharedmoe, sharedmoe_ok};
use sharedmoe::graph::{DType, Graph, HostTensor, TensorType};
use sharedmoe::train::optimizer::clip_by_global_norm;

const TINY: &str = "configs/tiny-sharedmoe.toml";

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sharedmoe-valid-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `sharedmoe train` on the tiny config with `sets`: must fail (not
/// crash) with a message containing `want`, quickly.
fn refused(sets: &[&str], want: &str) {
    let dir = scratch(&format!("refused-{}", sets[0].replace(['.', '='], "-")));
    let run_dir = format!("run.dir={}", dir.join("run").display());
    let mut args = vec!["train", "--config", TINY, "--set", &run_dir];
    for s in sets {
        args.extend(["--set", s]);
    }
    let started = Instant::now();
    let out = sharedmoe(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "train with {sets:?} must fail with an error, got {}:\n{stderr}",
        out.status
    );
    assert!(stderr.contains(want), "want {want:?} in:\n{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "refused only after {:?}",
        started.elapsed()
    );
    assert!(
        !dir.join("run/checkpoints").exists() && !dir.join("run/metrics.jsonl").exists(),
        "nothing may be written for a refused config"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_negative_grad_clip_is_refused() {
    refused(
        &["train.grad_clip=-1"],
        "train.grad_clip = -1: must be positive (the largest global gradient norm), or 0 to turn clipping off",
    );
}

#[test]
fn beta1_of_one_and_a_half_is_refused() {
    refused(
        &["train.beta1=1.5"],
        "train.beta1 = 1.5: expected a value in [0, 1)",
    );
}

#[test]
fn beta2_outside_0_1_is_refused() {
    refused(
        &["train.beta2=1.0"],
        "train.beta2 = 1: expected a value in [0, 1)",
    );
}

#[test]
fn eps_of_zero_is_refused() {
    refused(&["train.eps=0"], "train.eps = 0: must be positive");
}

#[test]
fn negative_intervals_are_refused() {
    refused(
        &["train.checkpoint_every=-1"],
        "train.checkpoint_every = -1: must be >= 0",
    );
    refused(
        &["train.eval_every=-1"],
        "train.eval_every = -1: must be >= 0",
    );
    refused(
        &["train.eval_batches=0"],
        "train.eval_batches = 0: must be at least 1",
    );
}

#[test]
fn negative_weight_decay_and_non_finite_floats_are_refused() {
    refused(
        &["train.weight_decay=-0.1"],
        "train.weight_decay = -0.1: must be >= 0",
    );
    refused(&["train.lr=nan"], "train.lr = NaN: must be a finite number");
    refused(
        &["train.grad_clip=inf"],
        "train.grad_clip = inf: must be a finite number",
    );
    refused(
        &["model.rope_theta=inf"],
        "model.rope_theta = inf: must be a finite number",
    );
}

#[test]
fn unknown_names_are_refused_with_the_field_and_the_choices() {
    refused(
        &["run.backend=rocm"],
        "run.backend: unknown variant `rocm`, expected one of `cpu`, `cuda`, `gpu`, `tpu`",
    );
    refused(
        &["train.compute_dtype=f16"],
        "train.compute_dtype: unknown variant `f16`, expected one of `auto`, `f32`, `bf16`",
    );
    refused(
        &["data.token_dtype=u8"],
        "data.token_dtype: unknown variant `u8`, expected `u16` or `u32`",
    );
    refused(
        &["data.on_bad_file=ignore"],
        "data.on_bad_file: unknown variant `ignore`, expected `fail` or `skip`",
    );
}

#[test]
fn params_refuses_an_overflowing_hidden_size() {
    let out = sharedmoe(&[
        "params",
        "--config",
        TINY,
        "--set",
        "model.hidden_size=1099511627776",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}:\n{stderr}", out.status);
    assert!(
        stderr.contains("model.hidden_size = 1099511627776: the q_proj weight")
            && stderr.contains("overflows a 64-bit count"),
        "{stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "no (wrong) total may be printed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Too many layers: refused without listing 2^50 tensors.
    let out = sharedmoe(&[
        "params",
        "--config",
        TINY,
        "--set",
        "model.num_layers=1125899906842624",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}:\n{stderr}", out.status);
    assert!(
        stderr.contains("model.num_layers = 1125899906842624"),
        "{stderr}"
    );
    // A valid model still counts as before.
    let ok = sharedmoe_ok(&["params", "--config", TINY]);
    assert!(ok.contains("total         562752"), "{ok}");
}

#[test]
fn a_model_too_large_for_memory_is_refused_with_the_estimate() {
    // About 103 billion parameters: some 2.7 TiB of training state.
    let dir = scratch("too-large");
    let run_dir = format!("run.dir={}", dir.join("run").display());
    let started = Instant::now();
    let out = sharedmoe(&[
        "train",
        "--config",
        TINY,
        "--set",
        "model.hidden_size=131072",
        "--set",
        &run_dir,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(
        out.status.code(),
        Some(134),
        "aborted on allocation:\n{stderr}"
    );
    assert_eq!(out.status.code(), Some(1), "{}:\n{stderr}", out.status);
    assert!(
        stderr.contains(
            "the model needs about 2689.4 GiB for parameters, gradients and Adam moments \
             (103133335552 parameters x 16 bytes x 1 replica, plus a 12-byte-per-parameter host copy"
        ) && stderr.contains("GiB available"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(!dir.join("run/checkpoints").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_step_whose_activations_do_not_fit_is_refused_with_xlas_figure() {
    // A tiny model (the parameters fit easily) with a batch whose attention
    // scores alone take 32 x 4 heads x 8192^2 floats (32 GiB) per layer:
    // XLA's buffer assignment of the compiled step says so before anything
    // runs, instead of the process being killed at the first step. (Half
    // the sample is held out so that one evaluation batch exists.)
    refused(
        &[
            "train.seq_len=8192",
            "train.global_batch=32",
            "train.micro_batch=32",
            "data.val_fraction=0.5",
        ],
        "the compiled train step needs",
    );
}

/// `clip_by_global_norm` with max norm 0 (`train.grad_clip = 0`) passes
/// the gradients through; with 1 it scales them to norm 1.
#[test]
fn grad_clip_zero_turns_clipping_off() {
    let f32t = |d: &[i64]| TensorType::new(DType::F32, d);
    for (max_norm, want) in [(0.0, [3.0, 4.0]), (1.0, [0.6, 0.8])] {
        let g = Graph::new();
        let a = g.param("a", f32t(&[1])).unwrap();
        let b = g.param("b", f32t(&[1])).unwrap();
        let (clipped, norm) = clip_by_global_norm(&[a, b], max_norm).unwrap();
        let f = g
            .build(&[&clipped[0], &clipped[1], &norm])
            .unwrap()
            .compile(client())
            .unwrap();
        let ins = [
            HostTensor::from_f64(&[3.0], f32t(&[1])).unwrap(),
            HostTensor::from_f64(&[4.0], f32t(&[1])).unwrap(),
        ];
        let out: Vec<f64> = f
            .run(client(), &ins)
            .unwrap()
            .iter()
            .map(|o| o.to_f64()[0])
            .collect();
        for (got, want) in out.iter().zip(want.iter().chain(&[5.0])) {
            assert!(
                (got - want).abs() < 1e-6,
                "max_norm {max_norm}: {out:?}, want {want:?} and norm 5"
            );
        }
    }
}

/// A training run with `train.grad_clip = 0` learns exactly as one whose
/// clip never triggers.
#[test]
fn training_with_grad_clip_zero_is_unclipped() {
    let dir = scratch("clip-zero");
    let text = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/rust-book-ch01-04.txt");
    let data = dir.join("data");
    sharedmoe_ok(&[
        "data",
        "bytes",
        text.to_str().unwrap(),
        "--out",
        data.to_str().unwrap(),
    ]);
    let config = dir.join("tiny.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[model]
preset = "tiny-sharedmoe"
[train]
seq_len = 32
global_batch = 4
micro_batch = 4
steps = 4
warmup_steps = 1
lr = 3e-3
min_lr = 3e-4
[data]
train_bin = "{}"
"#,
            data.join("train.bin").display()
        ),
    )
    .unwrap();
    let losses = |clip: &str| -> Vec<(f64, f64)> {
        let run = dir.join(format!("run-{clip}"));
        sharedmoe_ok(&[
            "train",
            "--config",
            config.to_str().unwrap(),
            "--set",
            &format!("train.grad_clip={clip}"),
            "--set",
            &format!("run.dir={}", run.display()),
        ]);
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["loss"].as_f64().unwrap(),
                    v["grad_norm"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let off = losses("0");
    let never = losses("1e9");
    assert_eq!(off.len(), 4);
    assert_eq!(off, never, "grad_clip = 0 must mean no clipping");
    assert!(off[3].0 < off[0].0, "it learns: {off:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
