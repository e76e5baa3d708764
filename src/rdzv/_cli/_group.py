"""The `rdzv` command group: `--version`, `--log-level`, and usage errors on one line.

The commands are attached to `main` by the package (`rdzv._cli`), not here.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

import click

from rdzv._version import __version__

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
"""The levels `--log-level` takes, as the `logging` module names them (in any case)."""

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _LogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler that `--log-level` puts on the `rdzv` logger (one, however often called)."""


def configure_logging(level: str) -> None:
    """Send the records of the `rdzv` logger hierarchy at `level` and above to stderr."""
    logger = logging.getLogger("rdzv")
    for handler in [h for h in logger.handlers if isinstance(h, _LogHandler)]:
        logger.removeHandler(handler)
    handler = _LogHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(level.upper())


class _OneLineUsageError(click.UsageError):
    """A usage error on one line, starting with the command, as every other error of rdzv's."""

    def show(self, file: Any = None) -> None:
        path = self.ctx.command_path if self.ctx is not None else "rdzv"
        message = " ".join(self.format_message().split())
        if not message.endswith((".", "?", "!")):
            message += "."
        click.echo(f"{path}: {message} Try '{path} --help'.", file=file, err=file is None)


# click >= 8.2 shows the help for a group called without a command by raising this.
_SHOWS_HELP: tuple[type[click.UsageError], ...] = tuple(
    [getattr(click.exceptions, "NoArgsIsHelpError")]  # noqa: B009 - absent before click 8.2
    if hasattr(click.exceptions, "NoArgsIsHelpError")
    else []
)


@contextlib.contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    try:
        yield
    except _SHOWS_HELP:
        raise
    except _OneLineUsageError:
        raise
    except click.UsageError as error:
        raise _OneLineUsageError(error.format_message(), error.ctx) from error


class _Commands(click.Group):
    """rdzv's command group: click's usage errors take four lines; this one's, one."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        with _one_line_usage_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _one_line_usage_errors():
            return super().invoke(ctx)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rdzv")
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    envvar="RDZV_LOG_LEVEL",
    show_envvar=True,
    default=None,
    help="Log rdzv's own records at this level and above to stderr. Default: none.",
)
def main(log_level: str | None) -> None:
    """rdzv: an etcd v3 rendezvous backend for PyTorch elastic training.

    Exit codes: 0 success, 1 the operation failed, 2 bad usage or no etcd to run.
    """
    if log_level is not None:
        configure_logging(log_level)
