"""Cost from usage and a price table, in exact integer pico-dollars.

Prices are USD per million tokens, so one token at price ``p`` costs ``p * 1e6``
pico-dollars (1e-12 USD): an integer for any price given to six decimals, and sums of
integers are exact, so totals never drift however many requests add up.

    cost = (prompt - cached - cache_write) * input
         + cached * cached_input + cache_write * cache_write + completion * output

(``Usage`` is normalised: ``prompt_tokens`` includes cached and cache-write tokens,
``completion_tokens`` includes reasoning tokens, which are billed as output.)

A model is priced by its exact name, else by the longest known prefix
(``gpt-4o-mini-2024-07-18`` -> ``gpt-4o-mini``), else not at all (cost None, so an
unknown model is never silently free).  Config ``prices:`` entries override these.
"""
from __future__ import annotations

from decimal import Decimal

from gwcore.config import Price
from gwcore.wire import Usage

# Shipped defaults, USD per million tokens (providers' public price pages, 2025):
# (input, output, cached input, cache write).
DEFAULT_PRICES: dict[str, tuple[float, float, float | None, float | None]] = {
    "gpt-4o": (2.50, 10.00, 1.25, None),
    "gpt-4o-mini": (0.15, 0.60, 0.075, None),
    "gpt-4.1": (2.00, 8.00, 0.50, None),
    "gpt-4.1-mini": (0.40, 1.60, 0.10, None),
    "gpt-4.1-nano": (0.10, 0.40, 0.025, None),
    "o1": (15.00, 60.00, 7.50, None),
    "o3": (2.00, 8.00, 0.50, None),
    "o3-mini": (1.10, 4.40, 0.55, None),
    "o4-mini": (1.10, 4.40, 0.275, None),
    "text-embedding-3-small": (0.02, 0.0, None, None),
    "text-embedding-3-large": (0.13, 0.0, None, None),
    "claude-3-5-haiku": (0.80, 4.00, 0.08, 1.00),
    "claude-3-5-sonnet": (3.00, 15.00, 0.30, 3.75),
    "claude-3-7-sonnet": (3.00, 15.00, 0.30, 3.75),
    "claude-sonnet-4": (3.00, 15.00, 0.30, 3.75),
    "claude-opus-4": (15.00, 75.00, 1.50, 18.75),
    "gemini-1.5-flash": (0.075, 0.30, 0.01875, None),
    "gemini-2.0-flash": (0.10, 0.40, 0.025, None),
    "gemini-2.5-flash": (0.30, 2.50, 0.075, None),
    "gemini-2.5-pro": (1.25, 10.00, 0.31, None),
    # The demo's mock models cost nothing, on purpose and by name.
    "mock-": (0.0, 0.0, None, None),
}

PICO = 10**12


def _pico_per_token(usd_per_million: float) -> int:
    return int(Decimal(str(usd_per_million)) * 10**6)


class PriceTable:
    def __init__(self, overrides: dict[str, Price] | None = None) -> None:
        table: dict[str, tuple[int, int, int, int]] = {}
        for name, (i, o, c, w) in DEFAULT_PRICES.items():
            table[name] = self._row(i, o, c, w)
        for name, p in (overrides or {}).items():
            table[name] = self._row(p.input, p.output, p.cached_input, p.cache_write)
        self._table = table
        self._by_length = sorted(table, key=len, reverse=True)
        self._memo: dict[str, tuple[int, int, int, int] | None] = {}

    @staticmethod
    def _row(i: float, o: float, c: float | None, w: float | None) -> tuple[int, int, int, int]:
        return (_pico_per_token(i), _pico_per_token(o),
                _pico_per_token(i if c is None else c), _pico_per_token(i if w is None else w))

    def lookup(self, model: str) -> tuple[int, int, int, int] | None:
        if model in self._memo:
            return self._memo[model]
        row = self._table.get(model)
        if row is None:
            for name in self._by_length:
                if model.startswith(name):
                    row = self._table[name]
                    break
        if len(self._memo) < 10_000:
            self._memo[model] = row
        return row

    def cost_pico(self, model: str, usage: Usage) -> int | None:
        """Cost in pico-dollars, or None when the model has no price."""
        row = self.lookup(model)
        if row is None:
            return None
        i, o, c, w = row
        plain = max(0, usage.prompt_tokens - usage.cached_tokens - usage.cache_write_tokens)
        return plain * i + usage.cached_tokens * c + usage.cache_write_tokens * w \
            + usage.completion_tokens * o

    def cost_usd(self, model: str, usage: Usage) -> float | None:
        pico = self.cost_pico(model, usage)
        return None if pico is None else pico / PICO
