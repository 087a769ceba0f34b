//! The consumer: manual assignment, positions, long-polling fetches to each owner shard.
//!
//! Owns: per-partition positions and high watermarks, one FetchRequest per owner endpoint per
//! poll (all sent before any is awaited), and turning fetched batches into records that are
//! `Bytes` views of the response (no copy). Depends on `cluster` and `record::reader`. Uses its
//! own connections: a long poll holds its connection's response queue, so it must not share one
//! with a producer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::admin::OffsetSpec;
use super::cluster::Cluster;
use super::connection::{Connection, ResponseFrame};
use super::error::{ClientError, Result};
use super::ClientConfig;
use crate::protocol::wire;
use crate::record::{batches, reader};

/// The pause after a poll whose partitions were refused by nodes that no longer lead them
/// (librdkafka's `retry.backoff.ms`).
const REFUSED_BACKOFF: Duration = Duration::from_millis(100);

/// Where to (re)position a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offset {
    /// The log start offset.
    Beginning,
    /// The high watermark: only records produced from now on.
    End,
    At(i64),
    /// The first record with a timestamp >= this (milliseconds since the epoch).
    Timestamp(i64),
}

#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Where a newly assigned partition starts unless `seek` says otherwise.
    pub initial_offset: Offset,
    /// What to do when the position is out of range (deleted by retention, or past the end):
    /// `None` returns [`ClientError::OffsetOutOfRange`] from `poll` for the application to handle.
    pub auto_offset_reset: Option<Offset>,
    /// The broker answers a fetch once it has this many bytes or `max_wait` passed.
    pub min_bytes: u32,
    pub partition_max_bytes: u32,
    pub fetch_max_bytes: u32,
    /// Bound on one compressed batch's records once inflated; a batch past it fails the poll
    /// with [`ClientError::CorruptBatch`] instead of exhausting memory.
    pub decompressed_batch_bytes_max: usize,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            initial_offset: Offset::Beginning,
            auto_offset_reset: None,
            min_bytes: 1,
            partition_max_bytes: 1 << 20,
            fetch_max_bytes: 50 << 20,
            decompressed_batch_bytes_max: reader::DECOMPRESSED_BYTES_MAX_DEFAULT,
        }
    }
}

/// One record; key and value share the fetch response's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerRecord {
    pub topic: Arc<str>,
    pub partition: u32,
    pub offset: i64,
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
}

struct Assigned {
    topic: Arc<str>,
    partition: u32,
    /// The next offset to fetch; `None` until a pending seek is resolved.
    position: Option<i64>,
    seek: Option<Offset>,
    high_watermark: Option<i64>,
}

pub struct Consumer {
    cluster: Cluster,
    config: ConsumerConfig,
    assigned: Vec<Assigned>,
    /// An error found while other partitions returned records; reported by the next poll.
    deferred_error: Option<ClientError>,
}

impl Consumer {
    pub async fn connect(client: ClientConfig, config: ConsumerConfig) -> Result<Consumer> {
        let cluster = Cluster::new(client);
        cluster.bootstrap().await?;
        Ok(Consumer { cluster, config, assigned: Vec::new(), deferred_error: None })
    }

    /// Replaces the assignment. Partitions that stay assigned keep their position; new ones start
    /// at `initial_offset`.
    pub fn assign(&mut self, partitions: Vec<(String, u32)>) {
        let mut old: HashMap<(Arc<str>, u32), Assigned> =
            self.assigned.drain(..).map(|a| ((a.topic.clone(), a.partition), a)).collect();
        for (topic, partition) in partitions {
            let key: (Arc<str>, u32) = (Arc::from(topic), partition);
            if self.assigned.iter().any(|a| a.topic == key.0 && a.partition == partition) {
                continue;
            }
            let entry = old.remove(&key).unwrap_or_else(|| Assigned {
                topic: key.0.clone(),
                partition,
                position: None,
                seek: Some(self.config.initial_offset),
                high_watermark: None,
            });
            self.assigned.push(entry);
        }
    }

    /// The assigned partitions.
    pub fn assignment(&self) -> Vec<(Arc<str>, u32)> {
        self.assigned.iter().map(|a| (a.topic.clone(), a.partition)).collect()
    }

    /// Moves a partition's position; resolved (for Beginning/End/Timestamp) at the next poll.
    pub fn seek(&mut self, topic: &str, partition: u32, offset: Offset) -> Result<()> {
        let a = self.find_mut(topic, partition)?;
        match offset {
            Offset::At(o) => {
                a.position = Some(o);
                a.seek = None;
            }
            other => {
                a.position = None;
                a.seek = Some(other);
            }
        }
        Ok(())
    }

    /// The next offset `poll` will return for the partition (`None` while a seek is pending).
    pub fn position(&self, topic: &str, partition: u32) -> Option<i64> {
        self.find(topic, partition).and_then(|a| a.position)
    }

    /// The partition's high watermark as of the last fetch.
    pub fn high_watermark(&self, topic: &str, partition: u32) -> Option<i64> {
        self.find(topic, partition).and_then(|a| a.high_watermark)
    }

    fn find(&self, topic: &str, partition: u32) -> Option<&Assigned> {
        self.assigned.iter().find(|a| &*a.topic == topic && a.partition == partition)
    }

    fn find_mut(&mut self, topic: &str, partition: u32) -> Result<&mut Assigned> {
        self.assigned
            .iter_mut()
            .find(|a| &*a.topic == topic && a.partition == partition)
            .ok_or_else(|| ClientError::InvalidArgument(format!("{topic}/{partition} is not assigned")))
    }

    /// Fetches from every assigned partition, waiting up to `max_wait` for data, and returns the
    /// records in offset order per partition. An empty result means no new data yet. A partition
    /// whose leader is unknown, unreachable or moved is left out of this poll and looked up again
    /// for the next; the poll fails only when no partition's node answered.
    pub async fn poll(&mut self, max_wait: Duration) -> Result<Vec<ConsumerRecord>> {
        if let Some(e) = self.deferred_error.take() {
            return Err(e);
        }
        self.resolve_seeks().await?;
        if self.assigned.is_empty() {
            return Ok(Vec::new());
        }
        // The broker may hold the fetch for max_wait; leave the response time to arrive.
        let max_wait = max_wait.min(self.cluster.config().request_timeout / 2);
        // Topics whose cached metadata proved wrong in this poll (no leader named, a leader that
        // is gone or refuses): forgotten at the end, so the next poll asks where they are now.
        // Kept, one dead leader would stop the member for good (nemesis seed 4).
        let mut stale: Vec<Arc<str>> = Vec::new();
        // Failures that may pass once the metadata is fresh: only reported when nothing answered.
        let mut transient = Vec::new();
        let mut groups: Vec<(Connection, Vec<usize>)> = Vec::new();
        for (i, a) in self.assigned.iter().enumerate() {
            if a.position.is_none() {
                continue;
            }
            let conn = match self.cluster.owner(&a.topic, a.partition).await {
                Ok(conn) => conn,
                // No leader known yet, or its node unreachable: the other partitions are fetched
                // meanwhile.
                Err(e) if e.invalidates_metadata() => {
                    tracing::debug!(topic = %a.topic, partition = a.partition, error = %e, "no reachable leader; refreshing metadata");
                    stale.push(a.topic.clone());
                    transient.push(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            match groups.iter_mut().find(|(c, _)| c.addr() == conn.addr()) {
                Some((_, members)) => members.push(i),
                None => groups.push((conn, vec![i])),
            }
        }
        let max_wait_ms = u32::try_from(max_wait.as_millis()).unwrap_or(u32::MAX);
        let pending: Vec<_> = groups
            .iter()
            .map(|(conn, members)| {
                conn.start(|fbb| self.encode_fetch_request(fbb, max_wait_ms, members), Vec::new(), true)
            })
            .collect();
        let replies = futures::future::join_all(pending.into_iter().map(|p| async move {
            match p {
                Ok(p) => p.response().await,
                Err(e) => Err(e),
            }
        }))
        .await;

        let mut records = Vec::new();
        let mut errors = Vec::new();
        let mut answered = 0;
        let mut refused = false;
        for ((conn, members), reply) in groups.iter().zip(replies) {
            let outcome = reply.and_then(|frame| self.apply_fetch(conn, &frame, members, &mut records));
            match outcome {
                Ok(partition_errors) => {
                    answered += 1;
                    for (i, e) in partition_errors {
                        if e.invalidates_metadata() {
                            // The node no longer leads or owns the partition.
                            tracing::debug!(error = %e, "fetch refused; refreshing metadata");
                            stale.push(self.assigned[i].topic.clone());
                            refused = true;
                        } else {
                            errors.push(e);
                        }
                    }
                }
                Err(e) if e.invalidates_metadata() => {
                    tracing::debug!(addr = conn.addr(), error = %e, "fetch failed; refreshing metadata");
                    stale.extend(members.iter().map(|&i| self.assigned[i].topic.clone()));
                    transient.push(e);
                }
                Err(e) => errors.push(e),
            }
        }
        stale.sort_unstable();
        stale.dedup();
        for topic in &stale {
            self.cluster.invalidate(topic).await;
        }
        // Nothing answered: the leaders are unknown or unreachable, say so rather than spin.
        if answered == 0 {
            errors.extend(transient);
        }
        let mut errors = errors.into_iter();
        if let Some(first) = errors.next() {
            if records.is_empty() {
                return Err(first);
            }
            self.deferred_error = Some(first);
        }
        if records.is_empty() && refused {
            // A refusal comes back at once; while the new leader is not yet in everyone's
            // metadata, polling again at once would only ask the same node again.
            tokio::time::sleep(max_wait.min(REFUSED_BACKOFF)).await;
        }
        Ok(records)
    }

    fn encode_fetch_request(
        &self,
        fbb: &mut flatbuffers::FlatBufferBuilder<'static>,
        max_wait_ms: u32,
        members: &[usize],
    ) -> (wire::RequestBody, flatbuffers::WIPOffset<flatbuffers::UnionWIPOffset>) {
        let mut sorted = members.to_vec();
        sorted.sort_by(|&a, &b| self.assigned[a].topic.cmp(&self.assigned[b].topic));
        let mut topics = Vec::new();
        let mut start = 0;
        while start < sorted.len() {
            let name = &self.assigned[sorted[start]].topic;
            let end =
                start + sorted[start..].iter().take_while(|&&i| self.assigned[i].topic == *name).count();
            let partitions: Vec<_> = sorted[start..end]
                .iter()
                .map(|&i| {
                    let a = &self.assigned[i];
                    wire::FetchPartition::create(
                        fbb,
                        &wire::FetchPartitionArgs {
                            partition: a.partition,
                            offset: a.position.unwrap_or(0),
                            max_bytes: self.config.partition_max_bytes,
                        },
                    )
                })
                .collect();
            let partitions = fbb.create_vector(&partitions);
            let name = fbb.create_string(name);
            topics.push(wire::FetchTopic::create(
                fbb,
                &wire::FetchTopicArgs { name: Some(name), partitions: Some(partitions) },
            ));
            start = end;
        }
        let topics = fbb.create_vector(&topics);
        let body = wire::FetchRequest::create(
            fbb,
            &wire::FetchRequestArgs {
                max_wait_ms,
                min_bytes: self.config.min_bytes,
                max_bytes: self.config.fetch_max_bytes,
                topics: Some(topics),
            },
        );
        (wire::RequestBody::FetchRequest, body.as_union_value())
    }

    /// Applies one fetch response: appends records, advances positions, records high watermarks.
    /// Returns the partitions' errors, with the index of the partition in `assigned`.
    fn apply_fetch(
        &mut self,
        conn: &Connection,
        frame: &ResponseFrame,
        members: &[usize],
        records: &mut Vec<ConsumerRecord>,
    ) -> Result<Vec<(usize, ClientError)>> {
        let response = conn.check_response(frame, "fetch")?;
        let body = response
            .body_as_fetch_response()
            .ok_or_else(|| ClientError::protocol(conn.addr(), "fetch answered with another response type"))?;
        let mut errors = Vec::new();
        for topic in body.topics().iter().flat_map(|v| v.iter()) {
            let name = topic.name().unwrap_or_default();
            for result in topic.partitions().iter().flat_map(|v| v.iter()) {
                let Some(&i) = members.iter().find(|&&i| {
                    &*self.assigned[i].topic == name && self.assigned[i].partition == result.partition()
                }) else {
                    continue;
                };
                if let Err(e) = self.apply_partition(conn.addr(), &frame.payload, i, result, records) {
                    errors.push((i, e));
                }
            }
        }
        Ok(errors)
    }

    fn apply_partition(
        &mut self,
        addr: &str,
        payload: &Bytes,
        i: usize,
        result: wire::FetchPartitionResult<'_>,
        records: &mut Vec<ConsumerRecord>,
    ) -> Result<()> {
        let a = &mut self.assigned[i];
        let Some(position) = a.position else { return Ok(()) };
        match result.error() {
            wire::ErrorCode::None => {}
            wire::ErrorCode::OffsetOutOfRange => {
                if let Some(reset) = self.config.auto_offset_reset {
                    tracing::info!(topic = %a.topic, partition = a.partition, position, ?reset, "offset out of range; resetting");
                    a.position = None;
                    a.seek = Some(reset);
                    return Ok(());
                }
                return Err(ClientError::OffsetOutOfRange {
                    topic: a.topic.to_string(),
                    partition: a.partition,
                    offset: position,
                    log_start_offset: result.log_start_offset(),
                    high_watermark: result.high_watermark(),
                });
            }
            code => {
                return Err(ClientError::broker(
                    format!("fetch {}/{}", a.topic, a.partition),
                    code,
                    result.message(),
                ))
            }
        }
        if result.high_watermark() >= 0 {
            a.high_watermark = Some(result.high_watermark());
        }
        let start = result.payload_offset() as usize;
        let end = start + result.payload_len() as usize;
        if end > payload.len() {
            return Err(ClientError::protocol(
                addr,
                format!(
                    "fetch {}/{}: payload range {start}..{end} exceeds the {}-byte payload",
                    a.topic,
                    a.partition,
                    payload.len()
                ),
            ));
        }
        let region = &payload[start..end];
        let mut next_position = position;
        for batch in batches(region) {
            let (header, bytes) = batch.map_err(|(at, source)| ClientError::CorruptBatch {
                topic: a.topic.to_string(),
                partition: a.partition,
                position: start + at,
                source: source.into(),
            })?;
            if header.last_offset() < next_position {
                continue;
            }
            // Control batches (a replicated partition's leader-change records) are the log's own,
            // never an application's: skipped as Kafka clients skip them.
            if header.is_control() {
                next_position = header.last_offset() + 1;
                continue;
            }
            let corrupt = |source| ClientError::CorruptBatch {
                topic: a.topic.to_string(),
                partition: a.partition,
                position: start + (bytes.as_ptr() as usize - region.as_ptr() as usize),
                source,
            };
            let decoded = reader::decode(bytes, self.config.decompressed_batch_bytes_max).map_err(corrupt)?;
            // Keys and values are views of the payload, or of a compressed batch's inflated records.
            let source = decoded.decompressed().unwrap_or(payload);
            for record in &decoded {
                let record = record.map_err(|e| corrupt(e.into()))?;
                if record.offset < next_position {
                    continue;
                }
                records.push(ConsumerRecord {
                    topic: a.topic.clone(),
                    partition: a.partition,
                    offset: record.offset,
                    timestamp_ms: record.timestamp_ms,
                    key: record.key.map(|k| source.slice_ref(k)),
                    value: record.value.map(|v| source.slice_ref(v)),
                });
            }
            // Past the whole batch, even if its last offsets hold no record.
            next_position = header.last_offset() + 1;
        }
        a.position = Some(next_position);
        Ok(())
    }

    async fn resolve_seeks(&mut self) -> Result<()> {
        for i in 0..self.assigned.len() {
            let Some(seek) = self.assigned[i].seek else { continue };
            let spec = match seek {
                Offset::At(o) => {
                    self.assigned[i].position = Some(o);
                    self.assigned[i].seek = None;
                    continue;
                }
                Offset::Beginning => OffsetSpec::Earliest,
                Offset::End => OffsetSpec::Latest,
                Offset::Timestamp(ts) => OffsetSpec::Timestamp(ts),
            };
            let (topic, partition) = (self.assigned[i].topic.clone(), self.assigned[i].partition);
            let mut listed = self.cluster.list_offsets(&topic, partition, spec).await?;
            if listed.offset < 0 && matches!(spec, OffsetSpec::Timestamp(_)) {
                // No record is stamped that late. A broker may say so with -1 (Kafka does)
                // instead of the log end; fetching at -1 would be out of range, and a reset
                // policy of Beginning would then re-read the whole log.
                listed = self.cluster.list_offsets(&topic, partition, OffsetSpec::Latest).await?;
            }
            self.assigned[i].position = Some(listed.offset);
            self.assigned[i].seek = None;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::builder::BatchBuilder;
    use crate::record::set_base_offset;

    fn consumer() -> Consumer {
        let client = ClientConfig::new("127.0.0.1:1");
        Consumer {
            cluster: Cluster::new(client),
            config: ConsumerConfig::default(),
            assigned: Vec::new(),
            deferred_error: None,
        }
    }

    #[test]
    fn assign_keeps_positions_and_seek_overrides() {
        let mut c = consumer();
        c.assign(vec![("a".into(), 0), ("a".into(), 1), ("a".into(), 1)]);
        assert_eq!(c.assignment().len(), 2);
        c.seek("a", 1, Offset::At(17)).unwrap();
        assert_eq!(c.position("a", 1), Some(17));
        assert_eq!(c.position("a", 0), None, "Beginning is resolved at poll");
        c.assign(vec![("a".into(), 1), ("b".into(), 0)]);
        assert_eq!(c.position("a", 1), Some(17));
        assert!(c.seek("a", 0, Offset::End).is_err(), "no longer assigned");
    }

    /// A compressed batch: records are views of its inflated records, not of the payload.
    #[test]
    fn compressed_fetched_batches_become_records() {
        use crate::record::compression::Compression;
        for codec in [Compression::Gzip, Compression::Snappy, Compression::Lz4, Compression::Zstd] {
            let mut c = consumer();
            c.assign(vec![("t".into(), 0)]);
            c.seek("t", 0, Offset::At(5)).unwrap();
            let mut b = BatchBuilder::new();
            for i in 0..3i64 {
                b.push(1000 + i, Some(b"k"), Some(format!("value {i}").as_bytes()), &[]);
            }
            let mut batch = b.finish_compressed(codec).unwrap();
            set_base_offset(&mut batch, 5);
            let payload = Bytes::from(batch.to_vec());
            let mut fbb = flatbuffers::FlatBufferBuilder::new();
            let p = wire::FetchPartitionResult::create(
                &mut fbb,
                &wire::FetchPartitionResultArgs {
                    partition: 0,
                    high_watermark: 8,
                    payload_len: payload.len() as u32,
                    ..Default::default()
                },
            );
            let partitions = fbb.create_vector(&[p]);
            let name = fbb.create_string("t");
            let topic = wire::FetchTopicResult::create(
                &mut fbb,
                &wire::FetchTopicResultArgs { name: Some(name), partitions: Some(partitions) },
            );
            let topics = fbb.create_vector(&[topic]);
            let body =
                wire::FetchResponse::create(&mut fbb, &wire::FetchResponseArgs { topics: Some(topics) });
            fbb.finish(body, None);
            let body = flatbuffers::root::<wire::FetchResponse>(fbb.finished_data()).unwrap();
            let result = body.topics().unwrap().get(0).partitions().unwrap().get(0);
            let mut records = Vec::new();
            c.apply_partition("test:1", &payload, 0, result, &mut records).unwrap();
            let got: Vec<(i64, &[u8])> =
                records.iter().map(|r| (r.offset, &r.value.as_ref().unwrap()[..])).collect();
            assert_eq!(got, vec![(5, &b"value 0"[..]), (6, b"value 1"), (7, b"value 2")], "{codec}");
            assert_eq!(c.position("t", 0), Some(8));
        }
    }

    /// A fetch payload whose first batch starts before the position: records below it are
    /// skipped, keys and values are views of the payload, and the position moves past the data.
    #[test]
    fn fetched_batches_become_records() {
        let mut c = consumer();
        c.assign(vec![("t".into(), 3)]);
        c.seek("t", 3, Offset::At(11)).unwrap();
        let mut payload = Vec::new();
        for (base, values) in [(10i64, &["a", "b", "c"][..]), (13, &["d"][..])] {
            let mut b = BatchBuilder::new();
            for (i, v) in values.iter().enumerate() {
                let key = format!("k{i}");
                b.push(1000 + i as i64, Some(key.as_bytes()), Some(v.as_bytes()), &[]);
            }
            let mut batch = b.finish();
            set_base_offset(&mut batch, base);
            payload.extend_from_slice(&batch);
        }
        let payload_len = payload.len() as u32;
        // A partial trailing batch, as a fetch cut at max_bytes may carry.
        payload.extend_from_slice(&[0u8; 20]);
        let payload = Bytes::from(payload);

        let mut fbb = flatbuffers::FlatBufferBuilder::new();
        let p = wire::FetchPartitionResult::create(
            &mut fbb,
            &wire::FetchPartitionResultArgs {
                partition: 3,
                high_watermark: 14,
                log_start_offset: 0,
                payload_offset: 0,
                payload_len: payload_len + 20,
                ..Default::default()
            },
        );
        let partitions = fbb.create_vector(&[p]);
        let name = fbb.create_string("t");
        let topic = wire::FetchTopicResult::create(
            &mut fbb,
            &wire::FetchTopicResultArgs { name: Some(name), partitions: Some(partitions) },
        );
        let topics = fbb.create_vector(&[topic]);
        let body = wire::FetchResponse::create(&mut fbb, &wire::FetchResponseArgs { topics: Some(topics) });
        fbb.finish(body, None);
        let body = flatbuffers::root::<wire::FetchResponse>(fbb.finished_data()).unwrap();
        let result = body.topics().unwrap().get(0).partitions().unwrap().get(0);

        let mut records = Vec::new();
        c.apply_partition("test:1", &payload, 0, result, &mut records).unwrap();
        let got: Vec<(i64, &[u8], &[u8])> = records
            .iter()
            .map(|r| (r.offset, &r.key.as_ref().unwrap()[..], &r.value.as_ref().unwrap()[..]))
            .collect();
        assert_eq!(got, vec![(11, &b"k1"[..], &b"b"[..]), (12, b"k2", b"c"), (13, b"k0", b"d")]);
        assert_eq!(records[0].timestamp_ms, 1001);
        assert_eq!(c.position("t", 3), Some(14));
        assert_eq!(c.high_watermark("t", 3), Some(14));
        // Zero-copy: the value points into the payload buffer.
        let v = records[0].value.as_ref().unwrap();
        let range = payload.as_ptr() as usize..payload.as_ptr() as usize + payload.len();
        assert!(range.contains(&(v.as_ptr() as usize)));
    }
}
