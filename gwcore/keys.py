"""Dynamic gateway keys: make one, validate changes, show one (never its hash or key).

Shared by the admin API (``/admin/keys``) and the CLI (``gwcore keys``).  A key is
``gw-`` + 43 URL-safe characters (256 random bits); only its SHA-256 is stored, and the
key itself is shown once, when it is created.
"""
from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any

import msgspec

from gwcore.accounting import PICO
from gwcore.errors import InvalidRequest
from gwcore.ports import KeyRecord



class KeyParams(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    name: str | msgspec.UnsetType = msgspec.UNSET
    models: list[str] | None | msgspec.UnsetType = msgspec.UNSET
    rpm: int | None | msgspec.UnsetType = msgspec.UNSET
    tpm: int | None | msgspec.UnsetType = msgspec.UNSET
    max_concurrency: int | None | msgspec.UnsetType = msgspec.UNSET
    budget_usd: float | None | msgspec.UnsetType = msgspec.UNSET
    expires_at: float | None | msgspec.UnsetType = msgspec.UNSET
    metadata: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET


_decoder = msgspec.json.Decoder(KeyParams)


def parse_params(raw: bytes, *, creating: bool) -> KeyParams:
    try:
        params = _decoder.decode(raw or b"{}")
    except msgspec.ValidationError as exc:
        msg, _, where = str(exc).partition(" - at `$.")
        raise InvalidRequest(f"{msg} ({where.rstrip('`')})" if where else msg,
                             code="invalid_value", param=where.rstrip("`") or None) from exc
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}.",
                             code="invalid_json") from exc
    check_params(params, creating=creating)
    return params


def check_params(params: KeyParams, *, creating: bool) -> None:
    if creating and (params.name is msgspec.UNSET or not params.name):
        raise InvalidRequest("'name' is required.", code="missing_required_parameter",
                             param="name")
    for field in ("rpm", "tpm", "max_concurrency"):
        value = getattr(params, field)
        if isinstance(value, int) and value <= 0:
            raise InvalidRequest(f"'{field}' must be a positive integer.", code="invalid_value",
                                 param=field)
    if isinstance(params.budget_usd, float | int) and params.budget_usd < 0:
        raise InvalidRequest("'budget_usd' must not be negative.", code="invalid_value",
                             param="budget_usd")


def changes_of(params: KeyParams) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in ("name", "models", "rpm", "tpm", "max_concurrency", "expires_at", "metadata"):
        value = getattr(params, field)
        if value is not msgspec.UNSET:
            out[field] = value
    if params.budget_usd is not msgspec.UNSET:
        out["budget_pico"] = None if params.budget_usd is None else \
            int(round(params.budget_usd * PICO))
    return out


def new_key(params: KeyParams, now: float | None = None) -> tuple[KeyRecord, str]:
    key = "gw-" + secrets.token_urlsafe(32)
    record = KeyRecord(id="key_" + secrets.token_hex(8), name=str(params.name),
                       key_hash=hashlib.sha256(key.encode()).hexdigest(), prefix=key[:7],
                       created_at=time.time() if now is None else now)
    for name, value in changes_of(params).items():
        setattr(record, name, value)
    return record, key


def show(record: KeyRecord) -> dict[str, Any]:
    return {"id": record.id, "name": record.name, "prefix": record.prefix,
            "models": record.models, "rpm": record.rpm, "tpm": record.tpm,
            "max_concurrency": record.max_concurrency,
            "budget_usd": None if record.budget_pico is None else record.budget_pico / PICO,
            "spent_usd": record.spent_pico / PICO, "expires_at": record.expires_at,
            "metadata": record.metadata, "created_at": record.created_at,
            "revoked": record.revoked_at is not None, "revoked_at": record.revoked_at}
