"""`attnserve` command line: `serve`, plus `train`, `evaluate` and `zoo` from models.training.

Flags override ATTNSERVE_* settings. Invalid settings or an unservable configuration end the
process with exit status 2 and a message naming the bad value.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

from pydantic import ValidationError

__all__ = ["main"]


def _serve(args: argparse.Namespace) -> int:
    """Validate the settings, build the app and run uvicorn until SIGINT/SIGTERM (then drain)."""
    from service.app import ConfigError, create_app
    from service.observe import configure_logging
    from service.server import serve
    from service.settings import Settings, describe_errors

    overrides: dict[str, Any] = {
        key: value
        for key, value in (("host", args.host), ("port", args.port), ("log_level", args.log_level))
        if value is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        sys.stderr.write(f"attnserve: {describe_errors(exc)}\n")
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        app = create_app(settings, grpc=True)
    except ConfigError as exc:
        sys.stderr.write(f"attnserve: configuration error: {exc}\n")
        return 2
    _exit_cleanly_after_drain()
    serve(app, settings)
    return 0


def _exit_cleanly_after_drain() -> None:
    """uvicorn drains on SIGTERM/SIGINT, then re-raises the signal under the previous handler;
    with this one installed, a graceful stop ends with exit status 0 instead of death by signal."""

    def stopped(signum: int, frame: FrameType | None) -> None:
        logging.getLogger(__name__).info("stopped by %s", signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stopped)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="attnserve", description="Serve CNN classifiers with attention maps over REST."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the HTTP server (settings: ATTNSERVE_*)")
    serve.add_argument("--host", help="interface to bind (ATTNSERVE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="TCP port (ATTNSERVE_PORT, default 8000)")
    serve.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="log level (ATTNSERVE_LOG_LEVEL, default info)",
    )
    serve.set_defaults(func=_serve)
    from service import auth

    auth.register(commands)
    from service import predict

    predict.register(commands)
    try:
        from models.training import commands as training_commands
    except ImportError as exc:
        logging.getLogger(__name__).debug("training commands unavailable: %s", exc)
    else:
        training_commands.register(commands)
    from models.imports import command as import_command

    import_command.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `attnserve` console script and of `python -m service`."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
