"""The echo server: every message goes back as it came, without a copy.

    qstack serve qstack.apps.echo:handle      # after pip install
    qstack serve apps.echo:handle             # in a source checkout
"""

from __future__ import annotations

from qstack.app import Request


def handle(req: Request) -> memoryview:
    return req.data
