//! Compiled programs and their execution on one or many devices, with
//! input donation.

use std::fmt;

use super::buffer::{await_event, Buffer};
use super::client::{Client, Device};
use super::error::{Error, Result};
use super::ffi;
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
    ) -> Result<Executable> {
        let p = client.inner.plugin.clone();
        // Owns `raw` from here on, so an error below still frees it.
        let mut exe = Executable {
            raw,
            client,
            num_outputs: 0,
            devices: vec![],
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

    pub fn num_outputs(&self) -> usize {
        self.num_outputs
    }

    /// Number of devices (replicas) one execution runs on.
    pub fn num_replicas(&self) -> usize {
        self.devices.len()
    }

    pub fn devices(&self) -> &[Device] {
        &self.devices
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
        let mut options = args!(PJRT_ExecuteOptions {
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
}
