//! A consumer task's Kafka side: its share of the partitions read from the beginning with Fetch
//! requests to each partition's leader, and each message's end-to-end latency.
//!
//! Owns: positions (the log start, from ListOffsets, then one past the last whole batch fetched),
//! one fetch in flight per leader connection, and reading records straight out of the response
//! (`ringlog::record`: batches validated by crc32c, records borrowed, nothing copied). The next
//! fetch to a leader is sent as soon as the batch headers of its last answer are walked, before
//! the records are read, so the broker works on it meanwhile. No consumer group: the run hands
//! each consumer its partitions, as the native path does.

use std::sync::Arc;
use std::time::Duration;

use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::{FetchRequest, FetchResponse, TopicName};
use kafka_protocol::protocol::StrBytes;
use ringlog::record::reader::{self, DECOMPRESSED_BYTES_MAX_DEFAULT};
use ringlog::record::{batches, BatchHeader};
use tokio::sync::mpsc;

use super::cluster::{
    list_offsets_request, list_offsets_response, Layout, EARLIEST_TIMESTAMP, REQUEST_TIMEOUT,
};
use super::connection::{Connection, Responses};
use super::{describe, KafkaError, Result};
use crate::message;
use crate::stats::Recorder;

/// The broker answers once it has this much, or after the consumer's poll wait.
const FETCH_MIN_BYTES: i32 = 1;
/// The Java consumer's defaults, and the native consumer's.
const PARTITION_FETCH_BYTES_MAX: i32 = 1 << 20;
const FETCH_BYTES_MAX: i32 = 50 << 20;
/// RecordBatch attributes bit: a control batch (transaction marker), not messages.
const ATTRIBUTE_CONTROL: i16 = 0x20;

struct Assigned {
    topic: Arc<str>,
    name: TopicName,
    partition: u32,
    /// The next offset to fetch.
    position: i64,
}

struct FetchLeader {
    conn: Connection,
    /// Positions in `Consumer::assigned` of the partitions it leads.
    assigned: Vec<usize>,
    fetching: bool,
    /// Why the connection is no longer used.
    failed: Option<String>,
}

pub struct Consumer {
    assigned: Vec<Assigned>,
    assignment: Vec<(Arc<str>, u32)>,
    leaders: Vec<FetchLeader>,
    responses: Responses,
    max_wait: Duration,
    /// Reused: for each partition of the response being read, its position in `assigned` and the
    /// offset the fetch started at (records before it are not new).
    reading: Vec<Option<(usize, i64)>>,
}

impl Consumer {
    /// Connects to the leaders of `partitions` and positions each at its log start. Each fetch
    /// waits at most `max_wait` for data.
    pub async fn connect(
        layout: &Layout,
        partitions: &[(String, u32)],
        max_wait: Duration,
    ) -> Result<Consumer> {
        let (tx, mut responses) = mpsc::unbounded_channel();
        let mut nodes: Vec<i32> = Vec::new();
        let mut leaders: Vec<FetchLeader> = Vec::new();
        let mut assigned = Vec::with_capacity(partitions.len());
        for (i, (topic, partition)) in partitions.iter().enumerate() {
            let node = layout.leaders(topic).and_then(|l| l.get(*partition as usize)).copied();
            let addr = node.and_then(|n| layout.broker(n)).ok_or_else(|| KafkaError::Broker {
                what: format!("consuming {topic}/{partition}"),
                code: 5,
                message: Some("no known leader".into()),
            })?;
            let node = node.unwrap_or(-1);
            let l = match nodes.iter().position(|n| *n == node) {
                Some(l) => l,
                None => {
                    let conn = Connection::connect(addr, leaders.len(), tx.clone()).await?;
                    leaders.push(FetchLeader { conn, assigned: Vec::new(), fetching: false, failed: None });
                    nodes.push(node);
                    leaders.len() - 1
                }
            };
            leaders[l].assigned.push(i);
            assigned.push(Assigned {
                topic: Arc::from(topic.as_str()),
                name: TopicName(StrBytes::from_string(topic.clone())),
                partition: *partition,
                position: 0,
            });
        }
        drop(tx);
        for leader in &mut leaders {
            let listed: Vec<(&String, u32)> =
                leader.assigned.iter().map(|&i| (&partitions[i].0, partitions[i].1)).collect();
            leader.conn.send(&list_offsets_request(&listed, EARLIEST_TIMESTAMP)).await?;
            let response = tokio::time::timeout(REQUEST_TIMEOUT, responses.recv())
                .await
                .map_err(|_| KafkaError::Timeout {
                    what: format!("ListOffsets to {}", leader.conn.addr()),
                    seconds: REQUEST_TIMEOUT.as_secs(),
                })?
                .ok_or_else(|| KafkaError::Closed { addr: leader.conn.addr().to_string() })?;
            let offsets = list_offsets_response(
                leader.conn.decode::<kafka_protocol::messages::ListOffsetsRequest>(response.frame?)?,
            )?;
            for (topic, partition, offset) in offsets {
                if let Some(a) = assigned.iter_mut().find(|a| *a.topic == *topic && a.partition == partition)
                {
                    a.position = offset;
                }
            }
        }
        let assignment = assigned.iter().map(|a| (a.topic.clone(), a.partition)).collect();
        Ok(Consumer { assigned, assignment, leaders, responses, max_wait, reading: Vec::new() })
    }

    pub fn assignment(&self) -> &[(Arc<str>, u32)] {
        &self.assignment
    }

    /// The next offset to read from a partition.
    pub fn position(&self, topic: &str, partition: u32) -> Option<i64> {
        self.assigned.iter().find(|a| &*a.topic == topic && a.partition == partition).map(|a| a.position)
    }

    /// Waits for one fetch response (at most the fetch's max wait, plus the network) and records
    /// every new message in it.
    pub async fn poll(&mut self, recorder: &Recorder) -> std::result::Result<(), String> {
        let mut waiting = false;
        for l in 0..self.leaders.len() {
            if self.leaders[l].failed.is_none() && !self.leaders[l].fetching {
                if let Err(e) = self.send_fetch(l).await {
                    self.leaders[l].failed = Some(e);
                }
            }
            waiting |= self.leaders[l].fetching;
        }
        if !waiting {
            let failed = self.leaders.iter().find_map(|l| l.failed.clone());
            return Err(failed.unwrap_or_else(|| "no partitions to fetch".to_string()));
        }
        let response = tokio::time::timeout(REQUEST_TIMEOUT, self.responses.recv())
            .await
            .map_err(|_| format!("no Fetch response within {} s", REQUEST_TIMEOUT.as_secs()))?
            .ok_or_else(|| "every fetch connection closed".to_string())?;
        let l = response.connection;
        let leader = &mut self.leaders[l];
        leader.fetching = false;
        // A connection that failed or sent what cannot be decoded is not used again.
        let decoded = match response.frame {
            Ok(frame) => leader.conn.decode::<FetchRequest>(frame),
            Err(e) => Err(e),
        };
        let body = decoded.map_err(|e| leader.failed.insert(e.to_string()).clone())?;
        if body.error_code != 0 {
            return Err(format!("fetch from {}: {}", leader.conn.addr(), describe(body.error_code)));
        }
        let first_error = self.advance_positions(l, &body);
        if let Err(e) = self.send_fetch(l).await {
            self.leaders[l].failed = Some(e);
        }
        self.record(&body, recorder);
        first_error.map_or(Ok(()), Err)
    }

    /// Walks the batch headers of each partition's records to move its position past the last
    /// whole batch, noting in `reading` where each started. Returns the first partition error.
    fn advance_positions(&mut self, l: usize, body: &FetchResponse) -> Option<String> {
        let leader = &self.leaders[l];
        self.reading.clear();
        let mut first_error = None;
        let mut hint = 0;
        for topic in &body.responses {
            for p in &topic.partitions {
                let found = leader
                    .assigned
                    .get(hint)
                    .copied()
                    .filter(|&i| is(&self.assigned[i], &topic.topic, p.partition_index))
                    .or_else(|| {
                        leader
                            .assigned
                            .iter()
                            .copied()
                            .find(|&i| is(&self.assigned[i], &topic.topic, p.partition_index))
                    });
                hint += 1;
                let Some(i) = found else {
                    self.reading.push(None);
                    continue;
                };
                let a = &mut self.assigned[i];
                if p.error_code != 0 {
                    first_error.get_or_insert_with(|| {
                        format!("fetch {}/{}: {}", a.topic, a.partition, describe(p.error_code))
                    });
                    self.reading.push(None);
                    continue;
                }
                let start = a.position;
                if let Some(next) = p.records.as_deref().and_then(next_offset) {
                    a.position = a.position.max(next);
                }
                self.reading.push(Some((i, start)));
            }
        }
        first_error
    }

    /// Records the messages at or after each partition's fetch offset.
    fn record(&self, body: &FetchResponse, recorder: &Recorder) {
        let now_us = recorder.clock.now_micros();
        let mut stats = recorder.stats.lock();
        let partitions = body.responses.iter().flat_map(|t| &t.partitions);
        for (p, reading) in partitions.zip(&self.reading) {
            let (Some((i, start)), Some(records)) = (reading, p.records.as_deref()) else { continue };
            let a = &self.assigned[*i];
            for batch in batches(records) {
                let (header, bytes) = match batch {
                    Ok(b) => b,
                    Err((at, e)) => {
                        stats.error(format!(
                            "fetch {}/{}: batch at byte {at} of the records: {e}",
                            a.topic, a.partition
                        ));
                        break;
                    }
                };
                if header.attributes & ATTRIBUTE_CONTROL != 0 || header.last_offset() < *start {
                    continue;
                }
                let decoded = match reader::decode(bytes, DECOMPRESSED_BYTES_MAX_DEFAULT) {
                    Ok(d) => d,
                    Err(e) => {
                        stats.error(format!(
                            "fetch {}/{} offset {}: {e}",
                            a.topic, a.partition, header.base_offset
                        ));
                        continue;
                    }
                };
                for record in decoded.iter() {
                    match record {
                        Ok(r) if r.offset >= *start => {
                            let value = r.value.unwrap_or_default();
                            stats.consumed(
                                message::read_header(value),
                                now_us,
                                value.len(),
                                &recorder.window,
                            );
                        }
                        Ok(_) => {}
                        Err(e) => {
                            stats.error(format!(
                                "fetch {}/{} batch at offset {}: {e}",
                                a.topic, a.partition, header.base_offset
                            ));
                            break;
                        }
                    }
                }
            }
        }
    }

    async fn send_fetch(&mut self, l: usize) -> std::result::Result<(), String> {
        let leader = &mut self.leaders[l];
        let mut topics: Vec<FetchTopic> = Vec::new();
        for &i in &leader.assigned {
            let a = &self.assigned[i];
            let partition = FetchPartition::default()
                .with_partition(a.partition as i32)
                .with_fetch_offset(a.position)
                .with_partition_max_bytes(PARTITION_FETCH_BYTES_MAX);
            match topics.last_mut() {
                Some(t) if t.topic == a.name => t.partitions.push(partition),
                _ => topics
                    .push(FetchTopic::default().with_topic(a.name.clone()).with_partitions(vec![partition])),
            }
        }
        let request = FetchRequest::default()
            .with_max_wait_ms(self.max_wait.as_millis() as i32)
            .with_min_bytes(FETCH_MIN_BYTES)
            .with_max_bytes(FETCH_BYTES_MAX)
            .with_isolation_level(0)
            .with_session_id(0)
            .with_session_epoch(-1)
            .with_topics(topics);
        leader.conn.send(&request).await.map_err(|e| e.to_string())?;
        leader.fetching = true;
        Ok(())
    }
}

fn is(a: &Assigned, topic: &TopicName, partition: i32) -> bool {
    a.partition as i32 == partition && a.name == *topic
}

/// One past the last offset of the last whole batch in `records` (a fetch may end with part of
/// a batch); `None` if there is no whole batch. Headers only: the crc32c is checked when the
/// records are read.
fn next_offset(records: &[u8]) -> Option<i64> {
    let mut at = 0;
    let mut next = None;
    while let Ok(header) = BatchHeader::parse(&records[at..]) {
        let end = at + header.total_len();
        if end > records.len() {
            break;
        }
        next = Some(header.last_offset() + 1);
        at = end;
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringlog::record::builder::BatchBuilder;
    use ringlog::record::set_base_offset;

    fn batch(base_offset: i64, records: usize) -> Vec<u8> {
        let mut b = BatchBuilder::new();
        for _ in 0..records {
            b.push(1, None, Some(b"v"), &[]);
        }
        let mut bytes = b.finish().to_vec();
        set_base_offset(&mut bytes, base_offset);
        bytes
    }

    #[test]
    fn next_offset_stops_at_the_last_whole_batch() {
        let mut records = batch(10, 3);
        records.extend(batch(13, 2));
        assert_eq!(next_offset(&records), Some(15));
        let whole = records.len();
        records.extend(&batch(15, 4)[..30]);
        assert_eq!(next_offset(&records), Some(15), "a partial batch at the end is fetched again");
        assert_eq!(next_offset(&records[..whole - 1]), Some(13));
        assert_eq!(next_offset(&[]), None);
    }
}
