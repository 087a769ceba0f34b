"""A transactional producer against ringlog, which has no transaction coordinator yet:
init_transactions must fail at once with a fatal, non-retriable error that says why, not retry
until its timeout. Prints what it got; exits 0 when it got that."""
import sys

import confluent_kafka as ck

producer = ck.Producer({"bootstrap.servers": sys.argv[1], "transactional.id": "ringlog-test-txn"})
try:
    producer.init_transactions(30)
    print("FAIL: init_transactions succeeded")
    sys.exit(1)
except ck.KafkaException as e:
    err = e.args[0]
    print(f"fatal={err.fatal()} retriable={err.retriable()} code={err.code()} {err.str()}")
    sys.exit(0 if err.fatal() and not err.retriable() else 1)
