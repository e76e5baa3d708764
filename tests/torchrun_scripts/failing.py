"""A torchrun worker that always fails: it records its start, then exits 1.

The directory `RDZV_TEST_FLAG_DIR` receives `start-<pid>.json` for every worker started, with
its restart count (`TORCHELASTIC_RESTART_COUNT`), so that a test can count the restarts.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> int:
    """Record this start, and fail."""
    flag_dir = Path(os.environ["RDZV_TEST_FLAG_DIR"])
    record = {"pid": os.getpid(), "restart": int(os.environ["TORCHELASTIC_RESTART_COUNT"])}
    (flag_dir / f"start-{os.getpid()}.json").write_text(json.dumps(record))
    return 1


if __name__ == "__main__":
    sys.exit(main())
