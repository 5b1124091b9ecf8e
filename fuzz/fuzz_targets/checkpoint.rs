//! Arbitrary bytes as the checkpoint file.
//!
//! Checked:
//! 1. `checkpoint::load` never panics: the bytes are a state or a clear error (one that tells
//!    the operator what to do, as `main` prints it).
//! 2. A state that loads survives `commit` and `load` unchanged, and is then written the same
//!    way again (what we write, we read back).
//! 3. The decode state it restores is safe to continue from: the decoder may be handed any
//!    `FileDecodeState` and line state a checkpoint holds (a stream number out of range, a line
//!    longer than the cap, a continuation) and must neither panic nor emit an unbounded line.
//!
//! The file round trip (2) goes through a real directory; fsyncs make it slow on a disk, so the
//! directory is `/dev/shm` when there is one (`FUZZ_CHECKPOINT_DIR` overrides it). A run leaves
//! an empty `dla-fuzz-checkpoint-<pid>` directory there.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use druid_log_agent::checkpoint::{self, FILE_NAME};
use druid_log_agent::decode::{DecodeStats, Decoder, TRUNCATION_MARKER, Tail};
use libfuzzer_sys::fuzz_target;

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = std::env::var_os("FUZZ_CHECKPOINT_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let shm = PathBuf::from("/dev/shm");
                if shm.is_dir() {
                    shm
                } else {
                    std::env::temp_dir()
                }
            });
        let d = base.join(format!("dla-fuzz-checkpoint-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let dir = dir();
    let file = dir.join(FILE_NAME);
    std::fs::write(&file, data).unwrap();
    let loaded = checkpoint::load(dir);
    // Leave nothing behind but an empty directory when the run stops.
    std::fs::remove_file(&file).unwrap();
    // `load` is `parse` of the file's bytes.
    let parsed = checkpoint::parse(data);
    assert_eq!(loaded.is_ok(), parsed.is_ok());
    let state = match loaded {
        Ok(s) => s,
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("move it aside"), "unclear error: {msg}");
            return;
        }
    };
    assert_eq!(parsed.unwrap(), state);

    // 2. Round trip through the file.
    checkpoint::commit(dir, &state).unwrap();
    let again = checkpoint::load(dir).unwrap();
    assert_eq!(again, state, "state changed through commit/load");
    let written = std::fs::read(&file).unwrap();
    std::fs::remove_file(&file).unwrap();
    assert_eq!(
        written,
        checkpoint::encode(&again),
        "encoding is not stable"
    );

    // 3. Continue decoding from every restored source state, on the checkpoint's own bytes.
    let cap = 16;
    let dec = Decoder::new(cap);
    for task in &state.tasks {
        for src in &task.sources {
            let mut f = src.decode.clone();
            let mut lines = task.lines;
            let mut out = Vec::new();
            let mut stats = DecodeStats::default();
            let input = &data[..data.len().min(256)];
            for tail in [Tail::Growing, Tail::Oversized, Tail::Final] {
                let used = dec.decode(&mut f, &mut lines, input, tail, &mut out, &mut stats);
                assert!(used <= input.len());
            }
            for seg in out.split(|&b| b == b'\n') {
                assert!(seg.len() <= 2 * (cap + TRUNCATION_MARKER.len()));
            }
        }
    }
});
