//! Shared helpers for tests that trace, compile and run graphs on the real
//! CPU PJRT plugin.
#![allow(dead_code)]

use std::sync::OnceLock;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sharedmoe::graph::{DType, Graph, HostTensor, Result, Tensor, TensorType};
use sharedmoe::runtime::Client;

/// One CPU client with 4 devices per test binary (PJRT clients are
/// thread-safe; creating one per test would only cost time).
pub fn client() -> &'static Client {
    static CLIENT: OnceLock<Client> = OnceLock::new();
    CLIENT.get_or_init(|| Client::cpu(4).expect("CPU PJRT client (run scripts/setup.sh first)"))
}

pub fn f32t(dims: &[i64]) -> TensorType {
    TensorType::new(DType::F32, dims)
}

pub fn f64t(dims: &[i64]) -> TensorType {
    TensorType::new(DType::F64, dims)
}

/// Traces `f` over parameters of the given types, compiles and runs it on
/// one device, and returns every output as f64.
pub fn eval<F>(inputs: &[(TensorType, Vec<f64>)], f: F) -> Vec<Vec<f64>>
where
    F: FnOnce(&Graph, &[Tensor]) -> Result<Vec<Tensor>>,
{
    eval_host(inputs, f)
        .into_iter()
        .map(|h| h.to_f64())
        .collect()
}

pub fn eval_host<F>(inputs: &[(TensorType, Vec<f64>)], f: F) -> Vec<HostTensor>
where
    F: FnOnce(&Graph, &[Tensor]) -> Result<Vec<Tensor>>,
{
    let g = Graph::new();
    let params: Vec<Tensor> = inputs
        .iter()
        .enumerate()
        .map(|(i, (ty, _))| g.param(&format!("x{i}"), ty.clone()).unwrap())
        .collect();
    let outs = f(&g, &params).expect("trace");
    let refs: Vec<&Tensor> = outs.iter().collect();
    let func = g.build(&refs).expect("build");
    let compiled = func
        .compile(client())
        .unwrap_or_else(|e| panic!("compile: {e}\n{}", func.to_mlir().unwrap()));
    let host: Vec<HostTensor> = inputs
        .iter()
        .map(|(ty, v)| HostTensor::from_f64(v, ty.clone()).unwrap())
        .collect();
    compiled.run(client(), &host).expect("run")
}

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `n` values uniform in [lo, hi).
pub fn uniform(rng: &mut ChaCha8Rng, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..n).map(|_| rng.gen_range(lo..hi)).collect()
}

/// `n` standard-normal values (Box-Muller).
pub fn normal(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let (u, v): (f64, f64) = (rng.gen_range(1e-12..1.0), rng.gen_range(0.0..1.0));
            (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
        })
        .collect()
}

pub fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs() / w.abs().max(1.0);
        assert!(err <= tol, "{what}[{i}]: got {g}, want {w} (err {err:.3e} > {tol:.1e})\n got: {got:?}\nwant: {want:?}");
    }
}

/// Checks the traced gradient of `f` against central finite differences in
/// f64. `f` maps the parameters (f64 tensors of the given shapes) to any
/// float tensor; the checked scalar is `sum(f(x) * w)` for a fixed random
/// `w`, so every output element contributes. `points` are the evaluation
/// points, one value list per input. Returns the worst relative error
/// (per input: ||fd - ad|| / ||fd||).
pub fn check_grad<F>(shapes: &[Vec<i64>], points: &[Vec<f64>], f: F) -> f64
where
    F: Fn(&Graph, &[Tensor]) -> Result<Tensor>,
{
    let g = Graph::new();
    let params: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| g.param(&format!("x{i}"), f64t(s)).unwrap())
        .collect();
    let out = f(&g, &params).expect("trace f");
    let out = out.convert(DType::F64).unwrap();
    let n_out = out.ty().num_elements() as usize;
    let mut r = rng(99);
    let w = g
        .constant(&uniform(&mut r, n_out, -1.0, 1.0), out.ty())
        .unwrap();
    let loss = out.mul(&w).unwrap().sum_all().unwrap();
    let refs: Vec<&Tensor> = params.iter().collect();
    let grads = sharedmoe::graph::grad(&loss, &refs).expect("grad");
    let mut outs = vec![&loss];
    outs.extend(grads.iter());
    let func = g.build(&outs).unwrap();
    let compiled = func
        .compile(client())
        .unwrap_or_else(|e| panic!("compile: {e}\n{}", func.to_mlir().unwrap()));

    let run = |vals: &[Vec<f64>]| -> Vec<Vec<f64>> {
        let host: Vec<HostTensor> = shapes
            .iter()
            .zip(vals)
            .map(|(s, v)| HostTensor::from_f64(v, f64t(s)).unwrap())
            .collect();
        compiled
            .run(client(), &host)
            .expect("run")
            .iter()
            .map(|h| h.to_f64())
            .collect()
    };
    let base = run(points);
    let h = 1e-6;
    let mut worst: f64 = 0.0;
    for (k, point) in points.iter().enumerate() {
        let analytic = &base[1 + k];
        let mut fd = vec![0.0; point.len()];
        for i in 0..point.len() {
            let mut plus = points.to_vec();
            let mut minus = points.to_vec();
            plus[k][i] += h;
            minus[k][i] -= h;
            fd[i] = (run(&plus)[0][0] - run(&minus)[0][0]) / (2.0 * h);
        }
        let diff: f64 = fd
            .iter()
            .zip(analytic)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = fd.iter().map(|a| a * a).sum::<f64>().sqrt();
        let rel = if norm < 1e-9 { diff } else { diff / norm };
        assert!(
            rel.is_finite(),
            "input {k}: non-finite error; fd {fd:?} ad {analytic:?}"
        );
        assert!(
            rel < 1e-6,
            "input {k}: relative error {rel:.3e}\n   fd: {fd:?}\n   ad: {analytic:?}"
        );
        worst = worst.max(rel);
    }
    worst
}

/// `target/<name>/bin/python` of a venv holding exactly `packages`,
/// created and installed unless a previous run left the marker listing
/// them. A failed install fails the test with pip's output. One install
/// at a time: two tests of one binary installing into the same venv at
/// once break each other's pip (seen: a resolver TypeError on a
/// half-written package).
pub fn python_venv(name: &str, packages: &[&str]) -> std::path::PathBuf {
    use std::process::Command;
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join(name);
    let python = venv.join("bin/python");
    let marker = venv.join("installed-packages.txt");
    let want = packages.join("\n");
    if std::fs::read_to_string(&marker).is_ok_and(|m| m == want) {
        return python;
    }
    eprintln!(
        "installing {} packages into {}",
        packages.len(),
        venv.display()
    );
    if !python.exists() {
        let st = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("running python3 -m venv (is python3 installed?)");
        assert!(
            st.success(),
            "python3 -m venv {} failed: {st}",
            venv.display()
        );
    }
    let out = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(packages)
        .output()
        .expect("running pip");
    assert!(
        out.status.success(),
        "pip install {} into {} failed ({}):\n{}{}",
        packages.join(" "),
        venv.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&marker, want).unwrap();
    python
}

/// Runs `scripts/fetch-plugin.sh ACCEL` (with `extra` options) into
/// `target/NAME/lib/python3.12/site-packages`, the way scripts/setup.sh,
/// the deploy scripts and the Dockerfile install plugins: Python 3.12
/// wheels downloaded with pip and unpacked, on whatever Python this machine
/// has. The script's marker makes later runs (and later test runs on this
/// machine) a no-op. Returns `target/NAME`, a directory that plugin
/// discovery reads like a venv (`VIRTUAL_ENV`).
pub fn fetched_plugin(name: &str, accel: &str, extra: &[&str]) -> std::path::PathBuf {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = root.join("target").join(name);
    let site = venv.join("lib/python3.12/site-packages");
    // pip from a venv of this machine's python3 (which may lack pip itself).
    let python = python_venv("fetch-venv", &["pip"]);
    let began = std::time::Instant::now();
    let out = std::process::Command::new("bash")
        .arg(root.join("scripts/fetch-plugin.sh"))
        .arg(accel)
        .arg(&site)
        .args(extra)
        .env("PIP", format!("{} -m pip", python.display()))
        .env("PYTHON", &python)
        .output()
        .expect("running scripts/fetch-plugin.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "fetch-plugin.sh {accel}: {text}");
    if !text.contains("present in") {
        eprintln!("{text}fetched {accel} in {:.0?}", began.elapsed());
    }
    venv
}

/// A site-packages tree holding libtpu as the scripts install it (see
/// [`fetched_plugin`]), for the tests that load it.
pub fn libtpu_venv() -> std::path::PathBuf {
    fetched_plugin("plugin-accel", "tpu", &[])
}

/// Runs the `sharedmoe` binary in the repository root.
pub fn sharedmoe(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_sharedmoe"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap()
}

/// Runs the binary, fails the test with its stderr unless it succeeds,
/// and returns its stdout.
pub fn sharedmoe_ok(args: &[&str]) -> String {
    let out = sharedmoe(args);
    assert!(
        out.status.success(),
        "sharedmoe {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Writes `dir/tokenizer.json`: a word-level tokenizer with
/// `<|endoftext|>` = 0, `words[i]` = i + 1 and `[UNK]` last, splitting on
/// whitespace (token ids that can be checked by hand).
pub fn word_level_tokenizer(dir: &std::path::Path, words: &[String]) -> std::path::PathBuf {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<|endoftext|>".into(), 0.into());
    for (i, w) in words.iter().enumerate() {
        vocab.insert(w.clone(), (i + 1).into());
    }
    vocab.insert("[UNK]".into(), (words.len() + 1).into());
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
    path
}

/// Runs, on the CPU plugin in f32, what `outputs(model, windows)` traces
/// of the checkpoint `ckpt`'s model (its config from its state.json) over
/// token `rows` [B][S+1] (the i32 `windows` argument); the results in
/// order.
pub fn run_checkpoint_model(
    ckpt: &std::path::Path,
    rows: &[Vec<i32>],
    outputs: impl FnOnce(&sharedmoe::model::Transformer, &Tensor) -> Vec<Tensor>,
) -> Vec<HostTensor> {
    let state: sharedmoe::ckpt::TrainingState =
        serde_json::from_slice(&std::fs::read(ckpt.join("state.json")).unwrap()).unwrap();
    let cfg = sharedmoe::train::Config::parse(&state.config_toml, &[]).unwrap();
    let specs = sharedmoe::model::param_specs(&cfg.model);
    let c = sharedmoe::ckpt::load(ckpt, &specs, sharedmoe::ckpt::Purpose::Weights).unwrap();
    let (b, s1) = (rows.len() as i64, rows[0].len() as i64);
    let g = Graph::new();
    let params = sharedmoe::model::declare_params(&g, &cfg.model).unwrap();
    let win = g
        .param("windows", TensorType::new(DType::I32, &[b, s1]))
        .unwrap();
    let model = sharedmoe::model::Transformer::new(&cfg.model, &params, DType::F32).unwrap();
    let outs = outputs(&model, &win);
    let refs: Vec<&Tensor> = outs.iter().collect();
    let compiled = g.build(&refs).unwrap().compile(client()).unwrap();
    compiled
        .run(client(), &checkpoint_inputs(&c, rows))
        .unwrap()
}

/// A checkpoint's parameters (f32) then token `rows` [B][S+1] (i32): the
/// arguments of a program over the model and windows.
pub fn checkpoint_inputs(c: &sharedmoe::ckpt::Checkpoint, rows: &[Vec<i32>]) -> Vec<HostTensor> {
    let mut host: Vec<HostTensor> = c
        .params
        .iter()
        .map(|(_, dims, v)| HostTensor {
            ty: TensorType::new(DType::F32, dims),
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        })
        .collect();
    host.push(HostTensor {
        ty: TensorType::new(DType::I32, &[rows.len() as i64, rows[0].len() as i64]),
        bytes: rows
            .iter()
            .flatten()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
    });
    host
}

/// CPU torch, transformers 5 (Qwen3-MoE exists in torch only) and
/// bitsandbytes (the NF4 reference; its CPU backend quantises, and
/// transformers loads 4-bit weights through accelerate), every
/// package pinned: the set pip resolved for torch 2.15.0 and transformers
/// 5.24.0 on Python 3.11. PyPI's Linux torch needs the CUDA libraries to
/// import, even on the CPU: about 5.6 GB, installed once per checkout.
const TORCH_PACKAGES: &[&str] = &[
    "accelerate==1.16.0",
    "annotated-doc==0.0.7",
    "bitsandbytes==0.50.2",
    "annotated-types==0.8.0",
    "anyio==4.16.0",
    "click==8.5.1",
    "cuda-bindings==13.5.0",
    "cuda-pathfinder==1.9.1",
    "cuda-toolkit==13.2.2",
    "filelock==4.3.1",
    "fsspec==2026.9.0",
    "h11==0.16.0",
    "hf-xet==1.8.0",
    "httpcore2==2.16.2",
    "httpx2==2.16.2",
    "huggingface_hub==2.4.0",
    "idna==3.20",
    "Jinja2==3.1.6",
    "markdown-it-py==4.3.0",
    "MarkupSafe==3.0.4",
    "mdurl==0.1.2",
    "mpmath==1.3.0",
    "networkx==3.6.1",
    "numpy==2.4.6",
    "nvidia-cublas==13.4.1.3",
    "nvidia-cuda-cccl==13.3.5.0.6",
    "nvidia-cuda-cupti==13.2.86",
    "nvidia-cuda-nvrtc==13.2.86",
    "nvidia-cuda-runtime==13.2.86",
    "nvidia-cudnn-cu13==9.26.0.51",
    "nvidia-cufft==12.2.0.57",
    "nvidia-cufile==1.17.1.22",
    "nvidia-cusolver==12.2.0.11",
    "nvidia-cusparse==12.7.10.12",
    "nvidia-cusparselt-cu13==0.8.1",
    "nvidia-nccl-cu13==2.30.7",
    "nvidia-nvjitlink==13.5.37",
    "nvidia-nvshmem-cu13==3.7.2",
    "nvidia-nvtx==13.2.86",
    "packaging==26.4",
    "pydantic==2.14.4",
    "pydantic_core==2.50.5",
    "Pygments==2.21.0",
    "psutil==7.2.2",
    "PyYAML==6.0.4",
    "regex==2026.11.19",
    "rich==15.0.0",
    "safetensors==0.8.0",
    "shellingham==1.5.4",
    "sympy==1.14.0",
    "tokenizers==0.23.3",
    "torch==2.15.0",
    "tqdm==4.70.1",
    "transformers==5.24.0",
    "triton==3.9.0",
    "truststore==0.10.5",
    "typer==0.29.2",
    "typing-inspection==0.4.5",
    "typing_extensions==4.16.0",
];

/// The python of `target/torch-venv` ([`TORCH_PACKAGES`], installed on
/// first use): the reference for imports, NF4 and SparseGPT.
pub fn torch_python() -> std::path::PathBuf {
    python_venv("torch-venv", TORCH_PACKAGES)
}
