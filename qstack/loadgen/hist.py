"""HDR log-linear latency histograms, as the C engine records them.

The layout is HdrHistogram's for a lowest value of 1 ns and 3 significant
digits (qsload.h: QSL_HIST_SUB_BITS = 10): values below 2048 ns have a bucket
each; above, every power of two is cut into 1024 equal buckets, so a bucket
is at most 1/1024 (0.1%) of its values wide.  The engine exports only the
non-empty buckets; histograms from several processes merge exactly by adding
counts.  :func:`bucket_of`, :func:`bucket_low` and :func:`bucket_width`
are the engine's own C functions (qsload.h; the layout is defined once, in
qstack/native/common/hist.h), read through cffi.

Quantiles follow HdrHistogram's ``getValueAtPercentile``: the q-quantile is
the highest value equivalent to the bucket holding the value of rank
ceil(q * count) (nearest rank, as HCMonitor's cdf.txt), clamped to the exact
minimum and maximum seen.  The error is therefore below 0.1% of the value.
"""

from __future__ import annotations

from qstack._loadgen import lib as _lib

BUCKETS = _lib.QSL_HIST_BUCKETS
_MAX_VALUE = (1 << 64) - 1

__all__ = ["Histogram", "bucket_of", "bucket_low", "bucket_width", "BUCKETS"]


def bucket_of(value: int) -> int:
    return _lib.qsl_hist_bucket_of(min(max(0, int(value)), _MAX_VALUE))


bucket_low = _lib.qsl_hist_bucket_low
bucket_width = _lib.qsl_hist_bucket_width


class Histogram:
    """Sparse counts per bucket plus exact count, min, max and sum (ns)."""

    __slots__ = ("counts", "count", "min", "max", "sum", "clamped")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.min = 0
        self.max = 0
        self.sum = 0.0
        self.clamped = 0

    @classmethod
    def from_values(cls, values) -> "Histogram":
        h = cls()
        for v in values:
            h.record(int(v))
        return h

    @classmethod
    def from_export(cls, info: dict, buckets) -> "Histogram":
        """From an engine export: info {count, min, max, sum, clamped} and
        (bucket, count) pairs."""
        h = cls()
        h.counts = {int(b): int(c) for b, c in buckets}
        h.count = int(info["count"])
        h.min = int(info["min"])
        h.max = int(info["max"])
        h.sum = float(info["sum"])
        h.clamped = int(info.get("clamped", 0))
        return h

    def record(self, value: int) -> None:
        b = bucket_of(value)
        if b == BUCKETS - 1 and value >= bucket_low(b) + bucket_width(b):
            self.clamped += 1
        self.counts[b] = self.counts.get(b, 0) + 1
        if self.count == 0 or value < self.min:
            self.min = value
        self.max = max(self.max, value)
        self.count += 1
        self.sum += value

    def merge(self, other: "Histogram") -> "Histogram":
        for b, c in other.counts.items():
            self.counts[b] = self.counts.get(b, 0) + c
        if other.count:
            self.min = other.min if self.count == 0 else min(self.min, other.min)
            self.max = max(self.max, other.max)
        self.count += other.count
        self.sum += other.sum
        self.clamped += other.clamped
        return self

    @classmethod
    def merged(cls, hists) -> "Histogram":
        out = cls()
        for h in hists:
            out.merge(h)
        return out

    def mean(self) -> float | None:
        return self.sum / self.count if self.count else None

    def quantile(self, q: float) -> int | None:
        """Value (ns) at quantile q in [0, 1]; None when empty."""
        return self.quantiles([q])[0]

    def quantiles(self, qs) -> list[int | None]:
        """Several quantiles in one pass (qs in any order)."""
        if not self.count:
            return [None] * len(qs)
        ranks = []
        for q in qs:
            if q <= 0:
                ranks.append(1)
                continue
            r = -(-int(round(q * 1e12)) * self.count // 10**12)   # ceil(q * count), exact-ish
            ranks.append(min(max(r, 1), self.count))
        order = sorted(range(len(qs)), key=lambda i: ranks[i])
        out: list[int | None] = [None] * len(qs)
        seen, k = 0, 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            while k < len(order) and seen >= ranks[order[k]]:
                v = bucket_low(b) + bucket_width(b) - 1
                out[order[k]] = min(max(v, self.min), self.max)
                k += 1
            if k == len(order):
                break
        for i, q in enumerate(qs):
            if q >= 1:
                out[i] = self.max
        return out

    def cdf_points(self) -> list[tuple[int, float]]:
        """(value ns, cumulative fraction) at the top of every non-empty bucket."""
        pts, seen = [], 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            v = min(max(bucket_low(b) + bucket_width(b) - 1, self.min), self.max)
            pts.append((v, seen / self.count))
        return pts

    def to_json(self) -> dict:
        return {"count": self.count, "min": self.min, "max": self.max, "sum": self.sum,
                "clamped": self.clamped,
                "buckets": [[b, self.counts[b]] for b in sorted(self.counts)]}

    @classmethod
    def from_json(cls, doc: dict) -> "Histogram":
        return cls.from_export(doc, doc["buckets"])
