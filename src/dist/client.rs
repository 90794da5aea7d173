//! The worker's side of the gRPC connection: the channel (with the shared
//! secret attached) and the identity every request carries.

use std::time::Duration;

use anyhow::{Context, Result};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use super::auth::Attach;
use super::coordinator::{MAX_MESSAGE_BYTES, WINDOW_BYTES};
use super::proto::coordinator_client::CoordinatorClient;

pub type Client = CoordinatorClient<InterceptedService<Channel, Attach>>;

/// `host:port` or a URL.
pub fn endpoint_url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// A lazily connecting client: calls fail with UNAVAILABLE while the
/// coordinator is down and succeed once it is back.
pub fn connect(addr: &str, secret: Option<&str>) -> Result<Client> {
    let channel = Endpoint::from_shared(endpoint_url(addr))
        .with_context(|| format!("coordinator address `{addr}`"))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(10))
        .initial_stream_window_size(WINDOW_BYTES)
        .initial_connection_window_size(WINDOW_BYTES)
        .connect_lazy();
    Ok(
        CoordinatorClient::with_interceptor(channel, Attach::new(secret)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
}

/// Who this worker is within the current attempt.
#[derive(Clone, Debug)]
pub struct Session {
    pub job_id: String,
    pub worker_id: u64,
    pub attempt: u32,
    pub rank: u32,
    pub world: u32,
}
