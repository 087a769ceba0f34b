//! Kafka InitProducerId (versions 0..=4): producer ids and epochs for idempotent producers.
//!
//! Owns the request's rules at the protocol edge: which requests get an id, which an error, and
//! with which Kafka code. The ids come from `controller::init_producer_id` (shard 0 hands them out
//! from blocks persisted in the data directory); the sequence checks they enable live in
//! `storage`. May depend on `controller`, `shard`, `server` (replies) and this module's siblings;
//! never on storage.

use std::rc::Rc;

use futures::future::FutureExt;
use kafka_protocol::messages::{InitProducerIdRequest, InitProducerIdResponse, ProducerId};
use kafka_protocol::ResponseError;

use super::codec::{respond, RequestContext};
use super::errors::broker_code;
use crate::server::{Boxed, Reply};
use crate::shard::Shard;

/// "No producer id" / "no epoch" in Kafka requests and responses.
const NO_PRODUCER_ID: i64 = -1;
const NO_PRODUCER_EPOCH: i16 = -1;

pub(super) async fn init_producer_id(
    shard: &Rc<Shard>,
    ctx: RequestContext,
    request: InitProducerIdRequest,
) -> Boxed<Reply> {
    if let Some(transactional_id) = &request.transactional_id {
        let code = if transactional_id.is_empty() {
            // Kafka's rule: an empty transactional id is a malformed request.
            ResponseError::InvalidRequest
        } else {
            // Transactions are not supported. Kafka has no "unsupported" code for this request;
            // TRANSACTIONAL_ID_AUTHORIZATION_FAILED is the one that Java clients and librdkafka
            // both treat as fatal for the transactional producer, so it fails at once instead
            // of retrying until a timeout (COORDINATOR_NOT_AVAILABLE and the like are retried
            // forever), and it concerns only transactional producers. The Produce handler
            // refuses transactional batches with the same code.
            tracing::warn!(
                shard = shard.id,
                client = ctx.client_id.as_deref().unwrap_or(""),
                transactional_id = %transactional_id.as_str(),
                "kafka: InitProducerId with a transactional id refused: ringlog does not support \
                 transactions (answering TRANSACTIONAL_ID_AUTHORIZATION_FAILED); produce without \
                 transactional.id, idempotence works"
            );
            ResponseError::TransactionalIdAuthorizationFailed
        };
        return ready(answer(&ctx, code.code(), NO_PRODUCER_ID, NO_PRODUCER_EPOCH));
    }
    // v3+ may name the producer's current id and epoch (KIP-360): both or neither, as in Kafka.
    let current = match (ctx.version >= 3, request.producer_id.0, request.producer_epoch) {
        (false, _, _) | (true, NO_PRODUCER_ID, NO_PRODUCER_EPOCH) => None,
        (true, NO_PRODUCER_ID, _) | (true, _, NO_PRODUCER_EPOCH) => {
            let code = ResponseError::InvalidRequest.code();
            return ready(answer(&ctx, code, NO_PRODUCER_ID, NO_PRODUCER_EPOCH));
        }
        (true, producer_id, epoch) => Some((producer_id, epoch)),
    };
    let allocated = crate::controller::init_producer_id(shard, current).await;
    async move {
        match allocated.await {
            Ok((producer_id, epoch)) => answer(&ctx, 0, producer_id, epoch),
            Err(e) => {
                tracing::warn!(
                    client = ctx.client_id.as_deref().unwrap_or(""),
                    "kafka: InitProducerId failed: {e}"
                );
                answer(&ctx, broker_code(&e), NO_PRODUCER_ID, NO_PRODUCER_EPOCH)
            }
        }
    }
    .boxed_local()
}

fn answer(ctx: &RequestContext, error_code: i16, producer_id: i64, epoch: i16) -> Reply {
    let body = InitProducerIdResponse::default()
        .with_throttle_time_ms(0)
        .with_error_code(error_code)
        .with_producer_id(ProducerId(producer_id))
        .with_producer_epoch(epoch);
    respond(ctx, &body)
}

fn ready(reply: Reply) -> Boxed<Reply> {
    futures::future::ready(reply).boxed_local()
}
