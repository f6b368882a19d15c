"""The ``qstack`` command.

Start-up is a straight line -- parse flags, build the config, import the
handler, check the port, run -- and every mistake on it is a ConfigError that
ends as one line, ``qstack: error: <message>``, exit status 2.  Only argparse
prints usage (its own errors, also status 2).  Flag values are validated by
load_config, not by argparse, so `--port 70000` and `port: 70000` in the file
give the same message.

The server is imported lazily: the error paths above must not pay for (or
depend on) the native core and gevent, and with several cores the parent must
stay a plain process until it has forked (see qstack.supervisor).

Subcommands: each ``_add_<name>`` registers its parser and sets ``run``; more
(``load``, ``bench``) plug in the same way.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys

from qstack import __version__
from qstack.config import Config, parse_rule
from qstack.config_sources import load_layers
from qstack.errors import ConfigError
from qstack.loadgen.cli import add_load_parser
from qstack.loadgen.monitor import add_monitor_parser
from qstack.redisctl import add_redis_parser as _add_redis

LOG_LEVELS = ("debug", "info", "warning", "error")


def _int_list(text: str) -> list[int]:
    try:
        return [int(x, 0) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or N,N,... got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is two lines: the usage, then what went
    wrong with a hint (the closest flag, and where the full help is)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        usage = " ".join(self.format_usage().split())
        hint = f"see '{self.prog} --help'"
        if message.startswith("unrecognized arguments:"):
            unknown = message.split(":", 1)[1].split()
            flag = next((a.split("=", 1)[0] for a in unknown if a.startswith("-")), None)
            close = difflib.get_close_matches(flag, list(self._option_string_actions),
                                              n=1) if flag else []
            if close:
                hint = f"did you mean {close[0]}? {hint}"
        print(usage, file=sys.stderr)
        print(f"{self.prog}: error: {message} ({hint})", file=sys.stderr)
        sys.exit(2)


def _default_of(key: str) -> object:
    section, _, name = key.partition(".")
    value = getattr(getattr(Config(), section), name)
    return "none" if value is None else value


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a handler",
                       usage="qstack serve [MODULE:ATTR] [options]",
                       description="Serve MODULE:ATTR on every core. Settings come from "
                                   "the built-in defaults (shown below), then each --config "
                                   "file in order, then QSTACK_SECTION__KEY environment "
                                   "variables (e.g. QSTACK_SERVER__PORT=9000), then flags.")
    p.add_argument("app", nargs="?", metavar="MODULE:ATTR",
                   help="the handler (default: app.handler from the config)")
    p.add_argument("--wsgi", dest="app.wsgi", metavar="MODULE:APP", default=None,
                   help="serve a WSGI app over HTTP/1.1 instead of a message handler "
                        "(app.wsgi)")
    p.add_argument("--config", "-c", metavar="FILE", action="append", default=None,
                   help="YAML config (see conf/qstack.yaml and `qstack config --dump`); "
                        "repeatable, later files override earlier ones")
    # default=None everywhere: only flags actually given override the file.
    flags = [
        ("--host", "server.host", str, "address to listen on, or unix:PATH"),
        ("--port", "server.port", int, "TCP port (0 = any free port)"),
        ("--cores", "server.cores", int, "worker processes, one per core"),
        ("--workers", "server.workers", int, "greenlets per core"),
        ("--reply-order", "server.reply_order", str,
         "replies on a connection: arrival | completion"),
        ("--backend", "server.backend", str, "network stack: auto | uring | kernel | ustack"),
        ("--grace", "server.shutdown_grace", float, "seconds to finish requests on stop"),
        ("--block-warning", "server.block_warning", float,
         "log a handler's stack when it blocks the hub this long (0 = off)"),
        ("--message-timeout", "server.message_timeout", float,
         "reset a connection whose message is unfinished after this many seconds (0 = off)"),
        ("--idle-timeout", "server.idle_timeout", float,
         "close a connection idle this many seconds (0 = off)"),
        ("--write-timeout", "server.write_timeout", float,
         "reset a connection that reads none of its replies this long (0 = off)"),
        ("--backlog", "server.backlog", int, "listen() backlog per core"),
        ("--stats-interval", "server.stats_interval", float, "seconds between stats lines"),
        ("--stats-format", "server.stats_format", str, "--stats lines: text | json"),
        ("--metrics", "metrics.listen", str,
         "serve Prometheus metrics on HOST:PORT (/metrics)"),
        ("--log-format", "log.format", str, "log lines: text | json"),
        ("--log-file", "log.file", str, "append the log to this file instead of stderr"),
        ("--access-sample", "log.access_sample", float,
         "share of requests the access log writes, 0 < R <= 1"),
        ("--framing", "app.framing", str, "raw | line | fixed:N | length:N"),
        ("--max-body", "http.max_body", int, "--wsgi: largest request body in bytes (413)"),
        ("--max-head", "http.max_head", int,
         "--wsgi: largest request line + headers in bytes (431)"),
        ("--max-line", "http.max_line", int, "--wsgi: largest request line in bytes (414)"),
        ("--max-message", "app.max_message", int,
         "largest message in bytes; larger is a protocol error"),
        ("--levels", "priority.levels", int, "number of priority levels"),
        ("--reserve", "priority.reserve", _int_list,
         "workers held back for higher levels: N or r0,r1,..."),
        ("--pin", "layout.pin", str, "thread layout: none | shared | split"),
        ("--stack", "layout.stack", str, "where the stack runs: auto | thread | inline"),
        ("--driver", "ustack.driver", str, "ustack device driver: tap | dpdk | memif"),
        ("--tap", "ustack.tap", str, "ustack TAP device name"),
        ("--eal", "ustack.eal", str, "ustack DPDK EAL arguments"),
        ("--memif", "ustack.memif", str, "ustack memif socket path (--driver memif; with "
                                            "--cores N, one link per core: PATH.kofN)"),
        ("--ip", "ustack.ip", str, "ustack address/prefix, e.g. 198.18.0.2/24"),
        ("--gateway", "ustack.gateway", str, "ustack default gateway"),
        ("--mac", "ustack.mac", str, "ustack MAC address"),
    ]
    for flag, key, typ, text in flags:
        p.add_argument(flag, dest=key, type=typ, default=None, metavar=key.split(".")[1].upper(),
                       help=f"{text} ({key}, default {_default_of(key)})")
    p.add_argument("--bind", "-b", dest="server.bind", action="append", metavar="ADDR",
                   default=None,
                   help="listen on HOST:PORT or unix:PATH; repeatable, every core serves "
                        "them all (server.bind, default: --host and --port)")
    p.add_argument("--priority", action="append", metavar="RULE", default=None,
                   help="offset=N,value=N[,mask=N][,level=N], or with --wsgi "
                        "path=/P, header=NAME[:VALUE] or method=M [,level=N]; "
                        "repeatable, first match wins (priority.rules)")
    p.add_argument("--access-log", dest="log.access", action="store_true", default=None,
                   help="log a line per request of a message handler (log.access, default off)")
    p.add_argument("--stats", dest="server.stats", action="store_true", default=None,
                   help="print per-core stats every interval (server.stats, default off)")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info",
                   help="default info")
    p.set_defaults(run=_serve, parser=p)


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print the default config",
                       description="Print the default YAML config (every key, its default "
                                   "and meaning): qstack config --dump > qstack.yaml")
    p.add_argument("--dump", action="store_true", help="print the default YAML (the default)")
    p.set_defaults(run=_config)


def _config(args: argparse.Namespace) -> int:
    from importlib.resources import files
    sys.stdout.write(files("qstack").joinpath("qstack.yaml").read_text(encoding="utf-8"))
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qstack", description="Serve many TCP connections with request priorities.")
    parser.add_argument("--version", action="version", version=f"qstack {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_serve(sub)
    add_load_parser(sub)
    add_monitor_parser(sub)
    _add_redis(sub)
    _add_config(sub)
    for name, p in sub.choices.items():
        if p.get_default("parser") is None:
            p.set_defaults(parser=p)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    out: dict[str, object] = {k: v for k, v in vars(args).items()
                              if "." in k and v is not None}
    if args.priority:
        out["priority.rules"] = [parse_rule(text) for text in args.priority]
    if args.app is not None:
        out["app.handler"] = args.app
    return out


def _serve(args: argparse.Namespace) -> int:
    # Imported here so a bad config never imports qstack.app (and below it
    # the hub, gevent and the native core) just to print an error.
    from qstack.app.loader import check_handler, load_callable, reload_callable

    cfg = load_layers(args.config, _overrides(args), os.environ)
    _setup_logging(args.log_level, cfg.log.format, cfg.log.file)
    if cfg.app.wsgi is not None:
        return _serve_wsgi(cfg)
    if cfg.app.handler is None:
        raise ConfigError("no handler given: pass MODULE:ATTR "
                          "(e.g. qstack serve apps.echo:handle), --wsgi MODULE:APP, "
                          "or set app.handler")
    baseline = set(sys.modules)
    handler = load_callable(cfg.app.handler, "handler")
    check_handler(handler, cfg.app.handler)

    def reload_handler():
        new = reload_callable(cfg.app.handler, "handler", baseline)
        check_handler(new, cfg.app.handler)
        return new

    return _run(cfg, handler, reload_handler)


def _serve_wsgi(cfg: Config) -> int:
    """--wsgi MODULE:APP: the app behind qstack.app.wsgi's message handler."""
    from qstack.app.loader import load_callable, reload_callable
    from qstack.app.wsgi import WSGIHandler
    from qstack.transport import lib
    if lib.qs_http_probe() != 0:
        raise ConfigError("app.wsgi: this build has no HTTP parser (llhttp): install it "
                          "(Debian: apt-get install node-llhttp) and rebuild (make build)")
    from qstack import server
    if server.kernel_sockets(cfg):
        cfg = server.check_listen(cfg)
    spec = cfg.app.wsgi
    baseline = set(sys.modules)

    def make(app):
        return WSGIHandler(app, server_name=cfg.server.host, server_port=cfg.server.port,
                           multiprocess=cfg.server.cores > 1, access=cfg.log.access,
                           access_sample=cfg.log.access_sample,
                           server_header=cfg.http.server_header)

    handler = make(load_callable(spec, "WSGI app"))

    def reload_handler():
        return make(reload_callable(spec, "WSGI app", baseline))

    return _run(cfg, handler, reload_handler, checked=True)


def _run(cfg: Config, handler, reload_handler, checked=False) -> int:
    from qstack import server
    if server.kernel_sockets(cfg) and not checked:
        cfg = server.check_listen(cfg)  # port 0: every core must bind the same one
    if cfg.server.cores == 1:
        return server.serve(cfg, handler, core_index=0, stats_fd=None)
    from qstack.supervisor import Supervisor
    return Supervisor(cfg, handler, reload_handler=reload_handler).run()


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (ISO 8601, UTC), level, pid, logger,
    message, exc (the formatted traceback) when there is one, and an access
    line's fields (qstack.app.access) as keys of their own."""

    def format(self, record: logging.LogRecord) -> str:
        import datetime
        import json
        out = {"time": datetime.datetime.fromtimestamp(
                   record.created, datetime.timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname.lower(), "pid": record.process,
               "logger": record.name, "message": record.getMessage()}
        fields = getattr(record, "access", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.stack_info:
            out["exc"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s qstack[%(process)d] %(levelname)s %(message)s"


def _setup_logging(level: str, fmt: str = "text", path: str | None = None) -> None:
    """(Re)configure the root logger: stderr or ``path`` (appended), text or json."""
    if path is not None:
        try:
            handler: logging.Handler = logging.FileHandler(path, mode="a", encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"log.file: cannot open {path}: {e.strerror or e}") from None
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qstack`` console script; returns the exit status."""
    parser = _build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            # The subcommand's parser reports it, so the usage shown is its own.
            sub = getattr(args, "parser", parser)
            sub.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.command is None:
            parser.print_usage(sys.stderr)
            print("qstack: error: a command is required (try: qstack serve --help)",
                  file=sys.stderr)
            return 2
        _setup_logging(getattr(args, "log_level", "info"))
        return args.run(args)
    except ConfigError as e:
        # One line even if a message slipped in a newline (e.g. from a library).
        print(f"qstack: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C during start-up (e.g. a slow handler import): quiet, like a shell.
        return 130

