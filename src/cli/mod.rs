//! The `sharedmoe` command line: one module per subcommand.

pub mod bench;
pub mod devices;
pub mod train;
