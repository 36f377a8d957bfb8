//! Kubernetes names an agent in a cluster adds to flows and paths.

use serde::{Deserialize, Serialize};

/// What kind of object owns an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OwnerKind {
    Pod,
    Service,
}

/// Who an address (or a process) belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub kind: OwnerKind,
    pub namespace: String,
    pub name: String,
    /// The node a pod runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The container a process runs in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}
