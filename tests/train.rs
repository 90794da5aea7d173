//! The compiled training step: AdamW and clipping against hand-computed
//! values, the schedule in-graph, exact resume, data parallelism equal to
//! accumulation, learning on real text, and refusals of malformed inputs.

mod common;

use std::path::{Path, PathBuf};

use common::client;
use sharedmoe::graph::{DType, Graph, HostTensor, TensorType};
use sharedmoe::train::optimizer::{clip_by_global_norm, AdamW};
use sharedmoe::train::trainer::fresh_checkpoint;
use sharedmoe::train::{Config, Schedule, StartFrom, Trainer};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sharedmoe-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Byte-level tokens (vocab 256) of real English text
/// (data/README.md): no tokenizer needed.
fn real_text_bin(dir: &Path) -> PathBuf {
    let text = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/rust-book-ch01-04.txt");
    let bytes = std::fs::read(&text).unwrap_or_else(|e| panic!("{}: {e}", text.display()));
    let path = dir.join("text.bin");
    std::fs::write(
        &path,
        bytes
            .iter()
            .flat_map(|&b| (b as u16).to_le_bytes())
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    path
}

fn tiny_config(dir: &Path, extra: &[&str]) -> Config {
    let text = format!(
        r#"
[model]
preset = "tiny-sharedmoe"
[train]
seq_len = 32
global_batch = 8
micro_batch = 2
steps = 6
warmup_steps = 2
lr = 3e-3
min_lr = 3e-4
checkpoint_every = 3
[data]
train_bin = "{}"
[run]
dir = "{}"
"#,
        real_text_bin(dir).display(),
        dir.join("run").display()
    );
    Config::parse(
        &text,
        &extra.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    )
    .unwrap()
}

#[test]
fn adamw_and_clipping_match_a_hand_computed_example() {
    // Parameters: w (rank 2, decayed) = [[1.0]], b (rank 1, not decayed) =
    // [-2.0]. Gradients (3, 4) have norm 5, clipped to 1: (0.6, 0.8).
    let g = Graph::new();
    let f32t = |d: &[i64]| TensorType::new(DType::F32, d);
    let (w, b) = (
        g.param("w", f32t(&[1, 1])).unwrap(),
        g.param("b", f32t(&[1])).unwrap(),
    );
    let (gw, gb) = (
        g.param("gw", f32t(&[1, 1])).unwrap(),
        g.param("gb", f32t(&[1])).unwrap(),
    );
    let (mw, vw) = (
        g.param("mw", f32t(&[1, 1])).unwrap(),
        g.param("vw", f32t(&[1, 1])).unwrap(),
    );
    let (mb, vb) = (
        g.param("mb", f32t(&[1])).unwrap(),
        g.param("vb", f32t(&[1])).unwrap(),
    );
    let count = g.param("count", f32t(&[])).unwrap();
    let lr = g.scalar(0.01, DType::F32).unwrap();
    let (clipped, norm) = clip_by_global_norm(&[gw, gb], 1.0).unwrap();
    let opt = AdamW {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let uw = opt
        .update(&w, &clipped[0], &mw, &vw, &lr, &count, true)
        .unwrap();
    let ub = opt
        .update(&b, &clipped[1], &mb, &vb, &lr, &count, false)
        .unwrap();
    let f = g
        .build(&[&norm, &uw.param, &uw.m, &uw.v, &ub.param, &ub.m, &ub.v])
        .unwrap()
        .compile(client())
        .unwrap();
    let h = |v: f64, d: &[i64]| HostTensor::from_f64(&[v], f32t(d)).unwrap();
    let run = |w: f64, b: f64, gw: f64, gb: f64, m: [f64; 2], v: [f64; 2], t: f64| -> Vec<f64> {
        let ins = [
            h(w, &[1, 1]),
            h(b, &[1]),
            h(gw, &[1, 1]),
            h(gb, &[1]),
            h(m[0], &[1, 1]),
            h(v[0], &[1, 1]),
            h(m[1], &[1]),
            h(v[1], &[1]),
            h(t, &[]),
        ];
        f.run(client(), &ins)
            .unwrap()
            .iter()
            .map(|o| o.to_f64()[0])
            .collect()
    };
    // Step 1: m = 0.1 g, v = 0.05 g^2; bias-corrected m_hat = g, v_hat = g^2,
    // so the Adam direction is g / (|g| + eps).
    let o = run(1.0, -2.0, 3.0, 4.0, [0.0; 2], [0.0; 2], 1.0);
    let want_w = 1.0 - 0.01 * (0.6 / (0.6 + 1e-8) + 0.1 * 1.0);
    let want_b = -2.0 - 0.01 * (0.8 / (0.8 + 1e-8));
    let want = [5.0, want_w, 0.06, 0.05 * 0.36, want_b, 0.08, 0.05 * 0.64];
    common::assert_close(&o, &want, 1e-6, "step 1");
    // Step 2 from that state with gradients (0.5, -0.25) (norm < 1: not clipped).
    let o2 = run(o[1], o[4], 0.5, -0.25, [o[2], o[5]], [o[3], o[6]], 2.0);
    let by_hand = |p: f64, g: f64, m: f64, v: f64, decay: bool| {
        let m2 = 0.9 * m + 0.1 * g;
        let v2 = 0.95 * v + 0.05 * g * g;
        let upd = (m2 / (1.0 - 0.81)) / ((v2 / (1.0 - 0.9025)).sqrt() + 1e-8);
        (p - 0.01 * (upd + if decay { 0.1 * p } else { 0.0 }), m2, v2)
    };
    let (pw, m2w, v2w) = by_hand(o[1], 0.5, o[2], o[3], true);
    let (pb, m2b, v2b) = by_hand(o[4], -0.25, o[5], o[6], false);
    common::assert_close(
        &o2,
        &[(0.25f64 + 0.0625).sqrt(), pw, m2w, v2w, pb, m2b, v2b],
        1e-6,
        "step 2",
    );
}

#[test]
fn schedule_in_graph_matches_spec_values() {
    let s = Schedule {
        peak: 3e-4,
        final_lr: 3e-5,
        warmup: 1000,
        total: 12_000,
    };
    let steps = [0.0, 999.0, 1000.0, 6500.0, 11_999.0];
    let out = common::eval(
        &[(TensorType::new(DType::I32, &[5]), steps.to_vec())],
        |_, p| Ok(vec![s.traced(&p[0])?]),
    );
    let want: Vec<f64> = steps.iter().map(|&t| s.at(t as i64)).collect();
    common::assert_close(&out[0], &want, 1e-6, "lr");
    assert_eq!(want[0], 3e-7);
    assert!((want[3] - 1.65e-4).abs() < 1e-15);
}

fn read_losses(run: &Path) -> Vec<(i64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_i64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

#[test]
fn resume_from_a_checkpoint_is_bit_identical() {
    check_resume("resume", &[]);
}

/// The same with the shipped parquet sample tokenised on the fly: the
/// stream's cursor goes through state.json.
#[test]
fn resume_of_a_parquet_run_is_bit_identical() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let state = check_resume(
        "resume-parquet",
        &[
            "data.train_bin=\"\"",
            &format!(
                "data.parquet=[\"{}\"]",
                root.join("data/fineweb-sample").display()
            ),
            &format!(
                "data.tokenizer=\"{}\"",
                root.join("data/tokenizer.json").display()
            ),
            "data.shuffle_rows=5",
            "model.vocab_size=32000",
        ],
    );
    assert!(
        state["data_cursors"]["0"]["window"].as_u64().unwrap() > 0,
        "{state}"
    );
    assert_eq!(state["tokenizer_sha256"].as_str().unwrap().len(), 64);
}

/// Trains 6 steps in one go and as 3 + 3 resumed steps; returns the last
/// state.json.
fn check_resume(name: &str, extra: &[&str]) -> serde_json::Value {
    let dir = scratch(name);
    let with_dir = |sub: &str| -> Vec<String> {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        v.push(format!("run.dir=\"{}\"", dir.join(sub).display()));
        v
    };
    let whole = with_dir("whole");
    let whole = tiny_config(&dir, &whole.iter().map(String::as_str).collect::<Vec<_>>());
    let last = sharedmoe::train::train(&whole, &StartFrom::default(), None).unwrap();
    let parts = with_dir("parts");
    let parts = tiny_config(&dir, &parts.iter().map(String::as_str).collect::<Vec<_>>());
    let mid = sharedmoe::train::train(
        &parts,
        &StartFrom {
            until_step: Some(3),
            ..Default::default()
        },
        None,
    )
    .unwrap();
    assert!(mid.ends_with("step_00000003"), "{}", mid.display());
    let end = sharedmoe::train::train(
        &parts,
        &StartFrom {
            resume: Some(mid),
            ..Default::default()
        },
        None,
    )
    .unwrap();
    let (a, b) = (
        read_losses(&dir.join("whole")),
        read_losses(&dir.join("parts")),
    );
    assert_eq!(a.len(), 6);
    assert_eq!(a, b, "per-step losses differ after resume");
    for file in ["model.safetensors", "optimizer.safetensors"] {
        assert!(
            std::fs::read(last.join(file)).unwrap() == std::fs::read(end.join(file)).unwrap(),
            "{file} differs"
        );
    }
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(end.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["step"], 6);
    assert_eq!(state["next_batch"], 6);
    std::fs::remove_dir_all(&dir).unwrap();
    state
}

#[test]
fn four_replicas_equal_one_device_accumulating_four_micro_batches() {
    let dir = scratch("replicas");
    let parallel = tiny_config(&dir, &["train.replicas=4", "train.micro_batch=2"]);
    let serial = tiny_config(&dir, &["train.replicas=1", "train.micro_batch=2"]);
    assert_eq!(
        (parallel.accumulation_steps(), serial.accumulation_steps()),
        (1, 4)
    );
    let file = sharedmoe::data::TokenFile::open(
        &parallel.data.train_bin,
        sharedmoe::data::TokenWidth::U16,
    )
    .unwrap();
    let start = fresh_checkpoint(&serial, 0);
    let c4 = sharedmoe::train::client::open_client(&parallel, None).unwrap();
    let c1 = sharedmoe::train::client::open_client(&serial, None).unwrap();
    let mut p = Trainer::new(parallel.clone(), c4, &start).unwrap();
    let mut s = Trainer::new(serial.clone(), c1, &start).unwrap();
    for step in 0..3 {
        let rows4: Vec<Vec<i32>> = (0..4)
            .map(|r| file.batch_rows(step, 8, 32, r * 2, 2))
            .collect();
        let rows1 = vec![file.batch_rows(step, 8, 32, 0, 8)];
        let (mp, ms) = (p.train_step(&rows4).unwrap(), s.train_step(&rows1).unwrap());
        let rel = (mp.ce - ms.ce).abs() / ms.ce;
        assert!(
            rel < 1e-5,
            "step {step}: loss {} (4 replicas) vs {} (accumulated), rel {rel:.2e}",
            mp.ce,
            ms.ce
        );
        assert!(
            (mp.aux - ms.aux).abs() / ms.aux < 1e-5
                && (mp.grad_norm - ms.grad_norm).abs() / ms.grad_norm < 1e-4
        );
    }
    // The parameters equal the serial run's.
    let serial_params = s.params().unwrap();
    for (a, b) in p.params().unwrap().iter().zip(&serial_params) {
        common::assert_close(&a.to_f64(), &b.to_f64(), 1e-4, "params");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Trains `cfg` from scratch: its first loss and the mean of its last 20.
fn first_and_last_losses(cfg: &Config) -> (f64, f64) {
    sharedmoe::train::train(cfg, &StartFrom::default(), None).unwrap();
    let losses: Vec<f64> = read_losses(&cfg.run.dir)
        .into_iter()
        .map(|(_, l)| l)
        .collect();
    let last = losses[losses.len() - 20..].iter().sum::<f64>() / 20.0;
    (losses[0], last)
}

#[test]
fn loss_falls_on_real_text_within_200_steps() {
    let dir = scratch("learn");
    let cfg = tiny_config(
        &dir,
        &[
            "train.steps=200",
            "train.warmup_steps=20",
            "train.seq_len=64",
            "train.checkpoint_every=0",
        ],
    );
    let (first, last) = first_and_last_losses(&cfg);
    println!("loss: first {first:.3}, mean of last 20 {last:.3}");
    assert!(
        (first - 256f64.ln()).abs() < 0.2,
        "initial loss {first} should be near ln 256"
    );
    assert!(
        last < first - 2.0,
        "loss fell only from {first:.3} to {last:.3}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The per-layer MoE family (`tiny-moe`: qk-norm, its own head_dim, an
/// untied head, a dense layer among MoE layers) resumes bit-identically.
#[test]
fn resume_of_a_per_layer_moe_run_is_bit_identical() {
    check_resume("resume-moe", &["model.preset=\"tiny-moe\""]);
}

/// `train.trainable`: only the routers and the final norm of a tiny-moe
/// train. Every other tensor is byte-identical to its initial value after
/// the run, the optimizer file holds moments of the trained tensors only,
/// the trained ones moved, and the run resumes bit-identically.
#[test]
fn frozen_tensors_stay_byte_identical_and_only_trained_ones_have_moments() {
    let trainable = [
        "model.preset=\"tiny-moe\"",
        "train.trainable=[\"model.layers.*.mlp.gate.weight\", \"model.norm.weight\"]",
    ];
    let dir = scratch("frozen");
    let cfg = tiny_config(&dir, &trainable);
    let last = sharedmoe::train::train(&cfg, &StartFrom::default(), None).unwrap();
    let specs = sharedmoe::model::param_specs(&cfg.model);
    let trained = |name: &str| {
        name == "model.norm.weight"
            || (name.starts_with("model.layers.") && name.ends_with(".mlp.gate.weight"))
    };
    let got = sharedmoe::ckpt::load(&last, &specs, sharedmoe::ckpt::Purpose::Resume).unwrap();
    let start = sharedmoe::train::trainer::fresh_checkpoint(&cfg, cfg.train.seed);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let mut frozen = 0;
    for ((name, _, after), (_, _, before)) in got.params.iter().zip(&start.params) {
        if trained(name) {
            assert!(
                bits(after) != bits(before),
                "{name} was trained but did not move"
            );
        } else {
            assert!(bits(after) == bits(before), "{name} is frozen but changed");
            frozen += 1;
        }
    }
    assert!(frozen > 10, "{frozen} frozen tensors");
    // Routers of layers 0 and 2 (layer 1 is dense) and the final norm.
    let want = [
        "model.layers.0.mlp.gate.weight",
        "model.layers.2.mlp.gate.weight",
        "model.norm.weight",
    ];
    for moments in [&got.adam_m, &got.adam_v] {
        let names: Vec<&str> = moments.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(names, want);
    }
    let file = std::fs::read(last.join("optimizer.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&file).unwrap();
    assert_eq!(st.names().len(), 2 * want.len());
    std::fs::remove_dir_all(&dir).unwrap();
    check_resume("resume-frozen", &trainable);
}

/// A glob that matches no tensor is refused, naming it.
#[test]
fn a_trainable_glob_matching_nothing_is_refused() {
    let text = "[model]\npreset = \"tiny-moe\"\n[train]\nseq_len = 8\nglobal_batch = 2\nmicro_batch = 2\nsteps = 2\nwarmup_steps = 0\nlr = 1e-3\nmin_lr = 1e-4\ncheckpoint_every = 0\n[data]\ntrain_bin = \"x.bin\"\n[run]\ndir = \"r\"\n";
    let err = Config::parse(text, &["train.trainable=[\"model.pool.*\"]".to_string()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("`model.pool.*` matches no parameter"), "{err}");
}

/// ... and learns on the shipped sample's text.
#[test]
fn a_per_layer_moe_learns_on_real_text() {
    let dir = scratch("learn-moe");
    let cfg = tiny_config(
        &dir,
        &[
            "model.preset=\"tiny-moe\"",
            "train.steps=120",
            "train.warmup_steps=12",
            "train.checkpoint_every=0",
        ],
    );
    let (first, last) = first_and_last_losses(&cfg);
    println!("tiny-moe loss: first {first:.3}, mean of last 20 {last:.3}");
    assert!(
        last < first - 1.5,
        "loss fell only from {first:.3} to {last:.3}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn malformed_inputs_are_refused_with_names() {
    let dir = scratch("malformed");
    // A token file shorter than one batch.
    let short = dir.join("short.bin");
    std::fs::write(&short, vec![0u8; 2 * 40]).unwrap();
    let cfg = tiny_config(&dir, &[&format!("data.train_bin=\"{}\"", short.display())]);
    let err = sharedmoe::train::train(&cfg, &StartFrom::default(), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("short.bin") && err.contains("fewer than one batch of 8"),
        "{err}"
    );
    // A checkpoint whose tensors do not match the config.
    let ok = tiny_config(&dir, &[]);
    let ck = dir.join("ck");
    sharedmoe::train::write_init(&ok, &ck, 0).unwrap();
    let wider = tiny_config(&dir, &["model.hidden_size=32"]);
    let err = format!(
        "{:#}",
        sharedmoe::train::train(
            &wider,
            &StartFrom {
                init: Some(ck),
                ..Default::default()
            },
            None
        )
        .unwrap_err()
    );
    assert!(
        err.contains("model.embed_proj.weight")
            && err.contains("[64, 16]")
            && err.contains("[32, 16]"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn shipped_configs_follow_the_spec() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    for (file, params) in [
        ("dense125m.toml", 137_841_408),
        ("sharedmoe50m.toml", 49_642_240),
    ] {
        let c = Config::load(&root.join(file), &[]).unwrap();
        assert_eq!(sharedmoe::model::count_params(&c.model), params, "{file}");
        let t = &c.train;
        assert_eq!(
            (t.global_batch, t.seq_len, t.steps, t.warmup_steps),
            (512, 1024, 12_000, 1000),
            "{file}"
        );
        assert_eq!(
            (
                t.lr,
                t.min_lr,
                t.beta1,
                t.beta2,
                t.eps,
                t.weight_decay,
                t.grad_clip
            ),
            (3e-4, 3e-5, 0.9, 0.95, 1e-8, 0.1, 1.0)
        );
    }
    for file in ["tiny-dense.toml", "tiny-sharedmoe.toml"] {
        Config::load(&root.join(file), &[]).unwrap();
    }
}

#[test]
fn sigterm_finishes_the_step_checkpoints_and_exits_zero() {
    let dir = scratch("sigterm");
    let cfg = tiny_config(&dir, &["train.steps=100000", "train.checkpoint_every=0"]);
    let cfg_path = dir.join("run.toml");
    std::fs::write(&cfg_path, cfg.to_toml()).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sharedmoe"))
        .args(["train", "--config"])
        .arg(&cfg_path)
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let metrics = cfg.run.dir.join("metrics.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::fs::read_to_string(&metrics)
        .map(|s| s.lines().count())
        .unwrap_or(0)
        < 2
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no training progress within 120 s"
        );
        assert!(child.try_wait().unwrap().is_none(), "trainer exited early");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    let rows = std::fs::read_to_string(&metrics).unwrap().lines().count() as i64;
    let ck = sharedmoe::ckpt::latest(&cfg.run.dir).expect("a checkpoint after SIGTERM");
    assert!(
        ck.ends_with(format!("step_{rows:08}")),
        "checkpoint {} after {rows} logged steps",
        ck.display()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The accelerator recipe on the CPU: bf16 matmuls with f32 master
/// weights, Adam state and loss track the f32 step's first losses within
/// 1e-2 (relative), and the state stays f32.
#[test]
fn bf16_compute_tracks_f32_losses_and_keeps_f32_master_weights() {
    let dir = scratch("bf16");
    let f32_cfg = tiny_config(&dir, &["train.compute_dtype=f32"]);
    let bf16_cfg = tiny_config(&dir, &["train.compute_dtype=bf16"]);
    assert_eq!(bf16_cfg.compute_dtype(), DType::BF16);
    let file =
        sharedmoe::data::TokenFile::open(&f32_cfg.data.train_bin, sharedmoe::data::TokenWidth::U16)
            .unwrap();
    let start = fresh_checkpoint(&f32_cfg, 0);
    let client = sharedmoe::train::client::open_client(&f32_cfg, None).unwrap();
    let mut full = Trainer::new(f32_cfg, client.clone(), &start).unwrap();
    let mut half = Trainer::new(bf16_cfg, client, &start).unwrap();
    for step in 0..3 {
        let rows = vec![file.batch_rows(step, 8, 32, 0, 8)];
        let (a, b) = (
            full.train_step(&rows).unwrap(),
            half.train_step(&rows).unwrap(),
        );
        let rel = (a.ce - b.ce).abs() / a.ce;
        assert!(
            rel < 1e-2,
            "step {step}: f32 loss {} vs bf16 {} (rel {rel:.2e})",
            a.ce,
            b.ce
        );
        assert!(
            a.ce != b.ce,
            "step {step}: identical losses: is bf16 really used?"
        );
    }
    let ckpt = half.checkpoint(3).unwrap();
    for p in half.params().unwrap() {
        assert_eq!(p.ty.dtype, DType::F32);
    }
    assert!(ckpt
        .adam_v
        .iter()
        .all(|(_, _, v)| v.iter().all(|x| x.is_finite())));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A process's stop vote is summed inside the fused step, so every
/// replica (every host of a pod) sees it after the same step.
#[test]
fn a_stop_vote_reaches_every_replica_through_the_step() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = scratch("stop-vote");
    let cfg = tiny_config(&dir, &["train.replicas=2"]);
    let file =
        sharedmoe::data::TokenFile::open(&cfg.data.train_bin, sharedmoe::data::TokenWidth::U16)
            .unwrap();
    let client = sharedmoe::train::client::open_client(&cfg, None).unwrap();
    let mut t = Trainer::new(cfg.clone(), client, &fresh_checkpoint(&cfg, 0)).unwrap();
    let flag = std::sync::Arc::new(AtomicBool::new(false));
    t.set_stop_vote(flag.clone());
    let rows = |step| -> Vec<Vec<i32>> {
        (0..2)
            .map(|r| file.batch_rows(step, 8, 32, r * 4, 4))
            .collect()
    };
    assert!(!t.train_step(&rows(0)).unwrap().stop);
    flag.store(true, Ordering::Relaxed);
    assert!(t.train_step(&rows(1)).unwrap().stop);
    assert_eq!(t.step_count(), 2);
    std::fs::remove_dir_all(&dir).unwrap();
}
