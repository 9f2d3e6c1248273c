"""HAProxy as the generic load balancer the benchmarks compare against: one configuration
writer and one finder for every benchmark (overhead, routing, gRPC)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

HAPROXY_DIRS = ("/usr/sbin", "/usr/bin", "/usr/local/sbin")


def find_haproxy() -> str | None:
    """The haproxy binary (Debian installs it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("haproxy")
    if found:
        return found
    for directory in HAPROXY_DIRS:
        candidate = Path(directory) / "haproxy"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def haproxy_config(port: int, upstreams: list[int], *, balance: str = "leastconn",
                   maxconn: int | None = None, h2: bool = False) -> str:
    """HAProxy 2.x in HTTP mode, one thread (like the gateway's one event loop), keep-alive
    to the workers, ``balance`` over ``upstreams``. ``maxconn`` per server queues the excess
    in HAProxy (for up to 5 s); ``h2``: HTTP/2 cleartext on both sides (gRPC needs HTTP/2 end
    to end; with multiplexing HAProxy picks a server per request, not per connection)."""
    proto = " proto h2" if h2 else ""
    limit = f" maxconn {maxconn}" if maxconn else ""
    servers = "".join(f"  server w{i} 127.0.0.1:{p}{limit}{proto}\n"
                      for i, p in enumerate(upstreams))
    return f"""
global
  nbthread 1
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  timeout queue 5s
  option http-keep-alive
frontend fe
  bind 127.0.0.1:{port}{proto}
  default_backend workers
backend workers
  balance {balance}
  http-reuse always
{servers}"""
