//! Reading udptrace's JSON paths the way a user's script would.

use serde_json::Value;

/// The hops of `kind` in a path, in order.
pub fn hops_of<'a>(path: &'a Value, kind: &str) -> Vec<&'a Value> {
    path["hops"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["kind"] == kind)
        .collect()
}

/// The kinds of a path's hops, in order.
pub fn hop_kinds(path: &Value) -> Vec<String> {
    path["hops"]
        .as_array()
        .expect("hops")
        .iter()
        .map(|h| h["kind"].as_str().unwrap().to_string())
        .collect()
}
