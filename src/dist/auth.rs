//! The shared secret every RPC carries when the coordinator listens beyond
//! loopback: read from a file or the `SHAREDMOE_SECRET` environment
//! variable, sent in the `x-sharedmoe-secret` header, compared in constant
//! time.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{bail, Context, Result};
use tonic::metadata::MetadataValue;
use tonic::{Request, Status};

pub const HEADER: &str = "x-sharedmoe-secret";
pub const ENV: &str = "SHAREDMOE_SECRET";

/// The secret from `file` (trimmed) or else the environment.
pub fn load_secret(file: Option<&Path>) -> Result<Option<String>> {
    let secret = match file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading the secret file {}", f.display()))?
                .trim()
                .to_string(),
        ),
        None => std::env::var(ENV).ok(),
    };
    match secret {
        Some(s) if s.is_empty() => bail!("the shared secret is empty"),
        Some(s) if s.len() < 16 => bail!(
            "the shared secret is {} characters; use at least 16",
            s.len()
        ),
        Some(s) if MetadataValue::try_from(s.as_str()).is_err() => {
            bail!("the shared secret must be printable ASCII")
        }
        other => Ok(other),
    }
}

/// A coordinator bound beyond loopback must have a secret.
pub fn check_listen(addr: &SocketAddr, secret: &Option<String>) -> Result<()> {
    if !addr.ip().is_loopback() && secret.is_none() {
        bail!(
            "listening on {addr} (beyond loopback) needs a shared secret: pass --secret-file F or set {ENV} \
             (on the coordinator and every worker)"
        );
    }
    Ok(())
}

fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Server side: refuses requests without the secret (when there is one).
#[derive(Clone)]
pub struct Check(pub Option<String>);

impl tonic::service::Interceptor for Check {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(secret) = &self.0 else {
            return Ok(req);
        };
        match req.metadata().get(HEADER) {
            Some(v) if same(v.as_bytes(), secret.as_bytes()) => Ok(req),
            Some(_) => Err(Status::unauthenticated("wrong shared secret")),
            None => Err(Status::unauthenticated(format!(
                "this coordinator needs the shared secret in `{HEADER}`"
            ))),
        }
    }
}

/// Client side: attaches the secret (when there is one).
#[derive(Clone)]
pub struct Attach(pub Option<MetadataValue<tonic::metadata::Ascii>>);

impl Attach {
    pub fn new(secret: Option<&str>) -> Result<Attach> {
        Ok(Attach(match secret {
            Some(s) => Some(MetadataValue::try_from(s).context("the shared secret must be ASCII")?),
            None => None,
        }))
    }
}

impl tonic::service::Interceptor for Attach {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert(HEADER, v.clone());
        }
        Ok(req)
    }
}
