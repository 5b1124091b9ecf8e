//! Test infrastructure shared by the integration tests and the `soak` command: a fake
//! kube-apiserver speaking the real list/watch JSON, and a fault-injecting proxy for S3. Not
//! used by the agent itself.

pub mod faultproxy;
pub mod kubeapi;
