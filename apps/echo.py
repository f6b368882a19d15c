"""The echo server: every message goes back as it came, without a copy.

    qstack serve apps.echo:handle
"""


def handle(req):
    return req.data
