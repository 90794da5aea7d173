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
    /// Check this machine for a run: plugin, client, devices and memory, a
    /// compiled program, the coordinator (one line per problem with the fix).
    #[command(alias = "devices")]
    Doctor(cli::doctor::DoctorArgs),
    /// Benchmarks (prints medians and ratios against peers).
    Bench(cli::bench::BenchArgs),
    /// Train a model (see configs/).
    Train(cli::train::TrainArgs),
    /// Write the step-0 checkpoint that `train --init` starts from.
    Init(cli::train::InitArgs),
    /// Print the exact parameter count by component.
    Params(cli::train::ParamsArgs),
    /// Prepare token files.
    #[command(subcommand)]
    Data(cli::data::DataCommand),
    /// Train tokenizers.
    #[command(subcommand)]
    Tokenizer(cli::tokenizer::TokenizerCommand),
    /// Run the coordinator of a multi-process job.
    Coordinator(cli::dist::CoordinatorArgs),
    /// Run a worker of a multi-process job (one per host).
    Worker(cli::dist::WorkerArgs),
    /// Start a coordinator and workers on this machine.
    Launch(cli::dist::LaunchArgs),
    /// Run an experiment of the thesis end to end (exp1: dense vs shared MoE).
    Experiment(cli::experiment::ExperimentArgs),
    /// Cross-entropy and perplexity of a checkpoint.
    Eval(cli::eval::EvalArgs),
    /// Which shared experts the router picks per layer (counts, overlap, heatmaps).
    Experts(cli::experts::ExpertsArgs),
    /// REAP saliency and frequency of every expert over calibration rows.
    Reap(cli::reap::ReapArgs),
    /// Text from a checkpoint (greedy or sampled, with a KV cache).
    Generate(cli::generate::GenerateArgs),
    /// Prune (SparseGPT, magnitude) and quantise (bf16, NF4) a dense
    /// checkpoint's block linears into a compressed checkpoint.
    Compress(cli::compress::CompressArgs),
    /// Checkpoint tools.
    #[command(subcommand)]
    Checkpoint(cli::checkpoint::CheckpointCommand),
    /// Plot train and validation loss of runs, overlaid.
    Plot(cli::plot::PlotArgs),
    /// Compile the train and eval steps for a TPU slice ahead of time, on
    /// this machine and offline: memory per chip, FLOPs, the micro-batch that fits.
    Compile(cli::compile::CompileArgs),
}

fn main() {
    // libtpu reads LIBTPU_INIT_ARGS when loaded: set its defaults now, while
    // this process has one thread (Plugin::load would do it otherwise).
    if sharedmoe::runtime::tpu_present() {
        sharedmoe::runtime::set_libtpu_init_args();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().command {
        Command::Doctor(a) => cli::doctor::run(&a),
        Command::Bench(a) => cli::bench::run(&a),
        Command::Train(a) => cli::train::run_train(&a),
        Command::Init(a) => cli::train::run_init(&a),
        Command::Params(a) => cli::train::run_params(&a),
        Command::Data(c) => cli::data::run(&c),
        Command::Tokenizer(c) => cli::tokenizer::run(&c),
        Command::Coordinator(a) => cli::dist::run_coordinator(&a),
        Command::Worker(a) => cli::dist::run_worker_cmd(&a),
        Command::Launch(a) => cli::dist::run_launch(&a),
        Command::Experiment(a) => cli::experiment::run(&a),
        Command::Eval(a) => cli::eval::run(&a),
        Command::Experts(a) => cli::experts::run(&a),
        Command::Reap(a) => cli::reap::run(&a),
        Command::Compress(a) => cli::compress::run(&a),
        Command::Generate(a) => cli::generate::run(&a),
        Command::Checkpoint(c) => cli::checkpoint::run(&c),
        Command::Plot(a) => cli::plot::run(&a),
        Command::Compile(a) => cli::compile::run(&a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
