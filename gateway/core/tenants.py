"""Who is calling, and what they may ask for (pure; built from the configuration, replaced
whole on reload).

* API keys (``X-Api-Key`` or ``Authorization: Bearer``) → tenant and its priority class.
  An empty or blank key authenticates nobody.
* The tenant's class is a **ceiling**: ``X-Priority`` may lower a request's priority, never
  raise it; anonymous requests' ceiling is ``standard``. An ``X-Priority`` that names no
  class is a 400. Triton's body ``parameters.priority`` is the worker's business only: it
  never touches the gateway's own queue.
* State-changing endpoints (repository load/unload) need the admin token
  (``Authorization: Bearer <admin.token>``); a tenant key alone never authorises them.
"""

from __future__ import annotations

import hmac

from gateway.core.config import GatewayConfig
from gateway.core.errors import BadRequest
from gateway.core.types import Priority

Identity = tuple[str | None, Priority]
ANONYMOUS: Identity = (None, Priority.STANDARD)
_PRIORITY_NAMES = {p.name.lower().encode(): p for p in Priority}
_BEARER = b"bearer "


class TenantDirectory:
    __slots__ = ("_keys",)

    def __init__(self, keys: dict[bytes, Identity]) -> None:
        self._keys = keys

    @classmethod
    def from_config(cls, cfg: GatewayConfig) -> TenantDirectory:
        keys: dict[bytes, Identity] = {}
        for name, tenant in cfg.admission.tenants.items():
            prio = Priority[tenant.priority.upper()]
            for key in tenant.keys:
                secret = key.reveal().strip()
                if secret:  # an empty key authenticates nobody
                    keys[secret.encode("latin-1", "replace")] = (name, prio)
        return cls(keys)

    def __repr__(self) -> str:
        return f"<TenantDirectory keys={len(self._keys)}>"

    def __bool__(self) -> bool:
        return bool(self._keys)

    def identify(self, headers: list[tuple[bytes, bytes]]) -> Identity:
        """The tenant whose key the request carries; anonymous when none matches."""
        if not self._keys:
            return ANONYMOUS
        for k, v in headers:
            key: bytes | None = None
            if k == b"authorization" and v[:7].lower() == b"bearer ":
                key = v[7:].strip()
            elif k == b"x-api-key":
                key = v.strip()
            if key:
                found = self._keys.get(key)
                if found is not None:
                    return found
        return ANONYMOUS


def effective_priority(ceiling: Priority, requested: bytes | None) -> Priority:
    """The request's priority: ``requested`` (the ``X-Priority`` value, None when absent)
    may lower ``ceiling`` (the tenant's class), never raise it. Lower value = more
    important, so the result is the larger of the two."""
    if requested is None:
        return ceiling
    asked = _PRIORITY_NAMES.get(requested.strip().lower())
    if asked is None:
        shown = requested[:40].decode("latin-1")
        raise BadRequest(f"invalid X-Priority '{shown}': expected one of critical, standard, "
                         "sheddable")
    return max(ceiling, asked)


def is_admin(headers: list[tuple[bytes, bytes]], token: str) -> bool:
    """Does the request carry ``Authorization: Bearer <token>``? Never true for an empty
    token; compared in constant time."""
    if not token:
        return False
    want = _BEARER + token.encode()
    for k, v in headers:
        if k == b"authorization" and v[:7].lower() == _BEARER:
            return hmac.compare_digest(_BEARER + v[7:].strip(), want)
    return False
