//! Docker's json-file format: `{"log":"...","stream":"stdout","time":"..."}` per line.

use serde::Deserialize;

use super::{DecodeStats, Decoder, FileDecodeState, LineState, Stream};

impl Decoder {
    /// Called once per record from [`Decoder::decode`]'s loop, in another module (so maybe
    /// another codegen unit) since the formats have files of their own: `#[inline]` keeps it
    /// inlinable there.
    #[inline]
    pub(super) fn json_record(
        &self,
        file: &mut FileDecodeState,
        lines: &mut [LineState; 2],
        record: &[u8],
        complete: bool,
        out: &mut Vec<u8>,
        stats: &mut DecodeStats,
    ) {
        #[derive(Deserialize)]
        struct JsonRecord<'a> {
            #[serde(borrow)]
            log: std::borrow::Cow<'a, str>,
            #[serde(default)]
            stream: std::borrow::Cow<'a, str>,
        }
        // An incomplete JSON record cannot be parsed piecewise; it is kept raw instead.
        let parsed = if complete {
            serde_json::from_slice::<JsonRecord>(record).ok()
        } else {
            None
        };
        match parsed {
            Some(r) => {
                let s = if r.stream == "stderr" {
                    Stream::Stderr
                } else {
                    Stream::Stdout
                } as usize;
                let text = r.log.as_bytes();
                match text.strip_suffix(b"\n") {
                    Some(line) => {
                        self.emit(lines, s, line, out, stats);
                        self.end_line(lines, s, out, stats);
                    }
                    None => self.emit(lines, s, text, out, stats),
                }
            }
            None => self.raw_record(file, lines, record, complete, out, stats),
        }
    }
}
