//! The `flowmap` command.
use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "flowmap", version, about = "Few-step and one-step generative models on libtorch")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print torch/CUDA facts, cache locations and which data sets and weights are verified.
    Doctor,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into())).with_writer(std::io::stderr).init();
    match Cli::parse().command {
        Command::Doctor => print!("{}", flowmap_experiments::doctor::report()?),
    }
    Ok(())
}
