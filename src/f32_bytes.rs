//! f32 values as little-endian bytes, the layout of safetensors files and
//! of the protobuf `bytes` fields that carry gradients: a view of the
//! memory (no copy) on the little-endian hosts we run on, checked at
//! compile time.

#[cfg(not(target_endian = "little"))]
compile_error!(
    "sharedmoe reads f32 memory as little-endian bytes (safetensors, gRPC); big-endian hosts are not supported"
);

/// `values` as little-endian bytes, without copying.
pub fn as_le_bytes(values: &[f32]) -> &[u8] {
    bytemuck::cast_slice(values)
}

/// Appends the f32s in little-endian `bytes`; `None` when its length is
/// not a multiple of 4.
pub fn extend_from_le_bytes(out: &mut Vec<f32>, bytes: &[u8]) -> Option<()> {
    if bytes.len() % 4 != 0 {
        return None;
    }
    out.extend(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
    );
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_ragged_bytes() {
        let v = [1.5f32, -0.0, f32::MAX, 3e-40];
        // The view equals the portable encoding.
        let portable: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(as_le_bytes(&v), &portable[..]);
        let mut back = vec![];
        extend_from_le_bytes(&mut back, as_le_bytes(&v)).unwrap();
        assert_eq!(
            back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert!(extend_from_le_bytes(&mut back, &[0, 0, 0]).is_none());
    }
}
