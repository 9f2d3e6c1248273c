"""Who is calling: API keys (``X-Api-Key`` or ``Authorization: Bearer``) → tenant and its
priority class (pure; built from the configuration, replaced whole on reload)."""

from __future__ import annotations

from gateway.config import GatewayConfig
from gateway.types import Priority

Identity = tuple[str | None, Priority]
ANONYMOUS: Identity = (None, Priority.STANDARD)


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
