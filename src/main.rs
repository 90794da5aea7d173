use clap::{Parser, Subcommand};
use sharedmoe::cli;

/// Train LLaMA-style and shared-MoE language models on XLA accelerators.
#[derive(Parser)]
#[command(name = "sharedmoe", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the devices a PJRT plugin sees.
    Devices(cli::devices::DevicesArgs),
    /// Benchmarks (prints medians and ratios against peers).
    Bench(cli::bench::BenchArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().command {
        Command::Devices(a) => cli::devices::run(&a),
        Command::Bench(a) => cli::bench::run(&a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
