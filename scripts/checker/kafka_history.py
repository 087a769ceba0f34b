#!/usr/bin/env python3
"""Checks a recorded history of Kafka producers and consumers for the anomalies Jepsen's Kafka
workload reports, so a test (or a fault-injection run) passes only if every count is 0.

    python3 scripts/checker/kafka_history.py HISTORY.jsonl... [--log-start N] [--max-examples N]

prints a JSON report on stdout and exits 0 when the history is valid, 1 when it holds an anomaly,
2 when it cannot be read. Only python3's standard library is needed. The unit tests beside it
(test_kafka_history.py) feed it a hand-made history of each anomaly.

History format
--------------
JSON lines, one event each, one topic per history; each client writes its own file and the
checker merges them by "time". Every event has "type", "process" (the client's name, unique per
process) and "time" (seconds since the epoch, float: merged files are ordered by it; within one
file the order of lines is kept). Values are strings, unique per send.

Producers:
    {"type": "send", "value": V}                                 about to be produced
    {"type": "ack",  "value": V, "partition": N, "offset": O}    acknowledged at N/O
    {"type": "fail", "value": V, "error": E}                     not acknowledged: it may or may
                                                                 not have been written
Consumers:
    {"type": "assign", "partitions": [N, ...], "positions": {"N": O}, "group": G}
        a new assignment (a start, a rebalance). The next read of each partition must be at its
        position: "positions" if given (the client seeked there), else group G's last commit of
        the partition in the history (or a commit whose outcome is unknown and came after it),
        else --log-start. "positions" and "group" are optional.
    {"type": "poll", "records": [[N, O, V], ...]}
        one poll's records, in the order the client returned them.
    {"type": "commit", "group": G, "partition": N, "offset": O}
        group G committed O (the next offset to read) for N, acknowledged by the coordinator.
    {"type": "commit_unknown", "group": G, "partition": N, "offset": O}
        a commit that failed after it was sent: it may have been applied.
    {"type": "reset", "partition": N, "detail": S}
        the client moved its position on its own (auto.offset.reset, out of range): an anomaly.
    {"type": "truncation", "partition": N, "detail": S}
        the client detected a truncated log (OffsetForLeaderEpoch, a diverging epoch).
    {"type": "revoke", "partitions": [N, ...]}
        partitions taken away (informational: the next assign sets the positions).
    {"type": "error", "detail": S}
        any other client error: listed in the report, not an anomaly.

Anomalies (each a count in "anomalies", with up to --max-examples examples)
---------------------------------------------------------------------------
lost                 an acknowledged value no consumer read, though some consumer read that
                     partition past its acknowledged offset
unseen               an acknowledged value no consumer read, nor anything past it (the consumers
                     stopped early, or it is lost)
duplicate            a value at two or more positions (acknowledgements and reads together)
inconsistent_offset  a position with two or more values (acknowledgements and reads together,
                     so also: two consumers saw different records at one offset)
unexpected           a value read that no producer sent
poll_skip            a consumer passed a position holding a known record (acknowledged or read by
                     anyone) between two successive reads of a partition, or between its
                     assigned position (the group's commit, or one answered after the
                     assignment and before the first read) and its first read
nonmonotonic_poll    a consumer read a partition at or below its previous read, or below its
                     assigned position, with no new assignment in between
offset_reset         reset events
truncation           truncation events

Offsets a record never held (a control batch, such as a leader-change record) are not gaps:
only positions some client saw a value at count.
"""

import argparse
import bisect
import json
import sys
from collections import defaultdict

ANOMALIES = (
    "lost",
    "unseen",
    "duplicate",
    "inconsistent_offset",
    "unexpected",
    "poll_skip",
    "nonmonotonic_poll",
    "offset_reset",
    "truncation",
)


class HistoryError(Exception):
    """An event the checker cannot read."""


def load(paths):
    """The events of every file, merged by time (stable: each file keeps its order)."""
    events = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        # A process killed mid-write may leave half a line at the end; nothing after it exists.
        complete = text[: text.rfind("\n") + 1]
        for number, line in enumerate(complete.splitlines(), 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError as e:
                raise HistoryError(f"{path}:{number}: {e}") from e
            for field in ("type", "process", "time"):
                if field not in event:
                    raise HistoryError(f"{path}:{number}: no {field!r} in {line!r}")
            events.append(event)
    events.sort(key=lambda e: e["time"])
    return events


class Report:
    def __init__(self, max_examples):
        self.max_examples = max_examples
        self.counts = {name: 0 for name in ANOMALIES}
        self.examples = {name: [] for name in ANOMALIES}

    def add(self, name, example, count=1):
        self.counts[name] += count
        if len(self.examples[name]) < self.max_examples:
            self.examples[name].append(example)


def check(events, log_start=0, max_examples=10):
    """The report of a merged history: {"valid", "anomalies", "examples", "stats", "errors"}."""
    report = Report(max_examples)
    sent = set()
    acked = {}  # value -> (partition, offset)
    failed = set()
    values_at = defaultdict(set)  # (partition, offset) -> values
    positions_of = defaultdict(set)  # value -> (partition, offset)
    read_values = set()
    errors = []
    reads = defaultdict(int)  # process -> records read
    last_read = {}  # (process, partition) -> offset

    for e in events:
        kind = e["type"]
        if kind == "send":
            sent.add(e["value"])
        elif kind == "ack":
            at = (e["partition"], e["offset"])
            acked[e["value"]] = at
            values_at[at].add(e["value"])
            positions_of[e["value"]].add(at)
        elif kind == "fail":
            failed.add(e["value"])
        elif kind == "poll":
            for partition, offset, value in e["records"]:
                values_at[(partition, offset)].add(value)
                positions_of[value].add((partition, offset))
                read_values.add(value)
                reads[e["process"]] += 1
                key = (e["process"], partition)
                last_read[key] = max(last_read.get(key, offset), offset)
        elif kind in ("reset", "truncation"):
            name = "offset_reset" if kind == "reset" else "truncation"
            report.add(name, {k: e.get(k) for k in ("process", "time", "partition", "detail")})
        elif kind == "error":
            errors.append({k: e.get(k) for k in ("process", "time", "detail")})
        elif kind not in ("assign", "revoke", "commit", "commit_unknown"):
            raise HistoryError(f"unknown event type {kind!r}: {e}")

    # Every position some client saw a value at, per partition, sorted: the records a consumer
    # passing over a range must have read.
    known = defaultdict(list)
    for partition, offset in values_at:
        known[partition].append(offset)
    for offsets in known.values():
        offsets.sort()

    def known_between(partition, low, high):
        """Known positions in [low, high) of a partition."""
        offsets = known.get(partition, [])
        return offsets[bisect.bisect_left(offsets, low) : bisect.bisect_left(offsets, high)]

    for at, values in sorted(values_at.items()):
        if len(values) > 1:
            report.add("inconsistent_offset", {"partition": at[0], "offset": at[1], "values": sorted(values)})
    for value, at in sorted(positions_of.items()):
        if len(at) > 1:
            report.add("duplicate", {"value": value, "positions": [list(a) for a in sorted(at)]})
    for value in sorted(read_values - sent):
        report.add("unexpected", {"value": value, "positions": [list(a) for a in sorted(positions_of[value])]})

    furthest = defaultdict(lambda: -1)  # partition -> highest offset any consumer read
    for (_, partition), offset in last_read.items():
        furthest[partition] = max(furthest[partition], offset)
    for value, (partition, offset) in sorted(acked.items(), key=lambda kv: kv[1]):
        if value in read_values:
            continue
        example = {"value": value, "partition": partition, "offset": offset}
        report.add("lost" if furthest[partition] > offset else "unseen", example)

    # Each consumer's reads of each partition, in order: where it must read next.
    committed = defaultdict(dict)  # group -> partition -> (offset, later unknown outcomes)
    expected = {}  # (process, partition) -> set of allowed next offsets, or the last read offset
    for e in events:
        kind, process = e["type"], e["process"]
        if kind in ("commit", "commit_unknown"):
            group, partition, offset = e["group"], e["partition"], e["offset"]
            if kind == "commit":
                committed[group][partition] = [offset]
            else:
                committed[group].setdefault(partition, [log_start]).append(offset)
            # A commit sent before an assignment and recorded after it (the client waited for
            # its answer across the rebalance) may be where a member of the group that has not
            # read the partition yet starts: its offset fetch may come after the commit.
            for (waiting, assigned_partition), state in expected.items():
                if assigned_partition == partition and state[0] == "assigned" and state[2] == group:
                    state[1].append(offset)
        elif kind == "assign":
            given = {int(p): o for p, o in (e.get("positions") or {}).items()}
            for partition in e["partitions"]:
                if partition in given:
                    allowed = [given[partition]]
                elif e.get("group") is not None:
                    allowed = committed[e["group"]].get(partition, [log_start])
                else:
                    allowed = [log_start]
                expected[(process, partition)] = ("assigned", sorted(set(allowed)), e.get("group"))
        elif kind == "poll":
            for partition, offset, value in e["records"]:
                key = (process, partition)
                state = expected.get(key)
                example = {"process": process, "time": e["time"], "partition": partition, "offset": offset}
                if state is None:
                    pass  # reads with no assignment recorded: nothing to compare against
                elif state[0] == "assigned":
                    allowed = state[1]
                    if offset not in allowed:
                        if offset < min(allowed):
                            report.add("nonmonotonic_poll", {**example, "assigned_at": allowed})
                        else:
                            # From the latest allowed position below the read: a commit whose
                            # outcome is unknown may have moved the group there, and the offsets
                            # from it to the read may hold no record (a leader-change batch).
                            start = max(a for a in allowed if a < offset)
                            skipped = known_between(partition, start, offset)
                            if skipped:
                                report.add(
                                    "poll_skip",
                                    {**example, "assigned_at": allowed, "skipped": skipped[:10]},
                                )
                else:
                    previous = state[1]
                    if offset <= previous:
                        report.add("nonmonotonic_poll", {**example, "previous": previous})
                    else:
                        skipped = known_between(partition, previous + 1, offset)
                        if skipped:
                            report.add("poll_skip", {**example, "previous": previous, "skipped": skipped[:10]})
                expected[key] = ("read", offset)

    partitions = sorted(known)
    stats = {
        "sent": len(sent),
        "acked": len(acked),
        "failed": len(failed),
        "read_by": dict(sorted(reads.items())),
        "distinct_values_read": len(read_values),
        "last_offset": {str(p): known[p][-1] for p in partitions},
        "last_read": {
            process: {str(p): o for (pr, p), o in sorted(last_read.items()) if pr == process}
            for process in sorted(reads)
        },
    }
    return {
        "valid": not any(report.counts.values()),
        "anomalies": report.counts,
        "examples": {k: v for k, v in report.examples.items() if v},
        "stats": stats,
        "errors": errors[:max_examples],
        "error_count": len(errors),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("history", nargs="+", help="JSON-lines history files (merged by time)")
    ap.add_argument("--log-start", type=int, default=0, help="where a consumer with no position starts")
    ap.add_argument("--max-examples", type=int, default=10)
    args = ap.parse_args()
    try:
        report = check(load(args.history), args.log_start, args.max_examples)
    except (HistoryError, OSError, KeyError, TypeError, ValueError) as e:
        print(f"kafka_history: cannot read the history: {e!r}", file=sys.stderr)
        sys.exit(2)
    json.dump(report, sys.stdout, indent=1, sort_keys=False)
    print()
    sys.exit(0 if report["valid"] else 1)


if __name__ == "__main__":
    main()
