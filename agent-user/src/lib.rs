//! The Airlock node agent: holds the privileged exec and connect calls of watched accounts in
//! the kernel (BPF LSM), asks for a decision, and resumes or kills the task.
//!
//! Where things live:
//! - [`bpf`]: loading, pinning and driving the kernel programs (crate agent-ebpf);
//! - [`holds`]: the life of one hold, from the stop to the outcome;
//! - [`action`]: what a held action is (program, arguments, copies, destination);
//! - [`policy`]: rule matching and the kernel prefilter tables;
//! - [`argmatch`]: argument patterns, matched as tokens;
//! - [`identity`]: files as the kernel names them, and their SHA-256;
//! - [`explain`]: the rule tester (`--explain`) and [`examples`], the rules' checked examples;
//! - [`watch`]: the watch list, and noticing when what it and the rules name changes;
//! - [`procinfo`]: the context of a held task from /proc;
//! - [`decider`]: the gRPC stream to the control plane;
//! - [`enroll`]: trading a one-time enrollment token for the agent's credential at start;
//! - [`config`]: the TOML configuration;
//! - [`server_rules`]: rules sent by the control plane, and their cache on disk;
//!
//! [`config`], [`policy`], [`argmatch`], [`identity`], [`server_rules`], [`explain`] and
//! [`examples`] live in crate agent-rules, which has no kernel part, so that `airlockctl` can
//! match rules without building the eBPF programs; they are re-exported here under the same
//! names.
//! - [`metrics`]: Prometheus metrics and health;
//! - [`agent`]: wiring it together at start-up.

pub mod action;
pub mod agent;
pub mod bpf;
pub mod decider;
pub mod dns;
pub mod enroll;
pub mod holds;
pub mod local_api;
pub mod mcp;
pub mod metrics;
pub mod notice;
pub mod procinfo;
pub mod watch;

pub use agent_rules::{argmatch, config, examples, explain, identity, policy, server_rules};
