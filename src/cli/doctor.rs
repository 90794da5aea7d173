//! `sharedmoe doctor`: checks, in order, everything a run on this machine
//! needs (the plugin, its client and devices, a compiled program, the
//! coordinator) and says in one line per failure what to do about it.
//!
//! Each check prints `ok`, `FAIL` or `skip` and its finding; a check whose
//! prerequisite failed is skipped. The exit status is 1 when any failed.
//!
//! On a TPU slice libtpu's client creation waits for every host of the
//! slice to create one too; doctor waits at most [`HOST_WAIT`] and then
//! says which hosts' TPU runtimes do not answer.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::graph::{DType, DotDims, Graph, Mesh, Sharding, TensorType};
use crate::runtime::{find_plugin, tpu_present, Arg, Backend, Client, NamedValue, Plugin};
use crate::train::placement::Placement;

#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    /// cpu, cuda or tpu (default: the config's run.backend, else cpu).
    #[arg(long)]
    pub backend: Option<Backend>,
    /// Take the backend from this run config.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Path of the PJRT plugin (overrides discovery).
    #[arg(long)]
    pub plugin: Option<PathBuf>,
    /// Number of CPU devices (cpu backend only).
    #[arg(long, default_value_t = 1)]
    pub devices: usize,
    /// Also check that this coordinator (host:port) answers.
    #[arg(long)]
    pub coordinator: Option<String>,
    /// The coordinator's shared secret (else $SHAREDMOE_SECRET).
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
}

/// Prints the checks' findings and remembers whether one failed.
struct Report {
    failed: bool,
}

impl Report {
    fn ok(&mut self, what: &str, finding: impl AsRef<str>) {
        println!("ok    {what:<12} {}", finding.as_ref());
    }
    fn fail(&mut self, what: &str, finding: impl AsRef<str>) {
        self.failed = true;
        println!("FAIL  {what:<12} {}", finding.as_ref());
    }
    fn skip(&mut self, what: &str, why: &str) {
        println!("skip  {what:<12} {why}");
    }
    fn detail(&self, line: impl AsRef<str>) {
        println!("      {:<12} {}", "", line.as_ref());
    }
}

pub fn run(a: &DoctorArgs) -> Result<()> {
    let backend = match (a.backend, &a.config) {
        (Some(b), _) => b,
        (None, Some(path)) => crate::train::Config::load(path, &[])?.run.backend,
        (None, None) => Backend::Cpu,
    };
    println!("sharedmoe doctor: backend {backend}");
    let mut r = Report { failed: false };
    let client = check_backend(&mut r, backend, a);
    match &client {
        Some(c) => check_program(&mut r, c),
        None => r.skip("program", "needs a client"),
    }
    check_coordinator(&mut r, a);
    if r.failed {
        std::process::exit(1);
    }
    Ok(())
}

/// Plugin, API version, devices present, client and its devices.
fn check_backend(r: &mut Report, backend: Backend, a: &DoctorArgs) -> Option<Client> {
    let loc = match find_plugin(backend, a.plugin.as_deref()) {
        Ok(l) => l,
        Err(e) => {
            let first = e.message.lines().next().unwrap_or_default().to_string();
            r.fail("plugin", first);
            r.skip("client", "needs the plugin");
            return None;
        }
    };
    r.ok("plugin", format!("{} ({})", loc.path.display(), loc.source));
    let plugin = match Plugin::load(&loc.path) {
        Ok(p) => p,
        Err(e) => {
            r.fail(
                "load",
                format!("{e}: reinstall the package, or pass a working --plugin"),
            );
            return None;
        }
    };
    let (major, minor) = plugin.api_version();
    r.ok("api", format!("PJRT C API {major}.{minor} (GetPjrtApi)"));
    if backend == Backend::Tpu && !tpu_present() {
        r.fail(
            "devices",
            "no TPU chips here (no TPU on the PCI bus, /sys/bus/pci/devices): run on a TPU VM or a GKE \
             TPU node (not creating a libtpu client, which would query the cloud metadata server), or use \
             --backend cpu",
        );
        r.skip("client", "needs TPU chips");
        return None;
    }
    let options = backend.client_options(a.devices);
    let Some(created) = create_within(HOST_WAIT, plugin, options) else {
        r.fail("client", waiting_for_hosts(backend));
        // The creating thread is inside the plugin, waiting for the other
        // hosts: end here, without running the plugin's exit handlers.
        use std::io::Write;
        let _ = std::io::stdout().flush();
        // SAFETY: ends the process; nothing runs after it.
        unsafe { libc::_exit(1) };
    };
    let client = match created {
        Ok(c) => c,
        Err(e) => {
            let fix = match backend {
                Backend::Cuda if !std::path::Path::new("/dev/nvidiactl").exists() => {
                    "no NVIDIA GPU here (no /dev/nvidiactl: no GPU or no driver): run on a machine whose \
                     `nvidia-smi` lists a GPU, or use --backend cpu"
                }
                Backend::Cuda => {
                    "no usable NVIDIA GPU: check that `nvidia-smi` lists one, that the driver supports the \
                     plugin's CUDA version, and CUDA_VISIBLE_DEVICES"
                }
                Backend::Tpu => "the TPU is busy or unhealthy: stop other TPU processes (`sudo lsof -w /dev/accel*`)",
                Backend::Cpu => "reinstall xla-cpu-pjrt (scripts/setup.sh)",
            };
            r.fail(
                "client",
                format!("{fix} (the plugin says: {})", e.message.trim()),
            );
            return None;
        }
    };
    let local = client.devices();
    let global = client.global_devices().len();
    r.ok(
        "client",
        format!(
            "platform {}, {} device(s) here, {global} in the job, process {}",
            client.platform_name(),
            local.len(),
            client.process_index()
        ),
    );
    for d in &local {
        let memory = match d.memory() {
            Some((limit, used)) => format!(
                "{:.1} GiB usable, {:.1} GiB in use",
                limit as f64 / (1u64 << 30) as f64,
                used as f64 / (1u64 << 30) as f64
            ),
            None => "memory not reported".into(),
        };
        r.detail(format!(
            "device {}: {} (hardware id {}), {memory}",
            d.id(),
            d.kind(),
            d.local_hardware_id()
        ));
    }
    Some(client)
}

/// How long doctor waits for a client: on a TPU slice, for the other hosts.
const HOST_WAIT: Duration = Duration::from_secs(60);

/// Creates the client on another thread and waits at most `wait` for it
/// (`None`: still waiting; the thread is left behind).
fn create_within(
    wait: Duration,
    plugin: std::sync::Arc<Plugin>,
    options: Vec<(&'static str, NamedValue)>,
) -> Option<crate::runtime::Result<Client>> {
    within(wait, move || Client::new(plugin, &options, None))
}

/// `f`'s result if it comes within `wait` (it runs on its own thread,
/// which is left running otherwise).
fn within<T: Send + 'static>(wait: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(wait).ok()
}

/// The finding when the client did not come within [`HOST_WAIT`]: on TPU,
/// which hosts of the slice are missing.
fn waiting_for_hosts(backend: Backend) -> String {
    let waited = format!("no client after {} s", HOST_WAIT.as_secs());
    if backend != Backend::Tpu {
        return format!(
            "{waited}: the plugin is stuck creating it; check the driver and other processes"
        );
    }
    let slice = match crate::dist::tpu::discover() {
        Ok(s) => s,
        Err(e) => {
            return format!(
                "{waited}: libtpu is waiting for the slice's other hosts, which are unknown here ({e:#}); \
                 run doctor on every host at once"
            )
        }
    };
    let me = slice.worker_id as usize;
    let missing = missing_hosts(&slice.process_addresses, me, |a| {
        answers(a, Duration::from_secs(3))
    });
    describe_missing(&waited, &missing, slice.process_addresses.len())
}

/// The hosts (worker index, address) other than `me` whose TPU runtime
/// does not answer `probe`.
fn missing_hosts(
    addresses: &[String],
    me: usize,
    probe: impl Fn(&str) -> bool,
) -> Vec<(usize, String)> {
    addresses
        .iter()
        .enumerate()
        .filter(|(i, a)| *i != me && !probe(a))
        .map(|(i, a)| (i, a.clone()))
        .collect()
}

fn describe_missing(waited: &str, missing: &[(usize, String)], hosts: usize) -> String {
    if missing.is_empty() {
        return format!(
            "{waited}: libtpu is waiting for the slice's other hosts, and all {hosts} answer; one of them \
             runs another TPU program (stop it) or has not started doctor: run it on every host at once \
             (deploy/tpu-pod.sh, or gcloud ... ssh --worker=all)"
        );
    }
    let list: Vec<String> = missing
        .iter()
        .map(|(i, a)| format!("worker {i} ({a})"))
        .collect();
    format!(
        "{waited}: libtpu is waiting for the slice's other hosts; missing: {} (no TPU runtime answers \
         there): run doctor on every host at once (gcloud ... ssh --worker=all), and check that host",
        list.join(", ")
    )
}

/// True when a TCP connection to `address` (host:port) opens within `wait`.
fn answers(address: &str, wait: Duration) -> bool {
    use std::net::{TcpStream, ToSocketAddrs};
    match address.to_socket_addrs() {
        Ok(addrs) => addrs
            .into_iter()
            .any(|a| TcpStream::connect_timeout(&a, wait).is_ok()),
        Err(_) => false,
    }
}

/// Compiles and runs a small program over every local device: a bf16
/// matmul with f32 accumulation and an all-reduce, checked against the
/// closed form.
fn check_program(r: &mut Report, client: &Client) {
    match run_program(client) {
        Ok((n, compiled, ran)) => r.ok(
            "program",
            format!(
                "bf16 matmul + all-reduce (one SPMD program) over {n} device(s): exact; compiled in {:.0} ms, ran in {:.1} ms",
                compiled.as_secs_f64() * 1e3,
                ran.as_secs_f64() * 1e3
            ),
        ),
        Err(e) => r.fail(
            "program",
            format!("{e:#}: the plugin cannot run our programs; report this with the plugin's version"),
        ),
    }
}

fn run_program(client: &Client) -> Result<(usize, Duration, Duration)> {
    let n = client.devices().len();
    let placement = Placement::local(client, n)?;
    // One SPMD program over the n devices, as training compiles: x [n, 8,
    // 8] split along its first axis, device k's block all k+1, each block
    // multiplied by itself in bf16 (every entry 8 (k+1)^2, exact in bf16
    // and f32) and summed over the blocks, which the partitioner turns
    // into an all-reduce across the devices.
    let g = Graph::new();
    let x = g.param("x", TensorType::new(DType::F32, &[n as i64, 8, 8]))?;
    let xb = x.convert(DType::BF16)?;
    let batched = DotDims {
        lhs_batch: vec![0],
        rhs_batch: vec![0],
        lhs_contract: vec![2],
        rhs_contract: vec![1],
    };
    let y = xb
        .dot_general(&xb, &batched)?
        .convert(DType::F32)?
        .reduce_sum(&[0])?;
    let mesh = Mesh::line("devices", n)?;
    let began = Instant::now();
    let program = g
        .build(&[&y])?
        .partitioned(
            &mesh,
            vec![Sharding::split(&mesh, 3, 0, &["devices"])?],
            vec![Sharding::replicated(&mesh, 2)],
        )?
        .compile_on(client, Some(&placement.assignment))?;
    let compiled = began.elapsed();
    let inputs = placement
        .devices
        .iter()
        .enumerate()
        .map(|(k, d)| Ok(client.buffer_from_host(&[(k + 1) as f32; 64], &[1, 8, 8], d)?))
        .collect::<Result<Vec<_>>>()?;
    let began = Instant::now();
    let out = program.execute(inputs.iter().map(|b| vec![Arg::Borrowed(b)]).collect())?;
    let ran = began.elapsed();
    let want = (1..=n).map(|k| 8.0 * (k * k) as f32).sum::<f32>();
    for (k, o) in out.iter().enumerate() {
        let got = o[0].to_host::<f32>()?;
        if got.iter().any(|&v| v != want) {
            anyhow::bail!("wrong result on device {k}: {} instead of {want}", got[0]);
        }
    }
    Ok((n, compiled, ran))
}

fn check_coordinator(r: &mut Report, a: &DoctorArgs) {
    let Some(addr) = &a.coordinator else {
        r.skip("coordinator", "no --coordinator given");
        return;
    };
    match ping(addr, a) {
        Ok(version) => r.ok(
            "coordinator",
            format!("{addr} answers (sharedmoe {version})"),
        ),
        Err(e) => r.fail("coordinator", e),
    }
}

/// Pings the coordinator; the error is the one line to print.
fn ping(addr: &str, a: &DoctorArgs) -> std::result::Result<String, String> {
    use crate::dist::proto::PingRequest;
    let secret =
        crate::dist::auth::load_secret(a.secret_file.as_deref()).map_err(|e| format!("{e:#}"))?;
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    let mut client = {
        let _guard = rt.enter();
        crate::dist::client::connect(addr, secret.as_deref()).map_err(|e| format!("{e:#}"))?
    };
    let call = async {
        tokio::time::timeout(
            Duration::from_secs(10),
            client.ping(PingRequest { nonce: 7 }),
        )
        .await
    };
    match rt.block_on(call) {
        Ok(Ok(reply)) => Ok(reply.into_inner().version),
        Ok(Err(s)) if s.code() == tonic::Code::Unauthenticated => Err(format!(
            "{addr} refused our secret ({}): pass the job's --secret-file or set SHAREDMOE_SECRET",
            s.message()
        )),
        Ok(Err(s)) => Err(format!(
            "cannot reach {addr} ({}): start it (`sharedmoe coordinator ...`) or check the address, \
             port and firewall",
            s.message()
        )),
        Err(_) => Err(format!(
            "{addr} did not answer in 10 s: check the address, port and firewall"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_host_is_named_by_worker_and_address() {
        let listening = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let up = listening.local_addr().unwrap().to_string();
        // A port nobody listens on: bind one, then free it.
        let down = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let hosts = vec![down.clone(), up.clone(), down.clone(), up.clone()];
        let probe = |a: &str| answers(a, Duration::from_secs(2));
        // Worker 0 is this host (not probed); worker 2 is missing.
        let missing = missing_hosts(&hosts, 0, probe);
        assert_eq!(missing, vec![(2, down.clone())]);
        let text = describe_missing("no client after 60 s", &missing, 4);
        assert!(
            text.contains(&format!("missing: worker 2 ({down})"))
                && text.starts_with("no client after 60 s"),
            "{text}"
        );
        assert!(describe_missing("x", &[], 4).contains("all 4 answer"));
        assert!(!answers(
            "no-such-host.invalid:8476",
            Duration::from_millis(200)
        ));
    }

    #[test]
    fn a_client_that_does_not_come_is_given_up_after_the_wait() {
        let began = Instant::now();
        let slow = within(Duration::from_millis(200), || {
            std::thread::sleep(Duration::from_secs(5));
            1
        });
        assert_eq!(slow, None);
        assert!(began.elapsed() < Duration::from_secs(2));
        assert_eq!(within(Duration::from_secs(5), || 7), Some(7));
    }
}
