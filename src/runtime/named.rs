//! Plugin options as the PJRT C API takes them (`PJRT_NamedValue`): the
//! same kind of list creates a client and a topology.

use std::ffi::c_char;

use super::ffi;
use super::plugin::args;

/// A value of a named plugin option.
#[derive(Clone, Debug, PartialEq)]
pub enum NamedValue {
    Int(i64),
    Ints(Vec<i64>),
    Bool(bool),
    Float(f32),
    Str(String),
}

/// `PJRT_NamedValue`s pointing into `options`, which must outlive them.
pub(crate) fn named_values(options: &[(&str, NamedValue)]) -> Vec<ffi::PJRT_NamedValue> {
    options
        .iter()
        .map(|(name, value)| {
            let mut nv = args!(PJRT_NamedValue {
                name: name.as_ptr() as *const c_char,
                name_size: name.len()
            });
            match value {
                NamedValue::Int(i) => {
                    nv.type_ = ffi::PJRT_NamedValue_kInt64;
                    nv.__bindgen_anon_1.int64_value = *i;
                    nv.value_size = 1;
                }
                NamedValue::Ints(v) => {
                    nv.type_ = ffi::PJRT_NamedValue_kInt64List;
                    nv.__bindgen_anon_1.int64_array_value = v.as_ptr();
                    nv.value_size = v.len();
                }
                NamedValue::Bool(b) => {
                    nv.type_ = ffi::PJRT_NamedValue_kBool;
                    nv.__bindgen_anon_1.bool_value = *b;
                    nv.value_size = 1;
                }
                NamedValue::Float(f) => {
                    nv.type_ = ffi::PJRT_NamedValue_kFloat;
                    nv.__bindgen_anon_1.float_value = *f;
                    nv.value_size = 1;
                }
                NamedValue::Str(s) => {
                    nv.type_ = ffi::PJRT_NamedValue_kString;
                    nv.__bindgen_anon_1.string_value = s.as_ptr() as *const c_char;
                    nv.value_size = s.len();
                }
            }
            nv
        })
        .collect()
}
