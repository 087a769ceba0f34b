//! Building RecordBatch v2 batches (client side and tests).
