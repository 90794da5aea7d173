//! Which host of a TPU slice this is, found the way JAX finds it: GKE sets
//! `TPU_WORKER_ID` and `TPU_WORKER_HOSTNAMES`; on a TPU VM the metadata
//! server holds `agent-worker-number` and `worker-network-endpoints`.
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

/// This host's place in its TPU slice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TpuHost {
    pub worker_id: u32,
    /// Every host of the slice, worker 0 first (empty if not known).
    pub hostnames: Vec<String>,
}

/// From GKE's environment variables (`None` when `TPU_WORKER_ID` is unset).
pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<TpuHost>> {
    let Some(id) = var("TPU_WORKER_ID") else {
        return Ok(None);
    };
    let worker_id = id
        .trim()
        .parse()
        .with_context(|| format!("TPU_WORKER_ID = {id:?}: expected a worker number"))?;
    let hostnames: Vec<String> = var("TPU_WORKER_HOSTNAMES")
        .map(|h| {
            h.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    if !hostnames.is_empty() && worker_id as usize >= hostnames.len() {
        bail!(
            "TPU_WORKER_ID = {worker_id} but TPU_WORKER_HOSTNAMES lists {} hosts",
            hostnames.len()
        );
    }
    Ok(Some(TpuHost {
        worker_id,
        hostnames,
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
            "not on a TPU host: no TPU_WORKER_ID and no TPU chips (/dev/accel*, /dev/vfio/*); \
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
