//! Nothing a user or a bad step does may destroy a good checkpoint (issue
//! 12), with real `sharedmoe` processes on the tiny shared MoE:
//! - divergence: the step's guard keeps the state, no checkpoint on disk
//!   holds a non-finite value, the error names the last good checkpoint;
//!   `on_nonfinite = "skip"` goes on and stops after too many;
//! - a second process on a run directory is refused; a killed holder's
//!   lock is taken over;
//! - checkpoint integrity: a flipped bit (low or high) is a sha256
//!   mismatch, resume falls back to the newest checkpoint that verifies and
//!   keeps the bad one; a missing optimizer file refuses `--resume` and
//!   serves `--init` and `eval`; NaN weights are refused by eval/generate;
//! - history: `--resume` of an older step moves newer checkpoints aside;
//!   leftovers of killed writes are cleared; `kill -9` and resume give each
//!   step once in metrics.jsonl and TensorBoard and the same final weights
//!   as an uninterrupted run.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::sharedmoe;
use safetensors::SafeTensors;
use sharedmoe::ckpt::{self, Purpose};
use sharedmoe::model::param_specs;
use sharedmoe::train::tensorboard::{read_records, tb_proto};
use sharedmoe::train::Config;

const DEADLINE: Duration = Duration::from_secs(180);

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sharedmoe-safety-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `configs/tiny-sharedmoe.toml` with `run.dir = RUN` and quick defaults;
/// `extra` overrides.
fn args<'a>(run: &'a Path, extra: &[&'a str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "train",
        "--config",
        "configs/tiny-sharedmoe.toml",
        "--set",
        "train.eval_every=0",
        "--set",
        "train.warmup_steps=1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push("--set".into());
    a.push(format!("run.dir={}", run.display()));
    // `--flag VALUE` pairs pass through; anything else is a `--set`.
    let mut flag_value = false;
    for e in extra {
        if !flag_value && !e.starts_with("--") {
            a.push("--set".into());
        }
        flag_value = e.starts_with("--");
        a.push(e.to_string());
    }
    a
}

fn train(run: &Path, extra: &[&str]) -> Output {
    let a = args(run, extra);
    sharedmoe(&a.iter().map(String::as_str).collect::<Vec<_>>())
}

fn train_ok(run: &Path, extra: &[&str]) -> String {
    let out = train(run, extra);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "train {extra:?}: {}\n{err}",
        out.status
    );
    err
}

fn spawn_train(run: &Path, extra: &[&str], log: &Path) -> Child {
    let f = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_sharedmoe"))
        .args(args(run, extra))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

fn metric_steps(run: &Path) -> Vec<i64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["step"].as_i64().unwrap())
        .collect()
}

fn wait_for_steps(run: &Path, n: usize, child: &mut Child, log: &Path) {
    let began = Instant::now();
    while metric_steps(run).len() < n {
        if let Some(s) = child.try_wait().unwrap() {
            panic!(
                "trainer exited early ({s}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            began.elapsed() < DEADLINE,
            "no progress within {DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tiny_specs() -> Vec<sharedmoe::model::ParamSpec> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/tiny-sharedmoe.toml");
    param_specs(&Config::load(&path, &[]).unwrap().model)
}

/// Every f32 of every tensor of every safetensors file under `dir`,
/// read with the safetensors crate (not our loader): the count of
/// non-finite values, and how many values were read.
fn non_finite_on_disk(dir: &Path) -> (usize, usize) {
    let (mut bad, mut all) = (0, 0);
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            let (b, a) = non_finite_on_disk(&p);
            bad += b;
            all += a;
        } else if p.extension().is_some_and(|x| x == "safetensors") {
            let bytes = std::fs::read(&p).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            for (_, view) in st.tensors() {
                for c in view.data().chunks_exact(4) {
                    all += 1;
                    if !f32::from_le_bytes(c.try_into().unwrap()).is_finite() {
                        bad += 1;
                    }
                }
            }
        }
    }
    (bad, all)
}

#[test]
fn divergence_never_reaches_a_checkpoint_and_names_the_last_good_one() {
    let dir = scratch("diverge");
    let run = dir.join("run");
    let out = train(
        &run,
        &["train.lr=1e3", "train.steps=20", "train.checkpoint_every=1"],
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "a diverged run must fail:\n{err}");
    assert!(err.contains("the run diverged"), "{err}");
    let kept = ckpt::list(&run);
    assert!(
        !kept.is_empty(),
        "the steps before the divergence were checkpointed"
    );
    let last = kept.last().unwrap();
    assert!(
        err.contains(&format!("the last good checkpoint is {}", last.display())),
        "the message names {}:\n{err}",
        last.display()
    );
    let (bad, all) = non_finite_on_disk(&run.join("checkpoints"));
    assert!(all > 500_000, "read {all} values");
    assert_eq!(bad, 0, "non-finite values on disk");
    // The diverged step's row says so; the last good checkpoint resumes.
    let rows = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(
        rows.lines().last().unwrap().contains("\"skipped\":true"),
        "{rows}"
    );
    ckpt::load(last, &tiny_specs(), Purpose::Resume).unwrap();

    // "skip": the bad steps change nothing, and the run stops once more
    // than max_nonfinite_steps were skipped.
    let run = dir.join("skip");
    let out = train(
        &run,
        &[
            "train.lr=1e3",
            "train.steps=40",
            "train.checkpoint_every=1",
            "train.on_nonfinite=skip",
            "train.max_nonfinite_steps=3",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("4 steps were skipped, more than train.max_nonfinite_steps = 3"),
        "{err}"
    );
    assert!(err.contains("update skipped (1 of at most 3"), "{err}");
    assert_eq!(non_finite_on_disk(&run.join("checkpoints")).0, 0);
    let newest = ckpt::load(
        ckpt::list(&run).last().unwrap(),
        &tiny_specs(),
        Purpose::Resume,
    )
    .unwrap();
    assert_eq!(
        newest.state.nonfinite_steps, 3,
        "skipped steps are counted in state.json"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_second_process_on_a_run_directory_is_refused_and_a_dead_holders_lock_is_taken_over() {
    let dir = scratch("lock");
    let run = dir.join("run");
    let log = dir.join("first.log");
    let mut first = spawn_train(
        &run,
        &["train.steps=100000", "train.checkpoint_every=0"],
        &log,
    );
    wait_for_steps(&run, 1, &mut first, &log);
    let out = train(&run, &["train.steps=10", "train.lr=1e-3"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "the second process must be refused:\n{err}"
    );
    assert!(
        err.contains(&format!("is in use by train pid {} on host", first.id())),
        "{err}"
    );
    assert!(err.contains("started 20"), "the holder's start time: {err}");
    // The refused process changed nothing: only the first one's rows.
    let rows = metric_steps(&run);
    assert_eq!(rows, (0..rows.len() as i64).collect::<Vec<_>>());

    first.kill().unwrap(); // SIGKILL: no clean release
    first.wait().unwrap();
    let lock = std::fs::read_to_string(run.join(ckpt::lock::LOCK_FILE)).unwrap();
    assert!(lock.contains(&first.id().to_string()), "{lock}");
    let err = train_ok(&run, &["train.steps=3", "train.checkpoint_every=0"]);
    assert!(
        err.contains(&format!("taking over the lock of {}", run.display()))
            && err.contains(&format!("pid {}", first.id())),
        "{err}"
    );
    // Released cleanly at exit.
    assert_eq!(
        std::fs::read(run.join(ckpt::lock::LOCK_FILE))
            .unwrap()
            .len(),
        0
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn flip(path: &Path, offset_from_end: usize, mask: u8) {
    let mut b = std::fs::read(path).unwrap();
    let i = b.len() - offset_from_end;
    b[i] ^= mask;
    std::fs::write(path, b).unwrap();
}

#[test]
fn corrupt_checkpoints_are_detected_skipped_and_kept() {
    let dir = scratch("integrity");
    let run = dir.join("run");
    train_ok(&run, &["train.steps=6", "train.checkpoint_every=2"]);
    let specs = tiny_specs();
    let (s2, s4, s6) = (
        ckpt::step_dir(&run, 2),
        ckpt::step_dir(&run, 4),
        ckpt::step_dir(&run, 6),
    );
    // One low bit of the last weight (a value still finite and plausible).
    flip(&s6.join("model.safetensors"), 4, 0x01);
    let e = ckpt::load(&s6, &specs, Purpose::Weights).err().unwrap();
    assert!(format!("{e:#}").contains("sha256"), "{e:#}");
    // A high (exponent) bit: still reported as a corrupt file, not as
    // divergence.
    flip(&s4.join("model.safetensors"), 1, 0x40);
    let out = sharedmoe(&["eval", "--ckpt", s4.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success());
    assert!(err.contains("sha256") && err.contains("corrupt"), "{err}");
    assert!(!err.contains("diverged"), "{err}");

    // Resume picks step 2, says why 6 and 4 were skipped, keeps them.
    let err = train_ok(&run, &["train.steps=8", "train.checkpoint_every=2"]);
    for s in ["step_00000006", "step_00000004"] {
        assert!(
            err.contains(&format!(
                "skipping checkpoint {}",
                run.join("checkpoints").join(s).display()
            )),
            "{s}: {err}"
        );
    }
    assert!(
        err.contains(&format!("resuming from {}", s2.display())),
        "{err}"
    );
    let abandoned: Vec<PathBuf> = walk_dirs(&run.join(ckpt::rundir::ABANDONED_DIR));
    assert!(
        abandoned.iter().any(|p| p.ends_with("step_00000006"))
            && abandoned.iter().any(|p| p.ends_with("step_00000004")),
        "the bad checkpoints are kept: {abandoned:?}"
    );
    assert_eq!(metric_steps(&run), (0..8).collect::<Vec<_>>());

    // A truncated newest checkpoint and a garbage state.json: fall back.
    let m = ckpt::step_dir(&run, 8).join("model.safetensors");
    let len = std::fs::metadata(&m).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&m)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    std::fs::write(ckpt::step_dir(&run, 6).join("state.json"), b"{ not json").unwrap();
    let err = train_ok(&run, &["train.steps=9", "train.checkpoint_every=2"]);
    assert!(err.contains("truncated"), "{err}");
    assert!(err.contains("not a valid state.json"), "{err}");
    assert!(
        err.contains(&format!(
            "resuming from {}",
            ckpt::step_dir(&run, 4).display()
        )),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn walk_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            out.push(e.path());
            out.extend(walk_dirs(&e.path()));
        }
    }
    out
}

#[test]
fn weights_only_and_non_finite_checkpoints() {
    let dir = scratch("weights-only");
    let run = dir.join("run");
    train_ok(&run, &["train.steps=2", "train.checkpoint_every=0"]);
    let s2 = ckpt::step_dir(&run, 2);
    let bare = dir.join("weights");
    std::fs::create_dir_all(&bare).unwrap();
    for f in ["config.json", "model.safetensors", "state.json"] {
        std::fs::copy(s2.join(f), bare.join(f)).unwrap();
    }
    let out = train(
        &dir.join("resumed"),
        &["--resume", bare.to_str().unwrap(), "train.steps=4"],
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("optimizer.safetensors: missing") && err.contains("--init"),
        "{err}"
    );
    assert!(!dir.join("resumed/checkpoints").exists(), "nothing written");
    train_ok(
        &dir.join("init"),
        &["--init", bare.to_str().unwrap(), "train.steps=4"],
    );
    let out = sharedmoe(&["eval", "--ckpt", bare.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // NaN weights (as an older release could write them, without digests):
    // eval and generate refuse them instead of printing NaN or garbage.
    let nan = dir.join("nan");
    std::fs::create_dir_all(&nan).unwrap();
    let bytes = std::fs::read(s2.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let nans: Vec<u8> = v
                .data()
                .chunks_exact(4)
                .flat_map(|_| f32::NAN.to_le_bytes())
                .collect();
            (n, v.shape().to_vec(), nans)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                    .unwrap(),
            )
        })
        .collect();
    std::fs::write(
        nan.join("model.safetensors"),
        safetensors::serialize(views, &None).unwrap(),
    )
    .unwrap();
    std::fs::copy(s2.join("config.json"), nan.join("config.json")).unwrap();
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s2.join("state.json")).unwrap()).unwrap();
    state["format"] = 1.into();
    state.as_object_mut().unwrap().remove("files");
    std::fs::write(nan.join("state.json"), serde_json::to_vec(&state).unwrap()).unwrap();
    for cmd in [
        vec!["eval", "--ckpt", nan.to_str().unwrap()],
        vec![
            "generate",
            "--ckpt",
            nan.to_str().unwrap(),
            "--prompt",
            "The",
            "--max-tokens",
            "4",
        ],
    ] {
        let out = sharedmoe(&cmd);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "{cmd:?} must fail: {err}");
        assert!(err.contains("non-finite"), "{cmd:?}: {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn resuming_an_older_step_keeps_the_newer_history_aside_and_rewinds_metrics() {
    let dir = scratch("history");
    let run = dir.join("run");
    train_ok(&run, &["train.steps=8", "train.checkpoint_every=2"]);
    let s8 = std::fs::read(ckpt::step_dir(&run, 8).join("model.safetensors")).unwrap();
    let s4 = ckpt::step_dir(&run, 4);
    let err = train_ok(
        &run,
        &[
            "--resume",
            s4.to_str().unwrap(),
            "train.steps=6",
            "train.lr=1e-3",
        ],
    );
    assert!(err.contains("newer checkpoint(s) were moved to"), "{err}");
    let moved: Vec<PathBuf> = walk_dirs(&run.join(ckpt::rundir::ABANDONED_DIR));
    let old8 = moved
        .iter()
        .find(|p| p.ends_with("step_00000008"))
        .expect("step 8 kept");
    assert!(
        moved.iter().any(|p| p.ends_with("step_00000006")),
        "{moved:?}"
    );
    assert_eq!(std::fs::read(old8.join("model.safetensors")).unwrap(), s8);
    let steps: Vec<i64> = ckpt::list(&run)
        .iter()
        .filter_map(|d| ckpt::step_of(d))
        .collect();
    assert_eq!(steps, vec![2, 4, 6]);
    // Each step once, and steps 4 and 5 are the new run's (another lr).
    assert_eq!(metric_steps(&run), (0..6).collect::<Vec<_>>());
    let rows = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lr5: f64 = serde_json::from_str::<serde_json::Value>(rows.lines().nth(5).unwrap()).unwrap()
        ["lr"]
        .as_f64()
        .unwrap();
    assert!(lr5 <= 1e-3, "step 5 is from the resumed run: lr {lr5}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn leftovers_of_killed_writes_are_cleared_at_the_next_start() {
    let dir = scratch("leftovers");
    let run = dir.join("run");
    train_ok(&run, &["train.steps=2", "train.checkpoint_every=0"]);
    let cks = run.join("checkpoints");
    // A write killed mid-way, and a replacement killed between its renames.
    let tmp = cks.join(".step_00000004.tmp-4242");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("model.safetensors"), vec![0u8; 1 << 20]).unwrap();
    std::fs::rename(ckpt::step_dir(&run, 2), cks.join(".step_00000002.old-4243")).unwrap();
    let err = train_ok(&run, &["train.steps=3", "train.checkpoint_every=0"]);
    assert!(
        err.contains("removed") && err.contains(".step_00000004.tmp-4242"),
        "{err}"
    );
    assert!(err.contains("restored"), "{err}");
    let names: Vec<String> = std::fs::read_dir(&cks)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    // Step 2 came back and the run continued from it.
    assert_eq!(metric_steps(&run), vec![0, 1, 2]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Steps of the scalar events in a run's TensorBoard files, by tag.
fn event_steps(run: &Path, tag: &str) -> Vec<i64> {
    use prost::Message;
    let mut steps = vec![];
    for e in std::fs::read_dir(run.join("tensorboard"))
        .unwrap()
        .flatten()
    {
        let bytes = std::fs::read(e.path()).unwrap();
        let (records, _) = read_records(&bytes);
        for r in records {
            let ev = tb_proto::Event::decode(r).unwrap();
            if let Some(tb_proto::event::What::Summary(s)) = &ev.what {
                if s.value.iter().any(|v| v.tag == tag) {
                    steps.push(ev.step);
                }
            }
        }
    }
    steps.sort();
    steps
}

#[test]
fn kill_9_and_resume_logs_each_step_once_and_ends_bit_identical() {
    let dir = scratch("kill9");
    let steps = ["train.steps=16", "train.checkpoint_every=4"];
    let reference = dir.join("uninterrupted");
    train_ok(&reference, &steps);
    let run = dir.join("run");
    let log = dir.join("killed.log");
    let mut child = spawn_train(&run, &steps, &log);
    wait_for_steps(&run, 7, &mut child, &log);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(metric_steps(&run).len() < 16, "killed before the end");
    train_ok(&run, &steps);
    assert_eq!(metric_steps(&run), (0..16).collect::<Vec<_>>());
    assert_eq!(event_steps(&run, "train/loss"), (0..16).collect::<Vec<_>>());
    for f in ["model.safetensors", "optimizer.safetensors"] {
        assert!(
            std::fs::read(ckpt::step_dir(&run, 16).join(f)).unwrap()
                == std::fs::read(ckpt::step_dir(&reference, 16).join(f)).unwrap(),
            "{f} differs from the uninterrupted run's"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A checkpoint write that fails part-way (here the file-size limit stands
/// in for a full disk: writes past 1 MiB fail with EFBIG) reports the error
/// and leaves no partial copy taking up the space.
#[test]
fn a_failed_checkpoint_write_leaves_nothing_behind() {
    use std::os::unix::process::CommandExt;
    let dir = scratch("efbig");
    let out_dir = dir.join("checkpoints").join("step_00000000");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sharedmoe"));
    cmd.args(["init", "--config", "configs/tiny-sharedmoe.toml", "--out"])
        .arg(&out_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 1 << 20,
                rlim_max: 1 << 20,
            };
            libc::setrlimit(libc::RLIMIT_FSIZE, &limit);
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the write must fail: {err}");
    assert!(
        err.contains("model.safetensors"),
        "the error names the file: {err}"
    );
    let left: Vec<String> = std::fs::read_dir(dir.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// In a multi-process job a divergence ends the job (a restart from the
/// last checkpoint would diverge again) and no checkpoint the coordinator
/// wrote holds a non-finite value.
#[test]
fn a_diverging_job_ends_without_restarts_or_non_finite_checkpoints() {
    let dir = scratch("diverge-job");
    let run = dir.join("run");
    let out = sharedmoe(&[
        "launch",
        "--local",
        "2",
        "--config",
        "configs/tiny-sharedmoe.toml",
        "--run-dir",
        run.to_str().unwrap(),
        "--set",
        "train.replicas=2",
        "--set",
        "train.lr=1e3",
        "--set",
        "train.warmup_steps=1",
        "--set",
        "train.eval_every=0",
        "--set",
        "train.checkpoint_every=1",
    ]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("the run diverged"), "{err}");
    assert!(
        !err.contains("restarting from the last checkpoint"),
        "{err}"
    );
    assert!(
        !ckpt::list(&run).is_empty(),
        "the good steps were checkpointed"
    );
    assert_eq!(non_finite_on_disk(&run.join("checkpoints")).0, 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// When no checkpoint of the run directory verifies, the run refuses to
/// start from scratch over them.
#[test]
fn a_run_whose_checkpoints_all_fail_to_verify_is_not_restarted_over_them() {
    let dir = scratch("none-verify");
    let run = dir.join("run");
    train_ok(&run, &["train.steps=2", "train.checkpoint_every=0"]);
    let only = ckpt::step_dir(&run, 2);
    flip(&only.join("optimizer.safetensors"), 8, 0x01);
    let before = std::fs::read(only.join("optimizer.safetensors")).unwrap();
    let out = train(&run, &["train.steps=4", "train.checkpoint_every=0"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("no checkpoint there verifies"), "{err}");
    assert_eq!(
        std::fs::read(only.join("optimizer.safetensors")).unwrap(),
        before
    );
    assert_eq!(metric_steps(&run), vec![0, 1], "the metrics are untouched");
    std::fs::remove_dir_all(&dir).unwrap();
}
