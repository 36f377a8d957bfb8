//! udptrace: where did my UDP datagram go, and why does the receiver see that source?

use std::process::ExitCode;

use clap::Parser as _;
use tracing_subscriber::{filter::LevelFilter, EnvFilter};

use udptrace::cmd::{
    agent,
    args::{Cli, Command},
    doctor, flows, path, trace,
};

/// `--log-level` (for udptrace and its kernel programs; other crates stay at warnings), else
/// `RUST_LOG`, else warnings.
fn init_logging(level: Option<LevelFilter>) {
    // aya and aya-log log through the `log` crate; forward those records to tracing.
    let _ = tracing_log::LogTracer::init();
    let filter = match level {
        Some(l) if l > LevelFilter::WARN => {
            EnvFilter::new(format!("warn,udptrace={l},udptrace_ebpf={l}"))
        }
        Some(l) => EnvFilter::new(l.to_string()),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in logs and pipes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn main() -> ExitCode {
    // glibc gives every thread that allocates an arena of its own, kept for good: the
    // threads that enter a namespace to attach there (one per namespace covered) grew an
    // agent following pods by megabytes. Two arenas serve its few busy threads.
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let cli = Cli::parse();
    init_logging(cli.log_level);
    match cli.command {
        Command::Doctor => {
            // A report piped into `head` just stops (trace handles a closed pipe itself,
            // to print its loss counters).
            // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
            if doctor::run() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Trace(args) => block_on(trace::run(args)),
        Command::Flows(args) => block_on(flows::run(args)),
        Command::Agent(args) => block_on(agent::run(*args)),
        Command::Path(args) => block_on(path::run(args)),
    }
}

/// Runs a command on a single-threaded runtime; an error is printed with its causes.
fn block_on(command: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("udptrace: error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("udptrace: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
