//! What the loader found for each hop: every hook tried, in order, and why each better one
//! was not usable. `doctor` prints it; `trace` and the agent warn from it at start.

use crate::kernel::preflight;

/// One attempt to attach a hop through one hook.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// e.g. `fentry:udp_sendmsg`.
    pub hook: &'static str,
    /// `Ok` when attached; otherwise why not.
    pub outcome: Result<(), String>,
}

/// `why` a hook failed, with the capabilities this process lacks when the kernel said
/// "permission denied" without naming one (kernels differ in what each hook needs).
fn name_caps(why: &str) -> String {
    let denied = why.contains("Permission denied") || why.contains("Operation not permitted");
    let lacking = preflight::lacking_hook_caps();
    if !denied || why.contains("CAP_") || lacking.is_empty() {
        return why.to_string();
    }
    format!("{why} (this process lacks {})", lacking.join(", "))
}

/// How one hop is observed on this kernel.
#[derive(Debug, Clone)]
pub struct HopReport {
    pub hop: &'static str,
    /// Hooks tried in order of preference, up to and including the one in use.
    pub attempts: Vec<Attempt>,
    /// Hooks not tried because a better one worked.
    pub not_needed: Vec<&'static str>,
    /// Remarks about the hook in use (reduced detail, ...).
    pub notes: Vec<String>,
    /// Where the hook in use could not be attached (a namespace, a device), and why.
    pub errors: Vec<String>,
}

impl HopReport {
    pub fn new(hop: &'static str) -> Self {
        Self {
            hop,
            attempts: Vec::new(),
            not_needed: Vec::new(),
            notes: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// The hook in use, if any.
    pub fn chosen(&self) -> Option<&'static str> {
        self.attempts
            .iter()
            .find(|a| a.outcome.is_ok())
            .map(|a| a.hook)
    }

    /// What a user should know before trusting the paths: this hop is not observed at all,
    /// or not everywhere it should be.
    pub fn warnings(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .errors
            .iter()
            .map(|e| format!("{} hop not attached everywhere: {}", self.hop, name_caps(e)))
            .collect();
        if self.chosen().is_none() {
            let why = self
                .attempts
                .last()
                .and_then(|a| a.outcome.as_ref().err())
                .map_or_else(|| "no hook to try".to_string(), |e| name_caps(e));
            out.insert(0, format!("no {} hop: {why}", self.hop));
        }
        out
    }

    /// One line per hook tried: attached, or why not usable.
    pub fn render(&self) -> String {
        self.attempts
            .iter()
            .map(|a| match &a.outcome {
                Ok(()) => format!("  tried {}: attached", a.hook),
                Err(why) => format!("  tried {}: not usable: {why}", a.hook),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}
