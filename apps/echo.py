"""The echo server: every message goes back as it came, without a copy.

    qstack serve apps.echo:handle

The same app ships in the package as ``qstack.apps.echo`` (for pip installs).
"""

from qstack.apps.echo import handle

__all__ = ["handle"]
