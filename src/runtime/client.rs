//! PJRT clients and devices, host-to-device transfers, compilation, and the
//! key-value store hook for multi-host initialisation.

use std::ffi::c_char;
use std::fmt;
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

use super::buffer::Buffer;
use super::compile_options::CompileOptions;
use super::element_type::{ElementType, NativeType};
use super::error::{Error, ErrorCode, Result};
use super::executable::Executable;
use super::ffi;
use super::named::{named_values, NamedValue};
use super::plugin::{args, find_plugin, pjrt_call, Backend, Plugin};

impl Backend {
    /// The client-creation options every client of this backend gets. The
    /// plugins validate option names and reject unknown ones, so each gets
    /// only its own: the CPU plugin its device count; the CUDA plugin
    /// `abort_collectives_on_failure` (a collective whose peer died fails
    /// instead of hanging, so a multi-node worker can exit and be
    /// restarted); libtpu the framework's name and version, as JAX and
    /// PyTorch/XLA send them.
    pub fn client_options(self, cpu_devices: usize) -> Vec<(&'static str, NamedValue)> {
        match self {
            Backend::Cpu => vec![("cpu_device_count", NamedValue::Int(cpu_devices as i64))],
            Backend::Cuda => vec![("abort_collectives_on_failure", NamedValue::Bool(true))],
            Backend::Tpu => vec![
                ("ml_framework_name", NamedValue::Str("sharedmoe".into())),
                (
                    "ml_framework_version",
                    NamedValue::Str(env!("CARGO_PKG_VERSION").into()),
                ),
            ],
        }
    }
}

/// A cross-process key-value store handed to the plugin at client creation
/// (multi-host GPU/TPU topology exchange). Called from plugin threads, so
/// implementations must be thread-safe; keys are the plugin's own.
pub trait KeyValueStore: Send + Sync {
    fn put(&self, key: &str, value: &[u8]) -> Result<()>;
    /// Blocks until `key` is set or `timeout` passes (then an error,
    /// ideally with code `DeadlineExceeded`).
    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>>;
    /// Non-blocking get: `Ok(None)` when `key` is not set. The default asks
    /// `get` with a zero timeout and reads a `NotFound` or
    /// `DeadlineExceeded` error as "not set".
    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        match self.get(key, Duration::ZERO) {
            Ok(v) => Ok(Some(v)),
            Err(e)
                if matches!(
                    e.code,
                    Some(ErrorCode::NotFound) | Some(ErrorCode::DeadlineExceeded)
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// The owned `PJRT_Client*`; everything made from a client keeps it alive.
pub(crate) struct ClientInner {
    pub plugin: Arc<Plugin>,
    pub raw: *mut ffi::PJRT_Client,
    /// Boxed so its address is stable: the plugin holds it as user_arg.
    _kv: Option<Box<Arc<dyn KeyValueStore>>>,
}

// SAFETY: PJRT clients are thread-safe.
unsafe impl Send for ClientInner {}
unsafe impl Sync for ClientInner {}

impl Drop for ClientInner {
    fn drop(&mut self) {
        let mut a = args!(PJRT_Client_Destroy_Args { client: self.raw });
        if let Err(e) = pjrt_call!(
            self.plugin,
            PJRT_Client_Destroy,
            &mut a,
            "destroying client"
        ) {
            tracing::warn!("{e}");
        }
    }
}

/// A PJRT client: the devices of one plugin in this process.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<ClientInner>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Client({}, {} devices)",
            self.platform_name(),
            self.devices().len()
        )
    }
}

/// One addressable device of a client.
#[derive(Clone)]
pub struct Device {
    pub(crate) raw: *mut ffi::PJRT_Device,
    id: i32,
    process_index: i32,
    local_hardware_id: i32,
    kind: String,
    debug: String,
    _client: Arc<ClientInner>,
}

// SAFETY: device handles are immutable and owned by the (thread-safe) client.
unsafe impl Send for Device {}
unsafe impl Sync for Device {}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Device({} {})", self.id, self.kind)
    }
}

impl Device {
    pub fn id(&self) -> i32 {
        self.id
    }

    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The process (host) that drives this device in a multi-host job.
    pub fn process_index(&self) -> i32 {
        self.process_index
    }

    /// The plugin's hardware id of this device on its host (-1 if unknown).
    pub fn local_hardware_id(&self) -> i32 {
        self.local_hardware_id
    }

    pub fn debug_string(&self) -> &str {
        &self.debug
    }

    /// Bytes of device memory: (usable limit, in use), where the plugin
    /// reports them (accelerators do; the CPU plugin does not).
    pub fn memory(&self) -> Option<(i64, i64)> {
        let p = &self._client.plugin;
        let mut a = args!(PJRT_Device_MemoryStats_Args { device: self.raw });
        pjrt_call!(p, PJRT_Device_MemoryStats, &mut a, "device memory").ok()?;
        a.bytes_limit_is_set
            .then_some((a.bytes_limit, a.bytes_in_use))
    }
}

/// Copies a `(ptr, len)` string the plugin returned.
fn plugin_str(ptr: *const c_char, len: usize) -> String {
    if ptr.is_null() {
        return String::new();
    }
    // SAFETY: the plugin guarantees `len` readable bytes at `ptr`.
    String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(ptr as *const u8, len) })
        .into_owned()
}

impl Client {
    /// Creates a client from a loaded plugin with named options (e.g.
    /// `cpu_device_count`) and an optional key-value store.
    pub fn new(
        plugin: Arc<Plugin>,
        options: &[(&str, NamedValue)],
        kv: Option<Arc<dyn KeyValueStore>>,
    ) -> Result<Client> {
        let ctx = format!("creating PJRT client from {}", plugin.path().display());
        // Refuses libtpu where there are no TPU chips (before anything can
        // reach the cloud metadata server).
        plugin.initialize()?;
        let named = named_values(options);
        let kv_box: Option<Box<Arc<dyn KeyValueStore>>> = kv.map(Box::new);
        let mut a = args!(PJRT_Client_Create_Args {
            create_options: named.as_ptr(),
            num_options: named.len()
        });
        if let Some(b) = &kv_box {
            let user = &**b as *const Arc<dyn KeyValueStore> as *mut std::ffi::c_void;
            a.kv_get_callback = Some(kv_get_trampoline);
            a.kv_get_user_arg = user;
            a.kv_put_callback = Some(kv_put_trampoline);
            a.kv_put_user_arg = user;
            a.kv_try_get_callback = Some(kv_try_get_trampoline);
            a.kv_try_get_user_arg = user;
        }
        pjrt_call!(plugin, PJRT_Client_Create, &mut a, &ctx)?;
        if a.client.is_null() {
            return Err(Error::new(ctx, "plugin returned no client"));
        }
        Ok(Client {
            inner: Arc::new(ClientInner {
                plugin,
                raw: a.client,
                _kv: kv_box,
            }),
        })
    }

    /// A CPU client with `device_count` devices from the discovered
    /// `xla-cpu-pjrt` plugin.
    pub fn cpu(device_count: usize) -> Result<Client> {
        let loc = find_plugin(Backend::Cpu, None)?;
        let plugin = Plugin::load(&loc.path)?;
        Client::new(plugin, &Backend::Cpu.client_options(device_count), None)
    }

    pub fn plugin(&self) -> &Arc<Plugin> {
        &self.inner.plugin
    }

    pub fn platform_name(&self) -> String {
        let mut a = args!(PJRT_Client_PlatformName_Args {
            client: self.inner.raw
        });
        match pjrt_call!(
            self.inner.plugin,
            PJRT_Client_PlatformName,
            &mut a,
            "platform name"
        ) {
            Ok(()) => plugin_str(a.platform_name, a.platform_name_size),
            Err(e) => format!("<{e}>"),
        }
    }

    /// This process's index in a multi-host job (0 when alone).
    pub fn process_index(&self) -> i32 {
        let mut a = args!(PJRT_Client_ProcessIndex_Args {
            client: self.inner.raw
        });
        match pjrt_call!(
            self.inner.plugin,
            PJRT_Client_ProcessIndex,
            &mut a,
            "process index"
        ) {
            Ok(()) => a.process_index,
            Err(e) => {
                tracing::warn!("{e}");
                0
            }
        }
    }

    /// Every device of the job, this process's and the other hosts' (a
    /// multi-host client sees them all; only [`devices`](Self::devices) are
    /// addressable from here).
    pub fn global_devices(&self) -> Vec<Device> {
        let mut a = args!(PJRT_Client_Devices_Args {
            client: self.inner.raw
        });
        if let Err(e) = pjrt_call!(
            self.inner.plugin,
            PJRT_Client_Devices,
            &mut a,
            "listing the job's devices"
        ) {
            tracing::error!("{e}");
            return vec![];
        }
        // SAFETY: the plugin returns `num` device pointers owned by the client.
        let raws = unsafe { std::slice::from_raw_parts(a.devices, a.num_devices) };
        raws.iter().map(|&d| self.device_from_raw(d)).collect()
    }

    /// The devices this process can address, in the plugin's order.
    pub fn devices(&self) -> Vec<Device> {
        let mut a = args!(PJRT_Client_AddressableDevices_Args {
            client: self.inner.raw
        });
        if let Err(e) = pjrt_call!(
            self.inner.plugin,
            PJRT_Client_AddressableDevices,
            &mut a,
            "listing devices"
        ) {
            tracing::error!("{e}");
            return vec![];
        }
        // SAFETY: the plugin returns `num` device pointers owned by the client.
        let raws =
            unsafe { std::slice::from_raw_parts(a.addressable_devices, a.num_addressable_devices) };
        raws.iter().map(|&d| self.device_from_raw(d)).collect()
    }

    pub(crate) fn device_from_raw(&self, raw: *mut ffi::PJRT_Device) -> Device {
        let p = &self.inner.plugin;
        let mut desc = args!(PJRT_Device_GetDescription_Args { device: raw });
        let _ = pjrt_call!(
            p,
            PJRT_Device_GetDescription,
            &mut desc,
            "device description"
        );
        let dd = desc.device_description;
        let mut id = args!(PJRT_DeviceDescription_Id_Args {
            device_description: dd
        });
        let _ = pjrt_call!(p, PJRT_DeviceDescription_Id, &mut id, "device id");
        let mut kind = args!(PJRT_DeviceDescription_Kind_Args {
            device_description: dd
        });
        let _ = pjrt_call!(p, PJRT_DeviceDescription_Kind, &mut kind, "device kind");
        let mut dbg = args!(PJRT_DeviceDescription_DebugString_Args {
            device_description: dd
        });
        let _ = pjrt_call!(
            p,
            PJRT_DeviceDescription_DebugString,
            &mut dbg,
            "device debug string"
        );
        let mut process = args!(PJRT_DeviceDescription_ProcessIndex_Args {
            device_description: dd
        });
        let _ = pjrt_call!(
            p,
            PJRT_DeviceDescription_ProcessIndex,
            &mut process,
            "device process index"
        );
        let mut local = args!(PJRT_Device_LocalHardwareId_Args {
            device: raw,
            local_hardware_id: -1,
        });
        let _ = pjrt_call!(
            p,
            PJRT_Device_LocalHardwareId,
            &mut local,
            "device local hardware id"
        );
        Device {
            raw,
            id: id.id,
            process_index: process.process_index,
            local_hardware_id: local.local_hardware_id,
            kind: plugin_str(kind.device_kind, kind.device_kind_size),
            debug: plugin_str(dbg.debug_string, dbg.debug_string_size),
            _client: self.inner.clone(),
        }
    }

    /// Copies `data` (row-major, `dims`) to `device`.
    pub fn buffer_from_host<T: NativeType>(
        &self,
        data: &[T],
        dims: &[i64],
        device: &Device,
    ) -> Result<Buffer> {
        // SAFETY: a slice of plain-old-data viewed as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(data.as_ptr() as *const u8, std::mem::size_of_val(data))
        };
        self.buffer_from_bytes(bytes, T::TYPE, dims, device)
    }

    /// Copies raw little-endian element bytes to `device`.
    pub fn buffer_from_bytes(
        &self,
        bytes: &[u8],
        ty: ElementType,
        dims: &[i64],
        device: &Device,
    ) -> Result<Buffer> {
        let ctx = format!("copying {ty:?}{dims:?} to device {}", device.id);
        if dims.iter().any(|&d| d < 0) {
            return Err(Error::new(ctx, "negative dimension"));
        }
        let want = dims.iter().product::<i64>() as usize * ty.size_in_bytes();
        if bytes.len() != want {
            return Err(Error::new(
                ctx,
                format!("{} bytes given, {want} expected", bytes.len()),
            ));
        }
        let p = &self.inner.plugin;
        let mut a = args!(PJRT_Client_BufferFromHostBuffer_Args {
            client: self.inner.raw,
            data: bytes.as_ptr() as *const std::ffi::c_void,
            type_: ty.to_raw(),
            dims: dims.as_ptr(),
            num_dims: dims.len(),
            host_buffer_semantics: ffi::PJRT_HostBufferSemantics_kImmutableOnlyDuringCall,
            device: device.raw,
        });
        pjrt_call!(p, PJRT_Client_BufferFromHostBuffer, &mut a, &ctx)?;
        let buffer = Buffer::from_raw(self.inner.clone(), a.buffer);
        // The host bytes may be freed once the plugin is done with them.
        super::buffer::await_event(p, a.done_with_host_buffer, &ctx)?;
        Ok(buffer)
    }

    /// Compiles a StableHLO module given as MLIR text.
    pub fn compile(&self, mlir: &str, options: &CompileOptions) -> Result<Executable> {
        let ctx = "compiling StableHLO module";
        let format = "mlir";
        let program = args!(PJRT_Program {
            code: mlir.as_ptr() as *mut c_char,
            code_size: mlir.len(),
            format: format.as_ptr() as *const c_char,
            format_size: format.len(),
        });
        let opts = options.to_proto_bytes();
        let mut a = args!(PJRT_Client_Compile_Args {
            client: self.inner.raw,
            program: &program,
            compile_options: opts.as_ptr() as *const c_char,
            compile_options_size: opts.len(),
        });
        pjrt_call!(self.inner.plugin, PJRT_Client_Compile, &mut a, ctx)?;
        Executable::from_raw(self.clone(), a.executable, program_digest(mlir, &opts))
    }
}

/// What identifies a compiled program on every host: the StableHLO text
/// and the serialised compile options (replicas, device assignment), both
/// built identically by every process of a job. The base of its launch ids.
pub(crate) fn program_digest(mlir: &str, compile_options: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"sharedmoe program\0");
    h.update((mlir.len() as u64).to_le_bytes());
    h.update(mlir.as_bytes());
    h.update((compile_options.len() as u64).to_le_bytes());
    h.update(compile_options);
    h.finalize().into()
}

// ---------------------------------------------------------------- key-value trampolines

/// Builds the PJRT_Error the plugin expects from a callback failure.
unsafe fn callback_error(cb: *mut ffi::PJRT_CallbackError, e: &Error) -> *mut ffi::PJRT_Error {
    let msg = e.to_string();
    let code = e.code.unwrap_or(ErrorCode::Unknown).to_raw();
    match cb.as_ref().and_then(|f| *f) {
        Some(f) => f(
            code as ffi::PJRT_Error_Code,
            msg.as_ptr() as *const c_char,
            msg.len(),
        ),
        None => ptr::null_mut(),
    }
}

unsafe extern "C" fn free_value(value: *mut c_char) {
    libc::free(value as *mut libc::c_void);
}

/// Copies `value` into `malloc`ed memory that the plugin hands back to
/// `free_value` (the header's contract: the plugin copies the value, then
/// calls the deleter we return). Null when out of memory.
unsafe fn malloc_copy(value: &[u8]) -> *mut c_char {
    let buf = libc::malloc(value.len().max(1)) as *mut c_char;
    if !buf.is_null() {
        ptr::copy_nonoverlapping(value.as_ptr() as *const c_char, buf, value.len());
    }
    buf
}

unsafe extern "C" fn kv_get_trampoline(
    args: *mut ffi::PJRT_KeyValueGetCallback_Args,
) -> *mut ffi::PJRT_Error {
    let a = &mut *args;
    let store = &*(a.user_arg as *const Arc<dyn KeyValueStore>);
    let key = plugin_str(a.key, a.key_size);
    let timeout = Duration::from_millis(a.timeout_in_ms.max(0) as u64);
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| store.get(&key, timeout))) {
        Ok(Ok(value)) => {
            let buf = malloc_copy(&value);
            if buf.is_null() {
                return callback_error(a.callback_error, &Error::new("kv get", "out of memory"));
            }
            a.value = buf;
            a.value_size = value.len();
            a.value_deleter_callback = Some(free_value);
            ptr::null_mut()
        }
        Ok(Err(e)) => callback_error(a.callback_error, &e),
        Err(_) => callback_error(
            a.callback_error,
            &Error::new("kv get", format!("store panicked on key {key}")),
        ),
    }
}

unsafe extern "C" fn kv_try_get_trampoline(
    args: *mut ffi::PJRT_KeyValueTryGetCallback_Args,
) -> *mut ffi::PJRT_Error {
    let a = &mut *args;
    let store = &*(a.user_arg as *const Arc<dyn KeyValueStore>);
    let key = plugin_str(a.key, a.key_size);
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| store.try_get(&key))) {
        Ok(Ok(Some(value))) => {
            let buf = malloc_copy(&value);
            if buf.is_null() {
                return callback_error(
                    a.callback_error,
                    &Error::new("kv try_get", "out of memory"),
                );
            }
            a.value = buf;
            a.value_size = value.len();
            a.value_deleter_callback = Some(free_value);
            ptr::null_mut()
        }
        Ok(Ok(None)) => callback_error(
            a.callback_error,
            &Error {
                code: Some(ErrorCode::NotFound),
                message: format!("key {key} not found"),
                context: "kv try_get".into(),
            },
        ),
        Ok(Err(e)) => callback_error(a.callback_error, &e),
        Err(_) => callback_error(
            a.callback_error,
            &Error::new("kv try_get", format!("store panicked on key {key}")),
        ),
    }
}

unsafe extern "C" fn kv_put_trampoline(
    args: *mut ffi::PJRT_KeyValuePutCallback_Args,
) -> *mut ffi::PJRT_Error {
    let a = &mut *args;
    let store = &*(a.user_arg as *const Arc<dyn KeyValueStore>);
    let key = plugin_str(a.key, a.key_size);
    let value: &[u8] = if a.value.is_null() {
        &[]
    } else {
        std::slice::from_raw_parts(a.value as *const u8, a.value_size)
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| store.put(&key, value))) {
        Ok(Ok(())) => ptr::null_mut(),
        Ok(Err(e)) => callback_error(a.callback_error, &e),
        Err(_) => callback_error(
            a.callback_error,
            &Error::new("kv put", format!("store panicked on key {key}")),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Store(Mutex<HashMap<String, Vec<u8>>>);

    impl KeyValueStore for Store {
        fn put(&self, key: &str, value: &[u8]) -> Result<()> {
            self.0.lock().unwrap().insert(key.into(), value.into());
            Ok(())
        }
        fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
            self.0
                .lock()
                .unwrap()
                .get(key)
                .cloned()
                .ok_or_else(|| Error {
                    code: Some(ErrorCode::DeadlineExceeded),
                    message: format!("{key} not set within {timeout:?}"),
                    context: "test store".into(),
                })
        }
    }

    static LAST_ERROR: Mutex<Option<(i32, String)>> = Mutex::new(None);

    unsafe extern "C" fn record_error(
        code: ffi::PJRT_Error_Code,
        msg: *const c_char,
        len: usize,
    ) -> *mut ffi::PJRT_Error {
        *LAST_ERROR.lock().unwrap() = Some((code as i32, plugin_str(msg, len)));
        8 as *mut ffi::PJRT_Error // any non-null marker; never dereferenced
    }

    #[test]
    fn key_value_trampolines_round_trip_and_report_errors() {
        let store: Box<Arc<dyn KeyValueStore>> = Box::new(Arc::new(Store::default()));
        let user = &*store as *const Arc<dyn KeyValueStore> as *mut std::ffi::c_void;
        let mut cb: ffi::PJRT_CallbackError = Some(record_error);
        let (key, value) = ("node/0", b"topology bytes");
        let mut put = args!(PJRT_KeyValuePutCallback_Args {
            key: key.as_ptr() as *const c_char,
            key_size: key.len(),
            value: value.as_ptr() as *const c_char,
            value_size: value.len(),
            callback_error: &mut cb,
            user_arg: user,
        });
        assert!(unsafe { kv_put_trampoline(&mut put) }.is_null());
        let mut get = args!(PJRT_KeyValueGetCallback_Args {
            key: key.as_ptr() as *const c_char,
            key_size: key.len(),
            timeout_in_ms: 100,
            callback_error: &mut cb,
            user_arg: user,
        });
        assert!(unsafe { kv_get_trampoline(&mut get) }.is_null());
        let got =
            unsafe { std::slice::from_raw_parts(get.value as *const u8, get.value_size) }.to_vec();
        assert_eq!(got, value);
        unsafe { get.value_deleter_callback.unwrap()(get.value) };
        let missing = "node/1";
        let mut get = args!(PJRT_KeyValueGetCallback_Args {
            key: missing.as_ptr() as *const c_char,
            key_size: missing.len(),
            timeout_in_ms: 5,
            callback_error: &mut cb,
            user_arg: user,
        });
        assert!(!unsafe { kv_get_trampoline(&mut get) }.is_null());
        let (code, msg) = LAST_ERROR.lock().unwrap().take().unwrap();
        assert_eq!(code, ErrorCode::DeadlineExceeded.to_raw());
        assert!(msg.contains("node/1 not set within 5ms"), "{msg}");
        // try_get: present -> value, absent -> NotFound right away.
        let mut try_get = args!(PJRT_KeyValueTryGetCallback_Args {
            key: key.as_ptr() as *const c_char,
            key_size: key.len(),
            callback_error: &mut cb,
            user_arg: user,
        });
        assert!(unsafe { kv_try_get_trampoline(&mut try_get) }.is_null());
        let got =
            unsafe { std::slice::from_raw_parts(try_get.value as *const u8, try_get.value_size) }
                .to_vec();
        assert_eq!(got, value);
        unsafe { try_get.value_deleter_callback.unwrap()(try_get.value) };
        let mut try_get = args!(PJRT_KeyValueTryGetCallback_Args {
            key: missing.as_ptr() as *const c_char,
            key_size: missing.len(),
            callback_error: &mut cb,
            user_arg: user,
        });
        assert!(!unsafe { kv_try_get_trampoline(&mut try_get) }.is_null());
        let (code, msg) = LAST_ERROR.lock().unwrap().take().unwrap();
        assert_eq!(code, ErrorCode::NotFound.to_raw());
        assert!(msg.contains("node/1"), "{msg}");
    }
}
