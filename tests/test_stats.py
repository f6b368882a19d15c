"""qstack.stats: histogram buckets, percentiles and the --stats lines."""

import re

import pytest

from qstack.stats import (QS_LAT_BUCKETS, StatsView, bucket_of, bucket_upper_ns,
                          fmt_count, fmt_ns, percentile)


# --- buckets -------------------------------------------------------------------

def test_small_values_have_exact_buckets():
    for v in range(8):
        assert bucket_of(v) == v and bucket_upper_ns(v) == v


def test_known_buckets():
    assert bucket_of(8) == 8 and bucket_upper_ns(8) == 8
    assert bucket_of(15) == 15
    assert bucket_of(16) == bucket_of(17) == 16 and bucket_upper_ns(16) == 17
    assert bucket_of(1000) == 63 and bucket_upper_ns(63) == 1023
    assert bucket_upper_ns(QS_LAT_BUCKETS - 1) == (1 << 43) - 1


def test_every_value_is_within_its_bucket():
    values = list(range(0, 5000)) + [(1 << e) + d for e in range(13, 43) for d in (-1, 0, 1)]
    for v in values:
        b = bucket_of(v)
        assert 0 <= b < QS_LAT_BUCKETS
        assert v <= bucket_upper_ns(b)
        assert b == 0 or v > bucket_upper_ns(b - 1)
        # 8 sub-buckets per power of two: at most 12.5% above the true value
        assert bucket_upper_ns(b) <= v + v // 8 + 1


def test_bucket_bounds_are_contiguous():
    for b in range(1, QS_LAT_BUCKETS):
        assert bucket_of(bucket_upper_ns(b)) == b
        assert bucket_of(bucket_upper_ns(b - 1) + 1) == b


def test_huge_values_clamp_to_the_last_bucket():
    assert bucket_of(1 << 43) == QS_LAT_BUCKETS - 1
    assert bucket_of(1 << 62) == QS_LAT_BUCKETS - 1
    assert bucket_of(-5) == 0


# --- percentiles ---------------------------------------------------------------

def hist_of(values):
    h = [0] * QS_LAT_BUCKETS
    for v in values:
        h[bucket_of(v)] += 1
    return h


def test_percentile():
    h = hist_of([1000] * 99 + [1_000_000])
    assert percentile(h, 0.5) == 1023
    assert percentile(h, 0.99) == 1023
    assert percentile(h, 0.999) == bucket_upper_ns(bucket_of(1_000_000))
    assert percentile(h, 1.0) == bucket_upper_ns(bucket_of(1_000_000))
    assert percentile([0] * QS_LAT_BUCKETS, 0.5) is None
    assert percentile(hist_of([5]), 0.01) == 5


def test_formatting():
    assert fmt_ns(None) == "-"
    assert fmt_ns(850) == "850ns"
    assert fmt_ns(1_300) == "1.3us"
    assert fmt_ns(42_000) == "42us"
    assert fmt_ns(1_300_000) == "1.3ms"
    assert fmt_ns(2_400_000_000) == "2.4s"
    assert fmt_count(512) == "512" and fmt_count(51_234) == "51.2k"
    assert fmt_count(2_500_000) == "2.50M" and fmt_count(None) == "-"


# --- StatsView -----------------------------------------------------------------

def snap(core, t, requests, lat_values, conns=10, queued=(0, 0), cpu=(0.0, 0.0),
         nbytes=0, accepted=10):
    levels = []
    for lv in range(2):
        levels.append({"requests": requests[lv], "bytes_in": nbytes, "bytes_out": nbytes,
                       "replies": requests[lv], "queued": queued[lv],
                       "lat": hist_of(lat_values[lv])})
    return {"core": core, "t": t, "conns": conns, "accepted": accepted,
            "bufs_in_use": 12, "bufs_total": 8192, "cpu_stack": cpu[0],
            "cpu_hub": cpu[1], "levels": levels}


NO_FAULTS = ("  paused 0  protocol_errors 0 accept_errors 0 handler_errors 0 hub_blocks 0"
             " msg_timeouts 0 idle_timeouts 0 write_timeouts 0 quota_closes 0")


def test_first_snapshot_shows_gauges_only():
    lines = StatsView().update([snap(0, 10.0, (5, 5), ([], []), queued=(3, 4))])
    assert lines == ["core 0  conns 10  L0 - req/s - MB/s q 3 p50 - p99 - | "
                     "L1 - req/s - MB/s q 4 p50 - p99 -  bufs 12/8192  cpu stack - hub -"
                     + NO_FAULTS]


def test_interval_rates_and_latency():
    view = StatsView()
    view.update([snap(0, 10.0, (0, 0), ([], []))])
    lines = view.update([snap(0, 12.0, (102_400, 10), ([45_000] * 100, []),
                              cpu=(0.76, 1.22), nbytes=3_300_000, conns=1000)])
    assert lines == ["core 0  conns 1000  L0 51.2k req/s 3.3 MB/s q 0 p50 45us p99 45us | "
                     "L1 5 req/s 3.3 MB/s q 0 p50 - p99 -  bufs 12/8192  "
                     "cpu stack 38% hub 61%" + NO_FAULTS]


def test_latency_is_over_the_interval_only():
    view = StatsView()
    view.update([snap(0, 0.0, (100, 0), ([10_000_000] * 100, []))])   # slow past
    line = view.update([snap(0, 1.0, (200, 0), ([10_000_000] * 100 + [2_000] * 100, []))])[0]
    assert "p50 2.0us p99 2.0us" in line


def test_total_line_merges_cores():
    view = StatsView()
    view.update([snap(0, 0.0, (0, 0), ([], [])), snap(1, 0.0, (0, 0), ([], []))])
    lines = view.update([
        snap(1, 1.0, (1000, 0), ([1_000_000] * 10, []), conns=5, queued=(1, 2)),
        snap(0, 1.0, (3000, 0), ([1_000] * 90, []), conns=7, queued=(3, 0)),
    ])
    assert [ln.split("  ")[0] for ln in lines] == ["core 0", "core 1", "total"]
    total = lines[2]
    assert "conns 12" in total and "L0 4.0k req/s" in total
    assert "q 4 p50 1.0us p99 1.0ms" in total       # 90 fast + 10 slow samples
    assert "q 2 p50 -" in total                     # L1: queue summed, no samples
    assert "bufs 24/16384" in total


def test_single_core_has_no_total_line():
    view = StatsView()
    assert len(view.update([snap(0, 0.0, (0, 0), ([], []))])) == 1


def test_restarted_core_resets_its_baseline():
    view = StatsView()
    view.update([snap(0, 0.0, (1000, 0), ([], []), accepted=50)])
    line = view.update([snap(0, 1.0, (10, 0), ([], []), accepted=1)])[0]
    assert "L0 - req/s" in line and "-" in line and not re.search(r"-\d", line)
    line = view.update([snap(0, 2.0, (20, 0), ([], []), accepted=2)])[0]
    assert "L0 10 req/s" in line


@pytest.mark.parametrize("levels", [1, 3])
def test_any_number_of_levels(levels):
    s = snap(0, 0.0, (0, 0), ([], []))
    s["levels"] = [dict(s["levels"][0]) for _ in range(levels)]
    line = StatsView().update([s])[0]
    assert line.count(" req/s") == levels


def test_errors_and_paused_conns_are_totals_summed_over_cores():
    view = StatsView()
    a = {**snap(0, 0.0, (0, 0), ([], [])), "protocol_errors": 2, "accept_errors": 1,
         "errors": 7, "hub_blocks": 1, "paused_conns": 3}
    b = {**snap(1, 0.0, (0, 0), ([], [])), "protocol_errors": 5, "paused_conns": 1}
    lines = view.update([a, b])
    quota = " msg_timeouts 0 idle_timeouts 0 write_timeouts 0 quota_closes 0"
    assert lines[0].endswith("  paused 3  protocol_errors 2 accept_errors 1 "
                             "handler_errors 7 hub_blocks 1" + quota)
    assert lines[2].endswith("  paused 4  protocol_errors 7 accept_errors 1 "
                             "handler_errors 7 hub_blocks 1" + quota)


# --- what --stats prints: timestamp, json ---------------------------------------

def test_text_lines_end_with_a_timestamp_and_json_is_the_snapshot():
    import datetime
    import json

    from qstack.stats import stats_lines
    now = 1_700_000_000.0
    stamp = datetime.datetime.fromtimestamp(now).isoformat(timespec="seconds")
    lines = stats_lines(StatsView(), [snap(0, 1.0, (10, 0), ([1000], [])),
                                      snap(1, 1.0, (0, 0), ([], []))], "text", now)
    assert [ln.split()[0] for ln in lines] == ["core", "core", "total"]
    assert all(ln.startswith(("core ", "total")) and ln.endswith(f"  at {stamp}")
               for ln in lines)
    out = stats_lines(StatsView(), [snap(1, 1.0, (0, 0), ([], [])),
                                    snap(0, 2.0, (10, 0), ([1000], []))], "json", now)
    objs = [json.loads(ln) for ln in out]
    assert [o["core"] for o in objs] == [0, 1] and all(o["time"] == now for o in objs)
    assert objs[0]["levels"][0]["requests"] == 10 and objs[0]["t"] == 2.0
