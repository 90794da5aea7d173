//! Which host of a TPU slice this is, found the way JAX finds it: GKE sets
//! `TPU_WORKER_ID` and the slice's hosts, as `TPU_PROCESS_ADDRESSES`
//! (`host:port` of every host's TPU runtime, worker 0 first; or a file
//! named by `TPU_PROCESS_ADDRESSES_PATH`), read before `TPU_WORKER_HOSTNAMES`
//! as JAX's `GkeTpuCluster` does; on a TPU VM the metadata server holds
//! `agent-worker-number` and `worker-network-endpoints`.
//!
//! libtpu discovers the slice's topology by itself when its client is
//! created; a worker only needs its own index so that its coordinator rank
//! is the slice's worker number (logs and data shards then line up with
//! `gcloud ... --worker=N`). The metadata server is asked only on a
//! machine with TPU chips, where it exists.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// The port of a host's TPU runtime when an address does not name one
/// (GKE's and libtpu's default, `TPU_PROCESS_PORT`).
pub const TPU_PROCESS_PORT: u16 = 8476;

/// This host's place in its TPU slice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TpuHost {
    pub worker_id: u32,
    /// Every host of the slice, worker 0 first (empty if not known).
    pub hostnames: Vec<String>,
    /// `host:port` of every host's TPU runtime, worker 0 first (from
    /// `TPU_PROCESS_ADDRESSES`, else the hostnames at [`TPU_PROCESS_PORT`]).
    pub process_addresses: Vec<String>,
}

fn split_list(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// The host of a `host:port`, `[v6addr]:port` or bare host entry.
pub fn host_of(address: &str) -> &str {
    let a = address.trim();
    if let Some(rest) = a.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match a.rsplit_once(':') {
        // One colon: host:port. More: a bare IPv6 address.
        Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => host,
        _ => a,
    }
}

/// `TPU_PROCESS_ADDRESSES` (`host:port,host:port,...`, worker 0 first) as
/// (hostnames, addresses with a port). `local` (a single-host setting) and
/// an empty value are no list.
pub fn parse_process_addresses(value: &str) -> Result<Option<(Vec<String>, Vec<String>)>> {
    let entries = split_list(value);
    if entries.is_empty() || (entries.len() == 1 && entries[0] == "local") {
        return Ok(None);
    }
    let mut hosts = vec![];
    let mut addresses = vec![];
    for e in entries {
        let host = host_of(&e);
        if host.is_empty() {
            bail!("TPU_PROCESS_ADDRESSES entry {e:?}: expected HOST:PORT");
        }
        hosts.push(host.to_string());
        addresses.push(if host == e || host.len() + 2 == e.len() {
            with_port(host)
        } else {
            e.clone()
        });
    }
    Ok(Some((hosts, addresses)))
}

fn with_port(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]:{TPU_PROCESS_PORT}")
    } else {
        format!("{host}:{TPU_PROCESS_PORT}")
    }
}

/// From GKE's environment variables (`None` when `TPU_WORKER_ID` is unset).
/// The slice's hosts come from `TPU_PROCESS_ADDRESSES_PATH` (a file), then
/// `TPU_PROCESS_ADDRESSES`, then `TPU_WORKER_HOSTNAMES`, as in JAX.
pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<TpuHost>> {
    let Some(id) = var("TPU_WORKER_ID") else {
        return Ok(None);
    };
    let worker_id = id
        .trim()
        .parse()
        .with_context(|| format!("TPU_WORKER_ID = {id:?}: expected a worker number"))?;
    let from_file = match var("TPU_PROCESS_ADDRESSES_PATH").filter(|p| !p.trim().is_empty()) {
        Some(path) => {
            let text = std::fs::read_to_string(path.trim()).with_context(|| {
                format!(
                    "reading the TPU process addresses file TPU_PROCESS_ADDRESSES_PATH = {path}"
                )
            })?;
            let parsed = parse_process_addresses(&text)?;
            if parsed.is_none() {
                bail!("the TPU process addresses file {path} is empty");
            }
            parsed.map(|p| (p, "TPU_PROCESS_ADDRESSES_PATH"))
        }
        None => None,
    };
    let listed = match from_file {
        Some(p) => Some(p),
        None => match var("TPU_PROCESS_ADDRESSES") {
            Some(v) => parse_process_addresses(&v)?.map(|p| (p, "TPU_PROCESS_ADDRESSES")),
            None => None,
        },
    };
    let (hostnames, process_addresses, source) = match listed {
        Some(((h, a), source)) => (h, a, source),
        None => {
            let h = var("TPU_WORKER_HOSTNAMES")
                .map(|v| split_list(&v))
                .unwrap_or_default();
            let a = h.iter().map(|h| with_port(h)).collect();
            (h, a, "TPU_WORKER_HOSTNAMES")
        }
    };
    if !hostnames.is_empty() && worker_id as usize >= hostnames.len() {
        bail!(
            "TPU_WORKER_ID = {worker_id} but {source} lists {} hosts",
            hostnames.len()
        );
    }
    Ok(Some(TpuHost {
        worker_id,
        hostnames,
        process_addresses,
    }))
}

/// The `worker-network-endpoints` metadata value
/// (`id:worker-id:ip,id:worker-id:ip,...`) as addresses, worker 0 first.
pub fn parse_endpoints(value: &str) -> Result<Vec<String>> {
    value
        .split(',')
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            e.trim()
                .rsplit(':')
                .next()
                .filter(|ip| !ip.is_empty())
                .map(String::from)
                .with_context(|| format!("worker-network-endpoints entry {e:?}: expected ...:IP"))
        })
        .collect()
}

/// This host's place: the environment (GKE), else the TPU VM's metadata
/// server. Refuses to look on a machine without TPU chips.
pub fn discover() -> Result<TpuHost> {
    if let Some(h) = from_env(|k| std::env::var(k).ok())? {
        return Ok(h);
    }
    if !crate::runtime::tpu_present() {
        bail!(
            "not on a TPU host: no TPU_WORKER_ID and no TPU chips (no TPU on the PCI bus); \
             pass --rank N"
        );
    }
    let id = metadata("agent-worker-number")?;
    let worker_id = id
        .trim()
        .parse()
        .with_context(|| format!("metadata agent-worker-number = {id:?}: expected a number"))?;
    let hostnames = parse_endpoints(&metadata("worker-network-endpoints")?)?;
    Ok(TpuHost {
        worker_id,
        process_addresses: hostnames.iter().map(|h| with_port(h)).collect(),
        hostnames,
    })
}

/// One instance attribute from the GCE metadata server (HTTP/1.0, the
/// documented `Metadata-Flavor: Google` header, a few seconds at most).
fn metadata(key: &str) -> Result<String> {
    let host = "metadata.google.internal";
    let ctx = || format!("reading TPU metadata `{key}` from {host}");
    let addr = (host, 80)
        .to_socket_addrs()
        .with_context(ctx)?
        .next()
        .with_context(ctx)?;
    let timeout = Duration::from_secs(5);
    let mut s = TcpStream::connect_timeout(&addr, timeout).with_context(ctx)?;
    s.set_read_timeout(Some(timeout)).with_context(ctx)?;
    write!(
        s,
        "GET /computeMetadata/v1/instance/attributes/{key} HTTP/1.0\r\nHost: {host}\r\nMetadata-Flavor: Google\r\n\r\n"
    )
    .with_context(ctx)?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).with_context(ctx)?;
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("{}: {}", ctx(), head.lines().next().unwrap_or("no reply"));
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn gke_variables() {
        let h = from_env(env(&[
            ("TPU_WORKER_ID", "2"),
            ("TPU_WORKER_HOSTNAMES", "a.svc,b.svc, c.svc,d.svc"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(h.worker_id, 2);
        assert_eq!(h.hostnames, vec!["a.svc", "b.svc", "c.svc", "d.svc"]);
        assert_eq!(from_env(env(&[])).unwrap(), None);
        let err = from_env(env(&[("TPU_WORKER_ID", "x")])).unwrap_err();
        assert!(format!("{err:#}").contains("TPU_WORKER_ID = \"x\""));
        let err = from_env(env(&[
            ("TPU_WORKER_ID", "4"),
            ("TPU_WORKER_HOSTNAMES", "a,b,c,d"),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("lists 4 hosts"), "{err}");
    }

    #[test]
    fn process_addresses_come_before_worker_hostnames() {
        let h = from_env(env(&[
            ("TPU_WORKER_ID", "1"),
            (
                "TPU_PROCESS_ADDRESSES",
                "10.0.0.1:8476, 10.0.0.2:8476,10.0.0.3:8477",
            ),
            ("TPU_WORKER_HOSTNAMES", "w-0,w-1"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(h.worker_id, 1);
        assert_eq!(h.hostnames, vec!["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
        assert_eq!(
            h.process_addresses,
            vec!["10.0.0.1:8476", "10.0.0.2:8476", "10.0.0.3:8477"]
        );
        // Without it, the hostnames, at the default port.
        let h = from_env(env(&[
            ("TPU_WORKER_ID", "0"),
            ("TPU_WORKER_HOSTNAMES", "w-0.svc,w-1.svc"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(h.hostnames, vec!["w-0.svc", "w-1.svc"]);
        assert_eq!(h.process_addresses, vec!["w-0.svc:8476", "w-1.svc:8476"]);
        // `local` and an empty value are no list: the hostnames then.
        for none in ["local", " ", ""] {
            let h = from_env(env(&[
                ("TPU_WORKER_ID", "0"),
                ("TPU_PROCESS_ADDRESSES", none),
                ("TPU_WORKER_HOSTNAMES", "localhost"),
            ]))
            .unwrap()
            .unwrap();
            assert_eq!(h.hostnames, vec!["localhost"], "{none:?}");
        }
        // Names without a port, bracketed and bare IPv6.
        assert_eq!(
            parse_process_addresses("job-0.svc,[fd00::1]:8470,fd00::2")
                .unwrap()
                .unwrap(),
            (
                vec!["job-0.svc".to_string(), "fd00::1".into(), "fd00::2".into()],
                vec![
                    "job-0.svc:8476".to_string(),
                    "[fd00::1]:8470".into(),
                    "[fd00::2]:8476".into()
                ]
            )
        );
        // The worker id is checked against the list it came from.
        let err = from_env(env(&[
            ("TPU_WORKER_ID", "2"),
            ("TPU_PROCESS_ADDRESSES", "a:8476,b:8476"),
            ("TPU_WORKER_HOSTNAMES", "a,b,c,d"),
        ]))
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("TPU_PROCESS_ADDRESSES lists 2 hosts"),
            "{err}"
        );
    }

    #[test]
    fn the_process_addresses_file_comes_first() {
        let path = std::env::temp_dir().join(format!("sharedmoe-tpu-addr-{}", std::process::id()));
        std::fs::write(&path, "  10.0.0.1:8476,10.0.0.2:8476 \n").unwrap();
        let p = path.to_str().unwrap();
        let h = from_env(env(&[
            ("TPU_WORKER_ID", "0"),
            ("TPU_PROCESS_ADDRESSES_PATH", p),
            ("TPU_PROCESS_ADDRESSES", "10.9.9.9:8476"),
            ("TPU_WORKER_HOSTNAMES", "w-0"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(h.hostnames, vec!["10.0.0.1", "10.0.0.2"]);
        std::fs::write(&path, "  \n").unwrap();
        let err = from_env(env(&[
            ("TPU_WORKER_ID", "0"),
            ("TPU_PROCESS_ADDRESSES_PATH", p),
        ]));
        assert!(format!("{:#}", err.unwrap_err()).contains("is empty"));
        std::fs::remove_file(&path).unwrap();
        // A missing file is an error, not a silent fall-back.
        let err = from_env(env(&[
            ("TPU_WORKER_ID", "0"),
            ("TPU_PROCESS_ADDRESSES_PATH", "/no/such/file"),
            ("TPU_PROCESS_ADDRESSES", "10.0.0.2:8476"),
        ]))
        .unwrap_err();
        assert!(format!("{err:#}").contains("/no/such/file"), "{err:#}");
    }

    #[test]
    fn metadata_endpoints() {
        let v =
            "unknown:0:10.130.0.5,unknown:1:10.130.0.6,unknown:2:10.130.0.7,unknown:3:10.130.0.8";
        assert_eq!(
            parse_endpoints(v).unwrap(),
            vec!["10.130.0.5", "10.130.0.6", "10.130.0.7", "10.130.0.8"]
        );
        assert!(parse_endpoints("a:0:").is_err());
    }
}
