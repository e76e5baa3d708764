"""The `rdzv` command line: `demo`, `serve`, `inspect`, `watch`, `check` and `reset`.

Exit codes, for every command: 0 success; 1 the operation failed (etcd unreachable, credentials
rejected, no state, a state that cannot be read); 2 bad usage (a bad option, or no etcd binary
for a command that runs one); 130 `demo` interrupted by Ctrl-C.

Every error is one line on stderr that starts with the command, usage errors included.

One module a command (`_demo_command`, `_serve_command`, `_inspect_command`, `_watch_command`,
`_check_command`, `_reset_command`), on the parts they share:

- `_group`: the `rdzv` group itself, `--log-level`, and usage errors on one line;
- `_connection_options`: the options that reach an etcd of yours, and running on it;
- `_job_options`: the options that name a job and where its keys live;
- `_output`: exit codes, and a failure as one line on stderr;
- `_embedded`: the etcd that `demo` and `serve` start.

This package attaches the commands to the group; no command imports the group.
"""

from __future__ import annotations

from rdzv._cli._check_command import check
from rdzv._cli._demo_command import demo
from rdzv._cli._group import main
from rdzv._cli._inspect_command import inspect
from rdzv._cli._reset_command import reset
from rdzv._cli._serve_command import serve
from rdzv._cli._watch_command import watch

main.add_command(demo)
main.add_command(inspect)
main.add_command(watch)
main.add_command(check)
main.add_command(reset)
main.add_command(serve)

__all__ = ["main"]
