//! Device buffers: element type, dimensions, device-to-host copies, and
//! destruction exactly once.

use std::fmt;
use std::sync::Arc;

use super::client::{ClientInner, Device};
use super::element_type::{ElementType, NativeType};
use super::error::{Error, Result};
use super::ffi;
use super::plugin::{args, pjrt_call, Plugin};

/// Waits for a PJRT event and destroys it; null events are already done.
pub(crate) fn await_event(plugin: &Plugin, event: *mut ffi::PJRT_Event, ctx: &str) -> Result<()> {
    if event.is_null() {
        return Ok(());
    }
    let mut a = args!(PJRT_Event_Await_Args { event });
    let awaited = pjrt_call!(plugin, PJRT_Event_Await, &mut a, ctx);
    let mut d = args!(PJRT_Event_Destroy_Args { event });
    let destroyed = pjrt_call!(plugin, PJRT_Event_Destroy, &mut d, ctx);
    awaited.and(destroyed)
}

/// An owned `PJRT_Buffer*` on one device.
pub struct Buffer {
    raw: *mut ffi::PJRT_Buffer,
    client: Arc<ClientInner>,
}

// SAFETY: PJRT buffers may be used from any thread.
unsafe impl Send for Buffer {}
unsafe impl Sync for Buffer {}

impl Drop for Buffer {
    fn drop(&mut self) {
        let mut a = args!(PJRT_Buffer_Destroy_Args { buffer: self.raw });
        if let Err(e) = pjrt_call!(
            self.client.plugin,
            PJRT_Buffer_Destroy,
            &mut a,
            "destroying buffer"
        ) {
            tracing::warn!("{e}");
        }
    }
}

impl fmt::Debug for Buffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Buffer({:?}{:?})", self.element_type(), self.dims())
    }
}

impl Buffer {
    pub(crate) fn from_raw(client: Arc<ClientInner>, raw: *mut ffi::PJRT_Buffer) -> Buffer {
        Buffer { raw, client }
    }

    pub(crate) fn raw(&self) -> *mut ffi::PJRT_Buffer {
        self.raw
    }

    pub fn element_type(&self) -> ElementType {
        let mut a = args!(PJRT_Buffer_ElementType_Args { buffer: self.raw });
        match pjrt_call!(
            self.client.plugin,
            PJRT_Buffer_ElementType,
            &mut a,
            "buffer element type"
        ) {
            Ok(()) => ElementType::from_raw(a.type_).unwrap_or(ElementType::U8),
            Err(_) => ElementType::U8,
        }
    }

    pub fn dims(&self) -> Vec<i64> {
        let mut a = args!(PJRT_Buffer_Dimensions_Args { buffer: self.raw });
        match pjrt_call!(
            self.client.plugin,
            PJRT_Buffer_Dimensions,
            &mut a,
            "buffer dimensions"
        ) {
            // SAFETY: the plugin returns `num_dims` values owned by the buffer.
            Ok(()) if a.num_dims > 0 => {
                unsafe { std::slice::from_raw_parts(a.dims, a.num_dims) }.to_vec()
            }
            _ => vec![],
        }
    }

    /// Bytes the buffer takes on its device
    /// (`PJRT_Buffer_OnDeviceSizeInBytes`: padding and layout included).
    pub fn on_device_size(&self) -> Result<usize> {
        let mut a = args!(PJRT_Buffer_OnDeviceSizeInBytes_Args { buffer: self.raw });
        pjrt_call!(
            self.client.plugin,
            PJRT_Buffer_OnDeviceSizeInBytes,
            &mut a,
            "buffer on-device size"
        )?;
        Ok(a.on_device_size_in_bytes)
    }

    /// True once the buffer was donated to (consumed by) an execution.
    pub fn is_deleted(&self) -> bool {
        let mut a = args!(PJRT_Buffer_IsDeleted_Args { buffer: self.raw });
        pjrt_call!(
            self.client.plugin,
            PJRT_Buffer_IsDeleted,
            &mut a,
            "buffer is_deleted"
        )
        .map(|_| a.is_deleted)
        .unwrap_or(true)
    }

    /// Address of the buffer's device memory (for checking that donation
    /// reused an allocation; not for dereferencing).
    pub fn device_address(&self) -> Result<usize> {
        let mut a = args!(PJRT_Buffer_UnsafePointer_Args { buffer: self.raw });
        pjrt_call!(
            self.client.plugin,
            PJRT_Buffer_UnsafePointer,
            &mut a,
            "buffer address"
        )?;
        Ok(a.buffer_pointer)
    }

    pub fn device(&self) -> Result<Device> {
        let mut a = args!(PJRT_Buffer_Device_Args { buffer: self.raw });
        pjrt_call!(
            self.client.plugin,
            PJRT_Buffer_Device,
            &mut a,
            "buffer device"
        )?;
        Ok(super::Client {
            inner: self.client.clone(),
        }
        .device_from_raw(a.device))
    }

    /// Row-major little-endian bytes of the whole buffer.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let (ty, dims) = (self.element_type(), self.dims());
        let ctx = format!("copying {ty:?}{dims:?} to host");
        let n = dims.iter().product::<i64>() as usize * ty.size_in_bytes();
        let mut out = vec![0u8; n];
        if n == 0 {
            return Ok(out);
        }
        let mut a = args!(PJRT_Buffer_ToHostBuffer_Args {
            src: self.raw,
            dst: out.as_mut_ptr() as *mut std::ffi::c_void,
            dst_size: n,
        });
        pjrt_call!(self.client.plugin, PJRT_Buffer_ToHostBuffer, &mut a, &ctx)?;
        await_event(&self.client.plugin, a.event, &ctx)?;
        Ok(out)
    }

    /// The elements as `T`, which must be the buffer's element type.
    pub fn to_host<T: NativeType>(&self) -> Result<Vec<T>> {
        let ty = self.element_type();
        if ty != T::TYPE {
            return Err(Error::new(
                "copying buffer to host",
                format!("buffer holds {ty:?}, asked for {:?}", T::TYPE),
            ));
        }
        let bytes = self.to_bytes()?;
        let n = bytes.len() / std::mem::size_of::<T>();
        let mut out: Vec<T> = Vec::with_capacity(n);
        // SAFETY: `bytes` holds exactly n elements of T's representation;
        // copying into fresh storage avoids alignment assumptions.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), out.as_mut_ptr() as *mut u8, bytes.len());
            out.set_len(n);
        }
        Ok(out)
    }
}
