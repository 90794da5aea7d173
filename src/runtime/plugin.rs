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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    Cpu,
    Cuda,
    Tpu,
}

impl Backend {
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
        format!(
            "pip install {} (e.g. into .venv: .venv/bin/pip install {})",
            pkgs.join(" or "),
            pkgs[0]
        )
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
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(Backend::Cpu),
            "cuda" | "gpu" => Ok(Backend::Cuda),
            "tpu" => Ok(Backend::Tpu),
            other => Err(Error::new(
                "backend",
                format!("unknown backend `{other}` (expected cpu, cuda or tpu)"),
            )),
        }
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
        if let Ok(entries) = std::fs::read_dir(v.join("lib")) {
            let mut found: Vec<PathBuf> = entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
                .map(|e| e.path().join("site-packages"))
                .collect();
            found.sort();
            dirs.extend(found);
        }
    }
    dirs.extend(python_sys_path());
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| d.is_dir() && seen.insert(d.clone()));
    dirs
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
const NO_TPU: &str = "no TPU device on this machine (/dev/accel* or /dev/vfio/*); refusing to \
     initialise libtpu or create a TPU client, which would query the cloud metadata server. Run on a \
     TPU VM (or a GKE TPU node), or choose another backend";

/// True when this machine has TPU chips (as on TPU VMs: `/dev/accel*` or
/// `/dev/vfio/*`). Checked before creating a libtpu client: without chips,
/// libtpu queries the cloud metadata server over the network for minutes.
pub fn tpu_present() -> bool {
    let any_in = |dir: &str, prefix: &str| {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(prefix))
            })
            .unwrap_or(false)
    };
    any_in("/dev", "accel") || any_in("/dev/vfio", "")
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
        self.path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("libtpu"))
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
    fn missing_plugin_names_package_and_places() {
        let sites = vec![PathBuf::from("/nonexistent/site-packages")];
        let err = find_plugin_in(Backend::Tpu, None, None, &sites)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pip install libtpu") && err.contains("/nonexistent/site-packages"),
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
    fn backend_names() {
        assert_eq!("CPU".parse::<Backend>().unwrap(), Backend::Cpu);
        assert_eq!("gpu".parse::<Backend>().unwrap(), Backend::Cuda);
        assert!("fpga"
            .parse::<Backend>()
            .unwrap_err()
            .to_string()
            .contains("fpga"));
    }
}
