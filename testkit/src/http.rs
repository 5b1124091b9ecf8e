//! The test rig's one HTTP/1.1 client, for the tests, the soak and the bench.
//!
//! Hand-written on purpose, over a plain `TcpStream`: the tests look at what the agent put on
//! the wire (a chunked body that ends properly, a `Connection: close`, a status line sent
//! before a hang), which a full client would hide or retry; hostile-request tests need the
//! target sent exactly as given, which a full client would normalise; and the bench's clients must cost
//! the two shared cores as little as possible. A response that is cut off or malformed is an
//! error, never a panic: the soak reads while it kills the agent.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// One response: status, headers as sent, the body with any chunked framing removed.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// Header names and values, in order, trimmed.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl Reply {
    /// The first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Where a complete response ends in a buffer that holds its start, for clients that keep a
/// connection open: the status, the end offset, and whether the server will close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Complete {
    /// The status code.
    pub status: u16,
    /// The offset just past the response (its last chunk's CRLF, or its `Content-Length`).
    pub end: usize,
    /// The server said `Connection: close`.
    pub close: bool,
}

struct Head {
    status: u16,
    headers: Vec<(String, String)>,
    /// Offset of the body.
    len: usize,
    content_length: Option<usize>,
    chunked: bool,
    close: bool,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(hay, needle)
}

fn head(buf: &[u8]) -> Option<Head> {
    let len = find(buf, b"\r\n\r\n")? + 4;
    let text = std::str::from_utf8(&buf[..len - 4]).ok()?;
    let mut lines = text.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let value = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.to_ascii_lowercase())
    };
    Some(Head {
        status,
        content_length: value("content-length").and_then(|v| v.parse().ok()),
        chunked: value("transfer-encoding").is_some_and(|v| v.contains("chunked")),
        close: value("connection").is_some_and(|v| v == "close"),
        headers,
        len,
    })
}

/// Walks the chunks from `at`; returns the end of the last chunk and, when `out` is given,
/// appends the chunks' data to it. `None` while the body is incomplete or not valid chunking.
fn chunks(buf: &[u8], mut at: usize, mut out: Option<&mut Vec<u8>>) -> Option<usize> {
    loop {
        let eol = at + find(&buf[at..], b"\r\n")?;
        let size = std::str::from_utf8(&buf[at..eol]).ok()?;
        let n = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        let data = eol + 2;
        let end = data.checked_add(n)?.checked_add(2)?;
        if buf.len() < end || &buf[end - 2..end] != b"\r\n" {
            return None;
        }
        if let Some(out) = out.as_deref_mut() {
            out.extend_from_slice(&buf[data..data + n]);
        }
        if n == 0 {
            return Some(end);
        }
        at = end;
    }
}

/// The response at the start of `buf`, if it is all there. A response delimited by the end of
/// the connection (neither a length nor chunks) is never complete here: read to the end and use
/// [`parse`].
pub fn complete(buf: &[u8]) -> Option<Complete> {
    let h = head(buf)?;
    let end = if h.chunked {
        chunks(buf, h.len, None)?
    } else {
        let end = h.len.checked_add(h.content_length?)?;
        (buf.len() >= end).then_some(end)?
    };
    Some(Complete {
        status: h.status,
        end,
        close: h.close,
    })
}

fn invalid(what: &str, raw: &[u8]) -> io::Error {
    let shown = String::from_utf8_lossy(&raw[..raw.len().min(200)]).into_owned();
    io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {shown:?}"))
}

/// A whole response read to the end of its connection. A chunked body must end with its last
/// chunk and a body with a length must have it all: a response cut off is an error.
pub fn parse(raw: &[u8]) -> io::Result<Reply> {
    let h = head(raw).ok_or_else(|| invalid("no complete HTTP head", raw))?;
    let body = if h.chunked {
        let mut body = Vec::new();
        chunks(raw, h.len, Some(&mut body))
            .ok_or_else(|| invalid("chunked body cut off or malformed", raw))?;
        body
    } else if let Some(n) = h.content_length {
        raw.get(h.len..h.len + n)
            .ok_or_else(|| invalid("body shorter than its Content-Length", raw))?
            .to_vec()
    } else {
        raw[h.len..].to_vec()
    };
    Ok(Reply {
        status: h.status,
        headers: h.headers,
        body,
    })
}

/// One GET with `Connection: close`; `extra` are raw header lines (`"Authorization: Bearer x"`).
/// `timeout` bounds each read.
pub fn get(
    addr: &str,
    target: &str,
    extra: &[&str],
    timeout: Option<Duration>,
) -> io::Result<Reply> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(timeout)?;
    let mut req = format!("GET {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for h in extra {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse(&raw)
}

/// How long a [`KeepAlive`] (and a benchmark's one-off request) waits for the next bytes of
/// an answer: a server that stopped answering fails the request rather than hang its caller
/// for good.
pub const IDLE_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// GETs on one kept-alive connection, connecting again when the server closed it.
pub struct KeepAlive {
    addr: String,
    conn: Option<TcpStream>,
    buf: Vec<u8>,
}

impl KeepAlive {
    /// A client of `addr` (`host:port`); connects on the first request.
    pub fn new(addr: &str) -> KeepAlive {
        KeepAlive {
            addr: addr.to_owned(),
            conn: None,
            buf: Vec::with_capacity(16 << 10),
        }
    }

    /// One GET; on a connection the server had closed, tries once more on a new one.
    pub fn get(&mut self, target: &str) -> io::Result<Reply> {
        match self.try_get(target) {
            Ok(r) => Ok(r),
            Err(_) => {
                self.conn = None;
                self.try_get(target)
            }
        }
    }

    fn try_get(&mut self, target: &str) -> io::Result<Reply> {
        let s = match &mut self.conn {
            Some(s) => s,
            None => {
                let s = TcpStream::connect(&self.addr)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(IDLE_READ_TIMEOUT))?;
                self.conn.insert(s)
            }
        };
        write!(s, "GET {target} HTTP/1.1\r\nHost: test\r\n\r\n")?;
        self.buf.clear();
        let done = loop {
            if let Some(c) = complete(&self.buf) {
                break c;
            }
            let at = self.buf.len();
            self.buf.resize(at + (16 << 10), 0);
            let n = s.read(&mut self.buf[at..])?;
            self.buf.truncate(at + n);
            if n == 0 {
                self.conn = None;
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before the response ended",
                ));
            }
        };
        let reply = parse(&self.buf[..done.end]);
        if done.close {
            self.conn = None;
        }
        reply
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_must_end_with_their_last_chunk() {
        let whole = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let r = parse(whole).unwrap();
        assert_eq!((r.status, &r.body[..]), (200, &b"abcde"[..]));
        assert_eq!(complete(whole).map(|c| c.end), Some(whole.len()));
        for cut in [whole.len() - 1, whole.len() - 5, 60] {
            assert!(parse(&whole[..cut]).is_err(), "cut at {cut}");
            assert_eq!(complete(&whole[..cut]), None, "cut at {cut}");
        }
    }

    #[test]
    fn lengths_and_close_delimited_bodies() {
        let r = b"HTTP/1.1 404 Not Found\r\ncontent-length: 4\r\nConnection: close\r\n\r\nnope";
        assert_eq!(parse(r).unwrap().body, b"nope");
        assert_eq!(
            complete(r),
            Some(Complete {
                status: 404,
                end: r.len(),
                close: true
            })
        );
        assert!(parse(&r[..r.len() - 1]).is_err());
        let open = b"HTTP/1.1 200 OK\r\n\r\nall of it";
        assert_eq!(parse(open).unwrap().body, b"all of it");
        assert_eq!(complete(open), None);
        assert!(parse(b"garbage").is_err());
    }
}
