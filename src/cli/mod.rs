//! The `sharedmoe` command line: one module per subcommand.

pub mod devices;
pub mod bench;
