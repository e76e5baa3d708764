"""Every code sample of the documentation runs, against real etcd servers.

The samples are the fenced blocks of `docs/*.md` and `README.md`. How to write them:

- A ```` ```python ```` block is a program: it runs on its own, in a fresh Python process, as a
  reader would run it after copying it. It must finish by itself (within two minutes) and fail
  with an exception (an `assert`) when what it shows is not so. Top-level `await` is allowed, as
  in `python -m asyncio`: such a block runs inside `asyncio.run`. It runs twice in a row on the
  same etcd, as a reader may run it: what its first run left in etcd must not break the second.
- The quickstarts, read in order (README, then the pages in the order of the nav), run one after
  the other on one etcd, as a newcomer's `rdzv serve` would hold them: each uses a run id of its
  own.
- Blocks that are not Python programs use another language: ```` ```console ```` for shell
  sessions and command lines (torchrun, etcdctl, etcd), ```` ```json ````, ```` ```toml ````.
  Aliases of Python (`py`, `python3`, `pycon`) and fences without a language are refused, so
  that no sample escapes this test.
- ```` ```python title="train.py" ```` is a file, not a program: it is written to a directory,
  and the page's console lines that start with `$ torchrun` are run there (torchrun as
  `python -m torch.distributed.run`). Console lines without the `$ ` prompt are not run.
- A program names no host but this machine (`127.0.0.1:2379` or `localhost:2379`, where the
  reader's `rdzv serve` listens), so that pasted as it is it runs, or fails at once. Only a
  program that needs files of the reader's cluster (under `/etc/rdzv/`, below), which cannot run
  pasted anyway, may name cluster endpoints, written `10.0.0.1:2379` (`10.0.0.2:2379`, ...).
  Each of these endpoints is replaced by the endpoint of an etcd started for these tests. A
  plain block (no TLS, no auth) gets an empty etcd of its own, as a reader's would be, and runs
  once more after all the others on one etcd, as a reader's one `rdzv serve` would hold them.
  Other ports are left alone (a sample may show an unreachable endpoint such as `127.0.0.1:1`).
- A program pastes into `python -m asyncio` (Python 3.11's console, which ends a block at a
  blank line): no blank line inside an indented block, and one after each top-level block.
- Relative links and images in `README.md` and in `docs/*.md` name files that exist, and
  `mkdocs.yml` builds a site that works when it is opened from disk, as the README says to: its
  links name files, and it loads no script from the network (no ```` ```mermaid ```` fence,
  which Material draws with a script it fetches; diagrams are images under `docs/img/`).
- Paths under `/etc/rdzv/` name files that the test provides: `ca.pem` (the CA of the test
  servers), `client.pem` and `client-key.pem` (a client certificate it signed), and
  `etcd-password` (the password of the etcd user `rdzv-job`).
- A block that contains `protocol="https"` runs against an etcd that requires client
  certificates (mutual TLS); a block that contains `username=` runs against an etcd with
  authentication on, set up by running the `$ etcdctl` lines of `docs/operations.md`.
"""

from __future__ import annotations

import ast
import code
import dataclasses
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import CodeType

import pytest
import trustme

from rdzv.testing import EtcdServer, EtcdTLS, find_etcd_binary

ROOT = Path(__file__).resolve().parent.parent
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]

PASSWORDS = {"etcd-password": "rdzv-job-Passw0rd\n", "root-password": "root-Passw0rd\n"}

_FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_ENDPOINT = re.compile(r"\b(?:10\.0\.0\.\d{1,3}|127\.0\.0\.1|localhost):2379\b")
_PYTHON_ALIASES = {"py", "python3", "py3", "pycon", "pyi", "ipython"}
_TITLE = re.compile(r'title="(?P<title>[^"]+)"')
_SNIPPET_TIMEOUT = 120
# Pages whose samples run once only: none (every sample must run twice in a row).
_RUN_ONCE: set[str] = set()
_TORCHRUN_TIMEOUT = 180

# Runs one block as a program: top-level await inside asyncio.run, anything else as it is.
_RUNNER = """\
import ast, asyncio, inspect, sys
path = sys.argv[1]
with open(path) as file:
    code = compile(file.read(), path, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
namespace = {"__name__": "__main__", "__file__": path}
if code.co_flags & inspect.CO_COROUTINE:
    asyncio.run(eval(code, namespace))
else:
    exec(code, namespace)
"""


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced block of a page."""

    page: Path
    line: int
    language: str
    info: str
    text: str

    @property
    def title(self) -> str | None:
        """The block's `title="..."`, if it has one."""
        match = _TITLE.search(self.info)
        return match["title"] if match else None

    @property
    def name(self) -> str:
        """`page.md:LINE`, for test ids and messages."""
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def _blocks(page: Path) -> list[Block]:
    """The fenced blocks of `page`, in order."""
    blocks: list[Block] = []
    lines = page.read_text().splitlines()
    index = 0
    while index < len(lines):
        match = _FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        fence, info = match["fence"], match["info"].strip()
        end = index + 1
        while end < len(lines) and lines[end].rstrip() != fence:
            end += 1
        text = "\n".join(lines[index + 1 : end]) + "\n"
        language = info.split(maxsplit=1)[0] if info else ""
        blocks.append(Block(page, index + 1, language, info, text))
        index = end + 1
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in _blocks(page)]
PROGRAMS = [b for b in ALL_BLOCKS if b.language == "python" and b.title is None]
FILES = [b for b in ALL_BLOCKS if b.language == "python" and b.title is not None]
# The programs that run against a plain etcd (no TLS, no authentication), as a reader's would be.
PLAIN_PROGRAMS = [
    b for b in PROGRAMS if 'protocol="https"' not in b.text and "username=" not in b.text
]


def _console_commands(block: Block, program: str) -> list[str]:
    """The `$ PROGRAM ...` commands of a console block, continuation lines joined."""
    commands: list[str] = []
    current: str | None = None
    for raw in block.text.splitlines():
        line = raw.strip()
        if current is not None:
            current += " " + line.rstrip("\\").strip()
            if not line.endswith("\\"):
                commands.append(current)
                current = None
        elif line.startswith(f"$ {program} "):
            command = line[2:].rstrip("\\").strip()
            if line.endswith("\\"):
                current = command
            else:
                commands.append(command)
    return commands


TORCHRUN_COMMANDS = [
    (block, command)
    for block in ALL_BLOCKS
    if block.language == "console" and any(f.page == block.page for f in FILES)
    for command in _console_commands(block, "torchrun")
]


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files that samples find under /etc/rdzv/, and certificates for the TLS server."""
    directory = tmp_path_factory.mktemp("etc-rdzv")
    ca = trustme.CA()
    server, client = ca.issue_cert("127.0.0.1", "localhost"), ca.issue_cert("rdzv-client")
    ca.cert_pem.write_to_path(directory / "ca.pem")
    client.cert_chain_pems[0].write_to_path(directory / "client.pem")
    client.private_key_pem.write_to_path(directory / "client-key.pem")
    server.cert_chain_pems[0].write_to_path(directory / "server.pem")
    server.private_key_pem.write_to_path(directory / "server-key.pem")
    for name, content in PASSWORDS.items():
        (directory / name).write_text(content)
    return directory


@pytest.fixture
def docs_etcd() -> Iterator[EtcdServer]:
    """A plain etcd of the sample's own, empty as a reader's would be (starting one takes ~0.1 s).

    A server per sample, rather than one shared and wiped between samples: the samples use the
    default key prefix, as readers do, and nothing in the suite deletes a whole keyspace.
    """
    with EtcdServer(name="rdzv-docs") as server:
        yield server


@pytest.fixture(scope="module")
def tls_etcd(files: Path) -> Iterator[EtcdServer]:
    """An etcd that requires client certificates signed by the test CA."""
    tls = EtcdTLS(
        files / "server.pem",
        files / "server-key.pem",
        files / "ca.pem",
        client_cert_auth=True,
        client_cert_file=files / "client.pem",
        client_key_file=files / "client-key.pem",
    )
    with EtcdServer(name="rdzv-docs-tls", tls=tls) as server:
        yield server


def _etcdctl_environment(endpoint: str) -> dict[str, str]:
    etcd_bin = str(Path(find_etcd_binary()).parent)
    return {**os.environ, "PATH": f"{etcd_bin}{os.pathsep}{os.environ['PATH']}"} | {
        "ETCDCTL_API": "3",
        "ETCDCTL_ENDPOINTS": endpoint,
    }


@pytest.fixture(scope="module")
def auth_etcd(files: Path) -> Iterator[EtcdServer]:
    """An etcd with authentication on, set up with the etcdctl commands of operations.md."""
    [operations] = [page for page in PAGES if page.name == "operations.md"]
    commands = [
        command
        for block in _blocks(operations)
        if block.language == "console"
        for command in _console_commands(block, "etcdctl")
    ]
    assert any(command.endswith("auth enable") for command in commands)
    with EtcdServer(name="rdzv-docs-auth") as server:
        for command in commands:
            completed = subprocess.run(
                ["bash", "-c", _localized(command, server.endpoint, files)],
                cwd=files,
                env=_etcdctl_environment(server.endpoint),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert completed.returncode == 0, f"{command}\n{completed.stdout}{completed.stderr}"
        yield server


def _localized(text: str, endpoint: str, files: Path) -> str:
    """`text` with the docs' endpoints and /etc/rdzv/ paths pointing at the test's own."""
    return _ENDPOINT.sub(endpoint, text).replace("/etc/rdzv/", f"{files}/")


def _clean_environment() -> dict[str, str]:
    """The environment, without the variables that configure rdzv or etcdctl."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RDZV_", "ETCDCTL_", "TORCHELASTIC_"))
    }


def _report(what: str, completed: subprocess.CompletedProcess[str]) -> str:
    return (
        f"{what} exited with {completed.returncode}\n--- stdout\n{completed.stdout}"
        f"\n--- stderr\n{completed.stderr}"
    )


def _run_program(
    block: Block, server: EtcdServer, directory: Path, files: Path
) -> subprocess.CompletedProcess[str]:
    """Run a ```python block in a fresh process, against `server`."""
    script = directory / "sample.py"
    script.write_text(_localized(block.text, server.endpoint, files))
    return subprocess.run(
        [sys.executable, "-c", _RUNNER, str(script)],
        cwd=directory,
        env=_clean_environment(),
        capture_output=True,
        text=True,
        timeout=_SNIPPET_TIMEOUT,
        check=False,
    )


def _run_torchrun(
    block: Block, command: str, server: EtcdServer, directory: Path, files: Path
) -> subprocess.CompletedProcess[str]:
    """Run a page's `$ torchrun` command in `directory`, with the page's files written there."""
    for file in FILES:
        if file.page == block.page:
            assert file.title is not None
            (directory / file.title).write_text(file.text)
    arguments = shlex.split(_localized(command, server.endpoint, files))
    assert arguments[0] == "torchrun"
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", *arguments[1:]],
        cwd=directory,
        env=_clean_environment(),
        capture_output=True,
        text=True,
        timeout=_TORCHRUN_TIMEOUT,
        check=False,
    )


# ---------------------------------------------------------------------------------- tests


def test_every_page_has_samples_and_no_python_escapes_the_test() -> None:
    """Fences name a language, Python is spelled `python`, and there are samples to run."""
    for block in ALL_BLOCKS:
        assert block.language, f"{block.name}: a fence without a language"
        assert block.language not in _PYTHON_ALIASES, (
            f"{block.name}: write ```python (run by this test) or ```console, not "
            f"```{block.language}"
        )
    assert len(PROGRAMS) >= 20
    indented = [
        f"{page.relative_to(ROOT)}:{number}"
        for page in PAGES
        for number, line in enumerate(page.read_text().splitlines(), 1)
        if re.match(r"^\s+(`{3,}|~{3,})\s*python", line)
    ]
    assert not indented, f"indented python fences are not run: {indented}"


@pytest.mark.slow
@pytest.mark.parametrize("block", PROGRAMS, ids=[block.name for block in PROGRAMS])
def test_python_sample_runs(
    block: Block, tmp_path: Path, files: Path, request: pytest.FixtureRequest
) -> None:
    """The sample runs to its end against a real etcd, and again on the same etcd."""
    if 'protocol="https"' in block.text:
        server: EtcdServer = request.getfixturevalue("tls_etcd")
    elif "username=" in block.text:
        server = request.getfixturevalue("auth_etcd")
    else:
        assert block in PLAIN_PROGRAMS
        server = request.getfixturevalue("docs_etcd")
    runs = ("first",) if block.page.name in _RUN_ONCE else ("first", "second")
    for run in runs:
        completed = _run_program(block, server, tmp_path, files)
        what = f"{block.name}, {run} run\n{block.text}"
        assert completed.returncode == 0, _report(what, completed)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("block", "command"),
    TORCHRUN_COMMANDS,
    ids=[f"{block.name}:torchrun" for block, _ in TORCHRUN_COMMANDS],
)
def test_torchrun_sample_runs(
    block: Block, command: str, tmp_path: Path, files: Path, docs_etcd: EtcdServer
) -> None:
    """The page's torchrun command runs its training script to success."""
    completed = _run_torchrun(block, command, docs_etcd, tmp_path, files)
    assert completed.returncode == 0, _report(command, completed)


@pytest.mark.slow
def test_every_sample_runs_after_all_the_others_on_one_etcd(
    tmp_path: Path, files: Path, docs_etcd: EtcdServer
) -> None:
    """A reader's one `rdzv serve` holds every page's samples: none assumes an empty etcd."""
    for block in PLAIN_PROGRAMS:
        completed = _run_program(block, docs_etcd, tmp_path, files)
        assert completed.returncode == 0, _report(
            f"{block.name}, after the samples before it", completed
        )


class _PastingConsole(code.InteractiveConsole):
    """`python -m asyncio`'s console (top-level await allowed), fed lines; it runs nothing."""

    def __init__(self) -> None:
        super().__init__(filename="<console>")
        self.compile.compiler.flags |= ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
        self.errors: list[str] = []

    def runcode(self, code: CodeType) -> None:
        """A complete statement is compiled, as the console does, but not run."""

    def showsyntaxerror(self, filename: str | None = None, **kwargs: object) -> None:
        """Keep the error that the console would print, and go on as it does."""
        error = sys.exc_info()[1]
        self.errors.append(f"{type(error).__name__}: {error}")


@pytest.mark.parametrize("block", PROGRAMS, ids=[block.name for block in PROGRAMS])
def test_sample_pastes_into_the_asyncio_console(block: Block) -> None:
    """Pasted into `python -m asyncio` (3.11's console), the sample compiles line by line."""
    # A blank line inside a block ends it early (IndentationError at the next line), and a
    # top-level block that no blank line ends runs into the next statement (SyntaxError).
    console = _PastingConsole()
    for number, line in enumerate([*block.text.splitlines(), ""], block.line + 1):
        console.push(line)
        assert not console.errors, f"{block.page.name}:{number}: {console.errors[0]}\n{line}"


_IPV4 = re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?![\w.])")
_NAMED_ENDPOINT = re.compile(r"(?<![\w.-])(?P<host>[A-Za-z][\w.-]*):2379\b")


def test_runnable_samples_name_no_host_but_this_machine() -> None:
    """Pasted as it is, a program talks to the reader's `rdzv serve`, not to a missing host."""
    # A missing host costs a pasted sample its whole read timeout. Only a sample that needs
    # files of the reader's cluster (/etc/rdzv/...), and so cannot run pasted, names its hosts.
    elsewhere = {
        block.name: hosts
        for block in PROGRAMS
        if "/etc/rdzv/" not in block.text
        and (
            hosts := sorted(
                {address for address in _IPV4.findall(block.text) if not address.startswith("127.")}
                | {
                    match["host"]
                    for match in _NAMED_ENDPOINT.finditer(block.text)
                    if match["host"] != "localhost"
                }
            )
        )
    }
    assert not elsewhere, f"samples that name other hosts than this machine: {elsewhere}"


def test_the_asyncio_quickstart_teaches_the_scalable_rendezvous() -> None:
    """The quickstart's rendezvous, and the README's, is AsyncRendezvous: not N² swaps."""
    # A compare-and-swap loop on one value costs O(N²) requests; AsyncRendezvous, one key per
    # node, O(N). The low-level state keeps a page of its own.
    quickstart = [block for block in PROGRAMS if block.page.name == "quickstart-asyncio.md"]
    assert any("rdzv.AsyncRendezvous(" in block.text for block in quickstart)
    assert not [block.name for block in quickstart if "set_state" in block.text]
    for page in (ROOT / "README.md", ROOT / "docs" / "index.md"):
        first = next(block for block in PROGRAMS if block.page == page)
        assert "rdzv.AsyncRendezvous(" in first.text, first.name


def test_the_install_docs_name_the_tested_torch_and_its_cpu_build() -> None:
    """The install docs name the torch that the tests run, and how to get its CPU-only build."""
    # `rdzv[torch]` alone brings the newest torch, with gigabytes of CUDA wheels.
    [pin] = re.findall(
        r'^TORCH = "(torch==[^"]+)"$', (ROOT / "noxfile.py").read_text(), flags=re.MULTILINE
    )
    for page in (
        ROOT / "README.md",
        ROOT / "docs" / "index.md",
        ROOT / "docs" / "quickstart-torchrun.md",
    ):
        text = " ".join(page.read_text().split())
        assert pin in text, f"{page.name} does not name {pin}"
        assert "CPU-only wheel index" in text, (
            f"{page.name} does not say how to install torch for CPUs"
        )


def test_there_is_a_torchrun_sample() -> None:
    """The torchrun quickstart's command is among the samples that run."""
    assert any(block.page.name == "quickstart-torchrun.md" for block, _ in TORCHRUN_COMMANDS)


# ------------------------------------------------------------ a newcomer's path, in order

# The README, then the pages of the nav that a newcomer reads before anything else.
NEWCOMER_PAGES = [
    ROOT / "README.md",
    *(
        ROOT / "docs" / name
        for name in (
            "index.md",
            "quickstart-asyncio.md",
            "quickstart-sync.md",
            "quickstart-torchrun.md",
            "migrating-from-etcd-v2.md",
            "troubleshooting.md",
        )
    ),
]


@pytest.mark.slow
def test_the_quickstarts_run_in_order_on_one_etcd(
    tmp_path: Path, files: Path, docs_etcd: EtcdServer
) -> None:
    """The README's and the quickstarts' samples, in reading order, share one etcd unharmed."""
    ran = []
    for page in NEWCOMER_PAGES:
        blocks = [block for block in ALL_BLOCKS if block.page == page]
        for block in blocks:
            if block in PROGRAMS:
                completed = _run_program(block, docs_etcd, tmp_path, files)
                assert completed.returncode == 0, _report(block.name, completed)
                ran.append(block.name)
            for torchrun_block, command in TORCHRUN_COMMANDS:
                if torchrun_block == block:
                    completed = _run_torchrun(block, command, docs_etcd, tmp_path, files)
                    assert completed.returncode == 0, _report(command, completed)
                    ran.append(f"{block.name}:torchrun")
    assert any(name.endswith(":torchrun") for name in ran)
    assert any(name.startswith("docs/quickstart-asyncio.md") for name in ran)


@pytest.mark.slow
def test_the_torchrun_quickstart_runs_again_after_the_reset_it_shows(
    tmp_path: Path, files: Path, docs_etcd: EtcdServer
) -> None:
    """As the torchrun quickstart says: its run id is closed after the job, until `rdzv reset`."""
    page = ROOT / "docs" / "quickstart-torchrun.md"
    [(block, command), *_] = [(b, c) for b, c in TORCHRUN_COMMANDS if b.page == page]
    [reset] = [
        command
        for block in _blocks(page)
        if block.language == "console"
        for command in _console_commands(block, "rdzv")
        if command.startswith("rdzv reset ")
    ]
    first = _run_torchrun(block, command, docs_etcd, tmp_path, files)
    assert first.returncode == 0, _report(command, first)
    again = _run_torchrun(block, command, docs_etcd, tmp_path, files)
    assert again.returncode != 0
    assert "RendezvousClosedError" in again.stderr, _report(command, again)
    completed = subprocess.run(
        [sys.executable, "-m", "rdzv", *shlex.split(reset)[1:]],
        env=_clean_environment() | {"RDZV_ENDPOINTS": docs_etcd.endpoint},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, _report(reset, completed)
    after_reset = _run_torchrun(block, command, docs_etcd, tmp_path, files)
    assert after_reset.returncode == 0, _report(command, after_reset)


# ------------------------------------------------------------------------ links and commands

# Links and images alike.
_LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")


def _relative_links(page: Path) -> list[str]:
    """The targets of `page`'s Markdown links that are neither URLs nor anchors of the page."""
    text = page.read_text()
    # Links inside fenced blocks and code spans are not links.
    prose = "\n".join(
        line for line in _without_fences(text.splitlines()) if not line.startswith("    ")
    )
    prose = re.sub(r"`[^`]*`", "", prose)
    return [
        match["target"]
        for match in _LINK.finditer(prose)
        if not re.match(r"^[a-z][a-z0-9+.-]*:|^#", match["target"])
    ]


def _without_fences(lines: list[str]) -> Iterator[str]:
    fence: str | None = None
    for line in lines:
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match["fence"]
        elif fence is not None and line.rstrip() == fence:
            fence = None
        elif fence is None:
            yield line


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
def test_relative_links_name_files_that_exist(page: Path) -> None:
    """Every relative link of the page (README.md: from the repository's root) names a file."""
    targets = _relative_links(page)
    missing = [
        target for target in targets if not (page.parent / target.split("#", 1)[0]).is_file()
    ]
    assert not missing, f"{page.relative_to(ROOT)}: links to missing files: {missing}"


def test_the_readme_links_the_quickstarts_and_troubleshooting() -> None:
    """A newcomer finds the quickstarts and the troubleshooting page from the README."""
    targets = {target.split("#", 1)[0] for target in _relative_links(ROOT / "README.md")}
    for page in NEWCOMER_PAGES[1:]:
        assert f"docs/{page.name}" in targets, page.name


def test_the_site_works_opened_from_disk() -> None:
    """mkdocs.yml builds page.html files, not folders: links work from file:// too."""
    settings = (ROOT / "mkdocs.yml").read_text().splitlines()
    assert "use_directory_urls: false" in settings


def test_the_site_loads_no_script_from_the_network() -> None:
    """Opened from disk, offline, the site fetches no script, stylesheet or font to show a page."""
    # Material draws a ```mermaid fence with Mermaid, which it fetches from a CDN.
    fences = [block.name for block in ALL_BLOCKS if block.language == "mermaid"]
    assert not fences, f"Mermaid fences, drawn by a script from the network: {fences}"
    settings = (ROOT / "mkdocs.yml").read_text()
    assert not re.search(r"name: mermaid|mermaid[\w.-]*\.js", settings, flags=re.IGNORECASE)
    assert not re.findall(r"^\s*-\s*(?:[a-z]+:)?//.*$", settings, flags=re.MULTILINE)
    assert re.search(r"^\s*font: false\b", settings, flags=re.MULTILINE)


def _steps(command: str) -> list[str]:
    return [" ".join(step.split()) for step in command.split("&&")]


def test_the_readme_test_command_is_what_ci_runs() -> None:
    """.ci/run runs the README's test command, step by step, in order."""
    [command] = [
        line
        for block in _blocks(ROOT / "README.md")
        if block.language == "console"
        for line in block.text.splitlines()
        if line.rstrip().endswith("&& nox")
    ]
    ci = [
        step
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
        for step in _steps(line)
    ]
    position = 0
    for step in _steps(command):
        assert step in ci[position:], f"{step!r} is not in .ci/run after {ci[:position]}"
        position = ci.index(step, position) + 1
    assert ci[-1] == "nox", "nox is the last thing .ci/run runs"
