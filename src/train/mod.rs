//! Training: the run configuration, the learning-rate schedule, clipping
//! and AdamW, the whole optimizer step as one compiled program, the
//! device-resident trainer, the token sources and the training loop.

pub mod batches;
pub mod client;
pub mod config;
pub mod exchange;
pub mod history;
pub mod memory;
pub mod mfu;
pub mod optimizer;
pub mod placement;
pub mod program;
pub mod run;
pub mod schedule;
pub mod sharding;
pub mod step_loop;
pub mod tensorboard;
pub mod trainable;
pub mod trainer;

pub use config::Config;
pub use exchange::CrossProcessSum;
pub use run::{train, write_init, StartFrom};
pub use schedule::Schedule;
pub use trainer::{StepMetrics, Trainer};
