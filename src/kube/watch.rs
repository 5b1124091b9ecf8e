//! The list+watch of this node's peon pods that fills the [`PodCache`], on the async runtime.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::oneline::OneLine;

use super::KubeConfig;
use super::cache::{PodCache, PodInfo, PodUid};
use super::status::will_not_run_again;

/// The uid of `pod` and what the cache keeps of it; `None` for an object without a uid.
fn info_of(pod: &Pod, annotation: &str, container: &str) -> Option<(PodUid, PodInfo)> {
    let uid = PodUid::from(pod.metadata.uid.clone()?);
    let task_id = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(annotation))
        .cloned();
    Some((
        uid,
        PodInfo {
            task_id,
            finished: will_not_run_again(pod, container),
            deleted_at: None,
        },
    ))
}

/// First and longest pause between two attempts to list and watch again after an error.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// A watch that ran this long after its list was healthy: its failure starts the backoff over.
const WATCH_STABLE: Duration = Duration::from_secs(60);

/// Runs the list+watch until told to stop. After any error (API down, answering 503,
/// watch cut, 410 Gone) the watch is started again from a fresh list, with backoff: the cache
/// is "current" again only once a list completed after the error (kube's watcher would resume
/// from its last resourceVersion without a new list, and say nothing when it succeeds, leaving
/// no moment from which the cache is known to be current).
///
/// Ends when `stop` is cancelled (the last step of the shutdown), closing its connection to
/// the API.
pub async fn watch_pods(
    client: Client,
    cfg: KubeConfig,
    node: String,
    container: String,
    cache: Arc<PodCache>,
    stop: CancellationToken,
) {
    let api: Api<Pod> = Api::all(client);
    let wc = watcher::Config::default()
        .fields(&format!("spec.nodeName={node}"))
        .labels(&cfg.label_selector);
    let keep = cfg.deleted_retention;
    let mut retry = RETRY_FIRST;
    loop {
        let mut listed_at = None;
        let mut stream = watcher::watcher(api.clone(), wc.clone()).boxed();
        let mut relist: Option<HashSet<PodUid>> = None;
        // Deleted pods are forgotten after their retention even if no relist comes.
        let mut prune =
            tokio::time::interval(keep.clamp(Duration::from_secs(1), Duration::from_secs(60)));
        let error = loop {
            let ev = tokio::select! {
                _ = stop.cancelled() => {
                    drop(stream);
                    info!("pod watch stopped");
                    return;
                }
                ev = stream.next() => ev,
                _ = prune.tick() => {
                    let mut pods = cache.pods.write().unwrap_or_else(|e| e.into_inner());
                    let now = Instant::now();
                    pods.retain(|_, i| i.deleted_at.is_none_or(|d| now.duration_since(d) < keep));
                    continue;
                }
            };
            let Some(ev) = ev else {
                break "the watch stream ended".to_owned();
            };
            let mut pods = cache.pods.write().unwrap_or_else(|e| e.into_inner());
            match ev {
                Ok(Event::Apply(pod)) | Ok(Event::InitApply(pod)) => {
                    if let Some((uid, info)) = info_of(&pod, &cfg.task_id_annotation, &container) {
                        if let Some(seen) = &mut relist {
                            seen.insert(uid.clone());
                        }
                        pods.insert(uid, info);
                    }
                }
                Ok(Event::Delete(pod)) => {
                    if let Some((uid, mut info)) =
                        info_of(&pod, &cfg.task_id_annotation, &container)
                    {
                        // Kept (as finished) so the log can be drained and archived.
                        info.finished = true;
                        info.deleted_at = Some(Instant::now());
                        pods.insert(uid, info);
                    }
                }
                Ok(Event::Init) => relist = Some(HashSet::new()),
                Ok(Event::InitDone) => {
                    // Pods missing from a relist were deleted while the watch was down.
                    let seen = relist.take().unwrap_or_default();
                    let now = Instant::now();
                    for (uid, info) in pods.iter_mut() {
                        if !seen.contains(uid) && info.deleted_at.is_none() {
                            info.finished = true;
                            info.deleted_at = Some(now);
                        }
                    }
                    pods.retain(|_, i| i.deleted_at.is_none_or(|d| now.duration_since(d) < keep));
                    cache.set_current(true);
                    listed_at = Some(now);
                    if !cache.synced.swap(true, Ordering::Relaxed) {
                        info!(pods = pods.len(), node = %node, "pod cache synced");
                    } else {
                        info!(pods = pods.len(), "pod list current again");
                    }
                }
                Err(e) => break OneLine(&e).to_string(),
            }
        };
        cache.set_current(false);
        // The backoff starts over only after a watch that held for a while: a watch that
        // fails right after its list (no watch permission, a proxy that cuts watches) must not
        // turn into a relist every half second.
        if listed_at.is_some_and(|t: Instant| t.elapsed() >= WATCH_STABLE) {
            retry = RETRY_FIRST;
        }
        warn!(error = %error, retry_in_ms = retry.as_millis() as u64,
            "pod watch failed; known tasks keep flowing, new pod directories wait until the pod list is current again");
        tokio::select! {
            _ = tokio::time::sleep(retry) => {}
            _ = stop.cancelled() => {
                info!("pod watch stopped");
                return;
            }
        }
        retry = (retry * 2).min(RETRY_MAX);
    }
}
