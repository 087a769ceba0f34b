//! Compression of a RecordBatch v2's records section, with the codecs Kafka defines.
//!
//! Owns: the codec ids (`attributes & 0x07`: 0 none, 1 gzip, 2 snappy, 3 lz4, 4 zstd) and
//! compressing and decompressing a records section in the framings Kafka clients use. Pure Rust
//! (flate2 on miniz_oxide, snap, lz4_flex, ruzstd): the client links no C library. Depends on
//! nothing in ringlog but [`BatchError`]. The broker never calls this: it stores batches as sent.
//!
//! Framings, as clients write them:
//! - gzip: RFC 1952 members (Java's `GZIPOutputStream`, librdkafka); several members read as one.
//! - snappy: the Java client writes and expects xerial framing (magic `\x82SNAPPY\0`, version,
//!   compat, then `[u32 BE length, raw snappy block]*`); librdkafka may write one raw snappy block.
//!   Both are read; xerial (32 KiB blocks) is written, since every client reads it.
//! - lz4: the LZ4 frame format. Written with independent 64 KiB blocks: the Java client refuses
//!   linked blocks.
//! - zstd: one or more zstd frames (skippable frames are skipped).
//!
//! Decompression is bounded, because a small hostile batch can claim an enormous output: the
//! output never grows past the caller's `limit_bytes` (checked while inflating, not trusted from
//! a size field), snappy's stated lengths are checked before anything is allocated, and a zstd
//! frame's window (which the decoder allocates up front) must fit [`ZSTD_WINDOW_BYTES_MAX`] or the
//! limit. lz4 working memory is bounded by the format (4 MiB blocks at most).

use std::fmt;
use std::io::{Read, Write};
use std::str::FromStr;

use thiserror::Error;

use super::{BatchError, COMPRESSION_MASK};

/// Largest zstd window accepted when it exceeds the caller's output limit. A window never needs
/// to be larger than the data, but streaming encoders state one from their level, not the input
/// (zstd-jni at Kafka's default level 3: 2 MiB; level 19: 8 MiB).
pub const ZSTD_WINDOW_BYTES_MAX: u64 = 8 << 20;

const XERIAL_MAGIC: [u8; 8] = [0x82, b'S', b'N', b'A', b'P', b'P', b'Y', 0];
/// Magic, version and compat version: what xerial snappy-java and kafka-python write.
const XERIAL_HEADER_LEN: usize = 16;
const XERIAL_VERSION: i32 = 1;
const XERIAL_COMPAT_VERSION: i32 = 1;
/// snappy-java's default block size, which the Java client uses.
const XERIAL_BLOCK_BYTES: usize = 32 << 10;

const ZSTD_MAGIC: u32 = 0xFD2F_B528;
const ZSTD_SKIPPABLE_MAGIC: std::ops::RangeInclusive<u32> = 0x184D_2A50..=0x184D_2A5F;

/// A batch's compression codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Compression {
    #[default]
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl Compression {
    pub const ALL: [Compression; 5] =
        [Compression::None, Compression::Gzip, Compression::Snappy, Compression::Lz4, Compression::Zstd];

    /// The codec named by a batch's attributes. Ids 5..7 are not defined by Kafka.
    pub fn from_attributes(attributes: i16) -> Result<Compression, BatchError> {
        match attributes & COMPRESSION_MASK {
            0 => Ok(Compression::None),
            1 => Ok(Compression::Gzip),
            2 => Ok(Compression::Snappy),
            3 => Ok(Compression::Lz4),
            4 => Ok(Compression::Zstd),
            codec => Err(BatchError::UnsupportedCompression { codec }),
        }
    }

    /// The value of the attributes' low three bits.
    pub fn id(self) -> i16 {
        match self {
            Compression::None => 0,
            Compression::Gzip => 1,
            Compression::Snappy => 2,
            Compression::Lz4 => 3,
            Compression::Zstd => 4,
        }
    }

    /// The name Kafka's `compression.type` uses.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Compression {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Compression::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| format!("{s:?} is not a compression codec (none, gzip, snappy, lz4 or zstd)"))
    }
}

/// Why a records section could not be compressed or decompressed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CompressionError {
    #[error("{codec}-compressed records section is corrupt: {reason}")]
    Corrupt { codec: Compression, reason: String },
    #[error("{codec}-compressed records section inflates past the limit of {limit_bytes} bytes")]
    TooLarge { codec: Compression, limit_bytes: usize },
    #[error(
        "zstd frame at byte {position} of the records section needs a {window_bytes}-byte window, \
         more than the limit of {limit_bytes} bytes"
    )]
    WindowTooLarge { position: usize, window_bytes: u64, limit_bytes: u64 },
    #[error("{codec} compression failed: {reason}")]
    Encode { codec: Compression, reason: String },
}

fn corrupt(codec: Compression, reason: impl fmt::Display) -> CompressionError {
    CompressionError::Corrupt { codec, reason: reason.to_string() }
}

fn encode_failed(codec: Compression, reason: impl fmt::Display) -> CompressionError {
    CompressionError::Encode { codec, reason: reason.to_string() }
}

/// Decompresses `section` (a batch's records section) into a new buffer of at most
/// `limit_bytes` bytes. `Compression::None` copies.
pub fn decompress(
    codec: Compression,
    section: &[u8],
    limit_bytes: usize,
) -> Result<Vec<u8>, CompressionError> {
    // Most batches inflate a few times over; the buffer grows from there if needed.
    let mut out = Vec::with_capacity(section.len().saturating_mul(4).min(limit_bytes));
    match codec {
        Compression::None => read_bounded(codec, section, limit_bytes, &mut out)?,
        Compression::Gzip => {
            read_bounded(codec, flate2::read::MultiGzDecoder::new(section), limit_bytes, &mut out)?
        }
        Compression::Snappy => snappy_decompress(section, limit_bytes, &mut out)?,
        Compression::Lz4 => {
            let mut decoder = lz4_flex::frame::FrameDecoder::new(section);
            // lz4_flex ends a read at each frame's end mark. Going on while bytes remain reads
            // further frames and makes trailing junk an error instead of ignoring it.
            loop {
                read_bounded(codec, &mut decoder, limit_bytes, &mut out)?;
                if decoder.get_ref().is_empty() {
                    break;
                }
            }
        }
        Compression::Zstd => zstd_decompress(section, limit_bytes, &mut out)?,
    }
    debug_assert!(out.len() <= limit_bytes);
    Ok(out)
}

/// Appends `section` compressed with `codec` to `out`. `Compression::None` copies.
pub fn compress(codec: Compression, section: &[u8], out: &mut Vec<u8>) -> Result<(), CompressionError> {
    match codec {
        Compression::None => out.extend_from_slice(section),
        Compression::Gzip => {
            let mut encoder = flate2::write::GzEncoder::new(out, flate2::Compression::default());
            encoder
                .write_all(section)
                .and_then(|()| encoder.try_finish())
                .map_err(|e| encode_failed(codec, e))?;
        }
        Compression::Snappy => snappy_xerial_compress(section, out)?,
        Compression::Lz4 => {
            let frame = lz4_flex::frame::FrameInfo::new()
                .block_size(lz4_flex::frame::BlockSize::Max64KB)
                .block_mode(lz4_flex::frame::BlockMode::Independent);
            let mut encoder = lz4_flex::frame::FrameEncoder::with_frame_info(frame, out);
            encoder.write_all(section).map_err(|e| encode_failed(codec, e))?;
            encoder.finish().map_err(|e| encode_failed(codec, e))?;
        }
        Compression::Zstd => {
            // The only level ruzstd implements; about zstd's level 1.
            ruzstd::encoding::compress(section, out, ruzstd::encoding::CompressionLevel::Fastest);
        }
    }
    Ok(())
}

/// Reads `reader` to its end into `out`, failing once `out` would pass `limit_bytes`.
fn read_bounded(
    codec: Compression,
    reader: impl Read,
    limit_bytes: usize,
    out: &mut Vec<u8>,
) -> Result<(), CompressionError> {
    let room = limit_bytes.saturating_sub(out.len()) as u64;
    // One byte past the room tells "exactly full" from "too large" without reading further.
    reader.take(room.saturating_add(1)).read_to_end(out).map_err(|e| corrupt(codec, e))?;
    if out.len() > limit_bytes {
        return Err(CompressionError::TooLarge { codec, limit_bytes });
    }
    Ok(())
}

fn snappy_decompress(section: &[u8], limit_bytes: usize, out: &mut Vec<u8>) -> Result<(), CompressionError> {
    if section.len() < XERIAL_HEADER_LEN || section[..XERIAL_MAGIC.len()] != XERIAL_MAGIC {
        return snappy_raw_block(section, 0, limit_bytes, out);
    }
    let mut at = XERIAL_HEADER_LEN;
    while at < section.len() {
        let Some(length) = section.get(at..at + 4) else {
            return Err(corrupt(
                Compression::Snappy,
                format!("xerial block length at byte {at} is truncated"),
            ));
        };
        let length = u32::from_be_bytes([length[0], length[1], length[2], length[3]]) as usize;
        let start = at + 4;
        let Some(block) = start.checked_add(length).and_then(|end| section.get(start..end)) else {
            return Err(corrupt(
                Compression::Snappy,
                format!(
                    "xerial block at byte {at} claims {length} bytes; the section has {} left",
                    section.len() - start
                ),
            ));
        };
        snappy_raw_block(block, start, limit_bytes, out)?;
        at = start + length;
    }
    Ok(())
}

/// Decompresses one raw snappy block starting at byte `position` of the section.
fn snappy_raw_block(
    block: &[u8],
    position: usize,
    limit_bytes: usize,
    out: &mut Vec<u8>,
) -> Result<(), CompressionError> {
    let codec = Compression::Snappy;
    let bad = |e: snap::Error| corrupt(codec, format!("block at byte {position}: {e}"));
    let length = snap::raw::decompress_len(block).map_err(bad)?;
    if length > limit_bytes - out.len() {
        return Err(CompressionError::TooLarge { codec, limit_bytes });
    }
    let start = out.len();
    out.resize(start + length, 0);
    let written = snap::raw::Decoder::new().decompress(block, &mut out[start..]).map_err(bad)?;
    out.truncate(start + written);
    Ok(())
}

fn snappy_xerial_compress(section: &[u8], out: &mut Vec<u8>) -> Result<(), CompressionError> {
    let codec = Compression::Snappy;
    out.extend_from_slice(&XERIAL_MAGIC);
    out.extend_from_slice(&XERIAL_VERSION.to_be_bytes());
    out.extend_from_slice(&XERIAL_COMPAT_VERSION.to_be_bytes());
    let mut encoder = snap::raw::Encoder::new();
    for block in section.chunks(XERIAL_BLOCK_BYTES) {
        let at = out.len();
        out.resize(at + 4 + snap::raw::max_compress_len(block.len()), 0);
        let written = encoder.compress(block, &mut out[at + 4..]).map_err(|e| encode_failed(codec, e))?;
        out.truncate(at + 4 + written);
        // A 32 KiB block compresses to well under 2^31 bytes.
        out[at..at + 4].copy_from_slice(&(written as u32).to_be_bytes());
    }
    Ok(())
}

fn zstd_decompress(section: &[u8], limit_bytes: usize, out: &mut Vec<u8>) -> Result<(), CompressionError> {
    let codec = Compression::Zstd;
    let window_limit_bytes = ZSTD_WINDOW_BYTES_MAX.max(limit_bytes as u64);
    let mut rest = section;
    while !rest.is_empty() {
        let position = section.len() - rest.len();
        let Some(magic) = rest.get(..4) else {
            return Err(corrupt(codec, format!("{} stray bytes at byte {position}", rest.len())));
        };
        let magic = u32::from_le_bytes([magic[0], magic[1], magic[2], magic[3]]);
        if ZSTD_SKIPPABLE_MAGIC.contains(&magic) {
            let skip = rest
                .get(4..8)
                .map(|l| u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize)
                .and_then(|length| length.checked_add(8))
                .filter(|&skip| skip <= rest.len())
                .ok_or_else(|| corrupt(codec, format!("skippable frame at byte {position} is truncated")))?;
            rest = &rest[skip..];
            continue;
        }
        if magic != ZSTD_MAGIC {
            return Err(corrupt(codec, format!("no zstd frame at byte {position} (magic {magic:#010x})")));
        }
        let window_bytes = zstd_window_bytes(rest)
            .ok_or_else(|| corrupt(codec, format!("frame header at byte {position} is truncated")))?;
        if window_bytes > window_limit_bytes {
            return Err(CompressionError::WindowTooLarge {
                position,
                window_bytes,
                limit_bytes: window_limit_bytes,
            });
        }
        let mut source = rest;
        let mut decoder = ruzstd::decoding::StreamingDecoder::new(&mut source)
            .map_err(|e| corrupt(codec, format!("frame at byte {position}: {e}")))?;
        read_bounded(codec, &mut decoder, limit_bytes, out)?;
        let frame = &decoder.decoder;
        if let (Some(stored), Some(computed)) =
            (frame.get_checksum_from_data(), frame.get_calculated_checksum())
        {
            if stored != computed {
                return Err(corrupt(
                    codec,
                    format!("frame at byte {position}: checksum {stored:#010x}, content hashes to {computed:#010x}"),
                ));
            }
        }
        drop(decoder);
        rest = source;
    }
    Ok(())
}

/// The window a zstd frame's header asks for (RFC 8878 §3.1.1.1): from the window descriptor, or,
/// for a single-segment frame, its content size. `None` if the header is cut short.
fn zstd_window_bytes(frame: &[u8]) -> Option<u64> {
    let descriptor = *frame.get(4)?;
    let single_segment = descriptor & 0x20 != 0;
    if !single_segment {
        let window_descriptor = *frame.get(5)?;
        let base = 1u64 << (10 + u32::from(window_descriptor >> 3));
        return Some(base + base / 8 * u64::from(window_descriptor & 0x07));
    }
    let dictionary_id_bytes = [0, 1, 2, 4][usize::from(descriptor & 0x03)];
    let content_size_bytes = [1, 2, 4, 8][usize::from(descriptor >> 6)];
    let start = 5 + dictionary_id_bytes;
    let field = frame.get(start..start + content_size_bytes)?;
    let mut le = [0u8; 8];
    le[..content_size_bytes].copy_from_slice(field);
    let content_size = u64::from_le_bytes(le);
    // A two-byte field stores the size minus 256.
    Some(if content_size_bytes == 2 { content_size + 256 } else { content_size })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compressible and not: a repeated phrase, then bytes from a simple generator.
    fn sample(len: usize) -> Vec<u8> {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        (0..len)
            .map(|i| {
                if i < len / 2 {
                    b"ringlog compresses records "[i % 27]
                } else {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                }
            })
            .collect()
    }

    #[test]
    fn codecs_round_trip() {
        for codec in Compression::ALL {
            for len in [0, 1, 100, XERIAL_BLOCK_BYTES, XERIAL_BLOCK_BYTES + 1, 300_000] {
                let input = sample(len);
                let mut compressed = Vec::new();
                compress(codec, &input, &mut compressed).unwrap();
                let output = decompress(codec, &compressed, len).unwrap();
                assert!(output == input, "{codec} round trip of {len} bytes");
                if len > 0 && codec != Compression::None {
                    let err = decompress(codec, &compressed, len - 1).unwrap_err();
                    assert_eq!(err, CompressionError::TooLarge { codec, limit_bytes: len - 1 }, "{codec}");
                }
            }
        }
    }

    #[test]
    fn names_and_ids() {
        for codec in Compression::ALL {
            assert_eq!(codec.name().parse::<Compression>(), Ok(codec));
            assert_eq!(Compression::from_attributes(codec.id() | 0x18), Ok(codec));
        }
        assert!("brotli".parse::<Compression>().is_err());
        for id in 5..=7 {
            assert_eq!(
                Compression::from_attributes(id),
                Err(BatchError::UnsupportedCompression { codec: id })
            );
        }
    }

    /// A tiny section that claims, or inflates to, far more than the limit must fail before the
    /// memory is spent.
    #[test]
    fn bombs_are_refused() {
        let zeros = vec![0u8; 4 << 20];
        for codec in [Compression::Gzip, Compression::Snappy, Compression::Lz4, Compression::Zstd] {
            let mut compressed = Vec::new();
            compress(codec, &zeros, &mut compressed).unwrap();
            assert!(compressed.len() < zeros.len() / 20, "{codec}: {} bytes", compressed.len());
            assert_eq!(
                decompress(codec, &compressed, 64 << 10),
                Err(CompressionError::TooLarge { codec, limit_bytes: 64 << 10 })
            );
        }
        // Raw snappy stating a 1 GiB output: refused from the length varint, before allocating.
        let claim = [0x80, 0x80, 0x80, 0x80, 0x04, 0x00];
        assert_eq!(
            decompress(Compression::Snappy, &claim, 1 << 20),
            Err(CompressionError::TooLarge { codec: Compression::Snappy, limit_bytes: 1 << 20 })
        );
        // A zstd frame asking for a 1 GiB window (descriptor: exponent 20).
        let mut frame = ZSTD_MAGIC.to_le_bytes().to_vec();
        frame.extend_from_slice(&[0x00, 20 << 3, 0, 0, 0]);
        assert_eq!(
            decompress(Compression::Zstd, &frame, 1 << 20),
            Err(CompressionError::WindowTooLarge {
                position: 0,
                window_bytes: 1 << 30,
                limit_bytes: ZSTD_WINDOW_BYTES_MAX
            })
        );
    }

    #[test]
    fn damaged_sections_are_corrupt_not_panics() {
        let input = sample(50_000);
        for codec in [Compression::Gzip, Compression::Snappy, Compression::Lz4, Compression::Zstd] {
            let mut compressed = Vec::new();
            compress(codec, &input, &mut compressed).unwrap();
            for cut in [0, 3, 10, compressed.len() / 2, compressed.len() - 1] {
                if let Ok(out) = decompress(codec, &compressed[..cut], 1 << 20) {
                    // Only a cut at a block boundary can still decode, and then to a prefix
                    // (lz4_flex takes a frame cut inside its 4-byte end mark as ended; the
                    // batch's crc32c is what guards that).
                    let end_mark_cut = codec == Compression::Lz4 && cut + 4 > compressed.len();
                    assert!(input.starts_with(&out), "{codec} cut at {cut}");
                    assert!(out.len() < input.len() || end_mark_cut, "{codec} cut at {cut}");
                }
            }
            let mut flipped = compressed.clone();
            let middle = flipped.len() / 2;
            flipped[middle] ^= 0x55;
            flipped[middle + 1] ^= 0xaa;
            match decompress(codec, &flipped, 1 << 20) {
                Err(
                    CompressionError::Corrupt { codec: c, .. } | CompressionError::TooLarge { codec: c, .. },
                ) => {
                    assert_eq!(c, codec)
                }
                Err(other) => panic!("{codec}: unexpected {other:?}"),
                // Only gzip carries a checksum of the content as written here; for the others
                // the batch's crc32c is what catches a flip.
                Ok(out) => assert!(codec != Compression::Gzip && out != input, "{codec} missed a flip"),
            }
            let mut trailing = compressed.clone();
            trailing.extend_from_slice(b"junk after the stream");
            assert!(
                matches!(decompress(codec, &trailing, 1 << 20), Err(CompressionError::Corrupt { .. })),
                "{codec} accepted trailing bytes"
            );
        }
        let err = decompress(Compression::Snappy, &[], 100).unwrap_err();
        assert!(matches!(err, CompressionError::Corrupt { codec: Compression::Snappy, .. }), "{err:?}");
    }

    /// librdkafka may send one raw snappy block; several gzip members or zstd frames read as one.
    #[test]
    fn alternative_framings_are_read() {
        let input = sample(70_000);
        let raw = snap::raw::Encoder::new().compress_vec(&input).unwrap();
        assert!(decompress(Compression::Snappy, &raw, 1 << 20).unwrap() == input);

        for codec in [Compression::Gzip, Compression::Zstd, Compression::Lz4] {
            let (first, second) = input.split_at(30_000);
            let mut joined = Vec::new();
            compress(codec, first, &mut joined).unwrap();
            compress(codec, second, &mut joined).unwrap();
            assert!(decompress(codec, &joined, 1 << 20).unwrap() == input, "{codec}");
        }
        let mut skippable = vec![0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3];
        compress(Compression::Zstd, &input, &mut skippable).unwrap();
        assert!(decompress(Compression::Zstd, &skippable, 1 << 20).unwrap() == input);
    }

    #[test]
    fn written_framings_are_what_kafka_clients_expect() {
        let input = sample(100_000);
        let mut snappy = Vec::new();
        compress(Compression::Snappy, &input, &mut snappy).unwrap();
        assert_eq!(&snappy[..8], b"\x82SNAPPY\0");
        assert_eq!(&snappy[8..16], &[0, 0, 0, 1, 0, 0, 0, 1]);

        let mut lz4 = Vec::new();
        compress(Compression::Lz4, &input, &mut lz4).unwrap();
        assert_eq!(&lz4[..4], &[0x04, 0x22, 0x4d, 0x18], "LZ4 frame magic");
        assert_eq!(lz4[4] & 0xc0, 0x40, "frame version 01");
        assert_ne!(lz4[4] & 0x20, 0, "independent blocks");
        assert_eq!(lz4[5] & 0x70, 0x40, "64 KiB blocks");

        let mut gzip = Vec::new();
        compress(Compression::Gzip, &input, &mut gzip).unwrap();
        assert_eq!(&gzip[..3], &[0x1f, 0x8b, 0x08], "gzip member, deflate");

        let mut zstd = Vec::new();
        compress(Compression::Zstd, &input, &mut zstd).unwrap();
        assert_eq!(&zstd[..4], &ZSTD_MAGIC.to_le_bytes());
    }

    proptest::proptest! {
        /// Damage anywhere in a real compressed section: a value (an error, or other bytes),
        /// never a panic, and never more than the limit.
        #[test]
        fn damaged_sections_never_panic(
            codec in 1i16..5,
            len in 0usize..5000,
            flips in proptest::collection::vec((proptest::prelude::any::<usize>(), 1u8..), 1..6),
            cut in proptest::prelude::any::<usize>(),
        ) {
            let codec = Compression::from_attributes(codec).unwrap();
            let mut compressed = Vec::new();
            compress(codec, &sample(len), &mut compressed).unwrap();
            for (at, mask) in flips {
                let at = at % compressed.len();
                compressed[at] ^= mask;
            }
            compressed.truncate(compressed.len() - cut % (compressed.len() / 4 + 1));
            if let Ok(out) = decompress(codec, &compressed, 8 << 10) {
                proptest::prop_assert!(out.len() <= 8 << 10);
            }
        }
    }

    #[test]
    fn zstd_window_from_header() {
        let frame = |bytes: &[u8]| {
            let mut f = ZSTD_MAGIC.to_le_bytes().to_vec();
            f.extend_from_slice(bytes);
            f
        };
        // Window descriptor: exponent 11 (2 MiB base), mantissa 3: 2 MiB + 3 × 256 KiB.
        assert_eq!(zstd_window_bytes(&frame(&[0x00, (11 << 3) | 3])), Some((2 << 20) + 3 * (256 << 10)));
        // Single segment, one-byte content size.
        assert_eq!(zstd_window_bytes(&frame(&[0x20, 200])), Some(200));
        // Single segment, two-byte content size (stored minus 256), one-byte dictionary id.
        assert_eq!(zstd_window_bytes(&frame(&[0x61, 9, 0x00, 0x01])), Some(256 + 256));
        assert_eq!(zstd_window_bytes(&frame(&[0xe0, 1, 2])), None, "eight-byte size cut short");
    }
}
