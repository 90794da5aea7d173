//! `sharedmoe compile --topology v4-32 --config C`: ahead-of-time
//! compilation of the train and eval steps for a TPU slice this machine
//! does not have (as MaxText's `train_compile.py`), with what each chip
//! needs: XLA's compiled memory stats against the chip's HBM, and the
//! FLOPs of XLA's cost analysis. A train step that does not fit exits
//! non-zero with the figures and the largest `train.micro_batch` that does
//! (found by compiling smaller ones).
//!
//! libtpu is initialised only inside a fresh network namespace with
//! `TPU_SKIP_MDS_QUERY=1`, set up by this command itself before anything
//! else runs ([`Offline::enter`]); where that cannot be done it refuses.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::model::{count_params, ExpertCompute};
use crate::runtime::{
    find_plugin, tpu_present, Backend, CompileOptions, MemoryStats, Offline, Plugin, Topology,
    TpuSlice, TPU_V4_HBM_BYTES,
};
use crate::train::mfu::flops_per_token;
use crate::train::placement::{layout, DeviceSlot};
use crate::train::program::{eval_step, train_step, StepLayout};
use crate::train::sharding::{state_bytes_per_device, StepMesh};
use crate::train::Config;

#[derive(clap::Args, Debug)]
pub struct CompileArgs {
    /// TOML config (see configs/).
    #[arg(long)]
    pub config: PathBuf,
    /// Override a config value, e.g. --set train.micro_batch=16 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// The accelerator to compile for (only tpu).
    #[arg(long, default_value = "tpu")]
    pub backend: Backend,
    /// The slice: v4-8, v4-16, v4-32, v4-64, v4-128 (TensorCores), or
    /// libtpu's topology name v4:AxBxC (chips).
    #[arg(long)]
    pub topology: String,
    /// libtpu path (overrides discovery).
    #[arg(long)]
    pub plugin: Option<PathBuf>,
    /// When the train step does not fit, do not compile smaller
    /// micro-batches to find the largest that does.
    #[arg(long)]
    pub no_search: bool,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

const GIB: f64 = (1u64 << 30) as f64;

fn human(bytes: i64) -> String {
    let b = bytes as f64;
    if b.abs() >= GIB {
        format!("{:.2} GiB", b / GIB)
    } else if b.abs() >= (1 << 20) as f64 {
        format!("{:.1} MiB", b / (1 << 20) as f64)
    } else if b.abs() >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

/// One compilation's outcome.
#[derive(Clone, Debug)]
struct Compiled {
    micro_batch: i64,
    /// The stats, when XLA compiled it.
    stats: Option<MemoryStats>,
    flops: Option<f64>,
    /// XLA's refusal (out of HBM at compile time).
    refused: Option<String>,
    seconds: f64,
}

impl Compiled {
    fn fits(&self) -> bool {
        self.stats.is_some_and(|s| s.total() <= TPU_V4_HBM_BYTES)
    }

    /// The needed bytes in words: the total, or XLA's own figure.
    fn figure(&self) -> String {
        match (&self.stats, &self.refused) {
            (Some(s), _) => format!("{} per chip", human(s.total())),
            (None, Some(msg)) => hbm_figure(msg).unwrap_or_else(|| first_line(msg).to_string()),
            (None, None) => "nothing".into(),
        }
    }

    fn to_json(&self) -> serde_json::Value {
        let mut v = json!({
            "micro_batch": self.micro_batch,
            "fits": self.fits(),
            "compile_seconds": self.seconds,
            "flops": self.flops,
        });
        if let Some(s) = &self.stats {
            v["arguments"] = json!(s.arguments);
            v["outputs"] = json!(s.outputs);
            v["aliased"] = json!(s.aliased);
            v["temporaries"] = json!(s.temporaries);
            v["generated_code"] = json!(s.generated_code);
            v["peak"] = json!(s.peak);
            v["total"] = json!(s.total());
        }
        if let Some(r) = &self.refused {
            v["refused"] = json!(r);
        }
        v
    }
}

fn first_line(s: &str) -> &str {
    s.lines().find(|l| !l.trim().is_empty()).unwrap_or(s)
}

/// XLA:TPU's out-of-memory figure from its error message: "the total
/// memory required for HLO temporaries (36.45G) exceeds available HBM
/// (30.75G)" (libtpu 0.0.52) or "Used 40.21G of 30.75G hbm. Exceeded hbm
/// capacity by 9.46G" (older releases).
fn hbm_figure(msg: &str) -> Option<String> {
    let start = msg
        .find("the total memory required")
        .or_else(|| msg.find("Used "))?;
    let rest = msg[start..].lines().next()?;
    // To the end of the sentence: a period followed by a space or the end.
    let end = rest
        .match_indices('.')
        .map(|(i, _)| i)
        .find(|&i| {
            let after = &rest[i + 1..];
            after.is_empty()
                || (after.starts_with(' ') && !after.trim_start().starts_with("Exceeded"))
        })
        .unwrap_or(rest.len());
    Some(format!("XLA: {}", rest[..end].trim()))
}

/// True for XLA's "does not fit in HBM" compile error.
fn out_of_memory(msg: &str) -> bool {
    msg.contains("RESOURCE_EXHAUSTED")
        || msg.contains("Ran out of memory")
        || msg.contains("ResourceExhausted")
}

/// Everything needed to compile one config's steps for the slice.
struct Compiler {
    topology: Topology,
    assignment: Vec<i64>,
    experts_block: i64,
}

impl Compiler {
    fn options(&self) -> CompileOptions {
        CompileOptions {
            device_assignment: Some(self.assignment.clone()),
            ..CompileOptions::spmd(self.assignment.len())
        }
    }

    fn experts(&self) -> ExpertCompute {
        ExpertCompute::Routed {
            block: self.experts_block,
        }
    }

    fn compile(&self, cfg: &Config, train: bool) -> Result<Compiled> {
        let mesh = StepMesh::of(cfg)?;
        let function = if train {
            train_step(cfg, self.experts(), &mesh)?
        } else {
            eval_step(cfg, self.experts(), &mesh)?
        };
        let mlir = function.to_mlir()?;
        let began = Instant::now();
        let outcome = self.topology.compile(&mlir, &self.options());
        let seconds = began.elapsed().as_secs_f64();
        let micro_batch = cfg.train.micro_batch;
        match outcome {
            Ok(program) => {
                let stats = program
                    .memory_stats()
                    .context("reading the compiled memory stats")?;
                let flops = match program.cost_analysis() {
                    Ok(props) => props.iter().find(|(k, _)| k == "flops").map(|(_, v)| *v),
                    Err(e) => {
                        tracing::debug!("no cost analysis: {e}");
                        None
                    }
                };
                Ok(Compiled {
                    micro_batch,
                    stats: Some(stats),
                    flops,
                    refused: None,
                    seconds,
                })
            }
            Err(e) if out_of_memory(&e.message) => Ok(Compiled {
                micro_batch,
                stats: None,
                flops: None,
                refused: Some(e.message.clone()),
                seconds,
            }),
            Err(e) => Err(e).with_context(|| {
                format!(
                    "compiling the {} step at micro-batch {micro_batch}",
                    if train { "train" } else { "eval" }
                )
            }),
        }
    }
}

/// The config for the slice: one device of the mesh per chip (the
/// config's mesh.fsdp, mesh.data the rest), the global batch kept.
/// Returns it and notes on what was changed.
fn config_for_slice(a: &CompileArgs, chips: i64) -> Result<(Config, Vec<String>)> {
    let mut overrides = a.overrides.clone();
    overrides.push("run.backend=tpu".into());
    // First read on one device, to see the batch before spreading it.
    let fsdp = requested_fsdp(a)?;
    let mut first = overrides.clone();
    first.extend(["train.replicas=1", "mesh.data=1", "mesh.fsdp=1"].map(String::from));
    let base = Config::load(&a.config, &first)?;
    let t = &base.train;
    let mut notes = vec![];
    if t.global_batch % chips != 0 {
        bail!(
            "train.global_batch = {} cannot be spread evenly over the {chips} chips of the slice \
             (one replica per chip, each with the same batch); the recipe's global batch is not \
             changed silently: choose a slice whose chip count divides it, or --set \
             train.global_batch to a multiple of {chips}",
            t.global_batch
        );
    }
    let per_chip = t.global_batch / chips;
    let mut micro = t.micro_batch;
    if per_chip % micro != 0 {
        let fitted = (1..=micro.min(per_chip))
            .rev()
            .find(|d| per_chip % d == 0)
            .unwrap_or(1);
        notes.push(format!(
            "train.micro_batch = {micro} does not divide the {per_chip} sequences per chip \
             (global batch {} over {chips} chips): compiled with micro-batch {fitted}",
            t.global_batch
        ));
        micro = fitted;
    }
    // The mesh over the chips: the config's fsdp, data the rest.
    if fsdp < 1 || chips % fsdp != 0 {
        bail!("mesh.fsdp = {fsdp} does not divide the {chips} chips of the slice");
    }
    overrides.push(format!("mesh.data={}", chips / fsdp));
    overrides.push(format!("train.replicas={chips}"));
    overrides.push(format!("train.micro_batch={micro}"));
    if base.data.shards > 1 && chips % base.data.shards != 0 {
        notes.push(format!(
            "data.shards = {} does not divide {chips} replicas: compiled with data.shards = 1 \
             (it does not change the programs)",
            base.data.shards
        ));
        overrides.push("data.shards=1".into());
    }
    let cfg = Config::load(&a.config, &overrides)?;
    Ok((cfg, notes))
}

/// `mesh.fsdp` as the config file and the `--set`s give it (1 when
/// unset), read before the config is validated for the slice.
fn requested_fsdp(a: &CompileArgs) -> Result<i64> {
    let text = std::fs::read_to_string(&a.config)
        .with_context(|| format!("reading {}", a.config.display()))?;
    let doc =
        Config::document(&text, &a.overrides).with_context(|| a.config.display().to_string())?;
    match doc.get("mesh").and_then(|m| m.get("fsdp")) {
        None => Ok(1),
        Some(v) => v
            .as_integer()
            .ok_or_else(|| anyhow::anyhow!("mesh.fsdp = {v}: expected a whole number")),
    }
}

fn with_micro_batch(cfg: &Config, micro: i64) -> Config {
    let mut c = cfg.clone();
    c.train.micro_batch = micro;
    c
}

/// The largest micro-batch below `failed` whose train step fits, among
/// the divisors of the per-chip batch (the values `train.micro_batch` can
/// take), largest first, stopping at the first that fits (memory grows
/// with the micro-batch). XLA refuses a program that does not fit its
/// memory check early (a second for the tiny models), while a program that
/// fits compiles in full (minutes for the full models), so walking down
/// costs one full compile; the divisors are few (9 for 48, 10 for 1024).
fn search(
    compiler: &Compiler,
    cfg: &Config,
    failed: i64,
    tried: &mut Vec<Compiled>,
) -> Result<Option<Compiled>> {
    let per_chip = cfg.train.global_batch / cfg.train.replicas;
    let candidates: Vec<i64> = (1..failed).rev().filter(|d| per_chip % d == 0).collect();
    for micro in candidates {
        let c = compiler.compile(&with_micro_batch(cfg, micro), true)?;
        println!(
            "  micro-batch {micro:>4}: {} ({:.1} s)",
            if c.fits() {
                format!("fits, {}", c.figure())
            } else {
                format!("does not fit, {}", c.figure())
            },
            c.seconds
        );
        tried.push(c.clone());
        if c.fits() {
            return Ok(Some(c));
        }
    }
    Ok(None)
}

fn print_table(cols: &[(&str, &Compiled)]) {
    let row = |name: &str, f: &dyn Fn(&Compiled) -> String| {
        let mut line = format!("  {name:<24}");
        for (_, c) in cols {
            line.push_str(&format!("{:>16}", f(c)));
        }
        println!("{}", line.trim_end());
    };
    let mut head = format!("  {:<24}", "per chip");
    for (name, _) in cols {
        head.push_str(&format!("{name:>16}"));
    }
    println!("{head}");
    let stat = |f: fn(&MemoryStats) -> i64| {
        move |c: &Compiled| c.stats.map(|s| human(f(&s))).unwrap_or_else(|| "-".into())
    };
    row("arguments", &stat(|s| s.arguments));
    row("outputs", &stat(|s| s.outputs));
    row("aliased (donated)", &stat(|s| s.aliased));
    row("temporaries", &stat(|s| s.temporaries));
    row("generated code", &stat(|s| s.generated_code));
    row("total", &stat(|s| s.total()));
    row("HBM (TPU v4)", &|_| human(TPU_V4_HBM_BYTES));
    row("used", &|c| {
        c.stats
            .map(|s| format!("{:.1}%", 100.0 * s.total() as f64 / TPU_V4_HBM_BYTES as f64))
            .unwrap_or_else(|| "-".into())
    });
    row("XLA cost analysis FLOPs", &|c| {
        c.flops
            .map(|f| format!("{f:.3e}"))
            .unwrap_or_else(|| "-".into())
    });
    row("compile time", &|c| format!("{:.1} s", c.seconds));
}

/// The slice as libtpu's offline topology lays it out.
struct Slice {
    topology: Topology,
    /// The device assignment a job on this slice uses (host by host).
    assignment: Vec<i64>,
    /// The devices' kind ("TPU v4").
    kind: String,
    hosts: usize,
}

/// libtpu's topology of `slice` (compiling only, no chips needed), with
/// the job's device assignment over it.
fn open_slice(plugin: Arc<Plugin>, slice: &TpuSlice) -> Result<Slice> {
    let chips = slice.chips();
    let topology = Topology::create(plugin, &slice.topology_name(), &slice.options())?;
    let devices = topology.devices()?;
    if devices.len() as i64 != chips {
        bail!(
            "libtpu's topology {} lists {} devices, expected {chips} chips",
            slice.topology_name(),
            devices.len()
        );
    }
    let kind = devices.first().map(|d| d.kind.clone()).unwrap_or_default();
    let mut processes: Vec<i32> = devices.iter().map(|d| d.process_index).collect();
    processes.sort();
    processes.dedup();
    let slots: Vec<DeviceSlot> = devices
        .iter()
        .map(|d| DeviceSlot {
            id: d.id as i64,
            process: d.process_index,
            local_hardware_id: 0,
        })
        .collect();
    let (assignment, _) = layout(&slots, chips as usize, 0)?;
    Ok(Slice {
        topology,
        assignment,
        kind,
        hosts: processes.len(),
    })
}

/// What is compiled, for whom, with which libtpu; the model and batch.
fn print_setup(
    a: &CompileArgs,
    slice: &TpuSlice,
    s: &Slice,
    libtpu: (&Path, &Plugin),
    offline: &Offline,
    cfg: &Config,
    notes: &[String],
) {
    let (path, plugin) = libtpu;
    let version = s.topology.platform_version().unwrap_or_default();
    println!(
        "sharedmoe compile: {} for TPU {} = {} ({} x \"{}\" on {} host{}), \
         offline ({}, TPU_SKIP_MDS_QUERY=1)",
        a.config.display(),
        slice.accelerator_type(),
        slice.topology_name(),
        slice.chips(),
        s.kind,
        s.hosts,
        if s.hosts == 1 { "" } else { "s" },
        offline.how()
    );
    println!(
        "libtpu: {} (PJRT C API {}.{}){}",
        path.display(),
        plugin.api_version().0,
        plugin.api_version().1,
        if version.is_empty() {
            String::new()
        } else {
            format!(", {}", first_line(&version))
        }
    );
    for n in notes {
        println!("note: {n}");
    }
    let t = &cfg.train;
    let params = count_params(&cfg.model);
    let (data, fsdp) = cfg.mesh_axes();
    println!(
        "model: {params} parameters; parameters + Adam moments (f32) {} per chip \
         (mesh data = {data} x fsdp = {fsdp}); {:?} compute",
        human(state_bytes(cfg, fsdp)),
        cfg.compute_dtype()
    );
    println!(
        "batch: {} x {} tokens = {} chips x {} accumulation step(s) x micro-batch {}",
        t.global_batch,
        t.seq_len,
        t.replicas,
        cfg.accumulation_steps(),
        t.micro_batch
    );
}

/// Writes the JSON report where `--json` says (nowhere without it).
fn write_json(a: &CompileArgs, report: &serde_json::Value) -> Result<()> {
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

pub fn run(a: &CompileArgs) -> Result<()> {
    // First, while this process still has one thread: no network, and
    // libtpu told not to ask the metadata server. Nothing else before it.
    let offline = Offline::enter()?;
    if !tpu_present() {
        // libtpu's /tmp/libtpu_lockfile guards chips; without any, it
        // would only keep two compiles (or tests) from running at once.
        std::env::set_var("ALLOW_MULTIPLE_LIBTPU_LOAD", "1");
    }
    if a.backend != Backend::Tpu {
        bail!(
            "sharedmoe compile compiles for TPU slices only (--backend tpu); on a GPU or CPU, \
             `sharedmoe doctor` and a short `train` show the real memory"
        );
    }
    let slice = TpuSlice::parse(&a.topology)?;
    let chips = slice.chips();
    let (cfg, notes) = config_for_slice(a, chips)?;

    let loc = find_plugin(Backend::Tpu, a.plugin.as_deref())?;
    let plugin = Plugin::load(&loc.path)?;
    plugin.initialize_offline(&offline)?;
    let s = open_slice(plugin.clone(), &slice)?;
    print_setup(a, &slice, &s, (&loc.path, &plugin), &offline, &cfg, &notes);

    let t = &cfg.train;
    let params = count_params(&cfg.model);
    let mut report = json!({
        "config": a.config.display().to_string(),
        "accelerator_type": slice.accelerator_type(),
        "topology": slice.topology_name(),
        "chips": chips,
        "hosts": s.hosts,
        "device_kind": s.kind,
        "hbm_bytes": TPU_V4_HBM_BYTES,
        "parameters": params,
        "state_bytes": state_bytes(&cfg, 1),
        "mesh": {"data": cfg.mesh_axes().0, "fsdp": cfg.mesh_axes().1},
        "state_bytes_per_chip": state_bytes(&cfg, cfg.mesh_axes().1),
        "global_batch": t.global_batch,
        "seq_len": t.seq_len,
        "micro_batch": t.micro_batch,
        "accumulation_steps": cfg.accumulation_steps(),
        "model_flops_per_micro_batch": flops_per_token(&cfg) * (t.micro_batch * t.seq_len) as f64,
    });
    let compiler = Compiler {
        topology: s.topology,
        assignment: s.assignment,
        experts_block: cfg.model.moe_block_size,
    };
    let train = compiler.compile(&cfg, true)?;
    report["train"] = train.to_json();
    if train.fits() {
        conclude_fits(a, &cfg, &compiler, &train, report)
    } else {
        conclude_does_not_fit(a, &cfg, &compiler, &train, report)
    }
}

/// The train step fits: compile the eval step, print both, succeed if it
/// fits too.
fn conclude_fits(
    a: &CompileArgs,
    cfg: &Config,
    compiler: &Compiler,
    train: &Compiled,
    mut report: serde_json::Value,
) -> Result<()> {
    let t = &cfg.train;
    let eval = compiler.compile(cfg, false)?;
    println!();
    print_table(&[("train step", train), ("eval step", &eval)]);
    // The routed experts run in a loop over row blocks too (see
    // model::moe), so their matmuls count as one block's.
    let experts_loop = if cfg.model.is_moe() {
        " and the routed experts' matmuls as one block's"
    } else {
        ""
    };
    println!(
        "  (FLOPs: XLA counts a loop body once, so the train step's figure is about one \
         micro-batch's forward and backward plus the update{experts_loop}; the model's 6N + \
         attention estimate for one micro-batch is {:.3e})",
        flops_per_token(cfg) * (t.micro_batch * t.seq_len) as f64
    );
    report["eval"] = eval.to_json();
    report["fits"] = json!(eval.fits());
    write_json(a, &report)?;
    println!();
    if !eval.fits() {
        bail!(
            "the eval step does not fit: {} at micro-batch {}, HBM {} per chip",
            eval.figure(),
            t.micro_batch,
            human(TPU_V4_HBM_BYTES)
        );
    }
    println!(
        "fits: the train step needs {} of {} HBM per chip at micro-batch {} ({} x {} tokens \
         per chip per accumulation step)",
        human(train.stats.map_or(0, |s| s.total())),
        human(TPU_V4_HBM_BYTES),
        t.micro_batch,
        t.micro_batch,
        t.seq_len
    );
    Ok(())
}

/// The train step does not fit: say by how much, search the largest
/// micro-batch that does (unless `--no-search`), and fail naming it.
fn conclude_does_not_fit(
    a: &CompileArgs,
    cfg: &Config,
    compiler: &Compiler,
    train: &Compiled,
    mut report: serde_json::Value,
) -> Result<()> {
    let t = &cfg.train;
    println!();
    if train.stats.is_some() {
        print_table(&[("train step", train)]);
    } else {
        println!(
            "train step at micro-batch {}: XLA refused it ({:.1} s): {}",
            t.micro_batch,
            train.seconds,
            first_line(train.refused.as_deref().unwrap_or("")).trim()
        );
    }
    println!(
        "does not fit: the train step at micro-batch {}: {} (a chip has {} of HBM)",
        t.micro_batch,
        train.figure(),
        human(TPU_V4_HBM_BYTES)
    );
    let mut tried = vec![];
    let best = if a.no_search {
        None
    } else {
        println!("searching the largest micro-batch that fits:");
        search(compiler, cfg, t.micro_batch, &mut tried)?
    };
    report["fits"] = json!(false);
    report["search"] = json!(tried.iter().map(Compiled::to_json).collect::<Vec<_>>());
    report["largest_fitting_micro_batch"] = json!(best.as_ref().map(|b| b.micro_batch));
    write_json(a, &report)?;
    match best {
        Some(b) => bail!(
            "the train step does not fit a TPU v4 chip at micro-batch {}: {} (a chip has {} \
             of HBM); the largest micro-batch that fits is {} ({}): --set train.micro_batch={}",
            t.micro_batch,
            train.figure(),
            human(TPU_V4_HBM_BYTES),
            b.micro_batch,
            b.figure(),
            b.micro_batch
        ),
        None if a.no_search => bail!(
            "the train step does not fit a TPU v4 chip at micro-batch {}: {} (a chip has {} \
             of HBM); drop --no-search to find the largest micro-batch that fits",
            t.micro_batch,
            train.figure(),
            human(TPU_V4_HBM_BYTES)
        ),
        None => bail!(
            "the train step does not fit a TPU v4 chip at micro-batch {}: {} (a chip has {} \
             of HBM), nor at any smaller micro-batch: use a larger slice (more chips do not shrink a replica: this is \
             data parallelism) or a smaller model",
            t.micro_batch,
            train.figure(),
            human(TPU_V4_HBM_BYTES)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xla_out_of_memory_figure() {
        let msg = "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in \
                   memory space hbm. Used 40.21G of 30.75G hbm. Exceeded hbm capacity by 9.46G.\n\n\
                   Total hbm usage >= 40.71G:";
        assert!(out_of_memory(msg));
        assert_eq!(
            hbm_figure(msg).unwrap(),
            "XLA: Used 40.21G of 30.75G hbm. Exceeded hbm capacity by 9.46G"
        );
        let msg = "E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory required \
                   for HLO temporaries (36.45G) exceeds available HBM (30.75G). HLO module: \
                   train_step.";
        assert!(out_of_memory(msg));
        assert_eq!(
            hbm_figure(msg).unwrap(),
            "XLA: the total memory required for HLO temporaries (36.45G) exceeds available HBM \
             (30.75G)"
        );
    }
}

/// Bytes of the run's state (parameters, the trained ones' moments) per
/// device at `fsdp`.
fn state_bytes(cfg: &Config, fsdp: usize) -> i64 {
    let layout = StepLayout::new(cfg);
    state_bytes_per_device(&layout.specs, &layout.trainable, fsdp)
}
