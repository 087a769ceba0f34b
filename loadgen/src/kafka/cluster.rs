//! The Kafka control plane loadgen needs: which brokers there are and which leads each partition
//! (Metadata), creating and deleting the run's topics, and reading offsets (ListOffsets).
//!
//! Owns: the bootstrap connection, one control connection per broker it had to talk to, and the
//! [`Layout`] producers and consumers connect by. Works against any Kafka-protocol cluster: topic
//! changes go to the controller Metadata names (in KRaft clusters any broker forwards them), and
//! offsets are asked of each partition's leader.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use kafka_protocol::messages::delete_topics_request::DeleteTopicState;
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{
    ApiKey, BrokerId, CreateTopicsRequest, DeleteTopicsRequest, ListOffsetsRequest, MetadataRequest,
    TopicName,
};
use kafka_protocol::protocol::StrBytes;
use tokio::sync::mpsc;

use super::connection::{Connection, KafkaRequest, Responses, Versions};
use super::{describe, KafkaError, Result};

/// How long a control request may take, and how long to wait for new topics' leaders.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const LEADERS_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// ListOffsets timestamps: the next offset to be written, and the log start.
pub const LATEST_TIMESTAMP: i64 = -1;
pub const EARLIEST_TIMESTAMP: i64 = -2;
/// Kafka's INVALID_CONFIG: a broker that is not ringlog refuses `ringlog.durability`.
const INVALID_CONFIG: i16 = 40;
/// ringlog's topic config for its durability policy (see the broker's `kafka::admin`).
pub const DURABILITY_CONFIG: &str = "ringlog.durability";

/// What loadgen asks of each topic it creates.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    pub partitions: u32,
    /// -1: the broker's default.
    pub replication_factor: i16,
    /// Topic configs, e.g. `("retention.ms", "60000")`.
    pub configs: Vec<(String, String)>,
}

/// The brokers and the leader of every partition of the run's topics.
#[derive(Debug, Clone, Default)]
pub struct Layout {
    /// Node id → `host:port` as the broker advertises it.
    brokers: HashMap<i32, String>,
    /// Topic → leader node id of each partition, by partition index.
    leaders: HashMap<String, Vec<i32>>,
}

impl Layout {
    pub fn broker(&self, node_id: i32) -> Option<&str> {
        self.brokers.get(&node_id).map(String::as_str)
    }

    pub fn leaders(&self, topic: &str) -> Option<&[i32]> {
        self.leaders.get(topic).map(Vec::as_slice)
    }

    pub fn broker_count(&self) -> usize {
        self.brokers.len()
    }
}

/// A connection used one request at a time.
pub(super) struct Control {
    conn: Connection,
    responses: Responses,
}

impl Control {
    pub(super) async fn connect(addr: &str) -> Result<Control> {
        let (tx, responses) = mpsc::unbounded_channel();
        Ok(Control { conn: Connection::connect(addr, 0, tx).await?, responses })
    }

    pub(super) fn versions(&self) -> &Versions {
        self.conn.versions()
    }

    pub(super) fn version(&self, api: ApiKey) -> Result<i16> {
        self.conn.versions().get(api, self.conn.addr())
    }

    pub(super) async fn call<R: KafkaRequest>(&mut self, request: &R) -> Result<R::Response> {
        self.conn.send(request).await?;
        let what = || format!("{:?} to {}", R::API, self.conn.addr());
        let response = tokio::time::timeout(REQUEST_TIMEOUT, self.responses.recv())
            .await
            .map_err(|_| KafkaError::Timeout { what: what(), seconds: REQUEST_TIMEOUT.as_secs() })?
            .ok_or_else(|| KafkaError::Closed { addr: self.conn.addr().to_string() })?;
        self.conn.decode::<R>(response.frame?)
    }
}

pub struct Cluster {
    bootstrap: String,
    /// The bootstrap connection: Metadata goes here.
    bootstrap_control: Control,
    /// Control connections to brokers by node id, opened when first needed.
    controls: Vec<(i32, Control)>,
    controller_id: i32,
    layout: Layout,
}

impl Cluster {
    /// Connects to the first reachable address of `bootstrap` (`host:port[,host:port...]`) and
    /// reads the cluster's brokers.
    pub async fn connect(bootstrap: &str) -> Result<Cluster> {
        let mut last_error = None;
        for addr in bootstrap.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            match Control::connect(addr).await {
                Ok(control) => {
                    let mut cluster = Cluster {
                        bootstrap: bootstrap.to_string(),
                        bootstrap_control: control,
                        controls: Vec::new(),
                        controller_id: -1,
                        layout: Layout::default(),
                    };
                    cluster.metadata(&[]).await?;
                    return Ok(cluster);
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| KafkaError::Bootstrap {
            bootstrap: bootstrap.to_string(),
            message: "no address given (host:port[,host:port...])".into(),
        }))
    }

    /// The versions negotiated with the bootstrap broker, for the report.
    pub fn versions(&self) -> Vec<(String, i16)> {
        self.bootstrap_control.versions().summary()
    }

    pub fn broker_count(&self) -> usize {
        self.layout.broker_count()
    }

    /// Asks for `topics` (none: brokers only), updates the layout, and returns the topics whose
    /// every partition has a leader the layout knows; the others with why not.
    async fn metadata(&mut self, topics: &[String]) -> Result<Vec<(String, Option<String>)>> {
        let request = MetadataRequest::default()
            .with_topics(Some(
                topics
                    .iter()
                    .map(|t| {
                        MetadataRequestTopic::default()
                            .with_name(Some(TopicName(StrBytes::from_string(t.clone()))))
                    })
                    .collect(),
            ))
            .with_allow_auto_topic_creation(false);
        let response = self.bootstrap_control.call(&request).await?;
        self.controller_id = response.controller_id.0;
        self.layout.brokers =
            response.brokers.iter().map(|b| (b.node_id.0, broker_addr(&b.host, b.port))).collect();
        let mut status = Vec::new();
        for topic in &response.topics {
            let Some(name) = topic.name.as_ref().map(|n| n.0.to_string()) else { continue };
            if topic.error_code != 0 {
                status.push((name, Some(describe(topic.error_code))));
                continue;
            }
            let mut leaders = vec![-1; topic.partitions.len()];
            let mut problem = None;
            for p in &topic.partitions {
                let slot = usize::try_from(p.partition_index).ok().and_then(|i| leaders.get_mut(i));
                match slot {
                    Some(slot) if p.leader_id.0 >= 0 => *slot = p.leader_id.0,
                    _ => {
                        problem.get_or_insert_with(|| {
                            format!(
                                "partition {} has no leader ({})",
                                p.partition_index,
                                describe(p.error_code)
                            )
                        });
                    }
                }
            }
            if problem.is_none() {
                if let Some(node) = leaders.iter().find(|n| !self.layout.brokers.contains_key(n)) {
                    problem = Some(format!("leader {node} is not among the brokers Metadata lists"));
                }
            }
            if problem.is_none() {
                self.layout.leaders.insert(name.clone(), leaders);
            }
            status.push((name, problem));
        }
        Ok(status)
    }

    /// Creates `topics` as `spec` says, waits until each partition has a leader, and returns the
    /// layout. If one cannot be created, the ones that were are deleted again. A broker that is
    /// not ringlog refuses `ringlog.durability`; the topics are then created without it, and a
    /// warning says so.
    pub async fn create_topics(&mut self, topics: &[String], spec: &TopicSpec) -> Result<Layout> {
        let mut spec = spec.clone();
        let mut results = self.create_topics_once(topics, &spec).await?;
        let refused_durability = results.iter().any(|(_, code, _)| *code == INVALID_CONFIG)
            && spec.configs.iter().any(|(k, _)| k == DURABILITY_CONFIG);
        if refused_durability {
            eprintln!(
                "ringlog-loadgen: warning: the broker refused topic config {DURABILITY_CONFIG} (it is not \
                 ringlog); creating the topics without it, so their durability is the broker's own"
            );
            spec.configs.retain(|(k, _)| k != DURABILITY_CONFIG);
            let retry: Vec<String> = results
                .iter()
                .filter(|(_, code, _)| *code == INVALID_CONFIG)
                .map(|(t, _, _)| t.clone())
                .collect();
            let retried = self.create_topics_once(&retry, &spec).await?;
            results.retain(|(_, code, _)| *code != INVALID_CONFIG);
            results.extend(retried);
        }
        let failed = results.iter().find(|(_, code, _)| *code != 0).cloned();
        if let Some((topic, code, message)) = failed {
            let created: Vec<String> =
                results.iter().filter(|(_, code, _)| *code == 0).map(|(t, _, _)| t.clone()).collect();
            if !created.is_empty() {
                let _ = self.delete_topics(&created).await;
            }
            return Err(KafkaError::Broker { what: format!("creating topic {topic}"), code, message });
        }
        self.wait_for_leaders(topics, spec.partitions).await
    }

    /// One CreateTopics request: `(topic, error code, message)` per topic.
    async fn create_topics_once(
        &mut self,
        topics: &[String],
        spec: &TopicSpec,
    ) -> Result<Vec<(String, i16, Option<String>)>> {
        let configs: Vec<CreatableTopicConfig> = spec
            .configs
            .iter()
            .map(|(k, v)| {
                CreatableTopicConfig::default()
                    .with_name(StrBytes::from_string(k.clone()))
                    .with_value(Some(StrBytes::from_string(v.clone())))
            })
            .collect();
        let partitions = i32::try_from(spec.partitions).unwrap_or(i32::MAX);
        let request = CreateTopicsRequest::default()
            .with_topics(
                topics
                    .iter()
                    .map(|t| {
                        CreatableTopic::default()
                            .with_name(TopicName(StrBytes::from_string(t.clone())))
                            .with_num_partitions(partitions)
                            .with_replication_factor(spec.replication_factor)
                            .with_configs(configs.clone())
                    })
                    .collect(),
            )
            .with_timeout_ms(REQUEST_TIMEOUT.as_millis() as i32);
        let response = self.controller().await?.call(&request).await?;
        Ok(response
            .topics
            .into_iter()
            .map(|r| (r.name.0.to_string(), r.error_code, r.error_message.map(|m| m.to_string())))
            .collect())
    }

    /// Polls Metadata until every partition of `topics` has a leader (a real cluster elects them
    /// a moment after CreateTopics answers).
    async fn wait_for_leaders(&mut self, topics: &[String], partitions: u32) -> Result<Layout> {
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        loop {
            let status = self.metadata(topics).await?;
            let pending = topics.iter().find_map(|t| {
                let problem = match status.iter().find(|(name, _)| name == t) {
                    None => Some("not in Metadata yet".to_string()),
                    Some((_, Some(problem))) => Some(problem.clone()),
                    Some((_, None)) => match self.layout.leaders(t) {
                        Some(l) if l.len() == partitions as usize => None,
                        Some(l) => Some(format!("{} partitions, {partitions} expected", l.len())),
                        None => Some("no leaders".to_string()),
                    },
                };
                problem.map(|p| (t.clone(), p))
            });
            let Some((topic, problem)) = pending else { return Ok(self.layout.clone()) };
            if Instant::now() >= deadline {
                return Err(KafkaError::Timeout {
                    what: format!("waiting for the leaders of topic {topic} ({problem})"),
                    seconds: REQUEST_TIMEOUT.as_secs(),
                });
            }
            tokio::time::sleep(LEADERS_POLL_INTERVAL).await;
        }
    }

    pub async fn delete_topics(&mut self, topics: &[String]) -> Result<()> {
        let control = self.controller().await?;
        let version = control.version(ApiKey::DeleteTopics)?;
        let names = topics.iter().map(|t| TopicName(StrBytes::from_string(t.clone())));
        let request = if version >= 6 {
            DeleteTopicsRequest::default()
                .with_topics(names.map(|n| DeleteTopicState::default().with_name(Some(n))).collect())
        } else {
            DeleteTopicsRequest::default().with_topic_names(names.collect())
        }
        .with_timeout_ms(REQUEST_TIMEOUT.as_millis() as i32);
        let response = control.call(&request).await?;
        match response.responses.into_iter().find(|r| r.error_code != 0) {
            None => Ok(()),
            Some(r) => Err(KafkaError::Broker {
                what: format!("deleting topic {}", r.name.map(|n| n.0.to_string()).unwrap_or_default()),
                code: r.error_code,
                message: r.error_message.map(|m| m.to_string()),
            }),
        }
    }

    /// The offset ListOffsets gives at `timestamp` for every partition of `topics`, asked of each
    /// partition's leader.
    pub async fn list_offsets(
        &mut self,
        topics: &[String],
        timestamp: i64,
    ) -> Result<HashMap<(Arc<str>, u32), i64>> {
        let mut by_leader: Vec<(i32, Vec<(&String, u32)>)> = Vec::new();
        for topic in topics {
            let leaders = self.layout.leaders(topic).ok_or_else(|| KafkaError::Broker {
                what: format!("listing offsets of topic {topic}"),
                code: 3,
                message: Some("no leaders known".into()),
            })?;
            for (partition, &node) in leaders.iter().enumerate() {
                match by_leader.iter_mut().find(|(n, _)| *n == node) {
                    Some((_, list)) => list.push((topic, partition as u32)),
                    None => by_leader.push((node, vec![(topic, partition as u32)])),
                }
            }
        }
        let mut offsets = HashMap::new();
        for (node, partitions) in by_leader {
            let control = self.control(node).await?;
            let request = list_offsets_request(&partitions, timestamp);
            for (topic, partition, offset) in list_offsets_response(control.call(&request).await?)? {
                offsets.insert((Arc::from(topic.as_str()), partition), offset);
            }
        }
        Ok(offsets)
    }

    /// The controller's control connection (the bootstrap broker's when no controller is named).
    async fn controller(&mut self) -> Result<&mut Control> {
        let node = self.controller_id;
        if node < 0 || self.layout.broker(node).is_none() {
            return Ok(&mut self.bootstrap_control);
        }
        self.control(node).await
    }

    async fn control(&mut self, node: i32) -> Result<&mut Control> {
        let position = match self.controls.iter().position(|(n, _)| *n == node) {
            Some(p) => p,
            None => {
                let addr = self.layout.broker(node).ok_or_else(|| KafkaError::Bootstrap {
                    bootstrap: self.bootstrap.clone(),
                    message: format!("broker {node} is not among the brokers Metadata lists"),
                })?;
                let control = Control::connect(addr).await?;
                self.controls.push((node, control));
                self.controls.len() - 1
            }
        };
        Ok(&mut self.controls[position].1)
    }
}

/// Where to connect to a broker advertising `host` and `port`: a wildcard address is reached on
/// loopback, an IPv6 address in brackets.
fn broker_addr(host: &str, port: i32) -> String {
    match host {
        "0.0.0.0" | "" => format!("127.0.0.1:{port}"),
        "::" => format!("[::1]:{port}"),
        h if h.contains(':') => format!("[{h}]:{port}"),
        h => format!("{h}:{port}"),
    }
}

/// A consumer's ListOffsets: `timestamp` for each `(topic, partition)`.
pub(super) fn list_offsets_request(partitions: &[(&String, u32)], timestamp: i64) -> ListOffsetsRequest {
    let mut topics: Vec<ListOffsetsTopic> = Vec::new();
    for (topic, partition) in partitions {
        let entry =
            ListOffsetsPartition::default().with_partition_index(*partition as i32).with_timestamp(timestamp);
        match topics.iter_mut().find(|t| t.name.0.as_str() == topic.as_str()) {
            Some(t) => t.partitions.push(entry),
            None => topics.push(
                ListOffsetsTopic::default()
                    .with_name(TopicName(StrBytes::from_string((*topic).clone())))
                    .with_partitions(vec![entry]),
            ),
        }
    }
    ListOffsetsRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_isolation_level(0)
        .with_topics(topics)
        .with_timeout_ms(REQUEST_TIMEOUT.as_millis() as i32)
}

/// `(topic, partition, offset)` of every partition answered; the first error code is an error.
pub(super) fn list_offsets_response(
    response: kafka_protocol::messages::ListOffsetsResponse,
) -> Result<Vec<(String, u32, i64)>> {
    let mut out = Vec::new();
    for topic in response.topics {
        for p in topic.partitions {
            if p.error_code != 0 {
                return Err(KafkaError::Broker {
                    what: format!("listing offsets of {}/{}", topic.name.0.as_str(), p.partition_index),
                    code: p.error_code,
                    message: None,
                });
            }
            out.push((topic.name.0.to_string(), p.partition_index as u32, p.offset));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_offsets_requests_group_partitions_by_topic() {
        let (a, b) = ("a".to_string(), "b".to_string());
        let r = list_offsets_request(&[(&a, 0), (&b, 1), (&a, 2)], EARLIEST_TIMESTAMP);
        assert_eq!(r.replica_id.0, -1, "a consumer, not a follower");
        let shape: Vec<(String, Vec<i32>)> = r
            .topics
            .iter()
            .map(|t| (t.name.0.to_string(), t.partitions.iter().map(|p| p.partition_index).collect()))
            .collect();
        assert_eq!(shape, [("a".to_string(), vec![0, 2]), ("b".to_string(), vec![1])]);
        assert!(r.topics.iter().flat_map(|t| &t.partitions).all(|p| p.timestamp == EARLIEST_TIMESTAMP));
    }

    mod scripted {
        //! A scripted broker: node 0, controller and leader of everything, refusing
        //! `ringlog.durability` as Apache Kafka does, and refusing topic names starting with
        //! `taken` as already existing. Every CreateTopics request it saw is kept.

        use std::collections::BTreeSet;
        use std::sync::Mutex;

        use bytes::{BufMut, Bytes, BytesMut};
        use kafka_protocol::messages::api_versions_response::ApiVersion;
        use kafka_protocol::messages::create_topics_response::CreatableTopicResult;
        use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
        use kafka_protocol::messages::metadata_response::{
            MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
        };
        use kafka_protocol::messages::{
            ApiVersionsResponse, CreateTopicsResponse, DeleteTopicsResponse, MetadataResponse, RequestHeader,
            ResponseHeader,
        };
        use kafka_protocol::protocol::{Decodable, Encodable};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::net::{TcpListener, TcpStream};

        use super::super::*;

        #[derive(Default)]
        pub struct State {
            pub topics: BTreeSet<String>,
            /// Each CreateTopics: `(topic, config names)` per topic.
            pub creates: Vec<Vec<(String, Vec<String>)>>,
            /// Metadata answers to give before a created topic shows a leader.
            pub elections: u32,
        }

        pub async fn start(state: Arc<Mutex<State>>) -> String {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                loop {
                    let (s, _) = listener.accept().await.unwrap();
                    tokio::spawn(serve(s, addr.port(), state.clone()));
                }
            });
            addr.to_string()
        }

        async fn serve(mut s: TcpStream, port: u16, state: Arc<Mutex<State>>) {
            while let Ok(size) = s.read_i32().await {
                let mut frame = vec![0u8; size as usize];
                s.read_exact(&mut frame).await.unwrap();
                let mut frame = Bytes::from(frame);
                let api = ApiKey::try_from(i16::from_be_bytes([frame[0], frame[1]])).unwrap();
                let version = i16::from_be_bytes([frame[2], frame[3]]);
                let header = RequestHeader::decode(&mut frame, api.request_header_version(version)).unwrap();
                let body = answer(api, version, frame, port, &mut state.lock().unwrap());
                let response_header = ResponseHeader::default().with_correlation_id(header.correlation_id);
                let header_version = api.response_header_version(version);
                let mut out = BytesMut::new();
                out.put_i32((response_header.compute_size(header_version).unwrap() + body.len()) as i32);
                response_header.encode(&mut out, header_version).unwrap();
                out.put_slice(&body);
                s.write_all(&out).await.unwrap();
            }
        }

        /// The body answering one request.
        fn answer(api: ApiKey, version: i16, mut frame: Bytes, port: u16, state: &mut State) -> BytesMut {
            let mut body = BytesMut::new();
            match api {
                ApiKey::ApiVersions => {
                    let table =
                        [(ApiKey::ApiVersions, 0, 3), (ApiKey::Metadata, 0, 9), (ApiKey::CreateTopics, 2, 7)]
                            .iter()
                            .chain(&[(ApiKey::DeleteTopics, 1, 5), (ApiKey::ListOffsets, 1, 6)])
                            .map(|&(k, min, max)| {
                                ApiVersion::default()
                                    .with_api_key(k as i16)
                                    .with_min_version(min)
                                    .with_max_version(max)
                            })
                            .collect();
                    ApiVersionsResponse::default().with_api_keys(table).encode(&mut body, version).unwrap();
                }
                ApiKey::Metadata => {
                    let request = MetadataRequest::decode(&mut frame, version).unwrap();
                    let electing = state.elections > 0;
                    state.elections = state.elections.saturating_sub(1);
                    let topics = request
                        .topics
                        .unwrap_or_default()
                        .into_iter()
                        .map(|t| {
                            let name = t.name.unwrap();
                            let known = state.topics.contains(name.0.as_str());
                            let leader = if electing { -1 } else { 0 };
                            let partitions = (0..2)
                                .map(|i| {
                                    MetadataResponsePartition::default()
                                        .with_partition_index(i)
                                        .with_leader_id(BrokerId(leader))
                                        .with_error_code(if electing { 5 } else { 0 })
                                })
                                .collect();
                            MetadataResponseTopic::default()
                                .with_name(Some(name))
                                .with_error_code(if known { 0 } else { 3 })
                                .with_partitions(if known { partitions } else { Vec::new() })
                        })
                        .collect();
                    MetadataResponse::default()
                        .with_brokers(vec![MetadataResponseBroker::default()
                            .with_node_id(BrokerId(0))
                            .with_host(StrBytes::from_static_str("0.0.0.0"))
                            .with_port(i32::from(port))])
                        .with_controller_id(BrokerId(0))
                        .with_topics(topics)
                        .encode(&mut body, version)
                        .unwrap();
                }
                ApiKey::CreateTopics => {
                    let request = CreateTopicsRequest::decode(&mut frame, version).unwrap();
                    let mut seen = Vec::new();
                    let mut results = Vec::new();
                    for t in request.topics {
                        let name = t.name.0.to_string();
                        let configs: Vec<String> = t.configs.iter().map(|c| c.name.to_string()).collect();
                        let code = if configs.iter().any(|c| c == DURABILITY_CONFIG) {
                            INVALID_CONFIG
                        } else if name.starts_with("taken") {
                            36
                        } else {
                            state.topics.insert(name.clone());
                            0
                        };
                        results.push(CreatableTopicResult::default().with_name(t.name).with_error_code(code));
                        seen.push((name, configs));
                    }
                    state.creates.push(seen);
                    CreateTopicsResponse::default().with_topics(results).encode(&mut body, version).unwrap();
                }
                ApiKey::DeleteTopics => {
                    let request = DeleteTopicsRequest::decode(&mut frame, version).unwrap();
                    let results = request
                        .topic_names
                        .into_iter()
                        .map(|n| {
                            state.topics.remove(n.0.as_str());
                            DeletableTopicResult::default().with_name(Some(n))
                        })
                        .collect();
                    DeleteTopicsResponse::default()
                        .with_responses(results)
                        .encode(&mut body, version)
                        .unwrap();
                }
                other => panic!("the scripted broker does not serve {other:?}"),
            }
            body
        }
    }

    fn spec(configs: &[(&str, &str)]) -> TopicSpec {
        TopicSpec {
            partitions: 2,
            replication_factor: -1,
            configs: configs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    /// Against a broker that is not ringlog: the durability config is refused, the topics are
    /// created without it (keeping the other configs), and the layout is ready once the leaders
    /// are elected.
    #[tokio::test]
    async fn topics_are_created_without_ringlog_durability_where_it_is_refused() {
        let state = Arc::new(std::sync::Mutex::new(scripted::State { elections: 2, ..Default::default() }));
        let addr = scripted::start(state.clone()).await;
        let mut cluster = Cluster::connect(&format!("127.0.0.1:1,{addr}")).await.unwrap();
        assert_eq!(cluster.broker_count(), 1);
        let topics = vec!["t-0".to_string(), "t-1".to_string()];
        let layout = cluster
            .create_topics(&topics, &spec(&[("retention.ms", "60000"), (DURABILITY_CONFIG, "written")]))
            .await
            .unwrap();
        for t in &topics {
            assert_eq!(layout.leaders(t), Some(&[0, 0][..]), "{t}");
        }
        let port = addr.rsplit(':').next().unwrap();
        assert_eq!(
            layout.broker(0),
            Some(format!("127.0.0.1:{port}").as_str()),
            "0.0.0.0 is reached on loopback"
        );
        let state = state.lock().unwrap();
        assert_eq!(state.creates.len(), 2, "created again without the refused config");
        let retried: Vec<&Vec<String>> = state.creates[1].iter().map(|(_, c)| c).collect();
        assert_eq!(retried, [&vec!["retention.ms".to_string()]; 2]);
        assert_eq!(state.elections, 0, "waited for the leaders");
    }

    /// One topic cannot be created: the error names it, and the one that was created is deleted.
    #[tokio::test]
    async fn a_failed_create_leaves_no_topic_behind() {
        let state = Arc::new(std::sync::Mutex::new(scripted::State::default()));
        let addr = scripted::start(state.clone()).await;
        let mut cluster = Cluster::connect(&addr).await.unwrap();
        let topics = vec!["fresh".to_string(), "taken".to_string()];
        let e = cluster.create_topics(&topics, &spec(&[])).await.unwrap_err().to_string();
        assert!(e.contains("creating topic taken") && e.contains("TopicAlreadyExists"), "{e}");
        assert!(state.lock().unwrap().topics.is_empty(), "fresh was deleted again");
    }

    #[test]
    fn advertised_hosts_become_connectable_addresses() {
        assert_eq!(broker_addr("0.0.0.0", 9092), "127.0.0.1:9092");
        assert_eq!(broker_addr("kafka-1.example", 9092), "kafka-1.example:9092");
        assert_eq!(broker_addr("fe80::1", 9092), "[fe80::1]:9092");
    }
}
