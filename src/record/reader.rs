//! Reading records out of a RecordBatch v2 batch.
