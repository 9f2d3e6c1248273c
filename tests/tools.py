"""The external programs the tests launch, found in one place.

A missing program fails the test that needs it — never a skip, never a ``FileNotFoundError``
from deep inside a fixture — with the Debian package that provides it: ``make test`` installs
them (``.ci/system-deps``). Mark a module or test with ``pytest.mark.tool("name", ...)`` to fail
it before its fixtures start anything (see ``conftest.py``), and call ``require_tool`` where the
program is launched.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# program -> Debian package; keep in step with .ci/system-deps
PACKAGES = {
    "redis-server": "redis-server",
    "promtool": "prometheus",
    "prometheus": "prometheus",
    "chromium": "chromium",
    "chromium-browser": "chromium",
    "haproxy": "haproxy",
    "nginx": "nginx",
    "wrk": "wrk",
}
# nginx and haproxy live in /usr/sbin, which a non-root PATH often lacks
EXTRA_DIRS = (Path("/usr/sbin"), Path("/usr/bin"))


def find_tool(*names: str) -> str | None:
    """The path of the first of ``names`` found on PATH or in /usr/sbin, /usr/bin."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
        for directory in EXTRA_DIRS:
            candidate = directory / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return None


def require_tool(*names: str) -> str:
    """The path of the first of ``names`` found (alternatives, e.g. ``"chromium",
    "chromium-browser"``); fails the calling test when there is none."""
    found = find_tool(*names)
    if found is None:
        package = PACKAGES.get(names[0], names[0])
        pytest.fail(f"{' or '.join(names)} is not installed: it is in the Debian package "
                    f"'{package}', which `make test` installs (as root), or run "
                    f"`sudo apt-get install -y {package}`", pytrace=False)
    return found
