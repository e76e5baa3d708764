"""Developer tasks. Plain `nox` runs the default sessions, which is what CI runs (.ci/run)."""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
# What CI runs (.ci/run calls plain `nox`).
nox.options.sessions = ["tests", "tests-etcd34", "lint", "typecheck", "docs", "bench-quick"]
nox.options.error_on_missing_interpreters = True

# A CPU build that installs from the local wheel cache; an unpinned torch pulls CUDA wheels.
TORCH = "torch==2.13.0"
RUFF = "ruff==0.17.6"


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite against real etcd servers the tests start themselves, with coverage.

    Branch coverage of rdzv, subprocesses included ([tool.coverage] in pyproject.toml), is
    printed at the end. The coverage floor (fail_under) holds for a run of the whole suite only:
    with arguments (`nox -s tests -- tests/test_cli.py`) the report is printed, not enforced.
    """
    session.install("-e", ".[test,torch]", TORCH)
    _pytest_with_coverage(session, *session.posargs, floor=not session.posargs)


@nox.session(name="tests-fast")
def tests_fast(session: nox.Session) -> None:
    """The fast inner loop: the tests not marked slow (`pytest -m "not slow"`), with coverage.

    The report is printed, not enforced: the floor is the whole suite's, and the slow tests
    that this loop leaves out are the only ones to reach some paths (restarts, expiry, torchrun).
    """
    session.install("-e", ".[test,torch]", TORCH)
    _pytest_with_coverage(session, "-m", "not slow", *session.posargs, floor=False)


def _pytest_with_coverage(session: nox.Session, *arguments: str, floor: bool) -> None:
    """pytest ARGUMENTS under coverage, then the combined report; `floor`: enforce fail_under."""
    session.run("coverage", "erase")
    session.run("coverage", "run", "-m", "pytest", *arguments)
    session.run("coverage", "combine", "--quiet")
    session.run("coverage", "report", *([] if floor else ["--fail-under=0"]))


@nox.session(name="tests-etcd34")
def tests_etcd34(session: nox.Session) -> None:
    """The test suite against etcd 3.4: Debian's etcd-server and etcd-client packages.

    The packages are unpacked into .nox, not installed: no service starts. Set
    RDZV_ETCD34_BINARY to use an etcd 3.4 binary you already have.
    """
    binary = os.environ.get("RDZV_ETCD34_BINARY") or _debian_etcd34(session)
    session.install("-e", ".[test,torch]", TORCH)
    # No coverage here: the `tests` session measures it, and tracing would only slow CI down.
    session.run("pytest", *session.posargs, env={"RDZV_ETCD_BINARY": binary})


def _debian_etcd34(session: nox.Session) -> str:
    root = Path(session.cache_dir) / "etcd34"
    binary = root / "usr" / "bin" / "etcd"
    if not binary.exists():
        downloads = Path(session.cache_dir) / "etcd34-debs"
        downloads.mkdir(parents=True, exist_ok=True)
        with session.chdir(downloads):
            session.run("apt-get", "download", "etcd-server", "etcd-client", external=True)
        for package in sorted(downloads.glob("*.deb")):
            session.run("dpkg-deb", "-x", str(package), str(root), external=True)
    session.run(str(binary), "--version", external=True)
    return str(binary)


@nox.session
def fuzz(session: nox.Session) -> None:
    """The property tests with the "fuzz" Hypothesis profile: ten times the examples (~11 min)."""
    session.install("-e", ".[test,torch]", TORCH)
    session.run(
        "pytest",
        "-s",
        "tests/test_properties.py",
        *session.posargs,
        env={"HYPOTHESIS_PROFILE": "fuzz"},
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install(RUFF)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package and the tests."""
    session.install("-e", ".[test,torch]", TORCH, "mypy")
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks side by side on one etcd server; `-- --quick` for a short run."""
    _bench(session, *session.posargs)


def _bench(session: nox.Session, *arguments: str) -> None:
    session.install("-e", ".[bench]", TORCH)
    session.run("python", "benchmarks/run.py", *arguments)


@nox.session(name="bench-quick")
def bench_quick(session: nox.Session) -> None:
    """Every benchmark, briefly: CI runs it so that the benchmarks never rot."""
    _bench(session, "--quick", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site, warnings as errors (`-- serve` to preview)."""
    session.install("-e", ".[docs]")
    session.env["NO_MKDOCS_2_WARNING"] = "1"
    if session.posargs[:1] == ["serve"]:
        session.run("mkdocs", "serve", *session.posargs[1:])
    else:
        session.run("mkdocs", "build", "--strict", "--site-dir", "site", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """The demo on an embedded etcd: `nox -s demo -- --nodes 32`."""
    session.install("-e", ".[server]")
    session.run("rdzv", "demo", *session.posargs)
