//! The Kafka APIs and versions this broker serves, and the ApiVersions answer built from them.
//!
//! Owns: [`SUPPORTED`], the single table that ApiVersions advertises, that dispatch admits
//! requests by, and that the wire tests walk version by version. Ceilings stop below versions
//! whose meaning needs something ringlog does not have yet (topic ids in Fetch 13+, Produce 13
//! and Metadata 10+, transactions in Produce 11+, KIP-848 consumer groups, batched
//! FindCoordinator and OffsetFetch). Metadata v9 is what makes librdkafka trust the leader epochs
//! it carries (`rd_kafka_has_reliable_leader_epochs`), after which clients send them in Fetch and
//! ListOffsets and ask OffsetForLeaderEpoch: it stays advertised only with those answered right
//! (`shard::epochs`, docs/replication.md, stop 14).

use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::{ApiKey, ApiVersionsResponse};

use super::codec::{respond, RequestContext};
use crate::server::Reply;

/// `(api, min version, max version)` for every API served.
pub const SUPPORTED: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 3, 10),
    (ApiKey::Fetch, 4, 12),
    (ApiKey::ListOffsets, 1, 6),
    (ApiKey::Metadata, 0, 9),
    (ApiKey::OffsetCommit, 2, 8),
    (ApiKey::OffsetFetch, 1, 7),
    (ApiKey::FindCoordinator, 0, 3),
    (ApiKey::JoinGroup, 0, 7),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 4),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::DescribeGroups, 0, 5),
    (ApiKey::ListGroups, 0, 4),
    (ApiKey::ApiVersions, 0, 3),
    (ApiKey::CreateTopics, 2, 7),
    (ApiKey::DeleteTopics, 1, 5),
    (ApiKey::InitProducerId, 0, 4),
    (ApiKey::DescribeConfigs, 1, 4),
    (ApiKey::CreatePartitions, 0, 3),
    (ApiKey::DeleteGroups, 0, 2),
    (ApiKey::OffsetForLeaderEpoch, 2, 4),
];

/// Whether `(api_key, version)` is served; the error says what the client asked for.
pub fn check(api_key: i16, version: i16) -> Result<(), String> {
    let entry = SUPPORTED.iter().find(|(api, _, _)| *api as i16 == api_key);
    match entry {
        None => Err(format!("API key {api_key} is not supported by this broker (see ApiVersions)")),
        Some((api, min, max)) if !(*min..=*max).contains(&version) => {
            Err(format!("{api:?} version {version} is not supported; this broker serves {min}..={max}"))
        }
        Some(_) => Ok(()),
    }
}

fn table() -> Vec<ApiVersion> {
    SUPPORTED
        .iter()
        .map(|&(api, min, max)| {
            ApiVersion::default().with_api_key(api as i16).with_min_version(min).with_max_version(max)
        })
        .collect()
}

pub fn api_versions(ctx: &RequestContext) -> Reply {
    respond(ctx, &ApiVersionsResponse::default().with_api_keys(table()))
}

/// The KIP-511 answer to an ApiVersions request at a version this broker does not serve: a v0
/// body with UNSUPPORTED_VERSION and the table, so the client can retry at a version we know.
pub fn unsupported_api_versions(ctx: &RequestContext) -> Reply {
    let ctx = RequestContext { version: 0, ..ctx.clone() };
    let body = ApiVersionsResponse::default()
        .with_error_code(kafka_protocol::ResponseError::UnsupportedVersion.code())
        .with_api_keys(table());
    respond(&ctx, &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::protocol::Message;

    #[test]
    fn every_advertised_version_is_known_to_the_codec() {
        for &(api, min, max) in SUPPORTED {
            let known = api.valid_versions();
            assert!(min <= max, "{api:?}");
            assert!(known.min <= min && max <= known.max, "{api:?} {min}..={max} outside {known}");
        }
        let _ = ApiVersionsResponse::VERSIONS;
    }

    #[test]
    fn check_names_the_problem() {
        assert!(check(ApiKey::Produce as i16, 10).is_ok());
        assert!(check(ApiKey::Produce as i16, 2).unwrap_err().contains("3..=10"));
        assert!(check(1000, 0).unwrap_err().contains("1000"));
    }
}
