//! Container log records (CRI or Docker json-file) to the text `kubectl logs` prints.
//!
//! The decoder is the per-byte hot path, so it works on whole read buffers: one `memchr` per
//! record, one copy of the message into the spool's tail, no allocation. Partial CRI records
//! (`P`) are passed through as they come, exactly as the kubelet does for `kubectl logs`: a line
//! is never held back waiting for its end, so no state but a length counter spans records, and a
//! checkpoint can be taken at any record boundary.
//!
//! Architecture invariant: the decoder never drops a byte silently. Malformed records are kept
//! raw (and counted); bytes beyond the line cap are counted as truncated.
//!
//! One file per format: `cri` and `json` (Docker's json-file); this file holds the record loop
//! both share, the line cap and the state kept across reads.

mod cri;
mod json;

use serde::{Deserialize, Serialize};

pub use cri::parse_cri;

/// Appended once to a line cut at the cap, so a reader sees that something is missing.
pub const TRUNCATION_MARKER: &[u8] = b" [druid-log-agent: line truncated]";

/// The two output streams a container writes. Index into per-stream line state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// `stdout` in the record; also where malformed records go.
    Stdout = 0,
    /// `stderr` in the record.
    Stderr = 1,
}

/// Which on-disk format a file uses; decided by its first record, then fixed for the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// containerd and CRI-O: `<time> <stdout|stderr> <P|F>[:tags] <message>` per line.
    Cri,
    /// Docker's json-file driver: `{"log":"...","stream":"stdout","time":"..."}` per line.
    JsonFile,
}

/// Where a file's decoding stands between reads. Persisted in the checkpoint with the file's
/// offset, because an oversized record may be consumed in several reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDecodeState {
    /// `None` until the first record is seen (`{` means json-file), then fixed for the file.
    pub format: Option<Format>,
    /// Inside a record longer than a read buffer: the rest of it, up to its newline, is message
    /// text for this stream. `ends_line` is whether the record closes the line (`F`, raw).
    pub continuing: Option<Continuation>,
}

/// The rest of an oversized record, still to come in the next read. Persisted in the
/// checkpoint as part of [`FileDecodeState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Continuation {
    /// The [`Stream`] the text belongs to, as its index (0 stdout, 1 stderr).
    pub stream: u8,
    /// Whether the record closes its line at its newline: `F`, or a malformed record kept raw;
    /// `false` for a `P` chunk, whose line goes on in the next record.
    pub ends_line: bool,
}

/// Length of the output line being built on one stream; spans records (P chunks) and files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineState {
    /// Bytes of the line written so far; at `line_max` the rest is dropped and counted.
    pub len: u64,
    /// The line has got its [`TRUNCATION_MARKER`]: one per line, however much is dropped.
    pub truncated: bool,
}

/// Counters the decoder adds to; the caller folds them into the agent's metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DecodeStats {
    /// Input records consumed (one cut across reads counts once).
    pub records: u64,
    /// Output lines completed (newlines written).
    pub lines: u64,
    /// Records not in the file's format, kept raw as lines of their own.
    pub malformed: u64,
    /// Lines cut at `line_max`.
    pub truncated_lines: u64,
    /// Bytes dropped past `line_max`: what a reader of the log does not get.
    pub truncated_bytes: u64,
}

impl DecodeStats {
    /// Adds `o` to these counters, for totals over many calls.
    pub fn add(&mut self, o: &DecodeStats) {
        self.records += o.records;
        self.lines += o.lines;
        self.malformed += o.malformed;
        self.truncated_lines += o.truncated_lines;
        self.truncated_bytes += o.truncated_bytes;
    }
}

/// What the caller knows about the end of the input it passes to [`Decoder::decode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    /// The file may grow: an unterminated last record is left for the next call.
    Growing,
    /// The caller's buffer is full and holds no newline: the record is consumed as far as it
    /// goes and continued in the next call.
    Oversized,
    /// The file will never grow: an unterminated last record is complete as it is.
    Final,
}

/// Decodes records of one container's files into its log text.
#[derive(Debug, Clone, Copy)]
pub struct Decoder {
    line_max: u64,
}

impl Decoder {
    /// `line_max`: the longest output line kept, in bytes; longer lines are cut and marked.
    pub fn new(line_max: usize) -> Self {
        Decoder {
            line_max: line_max.max(1) as u64,
        }
    }

    /// Decodes the complete records at the start of `input`, appending text to `out`, and
    /// returns how many input bytes were consumed. What happens to a trailing record without
    /// its newline depends on `tail`.
    pub fn decode(
        &self,
        file: &mut FileDecodeState,
        lines: &mut [LineState; 2],
        input: &[u8],
        tail: Tail,
        out: &mut Vec<u8>,
        stats: &mut DecodeStats,
    ) -> usize {
        let at_end = tail == Tail::Final;
        let must_progress = tail == Tail::Oversized;
        let mut pos = 0;
        while pos < input.len() {
            let rest = &input[pos..];
            let nl = memchr::memchr(b'\n', rest);
            if let Some(cont) = file.continuing {
                // The tail of an oversized record: message bytes up to the newline.
                let end = nl.unwrap_or(rest.len());
                self.emit(lines, cont.stream as usize, &rest[..end], out, stats);
                match nl {
                    Some(_) => {
                        if cont.ends_line {
                            self.end_line(lines, cont.stream as usize, out, stats);
                        }
                        file.continuing = None;
                        pos += end + 1;
                    }
                    None => {
                        if at_end && cont.ends_line {
                            self.end_line(lines, cont.stream as usize, out, stats);
                        }
                        if at_end {
                            file.continuing = None;
                        }
                        pos += end;
                    }
                }
                continue;
            }
            let (record, consumed, complete) = match nl {
                Some(i) => (&rest[..i], i + 1, true),
                None if at_end || must_progress => (rest, rest.len(), at_end),
                None => break,
            };
            let format = *file.format.get_or_insert(if record.first() == Some(&b'{') {
                Format::JsonFile
            } else {
                Format::Cri
            });
            stats.records += 1;
            match format {
                Format::Cri => self.cri_record(file, lines, record, complete, out, stats),
                Format::JsonFile => self.json_record(file, lines, record, complete, out, stats),
            }
            pos += consumed;
        }
        pos
    }

    /// A record that is not in the file's format: kept as it is, as a line of its own.
    pub(super) fn raw_record(
        &self,
        file: &mut FileDecodeState,
        lines: &mut [LineState; 2],
        record: &[u8],
        complete: bool,
        out: &mut Vec<u8>,
        stats: &mut DecodeStats,
    ) {
        stats.malformed += 1;
        let s = Stream::Stdout as usize;
        self.emit(lines, s, record, out, stats);
        if complete {
            self.end_line(lines, s, out, stats);
        } else {
            file.continuing = Some(Continuation {
                stream: s as u8,
                ends_line: true,
            });
        }
    }

    #[inline]
    pub(super) fn emit(
        &self,
        lines: &mut [LineState; 2],
        stream: usize,
        bytes: &[u8],
        out: &mut Vec<u8>,
        stats: &mut DecodeStats,
    ) {
        let st = &mut lines[stream & 1];
        let room = self.line_max.saturating_sub(st.len) as usize;
        if bytes.len() <= room {
            out.extend_from_slice(bytes);
            st.len += bytes.len() as u64;
        } else {
            out.extend_from_slice(&bytes[..room]);
            st.len = self.line_max;
            stats.truncated_bytes += (bytes.len() - room) as u64;
            if !st.truncated {
                st.truncated = true;
                stats.truncated_lines += 1;
                out.extend_from_slice(TRUNCATION_MARKER);
            }
        }
    }

    #[inline]
    pub(super) fn end_line(
        &self,
        lines: &mut [LineState; 2],
        stream: usize,
        out: &mut Vec<u8>,
        stats: &mut DecodeStats,
    ) {
        out.push(b'\n');
        lines[stream & 1] = LineState::default();
        stats.lines += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(dec: &Decoder, input: &[u8]) -> (Vec<u8>, DecodeStats, usize) {
        let mut f = FileDecodeState::default();
        let mut lines = [LineState::default(); 2];
        let mut out = Vec::new();
        let mut stats = DecodeStats::default();
        let n = dec.decode(
            &mut f,
            &mut lines,
            input,
            Tail::Growing,
            &mut out,
            &mut stats,
        );
        (out, stats, n)
    }

    // Lines as containerd 1.7 writes them, a P/F split included.
    const CRI: &[u8] = b"2024-05-01T10:00:00.123456789Z stdout F 2024-05-01T10:00:00,123 INFO [main] org.apache.druid.cli.CliPeon - Starting up\n\
2024-05-01T10:00:00.223456789Z stderr P first half \n\
2024-05-01T10:00:00.223456790Z stderr F second half\n\
2024-05-01T10:00:00.323456789Z stdout F \n";

    #[test]
    fn cri_sample() {
        let (out, stats, n) = run(&Decoder::new(1 << 20), CRI);
        assert_eq!(n, CRI.len());
        assert_eq!(
            out,
            b"2024-05-01T10:00:00,123 INFO [main] org.apache.druid.cli.CliPeon - Starting up\nfirst half second half\n\n"
        );
        assert_eq!(stats.lines, 3);
        assert_eq!(stats.records, 4);
        assert_eq!(stats.malformed, 0);
    }

    #[test]
    fn json_file_sample() {
        let input = br#"{"log":"2024-05-01 INFO started \u00e9\n","stream":"stdout","time":"2024-05-01T10:00:00.1Z"}
{"log":"partial ","stream":"stderr","time":"2024-05-01T10:00:00.2Z"}
{"log":"end\n","stream":"stderr","time":"2024-05-01T10:00:00.3Z"}
"#;
        let (out, stats, n) = run(&Decoder::new(1 << 20), input);
        assert_eq!(n, input.len());
        assert_eq!(out, "2024-05-01 INFO started é\npartial end\n".as_bytes());
        assert_eq!(stats.malformed, 0);
    }

    #[test]
    fn incomplete_record_waits() {
        let input =
            b"2024-05-01T10:00:00.1Z stdout F done\n2024-05-01T10:00:00.2Z stdout F not yet";
        let (out, _, n) = run(&Decoder::new(1 << 20), input);
        assert_eq!(out, b"done\n");
        assert_eq!(n, 37);
    }

    #[test]
    fn malformed_kept_raw_and_invalid_utf8_passes() {
        let input = b"garbage line \xff\xfe\n2024-05-01T10:00:00.1Z stdout F ok \xc3\x28\n";
        let (out, stats, _) = run(&Decoder::new(1 << 20), input);
        assert_eq!(out, b"garbage line \xff\xfe\nok \xc3\x28\n");
        assert_eq!(stats.malformed, 1);
    }

    #[test]
    fn long_line_is_truncated_once_and_counted() {
        let mut input = Vec::new();
        for _ in 0..4 {
            input.extend_from_slice(b"2024-05-01T10:00:00.1Z stdout P 0123456789\n");
        }
        input.extend_from_slice(b"2024-05-01T10:00:00.1Z stdout F end\n");
        input.extend_from_slice(b"2024-05-01T10:00:00.1Z stdout F next\n");
        let (out, stats, _) = run(&Decoder::new(25), &input);
        let mut want = b"0123456789012345678901234".to_vec();
        want.extend_from_slice(TRUNCATION_MARKER);
        want.extend_from_slice(b"\nnext\n");
        assert_eq!(out, want);
        assert_eq!(stats.truncated_lines, 1);
        assert_eq!(stats.truncated_bytes, 40 + 3 - 25);
    }

    #[test]
    fn oversized_record_is_continued_across_calls() {
        let dec = Decoder::new(1 << 20);
        let mut f = FileDecodeState::default();
        let mut lines = [LineState::default(); 2];
        let mut out = Vec::new();
        let mut st = DecodeStats::default();
        let rec = b"2024-05-01T10:00:00.1Z stderr F aaaaaaaaaabbbbbbbbbb\n";
        let a = dec.decode(
            &mut f,
            &mut lines,
            &rec[..40],
            Tail::Oversized,
            &mut out,
            &mut st,
        );
        assert_eq!(a, 40);
        assert!(f.continuing.is_some());
        let b = dec.decode(
            &mut f,
            &mut lines,
            &rec[40..],
            Tail::Growing,
            &mut out,
            &mut st,
        );
        assert_eq!(a + b, rec.len());
        assert_eq!(out, b"aaaaaaaaaabbbbbbbbbb\n");
        assert!(f.continuing.is_none());
    }

    /// Encodes `line` as CRI records split at the given cut points, as containerd would.
    fn cri_split(line: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut pts: Vec<usize> = cuts.iter().map(|c| c % (line.len() + 1)).collect();
        pts.sort_unstable();
        pts.dedup();
        let mut out = Vec::new();
        let mut start = 0;
        for p in pts.into_iter().filter(|&p| p > 0 && p < line.len()) {
            out.extend_from_slice(b"2024-05-01T10:00:00.000000001Z stdout P ");
            out.extend_from_slice(&line[start..p]);
            out.push(b'\n');
            start = p;
        }
        out.extend_from_slice(b"2024-05-01T10:00:00.000000002Z stdout F ");
        out.extend_from_slice(&line[start..]);
        out.push(b'\n');
        out
    }

    proptest! {
        #[test]
        fn any_p_split_decodes_to_the_same_line(
            line in proptest::collection::vec(any::<u8>().prop_filter("no newline", |b| *b != b'\n'), 0..300),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
            chunk in 1usize..64,
        ) {
            let input = cri_split(&line, &cuts);
            // Feed the bytes in arbitrary small reads, as a tail would.
            let dec = Decoder::new(1 << 20);
            let mut f = FileDecodeState::default();
            let mut lines = [LineState::default(); 2];
            let mut out = Vec::new();
            let mut st = DecodeStats::default();
            let mut pos = 0;
            let mut avail = 0;
            while pos < input.len() {
                avail = (avail + chunk).min(input.len());
                pos += dec.decode(&mut f, &mut lines, &input[pos..avail], Tail::Growing, &mut out, &mut st);
            }
            let mut want = line.clone();
            want.push(b'\n');
            prop_assert_eq!(out, want);
        }

        #[test]
        fn any_bytes_never_panic_and_nothing_vanishes(
            input in proptest::collection::vec(any::<u8>(), 0..600),
            cap in 1usize..100,
        ) {
            let dec = Decoder::new(cap);
            let mut f = FileDecodeState::default();
            let mut lines = [LineState::default(); 2];
            let mut out = Vec::new();
            let mut st = DecodeStats::default();
            let n = dec.decode(&mut f, &mut lines, &input, Tail::Final, &mut out, &mut st);
            prop_assert_eq!(n, input.len());
            // Every line ends; nothing is held back at the end of a file.
            if !input.is_empty() && st.malformed > 0 { prop_assert!(!out.is_empty()); }
        }
    }
}
