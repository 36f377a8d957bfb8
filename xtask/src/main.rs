//! Project tasks: `cargo xtask setup | build | image | run | test | bench | fuzz`.

mod bench;
mod cmd;
mod fuzz;
mod image;
mod setup;
mod suite;
mod test;
mod vm;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "udptrace project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need: Debian packages, rust-src, bpf-linker.
    /// Idempotent; quick when everything is in place.
    Setup,
    /// Build target/release/udptrace with its eBPF programs embedded.
    Build,
    /// Build the agent's container image (udptrace:VERSION) with podman.
    Image,
    /// Set up, build, and run udptrace as root with the given arguments.
    Run {
        /// Arguments for udptrace, e.g. `trace --port 53`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, check formatting and lints, and run every test: on this kernel (integration
    /// tests as root) and in VMs with other kernels (`integration-test --vm`).
    Test,
    /// Measure what tracing costs: datagrams per second between two namespaces with no
    /// tracer, the agent, `trace`, tcpdump and bpftrace, as ratios (as root).
    Bench(bench::Options),
    /// Feed udptrace's decoders arbitrary kernel records (cargo-fuzz) for a while.
    Fuzz {
        /// Seconds per fuzz target.
        #[arg(long, default_value_t = 300)]
        secs: u64,
    },
    /// Run only the soak tests on this kernel, for as long as asked: the agent under a sender at
    /// full speed (tests/integration/soak.rs: memory and fds flat, every datagram counted), then
    /// through rounds of namespaces created and deleted (tests/integration/churn.rs: everything
    /// let go of, every datagram counted).
    Soak {
        /// Seconds of traffic (the suite's run is 60).
        #[arg(long, default_value_t = 600)]
        secs: u64,
        /// Rounds of 40 namespaces created and deleted, in each agent mode (the suite's run is
        /// 5; 300 rounds take about an hour).
        #[arg(long, default_value_t = 100)]
        churn_rounds: u64,
    },
    /// The benchmark's reference counter (NetObserv's design), run by `bench` as a tool of
    /// its own.
    #[command(hide = true)]
    ReferenceCounter(bench::reference::Options),
    /// Run the test suite on this kernel, or with `--vm` inside qemu guests.
    IntegrationTest {
        /// Boot other kernels under qemu and run the suite inside them.
        #[arg(long)]
        vm: bool,
        /// Kernels for --vm: `6.1` (Debian 12's LTS) or a Debian package name. Repeatable.
        #[arg(long = "kernel", value_name = "VERSION", requires = "vm")]
        kernels: Vec<String>,
    },
}

fn default_kernels() -> Vec<String> {
    vm::DEFAULT_KERNELS.iter().map(|k| k.to_string()).collect()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: Result<()> = match cli.task {
        Task::Setup => setup::run(),
        Task::Build => setup::run().and_then(|()| suite::build_release()),
        Task::Image => setup::run().and_then(|()| image::build()),
        Task::Run { args } => setup::run()
            .and_then(|()| suite::build_release())
            .and_then(|()| {
                cmd::run_as_root(&cmd::workspace().join("target/release/udptrace"), &args)
            }),
        Task::Test => setup::run().and_then(|()| test::run(&default_kernels())),
        Task::Bench(opts) => setup::run().and_then(|()| bench::run(&opts)),
        Task::ReferenceCounter(opts) => bench::reference::run(&opts),
        Task::Fuzz { secs } => setup::run().and_then(|()| fuzz::run(secs)),
        Task::Soak { secs, churn_rounds } => {
            setup::run().and_then(|()| test::soak(secs, churn_rounds))
        }
        Task::IntegrationTest { vm, kernels } => setup::run().and_then(|()| {
            let mut totals = suite::Totals::default();
            let result = if vm {
                let kernels = if kernels.is_empty() {
                    default_kernels()
                } else {
                    kernels
                };
                vm::run(&kernels, &mut totals)
            } else {
                test::run_host(&mut totals)
            };
            totals.print();
            result
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
