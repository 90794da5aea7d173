//! How tensors lie on a device mesh, for XLA's SPMD partitioner.
//!
//! A [`Mesh`] names the axes of a logical grid of devices (partition ids
//! in row-major order over the axes, as JAX's `Mesh`); a [`Sharding`]
//! says, for each dimension of one tensor, which mesh axes split it
//! (JAX's `PartitionSpec`). Axes that split no dimension replicate the
//! tensor. The program is written on full (global) shapes; the shardings
//! on its arguments and results, and the few constraints in its body,
//! tell the partitioner where the data lies, and XLA inserts the
//! all-gathers, reduce-scatters and all-reduces.
//!
//! Shardings are emitted as GSPMD `mhlo.sharding` strings with explicit
//! device lists, e.g. `{devices=[1,4,2]0,2,4,6,1,3,5,7
//! last_tile_dim_replicate}`: both the shipped CPU plugin and Shardy's
//! importer read them (tests/spmd.rs checks both dialects on the CPU
//! plugin; Shardy's `sdy.sharding` needs `use_shardy_partitioner`).

use super::error::{usage, Result};

/// A logical device grid: named axes and their sizes. Device (partition)
/// `p` sits at the row-major coordinates of `p` over the axes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mesh {
    axes: Vec<(String, usize)>,
}

impl Mesh {
    pub fn new(axes: &[(&str, usize)]) -> Result<Mesh> {
        if axes.is_empty() {
            return usage("a mesh needs at least one axis");
        }
        for (i, (name, size)) in axes.iter().enumerate() {
            if *size == 0 {
                return usage(format!("mesh axis `{name}` has size 0"));
            }
            if axes[..i].iter().any(|(n, _)| n == name) {
                return usage(format!("mesh axis `{name}` named twice"));
            }
        }
        Ok(Mesh {
            axes: axes.iter().map(|(n, s)| (n.to_string(), *s)).collect(),
        })
    }

    /// One axis of `n` devices.
    pub fn line(name: &str, n: usize) -> Result<Mesh> {
        Mesh::new(&[(name, n)])
    }

    /// Devices in the mesh.
    pub fn devices(&self) -> usize {
        self.axes.iter().map(|(_, s)| s).product()
    }

    pub fn axis_names(&self) -> impl Iterator<Item = &str> {
        self.axes.iter().map(|(n, _)| n.as_str())
    }

    /// The size of axis `name`.
    pub fn size(&self, name: &str) -> Result<usize> {
        Ok(self.axes[self.axis(name)?].1)
    }

    fn axis(&self, name: &str) -> Result<usize> {
        match self.axes.iter().position(|(n, _)| n == name) {
            Some(i) => Ok(i),
            None => usage(format!(
                "no mesh axis `{name}` (the mesh has {:?})",
                self.axis_names().collect::<Vec<_>>()
            )),
        }
    }

    /// Device `p`'s coordinate along each axis.
    fn coords(&self, p: usize) -> Vec<usize> {
        let mut c = vec![0; self.axes.len()];
        let mut rest = p;
        for (i, (_, size)) in self.axes.iter().enumerate().rev() {
            c[i] = rest % size;
            rest /= size;
        }
        c
    }

    /// The row-major index of `coords` over `axes` (major to minor).
    fn index_over(&self, coords: &[usize], axes: &[usize]) -> usize {
        axes.iter()
            .fold(0, |acc, &a| acc * self.axes[a].1 + coords[a])
    }
}

/// How one tensor of rank `spec.len()` lies on `mesh`: dimension d is
/// split over the axes `spec[d]` (major to minor), in equal contiguous
/// blocks; the other axes hold copies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sharding {
    mesh: Mesh,
    /// Per dimension, the mesh axes (indices) splitting it.
    spec: Vec<Vec<usize>>,
}

impl Sharding {
    /// A full copy of a rank-`rank` tensor on every device.
    pub fn replicated(mesh: &Mesh, rank: usize) -> Sharding {
        Sharding {
            mesh: mesh.clone(),
            spec: vec![vec![]; rank],
        }
    }

    /// A rank-`rank` tensor split along `dim` over `axes` (major to
    /// minor), replicated over the mesh's other axes.
    pub fn split(mesh: &Mesh, rank: usize, dim: usize, axes: &[&str]) -> Result<Sharding> {
        if dim >= rank {
            return usage(format!(
                "cannot split dimension {dim} of a rank-{rank} tensor"
            ));
        }
        let mut s = Sharding::replicated(mesh, rank);
        for name in axes {
            let a = mesh.axis(name)?;
            if s.spec[dim].contains(&a) {
                return usage(format!("mesh axis `{name}` listed twice"));
            }
            s.spec[dim].push(a);
        }
        Ok(s)
    }

    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }

    pub fn rank(&self) -> usize {
        self.spec.len()
    }

    /// Into how many blocks each dimension is split.
    pub fn tiles(&self) -> Vec<usize> {
        self.spec
            .iter()
            .map(|axes| axes.iter().map(|&a| self.mesh.axes[a].1).product())
            .collect()
    }

    /// True when every device holds the whole tensor.
    pub fn is_replicated(&self) -> bool {
        self.spec.iter().all(Vec::is_empty)
    }

    /// The block one device holds of a tensor of `dims`; errors when a
    /// split dimension is not divisible by its block count.
    pub fn shard_dims(&self, dims: &[i64]) -> Result<Vec<i64>> {
        if dims.len() != self.rank() {
            return usage(format!(
                "a rank-{} sharding for a tensor of dims {dims:?}",
                self.rank()
            ));
        }
        dims.iter()
            .zip(self.tiles())
            .enumerate()
            .map(|(d, (&n, t))| {
                if n % t as i64 != 0 {
                    return usage(format!(
                        "dimension {d} ({n}) of {dims:?} does not split into {t} equal blocks"
                    ));
                }
                Ok(n / t as i64)
            })
            .collect()
    }

    /// Where device `p`'s block starts in each dimension, for a tensor of
    /// `dims`.
    pub fn shard_offsets(&self, dims: &[i64], p: usize) -> Result<Vec<i64>> {
        let block = self.shard_dims(dims)?;
        let coords = self.mesh.coords(p);
        Ok(self
            .spec
            .iter()
            .zip(&block)
            .map(|(axes, &b)| self.mesh.index_over(&coords, axes) as i64 * b)
            .collect())
    }

    /// The mesh axes that split no dimension: devices along them hold
    /// copies of the same block.
    fn copy_axes(&self) -> Vec<usize> {
        let used: Vec<usize> = self.spec.iter().flatten().copied().collect();
        (0..self.mesh.axes.len())
            .filter(|a| !used.contains(a))
            .collect()
    }

    /// Which copy of its block device `p` holds: 0 for the first device
    /// in mesh order that holds the block.
    pub fn copy_index(&self, p: usize) -> usize {
        self.mesh
            .index_over(&self.mesh.coords(p), &self.copy_axes())
    }

    /// The GSPMD `mhlo.sharding` string.
    pub fn to_hlo(&self) -> String {
        if self.is_replicated() {
            return "{replicated}".into();
        }
        let rest = self.copy_axes();
        let copies: usize = rest.iter().map(|&a| self.mesh.axes[a].1).product();
        let mut shape = self.tiles();
        if copies > 1 {
            shape.push(copies);
        }
        // The tile assignment: device ids in row-major order over
        // (block index per dimension, copy index).
        let mut ids = vec![0usize; self.mesh.devices()];
        for p in 0..self.mesh.devices() {
            let coords = self.mesh.coords(p);
            let mut at = 0;
            for (axes, &t) in self.spec.iter().zip(&self.tiles()) {
                at = at * t + self.mesh.index_over(&coords, axes);
            }
            if copies > 1 {
                at = at * copies + self.mesh.index_over(&coords, &rest);
            }
            ids[at] = p;
        }
        let mut s = String::from("{devices=[");
        let shape: Vec<String> = shape.iter().map(usize::to_string).collect();
        s.push_str(&shape.join(","));
        s.push(']');
        let ids: Vec<String> = ids.iter().map(usize::to_string).collect();
        s.push_str(&ids.join(","));
        if copies > 1 {
            s.push_str(" last_tile_dim_replicate");
        }
        s.push('}');
        s
    }

    /// The attribute as it goes on an argument, result or constraint.
    pub(crate) fn attribute(&self) -> String {
        format!("mhlo.sharding = \"{}\"", self.to_hlo())
    }
}

/// Copies device `p`'s block of `full` (row-major, `dims`) under
/// `sharding`.
pub fn shard_of<T: Copy>(
    sharding: &Sharding,
    dims: &[i64],
    full: &[T],
    p: usize,
) -> Result<Vec<T>> {
    let block = sharding.shard_dims(dims)?;
    copy_block(dims, &block, &sharding.shard_offsets(dims, p)?, full)
}

/// Writes device `p`'s block `part` into `full` (row-major, `dims`).
pub fn place_shard<T: Copy>(
    sharding: &Sharding,
    dims: &[i64],
    part: &[T],
    p: usize,
    full: &mut [T],
) -> Result<()> {
    let block = sharding.shard_dims(dims)?;
    place_block(dims, &block, &sharding.shard_offsets(dims, p)?, part, full)
}

/// Copies the box of `block` dims at offsets `at` out of `full`
/// (row-major, `dims`), in the box's row-major order.
pub fn copy_block<T: Copy>(dims: &[i64], block: &[i64], at: &[i64], full: &[T]) -> Result<Vec<T>> {
    check_box(dims, block, at)?;
    check_len(dims, full.len())?;
    let mut out = Vec::with_capacity(block.iter().product::<i64>() as usize);
    for_each_row(dims, block, at, |start, len| {
        out.extend_from_slice(&full[start..start + len])
    });
    Ok(out)
}

/// Writes `part` (the box of `block` dims, row-major) into `full` at
/// offsets `at`.
pub fn place_block<T: Copy>(
    dims: &[i64],
    block: &[i64],
    at: &[i64],
    part: &[T],
    full: &mut [T],
) -> Result<()> {
    check_box(dims, block, at)?;
    check_len(dims, full.len())?;
    check_len(block, part.len())?;
    let mut next = 0;
    for_each_row(dims, block, at, |start, len| {
        full[start..start + len].copy_from_slice(&part[next..next + len]);
        next += len;
    });
    Ok(())
}

/// The box lies inside the tensor.
fn check_box(dims: &[i64], block: &[i64], at: &[i64]) -> Result<()> {
    let inside = dims.len() == block.len()
        && dims.len() == at.len()
        && (0..dims.len()).all(|d| at[d] >= 0 && block[d] >= 0 && at[d] + block[d] <= dims[d]);
    if !inside {
        return usage(format!(
            "a block of dims {block:?} at {at:?} does not lie inside a tensor of dims {dims:?}"
        ));
    }
    Ok(())
}

fn check_len(dims: &[i64], len: usize) -> Result<()> {
    let want: i64 = dims.iter().product();
    if want as usize != len {
        return usage(format!("{len} values for a tensor of dims {dims:?}"));
    }
    Ok(())
}

/// Calls `row(start, len)` for each contiguous run of the block of `block`
/// dims at `at` inside a row-major tensor of `dims`, in the block's
/// row-major order.
fn for_each_row(dims: &[i64], block: &[i64], at: &[i64], mut row: impl FnMut(usize, usize)) {
    let rank = dims.len();
    if rank == 0 {
        row(0, 1);
        return;
    }
    let strides: Vec<i64> = (0..rank).map(|d| dims[d + 1..].iter().product()).collect();
    let outer: Vec<i64> = block[..rank - 1].to_vec();
    let count: i64 = outer.iter().product();
    let mut idx = vec![0i64; rank - 1];
    for _ in 0..count {
        let mut start = at[rank - 1];
        for d in 0..rank - 1 {
            start += (at[d] + idx[d]) * strides[d];
        }
        row(start as usize, block[rank - 1] as usize);
        for d in (0..rank - 1).rev() {
            idx[d] += 1;
            if idx[d] < outer[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh() -> Mesh {
        Mesh::new(&[("data", 2), ("fsdp", 4)]).unwrap()
    }

    #[test]
    fn gspmd_strings_follow_the_mesh_order() {
        let m = mesh();
        assert_eq!(Sharding::replicated(&m, 2).to_hlo(), "{replicated}");
        // Split over fsdp only: block f on devices (d, f) = 4d + f, copies
        // over data last.
        assert_eq!(
            Sharding::split(&m, 2, 0, &["fsdp"]).unwrap().to_hlo(),
            "{devices=[4,1,2]0,4,1,5,2,6,3,7 last_tile_dim_replicate}"
        );
        // Over data only.
        assert_eq!(
            Sharding::split(&m, 2, 1, &["data"]).unwrap().to_hlo(),
            "{devices=[1,2,4]0,1,2,3,4,5,6,7 last_tile_dim_replicate}"
        );
        // Over both (the batch): block 4d + f on device 4d + f.
        assert_eq!(
            Sharding::split(&m, 3, 1, &["data", "fsdp"])
                .unwrap()
                .to_hlo(),
            "{devices=[1,8,1]0,1,2,3,4,5,6,7}"
        );
    }

    #[test]
    fn blocks_cut_and_place_back() {
        let m = mesh();
        let dims = [3i64, 8, 2];
        let full: Vec<i32> = (0..48).collect();
        let s = Sharding::split(&m, 3, 1, &["fsdp"]).unwrap();
        assert_eq!(s.shard_dims(&dims).unwrap(), vec![3, 2, 2]);
        // Device 6 = (data 1, fsdp 2): columns 4..6 of every row.
        let part = shard_of(&s, &dims, &full, 6).unwrap();
        let want: Vec<i32> = (0..3)
            .flat_map(|i| (4..6).flat_map(move |j| (0..2).map(move |k| i * 16 + j * 2 + k)))
            .collect();
        assert_eq!(part, want);
        let mut back = vec![-1; 48];
        for p in [0, 1, 2, 3] {
            let part = shard_of(&s, &dims, &full, p).unwrap();
            place_shard(&s, &dims, &part, p, &mut back).unwrap();
        }
        assert_eq!(back, full);
        // Device 6 is the second copy (data 1) of block 2; device 2 the
        // first.
        assert_eq!((s.copy_index(6), s.copy_index(2)), (1, 0));
        assert!(Sharding::split(&m, 3, 0, &["fsdp"])
            .unwrap()
            .shard_dims(&dims)
            .is_err());
    }
}
