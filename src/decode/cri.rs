//! The CRI log format of containerd and CRI-O: `<time> <stdout|stderr> <P|F>[:tags] <message>`
//! per line.

use super::{Continuation, DecodeStats, Decoder, FileDecodeState, LineState, Stream};

impl Decoder {
    /// Called once per record from [`Decoder::decode`]'s loop, in another module (so maybe
    /// another codegen unit) since the formats have files of their own: `#[inline]` keeps it
    /// inlinable there.
    #[inline]
    pub(super) fn cri_record(
        &self,
        file: &mut FileDecodeState,
        lines: &mut [LineState; 2],
        record: &[u8],
        complete: bool,
        out: &mut Vec<u8>,
        stats: &mut DecodeStats,
    ) {
        match parse_cri(record) {
            Some((stream, partial, msg)) => {
                let s = stream as usize;
                self.emit(lines, s, msg, out, stats);
                if complete {
                    if !partial {
                        self.end_line(lines, s, out, stats);
                    }
                } else {
                    file.continuing = Some(Continuation {
                        stream: stream as u8,
                        ends_line: !partial,
                    });
                }
            }
            None => self.raw_record(file, lines, record, complete, out, stats),
        }
    }
}

/// Splits `<time> <stdout|stderr> <P|F>[:tags] <message>`; `None` if the record is not CRI.
/// The timestamp is only checked for shape: parsing it would cost more than the rest of the
/// record and the output does not include it.
#[inline]
pub fn parse_cri(record: &[u8]) -> Option<(Stream, bool, &[u8])> {
    let sp = memchr::memchr(b' ', record)?;
    if sp < 10 || !record[0].is_ascii_digit() {
        return None;
    }
    let rest = &record[sp + 1..];
    let (stream, rest) = if let Some(r) = rest.strip_prefix(b"stdout ") {
        (Stream::Stdout, r)
    } else if let Some(r) = rest.strip_prefix(b"stderr ") {
        (Stream::Stderr, r)
    } else {
        return None;
    };
    let tag_end = memchr::memchr(b' ', rest).unwrap_or(rest.len());
    let tags = &rest[..tag_end];
    let partial = match tags.first() {
        Some(b'P') => true,
        Some(b'F') => false,
        _ => return None,
    };
    if tags.len() > 1 && tags[1] != b':' {
        return None;
    }
    let msg = rest.get(tag_end + 1..).unwrap_or(&[]);
    Some((stream, partial, msg))
}
