//! The test rig of druid-log-agent, a crate of its own so the agent never compiles it: a fake
//! kube-apiserver speaking the real list/watch JSON, a fault-injecting proxy for S3, a moto S3
//! server, the one HTTP client of the tests and tools, and the soak that drives the real agent binary through all of them. Used by the
//! agent's integration tests and by the `soak` and `bench` tools (tools/).

// The soak's summary is one json! literal with many keys.
#![recursion_limit = "256"]

pub mod faultproxy;
pub mod http;
pub mod kubeapi;
pub mod moto;
pub mod overlord;
pub mod soak;
