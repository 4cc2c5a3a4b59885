"""Gateway keys: who is calling.

Keys are never compared as strings: the presented key is hashed (SHA-256) and the
digest looked up, then confirmed with ``hmac.compare_digest``, so the time taken does
not depend on how much of a key matched.  Only digests are held in memory, and keys
never appear in logs or errors (the log carries the key's name).
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from gwcore.config import Config
from gwcore.errors import InvalidApiKey, ModelNotAllowed


@dataclass(frozen=True, slots=True)
class KeyInfo:
    id: str
    name: str
    is_master: bool = False
    models: frozenset[str] | None = None  # None: every model
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None

    def check_model(self, model: str) -> None:
        if self.models is not None and model not in self.models:
            raise ModelNotAllowed(f"This key may not use the model '{model}'.", param="model")


ANONYMOUS = KeyInfo(id="anonymous", name="anonymous")


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class Authenticator:
    def __init__(self, cfg: Config) -> None:
        self._keys: dict[bytes, tuple[bytes, KeyInfo]] = {}
        for i, key in enumerate(cfg.api_keys):
            d = digest(key)
            self._keys[d] = (d, KeyInfo(id=f"static-{d[:4].hex()}", name=f"api-key-{i + 1}"))
        for k in cfg.keys:
            d = digest(k.key)
            self._keys[d] = (d, KeyInfo(id=f"static-{d[:4].hex()}", name=k.name,
                                        models=frozenset(k.models) if k.models is not None else None,
                                        rpm=k.rpm, tpm=k.tpm, max_concurrency=k.max_concurrency))
        if cfg.master_key:
            d = digest(cfg.master_key)
            self._keys[d] = (d, KeyInfo(id="master", name="master", is_master=True))
        self.enabled = bool(self._keys)

    def authenticate(self, authorization: bytes | None, x_api_key: bytes | None = None) -> KeyInfo:
        if not self.enabled:
            return ANONYMOUS
        presented = _bearer(authorization) if authorization else x_api_key
        if not presented:
            raise InvalidApiKey("You didn't provide an API key. Pass a gateway key as "
                                "'Authorization: Bearer <key>'.")
        d = hashlib.sha256(presented).digest()
        # The lookup is on a digest of the secret, so its timing says nothing about the
        # key; the stored digest is then confirmed in constant time.
        entry = self._keys.get(d)
        if entry is None or not hmac.compare_digest(entry[0], d):
            raise InvalidApiKey()
        return entry[1]


def _bearer(value: bytes) -> bytes | None:
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return token.strip() or None
