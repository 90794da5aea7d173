//! The `sharedmoe` command line: one module per subcommand.

pub mod bench;
mod bench_data;
mod bench_dist;
mod bench_step;
pub mod data;
pub mod devices;
pub mod dist;
pub mod tokenizer;
pub mod train;
