//! `sharedmoe compress` and compressed checkpoints end to end, on the real
//! CPU plugin: NF4 dequantised inside a compiled program equals the host
//! codec bit for bit; compressed checkpoints are read by `eval`,
//! `generate`, `checkpoint inspect` and `checkpoint export-hf`; the NF4
//! export loads in Hugging Face transformers with bitsandbytes (CPU torch
//! in `target/torch-venv`) and gives our logits; `experiment compress`
//! writes its table. The codec against bitsandbytes is `tests/nf4.rs`,
//! SparseGPT against its reference `tests/sparsegpt.rs`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::{sharedmoe, sharedmoe_ok};
use rand::Rng;
use safetensors::SafeTensors;
use sharedmoe::compress::nf4::Nf4Tensor;
use sharedmoe::graph::{DType, Graph, HostTensor, TensorType};
use sharedmoe::model::params::Init;
use sharedmoe::model::stored::{declare_stored, Storage, StoredTensor};
use sharedmoe::model::{ParamSpec, Role};

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sharedmoe-compress-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A tiny dense model trained for 40 steps on the shipped sample (shared
/// by the tests of this binary).
fn trained() -> &'static Path {
    static CKPT: OnceLock<PathBuf> = OnceLock::new();
    CKPT.get_or_init(|| {
        let run = temp("run");
        let out = sharedmoe_ok(&[
            "train",
            "--config",
            "configs/tiny-dense.toml",
            "--set",
            &format!("run.dir={}", run.display()),
            "--set",
            "train.steps=40",
            "--set",
            "train.checkpoint_every=40",
            "--set",
            "train.eval_every=0",
        ]);
        let _ = out;
        run.join("checkpoints/step_00000040")
    })
}

/// Compresses the trained model into a fresh directory with `args`.
fn compressed(name: &str, args: &[&str]) -> PathBuf {
    let out = temp(name);
    let mut all = vec![
        "compress",
        "--ckpt",
        trained().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    sharedmoe_ok(&all);
    out
}

fn eval_ce(ckpt: &Path) -> f64 {
    let out = sharedmoe_ok(&["eval", "--ckpt", ckpt.to_str().unwrap()]);
    let at = out.find("cross-entropy ").expect("a CE line") + "cross-entropy ".len();
    out[at..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn nf4_dequantised_inside_the_program_equals_the_host_codec() {
    let mut rng = common::rng(7);
    for dims in [vec![3, 70], vec![5, 13], vec![130, 257]] {
        let n: i64 = dims.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| rng.gen_range(-1.0f32..1.0) * if rng.gen_bool(0.05) { 8.0 } else { 1.0 })
            .collect();
        for double_quant in [false, true] {
            let q = Nf4Tensor::quantize(&values, &dims, double_quant);
            let spec = ParamSpec {
                name: "w".into(),
                dims: dims.clone(),
                init: Init::Ones,
                role: Role::Mlp,
            };
            let g = Graph::new();
            let w = declare_stored(&g, &spec, Storage::Nf4 { double_quant }).unwrap();
            let program = g.build(&[&w]).unwrap().compile(common::client()).unwrap();
            let stored = StoredTensor::Nf4(q.clone());
            let inputs: Vec<HostTensor> = stored
                .host_arrays(&dims)
                .into_iter()
                .map(|a| match a {
                    sharedmoe::model::stored::HostArray::U8(v, d) => HostTensor {
                        ty: TensorType::new(DType::U8, &d),
                        bytes: v.to_vec(),
                    },
                    sharedmoe::model::stored::HostArray::F32(v, d) => HostTensor {
                        ty: TensorType::new(DType::F32, &d),
                        bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    },
                    sharedmoe::model::stored::HostArray::BF16(..) => unreachable!(),
                })
                .collect();
            let got = program.run(common::client(), &inputs).unwrap()[0].to_f64();
            let want = q.dequantize();
            assert_eq!(got.len(), want.len());
            // Plain scales: one f32 multiply, bit for bit. Double-quantised
            // scales are code * nested + offset, which XLA's CPU compiler
            // contracts into one fused multiply-add (one rounding, not
            // two): the scale moves by 1 ulp, the weight by up to 3
            // (measured), 4e-7 relative.
            let ulps = if double_quant { 4 } else { 0 };
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let (g, w) = (*g as f32, *w);
                let apart = (g.to_bits() as i64 - w.to_bits() as i64).abs();
                assert!(
                    apart <= ulps,
                    "{dims:?} double_quant {double_quant}: element {i}: program {g} host {w} ({apart} ulps)"
                );
            }
        }
    }
}

#[test]
fn compressed_checkpoints_are_read_by_eval_generate_and_inspect() {
    let dense = trained();
    let nf4 = compressed("nf4", &["--quant", "nf4", "--double-quant"]);
    let bf16 = compressed("bf16", &["--quant", "bf16"]);
    let hybrid = compressed(
        "hybrid",
        &[
            "--sparsity",
            "0.5",
            "--samples",
            "8",
            "--quant",
            "nf4",
            "--double-quant",
        ],
    );
    // Sizes and sparsity as inspect reports them.
    let report = sharedmoe_ok(&["checkpoint", "inspect", nf4.to_str().unwrap()]);
    let line = report
        .lines()
        .find(|l| l.trim_start().starts_with("nf4 (double-quantised scales)"))
        .unwrap_or_else(|| panic!("no NF4 line in\n{report}"));
    let bits: f64 = line
        .split("bits/param")
        .next()
        .unwrap()
        .split_whitespace()
        .last()
        .unwrap()
        .parse()
        .unwrap();
    // 4 bits + 8 per 64 + 32 per 64 * 256, and the tiny tensors' partial
    // nested blocks.
    assert!((4.125..4.2).contains(&bits), "{line}");
    let report = sharedmoe_ok(&["checkpoint", "inspect", hybrid.to_str().unwrap()]);
    let line = report
        .lines()
        .find(|l| l.trim_start().starts_with("nf4 (double-quantised scales)"))
        .unwrap();
    let zeros: f64 = line
        .rsplit("bits/param,")
        .next()
        .unwrap()
        .trim()
        .trim_end_matches("% zeros")
        .parse()
        .unwrap();
    assert!(
        zeros >= 50.0,
        "SparseGPT 50% + NF4 keeps its zeros (NF4 has an exact 0): {line}"
    );

    // Perplexity: NF4 and bf16 stay close to the dense model.
    let (ce_dense, ce_nf4, ce_bf16) = (eval_ce(dense), eval_ce(&nf4), eval_ce(&bf16));
    eprintln!("CE dense {ce_dense} nf4 {ce_nf4} bf16 {ce_bf16}");
    assert!((ce_nf4 - ce_dense).abs() < 0.05, "{ce_nf4} vs {ce_dense}");
    assert!((ce_bf16 - ce_dense).abs() < 0.01, "{ce_bf16} vs {ce_dense}");
    assert_ne!(ce_nf4, ce_dense, "NF4 weights are not the dense ones");

    // Generation on 4-bit weights: the cached step equals the reference.
    let generate = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--ckpt",
            nf4.to_str().unwrap(),
            "--prompt",
            "The",
            "--max-tokens",
            "12",
            "--temperature",
            "0",
        ];
        args.extend_from_slice(extra);
        sharedmoe_ok(&args)
    };
    let cached = generate(&[]);
    assert!(cached.len() > "The".len(), "{cached}");
    assert_eq!(cached, generate(&["--no-cache"]));

    // Training refuses compressed weights with the reason.
    let out = sharedmoe(&[
        "train",
        "--config",
        "configs/tiny-dense.toml",
        "--init",
        nf4.to_str().unwrap(),
        "--set",
        &format!("run.dir={}", temp("refused").display()),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("U8") || err.contains("compressed"), "{err}");
}

#[test]
fn the_stored_path_scores_f32_weights_as_the_trainer_does() {
    use sharedmoe::cli::eval::{evaluate, mean_ce_stored, CheckpointRows, EvalArgs};
    let dense = trained();
    let rows = CheckpointRows::validation(dense.to_path_buf(), None);
    let trainer = evaluate(&EvalArgs { rows }).unwrap().ce;
    let rows = CheckpointRows::validation(dense.to_path_buf(), None);
    let mut cfg = rows.config().unwrap();
    let batches = rows.batches(&mut cfg).unwrap();
    let weights =
        sharedmoe::ckpt::compressed::load(dense, &sharedmoe::model::param_specs(&cfg.model))
            .unwrap();
    let stored = mean_ce_stored(&cfg, &weights.params, &batches, None).unwrap();
    assert!(
        (stored - trainer).abs() < 1e-5,
        "stored-weights loss {stored} vs the trainer's eval {trainer}"
    );
}

#[test]
fn compress_rejects_bad_requests_with_the_reason() {
    let dense = trained().to_str().unwrap().to_string();
    let out_dir = temp("bad");
    let out = out_dir.to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (&["--pattern", "3:2"], "3:2"),
        (&["--sparsity", "1.5"], "1.5"),
        (&["--double-quant"], "--quant nf4"),
        (&["--pattern", "0.5"], "n:m"),
    ];
    for (extra, expected) in cases {
        let mut args = vec!["compress", "--ckpt", &dense, "--out", out];
        args.extend_from_slice(extra);
        let o = sharedmoe(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{extra:?} succeeded");
        assert!(err.contains(expected), "{extra:?}: {err}");
        assert!(!out_dir.exists(), "{extra:?} wrote {out}");
    }
}

#[test]
fn two_four_magnitude_pruning_leaves_two_of_every_four() {
    let out = compressed("m24", &["--pattern", "2:4", "--method", "magnitude"]);
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut checked = 0;
    for name in st.names() {
        let linear = name.contains("_proj.");
        let t = st.tensor(name).unwrap();
        let v: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let zeros_per_group: Vec<usize> = v
            .chunks_exact(4)
            .map(|g| g.iter().filter(|&&x| x == 0.0).count())
            .collect();
        if linear {
            assert!(
                zeros_per_group.iter().all(|&z| z == 2),
                "{name}: a group of 4 without exactly 2 zeros"
            );
            checked += 1;
        } else {
            assert!(
                zeros_per_group.iter().all(|&z| z == 0),
                "{name} (not a block linear) was pruned"
            );
        }
    }
    assert_eq!(checked, 14, "2 layers x 7 linears");
}

#[test]
fn nf4_export_loads_in_transformers_with_bitsandbytes_and_gives_our_logits() {
    let python = common::torch_python();
    let nf4 = compressed("export", &["--quant", "nf4", "--double-quant"]);
    let hf = temp("hf");
    sharedmoe_ok(&[
        "checkpoint",
        "export-hf",
        nf4.to_str().unwrap(),
        hf.to_str().unwrap(),
    ]);
    // The layout: bitsandbytes' keys for every block linear, and
    // transformers' quantization_config.
    let bytes = std::fs::read(hf.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let w = "model.layers.1.mlp.down_proj.weight";
    for suffix in [
        "",
        ".absmax",
        ".quant_map",
        ".nested_absmax",
        ".nested_quant_map",
        ".quant_state.bitsandbytes__nf4",
    ] {
        assert!(
            st.tensor(&format!("{w}{suffix}")).is_ok(),
            "{w}{suffix} missing"
        );
    }
    let state = st
        .tensor(&format!("{w}.quant_state.bitsandbytes__nf4"))
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(state.data()).unwrap();
    assert_eq!(json["quant_type"], "nf4");
    assert_eq!(json["blocksize"], 64);
    assert_eq!(json["nested_blocksize"], 256);
    assert_eq!(json["nested_dtype"], "float32");
    assert_eq!(json["dtype"], "float32");
    assert_eq!(json["shape"], serde_json::json!([64, 128]));
    assert!(json["nested_offset"].is_number());
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(hf.join("config.json")).unwrap()).unwrap();
    let q = &config["quantization_config"];
    assert_eq!(q["quant_method"], "bitsandbytes");
    assert_eq!(q["load_in_4bit"], true);
    assert_eq!(q["bnb_4bit_quant_type"], "nf4");
    assert_eq!(q["bnb_4bit_use_double_quant"], true);
    assert_eq!(q["bnb_4bit_quant_storage"], "uint8");

    // Logits of transformers (Linear4bit modules) and ours.
    let tokens: Vec<i32> = vec![17, 300, 5, 99, 250, 1024, 7, 31000];
    let hf_out = std::process::Command::new(&python)
        .arg("tests/python/bnb_logits.py")
        .arg(&hf)
        .arg(serde_json::to_string(&tokens).unwrap())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        hf_out.status.success(),
        "{}",
        String::from_utf8_lossy(&hf_out.stderr)
    );
    let hf: serde_json::Value = serde_json::from_slice(&hf_out.stdout).unwrap();
    assert_eq!(
        hf["linear_class"], "Linear4bit",
        "transformers did not load 4-bit layers"
    );
    let theirs: Vec<f64> = serde_json::from_value(hf["logits"].clone()).unwrap();
    eprintln!(
        "bitsandbytes' fused AVX512-BF16 CPU kernel is {} from its f32 path (bf16 activations)",
        hf["bf16_kernel_max_diff"]
    );
    let ours = our_logits(&nf4, &tokens);
    assert_eq!(ours.len(), theirs.len());
    let scale = theirs.iter().fold(0f64, |m, x| m.max(x.abs()));
    let worst = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    eprintln!("logits: max |ours - transformers| {worst:.3e} (max |logit| {scale:.3})");
    assert!(worst <= 1e-4 * scale.max(1.0), "max |diff| {worst}");
}

/// Our logits [S * V] of `tokens` from the compressed checkpoint `dir`,
/// through the full forward on its stored weights.
fn our_logits(dir: &Path, tokens: &[i32]) -> Vec<f64> {
    let cfg = sharedmoe::cli::eval::checkpoint_config(dir).unwrap();
    let specs = sharedmoe::model::param_specs(&cfg.model);
    let weights = sharedmoe::ckpt::compressed::load(dir, &specs).unwrap();
    let program = sharedmoe::model::decode::full_forward_program(
        &cfg.model,
        &weights.layout(),
        tokens.len() as i64,
    )
    .unwrap()
    .compile(common::client())
    .unwrap();
    let client = common::client();
    let dev = &client.devices()[0];
    let buffers = sharedmoe::generate::upload_stored(client, dev, &weights.params).unwrap();
    let t = client
        .buffer_from_host(tokens, &[1, tokens.len() as i64], dev)
        .unwrap();
    let args = buffers
        .iter()
        .chain(std::iter::once(&t))
        .map(sharedmoe::runtime::Arg::Borrowed)
        .collect();
    let out = program.execute(vec![args]).unwrap();
    out[0][0]
        .to_host::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

#[test]
fn experiment_compress_writes_every_variant_and_the_table() {
    let out = temp("experiment");
    let run = || {
        sharedmoe_ok(&[
            "experiment",
            "compress",
            "--scale",
            "tiny",
            "--ckpt",
            trained().to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
    };
    run();
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    let variants = results["variants"].as_array().unwrap();
    let labels: Vec<&str> = variants
        .iter()
        .map(|v| v["variant"].as_str().unwrap())
        .collect();
    assert_eq!(
        labels,
        [
            "dense f32",
            "bf16",
            "magnitude 50%",
            "SparseGPT 50%",
            "SparseGPT 2:4",
            "NF4 (double quant)",
            "NF4 without double quant",
            "SparseGPT 50% + NF4 (the seed's hybrid)"
        ]
    );
    for l in &labels {
        assert!(
            summary.contains(&format!("| {l} |")),
            "{l} not in summary.md"
        );
    }
    let get = |i: usize, k: &str| variants[i][k].as_f64().unwrap();
    for i in 0..variants.len() {
        assert!(get(i, "perplexity").is_finite() && get(i, "generate_tokens_per_s") > 0.0);
    }
    // Device bytes: bf16 halves every tensor; NF4 shrinks the block linears
    // (the tiny model is mostly its f32 embedding table); double
    // quantisation saves on the scales.
    assert_eq!(get(1, "device_bytes") * 2.0, get(0, "device_bytes"));
    assert!(get(5, "device_bytes") < get(6, "device_bytes"));
    assert!(get(6, "device_bytes") < get(0, "device_bytes"));
    assert!(
        summary.contains("Table 3.1"),
        "the seed's claims are quoted"
    );
    // A rerun reuses the variants (nothing is compressed again).
    let before = std::fs::metadata(out.join("nf4-dq/model.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    run();
    let after = std::fs::metadata(out.join("nf4-dq/model.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after);
}

#[test]
fn calibration_grams_of_the_first_block_equal_the_host_computation() {
    // Layer 0's attention input is RMSNorm(embedding row) * gain: its Gram
    // matrix computed on the host from the checkpoint's tensors.
    let dense = trained();
    let cfg = sharedmoe::cli::eval::checkpoint_config(dense).unwrap();
    let m = &cfg.model;
    let specs = sharedmoe::model::param_specs(m);
    let c = sharedmoe::ckpt::load(dense, &specs, sharedmoe::ckpt::Purpose::Weights).unwrap();
    let tensor = |name: &str| &c.params.iter().find(|(n, _, _)| n == name).unwrap().2;
    let (table, gain) = (
        tensor("model.embed_tokens.weight"),
        tensor("model.layers.0.input_layernorm.weight"),
    );
    let d = m.hidden_size as usize;
    let (batch, seq) = (2i64, 16i64);
    let tokens: Vec<i32> = (0..batch * seq).map(|i| (i * 977 % 31000) as i32).collect();
    let mut want = vec![0f64; d * d];
    for &t in &tokens {
        let e = &table[t as usize * d..(t as usize + 1) * d];
        let ms = e.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / d as f64;
        let r: Vec<f64> = e
            .iter()
            .zip(gain)
            .map(|(&x, &g)| x as f64 / (ms + m.rms_norm_eps).sqrt() * g as f64)
            .collect();
        for i in 0..d {
            for j in 0..d {
                want[i * d + j] += r[i] * r[j];
            }
        }
    }
    let program = sharedmoe::model::calibration::gram_program(m, batch, seq, 0)
        .unwrap()
        .compile(common::client())
        .unwrap();
    let rows: Vec<Vec<i32>> = tokens.chunks(seq as usize).map(<[i32]>::to_vec).collect();
    let inputs = common::checkpoint_inputs(&c, &rows);
    let outs = program.run(common::client(), &inputs).unwrap();
    assert_eq!(outs.len(), 4, "q/k/v, o, gate/up and down inputs");
    let got = outs[0].to_f64();
    let scale = want.iter().fold(0f64, |a, x| a.max(x.abs()));
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 * scale,
            "Gram [{}, {}]: program {g} host {w}",
            i / d,
            i % d
        );
    }
    // The o input is [B, S, H*Hd], the down input [B, S, F].
    assert_eq!(outs[1].ty.dims, vec![m.q_dim(), m.q_dim()]);
    assert_eq!(
        outs[3].ty.dims,
        vec![m.intermediate_size, m.intermediate_size]
    );
}
