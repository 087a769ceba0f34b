//! Idempotent producers (issue 13): one per group, with up to `max_in_flight` batches
//! unacknowledged, each retried — the same producer id, epoch, sequence and records — at whichever
//! node leads when its answer is late, as Kafka's producer retries after a timeout or a
//! NOT_LEADER_OR_FOLLOWER. The leader decides with the broker's own check
//! (`shard::replica::propose_checked`, what `PartitionReplica::propose` runs, over the
//! producer state the simulated disk rebuilds as the partition does). The checker then holds
//! them to "every acknowledged record exactly once, nothing twice", so a retry written a second
//! time fails the run, and to "an answer never changes": a retry answered with other offsets
//! than the original's fails it too. And a retry of a batch already committed must be answered
//! as a duplicate, not refused, by whichever replica leads: also by one whose log restarted from
//! a snapshot past the batch (it knows it only from the producers the snapshot carried).

use std::collections::VecDeque;

use ringlog::record::builder::BatchBuilder;
use ringlog::replication::group::Role;
use ringlog::replication::rng::SeededRng;
use ringlog::shard::replica::{propose_checked, ProposalRefused};
use ringlog::storage::StorageError;

use super::{group_key, Event, MoreEvent, World};

#[derive(Debug, Clone)]
pub struct IdempotentLoad {
    /// Between two sends (0: no idempotent producers in this seed).
    pub every_ms: u64,
    pub max_in_flight: usize,
    /// A batch unanswered this long is sent again.
    pub retry_ms: u64,
}

impl IdempotentLoad {
    pub fn from_seed(rng: &mut SeededRng) -> IdempotentLoad {
        IdempotentLoad {
            every_ms: if rng.chance(700_000) { rng.range(5, 40) } else { 0 },
            max_in_flight: rng.range(1, 6) as usize,
            retry_ms: rng.range(50, 600),
        }
    }
}

#[derive(Debug)]
struct InFlight {
    sequence: i32,
    ids: Vec<u64>,
    timestamp: i64,
    sent_at: u64,
}

#[derive(Debug)]
pub struct Producer {
    partition: u32,
    producer_id: i64,
    next_sequence: i32,
    in_flight: VecDeque<InFlight>,
}

impl Producer {
    pub fn new(partition: u32) -> Producer {
        Producer {
            partition,
            producer_id: 1_000 + i64::from(partition),
            next_sequence: 0,
            in_flight: VecDeque::new(),
        }
    }

    fn batch(&self, batch: &InFlight) -> bytes::BytesMut {
        let mut builder = BatchBuilder::new();
        for id in &batch.ids {
            builder.push(batch.timestamp, None, Some(&id.to_be_bytes()), &[]);
        }
        let mut b = builder.finish();
        // Producer id, epoch and base sequence (RecordBatch v2 header), then the crc over them.
        b[43..51].copy_from_slice(&self.producer_id.to_be_bytes());
        b[51..53].copy_from_slice(&0i16.to_be_bytes());
        b[53..57].copy_from_slice(&batch.sequence.to_be_bytes());
        let crc = crc32c::crc32c(&b[21..]);
        b[17..21].copy_from_slice(&crc.to_be_bytes());
        b
    }
}

impl World {
    pub(super) fn schedule_idempotent(&mut self) {
        let every = self.scenario.idempotent.every_ms;
        if every > 0 {
            self.schedule(every, Event::More(MoreEvent::IdempotentProduce));
        }
    }

    /// One round of every producer: forget what was answered, retry what is late, send a new
    /// batch if there is room.
    pub(super) fn idempotent_round(&mut self) {
        // Quiet for the last two seconds, as the other producer.
        if self.now + 2_000 >= self.scenario.fault_ms + self.scenario.settle_ms {
            return;
        }
        let load = self.scenario.idempotent.clone();
        for p in 0..self.producers.len() {
            let mut producer = std::mem::replace(&mut self.producers[p], Producer::new(0));
            while producer
                .in_flight
                .front()
                .is_some_and(|b| b.ids.iter().all(|id| self.checker.is_acknowledged(*id)))
            {
                producer.in_flight.pop_front();
            }
            let late = producer.in_flight.front().is_some_and(|b| self.now >= b.sent_at + load.retry_ms);
            if late {
                // Kafka's producer sends its unanswered batches again in order.
                for i in 0..producer.in_flight.len() {
                    self.send_idempotent(&mut producer, i);
                }
            } else if producer.in_flight.len() < load.max_in_flight {
                let records = self.more_rng.range(1, 4);
                let ids = (0..records)
                    .map(|_| {
                        self.next_record += 1;
                        self.next_record
                    })
                    .collect();
                let sequence = producer.next_sequence;
                producer.next_sequence += records as i32;
                producer.in_flight.push_back(InFlight {
                    sequence,
                    ids,
                    timestamp: self.now as i64,
                    sent_at: 0,
                });
                let last = producer.in_flight.len() - 1;
                self.send_idempotent(&mut producer, last);
            }
            self.producers[p] = producer;
        }
        self.schedule(load.every_ms, Event::More(MoreEvent::IdempotentProduce));
    }

    fn send_idempotent(&mut self, producer: &mut Producer, i: usize) {
        let key = group_key(producer.partition);
        producer.in_flight[i].sent_at = self.now;
        let leaders: Vec<u64> = self
            .nodes
            .iter()
            .filter(|n| n.alive && n.paused_until.is_none())
            .filter(|n| n.groups.get(&key).is_some_and(|g| g.role() == Role::Leader))
            .map(|n| n.id)
            .collect();
        let Some(&leader) = leaders.get(self.more_rng.range(0, leaders.len().max(1) as u64) as usize) else {
            return;
        };
        let batch = producer.batch(&producer.in_flight[i]);
        let (sequence, ids) = (producer.in_flight[i].sequence, producer.in_flight[i].ids.clone());
        let node = self.node(leader);
        let (Some(group), Some(disk)) = (node.groups.get_mut(&key), node.disks.get(&key)) else { return };
        let result = propose_checked(group, batch, disk.end_offset(), |header, pending| {
            disk.producers().check_proposal(header, pending)
        });
        let log_start = disk.start_offset();
        let g = producer.partition;
        match result {
            Ok(proposed) => {
                self.log(|| {
                    format!(
                        "n{leader} p{g} {} producer {} sequence {sequence} {ids:?} at offset {}{}",
                        if proposed.retry { "answered a retry of" } else { "proposed" },
                        producer.producer_id,
                        proposed.base_offset,
                        if proposed.base_offset < log_start { ", below its log start" } else { "" }
                    )
                });
                self.checker.proposed(key, leader, proposed, ids);
                self.drive(leader);
            }
            Err(ProposalRefused::Producer(StorageError::ProducerFenced { .. })) => {
                // Nothing fences this producer's only epoch.
                self.checker.fail(format!(
                    "n{leader} p{g}: producer {} fenced at sequence {sequence}",
                    producer.producer_id
                ));
            }
            Err(ProposalRefused::Producer(e)) if ids.iter().all(|id| self.checker.is_committed(*id)) => {
                self.checker.fail(format!(
                    "n{leader} p{g}: a retry of producer {} sequence {sequence}, committed, refused: {e}",
                    producer.producer_id
                ));
            }
            Err(e) => self.log(|| format!("n{leader} p{g} refused producer sequence {sequence}: {e}")),
        }
    }
}
