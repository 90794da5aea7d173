//! `checkpoint export-hf` read back by Hugging Face transformers itself: a
//! tiny dense model trained for a few steps is exported, loaded with
//! `FlaxAutoModelForCausalLM` and `AutoTokenizer` (pinned packages installed
//! on first use into their own venv, `target/hf-venv`; see
//! `tests/python/hf_loss.py`), and its cross-entropy on fixed token rows
//! must equal ours (the model traced and compiled on the CPU plugin) to
//! 1e-4; the tokenizer must give our ids. A shared-MoE checkpoint is
//! refused.

mod common;

use common::{sharedmoe, sharedmoe_ok};

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::SafeTensors;
use sharedmoe::train::Config;

/// transformers 4.46.3 (the 4.x line still has the Flax models; 5.x
/// dropped them), run on JAX's CPU backend: PyPI's Linux `torch` wheel
/// depends on several GB of CUDA packages, jax/jaxlib are ~100 MB. Every
/// package is pinned (the full set pip resolved for these on Python 3.11)
/// so the reference is the same on every machine and run.
const PACKAGES: &[&str] = &[
    "transformers==4.46.3",
    "tokenizers==0.20.3",
    "flax==0.10.2",
    "jax==0.4.35",
    "jaxlib==0.4.35",
    "numpy==2.4.6",
    "scipy==1.17.1",
    "ml_dtypes==0.6.0",
    "safetensors==0.8.0",
    "huggingface_hub==0.36.2",
    "absl-py==2.5.1",
    "certifi==2026.10.19.post1",
    "charset-normalizer==3.5.3",
    "chex==0.1.90",
    "etils==1.15.0",
    "filelock==4.3.1",
    "fsspec==2026.9.0",
    "hf-xet==1.8.0",
    "humanize==4.17.0",
    "idna==3.20",
    "markdown-it-py==4.3.0",
    "mdurl==0.1.2",
    "msgpack==1.2.4",
    "nest-asyncio==1.6.0",
    "opt_einsum==3.4.0",
    "optax==0.2.5",
    "orbax-checkpoint==0.11.5",
    "packaging==26.4",
    "protobuf==7.36.2",
    "Pygments==2.21.0",
    "PyYAML==6.0.4",
    "regex==2026.11.19",
    "requests==2.34.2",
    "rich==15.0.0",
    "simplejson==4.3.0",
    "tensorstore==0.1.86",
    "toolz==1.2.0",
    "tqdm==4.70.1",
    "typing_extensions==4.16.0",
    "urllib3==2.8.0",
    "zipp==4.1.2",
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The venv's python, creating the venv and installing PACKAGES unless a
/// previous run left the marker listing exactly them. A failed install
/// fails the test with pip's output.
fn hf_python() -> PathBuf {
    common::python_venv("hf-venv", PACKAGES)
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sharedmoe-hf-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The checkpoint's config (from its state.json).
fn checkpoint_config(ckpt: &Path) -> Config {
    let state: sharedmoe::ckpt::TrainingState =
        serde_json::from_slice(&std::fs::read(ckpt.join("state.json")).unwrap()).unwrap();
    Config::parse(&state.config_toml, &[]).unwrap()
}

/// Our cross-entropy of `rows` ([B][S+1]): the mean over the batch, and
/// each row's, through the model traced in f32 and compiled on the CPU.
fn our_ce(ckpt: &Path, rows: &[Vec<i32>]) -> (f64, Vec<f64>) {
    let got: Vec<f64> = common::run_checkpoint_model(ckpt, rows, |model, win| {
        let mut outs = vec![model.loss(win).unwrap().ce];
        for i in 0..rows.len() as i64 {
            let row = win.slice_axis(0, i, i + 1).unwrap();
            outs.push(model.loss(&row).unwrap().ce);
        }
        outs
    })
    .iter()
    .map(|h| h.to_f64()[0])
    .collect();
    (got[0], got[1..].to_vec())
}

/// The tensor names HF's LlamaForCausalLM has for a tied model of
/// `layers` layers (lm_head.weight is tied to the embedding, not stored).
fn llama_names(layers: i64) -> BTreeSet<String> {
    let mut names = BTreeSet::from([
        "model.embed_tokens.weight".to_string(),
        "model.norm.weight".to_string(),
    ]);
    for i in 0..layers {
        for n in [
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        ] {
            names.insert(format!("model.layers.{i}.{n}"));
        }
    }
    names
}

const TEXT: &str = "The water cycle describes how water evaporates from the surface of the \
earth, rises into the atmosphere, cools and condenses into clouds, and falls again as \
precipitation. Students in the fourth grade can observe it with a clear plastic bag taped \
to a sunny window: droplets form on the inside and run down to the bottom. Teachers often \
pair the experiment with a short reading about rivers, glaciers and groundwater, so that \
the class sees where the water goes between one rain and the next.";

#[test]
fn export_hf_matches_transformers_loss_and_tokenizer() {
    let dir = temp_dir("dense");
    let run_dir = dir.join("run");
    sharedmoe_ok(&[
        "train",
        "--config",
        "configs/tiny-dense.toml",
        "--set",
        "train.steps=5",
        "--set",
        "train.warmup_steps=1",
        "--set",
        "train.eval_every=0",
        "--set",
        &format!("run.dir={}", run_dir.display()),
    ]);
    let ckpt = run_dir.join("checkpoints/step_00000005");
    let out = dir.join("hf");
    let printed = sharedmoe_ok(&[
        "checkpoint",
        "export-hf",
        ckpt.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert!(printed.contains("LlamaForCausalLM"), "{printed}");
    // Exporting again replaces the export; a directory holding anything
    // else (here the run itself) is never replaced.
    sharedmoe_ok(&[
        "checkpoint",
        "export-hf",
        ckpt.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let res = sharedmoe(&[
        "checkpoint",
        "export-hf",
        ckpt.to_str().unwrap(),
        run_dir.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        !res.status.success() && err.contains("refusing to replace"),
        "{err}"
    );
    assert!(ckpt.join("state.json").exists());
    let cfg = checkpoint_config(&ckpt);
    let m = &cfg.model;

    // The files, config.json and the tensor names HF expects.
    let mut files: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    let json = |f: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(out.join(f)).unwrap()).unwrap()
    };
    let hc = json("config.json");
    let expect = serde_json::json!({
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": m.hidden_size,
        "intermediate_size": m.intermediate_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.hidden_size / m.num_heads,
        "vocab_size": m.vocab_size,
        "max_position_embeddings": cfg.train.seq_len,
        "tie_word_embeddings": true,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "torch_dtype": "float32",
        "bos_token_id": 0,
        "eos_token_id": 0,
    });
    for (k, v) in expect.as_object().unwrap() {
        assert_eq!(&hc[k], v, "config.json `{k}`: {hc}");
    }
    assert!((hc["rms_norm_eps"].as_f64().unwrap() - m.rms_norm_eps).abs() < 1e-12);
    assert_eq!(hc["rope_theta"].as_f64().unwrap(), m.rope_theta);
    assert_eq!(json("generation_config.json")["eos_token_id"], 0);
    assert_eq!(
        json("tokenizer_config.json")["tokenizer_class"],
        "PreTrainedTokenizerFast"
    );
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        std::fs::read(root().join(&cfg.data.tokenizer)).unwrap()
    );
    let weights = std::fs::read(out.join("model.safetensors")).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&weights).unwrap();
    assert_eq!(
        meta.metadata().as_ref().and_then(|m| m.get("format")),
        Some(&"pt".to_string())
    );
    let st = SafeTensors::deserialize(&weights).unwrap();
    let names: BTreeSet<String> = st.names().into_iter().cloned().collect();
    assert_eq!(names, llama_names(m.num_layers));

    // Token rows: two cut from real text (joined by end-of-text), two
    // pseudo-random over the whole vocabulary.
    let s1 = (cfg.train.seq_len + 1) as usize;
    let tk = sharedmoe::data::tokenizer::load(&root().join(&cfg.data.tokenizer)).unwrap();
    let mut text_ids: Vec<i32> = vec![];
    while text_ids.len() < 2 * s1 {
        text_ids.push(0);
        text_ids.extend(
            sharedmoe::data::tokenizer::encode(&tk, TEXT)
                .unwrap()
                .into_iter()
                .map(|x| x as i32),
        );
    }
    let mut rows: Vec<Vec<i32>> = text_ids.chunks(s1).take(2).map(|c| c.to_vec()).collect();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..2 {
        rows.push(
            (0..s1)
                .map(|_| {
                    x = x
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    ((x >> 33) % m.vocab_size as u64) as i32
                })
                .collect(),
        );
    }
    let texts = [
        TEXT,
        "Hello, world! Ünïcödé, tabs\tand  double spaces.",
        "two documents<|endoftext|>joined",
    ];
    let input = dir.join("input.json");
    std::fs::write(
        &input,
        serde_json::to_vec(&serde_json::json!({"rows": rows, "texts": texts})).unwrap(),
    )
    .unwrap();

    let python = hf_python();
    let res = Command::new(&python)
        .arg(root().join("tests/python/hf_loss.py"))
        .arg(&out)
        .arg(&input)
        .output()
        .expect("running the venv's python");
    assert!(
        res.status.success(),
        "hf_loss.py failed:\n{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let hf: serde_json::Value = serde_json::from_slice(&res.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&res.stdout)));
    eprintln!("transformers: {hf}");

    let (ce, ce_rows) = our_ce(&ckpt, &rows);
    let hf_ce = hf["ce"].as_f64().unwrap();
    eprintln!(
        "CE ours {ce:.7} transformers {hf_ce:.7} |diff| {:.2e}",
        (ce - hf_ce).abs()
    );
    assert!(
        (ce - hf_ce).abs() < 1e-4,
        "CE: ours {ce} vs transformers {hf_ce}"
    );
    for (i, (a, b)) in ce_rows
        .iter()
        .zip(hf["ce_rows"].as_array().unwrap())
        .enumerate()
    {
        let b = b.as_f64().unwrap();
        assert!(
            (a - b).abs() < 1e-4,
            "row {i}: ours {a} vs transformers {b}"
        );
    }
    // Trained for a few steps, not at the uniform loss: the weights matter.
    assert!(ce < (m.vocab_size as f64).ln() - 0.05, "CE {ce}");

    assert_eq!(hf["tokenizer_class"], "PreTrainedTokenizerFast", "{hf}");
    assert_eq!(hf["eos_token_id"], 0, "{hf}");
    assert_eq!(hf["bos_token_id"], 0, "{hf}");
    for (i, t) in texts.iter().enumerate() {
        let ours = sharedmoe::data::tokenizer::encode(&tk, t).unwrap();
        let theirs: Vec<u32> = hf["ids"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(theirs, ours, "ids of {t:?}");
        assert_eq!(hf["decoded"][i], *t, "AutoTokenizer round trip");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn export_hf_refuses_a_shared_moe_checkpoint() {
    let dir = temp_dir("moe");
    let ckpt = dir.join("step_00000000");
    sharedmoe_ok(&[
        "init",
        "--config",
        "configs/tiny-sharedmoe.toml",
        "--out",
        ckpt.to_str().unwrap(),
    ]);
    let out = dir.join("hf");
    let res = sharedmoe(&[
        "checkpoint",
        "export-hf",
        ckpt.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success(), "exported a shared MoE: {err}");
    assert!(
        err.contains("shared-MoE checkpoint") && err.contains("no Hugging Face architecture"),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written");
    std::fs::remove_dir_all(&dir).unwrap();
}
