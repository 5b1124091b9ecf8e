//! The integration tests, in one binary so the agent's library is linked once, not once per
//! file. Each module is one area; `common` holds what they share (the agent process, the node's
//! log tree, HTTP and metric readers).
//!
//! `tests/ingest_races.rs` stays a binary of its own: it lowers the process's file descriptor
//! limit, which would starve the tests that run beside it here.

mod common;

mod architecture;
mod config;
mod e2e;
mod fuzz_regressions;
mod gateway;
mod gateway_cluster;
mod gateway_manifests;
mod http;
mod kube;
mod kubeapi_harness;
mod logs;
mod manifests;
mod monitoring;
mod packaging;
mod s3;
mod shutdown;
mod soak;
mod tail_model;
