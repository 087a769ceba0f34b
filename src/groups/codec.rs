//! The records of `__consumer_offsets`: keys and values of committed offsets and group metadata.
//!
//! Owns: the binary layout of those records (big-endian, length-prefixed strings, a version
//! field first in every key and value so the layout can evolve). A null value is a tombstone.
//! Pure code: no IO, no glommio; decoding is bounded by the bytes present and never panics.

use thiserror::Error;

/// Key version 1: a committed offset (group, topic, partition).
const KEY_OFFSET: u16 = 1;
/// Key version 2: a group's metadata (group).
const KEY_GROUP: u16 = 2;
const OFFSET_VALUE_VERSION: u16 = 0;
/// Group value version 0: members without what a live member needs (read, never written now).
const GROUP_VALUE_V0: u16 = 0;
/// Group value version 1: each member also carries its host, its metadata for the chosen
/// protocol, how it is assigned and a Kafka leader's assignment bytes, so a coordinator that
/// loads the record can keep the members as they were.
const GROUP_VALUE_VERSION: u16 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CodecError {
    #[error("{what}: needs {needed} more bytes at byte {position}, {available} left")]
    Truncated { what: &'static str, position: usize, needed: usize, available: usize },
    #[error("{what}: unknown version {version}")]
    UnknownVersion { what: &'static str, version: u16 },
    #[error("{what}: a string at byte {position} is not UTF-8")]
    NotUtf8 { what: &'static str, position: usize },
    #[error("{what}: byte {position} is {value}, where only 0 or 1 may stand")]
    BadFlag { what: &'static str, position: usize, value: u8 },
    #[error("{what}: {extra} bytes left after the last field")]
    TrailingBytes { what: &'static str, extra: usize },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordKey {
    Offset { group: String, topic: String, partition: u32 },
    Group { group: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetValue {
    pub offset: i64,
    pub metadata: String,
    pub commit_timestamp_ms: i64,
}

/// One member as recorded with its group's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemberRecord {
    pub member_id: String,
    pub client_id: String,
    pub session_timeout_ms: u32,
    pub rebalance_timeout_ms: u32,
    pub topics: Vec<String>,
    pub assignment: Vec<(String, Vec<u32>)>,
    pub user_data: Vec<u8>,
    /// Since version 1.
    pub client_host: String,
    /// The member's metadata for the group's protocol (a Kafka client's subscription). Since
    /// version 1.
    pub metadata: Vec<u8>,
    /// Whether the coordinator assigns this member's partitions. Since version 1.
    pub server_assignment: bool,
    /// A Kafka leader's opaque assignment for this member. Since version 1.
    pub assignment_bytes: Option<Vec<u8>>,
}

/// What a group looked like after a rebalance finished or its last member went.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupValue {
    pub protocol_type: String,
    pub protocol: String,
    pub generation: i32,
    pub leader: String,
    /// When this state began (the group became Stable or Empty).
    pub state_timestamp_ms: i64,
    pub members: Vec<MemberRecord>,
    /// The members carry everything a live member needs (version 1 on): a coordinator loading
    /// the record may keep them. Version 0 records bring back the group without its members.
    pub members_complete: bool,
}

impl RecordKey {
    pub fn group(&self) -> &str {
        match self {
            RecordKey::Offset { group, .. } | RecordKey::Group { group } => group,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            RecordKey::Offset { group, topic, partition } => {
                w.u16(KEY_OFFSET);
                w.str(group);
                w.str(topic);
                w.u32(*partition);
            }
            RecordKey::Group { group } => {
                w.u16(KEY_GROUP);
                w.str(group);
            }
        }
        w.0
    }

    pub fn decode(bytes: &[u8]) -> Result<RecordKey, CodecError> {
        let mut r = Reader::new("record key", bytes);
        let key = match r.u16()? {
            KEY_OFFSET => RecordKey::Offset { group: r.str()?, topic: r.str()?, partition: r.u32()? },
            KEY_GROUP => RecordKey::Group { group: r.str()? },
            version => return Err(CodecError::UnknownVersion { what: "record key", version }),
        };
        r.finish()?;
        Ok(key)
    }
}

impl OffsetValue {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u16(OFFSET_VALUE_VERSION);
        w.i64(self.offset);
        w.str(&self.metadata);
        w.i64(self.commit_timestamp_ms);
        w.0
    }

    pub fn decode(bytes: &[u8]) -> Result<OffsetValue, CodecError> {
        let mut r = Reader::new("offset value", bytes);
        match r.u16()? {
            OFFSET_VALUE_VERSION => {}
            version => return Err(CodecError::UnknownVersion { what: "offset value", version }),
        }
        let value = OffsetValue { offset: r.i64()?, metadata: r.str()?, commit_timestamp_ms: r.i64()? };
        r.finish()?;
        Ok(value)
    }
}

impl GroupValue {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u16(GROUP_VALUE_VERSION);
        w.str(&self.protocol_type);
        w.str(&self.protocol);
        w.i32(self.generation);
        w.str(&self.leader);
        w.i64(self.state_timestamp_ms);
        w.u32(self.members.len() as u32);
        for m in &self.members {
            w.str(&m.member_id);
            w.str(&m.client_id);
            w.u32(m.session_timeout_ms);
            w.u32(m.rebalance_timeout_ms);
            w.u32(m.topics.len() as u32);
            for t in &m.topics {
                w.str(t);
            }
            w.u32(m.assignment.len() as u32);
            for (topic, partitions) in &m.assignment {
                w.str(topic);
                w.u32(partitions.len() as u32);
                for p in partitions {
                    w.u32(*p);
                }
            }
            w.bytes(&m.user_data);
            w.str(&m.client_host);
            w.bytes(&m.metadata);
            w.u8(u8::from(m.server_assignment));
            match &m.assignment_bytes {
                Some(bytes) => {
                    w.u8(1);
                    w.bytes(bytes);
                }
                None => w.u8(0),
            }
        }
        w.0
    }

    pub fn decode(bytes: &[u8]) -> Result<GroupValue, CodecError> {
        let mut r = Reader::new("group value", bytes);
        let version = match r.u16()? {
            version @ (GROUP_VALUE_V0 | GROUP_VALUE_VERSION) => version,
            version => return Err(CodecError::UnknownVersion { what: "group value", version }),
        };
        let mut value = GroupValue {
            protocol_type: r.str()?,
            protocol: r.str()?,
            generation: r.i32()?,
            leader: r.str()?,
            state_timestamp_ms: r.i64()?,
            members: Vec::new(),
            members_complete: version >= GROUP_VALUE_VERSION,
        };
        // Counts come from the record; every element takes at least one byte, so a count larger
        // than the bytes left is refused by the reads, never by a huge allocation.
        let members = r.count(4)?;
        for _ in 0..members {
            let mut m = MemberRecord {
                member_id: r.str()?,
                client_id: r.str()?,
                session_timeout_ms: r.u32()?,
                rebalance_timeout_ms: r.u32()?,
                ..MemberRecord::default()
            };
            for _ in 0..r.count(2)? {
                m.topics.push(r.str()?);
            }
            for _ in 0..r.count(6)? {
                let topic = r.str()?;
                let n = r.count(4)?;
                let mut partitions = Vec::with_capacity(n);
                for _ in 0..n {
                    partitions.push(r.u32()?);
                }
                m.assignment.push((topic, partitions));
            }
            m.user_data = r.bytes()?;
            if version >= GROUP_VALUE_VERSION {
                m.client_host = r.str()?;
                m.metadata = r.bytes()?;
                m.server_assignment = r.flag()?;
                m.assignment_bytes = if r.flag()? { Some(r.bytes()?) } else { None };
            }
            value.members.push(m);
        }
        r.finish()?;
        Ok(value)
    }
}

#[derive(Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    /// Strings longer than 65,535 bytes cannot be encoded: callers bound every string they store
    /// (ids, topic names, commit metadata) well below that.
    fn str(&mut self, s: &str) {
        assert!(s.len() <= u16::MAX as usize, "string of {} bytes in a group record", s.len());
        self.u16(s.len() as u16);
        self.0.extend_from_slice(s.as_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
}

struct Reader<'a> {
    what: &'static str,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(what: &'static str, buf: &'a [u8]) -> Self {
        Reader { what, buf, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        let available = self.buf.len() - self.pos;
        if n > available {
            return Err(CodecError::Truncated { what: self.what, position: self.pos, needed: n, available });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16, CodecError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    /// A byte that must be 0 or 1.
    fn flag(&mut self) -> Result<bool, CodecError> {
        let position = self.pos;
        match self.array::<1>()? {
            [0] => Ok(false),
            [1] => Ok(true),
            [other] => Err(CodecError::BadFlag { what: self.what, position, value: other }),
        }
    }
    fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn i32(&mut self) -> Result<i32, CodecError> {
        Ok(i32::from_be_bytes(self.array()?))
    }
    fn i64(&mut self) -> Result<i64, CodecError> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    /// An element count, refused when even `min_element_bytes` per element would not fit.
    fn count(&mut self, min_element_bytes: usize) -> Result<usize, CodecError> {
        let n = self.u32()? as usize;
        let available = self.buf.len() - self.pos;
        if n.saturating_mul(min_element_bytes) > available {
            return Err(CodecError::Truncated {
                what: self.what,
                position: self.pos,
                needed: n.saturating_mul(min_element_bytes),
                available,
            });
        }
        Ok(n)
    }

    fn str(&mut self) -> Result<String, CodecError> {
        let len = self.u16()? as usize;
        let position = self.pos;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| CodecError::NotUtf8 { what: self.what, position })
    }

    fn bytes(&mut self) -> Result<Vec<u8>, CodecError> {
        let len = self.u32()? as usize;
        Ok(self.take(len)?.to_vec())
    }

    fn finish(&self) -> Result<(), CodecError> {
        match self.buf.len() - self.pos {
            0 => Ok(()),
            extra => Err(CodecError::TrailingBytes { what: self.what, extra }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn member() -> impl Strategy<Value = MemberRecord> {
        (
            "[a-z0-9-]{0,20}",
            "[a-z]{0,8}",
            any::<u32>(),
            any::<u32>(),
            proptest::collection::vec("[a-z.]{1,10}", 0..4),
            proptest::collection::vec(("[a-z]{1,6}", proptest::collection::vec(any::<u32>(), 0..5)), 0..3),
            proptest::collection::vec(any::<u8>(), 0..16),
            ("[a-z0-9./]{0,16}", proptest::collection::vec(any::<u8>(), 0..16), any::<bool>()),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)),
        )
            .prop_map(
                |(
                    member_id,
                    client_id,
                    s,
                    r,
                    topics,
                    assignment,
                    user_data,
                    (client_host, metadata, server_assignment),
                    assignment_bytes,
                )| MemberRecord {
                    member_id,
                    client_id,
                    session_timeout_ms: s,
                    rebalance_timeout_ms: r,
                    topics,
                    assignment,
                    user_data,
                    client_host,
                    metadata,
                    server_assignment,
                    assignment_bytes,
                },
            )
    }

    proptest! {
        #[test]
        fn keys_round_trip(group in "\\PC{0,30}", topic in "[a-zA-Z0-9._-]{1,40}", partition in any::<u32>()) {
            for key in [RecordKey::Offset { group: group.clone(), topic: topic.clone(), partition },
                        RecordKey::Group { group: group.clone() }] {
                prop_assert_eq!(RecordKey::decode(&key.encode()).unwrap(), key);
            }
        }

        #[test]
        fn offset_values_round_trip(offset in any::<i64>(), metadata in "\\PC{0,50}", ts in any::<i64>()) {
            let v = OffsetValue { offset, metadata, commit_timestamp_ms: ts };
            prop_assert_eq!(OffsetValue::decode(&v.encode()).unwrap(), v);
        }

        #[test]
        fn group_values_round_trip(
            generation in any::<i32>(),
            leader in "[a-z0-9-]{0,20}",
            ts in any::<i64>(),
            members in proptest::collection::vec(member(), 0..5),
        ) {
            let v = GroupValue {
                protocol_type: "consumer".into(),
                protocol: "range".into(),
                generation,
                leader,
                state_timestamp_ms: ts,
                members,
                members_complete: true,
            };
            let bytes = v.encode();
            prop_assert_eq!(GroupValue::decode(&bytes).unwrap(), v);
            // Every strict prefix is refused, never misread.
            for cut in 0..bytes.len() {
                prop_assert!(GroupValue::decode(&bytes[..cut]).is_err());
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = RecordKey::decode(&bytes);
            let _ = OffsetValue::decode(&bytes);
            let _ = GroupValue::decode(&bytes);
        }
    }

    #[test]
    fn unknown_versions_and_trailing_bytes_are_refused() {
        assert!(matches!(RecordKey::decode(&[0, 9]), Err(CodecError::UnknownVersion { version: 9, .. })));
        let mut key = RecordKey::Group { group: "g".into() }.encode();
        key.push(0);
        assert!(matches!(RecordKey::decode(&key), Err(CodecError::TrailingBytes { extra: 1, .. })));
        let huge_count =
            [0u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert!(GroupValue::decode(&huge_count).is_err());
    }

    /// A version 0 record (as brokers before version 1 wrote it) still reads, marked as not
    /// carrying what live members need; a flag byte other than 0 or 1 is refused.
    #[test]
    fn version_0_group_values_read_without_live_members() {
        let member = MemberRecord {
            member_id: "m-1".into(),
            client_id: "app".into(),
            session_timeout_ms: 10_000,
            assignment: vec![("likes".into(), vec![0, 2])],
            client_host: "/127.0.0.1".into(),
            metadata: vec![1, 2],
            server_assignment: true,
            assignment_bytes: Some(vec![3]),
            ..MemberRecord::default()
        };
        let value = GroupValue {
            protocol_type: "consumer".into(),
            protocol: "range".into(),
            generation: 4,
            leader: "m-1".into(),
            state_timestamp_ms: 1,
            members: vec![member.clone()],
            members_complete: true,
        };
        let v1 = value.encode();
        // Version 0 is version 1 without the four trailing member fields.
        let tail = 2 + member.client_host.len() + 4 + member.metadata.len() + 1 + 1 + 4 + 1;
        let mut v0 = v1[..v1.len() - tail].to_vec();
        v0[..2].copy_from_slice(&GROUP_VALUE_V0.to_be_bytes());
        let read = GroupValue::decode(&v0).unwrap();
        assert!(!read.members_complete);
        assert_eq!(read.members[0].assignment, member.assignment);
        assert_eq!(read.members[0].assignment_bytes, None);

        let mut bad_flag = v1.clone();
        let flag_at = v1.len() - (1 + 4 + 1) - 1;
        bad_flag[flag_at] = 7;
        assert!(matches!(GroupValue::decode(&bad_flag), Err(CodecError::BadFlag { value: 7, .. })));
    }
}
