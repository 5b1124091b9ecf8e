//! When a container's log is over: the kubelet's status rules for "will not run again".

use k8s_openapi::api::core::v1::Pod;

/// Whether the log container of `pod` has ended for good, so its files will not grow.
///
/// The kubelet reports a container that exited as `state.terminated` whether or not it is about
/// to restart it: during a restart the status shows `terminated` (phase still `Running`), then
/// `waiting` (CrashLoopBackOff), then `running` with `restartCount + 1` and a new `<n>.log`.
/// So `terminated` alone means nothing; it is final only when no restart can follow: the phase is
/// terminal (`Succeeded`/`Failed`: no container of the pod will run again), or the pod's
/// `restartPolicy` rules a restart out (`Never`; `OnFailure` after exit code 0). A sidecar can
/// keep the phase `Running` long after `main` ended for good, hence the second rule.
pub(super) fn will_not_run_again(pod: &Pod, container: &str) -> bool {
    let Some(status) = pod.status.as_ref() else {
        return false;
    };
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return true;
    }
    let Some(exit_code) = status
        .container_statuses
        .as_ref()
        .and_then(|cs| cs.iter().find(|c| c.name == container))
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref())
        .map(|t| t.exit_code)
    else {
        return false;
    };
    // The API's default; an unknown future value is treated like Always (keep following).
    let policy = pod
        .spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref())
        .unwrap_or("Always");
    match policy {
        "Never" => true,
        "OnFailure" => exit_code == 0,
        _ => false,
    }
}
