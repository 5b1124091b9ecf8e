//! druid-log-agent: ships Druid peon pod logs from a node's log files to where Druid reads task
//! logs, through a crash-safe compressed spool. See docs/ARCHITECTURE.md for the map.

#![warn(missing_docs)]

pub mod app;
pub mod archive;
pub mod checkpoint;
pub mod config;
pub mod decode;
pub mod demo;
pub mod durable;
pub mod gateway;
pub mod ingest;
pub mod kube;
pub mod loadgen;
pub mod metrics;
pub mod oneline;
pub mod registry;
pub mod serve;
pub mod shutdown;
pub mod spool;
pub mod tail;
pub mod task;
pub mod units;
