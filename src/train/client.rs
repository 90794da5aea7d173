//! Opening the PJRT client of a run: the configured backend's plugin,
//! its device count on the CPU, and in a multi-host job the job's
//! key-value store through which the plugin's processes meet.

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;

use crate::runtime::{find_plugin, Backend, Client, KeyValueStore, NamedValue, Plugin};

use super::config::Config;

/// A client for every replica of a single-process run.
pub fn open_client(cfg: &Config, plugin: Option<&Path>) -> Result<Client> {
    open_client_with(cfg, plugin, cfg.train.replicas)
}

/// A client of the configured backend; on the CPU with `devices` devices.
pub fn open_client_with(cfg: &Config, plugin: Option<&Path>, devices: i64) -> Result<Client> {
    open_job_client(cfg, plugin, devices, None)
}

/// This process's place in a multi-host job, for client creation.
pub struct JobMember {
    pub node_id: i64,
    pub num_nodes: i64,
    /// The job's key-value store (the coordinator's).
    pub kv: Arc<dyn KeyValueStore>,
}

/// A client for one process of a job: on the CPU with `devices` devices;
/// in a multi-host job on accelerators with the job's key-value store (the
/// coordinator's), through which the plugin's processes exchange their
/// topology: the CUDA plugin with `node_id` / `num_nodes`, libtpu as
/// `xla_bridge.make_tpu_client` passes it JAX's distributed client (it
/// finds its slice by itself, and uses the store where it needs one).
pub fn open_job_client(
    cfg: &Config,
    plugin: Option<&Path>,
    devices: i64,
    member: Option<JobMember>,
) -> Result<Client> {
    let backend = cfg.run.backend;
    let loc = find_plugin(backend, plugin)?;
    let plugin = Plugin::load(&loc.path)?;
    let (options, kv) = job_client_options(backend, devices, member);
    Ok(Client::new(plugin, &options, kv)?)
}

/// A client's creation options and key-value store.
pub type ClientSetup = (
    Vec<(&'static str, NamedValue)>,
    Option<Arc<dyn KeyValueStore>>,
);

/// The creation options and key-value store of a job's client on `backend`.
pub fn job_client_options(
    backend: Backend,
    devices: i64,
    member: Option<JobMember>,
) -> ClientSetup {
    let mut options = backend.client_options(devices as usize);
    let mut kv = None;
    match (backend, member) {
        (Backend::Cuda, Some(m)) if m.num_nodes > 1 => {
            options.push(("node_id", NamedValue::Int(m.node_id)));
            options.push(("num_nodes", NamedValue::Int(m.num_nodes)));
            kv = Some(m.kv);
        }
        (Backend::Tpu, Some(m)) if m.num_nodes > 1 => kv = Some(m.kv),
        _ => {}
    }
    (options, kv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    struct NoStore;
    impl KeyValueStore for NoStore {
        fn put(&self, _: &str, _: &[u8]) -> crate::runtime::Result<()> {
            Ok(())
        }
        fn get(&self, key: &str, _: Duration) -> crate::runtime::Result<Vec<u8>> {
            Err(crate::runtime::Error::new("test", key))
        }
    }

    fn member(num_nodes: i64) -> Option<JobMember> {
        Some(JobMember {
            node_id: 1,
            num_nodes,
            kv: Arc::new(NoStore),
        })
    }

    #[test]
    fn multi_host_accelerator_clients_get_the_job_key_value_store() {
        fn names(o: &[(&'static str, NamedValue)]) -> Vec<&'static str> {
            o.iter().map(|(n, _)| *n).collect()
        }
        let (o, kv) = job_client_options(Backend::Tpu, 4, member(4));
        assert!(kv.is_some(), "libtpu gets the store");
        assert_eq!(names(&o), ["ml_framework_name", "ml_framework_version"]);
        let (o, kv) = job_client_options(Backend::Cuda, 8, member(2));
        assert!(kv.is_some());
        assert_eq!(
            names(&o),
            ["abort_collectives_on_failure", "node_id", "num_nodes"]
        );
        assert_eq!(o[1].1, NamedValue::Int(1));
        assert_eq!(o[2].1, NamedValue::Int(2));
        // One host, or no job: no store.
        for b in [Backend::Tpu, Backend::Cuda, Backend::Cpu] {
            assert!(job_client_options(b, 1, member(1)).1.is_none(), "{b}");
            assert!(job_client_options(b, 1, None).1.is_none(), "{b}");
        }
        // The CPU plugin's processes never join one client.
        let (o, kv) = job_client_options(Backend::Cpu, 2, member(4));
        assert!(kv.is_none());
        assert_eq!(o, vec![("cpu_device_count", NamedValue::Int(2))]);
    }
}
