//! The native wire protocol: framing, the FlatBuffers schema (`schema/ringlog.fbs`) and its
//! generated code, and error codes.
//!
//! Owns: bytes on the wire. May depend on `record` (batch format) only; shared by the broker and
//! the client, so it must never depend on the broker's runtime.

pub mod frame;

#[allow(
    clippy::all,
    clippy::pedantic,
    unused_imports,
    dead_code,
    deprecated,
    non_camel_case_types,
    mismatched_lifetime_syntaxes,
    unsafe_op_in_unsafe_fn
)]
#[rustfmt::skip]
mod ringlog_generated;

pub use ringlog_generated::ringlog::wire;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// Produce acknowledgement levels, as in Kafka.
pub const ACKS_NONE: i8 = 0;
pub const ACKS_LEADER: i8 = 1;
pub const ACKS_ALL: i8 = -1;

/// ListOffsets sentinels, as in Kafka.
pub const EARLIEST_TIMESTAMP: i64 = -2;
pub const LATEST_TIMESTAMP: i64 = -1;

/// Limits on how deep and wide a header FlatBuffer may be before we look at it.
pub fn verifier_options() -> flatbuffers::VerifierOptions {
    flatbuffers::VerifierOptions {
        max_depth: 16,
        max_tables: 1_000_000,
        max_apparent_size: 1 << 26,
        ignore_missing_null_terminator: false,
    }
}
