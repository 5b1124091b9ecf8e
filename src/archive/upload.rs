//! How far an archive upload has got, in S3's multipart terms: the part numbers S3 accepts,
//! the size each part gets, and the parts stored so far.
//!
//! A leaf: the checkpoint stores [`UploadState`] and ingest asks [`PartSizes`] when a whole
//! part is ready, so neither needs the S3 client, and nothing here needs the rest of
//! `archive`. The limits are S3's, which S3-compatible stores share.

use serde::{Deserialize, Serialize};

/// S3 refuses parts under 5 MiB (MiB, not MB), except the last.
pub const MIN_PART: u64 = 5 * 1024 * 1024;
/// S3's largest part: 5 GiB.
pub const MAX_PART: u64 = 5 << 30;
/// S3's largest object: 5 TiB. The part sizes must let a log of this size fit in
/// [`PartNumber::MAX`] parts.
pub const MAX_OBJECT: u64 = 5 << 40;

/// A multipart part number. S3 numbers parts 1 to 10,000 and refuses any other, so a number
/// outside that range cannot be made, and one past the last is a clear error rather than a
/// request S3 refuses on every retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct PartNumber(u16);

impl PartNumber {
    /// The number of an upload's first part.
    pub const FIRST: PartNumber = PartNumber(1);
    /// The highest number S3 accepts; the part sizes must let any log fit (see [`MAX_OBJECT`]).
    pub const MAX: PartNumber = PartNumber(10_000);

    /// `n` if S3 accepts it as a part number.
    pub fn new(n: u32) -> Option<PartNumber> {
        u16::try_from(n)
            .ok()
            .filter(|n| (Self::FIRST.0..=Self::MAX.0).contains(n))
            .map(PartNumber)
    }

    /// The number after this one; `None` after the last S3 accepts.
    pub fn next(self) -> Option<PartNumber> {
        Self::new(u32::from(self.0) + 1)
    }

    /// The number as S3 spells it in requests and responses.
    pub fn get(self) -> u16 {
        self.0
    }
}

/// A part number read back (from a checkpoint) that S3 would refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("part number {0} is not within 1 to 10000")]
pub struct PartNumberOutOfRange(pub u32);

impl TryFrom<u32> for PartNumber {
    type Error = PartNumberOutOfRange;

    fn try_from(n: u32) -> Result<Self, Self::Error> {
        PartNumber::new(n).ok_or(PartNumberOutOfRange(n))
    }
}

impl From<PartNumber> for u32 {
    fn from(n: PartNumber) -> u32 {
        u32::from(n.0)
    }
}

impl std::fmt::Display for PartNumber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// How big each part of a multipart upload is, by part number. A fixed size would cap a log at
/// 10,000 parts (78 GiB with 8 MiB parts); a size that grows with the log keeps small logs in
/// small parts (little to resend after a failure, little waiting on the node) and lets any log
/// up to S3's 5 TiB object limit fit. The size depends on the part number alone, so an upload
/// resumed after a crash cuts the same parts as the one before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartSizes {
    /// The size of the first parts (`part_bytes`).
    base: u64,
    /// Parts of the base size before the first doubling.
    flat: u32,
    /// Parts between two doublings.
    double_every: u32,
}

impl PartSizes {
    /// `base` for parts 1 to 1,000, then twice as much every 500 parts, up to 5 GiB. From
    /// the smallest base (5 MiB) 10,000 parts hold about 24 TiB, well over S3's 5 TiB; logs
    /// under 1,000 base parts (7.8 GiB at the default 8 MiB) never see the growth.
    pub fn new(base: u64) -> PartSizes {
        Self::growing(base, 1_000, 500)
    }

    /// A schedule that grows sooner: `base` for `flat` parts, then doubling every
    /// `double_every` parts. For tests through a real S3, where an upload of 1,000 parts is
    /// too big; the agent itself uses [`PartSizes::new`].
    pub fn growing(base: u64, flat: u32, double_every: u32) -> PartSizes {
        PartSizes {
            base,
            flat,
            double_every: double_every.max(1),
        }
    }

    /// The size of part `n` (the last part of an upload may be shorter).
    pub fn size(&self, n: PartNumber) -> u64 {
        let n = u32::from(n);
        let doublings = n.saturating_sub(self.flat).div_ceil(self.double_every);
        let factor = 1u64.checked_shl(doublings).unwrap_or(u64::MAX);
        self.base.saturating_mul(factor).min(MAX_PART)
    }

    /// Where the next whole part of `upload` ends in the uploaded stream: ingest asks for
    /// parts once this many committed bytes exist. `None` once all 10,000 parts are stored.
    pub fn next_part_end(&self, upload: &UploadState) -> Option<u64> {
        let n = upload.next_part_number()?;
        Some(upload.uploaded().saturating_add(self.size(n)))
    }

    /// The longest log one upload of these sizes holds: the sum over all 10,000 parts.
    pub fn capacity(&self) -> u64 {
        let mut n = Some(PartNumber::FIRST);
        let mut sum = 0u64;
        while let Some(p) = n {
            sum = sum.saturating_add(self.size(p));
            n = p.next();
        }
        sum
    }
}

/// A multipart part already stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    /// S3 part number; parts are numbered without gaps, from 1, in stream order.
    pub number: PartNumber,
    /// The ETag S3 returned for the part; CompleteMultipartUpload needs all of them.
    pub etag: String,
    /// End of the part in the uploaded byte stream; parts are contiguous from 0.
    pub end: u64,
}

/// How far a task's archive has got; lives in the checkpoint so a restart resumes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadState {
    /// S3 multipart upload id; `None` until the upload is created. A restart resumes this upload
    /// rather than starting another (an abandoned one costs storage until it expires).
    pub upload_id: Option<String>,
    /// Parts stored, in order, contiguous from byte 0 of the uploaded stream (the text, or the
    /// spool file itself with `gzip`).
    pub parts: Vec<Part>,
    /// CompleteMultipartUpload was sent; after a crash its success must be checked, not
    /// assumed or repeated blindly.
    #[serde(default)]
    pub completing: bool,
}

impl UploadState {
    /// Bytes of the uploaded stream already stored: text bytes, or spool-file bytes with `gzip`.
    pub fn uploaded(&self) -> u64 {
        self.parts.last().map_or(0, |p| p.end)
    }

    /// The number the next part gets; `None` once S3's last part number is used.
    pub fn next_part_number(&self) -> Option<PartNumber> {
        match self.parts.last() {
            None => Some(PartNumber::FIRST),
            Some(p) => p.number.next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn all_parts() -> impl Iterator<Item = PartNumber> {
        std::iter::successors(Some(PartNumber::FIRST), |n| n.next())
    }

    /// For every base the settings allow: 10,000 parts hold S3's largest object, each part is
    /// one S3 accepts, sizes never shrink, and the first 1,000 are the base size.
    #[test]
    fn part_sizes_fit_the_largest_object_within_s3_limits() {
        assert_eq!(all_parts().count(), 10_000);
        for base in [MIN_PART, 8 * MIB, 64 * MIB, 1 << 30, MAX_PART] {
            let sizes = PartSizes::new(base);
            assert!(
                sizes.capacity() >= MAX_OBJECT,
                "base {base}: {} < 5 TiB",
                sizes.capacity()
            );
            let mut previous = 0;
            for n in all_parts() {
                let size = sizes.size(n);
                assert!(
                    (MIN_PART..=MAX_PART).contains(&size),
                    "base {base}, part {n}"
                );
                assert!(size >= previous, "base {base}: part {n} shrinks");
                if n.get() <= 1_000 {
                    assert_eq!(size, base, "part {n}");
                }
                previous = size;
            }
        }
        // The growth: double at part 1001 and every 500 parts after it.
        let sizes = PartSizes::new(MIN_PART);
        let size = |n| sizes.size(PartNumber::new(n).unwrap());
        assert_eq!(size(1_001), 2 * MIN_PART);
        assert_eq!(size(1_500), 2 * MIN_PART);
        assert_eq!(size(1_501), 4 * MIN_PART);
        assert_eq!(size(10_000), MAX_PART);
    }

    /// Part numbers are 1 to 10,000, also when read back from a checkpoint.
    #[test]
    fn part_numbers_are_those_s3_accepts() {
        assert_eq!(PartNumber::new(0), None);
        assert_eq!(PartNumber::new(1), Some(PartNumber::FIRST));
        assert_eq!(PartNumber::new(10_000), Some(PartNumber::MAX));
        assert_eq!(PartNumber::new(10_001), None);
        assert_eq!(PartNumber::new(u32::MAX), None);
        assert_eq!(PartNumber::MAX.next(), None);
        let part = |n: u32| format!(r#"{{"number":{n},"etag":"e","end":1}}"#);
        assert!(serde_json::from_str::<Part>(&part(0)).is_err());
        assert!(serde_json::from_str::<Part>(&part(10_001)).is_err());
        let p: Part = serde_json::from_str(&part(10_000)).unwrap();
        assert_eq!(p.number, PartNumber::MAX);
        assert_eq!(serde_json::to_string(&p).unwrap(), part(10_000));
    }

    /// Ingest's question "is there a whole part to store?": the next part's end, by its
    /// number; none once every number is used.
    #[test]
    fn next_part_end_follows_the_schedule() {
        let sizes = PartSizes::growing(MIN_PART, 1, 1);
        let mut upload = UploadState::default();
        assert_eq!(sizes.next_part_end(&upload), Some(MIN_PART));
        upload.parts.push(Part {
            number: PartNumber::FIRST,
            etag: "e".into(),
            end: MIN_PART,
        });
        assert_eq!(sizes.next_part_end(&upload), Some(3 * MIN_PART));
        upload.parts = all_parts()
            .map(|number| Part {
                number,
                etag: "e".into(),
                end: u64::from(number.get()) * MIN_PART,
            })
            .collect();
        assert_eq!(sizes.next_part_end(&upload), None);
    }
}
