//! Framing of the native protocol: `u32 frame_len | u32 header_len | header | payload`.
//!
//! Owns: splitting a byte stream into frames and building frame prefixes. Depends on nothing but
//! `bytes`; shared by the broker and the client. Never trusts a length it has not bounded.

use bytes::{Buf, BytesMut};
use thiserror::Error;

/// Bytes before the header: the frame length and the header length, both big-endian u32.
pub const FRAME_PREFIX_LEN: usize = 8;

/// Why a byte stream cannot be read as frames. Any of these means the stream is out of sync or
/// hostile: the connection is closed after the error is reported.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {frame_bytes} bytes exceeds the limit of {limit_bytes} bytes")]
    TooLarge { frame_bytes: u64, limit_bytes: usize },
    #[error("frame of {frame_bytes} bytes is shorter than its 4-byte header length field")]
    TooShort { frame_bytes: u64 },
    #[error("header length {header_bytes} does not fit in a frame of {frame_bytes} bytes")]
    BadHeaderLength { header_bytes: u64, frame_bytes: u64 },
}

/// One complete frame, split zero-copy out of the receive buffer.
#[derive(Debug)]
pub struct RawFrame {
    pub header: BytesMut,
    pub payload: BytesMut,
}

/// Takes one complete frame off the front of `buf`, or returns `Ok(None)` if more bytes are
/// needed. The length fields are checked against `frame_bytes_max` before anything is buffered
/// for them, so a peer cannot make us allocate more than the limit.
pub fn split_frame(buf: &mut BytesMut, frame_bytes_max: usize) -> Result<Option<RawFrame>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let frame_len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as u64;
    check_frame_len(frame_len, frame_bytes_max)?;
    if buf.len() < 8 {
        return Ok(None);
    }
    let header_len = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) as u64;
    if header_len > frame_len - 4 {
        return Err(FrameError::BadHeaderLength { header_bytes: header_len, frame_bytes: frame_len });
    }
    let total = 4 + frame_len as usize;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    frame.advance(FRAME_PREFIX_LEN);
    let header = frame.split_to(header_len as usize);
    Ok(Some(RawFrame { header, payload: frame }))
}

/// Checks a frame length read from the wire against the limit.
pub fn check_frame_len(frame_len: u64, frame_bytes_max: usize) -> Result<(), FrameError> {
    if frame_len < 4 {
        return Err(FrameError::TooShort { frame_bytes: frame_len });
    }
    if frame_len > frame_bytes_max as u64 {
        return Err(FrameError::TooLarge { frame_bytes: frame_len, limit_bytes: frame_bytes_max });
    }
    Ok(())
}

/// The 8-byte prefix for a frame with the given header and payload sizes.
pub fn frame_prefix(header_len: usize, payload_len: usize) -> [u8; FRAME_PREFIX_LEN] {
    let frame_len = 4 + header_len + payload_len;
    debug_assert!(u32::try_from(frame_len).is_ok(), "frame length overflows u32");
    let mut prefix = [0u8; FRAME_PREFIX_LEN];
    prefix[..4].copy_from_slice(&(frame_len as u32).to_be_bytes());
    prefix[4..].copy_from_slice(&(header_len as u32).to_be_bytes());
    prefix
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(header: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut out = frame_prefix(header.len(), payload.len()).to_vec();
        out.extend_from_slice(header);
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn rejects_oversize_before_buffering() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(split_frame(&mut buf, 1024), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn rejects_header_longer_than_frame() {
        let mut buf = BytesMut::from(&[0, 0, 0, 8, 0, 0, 0, 9, 0, 0, 0, 0][..]);
        assert!(matches!(split_frame(&mut buf, 1024), Err(FrameError::BadHeaderLength { .. })));
    }

    proptest! {
        #[test]
        fn frames_round_trip_in_any_chunking(
            frames in proptest::collection::vec((proptest::collection::vec(any::<u8>(), 0..64),
                                                 proptest::collection::vec(any::<u8>(), 0..300)), 1..8),
            chunk in 1usize..50,
        ) {
            let wire: Vec<u8> = frames.iter().flat_map(|(h, p)| encode(h, p)).collect();
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some(frame) = split_frame(&mut buf, 4096).unwrap() {
                    got.push((frame.header.to_vec(), frame.payload.to_vec()));
                }
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(got, frames);
        }

        #[test]
        fn never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = split_frame(&mut buf, 128) {}
        }
    }
}
