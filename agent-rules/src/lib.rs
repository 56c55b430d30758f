//! The Airlock agent's configuration file and rules, and how a rule matches an action, with no
//! kernel part: the agent (crate agent-user) enforces them, and `airlockctl policy test` reads
//! them on a machine without the agent. The agent re-exports every module here under its own
//! name (`airlock_agent::policy` is [`policy`]).
//!
//! - [`config`]: the TOML configuration (`[agent]`, `[watch]`, `[[rule]]`);
//! - [`policy`]: rule matching and the kernel prefilter tables;
//! - [`argmatch`]: argument patterns, matched as tokens;
//! - [`identity`]: files as the kernel names them, and their SHA-256;
//! - [`server_rules`]: rules sent by the control plane, and their cache on disk;
//! - [`explain`]: what the rules decide for an action given on a command line (the rule
//!   tester behind `airlock-agent --explain` and `airlockctl policy test`);
//! - [`examples`]: a rule's `[[rule.example]]` actions, checked against the whole file.

pub mod argmatch;
pub mod config;
pub mod examples;
pub mod explain;
pub mod identity;
pub mod policy;
pub mod server_rules;
