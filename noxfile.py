"""Developer tasks: `nox -s tests lint typecheck` is what CI runs (see .ci/run)."""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.error_on_missing_interpreters = True

# A CPU build that installs from the local wheel cache; an unpinned torch pulls CUDA wheels.
TORCH = "torch==2.13.0"
RUFF = "ruff==0.17.6"


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite against real etcd servers the tests start themselves."""
    session.install("-e", ".[test,torch]", TORCH)
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install(RUFF)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package."""
    session.install("-e", ".[torch]", TORCH, "mypy")
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks side by side on one etcd server; `-- --quick` for a short run."""
    session.install("-e", ".[server,torch]", TORCH)
    session.run("python", "benchmarks/run.py", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """The demo on an embedded etcd: `nox -s demo -- --nodes 32`."""
    session.install("-e", ".[server]")
    session.run("rdzv", "demo", *session.posargs)
