//! Compiled programs and their execution on one or many devices, with
//! input donation and launch ids.
//!
//! Every execution carries a non-zero launch id (`PJRT_ExecuteOptions.
//! launch_id`) that is the same on every host of a multi-host job for the
//! same execution: the runtime (libtpu with `--xla_tpu_use_enhanced_launch_
//! barrier`, XLA's GPU and CPU collectives as their run id) uses it to
//! match the hosts' launches of one program and to detect hosts that launch
//! programs in different orders. As jaxlib's `py_executable.cc` does, it is
//! derived from the program (its StableHLO text and compile options, and
//! the plugin's executable fingerprint where it gives one) plus a counter of
//! the executable's executions; every host compiles the same programs and
//! runs them in the same order, so every host computes the same ids.

use std::fmt;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

use super::buffer::{await_event, Buffer};
use super::client::{Client, Device};
use super::error::{Error, Result};
use super::ffi;
use super::memory_stats::MemoryStats;
use super::plugin::{args, pjrt_call};

/// An argument of one execution: borrowed (stays valid) or donated (the
/// program may reuse its memory for an output; the buffer is consumed).
pub enum Arg<'a> {
    Borrowed(&'a Buffer),
    Donated(Buffer),
}

impl Arg<'_> {
    fn buffer(&self) -> &Buffer {
        match self {
            Arg::Borrowed(b) => b,
            Arg::Donated(b) => b,
        }
    }
}

/// An owned `PJRT_LoadedExecutable*`.
pub struct Executable {
    raw: *mut ffi::PJRT_LoadedExecutable,
    client: Client,
    num_outputs: usize,
    devices: Vec<Device>,
    /// Hash of the program (see the module's comment).
    launch_key: u64,
    /// The next execution's launch id (as u32; 0 is skipped).
    next_launch: AtomicU32,
    /// The last execution's launch id (0: none yet).
    last_launch: AtomicI32,
    /// What XLA's buffer assignment says the program needs, where the
    /// plugin reports it (boxed: it is read rarely and would double the
    /// size of every executable handle).
    memory: Option<Box<MemoryStats>>,
}

/// The launch-id key of a program: the first 8 bytes of a hash of its
/// digest (text and compile options) and the plugin's fingerprint of the
/// compiled executable, if any.
pub(crate) fn launch_key(program_digest: &[u8; 32], fingerprint: Option<&[u8]>) -> u64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"sharedmoe launch id\0");
    h.update(program_digest);
    if let Some(f) = fingerprint {
        h.update((f.len() as u64).to_le_bytes());
        h.update(f);
    }
    let d = h.finalize();
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

/// The first `n` launch ids of an executable with `key`: jaxlib's scheme
/// (a 32-bit counter starting at the key's low 32 bits, read as a signed
/// int), except that 0 (no launch id) is skipped.
pub fn launch_id_sequence(key: u64, n: usize) -> Vec<i32> {
    let counter = AtomicU32::new(key as u32);
    (0..n).map(|_| take_launch_id(&counter)).collect()
}

fn take_launch_id(counter: &AtomicU32) -> i32 {
    loop {
        let id = counter.fetch_add(1, Ordering::Relaxed);
        if id != 0 {
            return id as i32;
        }
    }
}

// SAFETY: loaded executables may be executed from any thread.
unsafe impl Send for Executable {}
unsafe impl Sync for Executable {}

impl Drop for Executable {
    fn drop(&mut self) {
        let mut a = args!(PJRT_LoadedExecutable_Destroy_Args {
            executable: self.raw
        });
        if let Err(e) = pjrt_call!(
            self.client.inner.plugin,
            PJRT_LoadedExecutable_Destroy,
            &mut a,
            "destroying executable"
        ) {
            tracing::warn!("{e}");
        }
    }
}

impl fmt::Debug for Executable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Executable({} outputs on {} devices)",
            self.num_outputs,
            self.devices.len()
        )
    }
}

impl Executable {
    pub(crate) fn from_raw(
        client: Client,
        raw: *mut ffi::PJRT_LoadedExecutable,
        program_digest: [u8; 32],
    ) -> Result<Executable> {
        let p = client.inner.plugin.clone();
        // Owns `raw` from here on, so an error below still frees it.
        let mut exe = Executable {
            raw,
            client,
            num_outputs: 0,
            devices: vec![],
            launch_key: 0,
            next_launch: AtomicU32::new(0),
            last_launch: AtomicI32::new(0),
            memory: None,
        };
        let mut get = args!(PJRT_LoadedExecutable_GetExecutable_Args {
            loaded_executable: raw
        });
        pjrt_call!(
            p,
            PJRT_LoadedExecutable_GetExecutable,
            &mut get,
            "reading executable"
        )?;
        let mut n = args!(PJRT_Executable_NumOutputs_Args {
            executable: get.executable
        });
        let counted = pjrt_call!(p, PJRT_Executable_NumOutputs, &mut n, "counting outputs");
        // Optional in PJRT ("may not be implemented by all platforms").
        let mut f = args!(PJRT_Executable_Fingerprint_Args {
            executable: get.executable
        });
        let fingerprint = match pjrt_call!(p, PJRT_Executable_Fingerprint, &mut f, "fingerprint") {
            Ok(()) if !f.executable_fingerprint.is_null() && f.executable_fingerprint_size > 0 => {
                // SAFETY: valid for the life of the executable view, read
                // before it is destroyed below.
                Some(
                    unsafe {
                        std::slice::from_raw_parts(
                            f.executable_fingerprint as *const u8,
                            f.executable_fingerprint_size,
                        )
                    }
                    .to_vec(),
                )
            }
            _ => None,
        };
        exe.launch_key = launch_key(&program_digest, fingerprint.as_deref());
        // Optional too; read while the executable view exists.
        exe.memory = MemoryStats::of(&p, get.executable).ok().map(Box::new);
        exe.next_launch = AtomicU32::new(exe.launch_key as u32);
        let mut d = args!(PJRT_Executable_Destroy_Args {
            executable: get.executable
        });
        pjrt_call!(
            p,
            PJRT_Executable_Destroy,
            &mut d,
            "releasing executable view"
        )?;
        counted?;
        exe.num_outputs = n.num_outputs;
        let mut devs = args!(PJRT_LoadedExecutable_AddressableDevices_Args { executable: raw });
        pjrt_call!(
            p,
            PJRT_LoadedExecutable_AddressableDevices,
            &mut devs,
            "executable devices"
        )?;
        // SAFETY: the plugin returns `num` device pointers owned by the client.
        let raws = unsafe {
            std::slice::from_raw_parts(devs.addressable_devices, devs.num_addressable_devices)
        };
        exe.devices = raws
            .iter()
            .map(|&d| exe.client.device_from_raw(d))
            .collect();
        Ok(exe)
    }

    /// Per device: the memory XLA's buffer assignment gives the program
    /// (arguments, outputs, temporaries, code), where the plugin reports it.
    pub fn memory_stats(&self) -> Option<MemoryStats> {
        self.memory.as_deref().copied()
    }

    pub fn num_outputs(&self) -> usize {
        self.num_outputs
    }

    /// Number of devices (replicas) one execution runs on.
    pub fn num_replicas(&self) -> usize {
        self.devices.len()
    }

    /// The devices this process runs the program on, in the order of the
    /// argument lists (`PJRT_LoadedExecutable_AddressableDevices`): the
    /// buffers of list i must be uploaded to `devices()[i]`.
    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// The key of this program's launch ids (the same on every host).
    pub fn launch_key(&self) -> u64 {
        self.launch_key
    }

    /// The launch id of the last execution (`None` before the first).
    pub fn last_launch_id(&self) -> Option<i32> {
        match self.last_launch.load(Ordering::Relaxed) {
            0 => None,
            id => Some(id),
        }
    }

    /// Runs with borrowed arguments, one list per device.
    pub fn execute(&self, args: &[&[&Buffer]]) -> Result<Vec<Vec<Buffer>>> {
        self.execute_args(
            args.iter()
                .map(|list| list.iter().map(|b| Arg::Borrowed(b)).collect())
                .collect(),
        )
    }

    /// Runs with one argument list per device; donated arguments are
    /// consumed. Borrowed arguments are marked non-donatable, so a buffer
    /// the caller still holds is never invalidated, whatever the program
    /// declares. Waits until the outputs are ready.
    pub fn execute_args(&self, args: Vec<Vec<Arg<'_>>>) -> Result<Vec<Vec<Buffer>>> {
        let ctx = "executing program";
        let num_devices = self.devices.len();
        if args.len() != num_devices {
            return Err(Error::new(
                ctx,
                format!(
                    "{} argument lists for a program on {num_devices} devices",
                    args.len()
                ),
            ));
        }
        let num_args = args.first().map_or(0, Vec::len);
        if let Some((i, l)) = args.iter().enumerate().find(|(_, l)| l.len() != num_args) {
            return Err(Error::new(
                ctx,
                format!(
                    "device {i} has {} arguments, device 0 has {num_args}",
                    l.len()
                ),
            ));
        }
        // The non-donatable set is per execution, not per device: an
        // argument donated on one device must be donated on all.
        let mut keep: Vec<i64> = vec![];
        for i in 0..num_args {
            let donated: Vec<bool> = args
                .iter()
                .map(|l| matches!(l[i], Arg::Donated(_)))
                .collect();
            if donated.iter().any(|&d| d != donated[0]) {
                return Err(Error::new(
                    ctx,
                    format!("argument {i} is donated on some devices but not all"),
                ));
            }
            if !donated[0] {
                keep.push(i as i64);
            }
        }
        self.check_placement(&args)?;
        let arg_ptrs: Vec<Vec<*mut ffi::PJRT_Buffer>> = args
            .iter()
            .map(|l| l.iter().map(|a| a.buffer().raw()).collect())
            .collect();
        let arg_lists: Vec<*const *mut ffi::PJRT_Buffer> =
            arg_ptrs.iter().map(|l| l.as_ptr()).collect();
        let mut out_ptrs: Vec<Vec<*mut ffi::PJRT_Buffer>> = (0..num_devices)
            .map(|_| vec![std::ptr::null_mut(); self.num_outputs])
            .collect();
        let out_lists: Vec<*mut *mut ffi::PJRT_Buffer> =
            out_ptrs.iter_mut().map(|l| l.as_mut_ptr()).collect();
        let mut events: Vec<*mut ffi::PJRT_Event> = vec![std::ptr::null_mut(); num_devices];
        let launch_id = take_launch_id(&self.next_launch);
        self.last_launch.store(launch_id, Ordering::Relaxed);
        let mut options = args!(PJRT_ExecuteOptions {
            launch_id,
            non_donatable_input_indices: keep.as_ptr(),
            num_non_donatable_input_indices: keep.len(),
        });
        let mut a = args!(PJRT_LoadedExecutable_Execute_Args {
            executable: self.raw,
            options: &mut options,
            argument_lists: arg_lists.as_ptr(),
            num_devices,
            num_args,
            output_lists: out_lists.as_ptr(),
            device_complete_events: events.as_mut_ptr(),
        });
        let p = &self.client.inner.plugin;
        let launched = pjrt_call!(p, PJRT_LoadedExecutable_Execute, &mut a, ctx);
        // Outputs are owned by us from here, even if a later step fails.
        let outputs: Vec<Vec<Buffer>> = out_ptrs
            .iter()
            .map(|l| {
                l.iter()
                    .filter(|b| !b.is_null())
                    .map(|&b| Buffer::from_raw(self.client.inner.clone(), b))
                    .collect()
            })
            .collect();
        let mut waited = Ok(());
        for e in events {
            let r = await_event(p, e, ctx);
            if waited.is_ok() {
                waited = r;
            }
        }
        drop(args); // donated buffers are released only after the run
        launched?;
        waited?;
        Ok(outputs)
    }

    /// Refuses arguments that are not on the device the executable runs
    /// their list on (its own addressable devices, not the client's: in a
    /// multi-host job the client's list has every local chip in the
    /// plugin's order, the executable's only its replicas' in replica
    /// order).
    fn check_placement(&self, args: &[Vec<Arg<'_>>]) -> Result<()> {
        let p = &self.client.inner.plugin;
        for (i, (list, want)) in args.iter().zip(&self.devices).enumerate() {
            for (j, arg) in list.iter().enumerate() {
                let mut a = args!(PJRT_Buffer_Device_Args {
                    buffer: arg.buffer().raw()
                });
                pjrt_call!(p, PJRT_Buffer_Device, &mut a, "argument device")?;
                if a.device != want.raw {
                    let on = self.client.device_from_raw(a.device);
                    return Err(Error::new(
                        "executing program",
                        format!(
                            "argument {j} of list {i} is on device {}, but the program runs list {i} on \
                             device {} (upload to the executable's devices(), in their order)",
                            on.id(),
                            want.id()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}
