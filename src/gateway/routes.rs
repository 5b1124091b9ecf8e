//! The gateway's routing table: which node runs which task, and which agent serves which
//! node, from two watches of the Kubernetes API (docs/gateway.md, "Where the code goes").
//!
//! kube-runtime's `watcher` rather than its `reflector`: a reflector's store forgets a pod
//! the moment it is deleted, but a deleted peon's log is still in its node agent's spool for
//! the agents' retention, so the table keeps it (with the time it went) for
//! `pod_retention`. A stale table costs a fallback to the archive, never a wrong answer
//! (an agent that does not have the task says 404), so the watches never block a request:
//! while the API is down the last table serves.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::oneline::OneLine;
use crate::task::TaskId;

/// What the table needs to know to find pods; from the gateway's settings.
#[derive(Debug, Clone)]
pub struct RouteSettings {
    /// Label selector of peon pods, in every namespace.
    pub peon_label_selector: String,
    /// The peon pod annotation holding the exact task id.
    pub task_id_annotation: String,
    /// Label selector of the agents' pods.
    pub agent_label_selector: String,
    /// The agents' namespace.
    pub agent_namespace: String,
    /// Name of the agent container port the gateway calls.
    pub agent_port_name: String,
    /// How long a deleted peon stays mapped to its node.
    pub pod_retention: Duration,
}

/// A peon pod as the table keeps it.
#[derive(Debug, Clone)]
struct Peon {
    task: String,
    /// `spec.nodeName`; `None` while unscheduled.
    node: Option<String>,
    /// `metadata.creationTimestamp`, to prefer the newest pod of a task run twice.
    created: Option<k8s_openapi::jiff::Timestamp>,
    /// When the watch saw it deleted; kept until `pod_retention` has passed.
    deleted_at: Option<Instant>,
}

/// An agent pod as the table keeps it.
#[derive(Debug, Clone)]
struct Agent {
    node: String,
    addr: SocketAddr,
    /// The pod's Ready condition: a restarting or unready agent is still tried, after a
    /// ready one on the same node.
    ready: bool,
    /// Being deleted (a rollout replaces it): tried after one that is not.
    deleting: bool,
}

#[derive(Default)]
struct Tables {
    /// Peon pods by uid.
    peons: HashMap<String, Peon>,
    /// Uids of the peon pods of each task id.
    by_task: HashMap<String, HashSet<String>>,
    /// Agent pods by uid.
    agents: HashMap<String, Agent>,
}

impl Tables {
    fn put_peon(&mut self, uid: String, peon: Peon) {
        if let Some(old) = self.peons.get(&uid)
            && old.task != peon.task
        {
            let old_task = old.task.clone();
            self.unindex(&old_task, &uid);
        }
        self.by_task
            .entry(peon.task.clone())
            .or_default()
            .insert(uid.clone());
        self.peons.insert(uid, peon);
    }

    fn remove_peon(&mut self, uid: &str) {
        if let Some(p) = self.peons.remove(uid) {
            self.unindex(&p.task, uid);
        }
    }

    fn unindex(&mut self, task: &str, uid: &str) {
        if let Some(uids) = self.by_task.get_mut(task) {
            uids.remove(uid);
            if uids.is_empty() {
                self.by_task.remove(task);
            }
        }
    }

    /// Forgets peons deleted longer than `keep` ago.
    fn prune(&mut self, keep: Duration, now: Instant) {
        let old: Vec<String> = self
            .peons
            .iter()
            .filter(|(_, p)| p.deleted_at.is_some_and(|d| now.duration_since(d) >= keep))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in old {
            self.remove_peon(&uid);
        }
    }
}

/// Where a task's log can be asked for: the agent of the node the task's pod ran on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRoute {
    /// The node.
    pub node: String,
    /// The agent's pod IP and `http` port.
    pub addr: SocketAddr,
}

/// The routing table, shared by the two watches (writers) and every request (readers).
#[derive(Default)]
pub struct Routes {
    tables: RwLock<Tables>,
    peons_synced: AtomicBool,
    agents_synced: AtomicBool,
}

impl Routes {
    /// Whether both watches have listed once: before that a known task could be missed.
    pub fn synced(&self) -> bool {
        self.peons_synced.load(Ordering::Relaxed) && self.agents_synced.load(Ordering::Relaxed)
    }

    /// The agent to ask for `task`'s log: the node of the task's newest pod (a live pod before
    /// a deleted one), and on it the agent that is ready and not being replaced, if any.
    /// `None` when the task, its node or an agent there is unknown.
    pub fn agent_for(&self, task: &TaskId) -> Option<AgentRoute> {
        let t = self.tables.read().unwrap_or_else(|e| e.into_inner());
        let node = t
            .by_task
            .get(task.as_str())?
            .iter()
            .filter_map(|uid| t.peons.get(uid))
            .filter(|p| p.node.is_some())
            .max_by_key(|p| (p.deleted_at.is_none(), p.created))?
            .node
            .clone()?;
        let agent = t
            .agents
            .values()
            .filter(|a| a.node == node)
            .max_by_key(|a| (a.ready, !a.deleting, a.addr))?;
        Some(AgentRoute {
            addr: agent.addr,
            node,
        })
    }

    /// How many tasks and agents the table holds, for `/metrics`: a count that stays at 0
    /// says the watches see nothing (wrong selector, namespace or RBAC).
    pub fn counts(&self) -> (usize, usize) {
        let t = self.tables.read().unwrap_or_else(|e| e.into_inner());
        (t.by_task.len(), t.agents.len())
    }
}

/// The task id and node of a peon pod; `None` without a uid or the annotation.
fn peon_of(pod: &Pod, annotation: &str) -> Option<(String, Peon)> {
    let uid = pod.metadata.uid.clone()?;
    let task = pod.metadata.annotations.as_ref()?.get(annotation)?.clone();
    Some((
        uid,
        Peon {
            task,
            node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            created: pod.metadata.creation_timestamp.as_ref().map(|t| t.0),
            deleted_at: None,
        },
    ))
}

/// The address of an agent pod: its IP and the container port named `port_name`; `None`
/// until it has an IP, a node, and a running phase.
fn agent_of(pod: &Pod, port_name: &str) -> Option<(String, Agent)> {
    let uid = pod.metadata.uid.clone()?;
    let spec = pod.spec.as_ref()?;
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") {
        return None;
    }
    let ip: IpAddr = status.pod_ip.as_deref()?.parse().ok()?;
    let port = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(port_name))?
        .container_port;
    let port = u16::try_from(port).ok()?;
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    Some((
        uid,
        Agent {
            node: spec.node_name.clone()?,
            addr: SocketAddr::new(ip, port),
            ready,
            deleting: pod.metadata.deletion_timestamp.is_some(),
        },
    ))
}

/// Which of the two watches: what it selects and how it fills the table.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Peons,
    Agents,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Peons => "peon pods",
            Kind::Agents => "agent pods",
        }
    }
}

/// Runs both watches until `stop` is cancelled.
pub async fn watch(
    client: Client,
    settings: RouteSettings,
    routes: Arc<Routes>,
    stop: CancellationToken,
) {
    let peons = watch_one(
        Kind::Peons,
        Api::all(client.clone()),
        watcher::Config::default().labels(&settings.peon_label_selector),
        settings.clone(),
        routes.clone(),
        stop.clone(),
    );
    let agents = watch_one(
        Kind::Agents,
        Api::namespaced(client, &settings.agent_namespace),
        watcher::Config::default().labels(&settings.agent_label_selector),
        settings,
        routes,
        stop,
    );
    tokio::join!(peons, agents);
}

/// One list+watch into the table. kube's watcher resumes after errors with its default
/// backoff; a relist (its first list, or after a 410) says which pods went while it was away.
async fn watch_one(
    kind: Kind,
    api: Api<Pod>,
    wc: watcher::Config,
    settings: RouteSettings,
    routes: Arc<Routes>,
    stop: CancellationToken,
) {
    let mut stream = watcher::watcher(api, wc).default_backoff().boxed();
    let mut relist: Option<HashSet<String>> = None;
    let keep = settings.pod_retention;
    let mut prune =
        tokio::time::interval(keep.clamp(Duration::from_secs(1), Duration::from_secs(60)));
    let mut failing = false;
    loop {
        let ev = tokio::select! {
            _ = stop.cancelled() => return,
            _ = prune.tick() => {
                let mut t = routes.tables.write().unwrap_or_else(|e| e.into_inner());
                t.prune(keep, Instant::now());
                continue;
            }
            ev = stream.next() => ev,
        };
        let Some(ev) = ev else { return };
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                // The backoff retries; one line per outage, not one per attempt.
                if !failing {
                    warn!(watch = kind.label(), error = %OneLine(&e),
                        "pod watch failed; routing with the last known table until it is back");
                }
                failing = true;
                continue;
            }
        };
        if failing {
            info!(watch = kind.label(), "pod watch back");
            failing = false;
        }
        let mut t = routes.tables.write().unwrap_or_else(|e| e.into_inner());
        match ev {
            Event::Init => relist = Some(HashSet::new()),
            Event::InitApply(pod) | Event::Apply(pod) => {
                let uid = pod.metadata.uid.clone();
                if let (Some(seen), Some(uid)) = (&mut relist, &uid) {
                    seen.insert(uid.clone());
                }
                apply(kind, &settings, &mut t, &pod);
            }
            Event::Delete(pod) => {
                if let Some(uid) = &pod.metadata.uid {
                    delete(kind, &mut t, uid, Instant::now());
                }
            }
            Event::InitDone => {
                // Pods missing from a relist went while the watch was away.
                let seen = relist.take().unwrap_or_default();
                let now = Instant::now();
                let gone: Vec<String> = match kind {
                    Kind::Peons => t
                        .peons
                        .iter()
                        .filter(|(uid, p)| p.deleted_at.is_none() && !seen.contains(*uid))
                        .map(|(uid, _)| uid.clone())
                        .collect(),
                    Kind::Agents => t
                        .agents
                        .keys()
                        .filter(|uid| !seen.contains(*uid))
                        .cloned()
                        .collect(),
                };
                for uid in gone {
                    delete(kind, &mut t, &uid, now);
                }
                let flag = match kind {
                    Kind::Peons => &routes.peons_synced,
                    Kind::Agents => &routes.agents_synced,
                };
                if !flag.swap(true, Ordering::Relaxed) {
                    let n = match kind {
                        Kind::Peons => t.by_task.len(),
                        Kind::Agents => t.agents.len(),
                    };
                    info!(watch = kind.label(), count = n, "pod watch synced");
                }
            }
        }
    }
}

/// A pod added or changed.
fn apply(kind: Kind, settings: &RouteSettings, t: &mut Tables, pod: &Pod) {
    match kind {
        Kind::Peons => {
            if let Some((uid, peon)) = peon_of(pod, &settings.task_id_annotation) {
                t.put_peon(uid, peon);
            }
        }
        Kind::Agents => {
            let Some(uid) = pod.metadata.uid.clone() else {
                return;
            };
            // Not (or no longer) reachable: an agent without an IP or port, or stopped.
            match agent_of(pod, &settings.agent_port_name) {
                Some((_, agent)) => {
                    t.agents.insert(uid, agent);
                }
                None => {
                    t.agents.remove(&uid);
                }
            }
        }
    }
}

/// A pod deleted (or found gone by a relist) at `now`: a peon stays mapped for the
/// retention, an agent is gone at once.
fn delete(kind: Kind, t: &mut Tables, uid: &str, now: Instant) {
    match kind {
        Kind::Peons => {
            if let Some(p) = t.peons.get_mut(uid) {
                p.deleted_at.get_or_insert(now);
            }
        }
        Kind::Agents => {
            t.agents.remove(uid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peon(task: &str, node: &str, created_s: i64, deleted: bool) -> Peon {
        Peon {
            task: task.into(),
            node: Some(node.into()),
            created: Some(k8s_openapi::jiff::Timestamp::from_second(created_s).unwrap()),
            deleted_at: deleted.then(Instant::now),
        }
    }

    fn agent(node: &str, port: u16, ready: bool, deleting: bool) -> Agent {
        Agent {
            node: node.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            ready,
            deleting,
        }
    }

    fn routes(t: Tables) -> Routes {
        Routes {
            tables: RwLock::new(t),
            ..Routes::default()
        }
    }

    fn task(s: &str) -> TaskId {
        TaskId::new(s.to_owned()).unwrap()
    }

    #[test]
    fn a_live_pod_wins_over_a_deleted_one_and_a_ready_agent_over_a_leaving_one() {
        let mut t = Tables::default();
        t.put_peon("u1".into(), peon("t", "a", 10, true));
        t.put_peon("u2".into(), peon("t", "b", 5, false));
        t.agents.insert("x".into(), agent("b", 1, true, true));
        t.agents.insert("y".into(), agent("b", 2, true, false));
        t.agents.insert("z".into(), agent("b", 3, false, false));
        t.agents.insert("w".into(), agent("a", 4, true, false));
        let r = routes(t).agent_for(&task("t")).unwrap();
        assert_eq!((r.node.as_str(), r.addr.port()), ("b", 2));
    }

    #[test]
    fn a_node_without_an_agent_or_an_unknown_task_has_no_route() {
        let mut t = Tables::default();
        t.put_peon("u1".into(), peon("t", "a", 1, false));
        t.agents.insert("w".into(), agent("b", 4, true, false));
        let r = routes(t);
        assert_eq!(r.agent_for(&task("t")), None);
        assert_eq!(r.agent_for(&task("other")), None);
    }

    #[test]
    fn deleted_peons_go_after_the_retention_and_the_index_follows() {
        let mut t = Tables::default();
        t.put_peon("u1".into(), peon("t", "a", 1, true));
        t.put_peon("u2".into(), peon("s", "a", 1, false));
        t.prune(Duration::from_secs(3600), Instant::now());
        assert_eq!(t.peons.len(), 2);
        t.prune(Duration::ZERO, Instant::now());
        assert!(!t.by_task.contains_key("t") && t.by_task.contains_key("s"));
        // A pod whose annotation changed moves in the index.
        t.put_peon("u2".into(), peon("s2", "a", 1, false));
        assert!(!t.by_task.contains_key("s") && t.by_task["s2"].contains("u2"));
    }
}
