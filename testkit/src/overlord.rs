//! A fake Druid overlord for the gateway's tests: the two endpoints the gateway calls, on a
//! loopback port; it can be stopped, after which connections are refused.
//!
//! The answers follow Druid's order for `/druid/indexer/v1/task/{id}/...` (its authenticator
//! chain, then `TaskResourceFilter`): no credentials is 401; a task the overlord does not know
//! is 400 "Cannot find any task with id: [id]" whoever asks (the filter looks the task up
//! before it checks the caller's READ on its datasource); a known task without READ is 403.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

/// What the fake overlord answers a log request for `task` by an allowed caller.
pub fn log_of(task: &str) -> String {
    format!("overlord's log of {task}\n")
}

/// The fake overlord's server thread; stopped on drop.
pub struct FakeOverlord {
    addr: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Status requests answered (the gateway's authorization asks).
    pub status_calls: Arc<AtomicU64>,
}

impl FakeOverlord {
    /// Serves on a free loopback port, knowing `tasks`; only callers whose `Authorization`
    /// header is exactly `allowed` have READ on them.
    pub fn start(allowed: &str, tasks: &[&str]) -> FakeOverlord {
        let tasks: Arc<Vec<String>> = Arc::new(tasks.iter().map(|t| t.to_string()).collect());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let status_calls = Arc::new(AtomicU64::new(0));
        let (s, calls, allowed) = (stop.clone(), status_calls.clone(), allowed.to_owned());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (calls, allowed, tasks) = (calls.clone(), allowed.clone(), tasks.clone());
                std::thread::spawn(move || serve(conn, &allowed, &tasks, &calls));
            }
            // The listener is dropped here: from now on connections are refused.
        });
        FakeOverlord {
            addr,
            stop,
            thread: Some(thread),
            status_calls,
        }
    }

    /// The base URL, as the gateway's `overlord_url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes the listening socket and waits until it is closed: the overlord is down.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which sees the flag and drops the listener.
        let _ = TcpStream::connect(&self.addr);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for FakeOverlord {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(conn: TcpStream, allowed: &str, tasks: &[String], status_calls: &AtomicU64) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
    let mut authorization = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("authorization")
        {
            authorization = Some(v.trim().to_owned());
        }
    }

    let path = path.split('?').next().unwrap_or("");
    let task = path
        .strip_prefix("/druid/indexer/v1/task/")
        .and_then(|r| r.rsplit_once('/'));
    if let Some((_, "status")) = task {
        status_calls.fetch_add(1, Ordering::SeqCst);
    }
    let (status, ctype, body) = match task {
        Some((task, what @ ("status" | "log"))) => {
            if authorization.is_none() {
                ("401 Unauthorized", "text/plain", "Unauthorized\n".into())
            } else if !tasks.iter().any(|t| t == task) {
                (
                    "400 Bad Request",
                    "text/plain",
                    format!("Cannot find any task with id: [{task}]"),
                )
            } else if authorization.as_deref() != Some(allowed) {
                forbidden()
            } else if what == "status" {
                (
                    "200 OK",
                    "application/json",
                    format!("{{\"task\":\"{task}\",\"status\":{{\"status\":\"SUCCESS\"}}}}"),
                )
            } else {
                ("200 OK", "text/plain; charset=UTF-8", log_of(task))
            }
        }
        _ => ("404 Not Found", "text/plain", "not found\n".into()),
    };
    let mut conn = conn;
    let _ = write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Druid's answer to a caller without access.
fn forbidden() -> (&'static str, &'static str, String) {
    (
        "403 Forbidden",
        "application/json",
        "{\"Access-Check-Result\":\"Unauthorized\"}".into(),
    )
}
