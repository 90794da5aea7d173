//! The `sharedmoe` command line: one module per subcommand.

pub mod bench;
mod bench_step;
pub mod devices;
pub mod train;
