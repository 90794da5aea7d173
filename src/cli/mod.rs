//! The `sharedmoe` command line: one module per subcommand.

pub mod bench;
mod bench_data;
mod bench_dist;
mod bench_parity;
mod bench_step;
pub mod checkpoint;
pub mod compile;
pub mod convert_pool;
pub mod data;
pub mod dist;
pub mod doctor;
pub mod eval;
pub mod exp1_report;
pub mod exp2;
pub mod exp2_report;
pub mod experiment;
pub mod experts;
pub mod export_hf;
pub mod generate;
pub mod import_hf;
mod measured;
pub mod plot;
pub mod prune;
pub mod reap;
pub mod tokenizer;
pub mod train;
