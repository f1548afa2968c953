//! The `ratewarden` command line: validate policies and run the multi-agent
//! simulation. Thin: every decision is made by the `ratewarden` core crate.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod inspect;
mod plot;
mod scenario;
mod serve;

/// Where the shared state lives (Redis), for the commands that use one.
#[derive(clap::Args, Debug, Clone)]
pub struct BackendArgs {
    /// Redis URL (`redis://host:port`).
    #[arg(long)]
    pub backend: String,
    /// Key namespace the wardens use.
    #[arg(long, default_value = "rw")]
    pub namespace: String,
}

mod simulate;
mod worker;

/// Runtime governor for AI agents and the APIs they call.
#[derive(Parser)]
#[command(name = "ratewarden", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a policy file (YAML, JSON or TOML) and print its effective limits.
    Check {
        /// The policy file.
        policy: PathBuf,
    },
    /// N agents share upstream quotas: naive retries vs governed vs coordinated (flags or a scenario file).
    Simulate(simulate::Args),
    /// Live state on a Redis backend: limits, leases, grants, reservations.
    Inspect(inspect::Args),
    /// The governor over HTTP: its own JSON API and the Cycles runtime protocol.
    Serve(serve::Args),
    /// Make an API key for `serve --api-keys`: prints the key (give it to the
    /// tenant; it is not stored) and the line for the keys file (its hash).
    ApiKey {
        /// The tenant the key acts for.
        #[arg(long)]
        tenant: String,
    },
    /// One of several processes hammering a shared backend (tests, load generation).
    #[command(hide = true)]
    Worker(worker::Args),
    /// Some agents of `simulate --backend redis://…`, in their own process.
    #[command(hide = true)]
    SimulateAgents(simulate::procs::AgentArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { policy } => match ratewarden::Policy::from_file(&policy) {
            Ok(p) => {
                println!(
                    "{}: valid policy, {} limits\n",
                    policy.display(),
                    p.limits().count()
                );
                print!("{}", p.describe());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Serve(args) => match serve::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::ApiKey { tenant } => match serve::new_key(&tenant) {
            Ok((key, line)) => {
                println!("key:  {key}");
                println!("line: {line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Inspect(args) => match inspect::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Worker(args) => match worker::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::SimulateAgents(args) => match simulate::procs::run_agents(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Simulate(args) => match simulate::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
