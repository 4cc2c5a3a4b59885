from __future__ import annotations

from gwcore.accounting import PICO, PriceTable
from gwcore.config import Price
from gwcore.wire import Usage


def test_cost_is_exact_and_uses_cache_prices():
    t = PriceTable()
    u = Usage(prompt_tokens=1_000_000, completion_tokens=1_000_000)
    assert t.cost_pico("gpt-4o-mini", u) == int(0.75 * PICO)
    # Anthropic: cache reads and writes have their own prices.
    u = Usage(prompt_tokens=1_000, cached_tokens=600, cache_write_tokens=300, completion_tokens=10)
    pico = t.cost_pico("claude-3-5-haiku-20241022", u)
    assert pico == 100 * 800_000 + 600 * 80_000 + 300 * 1_000_000 + 10 * 4_000_000
    # Many small requests add up with no drift.
    one = t.cost_pico("gpt-4o", Usage(prompt_tokens=7, completion_tokens=3))
    assert sum(one for _ in range(1_000_000)) == 1_000_000 * one


def test_longest_prefix_wins_and_unknown_models_have_no_price():
    t = PriceTable({"gpt-4o-mini-special": Price(input=1, output=2)})
    u = Usage(prompt_tokens=1_000_000)
    assert t.cost_usd("gpt-4o-mini-2024-07-18", u) == 0.15
    assert t.cost_usd("gpt-4o-2024-08-06", u) == 2.5
    assert t.cost_usd("gpt-4o-mini-special", u) == 1.0
    assert t.cost_usd("some-local-llama", u) is None
