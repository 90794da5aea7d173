//! `cargo bench --bench runtime`: the same report as `sharedmoe bench runtime`.

fn main() -> anyhow::Result<()> {
    sharedmoe::cli::bench::runtime()
}
