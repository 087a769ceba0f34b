#!/usr/bin/env python3
"""kafka-python against a ringlog broker, for tests/kafka_clients.rs.

Expects --topic to exist with 3 partitions and to be empty. Produces with explicit partitions and
timestamps, then checks, to Kafka's semantics:
  - explicit assignment and seek read exactly the records at and after the offset;
  - beginning/end offsets, seek_to_beginning/seek_to_end positions;
  - offsets_for_times: the earliest offset whose timestamp is at or after the target, inside
    single-record batches, inside one multi-record batch, inside a gzip batch, and None past the
    last record;
  - commit({tp: OffsetAndMetadata}) and committed(tp) for a group used only to store offsets, and
    a new consumer in that group starting at the committed offset.
Every check runs and prints `ok <what>` or `FAIL <what>: <details>`; the last line is `all checks
passed` and the exit status 0 only when none failed.
"""

import argparse
import sys
import time

from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import OffsetAndMetadata, TopicPartition

PER_PARTITION = 40
GZIP_RECORDS = 10

failures = []


def check(what, ok, details=""):
    if ok:
        print(f"ok {what}", flush=True)
    else:
        failures.append(what)
        print(f"FAIL {what}: {details}", flush=True)


def record(p, i, base_ms):
    """What record i of partition p is: key, value, headers, timestamp."""
    return (
        f"k{p}-{i}".encode(),
        f"value-{p}-{i}-{'x' * (i % 13)}".encode(),
        [("n", str(i).encode()), ("p", str(p).encode())],
        base_ms + i * 1000,
    )


def read_exactly(consumer, tp, count, deadline_s=20):
    """Polls until `count` records of `tp` arrived (or the deadline); returns them."""
    got = []
    deadline = time.monotonic() + deadline_s
    while len(got) < count and time.monotonic() < deadline:
        for part, records in consumer.poll(timeout_ms=500).items():
            if part == tp:
                got.extend(records)
    return got


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    args = ap.parse_args()
    topic = args.topic
    tp0, tp1, tp2 = (TopicPartition(topic, p) for p in range(3))
    # An hour ago: well inside the default seven-day retention, and distinct from "now".
    base_ms = (int(time.time()) - 3600) * 1000

    producer = KafkaProducer(bootstrap_servers=args.bootstrap, acks="all", linger_ms=50, max_block_ms=30000)
    # Partition 0: one record per batch (each send waits for its acknowledgement).
    offsets0 = []
    for i in range(PER_PARTITION):
        key, value, headers, ts = record(0, i, base_ms)
        md = producer.send(topic, value=value, key=key, headers=headers, partition=0, timestamp_ms=ts)
        offsets0.append(md.get(timeout=30).offset)
    # Partitions 1 and 2: sent together, so each partition's records share few batches.
    futures = {1: [], 2: []}
    for p in (1, 2):
        for i in range(PER_PARTITION):
            key, value, headers, ts = record(p, i, base_ms)
            futures[p].append(
                producer.send(topic, value=value, key=key, headers=headers, partition=p, timestamp_ms=ts)
            )
    producer.flush(timeout=30)
    offsets = {0: offsets0}
    for p in (1, 2):
        offsets[p] = [f.get(timeout=30).offset for f in futures[p]]
    producer.close()
    # Then a gzip batch at the end of partition 2.
    gzip_producer = KafkaProducer(
        bootstrap_servers=args.bootstrap, acks="all", compression_type="gzip", linger_ms=100, max_block_ms=30000
    )
    gzip_futures = []
    for i in range(PER_PARTITION, PER_PARTITION + GZIP_RECORDS):
        key, value, headers, ts = record(2, i, base_ms)
        gzip_futures.append(
            gzip_producer.send(topic, value=value, key=key, headers=headers, partition=2, timestamp_ms=ts)
        )
    gzip_producer.flush(timeout=30)
    offsets[2] += [f.get(timeout=30).offset for f in gzip_futures]
    gzip_producer.close()
    ends = {0: PER_PARTITION, 1: PER_PARTITION, 2: PER_PARTITION + GZIP_RECORDS}
    for p in range(3):
        check(f"produce: partition {p} offsets are 0..{ends[p]}", offsets[p] == list(range(ends[p])), offsets[p])

    consumer = KafkaConsumer(bootstrap_servers=args.bootstrap, enable_auto_commit=False, group_id=None)
    consumer.assign([tp0, tp1, tp2])
    check(
        "beginning_offsets",
        consumer.beginning_offsets([tp0, tp1, tp2]) == {tp0: 0, tp1: 0, tp2: 0},
        consumer.beginning_offsets([tp0, tp1, tp2]),
    )
    end_offsets = consumer.end_offsets([tp0, tp1, tp2])
    check("end_offsets", end_offsets == {tp0: ends[0], tp1: ends[1], tp2: ends[2]}, end_offsets)
    consumer.seek_to_end(tp0)
    check("seek_to_end position", consumer.position(tp0) == ends[0], consumer.position(tp0))
    consumer.seek_to_beginning(tp0)
    check("seek_to_beginning position", consumer.position(tp0) == 0, consumer.position(tp0))

    # Assign + seek: exactly the records from the offset on, with key, value, headers, timestamp.
    for tp, start in ((tp0, 25), (tp1, 7), (tp2, 35)):
        consumer.assign([tp])
        consumer.seek(tp, start)
        got = read_exactly(consumer, tp, ends[tp.partition] - start)
        got_view = [(r.offset, r.key, r.value, list(r.headers), r.timestamp) for r in got]
        want = [(i,) + record(tp.partition, i, base_ms) for i in range(start, ends[tp.partition])]
        check(f"assign+seek partition {tp.partition} from {start}", got_view == want,
              f"got {got_view[:3]}... ({len(got_view)}) want {want[:3]}... ({len(want)})")

    # offsets_for_times: the earliest offset whose timestamp is >= the target.
    lookups = {
        "single-record batches": (tp0, base_ms + 10_500, 11),
        "exact timestamp": (tp0, base_ms + 5_000, 5),
        "inside a multi-record batch": (tp1, base_ms + 20_001, 21),
        "first record": (tp1, base_ms - 60_000, 0),
        "inside a gzip batch": (tp2, base_ms + 44_999, 45),
    }
    for what, (tp, target, want) in lookups.items():
        found = consumer.offsets_for_times({tp: target})[tp]
        want_ts = base_ms + want * 1000
        check(
            f"offsets_for_times {what}",
            found is not None and (found.offset, found.timestamp) == (want, want_ts),
            f"target {target}: got {found}, want offset {want} timestamp {want_ts}",
        )
    past = consumer.offsets_for_times({tp2: base_ms + 3_600_000})[tp2]
    check("offsets_for_times past the last record is None", past is None, past)
    consumer.close()

    # Commit and fetch committed offsets in a group used only to store offsets.
    group = f"{topic}-offsets"
    committer = KafkaConsumer(bootstrap_servers=args.bootstrap, group_id=group, enable_auto_commit=False)
    committer.assign([tp0, tp1])
    check("committed before any commit is None", committer.committed(tp0) is None, committer.committed(tp0))
    committer.commit({tp0: OffsetAndMetadata(17, "seventeen", -1), tp1: OffsetAndMetadata(3, "", -1)})
    check("committed(tp0)", committer.committed(tp0) == 17, committer.committed(tp0))
    check("committed(tp1)", committer.committed(tp1) == 3, committer.committed(tp1))
    meta = committer.committed(tp0, metadata=True)
    check("committed metadata", meta is not None and meta.metadata == "seventeen", meta)
    check("committed(tp2) never committed is None", committer.committed(tp2) is None, committer.committed(tp2))
    committer.commit({tp0: OffsetAndMetadata(19, "nineteen", -1)})
    check("a second commit replaces the first", committer.committed(tp0) == 19, committer.committed(tp0))
    committer.close(autocommit=False)

    resumer = KafkaConsumer(bootstrap_servers=args.bootstrap, group_id=group, enable_auto_commit=False)
    resumer.assign([tp0])
    check("a new consumer sees the commit", resumer.committed(tp0) == 19, resumer.committed(tp0))
    got = read_exactly(resumer, tp0, ends[0] - 19)
    check(
        "a new consumer starts at the committed offset",
        [r.offset for r in got] == list(range(19, ends[0])),
        [r.offset for r in got],
    )
    resumer.close(autocommit=False)

    if failures:
        print(f"{len(failures)} checks failed: {', '.join(failures)}", flush=True)
        sys.exit(1)
    print("all checks passed", flush=True)


if __name__ == "__main__":
    main()
