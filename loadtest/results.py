"""Where a benchmark's figures go: one JSON file, with what made them."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any


def write_results(path: str | Path, doc: dict[str, Any], args: argparse.Namespace) -> Path:
    """Write ``doc`` with the run's arguments, the CPU count and the UTC time to ``path``
    (its folder made if missing), say so, and return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**doc, "args": vars(args), "cpus": os.cpu_count(),
                               "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                              indent=2))
    print(f"wrote {out}")
    return out
