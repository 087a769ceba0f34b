#!/usr/bin/env python3
"""Produces records with confluent-kafka (librdkafka) for tests/kafka_clients.rs.

Every record's value carries a unique id: `<id, 7 digits>|<codec>|<filler>`; its key is
`key-<id mod 257>`. The ids are split evenly between the compression codecs given, one producer
per codec (compression is a producer setting), each with acks=all and enable.idempotence=true.

Each delivery report is appended to --acked the moment librdkafka hands it over, and the file is
flushed at once, so a test that kills the broker knows exactly what was acknowledged:
    ACK<TAB>id<TAB>partition<TAB>offset<TAB>timestamp_ms<TAB>key<TAB>value
    FAILED<TAB>id<TAB>error
Client errors (error_cb) go to stderr. The last stdout line is a summary; the exit status is 0
only if every record was acknowledged and no fatal error occurred.
"""

import argparse
import sys
import time

from confluent_kafka import Producer

FILLER = "the quick brown fox jumps over the lazy dog; " * 4


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--codecs", default="none", help="comma-separated compression.type values")
    ap.add_argument("--acked", required=True, help="delivery report file")
    ap.add_argument("--headers", action="store_true", help="give every record two headers")
    ap.add_argument("--timestamp-ms", type=int, help="record i gets this + i as its timestamp")
    ap.add_argument("--chunk", type=int, default=0, help="pause after every CHUNK records")
    ap.add_argument("--pause-ms", type=int, default=0)
    ap.add_argument("--flush-timeout-s", type=float, default=40.0)
    args = ap.parse_args()

    codecs = args.codecs.split(",")
    per_codec = args.count // len(codecs)
    assert per_codec * len(codecs) == args.count, "--count must split evenly between the codecs"

    acked_file = open(args.acked, "w", encoding="utf-8")
    state = {"acked": 0, "failed": 0, "fatal": None, "first_error": None}

    def on_error(err):
        print(f"client error: {err}", file=sys.stderr, flush=True)
        if err.fatal():
            state["fatal"] = str(err)

    def on_delivery(err, msg):
        record_id = int(msg.value()[:7])
        if err is not None:
            state["failed"] += 1
            state["first_error"] = state["first_error"] or f"id {record_id}: {err}"
            acked_file.write(f"FAILED\t{record_id}\t{err}\n")
        else:
            state["acked"] += 1
            _, ts = msg.timestamp()
            acked_file.write(
                f"ACK\t{record_id}\t{msg.partition()}\t{msg.offset()}\t{ts}\t"
                f"{msg.key().decode()}\t{msg.value().decode()}\n"
            )
        acked_file.flush()

    produced = 0
    undelivered = 0
    for n, codec in enumerate(codecs):
        producer = Producer(
            {
                "bootstrap.servers": args.bootstrap,
                "client.id": f"ringlog-test-producer-{codec}",
                "acks": "all",
                "enable.idempotence": True,
                "compression.type": codec,
                "linger.ms": 5,
                "message.timeout.ms": 30000,
                "reconnect.backoff.ms": 50,
                "reconnect.backoff.max.ms": 500,
                "error_cb": on_error,
            }
        )
        for record_id in range(n * per_codec, (n + 1) * per_codec):
            if state["fatal"]:
                break
            value = f"{record_id:07d}|{codec}|{FILLER[: record_id % len(FILLER)]}"
            key = f"key-{record_id % 257}"
            extra = {}
            if args.headers:
                extra["headers"] = [("id", str(record_id).encode()), ("codec", codec.encode())]
            if args.timestamp_ms is not None:
                extra["timestamp"] = args.timestamp_ms + record_id
            while True:
                try:
                    producer.produce(args.topic, value=value, key=key, on_delivery=on_delivery, **extra)
                    break
                except BufferError:
                    producer.poll(0.05)
            produced += 1
            producer.poll(0)
            if args.chunk and produced % args.chunk == 0:
                producer.poll(args.pause_ms / 1000)
        undelivered += producer.flush(args.flush_timeout_s)
        if state["failed"] or state["fatal"] or undelivered:
            break  # the first broken codec says enough; the others would only wait as long

    acked_file.close()
    print(
        f"produced {produced} acked {state['acked']} failed {state['failed']} "
        f"undelivered {undelivered} fatal {state['fatal']} first_error {state['first_error']}",
        flush=True,
    )
    ok = produced == args.count and state["acked"] == args.count and state["fatal"] is None
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
