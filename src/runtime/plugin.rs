//! Finding and loading a PJRT plugin (a shared library exporting
//! `GetPjrtApi`), and calling into it with errors converted.

use std::env;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use super::error::{Error, ErrorCode, Result};
use super::ffi;

/// Calls a PJRT API function by name with a mutable args struct, turning a
/// missing entry or a returned error into `Err` with `$ctx`.
macro_rules! pjrt_call {
    ($plugin:expr, $func:ident, $args:expr, $ctx:expr) => {{
        let plugin: &$crate::runtime::plugin::Plugin = &$plugin;
        match plugin.api().$func {
            Some(f) => {
                // SAFETY: args is a properly sized, initialised struct of the
                // type this entry point takes.
                let err = unsafe { f($args) };
                plugin.check(err, $ctx)
            }
            None => Err($crate::runtime::Error::new(
                $ctx,
                concat!("plugin lacks ", stringify!($func)),
            )),
        }
    }};
}
pub(crate) use pjrt_call;

/// A PJRT args struct with `struct_size` set to the header's
/// `<Type>_STRUCT_SIZE` (offset of its last field plus that field's size,
/// so without trailing padding; plugins built against older or newer
/// headers use it to tell which fields exist), the given fields, and
/// everything else zeroed.
macro_rules! args {
    ($ty:ident { $($field:ident $(: $value:expr)?),* $(,)? }) => {
        paste::paste! {
            $crate::runtime::ffi::$ty {
                struct_size: $crate::runtime::ffi::[<$ty _STRUCT_SIZE>] as usize,
                $($field $(: $value)?,)*
                ..Default::default()
            }
        }
    };
}
pub(crate) use args;

/// The accelerator family a plugin drives.
///
/// Its names, as `run.backend` in a run config and `--backend` on the
/// command line, are the serde names below: `cpu`, `cuda` (alias `gpu`),
/// `tpu`. `FromStr` goes through them (ignoring case); `Display` and
/// serialising give the first name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Cpu,
    #[serde(alias = "gpu")]
    Cuda,
    Tpu,
}

impl Backend {
    pub const ALL: [Backend; 3] = [Backend::Cpu, Backend::Cuda, Backend::Tpu];

    /// (pip package, plugin path inside site-packages) candidates.
    fn packages(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Backend::Cpu => &[("xla-cpu-pjrt", "xla_plugins/xla_cpu_pjrt/xla_cpu_pjrt.so")],
            Backend::Cuda => &[
                (
                    "jax-cuda13-pjrt",
                    "jax_plugins/xla_cuda13/xla_cuda_plugin.so",
                ),
                (
                    "jax-cuda12-pjrt",
                    "jax_plugins/xla_cuda12/xla_cuda_plugin.so",
                ),
            ],
            Backend::Tpu => &[("libtpu", "libtpu/libtpu.so")],
        }
    }

    fn install_hint(self) -> String {
        let pkgs: Vec<&str> = self.packages().iter().map(|(p, _)| *p).collect();
        match self {
            Backend::Cpu => format!(
                "pip install {} (e.g. into .venv: .venv/bin/pip install {})",
                pkgs.join(" or "),
                pkgs[0]
            ),
            // The wheels are for Python >= 3.11/3.12: the script unpacks
            // them whatever the machine's Python.
            Backend::Tpu => format!(
                "run scripts/fetch-plugin.sh tpu (unpacks the wheel into .venv; or pip install {} on Python 3.11+)",
                pkgs[0]
            ),
            Backend::Cuda => format!(
                "run scripts/fetch-plugin.sh cuda12 or cuda13 (unpacks the plugin and its NVIDIA libraries \
                 into .venv; or pip install {} with the NVIDIA libraries)",
                pkgs.join(" or ")
            ),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
            Backend::Tpu => "tpu",
        })
    }
}

impl FromStr for Backend {
    type Err = Error;
    fn from_str(s: &str) -> Result<Backend> {
        use serde::de::{value::Error as NameError, IntoDeserializer};
        serde::Deserialize::deserialize(s.to_ascii_lowercase().into_deserializer()).map_err(
            |_: NameError| {
                let names: Vec<String> = Backend::ALL.iter().map(Backend::to_string).collect();
                let (last, rest) = names.split_last().expect("backends");
                Error::new(
                    "backend",
                    format!(
                        "unknown backend `{s}` (expected {} or {last}; gpu means cuda)",
                        rest.join(", ")
                    ),
                )
            },
        )
    }
}

/// Where a plugin was found and by which rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginLocation {
    pub path: PathBuf,
    /// `--plugin`, `SHAREDMOE_PJRT_PLUGIN`, or `package <name> in <dir>`.
    pub source: String,
}

/// Python site-packages directories to search, in order.
fn site_dirs() -> Vec<PathBuf> {
    let mut venvs: Vec<PathBuf> = vec![];
    if let Ok(v) = env::var("VIRTUAL_ENV") {
        venvs.push(PathBuf::from(v));
    }
    if let Ok(cwd) = env::current_dir() {
        venvs.push(cwd.join(".venv"));
    }
    if let Ok(exe) = env::current_exe() {
        venvs.extend(exe.ancestors().skip(1).map(|a| a.join(".venv")));
    }
    venvs.push(PathBuf::from(env!("SHAREDMOE_BUILD_VENV")));
    if let Ok(home) = env::var("HOME") {
        venvs.push(PathBuf::from(home).join(".local"));
    }
    let mut dirs = vec![];
    for v in venvs {
        dirs.extend(venv_site_dirs(&v));
    }
    dirs.extend(python_sys_path());
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| d.is_dir() && seen.insert(d.clone()));
    dirs
}

/// `VENV/lib/python3.*/site-packages`, the newest Python first: the
/// plugins that scripts/fetch-plugin.sh unpacks into
/// `lib/python3.12/site-packages` (whatever the venv's own Python) win
/// over older ones pip installed into a Python 3.10 or 3.11 venv.
fn venv_site_dirs(venv: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(venv.join("lib")) else {
        return vec![];
    };
    let mut found: Vec<(u32, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let minor = name.strip_prefix("python3.")?.parse().ok()?;
            Some((minor, e.path().join("site-packages")))
        })
        .collect();
    found.sort_by(|a, b| b.cmp(a));
    found.into_iter().map(|(_, d)| d).collect()
}

/// `sys.path` of the system `python3`, if there is one.
fn python_sys_path() -> Vec<PathBuf> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys; print('\\n'.join(p for p in sys.path if p))",
        ])
        .stderr(std::process::Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(PathBuf::from)
            .collect(),
        _ => vec![],
    }
}

/// Finds the plugin for `backend`: the explicit path, then the
/// `SHAREDMOE_PJRT_PLUGIN` environment variable, then the backend's pip
/// package in the usual site-packages directories.
pub fn find_plugin(backend: Backend, explicit: Option<&Path>) -> Result<PluginLocation> {
    find_plugin_in(
        backend,
        explicit,
        env::var_os("SHAREDMOE_PJRT_PLUGIN").map(PathBuf::from),
        &site_dirs(),
    )
}

fn find_plugin_in(
    backend: Backend,
    explicit: Option<&Path>,
    from_env: Option<PathBuf>,
    sites: &[PathBuf],
) -> Result<PluginLocation> {
    let ctx = format!("finding the {backend} PJRT plugin");
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(PluginLocation {
                path: p.to_path_buf(),
                source: "--plugin".into(),
            });
        }
        return Err(Error::new(
            ctx,
            format!(
                "--plugin {} does not exist; pass an existing plugin, or drop --plugin to \
                 use the installed package ({})",
                p.display(),
                backend.install_hint()
            ),
        ));
    }
    if let Some(p) = from_env {
        if p.is_file() {
            return Ok(PluginLocation {
                path: p,
                source: "SHAREDMOE_PJRT_PLUGIN".into(),
            });
        }
        return Err(Error::new(
            ctx,
            format!(
                "SHAREDMOE_PJRT_PLUGIN={} does not exist; point it at an existing plugin, or \
                 unset it to use the installed package ({})",
                p.display(),
                backend.install_hint()
            ),
        ));
    }
    for site in sites {
        for (pkg, rel) in backend.packages() {
            let p = site.join(rel);
            if p.is_file() {
                return Ok(PluginLocation {
                    path: p,
                    source: format!("package {pkg} in {}", site.display()),
                });
            }
        }
    }
    let looked: Vec<String> = sites.iter().map(|s| format!("  {}", s.display())).collect();
    Err(Error::new(
        ctx,
        format!(
            "no plugin found; {} or pass --plugin PATH / set SHAREDMOE_PJRT_PLUGIN. Looked for {} in:\n{}",
            backend.install_hint(),
            backend.packages().iter().map(|(_, r)| *r).collect::<Vec<_>>().join(" or "),
            if looked.is_empty() { "  (no site-packages directories found)".to_string() } else { looked.join("\n") }
        ),
    ))
}

/// Why a libtpu client (or initialisation) is refused here.
const NO_TPU: &str = "no TPU device on this machine (no PCI device of Google's vendor 0x1ae0 with a TPU \
     device id under /sys/bus/pci/devices); refusing to initialise libtpu or create a TPU client, which \
     would query the cloud metadata server. Run on a TPU VM (or a GKE TPU node), or choose another backend";

/// Google's PCI vendor id, as `/sys/bus/pci/devices/*/vendor` shows it.
const GOOGLE_PCI_VENDOR: &str = "0x1ae0";

/// PCI device ids of TPU chips (JAX's `hardware_utils.py`): v2/v3, an
/// unnamed one, v4, v5p, v5e, v6e, v7x. Google's vendor id alone is not
/// enough: every GCE VM's gVNIC network card (0x0042) has it too.
const TPU_PCI_DEVICES: &[&str] = &[
    "0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076",
];

/// The number of TPU chips on the PCI bus of the sysfs tree at `sysfs`
/// (normally `/sys`): devices under `bus/pci/devices` whose `vendor` is
/// Google's and whose `device` is a TPU's. Unreadable entries count as no
/// chip.
pub fn tpu_chips_in(sysfs: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(sysfs.join("bus/pci/devices")) else {
        return 0;
    };
    let read = |p: PathBuf| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_ascii_lowercase())
            .unwrap_or_default()
    };
    entries
        .flatten()
        .filter(|e| {
            read(e.path().join("vendor")) == GOOGLE_PCI_VENDOR
                && TPU_PCI_DEVICES.contains(&read(e.path().join("device")).as_str())
        })
        .count()
}

/// True when this machine has TPU chips, found on the PCI bus as JAX finds
/// them. Checked before libtpu is initialised: without chips, libtpu
/// queries the cloud metadata server over the network for minutes. Device
/// files are not evidence: GPU hosts have `/dev/vfio/vfio`, and `/dev/accel`
/// is the kernel's accelerator class (Intel NPUs, Habana), not TPUs only.
pub fn tpu_present() -> bool {
    tpu_chips_in(Path::new("/sys")) > 0
}

/// This project's defaults for `LIBTPU_INIT_ARGS`, as (flag, value).
const LIBTPU_DEFAULT_FLAGS: [(&str, &str); 2] = [
    // What JAX's `cloud_tpu_init.py` adds: multi-host programs check at
    // launch that every host runs the same program (by the executions'
    // launch ids, see `Executable`).
    ("--xla_tpu_use_enhanced_launch_barrier", "true"),
    // Windowed einsum (collective matmul) for all-gathered operands. In
    // libtpu 0.0.52 its code motion (MoveUsersIntoWindowedDotGeneralLoop-
    // OnNonContractingDimensions, in the SPMD partitioner) does not finish:
    // the fsdp = 16 steps of both full-size models and of tiny-sharedmoe on
    // a v4-32 grew past 20 GB of host memory in minutes without finishing;
    // without it each compiles in about a minute (issue 17). FSDP's weight
    // all-gathers are still overlapped by the latency-hiding scheduler.
    ("--xla_tpu_enable_windowed_einsum_for_all_gather", "false"),
];

/// `LIBTPU_INIT_ARGS` with this project's defaults appended to what the
/// user set, as `cloud_tpu_init.py` does: each default unless the user's
/// value already sets that flag (either way).
pub fn libtpu_init_args(current: Option<&str>) -> String {
    let mut args: Vec<String> = current
        .unwrap_or("")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    for (flag, value) in LIBTPU_DEFAULT_FLAGS {
        let set = args
            .iter()
            .any(|a| a == flag || a.starts_with(&format!("{flag}=")));
        if !set {
            args.push(format!("{flag}={value}"));
        }
    }
    args.join(" ")
}

/// Sets `LIBTPU_INIT_ARGS` to [`libtpu_init_args`] once per process, before
/// libtpu is loaded (libtpu reads its flags from the environment).
pub fn set_libtpu_init_args() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let current = env::var("LIBTPU_INIT_ARGS").ok();
        let want = libtpu_init_args(current.as_deref());
        if current.as_deref() != Some(want.as_str()) {
            env::set_var("LIBTPU_INIT_ARGS", &want);
        }
    });
}

fn is_libtpu(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("libtpu"))
}

/// The NVIDIA libraries a CUDA plugin opens, in dependency order, as
/// soname prefixes (the major version follows: `libcublas.so.12`,
/// `libcublas.so.13`). JAX's `_load_nvidia_libraries` set, plus nvJitLink.
const NVIDIA_LIBRARIES: &[&str] = &[
    "libcudart.so.",
    "libnvrtc.so.",
    "libnvJitLink.so.",
    "libcublasLt.so.",
    "libcublas.so.",
    "libcusparse.so.",
    "libcusolver.so.",
    "libcufft.so.",
    "libcupti.so.",
    "libnccl.so.",
    "libnvshmem_host.so.",
    "libcudnn.so.",
];

/// True for a jax-cudaNN-pjrt plugin (`jax_plugins/xla_cudaNN/xla_cuda_plugin.so`).
fn is_cuda_plugin(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n == "xla_cuda_plugin.so")
}

/// What [`preload_nvidia_libraries`] did.
#[derive(Debug, Default)]
pub struct NvidiaLibraries {
    /// Where it looked: the `nvidia/*/lib` directories next to the plugin.
    pub dirs: Vec<PathBuf>,
    /// Loaded, in order.
    pub loaded: Vec<PathBuf>,
    /// Found but not loadable, with dlopen's reason.
    pub failed: Vec<(PathBuf, String)>,
}

/// Loads (RTLD_NOW | RTLD_GLOBAL, for the life of the process) the NVIDIA
/// libraries unpacked next to a CUDA plugin: `SITE/nvidia/*/lib` for the
/// plugin `SITE/jax_plugins/xla_cudaNN/xla_cuda_plugin.so`, as the
/// `nvidia-*` wheels lay them out. JAX does this in Python before loading
/// the plugin (`_load_nvidia_libraries`); loaded from Rust, the plugin would
/// otherwise miss the libraries its RPATH does not cover (cuSOLVER, NVRTC,
/// NVSHMEM; cuDNN needs NVRTC). The plugin's later `dlopen("libX.so.N")`
/// then finds the loaded copy by its soname. Libraries whose dependencies
/// are not loaded yet are retried after the others. Without such a
/// directory nothing is loaded (the libraries then come from the system,
/// e.g. `LD_LIBRARY_PATH`).
pub fn preload_nvidia_libraries(plugin: &Path) -> NvidiaLibraries {
    let mut out = NvidiaLibraries::default();
    let Some(site) = plugin.ancestors().nth(3) else {
        return out;
    };
    if let Ok(entries) = std::fs::read_dir(site.join("nvidia")) {
        out.dirs = entries
            .flatten()
            .map(|e| e.path().join("lib"))
            .filter(|d| d.is_dir())
            .collect();
        out.dirs.sort();
    }
    let mut pending: Vec<PathBuf> = vec![];
    for prefix in NVIDIA_LIBRARIES {
        for dir in &out.dirs {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut found: Vec<PathBuf> = entries
                .flatten()
                .filter(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.strip_prefix(prefix)
                        .is_some_and(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_digit()))
                })
                .map(|e| e.path())
                .collect();
            found.sort();
            pending.extend(found);
        }
    }
    // Each pass loads what it can; a library whose dependency failed only
    // because of the order loads in a later pass.
    loop {
        let mut failed = vec![];
        let before = pending.len();
        for lib in pending.drain(..) {
            // SAFETY: loading NVIDIA's libraries runs their initialisers,
            // which is what loading the plugin would do too.
            match unsafe {
                libloading::os::unix::Library::open(
                    Some(&lib),
                    libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
                )
            } {
                Ok(handle) => {
                    tracing::debug!("preloaded {}", lib.display());
                    std::mem::forget(handle);
                    out.loaded.push(lib);
                }
                Err(e) => failed.push((lib, e.to_string())),
            }
        }
        if failed.is_empty() || failed.len() == before {
            out.failed = failed;
            return out;
        }
        pending = failed.into_iter().map(|(lib, _)| lib).collect();
    }
}

/// A loaded plugin, shared (`Arc`) by every client made from it.
///
/// The library is never unloaded: plugins keep threads and static state
/// alive past their last client (unloading one segfaults at exit), so, as
/// JAX does, a plugin stays loaded for the life of the process, and loading
/// the same path again returns the same `Plugin`.
pub struct Plugin {
    api: *const ffi::PJRT_Api,
    path: PathBuf,
    /// `PJRT_Plugin_Initialize`'s outcome, run once before the first client.
    initialized: std::sync::OnceLock<Result<()>>,
    _lib: std::mem::ManuallyDrop<libloading::Library>,
}

static LOADED: std::sync::Mutex<Vec<Arc<Plugin>>> = std::sync::Mutex::new(Vec::new());

// SAFETY: the PJRT_Api table is immutable after GetPjrtApi, and PJRT C API
// functions are thread-safe.
unsafe impl Send for Plugin {}
unsafe impl Sync for Plugin {}

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (major, minor) = self.api_version();
        write!(
            f,
            "Plugin({}, PJRT C API {major}.{minor})",
            self.path.display()
        )
    }
}

impl Plugin {
    /// Loads the library and reads its API table (`GetPjrtApi`), nothing
    /// more: initialisation waits for the first client
    /// ([`initialize`](Self::initialize)), because libtpu's
    /// `PJRT_Plugin_Initialize` already asks the cloud metadata server for
    /// the TPU topology (minutes of network retries on a machine without
    /// TPU). So a plugin can always be found, loaded and its version read.
    pub fn load(path: &Path) -> Result<Arc<Plugin>> {
        let ctx = format!("loading PJRT plugin {}", path.display());
        if !path.is_file() {
            return Err(Error::new(ctx, "file does not exist"));
        }
        let canonical = path
            .canonicalize()
            .map_err(|e| Error::new(&ctx, e.to_string()))?;
        let mut loaded = LOADED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = loaded.iter().find(|p| p.path == canonical) {
            return Ok(p.clone());
        }
        let path = canonical.as_path();
        if is_libtpu(path) {
            set_libtpu_init_args();
        }
        if is_cuda_plugin(path) {
            let libs = preload_nvidia_libraries(path);
            for (lib, e) in &libs.failed {
                tracing::warn!("could not preload {}: {e}", lib.display());
            }
        }
        // SAFETY: loading a shared library runs its initialisers; PJRT
        // plugins are designed to be dlopen'ed.
        let lib = unsafe { libloading::Library::new(path) }
            .map_err(|e| Error::new(&ctx, e.to_string()))?;
        // SAFETY: GetPjrtApi has this signature in every PJRT plugin.
        let get: libloading::Symbol<unsafe extern "C" fn() -> *const ffi::PJRT_Api> =
            unsafe { lib.get(b"GetPjrtApi\0") }
                .map_err(|e| Error::new(&ctx, format!("not a PJRT plugin: {e}")))?;
        let api = unsafe { get() };
        if api.is_null() {
            return Err(Error::new(ctx, "GetPjrtApi returned null"));
        }
        let plugin = Arc::new(Plugin {
            api,
            path: path.to_path_buf(),
            initialized: std::sync::OnceLock::new(),
            _lib: std::mem::ManuallyDrop::new(lib),
        });
        loaded.push(plugin.clone());
        Ok(plugin)
    }

    /// Runs `PJRT_Plugin_Initialize` once (later calls return the first
    /// outcome). Refuses libtpu on a machine without TPU chips, since
    /// initialising it queries the cloud metadata server.
    pub fn initialize(&self) -> Result<()> {
        let ctx = format!("initialising PJRT plugin {}", self.path.display());
        if self.is_tpu() && !tpu_present() {
            return Err(Error::new(ctx, NO_TPU));
        }
        self.initialize_once(&ctx)
    }

    /// [`initialize`](Self::initialize) for ahead-of-time compilation,
    /// with or without TPU chips: only with the proof that this process
    /// cannot reach a network and skips the metadata query, re-checked here.
    pub fn initialize_offline(&self, _offline: &super::offline::Offline) -> Result<()> {
        super::offline::Offline::verify()?;
        self.initialize_once(&format!(
            "initialising PJRT plugin {} offline",
            self.path.display()
        ))
    }

    fn initialize_once(&self, ctx: &str) -> Result<()> {
        let outcome = self.initialized.get_or_init(|| {
            let mut args = args!(PJRT_Plugin_Initialize_Args {});
            match self.api().PJRT_Plugin_Initialize {
                // SAFETY: a properly sized args struct, as the entry point takes.
                Some(init) => self.check(unsafe { init(&mut args) }, ctx),
                None => Err(Error::new(ctx, "plugin lacks PJRT_Plugin_Initialize")),
            }
        });
        outcome.clone()
    }

    /// The PJRT C API version the plugin implements (major, minor).
    pub fn api_version(&self) -> (i32, i32) {
        let v = &self.api().pjrt_api_version;
        (v.major_version, v.minor_version)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True for libtpu (whose client creation must be guarded).
    pub fn is_tpu(&self) -> bool {
        is_libtpu(&self.path)
    }

    pub(crate) fn api(&self) -> &ffi::PJRT_Api {
        // SAFETY: non-null (checked in load) and valid while the library is loaded.
        unsafe { &*self.api }
    }

    /// Converts a returned `PJRT_Error*` into a `Result`, destroying it.
    pub(crate) fn check(&self, err: *mut ffi::PJRT_Error, context: &str) -> Result<()> {
        if err.is_null() {
            return Ok(());
        }
        let api = self.api();
        let mut msg = args!(PJRT_Error_Message_Args { error: err });
        let message = match api.PJRT_Error_Message {
            Some(f) => {
                // SAFETY: `err` is a live error; the message it returns is
                // owned by the error and valid until it is destroyed below.
                unsafe { f(&mut msg) };
                if msg.message.is_null() {
                    String::new()
                } else {
                    let bytes = unsafe {
                        std::slice::from_raw_parts(msg.message as *const u8, msg.message_size)
                    };
                    String::from_utf8_lossy(bytes).into_owned()
                }
            }
            None => "(plugin gave no message)".into(),
        };
        let mut code_args = args!(PJRT_Error_GetCode_Args { error: err });
        let code = api.PJRT_Error_GetCode.and_then(|f| {
            // SAFETY: as above; GetCode returns null on success.
            let e = unsafe { f(&mut code_args) };
            e.is_null()
                .then(|| ErrorCode::from_raw(code_args.code as i32))
        });
        let mut destroy = args!(PJRT_Error_Destroy_Args { error: err });
        if let Some(f) = api.PJRT_Error_Destroy {
            // SAFETY: destroyed exactly once, after its message was copied.
            unsafe { f(&mut destroy) };
        }
        Err(Error {
            code,
            message,
            context: context.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"").unwrap();
    }

    #[test]
    fn discovery_order_is_explicit_env_then_packages() {
        let tmp = std::env::temp_dir().join(format!("sharedmoe-plugin-{}", std::process::id()));
        let site = tmp.join("site-packages");
        let pkg = site.join("xla_plugins/xla_cpu_pjrt/xla_cpu_pjrt.so");
        touch(&pkg);
        let explicit = tmp.join("mine.so");
        touch(&explicit);
        let sites = vec![site.clone()];
        let found =
            find_plugin_in(Backend::Cpu, Some(&explicit), Some(pkg.clone()), &sites).unwrap();
        assert_eq!(
            (found.path, found.source.as_str()),
            (explicit.clone(), "--plugin")
        );
        let found = find_plugin_in(Backend::Cpu, None, Some(explicit.clone()), &sites).unwrap();
        assert_eq!(found.source, "SHAREDMOE_PJRT_PLUGIN");
        let found = find_plugin_in(Backend::Cpu, None, None, &sites).unwrap();
        assert_eq!(found.path, pkg);
        assert!(found.source.contains("xla-cpu-pjrt"));
        // cuda prefers the CUDA 13 package, falls back to 12.
        let cuda12 = site.join("jax_plugins/xla_cuda12/xla_cuda_plugin.so");
        touch(&cuda12);
        assert_eq!(
            find_plugin_in(Backend::Cuda, None, None, &sites)
                .unwrap()
                .path,
            cuda12
        );
        let cuda13 = site.join("jax_plugins/xla_cuda13/xla_cuda_plugin.so");
        touch(&cuda13);
        assert_eq!(
            find_plugin_in(Backend::Cuda, None, None, &sites)
                .unwrap()
                .path,
            cuda13
        );
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn a_venvs_newest_python_comes_first() {
        let tmp = std::env::temp_dir().join(format!("sharedmoe-venv-{}", std::process::id()));
        for v in [
            "python3.10",
            "python3.12",
            "python3.9",
            "python2.7",
            "python3.11",
        ] {
            std::fs::create_dir_all(tmp.join("lib").join(v).join("site-packages")).unwrap();
        }
        let dirs: Vec<String> = venv_site_dirs(&tmp)
            .iter()
            .map(|d| {
                d.parent()
                    .unwrap()
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(
            dirs,
            ["python3.12", "python3.11", "python3.10", "python3.9"]
        );
        assert!(venv_site_dirs(&tmp.join("nonexistent")).is_empty());
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn missing_plugin_names_package_and_places() {
        let sites = vec![PathBuf::from("/nonexistent/site-packages")];
        let err = find_plugin_in(Backend::Tpu, None, None, &sites)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("scripts/fetch-plugin.sh tpu")
                && err.contains("pip install libtpu")
                && err.contains("/nonexistent/site-packages"),
            "{err}"
        );
        let err = find_plugin_in(Backend::Cpu, Some(Path::new("/no/such.so")), None, &sites)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/no/such.so") && err.contains("pip install xla-cpu-pjrt"),
            "{err}"
        );
        let err = find_plugin_in(Backend::Cuda, None, None, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("jax-cuda13-pjrt or jax-cuda12-pjrt"), "{err}");
    }

    #[test]
    fn tpu_chips_are_found_by_pci_vendor_and_device_on_a_fake_sysfs() {
        let root = std::env::temp_dir().join(format!("sharedmoe-sysfs-{}", std::process::id()));
        let dev = |name: &str, vendor: &str, device: Option<&str>| {
            let d = root.join("bus/pci/devices").join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("vendor"), format!("{vendor}\n")).unwrap();
            if let Some(id) = device {
                std::fs::write(d.join("device"), format!("{id}\n")).unwrap();
            }
        };
        assert_eq!(tpu_chips_in(&root), 0, "no bus/pci/devices at all");
        // A GPU host on GCE: NVIDIA GPU, Google's gVNIC, an Intel bridge.
        dev("0000:00:04.0", "0x10de", Some("0x2330"));
        dev("0000:00:05.0", "0x1ae0", Some("0x0042"));
        dev("0000:00:00.0", "0x8086", Some("0x1237"));
        dev("0000:00:06.0", "0x1ae0", None); // unreadable device id
        std::fs::create_dir_all(root.join("bus/pci/devices/0000:00:07.0")).unwrap();
        // ... with /dev/vfio/vfio and /dev/accel-like files elsewhere: irrelevant.
        assert_eq!(tpu_chips_in(&root), 0);
        // A v4 host: four chips.
        for i in 0..4 {
            dev(&format!("0000:00:0{i}.1"), "0x1ae0", Some("0x005e"));
        }
        assert_eq!(tpu_chips_in(&root), 4);
        // Upper-case hex as some kernels print it.
        dev("0000:00:08.0", "0x1AE0", Some("0x006F"));
        assert_eq!(tpu_chips_in(&root), 5);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn libtpu_init_args_append_the_defaults_to_the_users() {
        let barrier = "--xla_tpu_use_enhanced_launch_barrier=true";
        let einsum = "--xla_tpu_enable_windowed_einsum_for_all_gather=false";
        let both = format!("{barrier} {einsum}");
        assert_eq!(libtpu_init_args(None), both);
        assert_eq!(libtpu_init_args(Some("  ")), both);
        assert_eq!(
            libtpu_init_args(Some("--xla_tpu_scoped_vmem_limit_kib=81920")),
            format!("--xla_tpu_scoped_vmem_limit_kib=81920 {both}")
        );
        // The user's own setting, either way, wins; a flag whose name only
        // starts like a default's is not that default.
        for (mine, want) in [
            (
                "--xla_tpu_use_enhanced_launch_barrier=false",
                format!("--xla_tpu_use_enhanced_launch_barrier=false {einsum}"),
            ),
            (
                "--a=1 --xla_tpu_use_enhanced_launch_barrier=true",
                format!("--a=1 {barrier} {einsum}"),
            ),
            (
                "--xla_tpu_enable_windowed_einsum_for_all_gather=true",
                format!("--xla_tpu_enable_windowed_einsum_for_all_gather=true {barrier}"),
            ),
            (
                "--xla_tpu_use_enhanced_launch_barrier_x=1",
                format!("--xla_tpu_use_enhanced_launch_barrier_x=1 {both}"),
            ),
        ] {
            assert_eq!(libtpu_init_args(Some(mine)), want);
        }
    }

    #[test]
    fn nvidia_libraries_are_taken_from_next_to_the_plugin_in_dependency_order() {
        let tmp = std::env::temp_dir().join(format!("sharedmoe-nvlibs-{}", std::process::id()));
        let site = tmp.join("site-packages");
        let plugin = site.join("jax_plugins/xla_cuda12/xla_cuda_plugin.so");
        touch(&plugin);
        assert!(is_cuda_plugin(&plugin));
        // Not shared libraries: dlopen refuses each, and every one is reported.
        for f in [
            "cudnn/lib/libcudnn.so.9",
            "cudnn/lib/libcudnn_graph.so.9",
            "cublas/lib/libcublas.so.12",
            "cublas/lib/libcublasLt.so.12",
            "cuda_nvrtc/lib/libnvrtc.so.12",
            "cuda_nvrtc/lib/libnvrtc.alt.so.12",
            "cuda_nvrtc/lib/libnvrtc-builtins.so.12.9",
            "cu13/lib/libcudart.so.13",
        ] {
            touch(&site.join("nvidia").join(f));
        }
        let libs = preload_nvidia_libraries(&plugin);
        assert_eq!(libs.dirs.len(), 4);
        assert!(libs.loaded.is_empty());
        let order: Vec<String> = libs
            .failed
            .iter()
            .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            order,
            [
                "libcudart.so.13",
                "libnvrtc.so.12",
                "libcublasLt.so.12",
                "libcublas.so.12",
                "libcudnn.so.9"
            ]
        );
        // No nvidia/ next to the plugin: nothing to do.
        let alone = tmp.join("elsewhere/a/b/xla_cuda_plugin.so");
        touch(&alone);
        let none = preload_nvidia_libraries(&alone);
        assert!(none.dirs.is_empty() && none.loaded.is_empty() && none.failed.is_empty());
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn backend_names() {
        assert_eq!("CPU".parse::<Backend>().unwrap(), Backend::Cpu);
        assert_eq!("gpu".parse::<Backend>().unwrap(), Backend::Cuda);
        let e = "fpga".parse::<Backend>().unwrap_err().to_string();
        assert!(
            e.contains("`fpga`") && e.contains("cpu, cuda or tpu; gpu means cuda"),
            "{e}"
        );
        // Printing and serialising give the name parsing takes.
        for b in Backend::ALL {
            assert_eq!(b.to_string().parse::<Backend>().unwrap(), b);
            assert_eq!(serde_json::to_value(b).unwrap(), b.to_string().as_str());
        }
    }
}
