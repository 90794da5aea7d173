//! `sharedmoe launch --local N`: a coordinator and N workers as processes
//! on this machine, for development and CI. Workers that die are started
//! again while the coordinator runs (it restarts the job from the last
//! checkpoint); SIGINT/SIGTERM go to every worker (a checkpoint, then a
//! clean stop). The launcher exits with the coordinator's status.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub struct LaunchOptions {
    pub workers: u32,
    /// `--config C --set ...` as given.
    pub config_args: Vec<String>,
    pub run_dir: PathBuf,
    /// Extra coordinator flags (restarts, heartbeats, ...).
    pub coordinator_args: Vec<String>,
    /// Extra worker flags (plugin, ...).
    pub worker_args: Vec<String>,
    /// How many times a dead worker is started again.
    pub max_worker_restarts: u32,
}

fn spawn(exe: &Path, args: &[String], what: &str) -> Result<Child> {
    Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting the {what}"))
}

fn wait_for_addr(file: &Path, coordinator: &mut Child) -> Result<String> {
    let began = Instant::now();
    loop {
        if let Ok(a) = std::fs::read_to_string(file) {
            if !a.is_empty() {
                return Ok(a);
            }
        }
        if let Some(status) = coordinator.try_wait()? {
            bail!("the coordinator exited before listening ({status})");
        }
        if began.elapsed() > Duration::from_secs(60) {
            bail!("the coordinator did not start listening within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn terminate(child: &Child) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
}

pub fn launch_local(opts: &LaunchOptions) -> Result<ExitStatus> {
    if opts.workers == 0 {
        bail!("--local must be at least 1");
    }
    let exe = std::env::current_exe().context("finding this executable")?;
    std::fs::create_dir_all(&opts.run_dir)
        .with_context(|| format!("creating {}", opts.run_dir.display()))?;
    let addr_file = opts.run_dir.join("coordinator.addr");
    let _ = std::fs::remove_file(&addr_file);
    let mut args = vec!["coordinator".to_string()];
    args.extend(opts.config_args.iter().cloned());
    args.extend([
        "--workers".into(),
        opts.workers.to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--run-dir".into(),
        opts.run_dir.display().to_string(),
        "--addr-file".into(),
        addr_file.display().to_string(),
    ]);
    args.extend(opts.coordinator_args.iter().cloned());
    let mut coordinator = spawn(&exe, &args, "coordinator")?;
    let addr = match wait_for_addr(&addr_file, &mut coordinator) {
        Ok(a) => a,
        Err(e) => {
            let _ = coordinator.kill();
            return Err(e);
        }
    };
    tracing::info!("coordinator at {addr}; starting {} workers", opts.workers);
    let mut worker_args = vec!["worker".to_string(), "--coordinator".into(), addr.clone()];
    worker_args.extend(opts.worker_args.iter().cloned());
    let mut workers: Vec<Option<Child>> = (0..opts.workers)
        .map(|_| spawn(&exe, &worker_args, "worker").map(Some))
        .collect::<Result<_>>()?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }
    let mut restarts = 0;
    let mut forwarded = false;
    loop {
        if stop.load(Ordering::Relaxed) && !forwarded {
            tracing::info!("stopping: SIGTERM to every worker (they checkpoint and exit)");
            workers.iter().flatten().for_each(terminate);
            forwarded = true;
        }
        if let Some(status) = coordinator.try_wait()? {
            // The job is over; workers exit on their own once they hear it.
            let deadline = Instant::now() + Duration::from_secs(10);
            for w in workers.iter_mut().flatten() {
                while w.try_wait()?.is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
                if w.try_wait()?.is_none() {
                    let _ = w.kill();
                    let _ = w.wait();
                }
            }
            return Ok(status);
        }
        for (i, slot) in workers.iter_mut().enumerate() {
            let Some(w) = slot else { continue };
            let Some(status) = w.try_wait()? else {
                continue;
            };
            if status.success() || forwarded {
                *slot = None;
                continue;
            }
            if restarts >= opts.max_worker_restarts {
                tracing::error!("worker {i} exited ({status}); no restarts left");
                *slot = None;
                continue;
            }
            restarts += 1;
            tracing::warn!(
                "worker {i} exited ({status}); starting a new one ({restarts} of {})",
                opts.max_worker_restarts
            );
            *slot = Some(spawn(&exe, &worker_args, "worker")?);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
