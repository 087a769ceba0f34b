//! The replication protocol's bytes (`schema/replication.fbs`): one `PeerBatch` per frame carries
//! every Raft message one node has for another in one pass of its loop, with the heartbeats of all
//! groups the pair shares coalesced into fixed-size beats, in keepalives the sender's report of
//! the partitions it leads whose in-sync replicas are short or that a node holds no replica of,
//! and topic changes a node hands to the controller's leader. raft-rs's protobuf types are
//! built and read field by field here: protobuf never parses bytes from the network. A snapshot's
//! data (`snapshot::SnapshotData`) is verified here, before any replica sees it.
//!
//! Depends on the generated code, raft-rs's message types, `snapshot` and `bytes`; no IO.

use bytes::{Buf, Bytes};
use raft::eraftpb::{ConfState, Entry, EntryType, Message, MessageType, Snapshot};
use thiserror::Error;

use super::replication_generated::ringlog::replication as fb;
use super::snapshot::{SnapshotData, SnapshotDataError};

/// Bytes before the header in a frame: frame length and header length.
pub const FRAME_PREFIX: usize = 8;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("peer frame is {len} bytes, shorter than its {needed}-byte prefix and header")]
    Truncated { len: usize, needed: usize },
    #[error("peer frame header is not a valid PeerBatch: {0}")]
    BadHeader(String),
    #[error("peer frame: message {index} has type {msg_type}, which is not one peers exchange")]
    UnknownMessageType { index: usize, msg_type: u8 },
    #[error("peer frame: message {index} has no group")]
    MissingGroup { index: usize },
    #[error("peer frame: entry data {offset}+{len} lies outside the {payload}-byte payload")]
    DataOutOfBounds { offset: u64, len: u32, payload: usize },
    #[error("peer frame from node {from_node} to node {to_node}: message {index} claims to be from {from} to {to}")]
    Misaddressed { index: usize, from_node: u64, to_node: u64, from: u64, to: u64 },
    #[error("peer frame: message {index} is a snapshot without one")]
    MissingSnapshot { index: usize },
    #[error("peer frame: message {index} carries a snapshot whose data is refused: {source}")]
    BadSnapshot { index: usize, source: SnapshotDataError },
    #[error("peer frame: in-sync report {index} has no group")]
    ReportWithoutGroup { index: usize },
}

/// A Raft group, as both nodes name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupKey {
    pub topic_id: u128,
    pub partition: u32,
}

impl GroupKey {
    /// The controller's group.
    pub const CONTROLLER: GroupKey = GroupKey { topic_id: 0, partition: 0 };

    fn to_fb(self) -> fb::GroupKey {
        fb::GroupKey::new((self.topic_id >> 64) as u64, self.topic_id as u64, self.partition)
    }

    fn from_fb(key: &fb::GroupKey) -> GroupKey {
        GroupKey {
            topic_id: (u128::from(key.topic_hi()) << 64) | u128::from(key.topic_lo()),
            partition: key.partition(),
        }
    }
}

/// One batch from `from_node` to `to_node`.
#[derive(Debug, Default)]
pub struct PeerBatch {
    pub from_node: u64,
    pub to_node: u64,
    pub messages: Vec<(GroupKey, Message)>,
    /// The sender's report of the partitions it leads that a peer cannot see whole from its own
    /// replica (keepalives only; `Some(empty)`: there is none).
    pub leader_reports: Option<Vec<LeaderReport>>,
    /// The digest of the sender's current report (`report_digest`), in every keepalive; with
    /// `leader_reports` absent, the report is unchanged since the one with this digest. 0: none.
    pub report_digest: u64,
    /// Commands for the controller's leader to propose (the controller's log record, opaque
    /// here), from a node that took a topic change from a client.
    pub controller_requests: Vec<Bytes>,
}

/// A partition the sender leads whose in-sync replicas are fewer than its replicas, or that some
/// node of the cluster holds no replica of (that node learns its leader from this).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderReport {
    pub group: GroupKey,
    /// The leader's term.
    pub term: u64,
    /// The members in sync, the leader among them.
    pub in_sync: Vec<u64>,
}

/// A frame ready to send: `head` (prefix and header), then `payload` in order, each as it is.
#[derive(Debug)]
pub struct EncodedFrame {
    pub head: Vec<u8>,
    pub payload: Vec<Bytes>,
}

impl EncodedFrame {
    pub fn len(&self) -> usize {
        self.head.len() + self.payload.iter().map(Bytes::len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The frame in one buffer (tests, the simulator).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        out.extend_from_slice(&self.head);
        for part in &self.payload {
            out.extend_from_slice(part);
        }
        out
    }
}

/// A heartbeat (or response) that carries nothing but term and commit travels as a beat.
fn is_plain_beat(m: &Message) -> bool {
    matches!(m.get_msg_type(), MessageType::MsgHeartbeat | MessageType::MsgHeartbeatResponse)
        && m.context.is_empty()
        && m.log_term == 0
        && m.index == 0
        && m.entries.is_empty()
        && m.commit_term == 0
        && m.request_snapshot == 0
        && !m.reject
        && m.reject_hint == 0
        && m.priority == 0
        && !m.has_snapshot()
}

fn entry_kind(entry_type: EntryType) -> fb::EntryKind {
    match entry_type {
        EntryType::EntryNormal => fb::EntryKind::Normal,
        EntryType::EntryConfChange => fb::EntryKind::ConfChange,
        EntryType::EntryConfChangeV2 => fb::EntryKind::ConfChangeV2,
    }
}

/// A report's digest for `report_digest`: crc32c over its entries in a canonical order, with the
/// entry count; never 0. Every node computes it the same way, whatever order it keeps them in.
pub fn report_digest(report: &[LeaderReport]) -> u64 {
    let mut entries: Vec<&LeaderReport> = report.iter().collect();
    entries.sort_unstable_by_key(|e| (e.group.topic_id, e.group.partition));
    let mut crc = 0u32;
    for e in entries {
        crc = crc32c::crc32c_append(crc, &e.group.topic_id.to_le_bytes());
        crc = crc32c::crc32c_append(crc, &e.group.partition.to_le_bytes());
        crc = crc32c::crc32c_append(crc, &e.term.to_le_bytes());
        crc = crc32c::crc32c_append(crc, &(e.in_sync.len() as u64).to_le_bytes());
        for id in &e.in_sync {
            crc = crc32c::crc32c_append(crc, &id.to_le_bytes());
        }
    }
    (1 << 63) | ((report.len() as u64 & 0x7fff_ffff) << 32) | u64::from(crc)
}

/// Encodes `batch`. Messages' `from` and `to` must be the batch's nodes (a replica's id is its
/// node's id; `decode` refuses anything else).
pub fn encode(batch: &PeerBatch) -> EncodedFrame {
    let mut fbb = flatbuffers::FlatBufferBuilder::with_capacity(256);
    let mut payload = Vec::new();
    let mut payload_len = 0u64;
    let mut beats = Vec::new();
    let mut responses = Vec::new();
    let mut messages = Vec::new();
    for (group, m) in &batch.messages {
        if is_plain_beat(m) {
            let beat = fb::Beat::new(&group.to_fb(), m.term, m.commit);
            match m.get_msg_type() {
                MessageType::MsgHeartbeat => beats.push(beat),
                _ => responses.push(beat),
            }
            continue;
        }
        let entries: Vec<_> = m
            .entries
            .iter()
            .map(|e| {
                let data_offset = payload_len;
                if !e.data.is_empty() {
                    payload_len += e.data.len() as u64;
                    payload.push(e.data.clone());
                }
                let context = (!e.context.is_empty()).then(|| fbb.create_vector(&e.context));
                fb::Entry::create(
                    &mut fbb,
                    &fb::EntryArgs {
                        kind: entry_kind(e.get_entry_type()),
                        term: e.term,
                        index: e.index,
                        data_offset,
                        data_len: e.data.len() as u32,
                        context,
                    },
                )
            })
            .collect();
        let entries = (!entries.is_empty()).then(|| fbb.create_vector(&entries));
        let context = (!m.context.is_empty()).then(|| fbb.create_vector(&m.context));
        let snapshot = m.has_snapshot().then(|| encode_snapshot(&mut fbb, m.get_snapshot()));
        let key = group.to_fb();
        messages.push(fb::RaftMessage::create(
            &mut fbb,
            &fb::RaftMessageArgs {
                group: Some(&key),
                msg_type: m.get_msg_type() as u8,
                to: m.to,
                from: m.from,
                term: m.term,
                log_term: m.log_term,
                index: m.index,
                entries,
                commit: m.commit,
                commit_term: m.commit_term,
                request_snapshot: m.request_snapshot,
                reject: m.reject,
                reject_hint: m.reject_hint,
                context,
                priority: m.priority,
                snapshot,
            },
        ));
    }
    let messages = fbb.create_vector(&messages);
    let heartbeats = fbb.create_vector(&beats);
    let heartbeat_responses = fbb.create_vector(&responses);
    let leader_reports = batch.leader_reports.as_ref().map(|report| {
        let entries: Vec<_> = report
            .iter()
            .map(|short| {
                let in_sync = fbb.create_vector(&short.in_sync);
                let key = short.group.to_fb();
                fb::LeaderReport::create(
                    &mut fbb,
                    &fb::LeaderReportArgs { group: Some(&key), term: short.term, in_sync: Some(in_sync) },
                )
            })
            .collect();
        fbb.create_vector(&entries)
    });
    let controller_requests = (!batch.controller_requests.is_empty()).then(|| {
        let requests: Vec<_> = batch
            .controller_requests
            .iter()
            .map(|command| {
                let command = fbb.create_vector(command);
                fb::ControllerRequest::create(&mut fbb, &fb::ControllerRequestArgs { command: Some(command) })
            })
            .collect();
        fbb.create_vector(&requests)
    });
    let root = fb::PeerBatch::create(
        &mut fbb,
        &fb::PeerBatchArgs {
            from_node: batch.from_node,
            to_node: batch.to_node,
            messages: Some(messages),
            heartbeats: Some(heartbeats),
            heartbeat_responses: Some(heartbeat_responses),
            leader_reports,
            controller_requests,
            report_digest: batch.report_digest,
        },
    );
    fbb.finish(root, None);
    let header = fbb.finished_data();
    let frame_len = 4 + header.len() as u64 + payload_len;
    let mut head = Vec::with_capacity(FRAME_PREFIX + header.len());
    head.extend_from_slice(&(frame_len as u32).to_be_bytes());
    head.extend_from_slice(&(header.len() as u32).to_be_bytes());
    head.extend_from_slice(header);
    EncodedFrame { head, payload }
}

fn encode_snapshot<'a>(
    fbb: &mut flatbuffers::FlatBufferBuilder<'a>,
    snapshot: &Snapshot,
) -> flatbuffers::WIPOffset<fb::Snapshot<'a>> {
    let metadata = snapshot.get_metadata();
    let conf = metadata.get_conf_state();
    let voters = fbb.create_vector(&conf.voters);
    let learners = fbb.create_vector(&conf.learners);
    let voters_outgoing = fbb.create_vector(&conf.voters_outgoing);
    let learners_next = fbb.create_vector(&conf.learners_next);
    let data = fbb.create_vector(&snapshot.data);
    fb::Snapshot::create(
        fbb,
        &fb::SnapshotArgs {
            index: metadata.index,
            term: metadata.term,
            voters: Some(voters),
            learners: Some(learners),
            voters_outgoing: Some(voters_outgoing),
            learners_next: Some(learners_next),
            auto_leave: conf.auto_leave,
            data: Some(data),
        },
    )
}

/// raft-rs's snapshot from its frame, its data verified (`SnapshotData::decode`).
fn decode_snapshot(index: usize, snapshot: fb::Snapshot) -> Result<Snapshot, WireError> {
    let ids =
        |list: Option<flatbuffers::Vector<'_, u64>>| list.map(|l| l.iter().collect()).unwrap_or_default();
    let data = snapshot.data().map(|d| d.bytes()).unwrap_or_default();
    SnapshotData::decode(data, snapshot.index())
        .map_err(|source| WireError::BadSnapshot { index, source })?;
    let conf_state = ConfState {
        voters: ids(snapshot.voters()),
        learners: ids(snapshot.learners()),
        voters_outgoing: ids(snapshot.voters_outgoing()),
        learners_next: ids(snapshot.learners_next()),
        auto_leave: snapshot.auto_leave(),
        ..Default::default()
    };
    let mut out = Snapshot { data: Bytes::copy_from_slice(data), ..Default::default() };
    let metadata = out.mut_metadata();
    metadata.index = snapshot.index();
    metadata.term = snapshot.term();
    metadata.set_conf_state(conf_state);
    Ok(out)
}

/// The message types that travel between replicas; the rest are local to a node (ticks, status
/// reports), and a peer that sends one is refused.
fn peer_message_type(number: u8) -> Option<MessageType> {
    use MessageType::*;
    let known = [
        MsgPropose,
        MsgAppend,
        MsgAppendResponse,
        MsgRequestVote,
        MsgRequestVoteResponse,
        MsgHeartbeat,
        MsgHeartbeatResponse,
        MsgTransferLeader,
        MsgTimeoutNow,
        MsgReadIndex,
        MsgReadIndexResp,
        MsgRequestPreVote,
        MsgRequestPreVoteResponse,
        MsgSnapshot,
    ];
    known.into_iter().find(|&t| t as u8 == number)
}

fn verifier_options() -> flatbuffers::VerifierOptions {
    flatbuffers::VerifierOptions {
        max_depth: 8,
        max_tables: 1_000_000,
        max_apparent_size: 1 << 31,
        ..Default::default()
    }
}

fn beat_message(kind: MessageType, beat: &fb::Beat, from: u64, to: u64) -> (GroupKey, Message) {
    let mut m = Message::default();
    m.set_msg_type(kind);
    m.from = from;
    m.to = to;
    m.term = beat.term();
    m.commit = beat.commit();
    (GroupKey::from_fb(beat.group()), m)
}

/// Decodes one frame as received (length prefix included). Entry data are slices of `frame`.
pub fn decode(frame: Bytes) -> Result<PeerBatch, WireError> {
    if frame.len() < FRAME_PREFIX {
        return Err(WireError::Truncated { len: frame.len(), needed: FRAME_PREFIX });
    }
    let mut prefix = &frame[..FRAME_PREFIX];
    let _frame_len = prefix.get_u32();
    let header_len = prefix.get_u32() as usize;
    let header_end = FRAME_PREFIX.saturating_add(header_len);
    if frame.len() < header_end {
        return Err(WireError::Truncated { len: frame.len(), needed: header_end });
    }
    let header = &frame[FRAME_PREFIX..header_end];
    let payload = frame.slice(header_end..);
    let root = fb::root_as_peer_batch_with_opts(&verifier_options(), header)
        .map_err(|e| WireError::BadHeader(e.to_string()))?;
    let (from, to) = (root.from_node(), root.to_node());
    let mut batch = PeerBatch {
        from_node: from,
        to_node: to,
        report_digest: root.report_digest(),
        ..PeerBatch::default()
    };
    if let Some(report) = root.leader_reports() {
        let mut shorts = Vec::with_capacity(report.len());
        for (index, short) in report.iter().enumerate() {
            let group = short.group().ok_or(WireError::ReportWithoutGroup { index })?;
            shorts.push(LeaderReport {
                group: GroupKey::from_fb(group),
                term: short.term(),
                in_sync: short.in_sync().map(|ids| ids.iter().collect()).unwrap_or_default(),
            });
        }
        batch.leader_reports = Some(shorts);
    }
    for request in root.controller_requests().iter().flatten() {
        let command = request.command().map(|c| c.bytes()).unwrap_or_default();
        batch.controller_requests.push(Bytes::copy_from_slice(command));
    }
    for beat in root.heartbeats().iter().flatten() {
        batch.messages.push(beat_message(MessageType::MsgHeartbeat, beat, from, to));
    }
    for beat in root.heartbeat_responses().iter().flatten() {
        batch.messages.push(beat_message(MessageType::MsgHeartbeatResponse, beat, from, to));
    }
    for (index, m) in root.messages().iter().flatten().enumerate() {
        let msg_type = peer_message_type(m.msg_type())
            .ok_or(WireError::UnknownMessageType { index, msg_type: m.msg_type() })?;
        let group = m.group().ok_or(WireError::MissingGroup { index })?;
        // A node speaks only for its own replicas (a replica's id is its node's id).
        if m.from() != from || m.to() != to {
            let (from_node, to_node) = (from, to);
            return Err(WireError::Misaddressed { index, from_node, to_node, from: m.from(), to: m.to() });
        }
        let mut message = Message::default();
        message.set_msg_type(msg_type);
        message.to = m.to();
        message.from = m.from();
        message.term = m.term();
        message.log_term = m.log_term();
        message.index = m.index();
        message.commit = m.commit();
        message.commit_term = m.commit_term();
        message.request_snapshot = m.request_snapshot();
        message.reject = m.reject();
        message.reject_hint = m.reject_hint();
        message.priority = m.priority();
        if let Some(context) = m.context() {
            message.context = Bytes::copy_from_slice(context.bytes());
        }
        let mut entries = Vec::new();
        for e in m.entries().iter().flatten() {
            let (offset, len) = (e.data_offset(), e.data_len());
            let end = offset.checked_add(u64::from(len)).filter(|&end| end <= payload.len() as u64);
            let Some(end) = end else {
                return Err(WireError::DataOutOfBounds { offset, len, payload: payload.len() });
            };
            let entry_type = match e.kind() {
                fb::EntryKind::ConfChange => EntryType::EntryConfChange,
                fb::EntryKind::ConfChangeV2 => EntryType::EntryConfChangeV2,
                _ => EntryType::EntryNormal,
            };
            let mut entry = Entry {
                term: e.term(),
                index: e.index(),
                data: payload.slice(offset as usize..end as usize),
                ..Default::default()
            };
            entry.set_entry_type(entry_type);
            if let Some(context) = e.context() {
                entry.context = Bytes::copy_from_slice(context.bytes());
            }
            entries.push(entry);
        }
        message.set_entries(entries.into());
        if msg_type == MessageType::MsgSnapshot {
            let snapshot = m.snapshot().ok_or(WireError::MissingSnapshot { index })?;
            message.set_snapshot(decode_snapshot(index, snapshot)?);
        }
        batch.messages.push((GroupKey::from_fb(group), message));
    }
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: MessageType, term: u64) -> Message {
        let mut m = Message::default();
        m.set_msg_type(kind);
        m.from = 1;
        m.to = 2;
        m.term = term;
        m
    }

    #[test]
    fn beats_coalesce_and_everything_round_trips() {
        let mut batch = PeerBatch { from_node: 1, to_node: 2, ..PeerBatch::default() };
        for partition in 0..1000 {
            let mut beat = message(MessageType::MsgHeartbeat, 7);
            beat.commit = u64::from(partition);
            batch.messages.push((GroupKey { topic_id: 9 << 64 | 5, partition }, beat));
        }
        let mut append = message(MessageType::MsgAppend, 7);
        append.log_term = 6;
        append.index = 41;
        append.commit = 40;
        let entries = vec![
            Entry { term: 7, index: 42, data: Bytes::from_static(b"batch one"), ..Default::default() },
            Entry { term: 7, index: 43, ..Default::default() },
            Entry { term: 7, index: 44, data: Bytes::from_static(b"two"), ..Default::default() },
        ];
        append.set_entries(entries.into());
        batch.messages.push((GroupKey::CONTROLLER, append.clone()));
        let mut vote = message(MessageType::MsgRequestPreVoteResponse, 8);
        vote.reject = true;
        vote.context = Bytes::from_static(b"ctx");
        batch.messages.push((GroupKey { topic_id: 1, partition: 3 }, vote.clone()));

        let frame = encode(&batch);
        // A thousand heartbeats cost 40 bytes each, and entry data is not copied into the head.
        assert!(frame.head.len() < 1000 * 40 + 1024, "{}", frame.head.len());
        assert_eq!(frame.payload.len(), 2);
        let bytes = frame.to_vec();
        assert_eq!(u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize, bytes.len() - 4);
        let decoded = decode(Bytes::from(bytes)).unwrap();
        assert_eq!((decoded.from_node, decoded.to_node), (1, 2));
        assert_eq!(decoded.messages.len(), batch.messages.len());
        let mut expected = batch.messages.clone();
        let mut got = decoded.messages;
        expected.sort_by_key(|(g, m)| (*g, m.get_msg_type() as i32, m.commit));
        got.sort_by_key(|(g, m)| (*g, m.get_msg_type() as i32, m.commit));
        assert_eq!(got, expected);
    }

    #[test]
    fn a_snapshot_travels_field_for_field_and_bad_data_is_refused() {
        use crate::replication::epochs::{EpochStart, LeaderEpochs};
        let mut epochs = LeaderEpochs::default();
        epochs.assign(EpochStart { epoch: 2, start_offset: 0, start_index: 1 });
        epochs.assign(EpochStart { epoch: 5, start_offset: 300, start_index: 40 });
        let data = SnapshotData { start_offset: 700, epochs, producers: Default::default() };
        let mut snapshot = Snapshot { data: data.encode().into(), ..Default::default() };
        snapshot.mut_metadata().index = 90;
        snapshot.mut_metadata().term = 5;
        snapshot.mut_metadata().set_conf_state(ConfState { voters: vec![1, 2, 3], ..Default::default() });
        let mut m = message(MessageType::MsgSnapshot, 6);
        m.set_snapshot(snapshot.clone());
        let batch = PeerBatch {
            from_node: 1,
            to_node: 2,
            messages: vec![(GroupKey::CONTROLLER, m.clone())],
            ..PeerBatch::default()
        };
        let decoded = decode(Bytes::from(encode(&batch).to_vec())).unwrap();
        assert_eq!(decoded.messages, vec![(GroupKey::CONTROLLER, m.clone())]);
        assert_eq!(SnapshotData::decode(&decoded.messages[0].1.get_snapshot().data, 90).unwrap(), data);

        // Data that does not decode, or that names an epoch past the snapshot, is refused here.
        for bad in [Bytes::from_static(b"not a flatbuffer"), data.encode().into()] {
            let mut damaged = m.clone();
            damaged.mut_snapshot().data = bad.clone();
            if bad.len() > 20 {
                damaged.mut_snapshot().mut_metadata().index = 10;
            }
            let batch = PeerBatch {
                from_node: 1,
                to_node: 2,
                messages: vec![(GroupKey::CONTROLLER, damaged)],
                ..PeerBatch::default()
            };
            let err = decode(Bytes::from(encode(&batch).to_vec())).err();
            assert!(matches!(err, Some(WireError::BadSnapshot { index: 0, .. })), "{err:?}");
        }
    }

    #[test]
    fn controller_requests_travel_as_given() {
        let requests = vec![Bytes::from_static(br#"{"topic":{}}"#), Bytes::new(), Bytes::from_static(b"x")];
        let batch = PeerBatch {
            from_node: 3,
            to_node: 1,
            controller_requests: requests.clone(),
            ..Default::default()
        };
        let decoded = decode(Bytes::from(encode(&batch).to_vec())).unwrap();
        assert_eq!(decoded.controller_requests, requests);
        let plain = decode(Bytes::from(encode(&PeerBatch::default()).to_vec())).unwrap();
        assert!(plain.controller_requests.is_empty());
    }

    #[test]
    fn an_in_sync_report_travels_only_when_given() {
        let plain = PeerBatch { from_node: 1, to_node: 2, ..PeerBatch::default() };
        let decoded = decode(Bytes::from(encode(&plain).to_vec())).unwrap();
        assert_eq!(decoded.leader_reports, None, "a batch without a report");
        let empty = PeerBatch { leader_reports: Some(Vec::new()), ..PeerBatch::default() };
        let decoded = decode(Bytes::from(encode(&empty).to_vec())).unwrap();
        assert_eq!(decoded.leader_reports, Some(Vec::new()), "a report that nothing is short");
        let shorts = vec![
            LeaderReport {
                group: GroupKey { topic_id: 1 << 70 | 3, partition: 4 },
                term: 9,
                in_sync: vec![1, 3],
            },
            LeaderReport { group: GroupKey { topic_id: 5, partition: 0 }, term: 2, in_sync: vec![1] },
        ];
        let report = PeerBatch {
            from_node: 1,
            to_node: 2,
            leader_reports: Some(shorts.clone()),
            ..PeerBatch::default()
        };
        let decoded = decode(Bytes::from(encode(&report).to_vec())).unwrap();
        assert_eq!(decoded.leader_reports, Some(shorts.clone()));
        assert_eq!(decoded.report_digest, 0, "no digest unless the sender gives one");

        let digest = report_digest(&shorts);
        let unchanged = PeerBatch { from_node: 1, to_node: 2, report_digest: digest, ..PeerBatch::default() };
        let decoded = decode(Bytes::from(encode(&unchanged).to_vec())).unwrap();
        assert_eq!((decoded.leader_reports, decoded.report_digest), (None, digest));
    }

    #[test]
    fn a_report_digest_depends_on_every_entry_not_on_their_order() {
        let entry = |partition, term, in_sync: &[u64]| LeaderReport {
            group: GroupKey { topic_id: 7, partition },
            term,
            in_sync: in_sync.to_vec(),
        };
        let report = vec![entry(0, 3, &[1, 2]), entry(1, 3, &[1])];
        let digest = report_digest(&report);
        assert_ne!(digest, 0);
        assert_ne!(report_digest(&[]), 0, "an empty report has a digest too");
        assert_eq!(digest, report_digest(&[entry(1, 3, &[1]), entry(0, 3, &[1, 2])]));
        for changed in [
            vec![entry(0, 4, &[1, 2]), entry(1, 3, &[1])],
            vec![entry(0, 3, &[1]), entry(1, 3, &[1])],
            vec![entry(0, 3, &[1, 2]), entry(2, 3, &[1])],
            vec![entry(0, 3, &[1, 2])],
        ] {
            assert_ne!(report_digest(&changed), digest, "{changed:?}");
        }
    }

    #[test]
    fn damaged_frames_are_refused_with_a_reason() {
        let mut append = message(MessageType::MsgAppend, 3);
        append.set_entries(
            vec![Entry { term: 3, index: 1, data: Bytes::from_static(b"abcdef"), ..Default::default() }]
                .into(),
        );
        let batch = PeerBatch {
            from_node: 1,
            to_node: 2,
            messages: vec![(GroupKey::CONTROLLER, append)],
            ..PeerBatch::default()
        };
        let bytes = encode(&batch).to_vec();
        // Payload cut short: the entry's data would point past it.
        let cut = Bytes::from(bytes[..bytes.len() - 3].to_vec());
        assert!(matches!(decode(cut), Err(WireError::DataOutOfBounds { .. })));
        assert!(matches!(decode(Bytes::from_static(b"abc")), Err(WireError::Truncated { .. })));
        let mut scribbled = bytes.clone();
        for b in &mut scribbled[8..40] {
            *b = 0xff;
        }
        assert!(decode(Bytes::from(scribbled)).is_err());
        let mut forged = batch.messages.clone();
        forged[0].1.from = 3;
        let forged = PeerBatch { from_node: 1, to_node: 2, messages: forged, ..PeerBatch::default() };
        let err = decode(Bytes::from(encode(&forged).to_vec())).err();
        assert!(matches!(err, Some(WireError::Misaddressed { from: 3, .. })), "{err:?}");
        let mut huge_header = bytes;
        huge_header[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(decode(Bytes::from(huge_header)), Err(WireError::Truncated { .. })));
    }
}
