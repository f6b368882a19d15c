"""``qstack load``: an MCC-style load generator with a native engine.

The engine (qstack/native/loadgen/, ABI qstack/native/include/qsload.h,
module qstack._loadgen) runs the event loop in C without the GIL: staggered
connects with retries, MCC's epoch/burst schedule, an open-loop rate or a
closed loop, per-connection message windows, replies matched and checked,
latency per priority in HDR histograms.  This package drives it: options
(validation, limits), runner (processes, progress, merging), report (text,
cdf.txt, JSON, plot), cli (the ``load`` subcommand).

Use from Python (e.g. a benchmark)::

    from qstack.loadgen import validate, run
    doc = run(validate(host="127.0.0.1", port=8000, connections=100, duration=5))
    doc["latency_ms"]["high"]["p99"]
"""

from qstack.loadgen.options import LoadOptions, check_limits, validate


def run(options, printer=None, marks=None):
    """Run the load (see runner.run); returns the report document."""
    from qstack.loadgen import runner
    return runner.run(options, printer=printer, marks=marks)


__all__ = ["LoadOptions", "check_limits", "validate", "run"]
