"""Errors shared by every layer.

Kept free of imports so that any module, down to the native bindings, can
raise them without pulling in the frontend.
"""


class ConfigError(Exception):
    """A bad setting, flag, file or handler spec found before serving.

    The message is one line meant for the user: it names the key, flag or
    file at fault and what was expected.  The CLI prints it as
    ``qstack: error: <message>`` and exits 2, without a traceback.
    """
