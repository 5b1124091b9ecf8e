//! The fake kube-apiserver of `testkit/src/kubeapi.rs` driven by the real `kube` client over
//! HTTP: `kube::runtime::watcher` list-then-watch, selectors, live events, relist after 410.

use std::io::{Read, Write};
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::Value;

use druid_log_agent_testkit::kubeapi::{
    FakeApi, Outage, PodModel, RestartPolicy, pod, query_params,
};
use k8s_openapi::api::core::v1::{ContainerStateTerminated, ContainerStatus};

const NODE_SELECTOR: &str = "spec.nodeName=node-a";
const PEON_SELECTOR: &str = "druid.k8s.peons=true";
const TASK_ID: &str = "index_kafka_wiki_2024-05-01T00:00:00.000Z:abc";
/// Longest wait for one event; the watcher's default backoff stays well below it here.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

type PodEvents = Pin<Box<dyn Stream<Item = Result<watcher::Event<Pod>, watcher::Error>> + Send>>;

fn peon(name: &str, uid: &str, node: &str, containers: &[(&str, &str)]) -> Value {
    pod(
        "druid",
        name,
        uid,
        node,
        &[("druid.k8s.peons", "true"), ("app", "druid")],
        &[("task.id", TASK_ID)],
        containers,
    )
}

fn other(name: &str, uid: &str, node: &str) -> Value {
    pod(
        "druid",
        name,
        uid,
        node,
        &[("app", "druid")],
        &[],
        &[("main", "running")],
    )
}

async fn client(api: &FakeApi, dir: &Path) -> kube::Client {
    let path = api.write_kubeconfig(dir);
    let kubeconfig = Kubeconfig::read_from(&path).expect("read kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config from kubeconfig");
    assert_eq!(config.cluster_url.to_string(), format!("{}/", api.url()));
    kube::Client::try_from(config).expect("client")
}

/// What the agent runs: all namespaces, this node's peons, default backoff.
fn peon_watcher(client: kube::Client) -> PodEvents {
    let config = watcher::Config::default()
        .fields(NODE_SELECTOR)
        .labels(PEON_SELECTOR);
    watcher(Api::<Pod>::all(client), config)
        .default_backoff()
        .boxed()
}

async fn next(events: &mut PodEvents) -> Result<watcher::Event<Pod>, watcher::Error> {
    tokio::time::timeout(EVENT_TIMEOUT, events.next())
        .await
        .expect("no watcher event within the timeout")
        .expect("watcher stream ended")
}

fn name(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or(""),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

fn describe(event: &watcher::Event<Pod>) -> String {
    match event {
        watcher::Event::Init => "Init".to_owned(),
        watcher::Event::InitApply(pod) => format!("InitApply({})", name(pod)),
        watcher::Event::InitDone => "InitDone".to_owned(),
        watcher::Event::Apply(pod) => format!("Apply({})", name(pod)),
        watcher::Event::Delete(pod) => format!("Delete({})", name(pod)),
    }
}

/// The next `count` events, which must all be successes; returned with their descriptions.
async fn take(events: &mut PodEvents, count: usize) -> (Vec<String>, Vec<watcher::Event<Pod>>) {
    let mut taken = Vec::new();
    for _ in 0..count {
        match next(events).await {
            Ok(event) => taken.push(event),
            Err(err) => panic!("unexpected watcher error after {taken:?}: {err}"),
        }
    }
    (taken.iter().map(describe).collect(), taken)
}

fn event_pod(event: &watcher::Event<Pod>) -> &Pod {
    match event {
        watcher::Event::InitApply(pod)
        | watcher::Event::Apply(pod)
        | watcher::Event::Delete(pod) => pod,
        other => panic!("{} carries no pod", describe(other)),
    }
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|status| status.phase.as_deref())
        .unwrap_or("")
}

#[tokio::test]
async fn watcher_lists_matching_pods_then_streams_changes() {
    let api = FakeApi::start();
    api.apply(peon(
        "peon-a",
        "uid-peon-a",
        "node-a",
        &[("main", "running")],
    ));
    api.apply(other("other-a", "uid-other-a", "node-a"));
    api.apply(peon(
        "peon-b",
        "uid-peon-b",
        "node-b",
        &[("main", "running")],
    ));
    let dir = tempfile::tempdir().unwrap();
    let mut events = peon_watcher(client(&api, dir.path()).await);

    let (seen, _) = take(&mut events, 3).await;
    assert_eq!(seen, ["Init", "InitApply(druid/peon-a)", "InitDone"]);

    // Non-matching changes are filtered out by the server; the matching one comes through.
    api.apply(other("other-a2", "uid-other-a2", "node-a"));
    api.apply(peon(
        "peon-b2",
        "uid-peon-b2",
        "node-b",
        &[("main", "running")],
    ));
    api.apply(peon(
        "peon-a2",
        "uid-peon-a2",
        "node-a",
        &[("main", "running")],
    ));
    let (seen, _) = take(&mut events, 1).await;
    assert_eq!(seen, ["Apply(druid/peon-a2)"]);

    // Replacing is a modification, deleting a deletion.
    api.apply(peon(
        "peon-a2",
        "uid-peon-a2",
        "node-a",
        &[("main", "terminated")],
    ));
    let (seen, taken) = take(&mut events, 1).await;
    assert_eq!(seen, ["Apply(druid/peon-a2)"]);
    assert_eq!(phase(event_pod(&taken[0])), "Succeeded");
    api.delete("uid-peon-a2");
    api.delete("uid-peon-b2");
    api.delete("uid-other-a2");
    let (seen, taken) = take(&mut events, 1).await;
    assert_eq!(seen, ["Delete(druid/peon-a2)"]);
    let deleted = event_pod(&taken[0]);
    assert_eq!(deleted.metadata.uid.as_deref(), Some("uid-peon-a2"));

    // A pod that starts matching the label selector is added, one that stops matching deleted.
    let mut relabelled = other("other-a", "uid-other-a", "node-a");
    relabelled["metadata"]["labels"]["druid.k8s.peons"] = "true".into();
    api.apply(relabelled);
    let (seen, _) = take(&mut events, 1).await;
    assert_eq!(seen, ["Apply(druid/other-a)"]);
    api.apply(other("other-a", "uid-other-a", "node-a"));
    let (seen, taken) = take(&mut events, 1).await;
    assert_eq!(seen, ["Delete(druid/other-a)"]);
    // The deletion carries the last matching state at the new resourceVersion.
    let gone = event_pod(&taken[0]);
    let labels = gone.metadata.labels.as_ref().unwrap();
    assert_eq!(
        labels.get("druid.k8s.peons").map(String::as_str),
        Some("true")
    );
    assert_eq!(
        gone.metadata.resource_version.as_deref(),
        Some(api.resource_version().as_str())
    );
}

#[tokio::test]
async fn annotations_and_container_statuses_round_trip() {
    let api = FakeApi::start();
    api.apply(peon(
        "peon-running",
        "uid-running",
        "node-a",
        &[("main", "running"), ("log-tee", "waiting")],
    ));
    api.apply(peon(
        "peon-done",
        "uid-done",
        "node-a",
        &[("main", "terminated")],
    ));
    let dir = tempfile::tempdir().unwrap();
    let client = client(&api, dir.path()).await;
    let mut events = peon_watcher(client.clone());
    let (seen, taken) = take(&mut events, 4).await;
    assert_eq!(
        seen,
        [
            "Init",
            "InitApply(druid/peon-done)",
            "InitApply(druid/peon-running)",
            "InitDone"
        ]
    );

    let done = event_pod(&taken[1]);
    let running = event_pod(&taken[2]);
    for pod in [done, running] {
        let annotations = pod.metadata.annotations.as_ref().unwrap();
        assert_eq!(
            annotations.get("task.id").map(String::as_str),
            Some(TASK_ID)
        );
        assert_eq!(
            pod.spec.as_ref().unwrap().node_name.as_deref(),
            Some("node-a")
        );
        let rv: u64 = pod
            .metadata
            .resource_version
            .as_deref()
            .unwrap()
            .parse()
            .unwrap();
        assert!(rv > 0);
    }
    assert_eq!(running.metadata.uid.as_deref(), Some("uid-running"));
    // A container not started yet makes the pod Pending (the kubelet's getPhase).
    assert_eq!(phase(running), "Pending");
    assert_eq!(phase(done), "Succeeded");

    let statuses = running
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap();
    assert_eq!(statuses.len(), 2);
    assert_eq!(statuses[0].name, "main");
    assert!(statuses[0].ready);
    let state = statuses[0].state.as_ref().unwrap();
    assert!(state.running.as_ref().unwrap().started_at.is_some());
    assert!(state.waiting.is_none() && state.terminated.is_none());
    assert_eq!(statuses[1].name, "log-tee");
    let waiting = statuses[1]
        .state
        .as_ref()
        .unwrap()
        .waiting
        .as_ref()
        .unwrap();
    assert_eq!(waiting.reason.as_deref(), Some("ContainerCreating"));

    let statuses = done
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap();
    let terminated = statuses[0]
        .state
        .as_ref()
        .unwrap()
        .terminated
        .as_ref()
        .unwrap();
    assert_eq!(terminated.exit_code, 0);
    assert_eq!(terminated.reason.as_deref(), Some("Completed"));
    assert!(terminated.finished_at.is_some());
    assert!(
        statuses[0]
            .container_id
            .as_deref()
            .unwrap()
            .starts_with("containerd://")
    );

    // The same pod through a namespaced GET.
    let fetched = Api::<Pod>::namespaced(client, "druid")
        .get("peon-running")
        .await
        .expect("get pod");
    assert_eq!(&fetched, running);
}

#[tokio::test]
async fn watcher_relists_after_expired_history_and_outage() {
    let api = FakeApi::start();
    api.apply(peon("peon-1", "uid-1", "node-a", &[("main", "running")]));
    api.apply(peon("peon-2", "uid-2", "node-a", &[("main", "running")]));
    let dir = tempfile::tempdir().unwrap();
    let mut events = peon_watcher(client(&api, dir.path()).await);
    let (seen, _) = take(&mut events, 4).await;
    assert_eq!(
        seen,
        [
            "Init",
            "InitApply(druid/peon-1)",
            "InitApply(druid/peon-2)",
            "InitDone"
        ]
    );
    // A live event proves the watch is open before the outage.
    api.apply(peon(
        "peon-2",
        "uid-2",
        "node-a",
        &[("main", "running"), ("tee", "running")],
    ));
    let (seen, _) = take(&mut events, 1).await;
    assert_eq!(seen, ["Apply(druid/peon-2)"]);

    // Down: the watch is cut and the watcher's attempt to resume it is refused.
    api.set_down(true);
    let outage = next(&mut events).await;
    assert!(
        outage.is_err(),
        "expected an error while down, got {outage:?}"
    );

    // Changes the watcher cannot see, then the history it would resume from is gone.
    api.apply(peon("peon-3", "uid-3", "node-a", &[("main", "running")]));
    api.delete("uid-2");
    api.apply(peon("peon-1", "uid-1", "node-a", &[("main", "terminated")]));
    api.expire_history();
    api.set_down(false);

    // Resuming from the old resourceVersion gets 410 Expired, after which the watcher relists.
    let mut expired = None;
    let mut refused = vec![outage.unwrap_err().to_string()];
    loop {
        match next(&mut events).await {
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                expired = Some(status);
            }
            Err(err) => refused.push(err.to_string()), // more refused attempts
            Ok(watcher::Event::Init) => break,
            Ok(other) => panic!("unexpected {} before the relist", describe(&other)),
        }
    }
    eprintln!("errors before the relist: {refused:?}");
    let expired = expired.expect("the watcher saw 410 Expired before relisting");
    assert_eq!(expired.reason, "Expired");
    assert!(
        expired.message.starts_with("too old resource version: "),
        "{}",
        expired.message
    );

    let (seen, taken) = take(&mut events, 3).await;
    assert_eq!(
        seen,
        [
            "InitApply(druid/peon-1)",
            "InitApply(druid/peon-3)",
            "InitDone"
        ]
    );
    assert_eq!(phase(event_pod(&taken[0])), "Succeeded");

    // And it watches again from the relist.
    api.delete("uid-3");
    let (seen, _) = take(&mut events, 1).await;
    assert_eq!(seen, ["Delete(druid/peon-3)"]);
}

#[tokio::test]
async fn request_log_shows_selectors_and_watch_parameters() {
    let api = FakeApi::start();
    api.apply(peon(
        "peon-a",
        "uid-peon-a",
        "node-a",
        &[("main", "running")],
    ));
    let list_version = api.resource_version();
    let dir = tempfile::tempdir().unwrap();
    let mut events = peon_watcher(client(&api, dir.path()).await);
    take(&mut events, 3).await;
    api.apply(peon(
        "peon-a2",
        "uid-peon-a2",
        "node-a",
        &[("main", "running")],
    ));
    let (seen, _) = take(&mut events, 1).await;
    assert_eq!(seen, ["Apply(druid/peon-a2)"]);

    let requests = api.requests();
    let param = |params: &[(String, String)], key: &str| {
        params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    let list = requests
        .iter()
        .find(|target| !target.contains("watch="))
        .expect("a list request");
    assert!(list.starts_with("/api/v1/pods?"), "{list}");
    let params = query_params(list);
    assert_eq!(
        param(&params, "fieldSelector").as_deref(),
        Some(NODE_SELECTOR)
    );
    assert_eq!(
        param(&params, "labelSelector").as_deref(),
        Some(PEON_SELECTOR)
    );
    assert_eq!(param(&params, "limit").as_deref(), Some("500"));

    let watch = requests
        .iter()
        .find(|target| target.contains("watch=true"))
        .expect("a watch request");
    assert!(watch.starts_with("/api/v1/pods?"), "{watch}");
    let params = query_params(watch);
    assert_eq!(
        param(&params, "fieldSelector").as_deref(),
        Some(NODE_SELECTOR)
    );
    assert_eq!(
        param(&params, "labelSelector").as_deref(),
        Some(PEON_SELECTOR)
    );
    assert_eq!(
        param(&params, "allowWatchBookmarks").as_deref(),
        Some("true")
    );
    assert_eq!(param(&params, "resourceVersion"), Some(list_version));
    assert!(param(&params, "timeoutSeconds").is_some());
    assert_eq!(param(&params, "sendInitialEvents"), None);
}

#[tokio::test]
async fn raw_watch_bookmarks_timeout_and_expired() {
    let api = FakeApi::start();
    api.apply(peon(
        "peon-a",
        "uid-peon-a",
        "node-a",
        &[("main", "running")],
    ));
    let dir = tempfile::tempdir().unwrap();
    let pods = Api::<Pod>::all(client(&api, dir.path()).await);
    let start = api.resource_version();

    // A quiet watch gets bookmarks at the current resourceVersion and ends at its timeout.
    let mut stream = pods
        .watch(&WatchParams::default().timeout(2), &start)
        .await
        .expect("watch")
        .boxed();
    let first = tokio::time::timeout(EVENT_TIMEOUT, stream.next())
        .await
        .expect("bookmark in time")
        .expect("stream open")
        .expect("bookmark");
    match first {
        WatchEvent::Bookmark(bookmark) => {
            assert_eq!(bookmark.metadata.resource_version, start);
            assert_eq!(bookmark.types.kind, "Pod");
        }
        other => panic!("expected a bookmark, got {other:?}"),
    }
    let ended = tokio::time::timeout(EVENT_TIMEOUT, async {
        while let Some(event) = stream.next().await {
            assert!(matches!(event, Ok(WatchEvent::Bookmark(_))), "{event:?}");
        }
    })
    .await;
    assert!(ended.is_ok(), "the watch did not end at timeoutSeconds");

    // Without a resourceVersion ("0"), a watch starts with the current state.
    let mut stream = pods
        .watch(&WatchParams::default().disable_bookmarks(), "0")
        .await
        .expect("watch")
        .boxed();
    let first = tokio::time::timeout(EVENT_TIMEOUT, stream.next())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(first, Ok(WatchEvent::Added(ref p)) if p.metadata.name.as_deref() == Some("peon-a"))
    );
    drop(stream);

    // After the history is forgotten, a watch from before gets one 410 ERROR event and ends.
    api.apply(peon(
        "peon-a",
        "uid-peon-a",
        "node-a",
        &[("main", "terminated")],
    ));
    api.expire_history();
    let mut stream = pods
        .watch(&WatchParams::default(), &start)
        .await
        .expect("watch")
        .boxed();
    let first = tokio::time::timeout(EVENT_TIMEOUT, stream.next())
        .await
        .unwrap()
        .unwrap();
    match first {
        Ok(WatchEvent::Error(status)) => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
        }
        other => panic!("expected the 410 error event, got {other:?}"),
    }
    let rest = tokio::time::timeout(EVENT_TIMEOUT, stream.next())
        .await
        .unwrap();
    assert!(
        rest.is_none(),
        "the stream must end after the error: {rest:?}"
    );
    // From the current resourceVersion it is fine.
    let now = api.resource_version();
    let mut stream = pods
        .watch(&WatchParams::default(), &now)
        .await
        .expect("watch")
        .boxed();
    api.delete("uid-peon-a");
    let first = tokio::time::timeout(EVENT_TIMEOUT, stream.next())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(first, Ok(WatchEvent::Deleted(_))), "{first:?}");
}

#[tokio::test]
async fn streaming_list_watcher_and_errors() {
    let api = FakeApi::start();
    api.apply(peon(
        "peon-a",
        "uid-peon-a",
        "node-a",
        &[("main", "running")],
    ));
    api.apply(peon(
        "peon-b",
        "uid-peon-b",
        "node-b",
        &[("main", "running")],
    ));
    let dir = tempfile::tempdir().unwrap();
    let client = client(&api, dir.path()).await;

    // sendInitialEvents=true: initial ADDED events closed by the initial-events-end bookmark.
    let config = watcher::Config::default()
        .fields(NODE_SELECTOR)
        .labels(PEON_SELECTOR)
        .streaming_lists();
    let mut events: PodEvents = watcher(Api::<Pod>::all(client.clone()), config)
        .default_backoff()
        .boxed();
    let (seen, _) = take(&mut events, 3).await;
    assert_eq!(seen, ["Init", "InitApply(druid/peon-a)", "InitDone"]);
    api.delete("uid-peon-a");
    let (seen, _) = take(&mut events, 1).await;
    assert_eq!(seen, ["Delete(druid/peon-a)"]);
    assert!(
        api.requests()
            .iter()
            .any(|t| t.contains("sendInitialEvents=true"))
    );

    // Namespaced list, unsupported field selector, unknown path, 503 while down.
    let druid = Api::<Pod>::namespaced(client.clone(), "druid");
    let listed = druid.list(&Default::default()).await.expect("list");
    assert_eq!(listed.items.len(), 1);
    assert_eq!(
        listed.metadata.resource_version,
        Some(api.resource_version())
    );
    let elsewhere = Api::<Pod>::namespaced(client.clone(), "other");
    assert!(
        elsewhere
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let bad = druid
        .list(&kube::api::ListParams::default().fields("spec.schedulerName=x"))
        .await
        .unwrap_err();
    assert!(
        matches!(bad, kube::Error::Api(ref s) if s.code == 400),
        "{bad:?}"
    );
    let request = hyper::Request::get("/api/v1/nodes")
        .body(Vec::new())
        .unwrap();
    let missing = client.request::<Value>(request).await.unwrap_err();
    assert!(
        matches!(missing, kube::Error::Api(ref s) if s.code == 404 && s.reason == "NotFound"),
        "{missing:?}"
    );
}

/// One raw HTTP/1.1 GET with `Connection: close`: the whole response as text.
fn raw_get(api: &FakeApi, target: &str) -> std::io::Result<String> {
    let mut stream = std::net::TcpStream::connect(api.url().trim_start_matches("http://"))?;
    stream.set_read_timeout(Some(EVENT_TIMEOUT))?;
    write!(
        stream,
        "GET {target} HTTP/1.1\r\nHost: fake\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// From a plain test (no runtime of the caller), with raw HTTP.
#[test]
fn serves_plain_tests_and_resets_while_down() {
    let api = FakeApi::start();
    api.apply(peon(
        "peon-a",
        "uid-peon-a",
        "node-a",
        &[("main", "running")],
    ));
    api.apply(other("other-a", "uid-other-a", "node-a"));
    let get = |target: &str| raw_get(&api, target);
    let response =
        get("/api/v1/namespaces/druid/pods?labelSelector=druid.k8s.peons%3Dtrue").unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let body: Value = serde_json::from_str(response.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["kind"], "PodList");
    assert_eq!(body["metadata"]["resourceVersion"], api.resource_version());
    let items = body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["metadata"]["name"], "peon-a");
    assert!(items[0]["metadata"]["resourceVersion"].is_string());

    let response = get("/api/v1/pods?labelSelector=!druid.k8s.peons,app==druid").unwrap();
    assert!(
        response.contains("\"other-a\"") && !response.contains("\"peon-a\""),
        "{response}"
    );
    // A watch is a chunked stream of JSON lines, ended at timeoutSeconds.
    let version = api.resource_version();
    let response = get(
        "/api/v1/pods?watch=1&resourceVersion=0&timeoutSeconds=1&fieldSelector=spec.nodeName%3Dnode-a",
    )
    .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert!(head.contains("content-type: application/json"), "{head}");
    assert!(
        body.contains(r#"{"object":{"apiVersion":"v1","kind":"Pod""#),
        "{body}"
    );
    assert!(
        body.contains(&format!(r#""resourceVersion":"{version}""#)),
        "{body}"
    );
    assert!(body.ends_with("\r\n0\r\n\r\n"), "{body}");
    let response = get("/apis/apps/v1/deployments").unwrap();
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");

    api.set_down(true);
    // Reset (an error) or, at worst, nothing at all or a 503.
    if let Ok(response) = get("/api/v1/pods") {
        assert!(
            response.is_empty() || response.starts_with("HTTP/1.1 503"),
            "{response}"
        );
    }
    api.set_down(false);
    assert!(get("/api/v1/pods").unwrap().starts_with("HTTP/1.1 200"));
    assert_eq!(
        api.requests().first().map(String::as_str),
        Some("/api/v1/namespaces/druid/pods?labelSelector=druid.k8s.peons%3Dtrue")
    );
}

/// The body of a raw response (not chunked).
fn body_of(response: &str) -> Value {
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {response}"))
}

/// The other outage forms: 503 answers with the apiserver's Status body for lists and watches,
/// and connections refused, then the same port serving again.
#[test]
fn outages_answer_503_or_refuse_connections() {
    let api = FakeApi::start();
    api.apply(peon("peon-a", "uid-a", "node-a", &[("main", "running")]));
    api.set_outage(Some(Outage::Unavailable));
    for target in ["/api/v1/pods", "/api/v1/pods?watch=true&resourceVersion=0"] {
        let response = raw_get(&api, target).unwrap();
        assert!(response.starts_with("HTTP/1.1 503"), "{response}");
        assert!(
            response
                .to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{response}"
        );
        let status = body_of(&response);
        assert_eq!(status["kind"], "Status");
        assert_eq!(status["apiVersion"], "v1");
        assert_eq!(status["status"], "Failure");
        assert_eq!(status["reason"], "ServiceUnavailable");
        assert_eq!(status["code"], 503);
    }

    api.set_outage(Some(Outage::Refused));
    let refused = raw_get(&api, "/api/v1/pods").unwrap_err();
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{refused}"
    );
    api.set_outage(None);
    let response = raw_get(&api, "/api/v1/pods").unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!(body_of(&response)["items"][0]["metadata"]["name"], "peon-a");
}

/// `wait_delivered` returns once a list or watch event with the change was handed to a
/// client, not before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_delivered_follows_what_the_watcher_was_sent() {
    let api = FakeApi::start();
    let created = api.apply(peon("peon-a", "uid-a", "node-a", &[("main", "running")]));
    assert!(!api.wait_delivered(created, Duration::from_millis(200)));
    let dir = tempfile::tempdir().unwrap();
    let mut events = peon_watcher(client(&api, dir.path()).await);
    // The watcher only makes requests while polled: a task drives it, so that this thread
    // can block in wait_delivered.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            if tx.send(event).is_err() {
                return;
            }
        }
    });
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let event = tokio::time::timeout(EVENT_TIMEOUT, rx.recv())
            .await
            .expect("an event")
            .unwrap()
            .expect("no watcher error");
        seen.push(describe(&event));
    }
    assert_eq!(seen, ["Init", "InitApply(druid/peon-a)", "InitDone"]);
    assert!(api.wait_delivered(created, Duration::ZERO), "the list");

    let ended = api.apply(peon("peon-a", "uid-a", "node-a", &[("main", "terminated")]));
    assert!(api.wait_delivered(ended, EVENT_TIMEOUT), "the watch event");
    let event = tokio::time::timeout(EVENT_TIMEOUT, rx.recv())
        .await
        .expect("an event")
        .unwrap()
        .expect("no watcher error");
    assert_eq!(describe(&event), "Apply(druid/peon-a)");
    assert_eq!(phase(event_pod(&event)), "Succeeded");
}

fn as_pod(value: Value) -> Pod {
    serde_json::from_value(value).expect("a Pod as k8s-openapi reads it")
}

fn status_of<'a>(pod: &'a Pod, container: &str) -> &'a ContainerStatus {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == container))
        .unwrap_or_else(|| panic!("no status of {container}"))
}

fn last_terminated(status: &ContainerStatus) -> &ContainerStateTerminated {
    status
        .last_state
        .as_ref()
        .and_then(|state| state.terminated.as_ref())
        .expect("lastState.terminated")
}

/// Whether a model step panics (the kubelet would not take it).
fn refused(step: impl FnOnce()) -> bool {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(step)).is_err()
}

/// A restart as the kubelet reports it, step by step, read through the API types the agent
/// uses: `terminated` with the pod still Running, then `waiting: CrashLoopBackOff` with
/// `lastState.terminated`, then `running` with restartCount + 1 and a new containerID, and the
/// terminal phase only in its own update at the real end.
#[test]
fn kubelet_model_reports_a_restart() {
    let mut m = PodModel::new(
        "druid",
        "peon-r",
        "uid-r",
        "node-a",
        RestartPolicy::OnFailure,
        &["main"],
    );
    let p = as_pod(m.json());
    assert_eq!(phase(&p), "Pending");
    let main = status_of(&p, "main");
    let waiting = main.state.as_ref().unwrap().waiting.as_ref().unwrap();
    assert_eq!(waiting.reason.as_deref(), Some("ContainerCreating"));
    assert!(main.container_id.is_none() && !main.ready);
    assert_eq!(
        p.spec.as_ref().unwrap().restart_policy.as_deref(),
        Some("OnFailure")
    );

    let p = as_pod(m.start("main"));
    assert_eq!(phase(&p), "Running");
    let main = status_of(&p, "main");
    assert!(main.state.as_ref().unwrap().running.is_some());
    assert!(main.ready && main.started == Some(true));
    assert_eq!(main.restart_count, 0);
    let first_id = main.container_id.clone().unwrap();
    assert!(first_id.starts_with("containerd://"), "{first_id}");

    let p = as_pod(m.exit("main", 1, "Error"));
    assert_eq!(
        phase(&p),
        "Running",
        "OnFailure restarts a failed container"
    );
    let main = status_of(&p, "main");
    let terminated = main.state.as_ref().unwrap().terminated.as_ref().unwrap();
    assert_eq!(terminated.exit_code, 1);
    assert_eq!(terminated.reason.as_deref(), Some("Error"));
    assert_eq!(terminated.container_id.as_deref(), Some(first_id.as_str()));
    assert!(terminated.started_at.is_some() && terminated.finished_at.is_some());
    assert_eq!(main.restart_count, 0);
    assert!(!main.ready && main.started == Some(false));
    assert!(main.last_state.as_ref().unwrap().terminated.is_none());

    let p = as_pod(m.back_off("main"));
    assert_eq!(phase(&p), "Running");
    let main = status_of(&p, "main");
    let waiting = main.state.as_ref().unwrap().waiting.as_ref().unwrap();
    assert_eq!(waiting.reason.as_deref(), Some("CrashLoopBackOff"));
    let last = last_terminated(main);
    assert_eq!(last.exit_code, 1);
    assert_eq!(main.container_id.as_deref(), Some(first_id.as_str()));
    assert_eq!(main.restart_count, 0);

    let p = as_pod(m.restart("main"));
    assert_eq!(phase(&p), "Running");
    let main = status_of(&p, "main");
    assert!(main.state.as_ref().unwrap().running.is_some());
    assert_eq!(main.restart_count, 1);
    assert_eq!(m.restart_count("main"), 1);
    let last = last_terminated(main);
    assert_eq!(last.container_id.as_deref(), Some(first_id.as_str()));
    let second_id = main.container_id.clone().unwrap();
    assert_ne!(second_id, first_id);

    // The end: main exits 0, which OnFailure does not restart. The container's state comes
    // first with the phase held, then the terminal phase.
    let p = as_pod(m.exit("main", 0, "Completed"));
    assert_eq!(phase(&p), "Running");
    assert_eq!(m.computed_phase().as_str(), "Succeeded");
    assert!(refused(|| {
        m.clone().restart("main");
    }));
    let p = as_pod(m.finish());
    assert_eq!(phase(&p), "Succeeded");
    let main = status_of(&p, "main");
    assert_eq!(main.restart_count, 1);
    assert_eq!(last_terminated(main).exit_code, 1);
}

/// The phase by restartPolicy, as `getPhase` gives it, and the steps the kubelet never takes.
#[test]
fn kubelet_model_phases_by_restart_policy() {
    let phase_of = |value: Value| value["status"]["phase"].as_str().unwrap().to_owned();
    let new = |policy, containers: &[&str]| {
        PodModel::new("druid", "peon", "uid", "node-a", policy, containers)
    };

    // Never: a failure ends the pod Failed; nothing restarts.
    let mut never = new(RestartPolicy::Never, &["main"]);
    never.start("main");
    assert_eq!(phase_of(never.exit("main", 137, "OOMKilled")), "Running");
    assert!(refused(|| {
        never.clone().restart("main");
    }));
    assert!(refused(|| {
        never.clone().back_off("main");
    }));
    assert_eq!(phase_of(never.finish()), "Failed");

    // A sidecar that keeps running keeps the pod Running after main ended for good.
    let mut sidecar = new(RestartPolicy::OnFailure, &["main", "istio-proxy"]);
    sidecar.start("istio-proxy");
    assert_eq!(phase_of(sidecar.json()), "Pending", "main not started yet");
    sidecar.start("main");
    assert_eq!(phase_of(sidecar.exit("main", 0, "Completed")), "Running");
    assert_eq!(sidecar.computed_phase().as_str(), "Running");
    assert!(refused(|| {
        sidecar.clone().finish();
    }));
    assert!(refused(|| {
        sidecar.clone().restart("main");
    }));

    // Always: even a clean exit is restarted; the phase stays Running until the pod is
    // deleted, then ends Failed after the SIGTERM exit.
    let mut always = new(RestartPolicy::Always, &["main"]);
    always.start("main");
    assert_eq!(phase_of(always.exit("main", 0, "Completed")), "Running");
    assert!(refused(|| {
        always.clone().finish();
    }));
    always.back_off("main");
    always.restart("main");
    let deleting = always.begin_deletion();
    assert!(deleting["metadata"]["deletionTimestamp"].is_string());
    assert_eq!(phase_of(always.exit("main", 143, "Error")), "Running");
    assert!(refused(|| {
        always.clone().restart("main");
    }));
    assert_eq!(phase_of(always.finish()), "Failed");
    assert_eq!(always.restart_count("main"), 1);

    // A container that never ran keeps the pod Pending; one that runs cannot be restarted.
    let mut fresh = new(RestartPolicy::Always, &["main"]);
    assert!(refused(|| {
        fresh.clone().restart("main");
    }));
    fresh.start("main");
    assert!(refused(|| {
        fresh.clone().restart("main");
    }));
    assert!(refused(|| {
        fresh.clone().start("main");
    }));
}
