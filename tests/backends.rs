//! Backend selection and plugin discovery for cpu, tpu and cuda with the
//! real plugins (xla-cpu-pjrt; libtpu, jax-cuda12-pjrt with its NVIDIA
//! libraries and jax-cuda13-pjrt unpacked here by scripts/fetch-plugin.sh,
//! as the setup and deploy scripts install them), and `sharedmoe doctor`'s
//! report for each. On this machine the CPU really runs; libtpu is loaded
//! and its API version read, but no TPU client is created (there are no
//! chips, and creating one would query the cloud metadata server); the CUDA
//! plugin, its NVIDIA libraries preloaded, reports that no GPU exists.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sharedmoe::runtime::{preload_nvidia_libraries, tpu_present, Client, Plugin};

const BIN: &str = env!("CARGO_BIN_EXE_sharedmoe");

use common::fetched_plugin as fetched;

/// libtpu and the CUDA 12 plugin with its NVIDIA libraries, in one
/// site-packages (as `SHAREDMOE_ACCEL=tpu` then `cuda12` would leave .venv).
fn accel_venv() -> PathBuf {
    fetched("plugin-accel", "tpu", &[]);
    fetched("plugin-accel", "cuda12", &[])
}

fn site_packages(venv: &Path) -> PathBuf {
    venv.join("lib/python3.12/site-packages")
}

/// Runs the binary with `venv` as $VIRTUAL_ENV; a run that outlives
/// `limit` is killed and fails the test (a libtpu that went looking for
/// the metadata server would hang for minutes).
fn sharedmoe(args: &[&str], venv: Option<&Path>, limit: Duration) -> (i32, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("VIRTUAL_ENV")
        .env_remove("SHAREDMOE_PJRT_PLUGIN")
        .env_remove("SHAREDMOE_SECRET")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(v) = venv {
        cmd.env("VIRTUAL_ENV", v);
    }
    let mut child = cmd.spawn().expect("starting sharedmoe");
    let began = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if began.elapsed() > limit {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "sharedmoe {args:?} still running after {limit:?}:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr)
    );
    (status.code().unwrap_or(-1), text)
}

const LIMIT: Duration = Duration::from_secs(120);

/// The doctor's line for `check` (its status and finding).
fn line<'a>(report: &'a str, check: &str) -> &'a str {
    report
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(check))
        .unwrap_or_else(|| panic!("no `{check}` line in:\n{report}"))
}

#[test]
fn cpu_backend_really_runs() {
    let (code, out) = sharedmoe(
        &["doctor", "--backend", "cpu", "--devices", "2"],
        None,
        LIMIT,
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("sharedmoe doctor: backend cpu"), "{out}");
    assert!(
        line(&out, "plugin").starts_with("ok") && out.contains("package xla-cpu-pjrt"),
        "{out}"
    );
    assert!(line(&out, "api").contains("PJRT C API 0."), "{out}");
    assert!(line(&out, "client").contains("2 device(s) here"), "{out}");
    assert!(out.contains("device 1: cpu"), "{out}");
    let program = line(&out, "program");
    assert!(
        program.starts_with("ok") && program.contains("over 2 device(s): exact"),
        "{out}"
    );
    assert!(line(&out, "coordinator").starts_with("skip"), "{out}");
}

#[test]
fn tpu_plugin_loads_reports_its_version_and_refuses_a_client_without_chips() {
    if tpu_present() {
        eprintln!("skipped: this machine has TPU chips");
        return;
    }
    let venv = accel_venv();
    // First in a time-limited child process.
    let (code, out) = sharedmoe(&["doctor", "--backend", "tpu"], Some(&venv), LIMIT);
    assert_eq!(code, 1, "{out}");
    assert!(
        line(&out, "plugin").starts_with("ok") && out.contains("package libtpu in"),
        "{out}"
    );
    assert!(line(&out, "api").contains("PJRT C API 0."), "{out}");
    let devices = line(&out, "devices");
    assert!(
        devices.starts_with("FAIL")
            && devices.contains("no TPU chips")
            && devices.contains("TPU VM"),
        "{out}"
    );
    assert!(line(&out, "client").starts_with("skip"), "{out}");
    assert!(line(&out, "program").starts_with("skip"), "{out}");
    let libtpu = site_packages(&venv).join("libtpu/libtpu.so");
    // In-process (after the time-limited run above, which would have
    // caught a hang): loading runs GetPjrtApi only (no initialisation, which in
    // libtpu already asks the metadata server).
    let plugin = Plugin::load(&libtpu).unwrap();
    let (major, minor) = plugin.api_version();
    assert!(
        major == 0 && minor >= 81,
        "libtpu's PJRT C API {major}.{minor}"
    );
    assert!(
        out.contains(&format!("PJRT C API {major}.{minor} ")),
        "{out}"
    );
    assert!(plugin.is_tpu());
    let err = plugin.initialize().unwrap_err().to_string();
    assert!(err.contains("no TPU device"), "{err}");
    let err = Client::new(plugin, &[], None).unwrap_err().to_string();
    assert!(
        err.contains("no TPU device") && err.contains("metadata server"),
        "{err}"
    );
}

#[test]
fn cuda_plugin_is_found_and_reports_no_gpu() {
    if Path::new("/dev/nvidiactl").exists() {
        eprintln!("skipped: this machine has an NVIDIA driver");
        return;
    }
    let venv = accel_venv();
    let (code, out) = sharedmoe(&["doctor", "--backend", "cuda"], Some(&venv), LIMIT);
    assert_eq!(code, 1, "{out}");
    assert!(
        line(&out, "plugin").starts_with("ok") && out.contains("package jax-cuda12-pjrt in"),
        "{out}"
    );
    assert!(line(&out, "api").contains("PJRT C API 0."), "{out}");
    let client = line(&out, "client");
    assert!(
        client.starts_with("FAIL")
            && client.contains("no NVIDIA GPU")
            && client.contains("No visible GPU devices"),
        "{out}"
    );
    assert!(line(&out, "program").starts_with("skip"), "{out}");
    // Every NVIDIA library was preloaded (a failure is a warning).
    assert!(
        !out.contains("could not preload") && !out.contains("cannot open shared object"),
        "{out}"
    );
}

/// The NVIDIA libraries unpacked next to `plugin` all load (the
/// preloading the binary does: `want` among them), and nothing but the
/// driver (libcuda.so.1) is missing for the plugin or any library there,
/// by `ldd`; ptxas kept its mode.
fn check_nvidia_libraries(site: &Path, plugin: &Path, want: &[&str]) {
    let libs = preload_nvidia_libraries(plugin);
    assert!(libs.failed.is_empty(), "{:#?}", libs.failed);
    let names: Vec<String> = libs
        .loaded
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in want {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    // ldd on the plugin and every shared library of the NVIDIA wheels
    // (NVSHMEM's optional bootstrap and transport modules, which need MPI,
    // UCX, libfabric or Mellanox libraries only when chosen, aside).
    let mut files = vec![plugin.to_path_buf()];
    for dir in &libs.dirs {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("lib") && name.contains(".so") {
                files.push(e.path());
            }
        }
    }
    assert!(files.len() > 25, "{files:?}");
    let mut missing = vec![];
    for f in &files {
        let out = Command::new("ldd").arg(f).output().expect("running ldd");
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            if l.contains("not found") && !l.trim_start().starts_with("libcuda.so.1 ") {
                missing.push(format!("{}: {}", f.display(), l.trim()));
            }
        }
    }
    assert!(missing.is_empty(), "{missing:#?}");
    // XLA runs ptxas from the unpacked wheel.
    use std::os::unix::fs::PermissionsExt;
    let ptxas = std::fs::read_dir(site.join("nvidia"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("bin/ptxas"))
        .find(|p| p.is_file())
        .expect("ptxas in nvidia/*/bin");
    let mode = std::fs::metadata(&ptxas).unwrap().permissions().mode();
    assert!(mode & 0o100 != 0, "{} mode {mode:o}", ptxas.display());
}

/// `fetch-plugin.sh cuda12`'s NVIDIA libraries are complete: they all
/// load, and nothing but the driver is missing (dlopen and `ldd`).
#[test]
fn the_cuda12_plugins_nvidia_libraries_are_complete() {
    let site = site_packages(&accel_venv());
    check_nvidia_libraries(
        &site,
        &site.join("jax_plugins/xla_cuda12/xla_cuda_plugin.so"),
        &[
            "libcudart.so.12",
            "libnvrtc.so.12",
            "libnvJitLink.so.12",
            "libcublasLt.so.12",
            "libcublas.so.12",
            "libcusparse.so.12",
            "libcusolver.so.11",
            "libcufft.so.11",
            "libcupti.so.12",
            "libnccl.so.2",
            "libnvshmem_host.so.3",
            "libcudnn.so.9",
        ],
    );
}

/// The same for `fetch-plugin.sh cuda13` (CUDA 13's libraries share
/// `nvidia/cu13/lib`). Not run by default: another 2.5 GB to download.
#[test]
#[ignore = "downloads the CUDA 13 libraries (2.5 GB): cargo test --release --test backends -- --ignored"]
fn the_cuda13_plugins_nvidia_libraries_are_complete() {
    let site = site_packages(&fetched("plugin-cuda13-full", "cuda13", &[]));
    check_nvidia_libraries(
        &site,
        &site.join("jax_plugins/xla_cuda13/xla_cuda_plugin.so"),
        &[
            "libcudart.so.13",
            "libnvrtc.so.13",
            "libnvJitLink.so.13",
            "libcublasLt.so.13",
            "libcublas.so.13",
            "libcusparse.so.12",
            "libcusolver.so.12",
            "libcufft.so.12",
            "libcupti.so.13",
            "libnccl.so.2",
            "libnvshmem_host.so.3",
            "libcudnn.so.9",
        ],
    );
}

/// Each plugin wheel, unpacked the way the scripts do, is a PJRT plugin
/// (GetPjrtApi only: libtpu is never initialised here). jax-cuda13-pjrt is
/// fetched without its NVIDIA libraries (`--plugin-only`): loading needs
/// none of them.
#[test]
fn every_unpacked_plugin_wheel_loads_its_api() {
    let accel = site_packages(&accel_venv());
    let cuda13 = site_packages(&fetched("plugin-cuda13", "cuda13", &["--plugin-only"]));
    for plugin in [
        accel.join("libtpu/libtpu.so"),
        accel.join("jax_plugins/xla_cuda12/xla_cuda_plugin.so"),
        cuda13.join("jax_plugins/xla_cuda13/xla_cuda_plugin.so"),
    ] {
        let loaded = Plugin::load(&plugin).unwrap_or_else(|e| panic!("{e}"));
        let (major, minor) = loaded.api_version();
        assert!(
            major == 0 && minor >= 70,
            "{}: PJRT C API {major}.{minor}",
            plugin.display()
        );
    }
}

#[test]
fn a_missing_plugin_is_one_line_naming_the_package() {
    // This checkout's .venv holds only the CPU plugin.
    let system_has_plugins = Command::new("python3")
        .args(["-c", "import jax_plugins"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if system_has_plugins {
        eprintln!("skipped: the system python has jax plugins");
        return;
    }
    let (code, out) = sharedmoe(&["doctor", "--backend", "cuda"], None, LIMIT);
    assert_eq!(code, 1, "{out}");
    let plugin = line(&out, "plugin");
    assert!(
        plugin.starts_with("FAIL")
            && plugin.contains("pip install jax-cuda13-pjrt or jax-cuda12-pjrt"),
        "{out}"
    );
}

#[test]
fn the_backend_comes_from_the_flag_or_the_config() {
    let dir = std::env::temp_dir().join(format!("sharedmoe-backends-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("tpu.toml");
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/tiny-sharedmoe.toml"),
    )
    .unwrap();
    assert!(text.contains("backend = \"cpu\""));
    std::fs::write(&cfg, text.replace("backend = \"cpu\"", "backend = \"tpu\"")).unwrap();
    let venv = (!tpu_present()).then(accel_venv);
    let venv = venv.as_deref();
    let (_, out) = sharedmoe(&["doctor", "--config", cfg.to_str().unwrap()], venv, LIMIT);
    assert!(out.contains("backend tpu"), "{out}");
    if tpu_present() {
        return;
    }
    // Training selects the backend by --backend (over the config's).
    let run_dir = format!("run.dir={}", dir.join("run").display());
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/tiny-sharedmoe.toml");
    let train = |backend: &str| {
        sharedmoe(
            &[
                "train",
                "--config",
                config.to_str().unwrap(),
                "--backend",
                backend,
                "--set",
                &run_dir,
            ],
            venv,
            LIMIT,
        )
    };
    let (code, out) = train("tpu");
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("no TPU device on this machine"), "{out}");
    if !Path::new("/dev/nvidiactl").exists() {
        let (code, out) = train("cuda");
        assert_ne!(code, 0, "{out}");
        assert!(out.contains("No visible GPU devices"), "{out}");
    }
    let (code, out) = train("rocm");
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("rocm") && out.contains("cpu, cuda or tpu"),
        "{out}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn doctor_checks_the_coordinator_and_its_secret() {
    let dir = std::env::temp_dir().join(format!("sharedmoe-doctor-coord-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let addr_file = dir.join("addr");
    let secret = "0123456789abcdef0123456789abcdef";
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/tiny-sharedmoe.toml");
    let mut coordinator = Command::new(BIN)
        .args(["coordinator", "--config"])
        .arg(&config)
        .args(["--workers", "1", "--listen", "127.0.0.1:0", "--run-dir"])
        .arg(dir.join("run"))
        .arg("--addr-file")
        .arg(&addr_file)
        .env("SHAREDMOE_SECRET", secret)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let began = Instant::now();
    let addr = loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file) {
            if !a.trim().is_empty() {
                break a.trim().to_string();
            }
        }
        assert!(began.elapsed() < LIMIT, "the coordinator did not start");
        std::thread::sleep(Duration::from_millis(50));
    };
    let secret_file = dir.join("secret");
    std::fs::write(&secret_file, secret).unwrap();
    let (code, out) = sharedmoe(
        &[
            "doctor",
            "--coordinator",
            &addr,
            "--secret-file",
            secret_file.to_str().unwrap(),
        ],
        None,
        LIMIT,
    );
    let ok = line(&out, "coordinator").to_string();
    let (code_nosecret, out_nosecret) = sharedmoe(&["doctor", "--coordinator", &addr], None, LIMIT);
    coordinator.kill().unwrap();
    coordinator.wait().unwrap();
    let (code_down, out_down) = sharedmoe(&["doctor", "--coordinator", &addr], None, LIMIT);
    std::fs::remove_dir_all(&dir).unwrap();

    assert_eq!(code, 0, "{out}");
    assert!(
        ok.starts_with("ok") && ok.contains(&addr) && ok.contains("answers"),
        "{out}"
    );
    assert_eq!(code_nosecret, 1, "{out_nosecret}");
    let refused = line(&out_nosecret, "coordinator");
    assert!(
        refused.starts_with("FAIL") && refused.contains("SHAREDMOE_SECRET"),
        "{out_nosecret}"
    );
    assert_eq!(code_down, 1, "{out_down}");
    let down = line(&out_down, "coordinator");
    assert!(
        down.starts_with("FAIL") && down.contains("cannot reach"),
        "{out_down}"
    );
}
