//! f32 vectors as protobuf `bytes` (little-endian): a memcpy on the usual
//! little-endian hosts instead of protobuf's per-element packed floats.

/// `values` as little-endian bytes.
pub fn to_bytes(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Appends the f32s in `bytes`; `None` when its length is not a multiple
/// of 4.
pub fn extend_from_bytes(out: &mut Vec<f32>, bytes: &[u8]) -> Option<()> {
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
    #[test]
    fn round_trip_and_ragged_bytes() {
        let v = [1.5f32, -0.0, f32::MAX, 3e-40];
        let mut back = vec![];
        super::extend_from_bytes(&mut back, &super::to_bytes(&v)).unwrap();
        assert_eq!(
            back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert!(super::extend_from_bytes(&mut back, &[0, 0, 0]).is_none());
    }
}
