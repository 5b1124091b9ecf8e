//! An S3 endpoint that answers as AWS answers a caller whose policy lacks `s3:ListBucket`:
//! HeadObject of a missing key gets 403 Forbidden instead of 404 (AWS will not tell such a
//! caller whether the key exists). moto has no bucket policies, so this HTTP relay in front of
//! it turns moto's 404 to a HEAD into AWS's 403; every other answer passes unchanged.
//!
//! One request per connection (`Connection: close` both ways) keeps the relay to plain
//! HTTP/1.1 framing: a request body of `Content-Length` bytes, a response up to EOF.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The relay; its threads end with the test process.
pub struct NoListBucket {
    pub addr: SocketAddr,
    /// HEAD answers turned from 404 into 403, so a test can tell the case was met.
    pub forbidden: Arc<AtomicU64>,
}

impl NoListBucket {
    /// Listens on 127.0.0.1 (ephemeral port) and relays to `upstream` (`http://host:port`).
    pub fn start(upstream: &str) -> NoListBucket {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let forbidden = Arc::new(AtomicU64::new(0));
        let count = forbidden.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (upstream, count) = (upstream.clone(), count.clone());
                std::thread::spawn(move || relay(client, &upstream, &count));
            }
        });
        NoListBucket { addr, forbidden }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Relays one request of a client connection, then closes it.
fn relay(mut client: TcpStream, upstream: &str, forbidden: &AtomicU64) {
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line == "\r\n" {
            break;
        }
        head.push(line.trim_end().to_owned());
    }
    let Some(request_line) = head.first().cloned() else {
        return;
    };
    let method = request_line.split(' ').next().unwrap_or("").to_owned();
    let header = |name: &str| {
        head[1..].iter().find_map(|h| {
            let (k, v) = h.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    assert!(
        header("transfer-encoding").is_none(),
        "the relay handles Content-Length bodies only: {head:?}"
    );
    let len: usize = header("content-length").map_or(0, |v| v.parse().unwrap());
    if header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
        && client.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err()
    {
        return;
    }
    let mut body = vec![0; len];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let mut request = format!("{request_line}\r\n");
    for h in without(&head[1..], &["connection", "expect"]) {
        request.push_str(h);
        request.push_str("\r\n");
    }
    request.push_str("Connection: close\r\n\r\n");
    let Ok(mut server) = TcpStream::connect(upstream) else {
        return;
    };
    let mut response = Vec::new();
    if server.write_all(request.as_bytes()).is_err()
        || server.write_all(&body).is_err()
        || server.read_to_end(&mut response).is_err()
    {
        return;
    }
    let _ = client.write_all(&rewrite(&method, response, forbidden));
}

/// `headers` but those named in `names`.
fn without<'a>(headers: &'a [String], names: &'a [&str]) -> impl Iterator<Item = &'a String> {
    headers.iter().filter(move |h| {
        let name = h.split(':').next().unwrap_or("").trim();
        !names.iter().any(|n| name.eq_ignore_ascii_case(n))
    })
}

/// AWS's answer to a caller without `s3:ListBucket`, with `Connection: close`.
fn rewrite(method: &str, response: Vec<u8>, forbidden: &AtomicU64) -> Vec<u8> {
    let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
        return response;
    };
    let head = String::from_utf8_lossy(&response[..end]).into_owned();
    let lines: Vec<String> = head.split("\r\n").map(str::to_owned).collect();
    let mut status = lines[0].clone();
    if method == "HEAD" && status.split(' ').nth(1) == Some("404") {
        status = "HTTP/1.1 403 Forbidden".into();
        forbidden.fetch_add(1, Ordering::SeqCst);
    }
    let mut out = format!("{status}\r\n");
    for h in without(&lines[1..], &["connection"]) {
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(&response[end + 4..]);
    out
}
