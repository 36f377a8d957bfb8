//! `udptrace doctor`: what this kernel allows, which hook each hop uses, and why.

use crate::{
    kernel::{
        btf::{KernelBtf, VMLINUX_BTF},
        drop_reasons::DropReasons,
        preflight,
    },
    loader::{HopReport, LoadConfig, NetnsScope, Tracer},
};

fn line(what: &str, verdict: impl std::fmt::Display) {
    println!("{what:<12} {verdict}");
}

fn hop(report: &HopReport) {
    match report.chosen() {
        Some(hook) => line(&format!("{} hop", report.hop), format!("uses {hook}")),
        None => line(&format!("{} hop", report.hop), "NO HOOK WORKS"),
    }
    println!("{}", report.render());
    for h in &report.not_needed {
        println!("  not tried {h}: a preferred hook works");
    }
    for n in &report.notes {
        println!("  note: {n}");
    }
    for e in &report.errors {
        println!("  error: {e}");
    }
}

/// Prints the report; returns whether tracing can run.
pub fn run() -> bool {
    let release = preflight::kernel_release();
    let mut ok = true;
    match preflight::check_kernel(&release) {
        Ok(_) => line("kernel", format!("{release}: ok (needs ≥ 5.8)")),
        Err(e) => {
            ok = false;
            line("kernel", format!("{release}: {e}"));
        }
    }
    match preflight::check_privileges() {
        Ok(()) => line("privileges", "ok"),
        Err(e) => {
            ok = false;
            line("privileges", e);
        }
    }
    match KernelBtf::running() {
        Ok(btf) => {
            line("BTF", format!("{VMLINUX_BTF}: ok"));
            match DropReasons::from_btf(&btf) {
                Ok(r) => line(
                    "drop reasons",
                    format!("{} names from BTF enum skb_drop_reason", r.len()),
                ),
                Err(e) => line("drop reasons", format!("unavailable: {e}")),
            }
        }
        Err(e) => {
            ok = false;
            line("BTF", e);
        }
    }
    if !ok {
        println!("\ntracing cannot run here: fix the lines above");
        return false;
    }
    match Tracer::load(&LoadConfig::new(NetnsScope::Host)) {
        Ok(tracer) => {
            line("tracefs", &tracer.kernel().tracefs);
            tracer.hops().for_each(hop);
            println!("\ntracing can run: `udptrace trace`");
            true
        }
        Err(e) => {
            println!("\ntracing cannot run here: {e}");
            false
        }
    }
}
