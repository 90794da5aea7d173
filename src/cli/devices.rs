//! `sharedmoe devices`: find a plugin, create a client, list its devices.

use std::path::PathBuf;

use anyhow::Context;

use crate::runtime::{find_plugin, Backend, Client, ClientOption, Plugin};

#[derive(clap::Args, Debug)]
pub struct DevicesArgs {
    /// cpu, cuda or tpu.
    #[arg(long, default_value = "cpu")]
    pub backend: Backend,
    /// Path of the PJRT plugin (overrides discovery).
    #[arg(long)]
    pub plugin: Option<PathBuf>,
    /// Number of CPU devices (cpu backend only).
    #[arg(long, default_value_t = 1)]
    pub devices: usize,
}

pub fn run(args: &DevicesArgs) -> anyhow::Result<()> {
    let loc = find_plugin(args.backend, args.plugin.as_deref())?;
    let plugin = Plugin::load(&loc.path)?;
    let (major, minor) = plugin.api_version();
    println!(
        "plugin: {} ({}), PJRT C API {major}.{minor}",
        loc.path.display(),
        loc.source
    );
    if args.backend == Backend::Tpu && !crate::runtime::tpu_present() {
        anyhow::bail!("no TPU device on this machine (/dev/accel* or /dev/vfio/*); not creating a libtpu client");
    }
    let options = match args.backend {
        Backend::Cpu => vec![("cpu_device_count", ClientOption::Int(args.devices as i64))],
        _ => vec![],
    };
    let client = Client::new(plugin, &options, None).context("creating client")?;
    println!("platform: {}", client.platform_name());
    for d in client.devices() {
        println!(
            "  device {}: {} (local hardware id {}; {})",
            d.id(),
            d.kind(),
            d.local_hardware_id(),
            d.debug_string()
        );
    }
    Ok(())
}
