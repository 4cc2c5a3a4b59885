"""Provider name -> its sans-IO adapter module."""
from __future__ import annotations

import importlib
from types import ModuleType

# Providers that speak OpenAI's API: requests and answers pass through untranslated.
OPENAI_FAMILY = frozenset({"openai", "mock"})

_MODULES = {"openai": "gwcore.providers.openai", "mock": "gwcore.providers.openai",
            "anthropic": "gwcore.providers.anthropic", "google": "gwcore.providers.google"}


_LOADED: dict[str, ModuleType] = {}


def adapter(provider: str) -> ModuleType:
    module = _LOADED.get(provider)
    if module is None:
        module = _LOADED[provider] = importlib.import_module(_MODULES[provider])
    return module
