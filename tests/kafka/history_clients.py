#!/usr/bin/env python3
"""Kafka clients that record what they did as a history for scripts/checker/kafka_history.py
(its docstring has the format), for tests/kafka_cluster_clients.rs.

    history_clients.py producer --bootstrap B --topic T --history FILE [--rate N] [--count N]
        confluent-kafka (librdkafka), enable.idempotence=true, acks=all: produces unique values
        `<name>-<n>` at about --rate records a second until SIGTERM (or --count records), then
        flushes and exits. Records send, ack (partition, offset) and fail events.
    history_clients.py group --bootstrap B --topic T --group G --history FILE
        a confluent-kafka consumer group member: records each poll, and after it commits the
        poll's offsets synchronously a commit (or commit_unknown) event; assignments as assign
        events. auto.offset.reset=error: librdkafka then reports every reset it would have made,
        and every log truncation it detects through OffsetForLeaderEpoch, as a consumer error
        (_AUTO_OFFSET_RESET), recorded as reset or truncation; a partition the group never
        committed starts at BEGINNING, set explicitly.
    history_clients.py assigned --bootstrap B --topic T --history FILE
        a confluent-kafka consumer with every partition assigned from BEGINNING and no group:
        its positions carry the leader epoch of the records it read, so after a leader change
        librdkafka validates them through OffsetForLeaderEpoch (--debug fetch logs each answer);
        auto.offset.reset=error as for the group. With --start S --epoch E every partition
        starts at S with leader epoch E instead, validated before the first fetch; a truncation
        found is recorded and the consumer goes on at the broker's end offset of that epoch.
    history_clients.py reader --bootstrap B --topic T --history FILE
        kafka-python 3, every partition assigned and seeked to 0 (no group); auto_offset_reset
        'none', so a position it would reset raises (recorded as reset) and a truncation found
        through OffsetForLeaderEpoch raises LogTruncationError (recorded as truncation; it goes
        on where the broker says the logs diverge); a diverging epoch in a Fetch answer is
        recorded as a truncation too. --start S --epoch E as for assigned.

Consumers run until SIGTERM, then close. Client errors go to the history as error events and to
stderr. Every history line is flushed when written, so a killed client leaves what it saw. The
exit status is 0 unless the client itself failed (the history judges the broker).
"""

import argparse
import json
import logging
import re
import signal
import sys
import time

stopping = {"flag": False}

# librdkafka's consumer error for a truncation found through OffsetForLeaderEpoch (rdkafka_offset.c)
TRUNCATED_AT = re.compile(r"truncation detected at .*broker end offset is (\d+)", re.IGNORECASE)


def on_sigterm(*_):
    stopping["flag"] = True


class History:
    def __init__(self, path, process):
        self.file = open(path, "a", encoding="utf-8")
        self.process = process

    def write(self, kind, **fields):
        line = json.dumps({"type": kind, "process": self.process, "time": time.time(), **fields})
        self.file.write(line + "\n")

    def flush(self):
        self.file.flush()

    def event(self, kind, **fields):
        self.write(kind, **fields)
        self.flush()


def producer(args, history):
    from confluent_kafka import Producer

    state = {"acked": 0, "failed": 0, "fatal": None}

    def on_error(err):
        print(f"client error: {err}", file=sys.stderr, flush=True)
        history.event("error", detail=str(err))
        if err.fatal():
            state["fatal"] = str(err)

    def on_delivery(err, msg):
        value = msg.value().decode()
        if err is not None:
            state["failed"] += 1
            history.write("fail", value=value, error=str(err))
        else:
            state["acked"] += 1
            history.write("ack", value=value, partition=msg.partition(), offset=msg.offset())

    p = Producer(
        {
            "bootstrap.servers": args.bootstrap,
            "client.id": args.name,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
            "message.timeout.ms": 30000,
            "reconnect.backoff.ms": 50,
            "reconnect.backoff.max.ms": 500,
            "error_cb": on_error,
            **({"debug": args.debug} if args.debug else {}),
        }
    )
    n = 0
    started = time.monotonic()
    while not stopping["flag"] and state["fatal"] is None and (args.count is None or n < args.count):
        # Paced: the records due by now, in small bursts.
        due = int((time.monotonic() - started) * args.rate)
        if args.count is not None:
            due = min(due, args.count)
        while n < due:
            value = f"{args.name}-{n}"
            history.write("send", value=value)
            try:
                p.produce(args.topic, value=value.encode(), on_delivery=on_delivery)
            except BufferError:
                history.write("fail", value=value, error="local queue full")
            n += 1
        p.poll(0.01)
        history.flush()
    left = p.flush(args.flush_timeout_s)
    history.flush()
    print(
        f"sent {n} acked {state['acked']} failed {state['failed']} undelivered {left} fatal {state['fatal']}",
        flush=True,
    )
    return 0 if state["fatal"] is None and left == 0 else 1


def seek_when_ready(consumer, tp):
    """consumer.seek, retried while the partition's assignment is still being set up."""
    from confluent_kafka import KafkaException

    for _ in range(100):
        try:
            consumer.seek(tp)
            return
        except KafkaException:
            consumer.consume(num_messages=1, timeout=0.05)  # paused: serves callbacks only
    raise RuntimeError(f"cannot seek to {tp}")


def confluent_consumer(args, history):
    """The group member (role "group") or, with every partition assigned and no group, the
    librdkafka reader (role "assigned")."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

    grouped = args.role == "group"

    def on_error(err):
        print(f"client error: {err}", file=sys.stderr, flush=True)
        history.event("error", detail=str(err))

    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": args.group,
            "client.id": args.name,
            "enable.auto.commit": False,
            "auto.offset.reset": "error",
            "partition.assignment.strategy": "range",
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 500,
            "reconnect.backoff.ms": 50,
            "reconnect.backoff.max.ms": 500,
            "error_cb": on_error,
            **({"debug": args.debug} if args.debug else {}),
        }
    )

    def on_assign(c, parts):
        # A partition the group never committed starts at the log's beginning, set here: with
        # auto.offset.reset=error librdkafka would report it as a reset otherwise.
        for attempt in range(60):
            try:
                committed = c.committed(parts, timeout=5)
                break
            except KafkaException as e:
                history.event("error", detail=f"committed() on assign, attempt {attempt}: {e}")
                time.sleep(0.25)
        else:
            raise RuntimeError("no committed offsets in 60 attempts")
        for tp in committed:
            if tp.offset < 0:
                tp.offset = OFFSET_BEGINNING
        history.event("assign", group=args.group, partitions=sorted(tp.partition for tp in parts))
        c.assign(committed)

    def on_revoke(c, parts):
        history.event("revoke", partitions=sorted(tp.partition for tp in parts))

    if grouped:
        consumer.subscribe([args.topic], on_assign=on_assign, on_revoke=on_revoke, on_lost=on_revoke)
    else:
        partitions = sorted(consumer.list_topics(args.topic, timeout=30).topics[args.topic].partitions)
        if args.start is None:
            consumer.assign([TopicPartition(args.topic, p, OFFSET_BEGINNING) for p in partitions])
        else:
            # A position with its leader epoch, as a consumer that read up to there stands:
            # librdkafka validates a seek to it through OffsetForLeaderEpoch before it fetches
            # (an assign's offset is used as is), so the partitions are assigned paused.
            start = [TopicPartition(args.topic, p, args.start) for p in partitions]
            consumer.assign(start)
            consumer.pause(start)
            for p in partitions:
                seek_when_ready(consumer, TopicPartition(args.topic, p, args.start, leader_epoch=args.epoch))
            consumer.resume(start)
        at = 0 if args.start is None else args.start
        history.event("assign", partitions=partitions, positions={str(p): at for p in partitions})
    while not stopping["flag"]:
        batch = consumer.consume(num_messages=500, timeout=0.2)
        records = []
        next_offsets = {}
        for msg in batch:
            err = msg.error()
            if err is None:
                records.append([msg.partition(), msg.offset(), msg.value().decode()])
                next_offsets[msg.partition()] = msg.offset() + 1
            elif err.code() == KafkaError._AUTO_OFFSET_RESET:
                truncated = TRUNCATED_AT.search(err.str())
                history.event("truncation" if truncated else "reset", partition=msg.partition(), detail=err.str())
                if truncated and not grouped:
                    # Where the broker says the logs diverge: what librdkafka itself seeks to
                    # when a reset policy is set (here "error", so that the detection shows).
                    at = int(truncated.group(1))
                    consumer.assign([TopicPartition(args.topic, msg.partition(), at)])
                    history.event("assign", partitions=[msg.partition()], positions={str(msg.partition()): at})
            elif err.code() != KafkaError._PARTITION_EOF:
                history.event("error", partition=msg.partition(), detail=err.str())
        if records:
            history.event("poll", records=records)
        if not grouped or not next_offsets:
            continue
        offsets = [TopicPartition(args.topic, p, o) for p, o in sorted(next_offsets.items())]
        try:
            result = consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as e:
            for tp in offsets:
                history.write("commit_unknown", group=args.group, partition=tp.partition, offset=tp.offset)
            history.event("error", detail=f"commit: {e}")
            continue
        for tp in result:
            kind = "commit_unknown" if tp.error else "commit"
            history.write(kind, group=args.group, partition=tp.partition, offset=tp.offset)
        history.flush()
    consumer.close()
    return 0


def reader(args, history):
    from kafka import KafkaConsumer, OffsetAndMetadata, TopicPartition
    from kafka import errors as Errors

    class FetcherLog(logging.Handler):
        """kafka-python's fetcher log: a diverging epoch in a Fetch answer (it then validates its
        position; a consumer that read only committed records must never be told its log
        diverged) and offset resets (none: its positions are set explicitly, and the policy is
        'none')."""

        def emit(self, record):
            message = record.getMessage()
            if "diverged at epoch" in message:
                history.event("truncation", detail=message)
            elif "Resetting offset" in message:
                history.event("reset", detail=message)

    fetcher_log = logging.getLogger("kafka.consumer.fetcher")
    fetcher_log.setLevel(logging.INFO)
    fetcher_log.addHandler(FetcherLog())

    consumer = KafkaConsumer(
        bootstrap_servers=args.bootstrap.split(","),
        client_id=args.name,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="none",
        reconnect_backoff_ms=50,
        reconnect_backoff_max_ms=500,
    )
    deadline = time.monotonic() + 30
    partitions = None
    while not partitions:
        partitions = consumer.partitions_for_topic(args.topic)
        if not partitions:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no partitions of {args.topic} in metadata")
            time.sleep(0.1)
    tps = [TopicPartition(args.topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    at = 0 if args.start is None else args.start
    for tp in tps:
        if args.start is None:
            consumer.seek(tp, 0)
        else:
            # A position with its leader epoch, validated through OffsetForLeaderEpoch before the
            # next fetch. KafkaConsumer.seek takes an offset only (a position with no epoch is
            # never validated), so this goes through the subscription state it sets.
            consumer._subscription.seek(tp, OffsetAndMetadata(args.start, "", args.epoch))
    history.event("assign", partitions=[tp.partition for tp in tps], positions={str(tp.partition): at for tp in tps})
    while not stopping["flag"]:
        try:
            polled = consumer.poll(timeout_ms=200, max_records=500)
        except Errors.LogTruncationError as e:
            for tp, divergent in e.divergent_offsets.items():
                history.event("truncation", partition=tp.partition, detail=str(e))
                # Resume where the broker says the logs diverge (recorded as a new position).
                at = divergent.offset if divergent is not None else 0
                consumer.seek(tp, at)
                history.event("assign", partitions=[tp.partition], positions={str(tp.partition): at})
            continue
        except (Errors.OffsetOutOfRangeError, Errors.NoOffsetForPartitionError) as e:
            history.event("reset", detail=repr(e))
            for tp in tps:
                position = consumer.position(tp) if tp in consumer.assignment() else None
                history.event("error", partition=tp.partition, detail=f"position {position}")
            raise
        except Errors.KafkaError as e:
            history.event("error", detail=repr(e))
            time.sleep(0.1)
            continue
        records = []
        for tp, msgs in polled.items():
            for m in msgs:
                records.append([tp.partition, m.offset, m.value.decode()])
        if records:
            history.event("poll", records=records)
    consumer.close()
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["producer", "group", "assigned", "reader"])
    ap.add_argument("--bootstrap", required=True, help="comma-separated host:port list")
    ap.add_argument("--topic", required=True)
    ap.add_argument("--history", required=True)
    ap.add_argument("--name", help="process name in the history (default: the role)")
    ap.add_argument("--group", default="history-group")
    ap.add_argument("--rate", type=float, default=500.0, help="producer: records a second")
    ap.add_argument("--count", type=int, help="producer: stop after this many records")
    ap.add_argument("--start", type=int, help="assigned, reader: every partition's starting offset")
    ap.add_argument("--epoch", type=int, default=-1, help="assigned, reader: the leader epoch of --start")
    ap.add_argument("--flush-timeout-s", type=float, default=40.0)
    ap.add_argument("--debug", help="producer, group, assigned: librdkafka debug contexts, logged to stderr")
    args = ap.parse_args()
    args.name = args.name or args.role
    signal.signal(signal.SIGTERM, on_sigterm)
    history = History(args.history, args.name)
    role = {"producer": producer, "group": confluent_consumer, "assigned": confluent_consumer, "reader": reader}[
        args.role
    ]
    status = role(args, history)
    history.flush()
    print(f"{args.name}: done", file=sys.stderr, flush=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
