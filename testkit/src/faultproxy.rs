//! A loopback TCP proxy in front of an S3-compatible server that injects the failures a real
//! network and a real S3 produce: connection resets, `503 SlowDown`, `500 InternalError`, stalls,
//! and the whole server going away (connections refused, open ones cut) and coming back.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use druid_log_agent::loadgen::Rng;

/// What the proxy does with new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Relay every connection.
    Healthy = 0,
    /// Fail about 6 in 10 connections (reset, SlowDown, 500, or a 3 s stall), relay the rest.
    Faulty = 1,
    /// Not listening: connections are refused and open ones are cut.
    Down = 2,
}

/// Counters of what the proxy did, for reports.
#[derive(Debug, Default)]
pub struct Counts {
    pub relayed: AtomicU64,
    pub resets: AtomicU64,
    pub slow_downs: AtomicU64,
    pub server_errors: AtomicU64,
    pub stalls: AtomicU64,
    pub cut: AtomicU64,
}

impl Counts {
    /// Every injected failure (refused connections are not seen, so not counted).
    pub fn faults(&self) -> u64 {
        [
            &self.resets,
            &self.slow_downs,
            &self.server_errors,
            &self.stalls,
            &self.cut,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }
}

/// The proxy; its thread runs until drop.
pub struct FaultProxy {
    pub addr: SocketAddr,
    mode: Arc<AtomicU8>,
    pub counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

const SLOW_DOWN: &[u8] = b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: 94\r\nConnection: close\r\n\r\n<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>\n\n\n\n";
const INTERNAL: &[u8] = b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\nContent-Length: 96\r\nConnection: close\r\n\r\n<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>\n";

impl FaultProxy {
    /// Listens on 127.0.0.1 (ephemeral port) and relays to `upstream` (`http://host:port` or
    /// `host:port`), starting in `mode`.
    pub fn start(upstream: &str, mode: Mode, seed: u64) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let proxy = FaultProxy {
            addr,
            mode: Arc::new(AtomicU8::new(mode as u8)),
            counts: Arc::new(Counts::default()),
            stop: Arc::new(AtomicBool::new(false)),
            open: Arc::new(Mutex::new(Vec::new())),
        };
        let (m, counts, stop, open) = (
            proxy.mode.clone(),
            proxy.counts.clone(),
            proxy.stop.clone(),
            proxy.open.clone(),
        );
        thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || accept_loop(listener, addr, upstream, m, counts, stop, open, seed))?;
        Ok(proxy)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
        if mode == Mode::Down {
            cut_all(&self.open, &self.counts);
        }
    }

    pub fn mode(&self) -> Mode {
        mode_of(self.mode.load(Ordering::SeqCst))
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        cut_all(&self.open, &self.counts);
    }
}

fn mode_of(v: u8) -> Mode {
    match v {
        0 => Mode::Healthy,
        1 => Mode::Faulty,
        _ => Mode::Down,
    }
}

fn cut_all(open: &Mutex<Vec<TcpStream>>, counts: &Counts) {
    let streams = std::mem::take(&mut *open.lock().unwrap_or_else(|e| e.into_inner()));
    for s in streams {
        if s.shutdown(Shutdown::Both).is_ok() {
            counts.cut.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    upstream: String,
    mode: Arc<AtomicU8>,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    seed: u64,
) {
    let mut rng = Rng::new(seed);
    let mut listener = Some(listener);
    while !stop.load(Ordering::SeqCst) {
        let current = mode_of(mode.load(Ordering::SeqCst));
        if current == Mode::Down {
            // Closing the socket is what makes new connections refused, as with a dead server.
            listener = None;
            thread::sleep(Duration::from_millis(20));
            continue;
        }
        let Some(l) = listener.as_ref() else {
            // std sets SO_REUSEADDR, so the same port can be bound again at once.
            match TcpListener::bind(addr).and_then(|l| l.set_nonblocking(true).map(|_| l)) {
                Ok(l) => listener = Some(l),
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
            continue;
        };
        let client = match l.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(2));
                continue;
            }
            Err(_) => continue,
        };
        let _ = client.set_nonblocking(false);
        let roll = rng.below(10);
        if current == Mode::Faulty && roll < 6 {
            let counts = counts.clone();
            thread::spawn(move || inject(client, roll, &counts));
            continue;
        }
        let Ok(server) = TcpStream::connect(&upstream) else {
            continue;
        };
        counts.relayed.fetch_add(1, Ordering::Relaxed);
        relay(client, server, &open);
    }
}

fn inject(mut client: TcpStream, roll: u64, counts: &Counts) {
    let _ = client.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 4096];
    let _ = client.read(&mut buf);
    let reply: &[u8] = match roll {
        0 | 1 => {
            counts.resets.fetch_add(1, Ordering::Relaxed);
            b""
        }
        2 | 3 => {
            counts.slow_downs.fetch_add(1, Ordering::Relaxed);
            SLOW_DOWN
        }
        4 => {
            counts.server_errors.fetch_add(1, Ordering::Relaxed);
            INTERNAL
        }
        _ => {
            counts.stalls.fetch_add(1, Ordering::Relaxed);
            thread::sleep(Duration::from_secs(3));
            b""
        }
    };
    let _ = client.write_all(reply);
}

fn relay(client: TcpStream, server: TcpStream, open: &Mutex<Vec<TcpStream>>) {
    let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
        client.try_clone(),
        server.try_clone(),
        client.try_clone(),
        server.try_clone(),
    ) else {
        return;
    };
    {
        let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
        // Forget connections that are over so the list stays small.
        open.retain(|s| s.peer_addr().is_ok());
        open.push(c3);
        open.push(s3);
    }
    let (mut c, mut s) = (client, server);
    thread::spawn(move || {
        let _ = std::io::copy(&mut c, &mut s);
        let _ = s.shutdown(Shutdown::Write);
    });
    let (mut c2, mut s2) = (c2, s2);
    thread::spawn(move || {
        let _ = std::io::copy(&mut s2, &mut c2);
        let _ = c2.shutdown(Shutdown::Write);
    });
}
