//! One sealed block on disk: a gzip member (RFC 1952) whose extra subfield `DL` holds its
//! compressed and uncompressed lengths, so the block index is rebuilt from 24-byte headers.

use flate2::{Compress, Crc, FlushCompress, Status};

pub(super) const HEADER_LEN: usize = 24;
pub(super) const TRAILER_LEN: usize = 8;

/// Builds one gzip member (RFC 1952) holding `raw` into `out`.
pub(super) fn encode_member(compress: &mut Compress, raw: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.resize(HEADER_LEN, 0);
    out.reserve(raw.len() / 2 + 1024);
    compress.reset();
    loop {
        let consumed = compress.total_in() as usize;
        let status = compress
            .compress_vec(&raw[consumed..], out, FlushCompress::Finish)
            .expect("deflate of in-memory buffers cannot fail");
        if status == Status::StreamEnd {
            break;
        }
        out.reserve(out.capacity().max(4096));
    }
    let deflate_len = (out.len() - HEADER_LEN) as u32;
    let mut crc = Crc::new();
    crc.update(raw);
    out.extend_from_slice(&crc.sum().to_le_bytes());
    out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    // ID1 ID2 CM=deflate FLG=FEXTRA MTIME=0 XFL=0 OS=unknown, XLEN=12, subfield "DL" of 8 bytes.
    let hdr: [u8; 16] = [
        0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 255, 12, 0, b'D', b'L', 8, 0,
    ];
    out[..16].copy_from_slice(&hdr);
    out[16..20].copy_from_slice(&deflate_len.to_le_bytes());
    out[20..24].copy_from_slice(&(raw.len() as u32).to_le_bytes());
}

pub(super) fn parse_header(h: &[u8; HEADER_LEN]) -> Option<(u32, u32)> {
    if h[..4] != [0x1f, 0x8b, 8, 4] || h[10..16] != [12, 0, b'D', b'L', 8, 0] {
        return None;
    }
    let d = u32::from_le_bytes(h[16..20].try_into().ok()?);
    let r = u32::from_le_bytes(h[20..24].try_into().ok()?);
    Some((d, r))
}
