//! The multi-host runtime where it can be checked without TPUs or GPUs
//! (issue 13, item 4), on the real CPU plugin: launch ids that every
//! process computes alike, arguments placed on the executable's own
//! devices, the exit-on-abort decision, TPU detection and the slice's
//! addresses.

use std::process::Command;

use sharedmoe::graph::{Compiled, DType, Graph, HostTensor, TensorType};
use sharedmoe::runtime::{launch_id_sequence, tpu_chips_in, Arg, Backend, Client};

/// A replicated program over `replicas` devices: `x @ x * scale`, summed
/// over replicas (`scale` makes programs differ).
fn program(client: &Client, replicas: usize, scale: f32, assignment: &[i64]) -> Compiled {
    let g = Graph::new();
    let x = g.param("x", TensorType::new(DType::F32, &[4, 4])).unwrap();
    let mut y = x.matmul(&x).unwrap().mul_scalar(scale as f64).unwrap();
    if replicas > 1 {
        y = y.all_reduce_sum().unwrap();
    }
    g.build(&[&y])
        .unwrap()
        .with_replicas(replicas)
        .compile_on(client, Some(assignment))
        .unwrap()
}

/// Runs `exe` `n` times and returns the launch id of each execution.
fn launch_ids(client: &Client, exe: &Compiled, n: usize) -> Vec<i32> {
    let inputs: Vec<Vec<HostTensor>> = exe.devices().iter().map(|_| vec![ones()]).collect();
    (0..n)
        .map(|_| {
            exe.run_replicated(client, &inputs).unwrap();
            exe.executable().last_launch_id().expect("a launch id")
        })
        .collect()
}

fn ones() -> HostTensor {
    HostTensor::from_f64(&[1.0; 16], TensorType::new(DType::F32, &[4, 4])).unwrap()
}

const CHILD: &str = "SHAREDMOE_LAUNCH_ID_CHILD";

/// The child half of `the_same_program_has_the_same_launch_ids_in_two_processes`
/// (does nothing unless started by it).
#[test]
fn launch_id_child() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    println!("{}", launch_line());
}

/// This process's launch key and first 4 launch ids of the test program,
/// as one line.
fn launch_line() -> String {
    let client = Client::cpu(2).unwrap();
    let exe = program(&client, 2, 3.0, &[0, 1]);
    let ids = launch_ids(&client, &exe, 4);
    format!(
        "LAUNCH key={} ids={}",
        exe.executable().launch_key(),
        ids.iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",")
    )
}

fn child_launch_line() -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "launch_id_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The harness may print the test's name on the same line first.
    let at = text
        .find("LAUNCH ")
        .unwrap_or_else(|| panic!("no LAUNCH line in:\n{text}"));
    text[at..].lines().next().unwrap_or_default().to_string()
}

#[test]
fn the_same_program_has_the_same_launch_ids_in_two_processes() {
    let (a, b) = (child_launch_line(), child_launch_line());
    assert_eq!(a, b, "two processes, one program");
    // ... and this process computes the same ids for it.
    assert_eq!(a, launch_line());
}

#[test]
fn launch_ids_follow_the_program_and_count_its_executions() {
    // Two clients (as two hosts would have), the same program: the same
    // sequence, a new id per execution, never 0.
    let (c1, c2) = (Client::cpu(2).unwrap(), Client::cpu(2).unwrap());
    let (e1, e2) = (program(&c1, 2, 3.0, &[0, 1]), program(&c2, 2, 3.0, &[0, 1]));
    assert_eq!(e1.executable().last_launch_id(), None);
    let (s1, s2) = (launch_ids(&c1, &e1, 5), launch_ids(&c2, &e2, 5));
    assert_eq!(s1, s2);
    assert!(s1.iter().all(|&id| id != 0), "{s1:?}");
    let distinct: std::collections::BTreeSet<i32> = s1.iter().copied().collect();
    assert_eq!(distinct.len(), 5, "{s1:?}");
    assert_eq!(s1, launch_id_sequence(e1.executable().launch_key(), 5));
    // Another program (a constant, or the device assignment) has other ids.
    let other = program(&c1, 2, 4.0, &[0, 1]);
    let swapped = program(&c1, 2, 3.0, &[1, 0]);
    let keys = [
        e1.executable().launch_key(),
        other.executable().launch_key(),
        swapped.executable().launch_key(),
    ];
    assert!(
        keys[0] != keys[1] && keys[0] != keys[2] && keys[1] != keys[2],
        "{keys:?}"
    );
    assert_ne!(launch_ids(&c1, &other, 5), s1);
    // 0 is skipped where the counter passes it.
    assert_eq!(launch_id_sequence(u32::MAX as u64, 3), vec![-1, 1, 2]);
    assert_eq!(launch_id_sequence(0, 2), vec![1, 2]);
}

#[test]
fn arguments_go_to_the_executables_own_devices() {
    let client = Client::cpu(2).unwrap();
    // One replica, on the client's second device.
    let exe = program(&client, 1, 2.0, &[1]);
    let devices = exe.devices();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].id(), client.devices()[1].id());
    // run_replicated uploads to the executable's device: 4 * 2 per entry.
    let out = exe.run_replicated(&client, &[vec![ones()]]).unwrap();
    assert_eq!(out[0][0].to_f64(), vec![8.0; 16]);
    // A buffer on the client's first device is refused, naming both.
    let wrong = client
        .buffer_from_host(&[1f32; 16], &[4, 4], &client.devices()[0])
        .unwrap();
    let err = exe
        .execute(vec![vec![Arg::Borrowed(&wrong)]])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("is on device 0") && err.contains("on device 1"),
        "{err}"
    );
}

#[test]
fn exit_on_abort_per_backend_and_node_count() {
    use sharedmoe::dist::worker::{restarts_in_process, EXIT_RESTART};
    assert!(restarts_in_process(Backend::Cpu, 4));
    assert!(restarts_in_process(Backend::Cuda, 1));
    assert!(!restarts_in_process(Backend::Cuda, 2));
    assert!(!restarts_in_process(Backend::Tpu, 1));
    assert!(!restarts_in_process(Backend::Tpu, 4));
    assert_ne!(EXIT_RESTART, 0);
}

#[test]
fn client_options_are_each_plugins_own() {
    let names = |b: Backend| {
        b.client_options(2)
            .into_iter()
            .map(|(n, _)| n)
            .collect::<Vec<_>>()
    };
    assert_eq!(names(Backend::Cpu), ["cpu_device_count"]);
    assert_eq!(names(Backend::Cuda), ["abort_collectives_on_failure"]);
    assert_eq!(
        names(Backend::Tpu),
        ["ml_framework_name", "ml_framework_version"]
    );
}

#[test]
fn tpu_chips_on_a_fake_sysfs_tree() {
    let root = std::env::temp_dir().join(format!("sharedmoe-mh-sysfs-{}", std::process::id()));
    let dev = |name: &str, vendor: &str, device: &str| {
        let d = root.join("bus/pci/devices").join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("vendor"), format!("{vendor}\n")).unwrap();
        std::fs::write(d.join("device"), format!("{device}\n")).unwrap();
    };
    // A GPU VM on GCE: an H100 and Google's gVNIC (Google's vendor id).
    dev("0000:00:04.0", "0x10de", "0x2330");
    dev("0000:00:05.0", "0x1ae0", "0x0042");
    assert_eq!(tpu_chips_in(&root), 0);
    // A v5e host with 4 chips.
    for i in 0..4 {
        dev(&format!("0000:00:1{i}.0"), "0x1ae0", "0x0063");
    }
    assert_eq!(tpu_chips_in(&root), 4);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn tpu_process_addresses_before_worker_hostnames() {
    use sharedmoe::dist::tpu::from_env;
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    };
    let h = from_env(env(&[
        ("TPU_WORKER_ID", "3"),
        (
            "TPU_PROCESS_ADDRESSES",
            "job-0.tpu:8476,job-1.tpu:8476,job-2.tpu:8476,job-3.tpu:8476",
        ),
        ("TPU_WORKER_HOSTNAMES", "a,b,c,d"),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!(h.worker_id, 3);
    assert_eq!(h.hostnames[0], "job-0.tpu");
    assert_eq!(h.process_addresses[3], "job-3.tpu:8476");
}
