//! The coordinator's key-value store as the PJRT plugin's
//! [`KeyValueStore`]: how the CUDA plugin's processes exchange their
//! topology (with `node_id` / `num_nodes`) at client creation. Keys live for
//! one attempt.

use std::time::Duration;

use tokio::runtime::Handle;

use super::client::{Client, Session};
use super::proto::{KvGetRequest, KvPutRequest};
use crate::runtime::{Error, ErrorCode, KeyValueStore};

pub struct CoordinatorKv {
    pub rt: Handle,
    pub client: Client,
    pub session: Session,
}

fn error(status: tonic::Status, what: &str) -> Error {
    let code = match status.code() {
        tonic::Code::DeadlineExceeded => ErrorCode::DeadlineExceeded,
        tonic::Code::NotFound => ErrorCode::NotFound,
        tonic::Code::Unavailable => ErrorCode::Unavailable,
        tonic::Code::Aborted => ErrorCode::Aborted,
        _ => ErrorCode::Unknown,
    };
    Error {
        code: Some(code),
        message: status.message().to_string(),
        context: format!("coordinator key-value store: {what}"),
    }
}

impl KeyValueStore for CoordinatorKv {
    fn put(&self, key: &str, value: &[u8]) -> crate::runtime::Result<()> {
        let s = &self.session;
        let req = KvPutRequest {
            job_id: s.job_id.clone(),
            worker_id: s.worker_id,
            attempt: s.attempt,
            key: key.to_string(),
            value: value.to_vec(),
        };
        self.rt
            .block_on(self.client.clone().kv_put(req))
            .map(|_| ())
            .map_err(|e| error(e, &format!("put {key}")))
    }

    fn get(&self, key: &str, timeout: Duration) -> crate::runtime::Result<Vec<u8>> {
        let s = &self.session;
        let req = KvGetRequest {
            job_id: s.job_id.clone(),
            worker_id: s.worker_id,
            attempt: s.attempt,
            key: key.to_string(),
            timeout_ms: timeout.as_millis().min(u32::MAX as u128) as u32,
        };
        self.rt
            .block_on(self.client.clone().kv_get(req))
            .map(|r| r.into_inner().value)
            .map_err(|e| error(e, &format!("get {key}")))
    }
}
