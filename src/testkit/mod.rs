//! Test infrastructure shared by the integration tests and the `soak` command: a fake
//! kube-apiserver speaking the real list/watch JSON, a fault-injecting proxy for S3, and a moto
//! S3 server. Not used by the agent itself.

pub mod faultproxy;
pub mod kubeapi;
pub mod moto;
