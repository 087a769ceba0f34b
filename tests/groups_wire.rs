//! The group coordinator over raw native-protocol frames against a real broker process: join,
//! sync, heartbeat, fencing of old generations, session expiry, offsets with lag, admin requests,
//! the internal offsets topic, and recovery of committed offsets across restarts and kill -9.

mod common;

use std::time::{Duration, Instant};

use common::wire::{Conn, Resp};
use common::Broker;
use ringlog::protocol::wire::{self, ErrorCode, RequestBody};

const TOPIC: &str = "events";

fn broker() -> Broker {
    Broker::start(2, &["group_initial_rebalance_delay_ms=200", "group_min_session_timeout_ms=500"])
}

fn error_of(resp: &Resp) -> (ErrorCode, String) {
    let root = resp.root();
    (root.error(), root.message().unwrap_or_default().to_string())
}

#[track_caller]
fn ok(resp: &Resp) {
    let (code, message) = error_of(resp);
    assert_eq!(code, ErrorCode::None, "{message}");
}

fn send_join(c: &mut Conn, group: &str, member_id: &str, session_timeout_ms: u32) {
    c.send(RequestBody::JoinGroupRequest, &[], |fbb| {
        let group_id = fbb.create_string(group);
        let member_id = fbb.create_string(member_id);
        let client_id = fbb.create_string("wire-test");
        let protocol_type = fbb.create_string("consumer");
        let topic = fbb.create_string(TOPIC);
        let topics = fbb.create_vector(&[topic]);
        let name = fbb.create_string("range");
        let protocol =
            wire::GroupProtocol::create(fbb, &wire::GroupProtocolArgs { name: Some(name), metadata: None });
        let protocols = fbb.create_vector(&[protocol]);
        wire::JoinGroupRequest::create(
            fbb,
            &wire::JoinGroupRequestArgs {
                group_id: Some(group_id),
                member_id: Some(member_id),
                client_id: Some(client_id),
                session_timeout_ms,
                rebalance_timeout_ms: 10_000,
                protocol_type: Some(protocol_type),
                topics: Some(topics),
                protocols: Some(protocols),
                server_assignment: true,
            },
        )
        .as_union_value()
    });
}

/// (generation, member id, leader id)
fn recv_join(c: &mut Conn) -> (i32, String, String) {
    let resp = c.recv().expect("join response");
    ok(&resp);
    let r = resp.root().body_as_join_group_response().expect("join body");
    (r.generation_id(), r.member_id().unwrap_or_default().into(), r.leader_id().unwrap_or_default().into())
}

fn sync(c: &mut Conn, group: &str, generation: i32, member: &str) -> Vec<u32> {
    c.send(RequestBody::SyncGroupRequest, &[], |fbb| {
        let group_id = fbb.create_string(group);
        let member_id = fbb.create_string(member);
        wire::SyncGroupRequest::create(
            fbb,
            &wire::SyncGroupRequestArgs {
                group_id: Some(group_id),
                generation_id: generation,
                member_id: Some(member_id),
                assignments: None,
            },
        )
        .as_union_value()
    });
    let resp = c.recv().expect("sync response");
    ok(&resp);
    let r = resp.root().body_as_sync_group_response().expect("sync body");
    r.partitions()
        .iter()
        .flatten()
        .flat_map(|tp| tp.partitions().iter().flatten().collect::<Vec<_>>())
        .collect()
}

fn heartbeat(c: &mut Conn, group: &str, generation: i32, member: &str) -> ErrorCode {
    c.send(RequestBody::HeartbeatRequest, &[], |fbb| {
        let group_id = fbb.create_string(group);
        let member_id = fbb.create_string(member);
        wire::HeartbeatRequest::create(
            fbb,
            &wire::HeartbeatRequestArgs {
                group_id: Some(group_id),
                generation_id: generation,
                member_id: Some(member_id),
            },
        )
        .as_union_value()
    });
    let resp = c.recv().expect("heartbeat response");
    let code = resp.root().error();
    if code == ErrorCode::None {
        assert!(resp.root().body_as_heartbeat_response().is_some());
    }
    code
}

fn simple(c: &mut Conn, body: RequestBody, group: &str, member: &str) -> Resp {
    c.send(body, &[], |fbb| {
        let group_id = fbb.create_string(group);
        let member_id = fbb.create_string(member);
        match body {
            RequestBody::LeaveGroupRequest => wire::LeaveGroupRequest::create(
                fbb,
                &wire::LeaveGroupRequestArgs { group_id: Some(group_id), member_id: Some(member_id) },
            )
            .as_union_value(),
            RequestBody::DescribeGroupRequest => wire::DescribeGroupRequest::create(
                fbb,
                &wire::DescribeGroupRequestArgs { group_id: Some(group_id) },
            )
            .as_union_value(),
            RequestBody::DeleteGroupRequest => wire::DeleteGroupRequest::create(
                fbb,
                &wire::DeleteGroupRequestArgs { group_id: Some(group_id) },
            )
            .as_union_value(),
            _ => wire::ListGroupsRequest::create(fbb, &wire::ListGroupsRequestArgs {}).as_union_value(),
        }
    });
    c.recv().expect("response")
}

/// Commits one partition's offset; returns (request error, partition error).
fn commit(
    c: &mut Conn,
    group: &str,
    generation: i32,
    member: &str,
    partition: u32,
    offset: i64,
) -> (ErrorCode, ErrorCode) {
    c.send(RequestBody::OffsetCommitRequest, &[], |fbb| {
        let group_id = fbb.create_string(group);
        let member_id = fbb.create_string(member);
        let metadata = fbb.create_string("m");
        let p = wire::OffsetCommitPartition::create(
            fbb,
            &wire::OffsetCommitPartitionArgs { partition, offset, metadata: Some(metadata) },
        );
        let parts = fbb.create_vector(&[p]);
        let name = fbb.create_string(TOPIC);
        let t = wire::OffsetCommitTopic::create(
            fbb,
            &wire::OffsetCommitTopicArgs { name: Some(name), partitions: Some(parts) },
        );
        let topics = fbb.create_vector(&[t]);
        wire::OffsetCommitRequest::create(
            fbb,
            &wire::OffsetCommitRequestArgs {
                group_id: Some(group_id),
                generation_id: generation,
                member_id: Some(member_id),
                topics: Some(topics),
            },
        )
        .as_union_value()
    });
    let resp = c.recv().expect("commit response");
    let root = resp.root();
    let partition_error = root
        .body_as_offset_commit_response()
        .and_then(|b| b.topics())
        .map(|t| t.get(0).partitions().unwrap().get(0).error())
        .unwrap_or(ErrorCode::None);
    (root.error(), partition_error)
}

/// (partition, committed offset, log end, lag) for every partition of the topic.
fn fetch_offsets(c: &mut Conn, group: &str) -> Vec<(u32, i64, i64, i64)> {
    c.send(RequestBody::OffsetFetchRequest, &[], |fbb| {
        let group_id = fbb.create_string(group);
        let topic = fbb.create_string(TOPIC);
        let tp = wire::TopicPartitions::create(
            fbb,
            &wire::TopicPartitionsArgs { topic: Some(topic), partitions: None },
        );
        let topics = fbb.create_vector(&[tp]);
        wire::OffsetFetchRequest::create(
            fbb,
            &wire::OffsetFetchRequestArgs { group_id: Some(group_id), topics: Some(topics) },
        )
        .as_union_value()
    });
    let resp = c.recv().expect("offset fetch response");
    ok(&resp);
    let body = resp.root().body_as_offset_fetch_response().expect("offset fetch body");
    body.topics()
        .unwrap()
        .get(0)
        .partitions()
        .unwrap()
        .iter()
        .map(|p| (p.partition(), p.offset(), p.log_end_offset(), p.lag()))
        .collect()
}

fn reset(c: &mut Conn, group: &str, timestamp: i64, offset: Option<i64>) -> Resp {
    c.send(RequestBody::ResetOffsetsRequest, &[], |fbb| {
        let group_id = fbb.create_string(group);
        let topic = fbb.create_string(TOPIC);
        wire::ResetOffsetsRequest::create(
            fbb,
            &wire::ResetOffsetsRequestArgs {
                group_id: Some(group_id),
                topic: Some(topic),
                partitions: None,
                timestamp,
                offset,
            },
        )
        .as_union_value()
    });
    c.recv().expect("reset response")
}

fn setup(broker: &Broker) -> Conn {
    let mut admin = Conn::connect(&broker.addr);
    ok(&admin.create_topic(TOPIC, 4));
    for p in 0..4 {
        let values: Vec<Vec<u8>> = (0..10).map(|i| format!("{p}-{i}").into_bytes()).collect();
        let refs: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
        assert_eq!(admin.produce(TOPIC, p, &refs).0, ErrorCode::None);
    }
    admin
}

#[test]
fn members_join_sync_heartbeat_and_old_generations_are_fenced() {
    let mut broker = broker();
    let mut admin = setup(&broker);
    let group = "orders";

    // FindCoordinator names a shard endpoint; use it for one member, the shared port for the other.
    admin.send(RequestBody::FindCoordinatorRequest, &[], |fbb| {
        let group_id = fbb.create_string(group);
        wire::FindCoordinatorRequest::create(
            fbb,
            &wire::FindCoordinatorRequestArgs { group_id: Some(group_id) },
        )
        .as_union_value()
    });
    let found = admin.recv().unwrap();
    ok(&found);
    let fc = found.root().body_as_find_coordinator_response().unwrap();
    let direct = format!("{}:{}", fc.host().unwrap(), fc.port());
    assert!(broker.direct.contains(&direct), "{direct} is one of {:?}", broker.direct);

    let (mut a, mut b) = (Conn::connect(&direct), Conn::connect(&broker.addr));
    // Both join before either answer is read: the initial delay puts them in one generation.
    send_join(&mut a, group, "", 3000);
    send_join(&mut b, group, "", 3000);
    let (gen_a, id_a, leader_a) = recv_join(&mut a);
    let (gen_b, id_b, leader_b) = recv_join(&mut b);
    assert_eq!((gen_a, gen_b), (1, 1));
    assert!(id_a.starts_with("wire-test-") && id_b.starts_with("wire-test-") && id_a != id_b);
    assert_eq!(leader_a, leader_b);
    let (mut pa, pb) = (sync(&mut a, group, 1, &id_a), sync(&mut b, group, 1, &id_b));
    assert_eq!((pa.len(), pb.len()), (2, 2), "range splits 4 partitions 2/2");
    pa.extend(&pb);
    pa.sort();
    assert_eq!(pa, vec![0, 1, 2, 3]);
    assert_eq!(heartbeat(&mut a, group, 1, &id_a), ErrorCode::None);
    assert_eq!(commit(&mut a, group, 1, &id_a, 0, 4), (ErrorCode::None, ErrorCode::None));

    // A third member makes everyone rejoin; the old generation is fenced afterwards.
    let mut c = Conn::connect(&broker.addr);
    send_join(&mut c, group, "", 3000);
    let deadline = Instant::now() + Duration::from_secs(10);
    while heartbeat(&mut a, group, 1, &id_a) != ErrorCode::RebalanceInProgress {
        assert!(Instant::now() < deadline, "the heartbeat never reported the rebalance");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        commit(&mut b, group, 1, &id_b, 1, 3).0,
        ErrorCode::None,
        "commits still work while rejoining"
    );
    send_join(&mut a, group, &id_a, 3000);
    send_join(&mut b, group, &id_b, 3000);
    let (ga, _, _) = recv_join(&mut a);
    let (gb, _, _) = recv_join(&mut b);
    let (gc, id_c, _) = recv_join(&mut c);
    assert_eq!((ga, gb, gc), (2, 2, 2));
    assert_eq!(commit(&mut a, group, 1, &id_a, 0, 9).0, ErrorCode::IllegalGeneration);
    assert_eq!(heartbeat(&mut b, group, 1, &id_b), ErrorCode::IllegalGeneration);
    assert_eq!(commit(&mut admin, group, -1, "", 0, 9).0, ErrorCode::GroupNotEmpty);
    let total: usize = [(&mut a, &id_a), (&mut b, &id_b), (&mut c, &id_c)]
        .into_iter()
        .map(|(conn, id)| sync(conn, group, 2, id).len())
        .sum();
    assert_eq!(total, 4);

    // Offsets: committed, log end and lag per partition.
    let offsets = fetch_offsets(&mut admin, group);
    assert_eq!(offsets, vec![(0, 4, 10, 6), (1, 3, 10, 7), (2, -1, 10, -1), (3, -1, 10, -1)]);

    // Describe, list, and what needs an empty group.
    let d = simple(&mut admin, RequestBody::DescribeGroupRequest, group, "");
    ok(&d);
    let body = d.root().body_as_describe_group_response().unwrap();
    assert_eq!((body.state(), body.generation_id(), body.members().unwrap().len()), (Some("Stable"), 2, 3));
    assert_eq!(reset(&mut admin, group, -2, None).root().error(), ErrorCode::GroupNotEmpty);
    assert_eq!(
        simple(&mut admin, RequestBody::DeleteGroupRequest, group, "").root().error(),
        ErrorCode::GroupNotEmpty
    );
    for (conn, id) in [(&mut a, &id_a), (&mut b, &id_b), (&mut c, &id_c)] {
        ok(&simple(conn, RequestBody::LeaveGroupRequest, group, id));
    }
    let d = simple(&mut admin, RequestBody::DescribeGroupRequest, group, "");
    assert_eq!(d.root().body_as_describe_group_response().unwrap().state(), Some("Empty"));

    // Reset while empty: explicit offsets are kept within the log; earliest and latest.
    ok(&reset(&mut admin, group, -2, Some(7)));
    assert!(fetch_offsets(&mut admin, group).iter().all(|&(_, o, end, lag)| o == 7 && lag == end - 7));
    ok(&reset(&mut admin, group, -1, Some(1_000)));
    assert!(fetch_offsets(&mut admin, group).iter().all(|&(_, o, _, lag)| o == 10 && lag == 0));
    let r = reset(&mut admin, group, -2, None);
    ok(&r);
    let rows =
        r.root().body_as_reset_offsets_response().unwrap().topics().unwrap().get(0).partitions().unwrap();
    assert!(rows.iter().all(|p| p.offset() == 0 && p.lag() == 10));

    let listed = simple(&mut admin, RequestBody::ListGroupsRequest, "", "");
    ok(&listed);
    let groups: Vec<String> = listed
        .root()
        .body_as_list_groups_response()
        .unwrap()
        .groups()
        .unwrap()
        .iter()
        .map(|g| g.group_id().unwrap().to_string())
        .collect();
    assert_eq!(groups, vec![group.to_string()]);
    ok(&simple(&mut admin, RequestBody::DeleteGroupRequest, group, ""));
    assert_eq!(
        simple(&mut admin, RequestBody::DescribeGroupRequest, group, "").root().error(),
        ErrorCode::GroupIdNotFound
    );
    assert!(fetch_offsets(&mut admin, group).iter().all(|&(_, o, _, _)| o == -1));
    assert!(!broker.log().contains("panicked"));
    broker.stop();
}

#[test]
fn a_member_that_stops_heartbeating_is_removed_after_its_session() {
    let mut broker = broker();
    let _admin = setup(&broker);
    let group = "sessions";
    let (mut a, mut b) = (Conn::connect(&broker.addr), Conn::connect(&broker.addr));
    send_join(&mut a, group, "", 800);
    send_join(&mut b, group, "", 800);
    let (_, id_a, _) = recv_join(&mut a);
    let (_, _id_b, _) = recv_join(&mut b);
    assert_eq!(sync(&mut a, group, 1, &id_a).len(), 2);
    // b goes silent; a keeps heartbeating until told to rejoin.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match heartbeat(&mut a, group, 1, &id_a) {
            ErrorCode::None => {}
            ErrorCode::RebalanceInProgress => break,
            other => panic!("unexpected heartbeat answer {other:?}"),
        }
        assert!(Instant::now() < deadline, "b's session never expired");
        std::thread::sleep(Duration::from_millis(100));
    }
    send_join(&mut a, group, &id_a, 800);
    let (generation, _, leader) = recv_join(&mut a);
    assert_eq!((generation, leader.as_str()), (2, id_a.as_str()));
    assert_eq!(sync(&mut a, group, 2, &id_a), vec![0, 1, 2, 3], "the survivor gets every partition");
    broker.stop();
}

#[test]
fn committed_offsets_survive_restart_and_kill9() {
    let mut broker = broker();
    let mut admin = setup(&broker);
    assert_eq!(commit(&mut admin, "keeper", -1, "", 2, 6), (ErrorCode::None, ErrorCode::None));
    // Group metadata records too: the group comes back Empty at the generation it reached.
    let mut m = Conn::connect(&broker.addr);
    send_join(&mut m, "keeper", "", 3000);
    let (generation, id, _) = recv_join(&mut m);
    assert_eq!(commit(&mut m, "keeper", generation, &id, 3, 8), (ErrorCode::None, ErrorCode::None));
    ok(&simple(&mut m, RequestBody::LeaveGroupRequest, "keeper", &id));
    broker.stop();
    broker.restart();
    let mut admin = Conn::connect(&broker.addr);
    let offsets = fetch_offsets(&mut admin, "keeper");
    assert_eq!(offsets[2], (2, 6, 10, 4));
    assert_eq!(offsets[3], (3, 8, 10, 2));
    let d = simple(&mut admin, RequestBody::DescribeGroupRequest, "keeper", "");
    let body = d.root().body_as_describe_group_response().unwrap();
    assert_eq!(
        (body.state(), body.generation_id(), body.members().unwrap().len()),
        (Some("Empty"), 2, 0),
        "the last leave moved the generation on"
    );

    ok(&reset(&mut admin, "keeper", -1, Some(5)));
    broker.kill9();
    broker.restart();
    let mut admin = Conn::connect(&broker.addr);
    assert!(
        fetch_offsets(&mut admin, "keeper").iter().all(|&(_, o, _, _)| o == 5),
        "acknowledged commits survive kill -9"
    );
    broker.stop();
}

#[test]
fn the_offsets_topic_is_internal() {
    let mut broker = broker();
    let mut admin = setup(&broker);
    let names: Vec<String> = {
        let resp = admin.metadata();
        let body = resp.root().body_as_metadata_response().unwrap();
        body.topics().unwrap().iter().map(|t| t.name().unwrap_or_default().to_string()).collect()
    };
    assert_eq!(names, vec![TOPIC.to_string()], "not listed among the user's topics");
    let produced = admin.produce_raw("__consumer_offsets", 0, &common::wire::batch_of(&[b"forged"])).unwrap();
    assert_eq!(common::wire::produce_outcome(&produced).0, ErrorCode::InvalidRequest);
    assert_eq!(admin.delete_topic("__consumer_offsets").root().error(), ErrorCode::InvalidRequest);
    assert_eq!(admin.create_topic("__consumer_offsets", 1).root().error(), ErrorCode::TopicAlreadyExists);
    // A group id the coordinator refuses, and a member the group does not know.
    send_join(&mut admin, "", "", 3000);
    assert_eq!(admin.recv().unwrap().root().error(), ErrorCode::InvalidGroupId);
    assert_eq!(heartbeat(&mut admin, "nobody", 1, "ghost"), ErrorCode::UnknownMemberId);
    broker.stop();
}
