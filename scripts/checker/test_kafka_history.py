#!/usr/bin/env python3
"""Unit tests of kafka_history.py: a valid history passes, and each anomaly, made by hand, is
found and counted alone. Run: python3 -B -m unittest discover -s scripts/checker
(tests/kafka_cluster_clients.rs runs them)."""

import json
import os
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kafka_history  # noqa: E402


class History:
    """Builds events with increasing times."""

    def __init__(self):
        self.events = []

    def add(self, process, kind, **fields):
        self.events.append({"type": kind, "process": process, "time": len(self.events) * 0.001, **fields})
        return self

    def produce(self, value, partition, offset):
        self.add("p", "send", value=value)
        return self.add("p", "ack", value=value, partition=partition, offset=offset)

    def poll(self, process, *records):
        return self.add(process, "poll", records=[list(r) for r in records])

    def check(self, **kw):
        return kafka_history.check(self.events, **kw)


def valid_history():
    """Two partitions, a control record at 0/2, a reader from the start and a group member that
    commits, is reassigned and resumes at its commit."""
    h = History()
    for i, (p, o) in enumerate([(0, 0), (0, 1), (1, 0), (0, 3), (1, 1)]):
        h.produce(f"v{i}", p, o)
    h.add("r", "assign", partitions=[0, 1], positions={"0": 0, "1": 0})
    h.poll("r", (0, 0, "v0"), (1, 0, "v2"), (0, 1, "v1"))
    h.poll("r", (0, 3, "v3"), (1, 1, "v4"))
    h.add("g", "assign", partitions=[0, 1], group="G")
    h.poll("g", (0, 0, "v0"), (0, 1, "v1"))
    h.add("g", "commit", group="G", partition=0, offset=2)
    h.add("g", "assign", partitions=[0, 1], group="G")  # a rebalance: resumes at the commit
    h.poll("g", (0, 3, "v3"), (1, 0, "v2"), (1, 1, "v4"))
    return h


class CheckerTest(unittest.TestCase):
    def assert_only(self, report, anomaly, count=1):
        expected = {name: 0 for name in kafka_history.ANOMALIES}
        expected[anomaly] = count
        self.assertEqual(report["anomalies"], expected, json.dumps(report, indent=1))
        self.assertFalse(report["valid"])
        self.assertTrue(report["examples"][anomaly])

    def test_a_valid_history_passes(self):
        report = valid_history().check()
        self.assertTrue(report["valid"], json.dumps(report, indent=1))
        self.assertEqual(report["stats"]["acked"], 5)
        self.assertEqual(report["stats"]["read_by"], {"g": 5, "r": 5})

    def test_a_failed_send_may_be_read_once_or_not_at_all(self):
        h = valid_history()
        h.add("p", "send", value="maybe").add("p", "fail", value="maybe", error="timed out")
        h.add("p", "send", value="gone").add("p", "fail", value="gone", error="timed out")
        h.poll("r", (0, 4, "maybe"))
        self.assertTrue(h.check()["valid"])

    def test_lost_write(self):
        h = History().produce("a", 0, 0).produce("b", 0, 1)
        h.add("c", "assign", partitions=[0], positions={"0": 1})
        h.poll("c", (0, 1, "b"))
        report = h.check()
        self.assert_only(report, "lost")
        self.assertEqual(report["examples"]["lost"][0]["value"], "a")

    def test_unseen_write(self):
        h = History().produce("a", 0, 0).produce("b", 0, 1)
        h.add("c", "assign", partitions=[0], positions={"0": 0})
        h.poll("c", (0, 0, "a"))
        self.assert_only(h.check(), "unseen")

    def test_duplicate_a_value_at_two_offsets(self):
        h = History().produce("a", 0, 0)
        h.add("c", "assign", partitions=[0], positions={"0": 0})
        h.poll("c", (0, 0, "a"), (0, 1, "a"))
        report = h.check()
        self.assert_only(report, "duplicate")
        self.assertEqual(report["examples"]["duplicate"][0]["positions"], [[0, 0], [0, 1]])

    def test_inconsistent_offsets_across_consumers(self):
        h = History().produce("a", 0, 0).produce("b", 0, 1).add("p", "send", value="c")
        h.add("p", "fail", value="c", error="timed out")
        for consumer, value in (("c1", "b"), ("c2", "c")):
            h.add(consumer, "assign", partitions=[0], positions={"0": 0})
            h.poll(consumer, (0, 0, "a"), (0, 1, value))
        # c2's "c" at 0/1 sits where "b" was acknowledged: c2 never read "b" either, but a read
        # past it does not make it lost.
        report = h.check()
        self.assertEqual(report["anomalies"]["inconsistent_offset"], 1, report)
        self.assertEqual(report["examples"]["inconsistent_offset"][0]["values"], ["b", "c"])

    def test_inconsistent_offset_against_the_acknowledgement(self):
        h = History().produce("a", 0, 0).produce("b", 0, 1)
        h.add("c", "assign", partitions=[0], positions={"0": 0})
        h.poll("c", (0, 0, "b"), (0, 1, "a"))  # both values, each at the other's offset
        report = h.check()
        self.assertEqual(report["anomalies"]["inconsistent_offset"], 2, report)
        self.assertEqual(report["anomalies"]["duplicate"], 2, report)

    def test_unexpected_value(self):
        h = History().produce("a", 0, 0)
        h.add("c", "assign", partitions=[0], positions={"0": 0})
        h.poll("c", (0, 0, "a"), (0, 1, "never-sent"))
        self.assert_only(h.check(), "unexpected")

    def test_poll_skip_between_polls(self):
        h = History()
        for i in range(4):
            h.produce(f"v{i}", 0, i)
        h.add("c1", "assign", partitions=[0], positions={"0": 0})
        h.poll("c1", (0, 0, "v0"), (0, 1, "v1"), (0, 2, "v2"), (0, 3, "v3"))
        h.add("c2", "assign", partitions=[0], positions={"0": 0})
        h.poll("c2", (0, 0, "v0"), (0, 1, "v1"))
        h.poll("c2", (0, 3, "v3"))  # 0/2 passed over
        report = h.check()
        self.assert_only(report, "poll_skip")
        self.assertEqual(report["examples"]["poll_skip"][0]["skipped"], [2])

    def test_poll_skip_from_the_assigned_position(self):
        h = History().produce("a", 0, 0).produce("b", 0, 1)
        h.add("c1", "assign", partitions=[0], positions={"0": 0})
        h.poll("c1", (0, 0, "a"), (0, 1, "b"))
        h.add("c2", "assign", partitions=[0], positions={"0": 0})
        h.poll("c2", (0, 1, "b"))  # started past 0/0
        self.assert_only(h.check(), "poll_skip")

    def test_a_gap_no_record_held_is_not_a_skip(self):
        h = History().produce("a", 0, 0).produce("b", 0, 5)  # 1..4: control batches
        h.add("c", "assign", partitions=[0], positions={"0": 0})
        h.poll("c", (0, 0, "a"), (0, 5, "b"))
        self.assertTrue(h.check()["valid"])

    def test_nonmonotonic_poll(self):
        h = History().produce("a", 0, 0).produce("b", 0, 1)
        h.add("c", "assign", partitions=[0], positions={"0": 0})
        h.poll("c", (0, 0, "a"), (0, 1, "b"))
        h.poll("c", (0, 0, "a"))  # back to 0 with no new assignment
        self.assert_only(h.check(), "nonmonotonic_poll")

    def test_nonmonotonic_within_one_poll(self):
        h = History().produce("a", 0, 0).produce("b", 0, 1)
        h.add("c", "assign", partitions=[0], positions={"0": 0})
        h.poll("c", (0, 1, "b"), (0, 0, "a"))
        # 0/0 before 0/1 was also passed over when 0/1 came first.
        report = h.check()
        self.assertEqual(report["anomalies"]["nonmonotonic_poll"], 1, report)

    def test_a_group_rewinds_to_its_commit_but_no_further(self):
        h = History()
        for i in range(4):
            h.produce(f"v{i}", 0, i)
        h.add("g1", "assign", partitions=[0], group="G")
        h.poll("g1", (0, 0, "v0"), (0, 1, "v1"))
        h.add("g1", "commit", group="G", partition=0, offset=1)
        h.poll("g1", (0, 2, "v2"))
        h.add("g1", "commit_unknown", group="G", partition=0, offset=3)
        h.add("g2", "assign", partitions=[0], group="G")
        h.poll("g2", (0, 1, "v1"), (0, 2, "v2"), (0, 3, "v3"))  # at the commit: allowed
        h.add("g3", "assign", partitions=[0], group="G")
        h.poll("g3", (0, 3, "v3"))  # where the unknown commit put it: allowed
        self.assertTrue(h.check()["valid"], h.check())
        h.add("g4", "assign", partitions=[0], group="G")
        h.poll("g4", (0, 0, "v0"))  # before the group's commit
        self.assert_only(h.check(), "nonmonotonic_poll")

    def test_a_group_resumes_past_an_unknown_commit_over_a_control_batch(self):
        # Seen in a nemesis run: a commit of 3 whose outcome was unknown was applied, 3 holds a
        # leader-change batch, and the member's first read after rejoining is at 4.
        h = History()
        for i in (0, 1, 2, 4):
            h.produce(f"v{i}", 0, i)
        h.add("g", "assign", partitions=[0], group="G")
        h.poll("g", (0, 0, "v0"))
        h.add("g", "commit", group="G", partition=0, offset=1)
        h.poll("g", (0, 1, "v1"), (0, 2, "v2"))
        h.add("g", "commit_unknown", group="G", partition=0, offset=3)
        h.add("g", "assign", partitions=[0], group="G")
        h.poll("g", (0, 4, "v4"))
        self.assertTrue(h.check()["valid"], h.check())
        # Past the unknown commit's position, a record held is still a skip.
        h2 = History()
        for i in range(5):
            h2.produce(f"v{i}", 0, i)
        h2.add("g", "assign", partitions=[0], group="G")
        h2.poll("g", (0, 0, "v0"), (0, 1, "v1"), (0, 2, "v2"))
        h2.add("g", "commit", group="G", partition=0, offset=1)
        h2.add("g", "commit_unknown", group="G", partition=0, offset=3)
        h2.add("g", "assign", partitions=[0], group="G")
        h2.poll("g", (0, 4, "v4"))  # 3 holds v3
        h2.poll("r", (0, 3, "v3"))
        self.assert_only(h2.check(), "poll_skip")

    def test_a_member_may_start_at_a_commit_answered_after_its_assignment(self):
        # The commit of 0..1 was sent before the rebalance and its answer recorded after the
        # assignment; the member starts at it. Another group's commit excuses nothing.
        def history(commit_group):
            h = History()
            for i in range(4):
                h.produce(f"v{i}", 0, i)
            h.add("g", "assign", partitions=[0], group="G")
            h.poll("g", (0, 0, "v0"), (0, 1, "v1"))
            h.add("g", "assign", partitions=[0], group="G")
            h.add("g", "commit", group=commit_group, partition=0, offset=2)
            return h.poll("g", (0, 2, "v2"), (0, 3, "v3"))

        self.assertTrue(history("G").check()["valid"])
        self.assert_only(history("other").check(), "poll_skip")

    def test_offset_reset_and_truncation_events(self):
        h = valid_history()
        h.add("r", "reset", partition=0, detail="offset out of range: reset to earliest")
        self.assert_only(h.check(), "offset_reset")
        h = valid_history()
        h.add("r", "truncation", partition=1, detail="log truncation detected")
        self.assert_only(h.check(), "truncation")

    def test_errors_are_listed_not_counted(self):
        h = valid_history().add("g", "error", detail="broker transport failure")
        report = h.check()
        self.assertTrue(report["valid"])
        self.assertEqual(report["error_count"], 1)

    def test_the_command_line_merges_files_by_time_and_exits_nonzero_on_an_anomaly(self):
        h = History()
        for i in range(3):
            h.produce(f"v{i}", 0, i)
        h.add("c", "assign", partitions=[0], positions={"0": 0})
        h.poll("c", (0, 0, "v0"), (0, 2, "v2"))
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kafka_history.py")
        with tempfile.TemporaryDirectory() as d:
            paths = []
            for process in ("p", "c"):
                path = os.path.join(d, f"{process}.jsonl")
                with open(path, "w", encoding="utf-8") as f:
                    for e in h.events:
                        if e["process"] == process:
                            f.write(json.dumps(e) + "\n")
                    f.write('{"type": "poll", "proc')  # half a line, as a killed process leaves
                paths.append(path)
            run = subprocess.run([sys.executable, "-B", script, *paths], capture_output=True, text=True)
            self.assertEqual(run.returncode, 1, run.stderr)
            report = json.loads(run.stdout)
            self.assertEqual(report["anomalies"]["poll_skip"], 1, report)
            self.assertEqual(report["stats"]["acked"], 3)
            with open(paths[0], "a", encoding="utf-8") as f:
                f.write('\n{"type": "ack"}\n')
            run = subprocess.run([sys.executable, "-B", script, *paths], capture_output=True, text=True)
            self.assertEqual(run.returncode, 2, run.stdout)


if __name__ == "__main__":
    unittest.main()
