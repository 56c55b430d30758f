//! The gRPC contract of Airlock (protobuf package `airlock.v1`).
//!
//! `AgentService` is the one long-lived bidirectional stream each node agent keeps with the
//! control plane (or any decider that implements it): the agent says hello, sends the actions it
//! holds and their outcomes; the decider sends decisions and pings back.
//! `EnrollmentService` is how an agent without a credential trades a one-time enrollment token
//! for one.

/// Generated types and services of `airlock.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("airlock.v1");

    /// Encoded file descriptor set, for the gRPC reflection service.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("airlock_descriptor");
}

pub use v1::*;
