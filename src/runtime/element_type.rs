//! Element types of device buffers and the host types that map onto them.

use super::ffi;

/// PJRT buffer element types we transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ElementType {
    Pred,
    S8,
    S16,
    S32,
    S64,
    U8,
    U16,
    U32,
    U64,
    F16,
    F32,
    F64,
    BF16,
}

impl ElementType {
    pub fn size_in_bytes(self) -> usize {
        use ElementType::*;
        match self {
            Pred | S8 | U8 => 1,
            S16 | U16 | F16 | BF16 => 2,
            S32 | U32 | F32 => 4,
            S64 | U64 | F64 => 8,
        }
    }

    pub(crate) fn to_raw(self) -> ffi::PJRT_Buffer_Type {
        use ElementType::*;
        match self {
            Pred => ffi::PJRT_Buffer_Type_PRED,
            S8 => ffi::PJRT_Buffer_Type_S8,
            S16 => ffi::PJRT_Buffer_Type_S16,
            S32 => ffi::PJRT_Buffer_Type_S32,
            S64 => ffi::PJRT_Buffer_Type_S64,
            U8 => ffi::PJRT_Buffer_Type_U8,
            U16 => ffi::PJRT_Buffer_Type_U16,
            U32 => ffi::PJRT_Buffer_Type_U32,
            U64 => ffi::PJRT_Buffer_Type_U64,
            F16 => ffi::PJRT_Buffer_Type_F16,
            F32 => ffi::PJRT_Buffer_Type_F32,
            F64 => ffi::PJRT_Buffer_Type_F64,
            BF16 => ffi::PJRT_Buffer_Type_BF16,
        }
    }

    pub(crate) fn from_raw(t: ffi::PJRT_Buffer_Type) -> Option<ElementType> {
        use ElementType::*;
        [
            Pred, S8, S16, S32, S64, U8, U16, U32, U64, F16, F32, F64, BF16,
        ]
        .into_iter()
        .find(|e| e.to_raw() == t)
    }
}

/// A host element type with a fixed device representation.
pub trait NativeType: Copy + 'static {
    const TYPE: ElementType;
}

macro_rules! native {
    ($($t:ty => $e:ident),*) => { $(impl NativeType for $t { const TYPE: ElementType = ElementType::$e; })* };
}

native!(f32 => F32, f64 => F64, half::bf16 => BF16, half::f16 => F16, i8 => S8, i16 => S16, i32 => S32,
        i64 => S64, u8 => U8, u16 => U16, u32 => U32, u64 => U64, bool => Pred);
