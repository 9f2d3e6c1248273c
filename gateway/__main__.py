"""Command line: ``python -m gateway SUBCOMMAND …`` (also installed as ``gateway``).

Each subcommand lives in its own module exposing ``main(argv) -> int``, imported only when
used: ``gateway plan`` does not pay for the proxy's imports, and ``gateway serve`` imports
none of the tools (:mod:`gateway.sim`, :mod:`gateway.tools`).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("gateway.server", "run the gateway from a YAML config file"),
    "check-config": ("gateway.server", "validate a config file and print the effective config"),
    "local": ("gateway.tools.local",
              "embedded cluster: real Triton servers (pytriton) + the gateway"),
    "sim": ("gateway.sim.cli", "Triton simulator: many simulated workers in one process"),
    "plan": ("gateway.plan", "capacity plan from peak RPS or a load-test result"),
    "demo": ("gateway.tools.demo", "the whole system: local cluster, traffic, live capacity view"),
    "loadtest": ("gateway.tools.demo", "bounded headless Locust run against the local cluster"),
    "config-reference": ("gateway.server", "print the configuration reference (Markdown)"),
}


def usage() -> str:
    lines = ["usage: gateway COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<17} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `gateway COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"gateway: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    entry = getattr(module, "main_" + command.replace("-", "_"), None) or module.main
    result: int = entry(rest)
    return result


if __name__ == "__main__":
    sys.exit(main())
