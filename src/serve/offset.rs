//! Druid's offset rules for task logs: what `offset=N` means, as the overlord and every
//! `TaskLogs` implementation read it, so a reader gets the same bytes from the agent as from
//! Druid's own log storage.

/// Where Druid's `streamTaskLog(taskId, offset)` starts reading a log of `len` bytes: a
/// positive offset inside the log is where to start, a negative one counts from the end, and
/// anything out of range means the whole log.
pub fn druid_start(offset: i64, len: u64) -> u64 {
    if offset > 0 && (offset as u64) < len {
        offset as u64
    } else if offset < 0 && offset.unsigned_abs() < len {
        len - offset.unsigned_abs()
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn druid_offset_rules() {
        let len = 100;
        assert_eq!(druid_start(0, len), 0);
        assert_eq!(druid_start(1, len), 1);
        assert_eq!(druid_start(99, len), 99);
        assert_eq!(druid_start(100, len), 0);
        assert_eq!(druid_start(1000, len), 0);
        assert_eq!(druid_start(-1, len), 99);
        assert_eq!(druid_start(-99, len), 1);
        assert_eq!(druid_start(-100, len), 0);
        assert_eq!(druid_start(i64::MIN, len), 0);
        assert_eq!(druid_start(i64::MAX, len), 0);
        assert_eq!(druid_start(5, 0), 0);
    }
}
