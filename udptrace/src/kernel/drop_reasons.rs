//! Names of the kernel's packet drop reasons, from its own BTF enum `skb_drop_reason`.
//! The numbering changes between kernels (6.1 and 6.18 differ), so it is never hard-coded.

use std::collections::HashMap;

use super::btf::{BtfError, KernelBtf};

const PREFIX: &str = "SKB_DROP_REASON_";

/// Drop reason number → name without the `SKB_DROP_REASON_` prefix (e.g. `NO_SOCKET`).
#[derive(Debug, Clone, Default)]
pub struct DropReasons {
    names: HashMap<u32, String>,
}

impl DropReasons {
    pub fn from_btf(btf: &KernelBtf) -> Result<Self, BtfError> {
        let names = btf
            .enum_values("skb_drop_reason")?
            .into_iter()
            .filter_map(|(name, value)| {
                let short = name.strip_prefix(PREFIX)?;
                // Subsystem masks are not reasons (MAX stays: the kernel prints it too).
                let value = u32::try_from(value).ok()?;
                (!short.starts_with("SUBSYS_")).then(|| (value, short.to_string()))
            })
            .collect();
        Ok(Self { names })
    }

    /// A table from known pairs (tests).
    #[cfg(test)]
    pub fn from_pairs<const N: usize>(pairs: [(u32, &str); N]) -> Self {
        Self {
            names: pairs.into_iter().map(|(v, n)| (v, n.to_string())).collect(),
        }
    }

    pub fn name(&self, reason: u32) -> Option<&str> {
        self.names.get(&reason).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::tracefs::Tracefs;

    /// `{ 3, "NO_SOCKET" }` pairs from the `__print_symbolic` table in a tracepoint's
    /// print fmt: the kernel's own rendering, an independent ground truth.
    fn print_symbolic(print_fmt: &str) -> Vec<(u32, String)> {
        print_fmt
            .split('{')
            .skip(1)
            .filter_map(|chunk| {
                let (num, rest) = chunk.split_once(',')?;
                let name = rest.split('"').nth(1)?;
                Some((num.trim().parse().ok()?, name.to_string()))
            })
            .collect()
    }

    #[test]
    fn parses_print_symbolic() {
        let fmt = r#"reason: %s", __print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, { 3, "NO_SOCKET" })"#;
        assert_eq!(
            print_symbolic(fmt),
            vec![(2, "NOT_SPECIFIED".into()), (3, "NO_SOCKET".into())]
        );
    }

    /// On the running kernel (host or VM), every reason the kernel itself prints in
    /// skb:kfree_skb decodes to the same name from BTF.
    #[test]
    fn btf_names_match_what_the_kernel_prints() {
        let Ok(btf) = KernelBtf::running() else {
            eprintln!("skipped: no kernel BTF");
            return;
        };
        let reasons = DropReasons::from_btf(&btf).expect("skb_drop_reason in BTF");
        assert!(reasons.len() > 10, "{}", reasons.len());
        let Some(fmt) = Tracefs::find().ok().and_then(|fs| {
            std::fs::read_to_string(fs.root().join("events/skb/kfree_skb/format")).ok()
        }) else {
            eprintln!("skipped the tracefs cross-check: tracefs not mounted (needs root)");
            assert!(reasons.name(2).is_some());
            return;
        };
        let printed = print_symbolic(&fmt);
        assert!(printed.iter().any(|(_, n)| n == "NO_SOCKET"), "{fmt}");
        for (value, name) in printed {
            assert_eq!(reasons.name(value), Some(name.as_str()), "reason {value}");
        }
    }
}
