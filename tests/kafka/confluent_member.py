#!/usr/bin/env python3
"""One member of a confluent-kafka consumer group, for tests/kafka_clients.rs.

Subscribes to --topic in --group with auto-commit off. After each poll batch it appends every
consumed record to --log, flushes the file, and only then commits the batch's offsets
synchronously; a successful commit is logged (and flushed) after it returns. So when the process
is killed with SIGKILL at any point, the log holds every record it consumed and never claims a
commit that did not happen. --pause-ms stands for processing time between logging a batch and
committing it, so a kill usually finds consumed records not yet committed. Log lines
(tab-separated):
    ASSIGN  p,p,...       partitions assigned (eager rebalance: replaces the previous set)
    REVOKE  p,p,...       partitions revoked
    LOST    p,p,...       partitions lost (session expired)
    REC     p  offset  id
    COMMIT  p  offset     committed: the next offset to consume
    COMMIT_FAILED  p  offset  error
    ERROR   message
A rebalance callback is registered, so librdkafka rejoins only from inside consume(), after this
loop has committed what it processed: a survivor never hands over uncommitted records.
SIGTERM ends the loop; the consumer then closes (leaving the group) and the process exits 0.
"""

import argparse
import signal
import time

from confluent_kafka import Consumer, KafkaException, TopicPartition


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--session-timeout-ms", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--pause-ms", type=int, default=0, help="processing time: between logging a batch and committing it")
    args = ap.parse_args()

    log = open(args.log, "a", encoding="utf-8")
    stopping = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stopping.__setitem__("flag", True))

    def write(line):
        log.write(line + "\n")
        log.flush()

    def partitions(parts):
        return ",".join(str(tp.partition) for tp in sorted(parts, key=lambda tp: tp.partition))

    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": args.group,
            "client.id": args.name,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "range",
            "session.timeout.ms": args.session_timeout_ms,
            "heartbeat.interval.ms": max(100, args.session_timeout_ms // 6),
            "error_cb": lambda err: write(f"ERROR\t{err}"),
        }
    )
    consumer.subscribe(
        [args.topic],
        on_assign=lambda _, parts: write(f"ASSIGN\t{partitions(parts)}"),
        on_revoke=lambda _, parts: write(f"REVOKE\t{partitions(parts)}"),
        on_lost=lambda _, parts: write(f"LOST\t{partitions(parts)}"),
    )
    while not stopping["flag"]:
        batch = consumer.consume(num_messages=args.batch, timeout=0.2)
        next_offsets = {}
        for msg in batch:
            if msg.error():
                log.write(f"ERROR\t{msg.error()}\n")
                continue
            record_id = int(msg.value()[:7])
            log.write(f"REC\t{msg.partition()}\t{msg.offset()}\t{record_id}\n")
            next_offsets[msg.partition()] = msg.offset() + 1
        log.flush()
        if not next_offsets:
            continue
        if args.pause_ms:
            time.sleep(args.pause_ms / 1000)
        offsets = [TopicPartition(args.topic, p, o) for p, o in sorted(next_offsets.items())]
        try:
            result = consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as e:
            for tp in offsets:
                write(f"COMMIT_FAILED\t{tp.partition}\t{tp.offset}\t{e}")
        else:
            for tp in result:
                if tp.error:
                    log.write(f"COMMIT_FAILED\t{tp.partition}\t{tp.offset}\t{tp.error}\n")
                else:
                    log.write(f"COMMIT\t{tp.partition}\t{tp.offset}\n")
            log.flush()
    consumer.close()
    write("CLOSED")


if __name__ == "__main__":
    main()
