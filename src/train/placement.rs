//! Which device is which device of the step program's mesh.
//!
//! A compiled SPMD program over N devices (1 replica x N partitions)
//! carries a device assignment: the global id of the device each
//! partition, i.e. each device of the mesh, runs on. On one host that is
//! the first N devices. In a multi-host job (a TPU pod, GPUs on several
//! nodes) the client sees every device of the job but can address only
//! its own host's; one worker per host drives all of its chips, so the
//! mesh is laid out host by host (data-major, so the data axis spans the
//! hosts first): process p runs the contiguous block of mesh devices p *
//! N/P .. (p+1) * N/P on its devices, in hardware order, and reads the
//! data of exactly those. XLA's collectives (ICI/DCN on TPU, NCCL on GPU)
//! then connect the devices across hosts. (The code and messages still
//! say "replicas" for the mesh's devices, `train.replicas`' count.)

use std::collections::BTreeMap;
use std::ops::Range;

use anyhow::{bail, Result};

use crate::runtime::{Client, Device};

/// Where a program's replicas run, seen from this process.
#[derive(Clone, Debug)]
pub struct Placement {
    /// Device id of every replica of the program (its device assignment).
    pub assignment: Vec<i64>,
    /// The replicas this process runs (a block of `assignment`).
    pub local: Range<usize>,
    /// Their devices, in replica order.
    pub devices: Vec<Device>,
}

/// One device as the layout sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceSlot {
    pub id: i64,
    pub process: i32,
    pub local_hardware_id: i32,
}

/// The host-by-host layout of `replicas` replicas over `devices` (every
/// device of the job): the device assignment and the block of replicas
/// that `me` (a process index) runs. Each process contributes the same
/// number of replicas, its first devices in hardware order.
pub fn layout(
    devices: &[DeviceSlot],
    replicas: usize,
    me: i32,
) -> Result<(Vec<i64>, Range<usize>)> {
    let mut by_process: BTreeMap<i32, Vec<DeviceSlot>> = BTreeMap::new();
    for d in devices {
        by_process.entry(d.process).or_default().push(*d);
    }
    let processes = by_process.len();
    if processes == 0 {
        bail!("the client lists no devices");
    }
    if replicas % processes != 0 {
        bail!(
            "train.replicas = {replicas} cannot be spread evenly over the job's {processes} hosts \
             (one worker per host drives that host's chips); use a multiple of {processes}"
        );
    }
    let per = replicas / processes;
    let mut assignment = Vec::with_capacity(replicas);
    let mut local = None;
    for (i, (process, mut devs)) in by_process.into_iter().enumerate() {
        if devs.len() < per {
            bail!(
                "train.replicas = {replicas} over {processes} hosts needs {per} devices on each, \
                 but host {process} has {}",
                devs.len()
            );
        }
        devs.sort_by_key(|d| (d.local_hardware_id, d.id));
        assignment.extend(devs[..per].iter().map(|d| d.id));
        if process == me {
            local = Some(i * per..(i + 1) * per);
        }
    }
    match local {
        Some(local) => Ok((assignment, local)),
        None => bail!("this process (index {me}) has no device in the job"),
    }
}

impl Placement {
    /// Every replica of the job over the client's devices (all hosts').
    pub fn job(client: &Client, replicas: usize) -> Result<Placement> {
        let global = client.global_devices();
        Placement::from_devices(client, &global, replicas, client.process_index())
    }

    /// `replicas` replicas on this process's own devices only (a program
    /// whose replicas other processes cannot join: the CPU plugin's).
    pub fn local(client: &Client, replicas: usize) -> Result<Placement> {
        let mine = client.devices();
        let me = mine.first().map_or(0, |d| d.process_index());
        Placement::from_devices(client, &mine, replicas, me)
    }

    fn from_devices(
        client: &Client,
        devices: &[Device],
        replicas: usize,
        me: i32,
    ) -> Result<Placement> {
        let slots: Vec<DeviceSlot> = devices
            .iter()
            .map(|d| DeviceSlot {
                id: d.id() as i64,
                process: d.process_index(),
                local_hardware_id: d.local_hardware_id(),
            })
            .collect();
        let (assignment, local) = layout(&slots, replicas, me)?;
        let addressable = client.devices();
        let devices = assignment[local.clone()]
            .iter()
            .map(|&id| {
                addressable
                    .iter()
                    .find(|d| d.id() as i64 == id)
                    .cloned()
                    .ok_or_else(|| anyhow::anyhow!("device {id} of this host is not addressable"))
            })
            .collect::<Result<Vec<Device>>>()?;
        Ok(Placement {
            assignment,
            local,
            devices,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(id: i64, process: i32, hw: i32) -> DeviceSlot {
        DeviceSlot {
            id,
            process,
            local_hardware_id: hw,
        }
    }

    #[test]
    fn one_host_takes_its_first_devices_in_hardware_order() {
        let devs = [slot(0, 0, 0), slot(1, 0, 1), slot(2, 0, 2), slot(3, 0, 3)];
        assert_eq!(layout(&devs, 2, 0).unwrap(), (vec![0, 1], 0..2));
        assert_eq!(layout(&devs, 4, 0).unwrap(), (vec![0, 1, 2, 3], 0..4));
        let err = layout(&devs, 5, 0).unwrap_err().to_string();
        assert!(
            err.contains("needs 5 devices") && err.contains("has 4"),
            "{err}"
        );
    }

    #[test]
    fn pods_are_laid_out_host_by_host_whatever_the_id_order() {
        // A v4-32-like slice: 4 hosts x 4 chips, ids interleaved across
        // hosts and listed out of order, as a topology may number them.
        let mut devs = vec![];
        for host in 0..4 {
            for chip in 0..4 {
                devs.push(slot((chip * 4 + host) as i64, host, chip));
            }
        }
        devs.reverse();
        let (assignment, local) = layout(&devs, 16, 2).unwrap();
        assert_eq!(local, 8..12);
        assert_eq!(&assignment[8..12], &[2, 6, 10, 14]);
        assert_eq!(&assignment[..4], &[0, 4, 8, 12]);
        let mut sorted = assignment.clone();
        sorted.sort();
        assert_eq!(sorted, (0..16).collect::<Vec<_>>());
        // Fewer replicas than chips: each host runs the same number.
        let (assignment, local) = layout(&devs, 8, 3).unwrap();
        assert_eq!((assignment.len(), local), (8, 6..8));
        assert_eq!(&assignment[6..8], &[3, 7]);
        let err = layout(&devs, 6, 0).unwrap_err().to_string();
        assert!(
            err.contains("4 hosts") && err.contains("multiple of 4"),
            "{err}"
        );
        let err = layout(&devs, 16, 7).unwrap_err().to_string();
        assert!(err.contains("index 7"), "{err}");
    }
}
