//! The Airlock control plane: keeps held requests, lets approvers decide them, and answers the
//! agents. Its modules form four layers; each uses only the layers below it.
//!
//! 1. Front ends:
//!    - [`api`]: the gRPC services, one file each (agents' streams, enrolment, approvals,
//!      audit, agents, policy, tokens);
//!    - [`web`]: the web UI (queue, request pages, history, audit, agents, policy), sessions,
//!      health and metrics;
//!    - [`notify`]: Slack, Teams and webhooks, each channel with its own queue, and Slack's
//!      buttons;
//!    - [`listen`]: the listeners' connection cap and handshake and header deadlines;
//!    - [`server`]: one replica, its services and background work ([`ControlPlane`]); the
//!      binaries `airlock-server` and `airlockctl` are in `src/bin`.
//! 2. Decisions:
//!    - [`decide`]: the one vote path (who may decide what), for every front end;
//!    - [`policy`]: approver groups, quorum and routing;
//!    - [`policy_examples`]: the policy's `[[rule.example]]`s, checked when it loads;
//!    - [`tester`]: `airlockctl policy test`, what an agent rule and this policy decide for
//!      one action (the agent's matching, from crate agent-rules);
//!    - [`auth`]: tokens, local accounts, sessions, OIDC and agent enrolment.
//! 3. [`store`]: one async interface over SQLite or PostgreSQL (requests, votes, grants,
//!    tokens, accounts, agents, audit, deliveries), its migrations, and the change feed that
//!    tells every replica what changed.
//! 4. Shared at the bottom: [`audit`] (the hash chain and its verification), [`checkpoint`]
//!    (signed chain heads), [`types`], [`display`] (agent text made safe to show),
//!    [`credential`] (scopes and token formats), [`config`] (the server file and its limits),
//!    [`metrics`]. (Man pages and completions for the binaries come from crate
//!    airlock-cli-docs.)

// Layer 1: front ends.
pub mod api;
pub mod listen;
pub mod notify;
pub mod server;
pub mod web;

// Layer 2: decisions.
pub mod auth;
pub mod decide;
pub mod policy;
pub mod policy_examples;
pub mod suggest;
pub mod tester;

// Layer 3: the store.
pub mod store;

// Layer 4: shared.
pub mod audit;
pub mod checkpoint;
pub mod config;
pub mod credential;
pub mod display;
pub mod metrics;
pub mod types;

pub use server::{ControlPlane, Tls};

/// Entry points for the fuzz targets in `fuzz/`.
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
