//! The rules both protocols apply to what clients ask, written once: what a client may append,
//! and how a fetch response is sized.
//!
//! Owns: the internal-topic guard for writes, the refusal of control and transactional batches
//! (until transactions exist), and the fetch sizing rules (the response-wide `max_bytes`, capped by
//! `fetch_bytes_max`; the first partition with data always gets through, KIP-74). The protocols
//! call these and map the `BrokerError`s to their own codes; they add only what their wire alone
//! can say (Kafka's request-level `transactional_id`). Pure: no I/O, unit-tested.

use std::time::Duration;

use crate::config::BrokerConfig;
use crate::metadata;
use crate::record::{BatchHeader, BATCH_HEADER_LEN};

use super::BrokerError;

/// RecordBatch attributes bit: the batch is part of a transaction.
const ATTRIBUTE_TRANSACTIONAL: i16 = 0x10;

/// Checks one partition's batches from a client before they are routed: the topic must not be
/// internal, and no batch may be a control or transactional batch. Only the batch headers are
/// read; storage validates the batches themselves (sizes, crc32c) on append.
pub fn check_client_append(topic: &str, batches: &[u8]) -> Result<(), BrokerError> {
    if metadata::is_internal_topic(topic) {
        // Only the group coordinator writes there, so its replayed state stays trustworthy.
        return Err(BrokerError::InternalTopic {
            topic: topic.to_string(),
            rule: "only the group coordinator writes to it",
        });
    }
    let mut position = 0usize;
    while batches.len().saturating_sub(position) >= BATCH_HEADER_LEN {
        let Ok(header) = BatchHeader::parse(&batches[position..]) else { break };
        if header.is_control() {
            return Err(BrokerError::ControlBatch { position });
        }
        if header.attributes & ATTRIBUTE_TRANSACTIONAL != 0 {
            return Err(BrokerError::TransactionalBatch { position });
        }
        position = position.saturating_add(header.total_len());
    }
    Ok(())
}

/// The longest a fetch may park waiting for data: what the client asked, at most
/// `fetch_wait_ms_max`.
pub fn fetch_max_wait(config: &BrokerConfig, requested_ms: u64) -> Duration {
    Duration::from_millis(requested_ms.min(config.fetch_wait_ms_max))
}

/// How much record data a fetch response holds.
#[derive(Debug)]
pub struct FetchBudget {
    max_bytes: usize,
    included_bytes: usize,
}

impl FetchBudget {
    /// The response-wide limit the client asked for (not positive: the least), capped by
    /// `fetch_bytes_max`: a response is held in memory until it is sent.
    pub fn new(config: &BrokerConfig, requested_max_bytes: i64) -> FetchBudget {
        let max_bytes = usize::try_from(requested_max_bytes).unwrap_or(0).min(config.fetch_bytes_max).max(1);
        FetchBudget { max_bytes, included_bytes: 0 }
    }

    /// What one partition may read: its own limit, within the response's.
    pub fn partition_max_bytes(&self, requested: i64) -> usize {
        usize::try_from(requested).unwrap_or(0).clamp(1, self.max_bytes)
    }

    /// Whether a partition's `len` bytes of data go into the response, counting them if so. The
    /// first partition with data always gets through, so a consumer can pass a batch larger than
    /// `max_bytes`; after it, data goes in only while the total stays within `max_bytes`.
    pub fn admit(&mut self, len: usize) -> bool {
        let admit = len > 0 && (self.included_bytes == 0 || self.included_bytes + len <= self.max_bytes);
        if admit {
            self.included_bytes += len;
        }
        admit
    }

    pub fn included_bytes(&self) -> usize {
        self.included_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(attributes: i16, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        b[8..12].copy_from_slice(&((len - 12) as i32).to_be_bytes());
        b[16] = 2;
        b[21..23].copy_from_slice(&attributes.to_be_bytes());
        b
    }

    #[test]
    fn clients_may_not_write_control_transactional_or_internal() {
        let plain = [batch(0, 80), batch(0, 70)].concat();
        assert!(check_client_append("t", &plain).is_ok());
        let control = [batch(0, 80), batch(crate::record::CONTROL_FLAG, 70)].concat();
        assert!(matches!(
            check_client_append("t", &control),
            Err(BrokerError::ControlBatch { position: 80 })
        ));
        let transactional = [batch(ATTRIBUTE_TRANSACTIONAL, 61)].concat();
        assert!(matches!(
            check_client_append("t", &transactional),
            Err(BrokerError::TransactionalBatch { position: 0 })
        ));
        assert!(matches!(
            check_client_append(metadata::OFFSETS_TOPIC, &plain),
            Err(BrokerError::InternalTopic { .. })
        ));
        // A short or unreadable tail is left to storage's validation.
        assert!(check_client_append("t", &plain[..100]).is_ok());
    }

    #[test]
    fn the_first_partition_with_data_always_gets_through() {
        let config = BrokerConfig::default();
        let mut budget = FetchBudget::new(&config, 100);
        assert_eq!(budget.partition_max_bytes(1_000), 100);
        assert_eq!(budget.partition_max_bytes(-5), 1);
        assert!(!budget.admit(0), "nothing to include");
        assert!(budget.admit(300), "the first data goes even past max_bytes");
        assert!(!budget.admit(1), "then nothing more past the limit");
        assert_eq!(budget.included_bytes(), 300);
        let mut budget = FetchBudget::new(&config, 100);
        assert!(budget.admit(60) && budget.admit(40) && !budget.admit(1));
        let capped = FetchBudget::new(&config, i64::MAX);
        assert_eq!(capped.partition_max_bytes(i64::MAX), config.fetch_bytes_max);
        assert_eq!(FetchBudget::new(&config, -1).partition_max_bytes(10), 1);
    }
}
