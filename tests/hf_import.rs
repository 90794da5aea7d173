//! `checkpoint import-hf` against Hugging Face transformers itself: a
//! random tiny `Qwen3MoeForCausalLM` (3 layers, layer 1 dense through
//! `mlp_only_layers`, 8 experts, top-2, head_dim 16 against hidden /
//! heads = 8, qk-norm, untied head) is built and saved with
//! `save_pretrained` on CPU torch (`tests/python/hf_qwen3_moe.py`, in its
//! own venv `target/torch-venv`, installed on first use), imported, and
//! our f32 logits and cross-entropy on fixed rows must equal transformers'
//! to 1e-5 relative, our balance loss the formula computed from
//! transformers' router logits. With `norm_topk_prob` true (f32 weights)
//! and false (bf16 weights). Bad inputs are refused by name.

mod common;

use std::path::{Path, PathBuf};

use common::{sharedmoe, sharedmoe_ok};

fn temp_dir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("sharedmoe-hfimport-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Builds the reference model into `dir` (transformers' files plus
/// `reference.json`).
fn reference(dir: &Path, norm_topk_prob: bool, dtype: &str) -> serde_json::Value {
    let python = common::torch_python();
    let out = std::process::Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/hf_qwen3_moe.py"))
        .arg(dir)
        .arg(if norm_topk_prob { "1" } else { "0" })
        .arg(dtype)
        .output()
        .expect("running the torch venv's python");
    assert!(
        out.status.success(),
        "hf_qwen3_moe.py: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap()
}

/// Our logits [B*S*V] of rows[:, :-1] and (ce, aux) of the rows, f32 on
/// the CPU plugin, from the checkpoint `ckpt`.
fn ours(ckpt: &Path, rows: &[Vec<i32>]) -> (Vec<f64>, f64, f64) {
    let got = common::run_checkpoint_model(ckpt, rows, |model, win| {
        let inputs = win.slice_axis(1, 0, win.dim(1).unwrap() - 1).unwrap();
        let (h, _) = model.hidden(&inputs).unwrap();
        let loss = model.loss(win).unwrap();
        vec![model.logits(&h).unwrap(), loss.ce, loss.aux]
    });
    (got[0].to_f64(), got[1].to_f64()[0], got[2].to_f64()[0])
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-30)
}

/// transformers' f32 logits of rows[:, :-1] through the HF directory
/// `dir`.
fn transformers_logits(dir: &Path, rows: &[Vec<i32>]) -> Vec<f64> {
    let python = common::torch_python();
    let out = std::process::Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/hf_qwen3_moe.py"))
        .arg("--logits")
        .arg(dir)
        .arg(serde_json::to_string(rows).unwrap())
        .output()
        .expect("running the torch venv's python");
    assert!(
        out.status.success(),
        "hf_qwen3_moe.py --logits: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    serde_json::from_value(v["logits"].clone()).unwrap()
}

/// max |a - b| / max |b|.
fn logit_error(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / scale)
        .fold(0f64, f64::max)
}

/// Imports the reference model, compares, and returns (HF dir, our
/// checkpoint, the rows).
fn check(norm_topk_prob: bool, dtype: &str) -> (PathBuf, PathBuf, Vec<Vec<i32>>) {
    let hf = temp_dir(&format!("hf-{norm_topk_prob}-{dtype}"));
    let want = reference(&hf, norm_topk_prob, dtype);
    let ckpt = temp_dir(&format!("ours-{norm_topk_prob}-{dtype}"));
    sharedmoe_ok(&[
        "checkpoint",
        "import-hf",
        hf.to_str().unwrap(),
        ckpt.to_str().unwrap(),
    ]);
    let rows: Vec<Vec<i32>> = serde_json::from_value(want["rows"].clone()).unwrap();
    let (logits, ce, aux) = ours(&ckpt, &rows);
    let ref_logits: Vec<f64> = serde_json::from_value(want["logits"].clone()).unwrap();
    assert_eq!(logits.len(), ref_logits.len());
    // Relative to the logits' scale: a logit near zero has no relative
    // error of its own to speak of.
    let scale = ref_logits.iter().fold(0f64, |m, v| m.max(v.abs()));
    let worst = logits
        .iter()
        .zip(&ref_logits)
        .map(|(a, b)| (a - b).abs() / scale)
        .fold(0f64, f64::max);
    let (want_ce, want_aux) = (want["ce"].as_f64().unwrap(), want["aux"].as_f64().unwrap());
    println!(
        "norm_topk_prob {norm_topk_prob}, {dtype}: logits max |diff| / max |logit| {worst:.2e}, \
         ce {ce} vs {want_ce} (rel {:.2e}), aux {aux} vs {want_aux} (rel {:.2e})",
        rel(ce, want_ce),
        rel(aux, want_aux)
    );
    assert!(
        worst < 1e-5,
        "logits differ by {worst:.3e} of their scale {scale}"
    );
    assert!(
        rel(ce, want_ce) < 1e-5,
        "ce {ce} vs transformers' {want_ce}"
    );
    assert!(
        rel(aux, want_aux) < 1e-5,
        "aux {aux} vs the formula's {want_aux}"
    );
    (hf, ckpt, rows)
}

#[test]
fn import_hf_matches_transformers_qwen3_moe() {
    let (hf, ckpt, rows) = check(true, "float32");
    check(false, "float32");
    check(false, "bfloat16");
    refusals(&hf);
    // Out again: transformers loads our export with the same logits.
    let exported = temp_dir("exported");
    sharedmoe_ok(&[
        "checkpoint",
        "export-hf",
        ckpt.to_str().unwrap(),
        exported.to_str().unwrap(),
        "--no-tokenizer",
    ]);
    let (ours_logits, _, _) = ours(&ckpt, &rows);
    let err = logit_error(&transformers_logits(&exported, &rows), &ours_logits);
    println!("export-hf of the import, loaded by transformers: logits within {err:.2e}");
    assert!(err < 1e-5, "exported logits differ by {err:.3e}");
}

/// A tiny-moe trained a few steps on the shipped sample, exported with
/// its tokenizer: transformers computes our logits.
#[test]
fn a_trained_tiny_moe_exports_to_transformers() {
    let run = temp_dir("trained-run");
    sharedmoe_ok(&[
        "train",
        "--config",
        "configs/tiny-moe.toml",
        "--set",
        "train.steps=4",
        "--set",
        "train.warmup_steps=1",
        "--set",
        &format!("run.dir={}", run.display()),
    ]);
    let ckpt = sharedmoe::ckpt::latest(&run).expect("a checkpoint");
    let exported = temp_dir("trained-hf");
    let said = sharedmoe_ok(&[
        "checkpoint",
        "export-hf",
        ckpt.to_str().unwrap(),
        exported.to_str().unwrap(),
    ]);
    assert!(said.contains("Qwen3MoeForCausalLM"), "{said}");
    let rows: Vec<Vec<i32>> = (0..2)
        .map(|r| {
            (0..9)
                .map(|i| (7919 * i + 104_729 * r + 11) % 32_000)
                .collect()
        })
        .collect();
    let (ours_logits, _, _) = ours(&ckpt, &rows);
    let err = logit_error(&transformers_logits(&exported, &rows), &ours_logits);
    println!("trained tiny-moe, exported, loaded by transformers: logits within {err:.2e}");
    assert!(err < 1e-5, "exported logits differ by {err:.3e}");
}

/// Bad inputs name the tensor or key, and write nothing.
fn refusals(hf: &Path) {
    let edited = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| -> PathBuf {
        let dir = temp_dir(name);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["model.safetensors", "config.json"] {
            std::fs::copy(hf.join(f), dir.join(f)).unwrap();
        }
        let mut cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        edit(&mut cfg);
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        dir
    };
    let cases: Vec<(PathBuf, &str)> = vec![
        (
            edited("arch", &|c| c["model_type"] = "mixtral".into()),
            "model_type \"mixtral\"",
        ),
        (
            edited("layers", &|c| c["num_hidden_layers"] = 4.into()),
            "no tensor `model.layers.3.",
        ),
        (
            edited("shape", &|c| c["head_dim"] = 8.into()),
            "`model.layers.0.self_attn.q_proj.weight`",
        ),
        (
            edited("fewer", &|c| c["num_hidden_layers"] = 2.into()),
            "tensor(s) the model would not use, first `model.layers.2.",
        ),
    ];
    for (dir, want) in cases {
        let out = temp_dir("refused");
        let res = sharedmoe(&[
            "checkpoint",
            "import-hf",
            dir.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(!res.status.success(), "{}: imported", dir.display());
        assert!(err.contains(want), "{}: {err}", dir.display());
        assert!(!out.exists(), "{}: wrote {}", dir.display(), out.display());
    }
}

/// Writes a LLaMA checkpoint of `layers` layers (hidden 1024, MLP 4096,
/// vocabulary 32,000, tied) in bf16, one tensor at a time: header first,
/// then each tensor's deterministic values. Returns (bytes written,
/// values of the largest tensor).
fn write_large_llama(dir: &Path, layers: i64) -> (u64, i64) {
    use std::io::Write;
    std::fs::create_dir_all(dir).unwrap();
    let (v, d, f) = (32_000i64, 1024i64, 4096i64);
    let config = serde_json::json!({
        "model_type": "llama", "vocab_size": v, "hidden_size": d, "intermediate_size": f,
        "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true,
        "max_position_embeddings": 512, "hidden_act": "silu",
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut tensors: Vec<(String, Vec<i64>)> =
        vec![("model.embed_tokens.weight".into(), vec![v, d])];
    for l in 0..layers {
        let p = |n: &str| format!("model.layers.{l}.{n}.weight");
        tensors.push((p("input_layernorm"), vec![d]));
        for n in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            tensors.push((p(&format!("self_attn.{n}")), vec![d, d]));
        }
        tensors.push((p("post_attention_layernorm"), vec![d]));
        tensors.push((p("mlp.gate_proj"), vec![f, d]));
        tensors.push((p("mlp.up_proj"), vec![f, d]));
        tensors.push((p("mlp.down_proj"), vec![d, f]));
    }
    tensors.push(("model.norm.weight".into(), vec![d]));
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, dims) in &tensors {
        let end = offset + 2 * dims.iter().product::<i64>() as u64;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "BF16", "shape": dims, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let text = serde_json::to_vec(&header).unwrap();
    let mut out =
        std::io::BufWriter::new(std::fs::File::create(dir.join("model.safetensors")).unwrap());
    out.write_all(&(text.len() as u64).to_le_bytes()).unwrap();
    out.write_all(&text).unwrap();
    let mut largest = 0;
    for (i, (_, dims)) in tensors.iter().enumerate() {
        let n = dims.iter().product::<i64>();
        largest = largest.max(n);
        let bytes: Vec<u8> = (0..n)
            .flat_map(|j| {
                let x = (((j * 2654435761 + i as i64 * 40503) % 2001) as f32 - 1000.0) * 2e-5;
                half::bf16::from_f32(x).to_le_bytes()
            })
            .collect();
        out.write_all(&bytes).unwrap();
    }
    out.flush().unwrap();
    (offset + 8 + text.len() as u64, largest)
}

/// A ~2 GB bf16 checkpoint (62 layers, 1.07G parameters; 4.3 GB once in
/// f32) is imported tensor by tensor: the import's peak RSS stays below
/// 1.5 x its largest tensor in f32 plus a fixed 64 MiB, and what it wrote
/// loads with the right values.
#[test]
fn import_streams_a_large_checkpoint_tensor_by_tensor() {
    let hf = temp_dir("large-hf");
    let (bytes, largest) = write_large_llama(&hf, 62);
    let out = temp_dir("large-ours");
    let report = sharedmoe_ok(&[
        "checkpoint",
        "import-hf",
        hf.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let peak: u64 = report
        .split("peak RSS ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no peak RSS in: {report}"));
    let tensor = 4 * largest as u64;
    let bound = tensor * 3 / 2 + (64 << 20);
    println!(
        "imported {bytes} bytes of bf16: peak RSS {} MiB, largest tensor {} MiB in f32, bound {} MiB",
        peak >> 20,
        tensor >> 20,
        bound >> 20
    );
    assert!(peak > 0, "{report}");
    assert!(
        peak < bound,
        "peak RSS {peak} >= {bound} (largest tensor {tensor} bytes)"
    );
    // Spot-check the written file without loading 4 GB: its header, and
    // the first values of the embedding (tensor 0 of the source).
    use std::io::Read;
    let mut f = std::fs::File::open(out.join("model.safetensors")).unwrap();
    let mut len = [0u8; 8];
    f.read_exact(&mut len).unwrap();
    let mut text = vec![0u8; u64::from_le_bytes(len) as usize];
    f.read_exact(&mut text).unwrap();
    let header: serde_json::Value = serde_json::from_slice(&text).unwrap();
    assert_eq!(header.as_object().unwrap().len(), 1 + 62 * 9 + 1);
    assert_eq!(
        header["model.layers.61.mlp.down_proj.weight"]["shape"],
        serde_json::json!([1024, 4096])
    );
    let embed = &header["model.embed_tokens.weight"];
    assert_eq!(embed["dtype"], "F32");
    assert_eq!(embed["data_offsets"][0], 0);
    let mut first = [0u8; 16];
    f.read_exact(&mut first).unwrap();
    for j in 0..4i64 {
        let want = half::bf16::from_f32(((j * 2654435761 % 2001) as f32 - 1000.0) * 2e-5).to_f32();
        let b = &first[4 * j as usize..4 * j as usize + 4];
        assert_eq!(
            f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            want,
            "embedding value {j}"
        );
    }
    let _ = std::fs::remove_dir_all(&hf);
    let _ = std::fs::remove_dir_all(&out);
}

/// The cross-entropy `sharedmoe eval` prints for `ckpt` over `batches`
/// batches of the shipped sample.
fn eval_ce(ckpt: &Path, batches: usize) -> f64 {
    let out = sharedmoe_ok(&[
        "eval",
        "--ckpt",
        ckpt.to_str().unwrap(),
        "--data",
        "data/fineweb-sample",
        "--tokenizer",
        "data/tokenizer.json",
        "--batches",
        &batches.to_string(),
    ]);
    out.split("cross-entropy ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no cross-entropy in: {out}"))
}

/// `sharedmoe experts` on `ckpt` over `batches` batches of the shipped
/// sample: (layer, expert, count, mass) per row of `expert_counts.csv`,
/// and the printed report. Per-layer experts write no overlap files.
fn expert_usage(ckpt: &Path, batches: usize) -> (Vec<(u64, u64, u64, f64)>, String) {
    let out = ckpt.join("experts-test");
    let text = sharedmoe_ok(&[
        "experts",
        "--ckpt",
        ckpt.to_str().unwrap(),
        "--data",
        "data/fineweb-sample",
        "--tokenizer",
        "data/tokenizer.json",
        "--batches",
        &batches.to_string(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!out.join("layer_overlap.csv").exists());
    assert!(out.join("expert_heatmap.png").exists());
    let rows = std::fs::read_to_string(out.join("expert_counts.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let n = |i: usize| f[i].parse::<u64>().unwrap();
            (n(0), n(1), n(2), f[4].parse::<f64>().unwrap())
        })
        .collect();
    (rows, text)
}

/// Our own tiny-moe out through export-hf and back through import-hf:
/// `eval` gives the same cross-entropy on the same rows, `generate`
/// decodes, `experts` counts the same routing, and `train --init`
/// continues from the imported weights. No
/// Python involved.
#[test]
fn a_tiny_moe_round_trips_through_hugging_face_files() {
    let run = temp_dir("roundtrip-run");
    sharedmoe_ok(&[
        "train",
        "--config",
        "configs/tiny-moe.toml",
        "--set",
        "train.steps=6",
        "--set",
        "train.warmup_steps=1",
        "--set",
        &format!("run.dir={}", run.display()),
    ]);
    let trained = sharedmoe::ckpt::latest(&run).expect("a checkpoint");
    let hf = temp_dir("roundtrip-hf");
    let back = temp_dir("roundtrip-back");
    sharedmoe_ok(&[
        "checkpoint",
        "export-hf",
        trained.to_str().unwrap(),
        hf.to_str().unwrap(),
    ]);
    sharedmoe_ok(&[
        "checkpoint",
        "import-hf",
        hf.to_str().unwrap(),
        back.to_str().unwrap(),
    ]);
    // The run's micro-batch is 4 rows, the import's recorded one 1: the
    // same 8 rows are 2 batches of one and 8 of the other.
    let (a, b) = (eval_ce(&trained, 2), eval_ce(&back, 8));
    assert!(rel(b, a) < 1e-5, "eval after the round trip {b} vs {a}");
    let text = sharedmoe_ok(&[
        "generate",
        "--ckpt",
        back.to_str().unwrap(),
        "--prompt",
        "The history of",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--tokenizer",
        "data/tokenizer.json",
    ]);
    assert!(text.starts_with("The history of"), "{text}");
    // `experts`: each MoE layer's own router (layers 0 and 2; layer 1 is
    // dense), the same routing before and after the round trip.
    let (trained_usage, text) = expert_usage(&trained, 2);
    assert!(
        text.contains("512 tokens (2 batches) through 2 MoE layers with 8 experts each")
            && text.contains("layer  2: e"),
        "{text}"
    );
    let (back_usage, _) = expert_usage(&back, 8);
    assert_eq!(
        trained_usage.iter().map(|r| (r.0, r.1)).collect::<Vec<_>>(),
        [0, 2]
            .iter()
            .flat_map(|&l| (0..8).map(move |e| (l, e)))
            .collect::<Vec<_>>()
    );
    for layer in [0, 2] {
        let rows = trained_usage.iter().filter(|r| r.0 == layer);
        let chosen: u64 = rows.clone().map(|r| r.2).sum();
        let mass: f64 = rows.map(|r| r.3).sum();
        assert_eq!(
            chosen,
            512 * 2,
            "layer {layer}: every token counted k times"
        );
        assert!(
            (mass - 1.0).abs() < 1e-4,
            "layer {layer}: mass {mass} (norm_topk_prob)"
        );
    }
    for (a, b) in trained_usage.iter().zip(&back_usage) {
        // Two batch shapes may round a near-tie either way, nothing more.
        assert!(
            a.0 == b.0 && a.1 == b.1 && a.2.abs_diff(b.2) <= 3,
            "{a:?} vs {b:?}"
        );
    }
    let run2 = temp_dir("roundtrip-continue");
    sharedmoe_ok(&[
        "train",
        "--config",
        "configs/tiny-moe.toml",
        "--init",
        back.to_str().unwrap(),
        "--set",
        "train.steps=2",
        "--set",
        "train.warmup_steps=1",
        "--set",
        &format!("run.dir={}", run2.display()),
    ]);
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(run2.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    // A fresh tiny-moe starts near ln 32000 = 10.37; the imported
    // weights start where training left them.
    let loss = first["loss"].as_f64().unwrap();
    assert!(
        loss < 9.5,
        "train --init from the import starts at loss {loss}"
    );
}
