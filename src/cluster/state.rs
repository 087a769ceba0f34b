//! The controller's state machine, without IO: what applying the controller's committed log
//! entries, in order, makes of the cluster's metadata — the registered nodes and the replicated
//! topics (names, ids, replica sets) — and what each applied command answers its proposer.
//!
//! Owns: `ControllerCommand` and `TopicCommand` (the log's contents), `ReplicatedTopic`, the
//! placement rule (`place`), the request ids applied lately, and `ControllerState::apply`, the
//! one place that decides a command's outcome. Decided when applied, from the state as the log
//! leaves it at that index, so every node computes the same answer without the leader shipping
//! outcomes. What a node then *does* (open or remove replicas, show topics on its shards, answer
//! the waiting client) is the caller's: `cluster` in the broker, the simulator's node in
//! `ringlog-sim`, which runs this very code.
//! May depend on `shard::replicated` (the `Replication` a topic carries), `shard::BrokerError`
//! (the outcome's error), `metadata`, `record` (decoding an entry's batch); never on tasks,
//! files, sockets or clocks.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::transport::NodeInfo;
use crate::metadata::{TopicOverrides, OFFSETS_TOPIC};
use crate::shard::replicated::Replication;
use crate::shard::BrokerError;

/// What the controller's log holds: one command per entry, a JSON record value.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControllerCommand {
    Register(NodeInfo),
    Topic(TopicCommand),
}

/// A topic change in the controller's log. A new kind is a new variant: entries written before
/// it still read as they were.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopicCommand {
    Create {
        request: u64,
        name: String,
        partitions: u32,
        replication_factor: u16,
        overrides: TopicOverrides,
    },
    Delete {
        request: u64,
        name: String,
    },
    /// Raises the topic's partition count to `partitions` (the new total, as Kafka's
    /// CreatePartitions asks): applied twice, the second finds the count reached and is refused.
    Grow {
        request: u64,
        name: String,
        partitions: u32,
    },
}

impl TopicCommand {
    pub fn request(&self) -> u64 {
        match self {
            TopicCommand::Create { request, .. }
            | TopicCommand::Delete { request, .. }
            | TopicCommand::Grow { request, .. } => *request,
        }
    }
}

/// A replicated topic as the controller's log defines it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicatedTopic {
    pub name: String,
    pub replication: Arc<Replication>,
    pub overrides: TopicOverrides,
}

/// What applying a topic change answers the node that waits on it.
pub type Applied = Result<ReplicatedTopic, BrokerError>;

/// A committed topic change for a node to carry out (open or remove its replicas).
#[derive(Debug, Clone)]
pub enum TopicChange {
    Create(ReplicatedTopic),
    Delete(ReplicatedTopic),
    /// The topic as it grew, and how many partitions it had before (open and serving already).
    Grow(ReplicatedTopic, u32),
}

/// What one command of a committed entry did.
#[derive(Debug)]
pub enum AppliedCommand {
    /// The registry now holds this node as given.
    Registered(NodeInfo),
    /// A topic change, applied for the first time: its outcome, and what nodes must carry out
    /// (nothing when it was refused).
    Topic { request: u64, outcome: Applied, change: Option<TopicChange> },
    /// A topic change whose request id was applied already (handed to two leaders, both
    /// proposed it): skipped, so it changes nothing and answers no one again.
    Repeated { request: u64 },
}

/// An entry that holds no command: the log is damaged or a peer wrote garbage; applying past it
/// would make this node's metadata differ from the others', so the caller stops.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("controller entry {index} is not a batch: {reason}")]
    NotABatch { index: u64, reason: String },
    #[error("controller entry {index} holds no command: {reason}")]
    NotACommand { index: u64, reason: String },
}

/// Replica sets for `partitions` partitions of `replication_factor` copies over `nodes` (sorted
/// ids): partition `p` starts at node `(first + p) mod n` and takes the next ones, so leaders
/// (the first of each set, the preferred leader) spread over the nodes and a topic's id shifts
/// where its first partition lands.
pub fn place(nodes: &[u64], partitions: u32, replication_factor: u16, first: u64) -> Vec<Vec<u64>> {
    let n = nodes.len();
    (0..partitions as usize)
        .map(|p| (0..usize::from(replication_factor)).map(|k| nodes[(first as usize + p + k) % n]).collect())
        .collect()
}

/// The last `RECENT_REQUESTS` request ids applied, oldest first.
#[derive(Debug, Default, Clone)]
struct RecentRequests {
    order: VecDeque<u64>,
    seen: HashSet<u64>,
}

/// A repeat lands within a few leader changes of its first entry; far more than that apart
/// would take thousands of topic changes in between.
const RECENT_REQUESTS: usize = 4096;

impl RecentRequests {
    /// Records `request`; false when it was applied already.
    fn first_time(&mut self, request: u64) -> bool {
        if !self.seen.insert(request) {
            return false;
        }
        self.order.push_back(request);
        if self.order.len() > RECENT_REQUESTS {
            if let Some(oldest) = self.order.pop_front() {
                self.seen.remove(&oldest);
            }
        }
        true
    }
}

/// The cluster's metadata as the controller's log defines it up to the last entry applied.
#[derive(Debug, Default, Clone)]
pub struct ControllerState {
    registered: BTreeMap<u64, NodeInfo>,
    topics: BTreeMap<String, ReplicatedTopic>,
    /// Request ids of the latest topic changes applied: a change handed to a second leader
    /// after the first one proposed it too is in the log twice, and only its first entry
    /// counts. Every node applies the same log, so every node skips the same entries.
    recent: RecentRequests,
}

/// The data of the entry that proposes `command`: a one-record batch whose value is the command
/// as JSON (`timestamp_ms` is the record's).
pub fn encode_command(
    command: &ControllerCommand,
    timestamp_ms: i64,
) -> Result<bytes::BytesMut, serde_json::Error> {
    let value = serde_json::to_vec(command)?;
    let mut batch = crate::record::builder::BatchBuilder::new();
    batch.push(timestamp_ms, None, Some(&value), &[]);
    Ok(batch.finish())
}

/// Reads the commands of one entry's data (a record batch, one JSON command per record; an
/// empty entry, a new leader's, holds none).
pub fn decode_entry(index: u64, data: &[u8]) -> Result<Vec<ControllerCommand>, EntryError> {
    if data.is_empty() {
        return Ok(Vec::new());
    }
    let records = crate::record::reader::records(data)
        .map_err(|e| EntryError::NotABatch { index, reason: e.to_string() })?;
    records
        .map(|record| {
            let record = record.map_err(|e| EntryError::NotABatch { index, reason: e.to_string() })?;
            serde_json::from_slice(record.value.unwrap_or_default())
                .map_err(|e| EntryError::NotACommand { index, reason: e.to_string() })
        })
        .collect()
}

impl ControllerState {
    /// The registry: every registered node by id.
    pub fn registered(&self) -> &BTreeMap<u64, NodeInfo> {
        &self.registered
    }

    /// Every replicated topic by name.
    pub fn topics(&self) -> &BTreeMap<String, ReplicatedTopic> {
        &self.topics
    }

    /// The nodes of `known` that the registry lacks or holds with other addresses (a restarted
    /// node with new ports): the controller's leader proposes a registration for each.
    pub fn stale_registrations<'a>(
        &self,
        known: impl IntoIterator<Item = &'a NodeInfo>,
    ) -> Vec<&'a NodeInfo> {
        known.into_iter().filter(|info| self.registered.get(&info.id) != Some(*info)).collect()
    }

    /// The replication factor `__consumer_offsets` is created with, once it is due: it does not
    /// exist yet and as many nodes have registered as min(3, voters) (Kafka's
    /// `offsets.topic.replication.factor`; created earlier, it would keep fewer copies for good).
    pub fn offsets_topic_due(&self, voters: usize) -> Option<u16> {
        let replication_factor = voters.min(3);
        let due = !self.topics.contains_key(OFFSETS_TOPIC) && self.registered.len() >= replication_factor;
        due.then_some(replication_factor as u16)
    }

    /// Applies committed entry `index` (its data as the log holds it). The whole entry is read
    /// before any command applies, so an entry that holds no command changes nothing.
    pub fn apply(&mut self, index: u64, data: &[u8]) -> Result<Vec<AppliedCommand>, EntryError> {
        let commands = decode_entry(index, data)?;
        Ok(commands.into_iter().map(|command| self.apply_command(index, command)).collect())
    }

    /// Applies one command of entry `index`.
    pub fn apply_command(&mut self, index: u64, command: ControllerCommand) -> AppliedCommand {
        let command = match command {
            ControllerCommand::Register(info) => {
                self.registered.insert(info.id, info.clone());
                return AppliedCommand::Registered(info);
            }
            ControllerCommand::Topic(command) => command,
        };
        let request = command.request();
        if !self.recent.first_time(request) {
            return AppliedCommand::Repeated { request };
        }
        let registered: Vec<u64> = self.registered.keys().copied().collect();
        let decided = match command {
            TopicCommand::Create { name, partitions, replication_factor, overrides, .. } => {
                self.create(index, name, partitions, replication_factor, overrides, &registered)
            }
            TopicCommand::Delete { name, .. } => match self.topics.remove(&name) {
                Some(topic) => Ok((topic.clone(), TopicChange::Delete(topic))),
                None => Err(BrokerError::UnknownTopic { topic: name }),
            },
            TopicCommand::Grow { name, partitions, .. } => self.grow(name, partitions, &registered),
        };
        match decided {
            Ok((topic, change)) => {
                AppliedCommand::Topic { request, outcome: Ok(topic), change: Some(change) }
            }
            Err(refused) => AppliedCommand::Topic { request, outcome: Err(refused), change: None },
        }
    }

    fn create(
        &mut self,
        index: u64,
        name: String,
        partitions: u32,
        replication_factor: u16,
        overrides: TopicOverrides,
        registered: &[u64],
    ) -> Result<(ReplicatedTopic, TopicChange), BrokerError> {
        if self.topics.contains_key(&name) {
            return Err(BrokerError::TopicAlreadyExists { topic: name });
        }
        if replication_factor == 0 || usize::from(replication_factor) > registered.len() {
            return Err(BrokerError::InvalidReplicationFactor(format!(
                "replication factor {replication_factor} for topic '{name}': the cluster has {} registered \
                 nodes ({registered:?}); choose 1 to {}",
                registered.len(),
                registered.len()
            )));
        }
        // The entry's index is new at every creation and the same on every node.
        let topic_id = u128::from(index);
        let replicas = place(registered, partitions, replication_factor, index);
        let topic = ReplicatedTopic {
            name: name.clone(),
            replication: Arc::new(Replication { topic_id, replicas }),
            overrides,
        };
        self.topics.insert(name, topic.clone());
        Ok((topic.clone(), TopicChange::Create(topic)))
    }

    /// Adds partitions to a topic, placed as `place` would have placed them had the topic been
    /// created with `partitions` over the nodes registered now: with the same nodes, the spread
    /// of preferred leaders carries on where the topic's first partitions left it.
    fn grow(
        &mut self,
        name: String,
        partitions: u32,
        registered: &[u64],
    ) -> Result<(ReplicatedTopic, TopicChange), BrokerError> {
        let Some(topic) = self.topics.get(&name).cloned() else {
            return Err(BrokerError::UnknownTopic { topic: name });
        };
        let had = topic.replication.replicas.len();
        if partitions as usize <= had {
            return Err(BrokerError::InvalidPartitions(format!(
                "topic '{name}' has {had} partitions; the count can only grow, not to {partitions}"
            )));
        }
        // Every partition of a topic has the replication factor it was created with.
        let replication_factor = topic.replication.replicas.first().map_or(0, Vec::len);
        if replication_factor == 0 || replication_factor > registered.len() {
            return Err(BrokerError::InvalidReplicationFactor(format!(
                "topic '{name}' keeps {replication_factor} copies of each partition but the cluster has {} \
                 registered nodes ({registered:?})",
                registered.len()
            )));
        }
        let first = topic.replication.topic_id as u64;
        let mut replicas = topic.replication.replicas.clone();
        replicas
            .extend(place(registered, partitions, replication_factor as u16, first).into_iter().skip(had));
        let grown = ReplicatedTopic {
            replication: Arc::new(Replication { topic_id: topic.replication.topic_id, replicas }),
            ..topic
        };
        self.topics.insert(name, grown.clone());
        Ok((grown.clone(), TopicChange::Grow(grown, had as u32)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::builder::BatchBuilder;

    #[test]
    fn placement_spreads_leaders_and_never_repeats_a_node_in_a_set() {
        let sets = place(&[1, 2, 3], 6, 3, 0);
        let leaders: Vec<u64> = sets.iter().map(|s| s[0]).collect();
        assert_eq!(leaders, vec![1, 2, 3, 1, 2, 3]);
        for set in &sets {
            let mut sorted = set.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), 3, "{set:?}");
        }
        assert_eq!(place(&[1, 2, 3, 4], 2, 2, 5), vec![vec![2, 3], vec![3, 4]]);
        assert_eq!(place(&[7], 2, 1, 9), vec![vec![7], vec![7]]);
    }

    fn node(id: u64) -> ControllerCommand {
        ControllerCommand::Register(NodeInfo {
            id,
            peer: format!("127.0.0.{id}:9100"),
            native: format!("127.0.0.{id}:9092"),
            kafka: None,
            admin: format!("127.0.0.{id}:9644"),
        })
    }

    fn create(request: u64, name: &str, partitions: u32, replication_factor: u16) -> ControllerCommand {
        ControllerCommand::Topic(TopicCommand::Create {
            request,
            name: name.into(),
            partitions,
            replication_factor,
            overrides: TopicOverrides::default(),
        })
    }

    fn grow(request: u64, name: &str, partitions: u32) -> ControllerCommand {
        ControllerCommand::Topic(TopicCommand::Grow { request, name: name.into(), partitions })
    }

    fn delete(request: u64, name: &str) -> ControllerCommand {
        ControllerCommand::Topic(TopicCommand::Delete { request, name: name.into() })
    }

    fn entry_data(command: &ControllerCommand) -> bytes::BytesMut {
        encode_command(command, 0).unwrap()
    }

    /// Applies `command` at `index` and returns its outcome (`None`: a repeat, or a registration).
    fn outcome(state: &mut ControllerState, index: u64, command: ControllerCommand) -> Option<Applied> {
        let applied = state.apply(index, &entry_data(&command)).unwrap();
        match applied.into_iter().next() {
            Some(AppliedCommand::Topic { outcome, .. }) => Some(outcome),
            _ => None,
        }
    }

    fn three_nodes() -> ControllerState {
        let mut state = ControllerState::default();
        for id in [3, 1, 2] {
            assert!(outcome(&mut state, id, node(id)).is_none());
        }
        assert_eq!(state.registered().keys().copied().collect::<Vec<_>>(), vec![1, 2, 3]);
        state
    }

    #[test]
    fn a_grown_topic_keeps_its_partitions_and_places_new_ones_as_a_creation_of_that_count_would() {
        let mut state = three_nodes();
        let nodes = [1, 2, 3];
        let created =
            outcome(&mut state, 7, create(1, "likes", 2, 2)).and_then(Result::ok).map(|t| t.replication);
        let grown = outcome(&mut state, 9, grow(2, "likes", 5)).and_then(Result::ok).map(|t| t.replication);
        let (Some(created), Some(grown)) = (created, grown) else {
            panic!("create, then grow, both applied")
        };
        assert_eq!(grown.topic_id, created.topic_id, "the same topic");
        assert_eq!(grown.replicas[..2], created.replicas[..], "existing partitions untouched");
        assert_eq!(grown.replicas, place(&nodes, 5, 2, 7), "the spread carries on");
        assert_eq!(state.topics()["likes"].replication, grown);

        // Refused when applied, changing nothing: the same count or fewer, an unknown name.
        for (request, name, partitions) in [(3, "likes", 5), (4, "likes", 3), (5, "nobody", 9)] {
            let refused = outcome(&mut state, 10 + request, grow(request, name, partitions));
            match (name, refused) {
                ("nobody", Some(Err(BrokerError::UnknownTopic { topic }))) => assert_eq!(topic, "nobody"),
                (_, Some(Err(BrokerError::InvalidPartitions(message)))) => {
                    assert!(message.contains("has 5 partitions"), "{message}")
                }
                (_, other) => panic!("grow {name} to {partitions}: {other:?}"),
            }
        }
        // A grow handed to two leaders is in the log twice; the second entry is skipped.
        let repeated = state.apply(20, &entry_data(&grow(2, "likes", 6))).unwrap();
        assert!(matches!(repeated[..], [AppliedCommand::Repeated { request: 2 }]));
        assert_eq!(state.topics()["likes"].replication, grown);
    }

    #[test]
    fn a_re_created_name_is_another_topic_and_a_repeated_create_never_brings_back_a_deleted_one() {
        let mut state = three_nodes();
        let first = outcome(&mut state, 4, create(10, "likes", 1, 3)).and_then(Result::ok);
        assert_eq!(first.map(|t| t.replication.topic_id), Some(4));
        assert!(matches!(
            outcome(&mut state, 5, create(11, "likes", 1, 3)),
            Some(Err(BrokerError::TopicAlreadyExists { .. }))
        ));
        assert!(matches!(outcome(&mut state, 6, delete(12, "likes")), Some(Ok(_))));
        // The first create, handed again to a new leader, is in the log again: skipped.
        assert!(outcome(&mut state, 7, create(10, "likes", 1, 3)).is_none());
        assert!(state.topics().is_empty());
        let again = outcome(&mut state, 8, create(13, "likes", 2, 1)).and_then(Result::ok);
        assert_eq!(again.map(|t| t.replication.topic_id), Some(8), "a new id for the new topic");
        assert!(matches!(
            outcome(&mut state, 9, create(14, "wide", 1, 4)),
            Some(Err(BrokerError::InvalidReplicationFactor(_)))
        ));
    }

    #[test]
    fn the_leader_registers_missing_and_moved_nodes_and_creates_the_offsets_topic_once_enough_registered() {
        let mut state = ControllerState::default();
        assert_eq!(state.offsets_topic_due(3), None, "no node registered yet");
        let ControllerCommand::Register(one) = node(1) else { unreachable!() };
        let moved = NodeInfo { native: "127.0.0.1:19092".into(), ..one.clone() };
        assert_eq!(state.stale_registrations([&one]), vec![&one]);
        outcome(&mut state, 1, node(1));
        assert!(state.stale_registrations([&one]).is_empty());
        assert_eq!(state.stale_registrations([&moved]), vec![&moved], "a restart with new ports");
        assert_eq!(state.offsets_topic_due(1), Some(1));
        assert_eq!(state.offsets_topic_due(5), None, "three of five must have registered");
        outcome(&mut state, 2, node(2));
        outcome(&mut state, 3, node(3));
        assert_eq!(state.offsets_topic_due(5), Some(3));
        assert!(matches!(outcome(&mut state, 4, create(1, OFFSETS_TOPIC, 2, 3)), Some(Ok(_))));
        assert_eq!(state.offsets_topic_due(5), None, "created");
    }

    #[test]
    fn an_entry_without_a_command_changes_nothing() {
        let mut state = three_nodes();
        assert!(matches!(state.apply(4, b"garbage"), Err(EntryError::NotABatch { index: 4, .. })));
        let mut batch = BatchBuilder::new();
        batch.push(0, None, Some(b"{\"nonsense\":1}"), &[]);
        assert!(matches!(state.apply(5, &batch.finish()), Err(EntryError::NotACommand { index: 5, .. })));
        assert!(state.apply(6, b"").is_ok_and(|applied| applied.is_empty()), "a new leader's entry");
        assert_eq!(state.registered().len(), 3);
        assert!(state.topics().is_empty());
    }

    #[test]
    fn a_grow_is_written_to_the_log_as_a_variant_of_its_own() {
        let ControllerCommand::Topic(command) = grow(5, "likes", 4) else { unreachable!() };
        let encoded = serde_json::to_string(&command).ok();
        assert_eq!(encoded.as_deref(), Some(r#"{"grow":{"request":5,"name":"likes","partitions":4}}"#));
        // Entries written before it read as they did.
        let old = r#"{"delete":{"request":6,"name":"likes"}}"#;
        assert!(matches!(serde_json::from_str(old), Ok(TopicCommand::Delete { request: 6, .. })));
    }

    #[test]
    fn a_request_id_counts_once_among_the_recent_ones() {
        let mut recent = RecentRequests::default();
        assert!(recent.first_time(7));
        assert!(!recent.first_time(7), "a repeat is skipped");
        for request in 100..100 + RECENT_REQUESTS as u64 {
            assert!(recent.first_time(request));
        }
        assert_eq!(recent.order.len(), RECENT_REQUESTS);
        assert!(recent.first_time(7), "forgotten once it is old");
    }
}
