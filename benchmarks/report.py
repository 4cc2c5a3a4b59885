"""Reports of a suite run: medians over repetitions, a Markdown and a JSON report, a PNG plot.

A scenario's result is ``{"title", "about", "rows": [...], "notes": [...]}``; each row is
one (target, setting) pair with the median over repetitions of every figure (error
counts are summed instead) and the per-repetition figures under ``"reps"``. The
comparisons with the direct upstream (``*_vs_upstream`` ratios, ``added_*`` differences)
are computed on those medians and stored in the target rows.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

# Figures that are counts of things that went wrong: summed over repetitions, not medians.
SUMMED = ("errors", "failed")


def _summed(name: str) -> bool:
    return name.startswith(SUMMED)


def aggregate(rep_rows: list[dict[str, Any]], group: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Rows of every repetition -> one row per (target, *group): medians, summed errors."""
    grouped: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rep_rows:
        grouped.setdefault((row["target"], *(row.get(g) for g in group)), []).append(row)
    out = []
    for rows in grouped.values():
        merged: dict[str, Any] = {}
        for name in rows[0]:
            values = [r.get(name) for r in rows]
            present = [v for v in values if v is not None]  # None: no figure in that repetition
            numeric = bool(present) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present)
            if name in group or name in ("target", "role") or not numeric:
                merged[name] = values[0]
            elif _summed(name):
                merged[name] = sum(present)
            else:
                merged[name] = statistics.median(present)
        merged["reps"] = [{k: v for k, v in r.items() if isinstance(v, (int, float)) and k not in group}
                          for r in rows]
        out.append(merged)
    return out


def compare(rows: list[dict[str, Any]], group: tuple[str, ...], ratios: tuple[str, ...],
            added: tuple[str, ...]) -> None:
    """Target rows get ``<f>_vs_upstream`` (ratio) and ``added_<f>`` (difference) per figure."""
    base = {tuple(r.get(g) for g in group): r for r in rows if r["role"] == "upstream"}
    for row in rows:
        up = base.get(tuple(row.get(g) for g in group))
        if row["role"] == "upstream" or up is None:
            continue
        for f in ratios:
            if isinstance(row.get(f), (int, float)) and up.get(f):
                row[f"{f}_vs_upstream"] = row[f] / up[f]
        for f in added:
            if isinstance(row.get(f), (int, float)) and isinstance(up.get(f), (int, float)):
                row[f"added_{f}"] = row[f] - up[f]


# -- Markdown -----------------------------------------------------------------


def _fmt(value: Any, kind: str) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return ""
    if kind == "int":
        return f"{value:,.0f}"
    if kind == "ms":
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    if kind == "+ms":
        return f"{value:+.3f}" if abs(value) < 10 else f"{value:+.1f}"
    if kind == "x":
        return f"{value:.2f}x"
    if kind in ("us", "count"):
        return f"{value:,.1f}"
    if kind == "+us":
        return f"{value:+,.1f}"
    if kind == "mb":
        return f"{value / 2**20:,.1f}"
    if kind == "kb":
        return f"{value / 1024:,.1f}"
    if kind == "pct":
        return f"{value:.0f}%"
    return f"{value:g}"


Column = tuple[str, str, str]  # header, row key, format


# Per scenario: the columns of its table.
TABLES: dict[str, list[Column]] = {
    "latency": [("target", "target", ""), ("conns", "connections", "int"), ("req/s", "rps", "int"),
                ("p50 ms", "p50_ms", "ms"), ("p90 ms", "p90_ms", "ms"), ("p99 ms", "p99_ms", "ms"),
                ("p99.9 ms", "p99.9_ms", "ms"), ("added p50 ms", "added_p50_ms", "+ms"),
                ("added p99 ms", "added_p99_ms", "+ms"), ("errors", "errors", "int")],
    "throughput": [("target", "target", ""), ("conns", "connections", "int"), ("req/s", "rps", "int"),
                   ("vs upstream", "rps_vs_upstream", "x"), ("p50 ms", "p50_ms", "ms"), ("p99 ms", "p99_ms", "ms"),
                   ("p99.9 ms", "p99.9_ms", "ms"), ("p99 vs upstream", "p99_ms_vs_upstream", "x"),
                   ("errors", "errors", "int")],
    "maxrate": [("target", "target", ""), ("max req/s with p99 < budget", "max_rate", "int"),
                ("vs upstream", "max_rate_vs_upstream", "x"), ("achieved req/s", "rps", "int"),
                ("p50 ms", "p50_ms", "ms"), ("p99 ms", "p99_ms", "ms"), ("p99.9 ms", "p99.9_ms", "ms"),
                ("steps", "steps", "int"), ("errors", "errors", "int")],
    "stream": [("target", "target", ""), ("streamed req/s c=32", "rps", "int"),
               ("vs upstream", "rps_vs_upstream", "x"), ("p99 ms c=32", "p99_ms", "ms"),
               ("TTFT p50 ms c=1", "ttft_p50_ms", "ms"), ("TTFT p99 ms", "ttft_p99_ms", "ms"),
               ("added TTFT p50 ms", "added_ttft_p50_ms", "+ms"), ("added TTFT p99 ms", "added_ttft_p99_ms", "+ms"),
               ("per-chunk us", "chunk_us", "us"), ("added per-chunk us", "added_chunk_us", "+us"),
               ("events", "events", "int"), ("bytes", "stream_bytes", "int"), ("errors", "errors", "int")],
    "slow-streams": [("target", "target", ""), ("streams", "streams", "int"), ("completed", "completed", "int"),
                     ("peak open", "peak_open", "int"), ("sustained", "sustained", ""),
                     ("TTFT p50 ms", "ttft_p50_ms", "ms"), ("TTFT p99 ms", "ttft_p99_ms", "ms"),
                     ("TTFT p50 ms at full load", "ttft_loaded_p50_ms", "ms"),
                     ("added TTFT p50 ms at full load", "added_ttft_loaded_p50_ms", "+ms"),
                     ("idle RSS MB", "idle_rss", "mb"), ("RSS MB, all open", "peak_rss", "mb"),
                     ("KB per stream", "rss_per_stream", "kb"), ("failed", "failed", "int")],
    "cpu": [("target", "target", ""), ("asked req/s", "rate", "int"), ("achieved req/s", "rps", "int"),
            ("CPU us/request", "cpu_us_per_request", "us"), ("vs upstream", "cpu_us_per_request_vs_upstream", "x"),
            ("CPU of one core", "cpu_pct", "pct"), ("wake-ups/request", "wakeups_per_request", "count"),
            ("p50 ms", "p50_ms", "ms"), ("p99 ms", "p99_ms", "ms"), ("RSS MB", "rss", "mb"),
            ("errors", "errors", "int")],
    "counts": [("target", "target", ""), ("achieved req/s", "rps", "int"), ("requests", "requests", "int"),
               ("Python calls/request", "python_calls_per_request", "count"),
               ("vs floor", "python_calls_per_request_vs_floor", "x"),
               ("own code", "own_calls_per_request", "count"), ("trio", "trio_calls_per_request", "count"),
               ("task steps/request", "task_steps_per_request", "count"),
               ("vs floor", "task_steps_per_request_vs_floor", "x"), ("errors", "errors", "int")],
    "cache": [("target", "target", ""), ("conns", "connections", "int"), ("req/s", "rps", "int"),
              ("vs upstream", "rps_vs_upstream", "x"), ("p50 ms", "p50_ms", "ms"), ("p99 ms", "p99_ms", "ms"),
              ("p99.9 ms", "p99.9_ms", "ms"), ("added p50 ms", "added_p50_ms", "+ms"), ("errors", "errors", "int")],
}
TABLES["full-stack"] = TABLES["cache"]

# Plot panels: (scenario, title, row filter, prefix of the percentile keys).
PANELS: list[tuple[str, str, dict[str, Any], str]] = [
    ("latency", "chat, c=1", {"connections": 1}, ""),
    ("throughput", "chat, c=32", {"connections": 32}, ""),
    ("throughput", "chat, c=256", {"connections": 256}, ""),
    ("maxrate", "chat at the max rate (p99 budget)", {}, ""),
    ("stream", "streamed chat, c=32 (whole stream)", {}, ""),
    ("stream", "time to first token, c=1", {}, "ttft_"),
    ("slow-streams", "time to first token, N slow streams", {}, "ttft_"),
    ("cpu", "chat, paced (cpu scenario)", {}, ""),
    ("cache", "cache hits, c=1", {"connections": 1}, ""),
    ("cache", "cache hits, c=32", {"connections": 32}, ""),
    ("full-stack", "Redis + Postgres, c=1", {"connections": 1}, ""),
    ("full-stack", "Redis + Postgres, c=32", {"connections": 32}, ""),
]
PLOT_PERCENTILES = (("p50", "50"), ("p90", "90"), ("p99", "99"), ("p99.9", "99.9"))


def table(columns: list[Column], rows: list[dict[str, Any]]) -> list[str]:
    used = [c for c in columns if c[1] == "target" or any(r.get(c[1]) not in (None, "") for r in rows)]
    lines = ["| " + " | ".join(h for h, _, _ in used) + " |",
             "|" + "|".join("---" if k == "target" else "---:" for _, k, _ in used) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(k), f) for _, k, f in used) + " |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"# Gateway benchmark, {report['started_at']}",
        "",
        f"- command: `{report['command']}`",
        f"- machine: {env['cpu_model']}, {env['cpus']} CPUs, Linux {env['kernel']}, Python {env['python']}",
        f"- pinning: {env['pinning']}",
        f"- repetitions: {report['repeat']} (each figure is the median; error counts are summed)"
        + (" — quick smoke run, figures are not meaningful" if report["quick"] else ""),
        f"- request: POST /v1/chat/completions, {report['request']['bytes']} bytes; "
        f"stream answer: {report['request']['stream_events']} SSE events, {report['request']['stream_bytes']:,} bytes",
        "",
        "Absolute numbers move from run to run; compare the ratios to the direct upstream "
        "(measured in the same run, on the same machine).",
        "",
    ]
    targets = report["endpoints"]
    if report["summary"]:
        names = [t["name"] for t in targets]
        lines += ["## Summary", "", "| figure | " + " | ".join(names) + " |",
                  "|---|" + "---:|" * len(names)]
        for item in report["summary"]:
            cells = [_fmt(item["values"].get(n), item["format"]) for n in names]
            lines.append(f"| {item['figure']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Targets:", ""]
    for t in targets:
        lines.append(f"- `{t['name']}` ({t['role']}): {t['url']}" + (f" — {t['about']}" if t.get("about") else ""))
    lines.append("")
    for name, result in report["scenarios"].items():
        lines += [f"## {name}: {result['title']}", "", result["about"], ""]
        if result["rows"]:
            lines += table(TABLES[name], result["rows"])
            lines.append("")
        for note in result.get("notes", []):
            lines.append(f"- {note}")
        if result.get("notes"):
            lines.append("")
    if report.get("plot"):
        lines += [f"![latency percentiles]({report['plot']})", ""]
    return "\n".join(lines)


# -- JSON ---------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """JSON-safe: NaN and infinities (not JSON) become null, paths strings, tuples lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(_plain(report), indent=2, allow_nan=False) + "\n")


# -- the plot -----------------------------------------------------------------


def plot(report: dict[str, Any], path: Path) -> bool:
    """Latency percentiles (p50, p90, p99, p99.9) per target, one panel per measurement."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, list[tuple[str, list[float]]]]] = []
    for scenario, title, where, prefix in PANELS:
        result = report["scenarios"].get(scenario)
        if not result:
            continue
        lines = []
        for row in result["rows"]:
            if any(row.get(k) != v for k, v in where.items()):
                continue
            values = [row.get(f"{prefix}{p}_ms") for p, _ in PLOT_PERCENTILES]
            if all(isinstance(v, (int, float)) and v > 0 for v in values):
                lines.append((str(row["target"]), [float(v) for v in values]))
        if lines:
            panels.append((f"{scenario}: {title}", lines))
    if not panels:
        return False
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    colours: dict[str, Any] = {}
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, lines) in zip(axes.flat, panels):
        for name, values in lines:
            colour = colours.setdefault(name, palette[len(colours) % len(palette)])
            ax.plot(range(len(values)), values, marker="o", label=name, color=colour)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(PLOT_PERCENTILES)), [p for p, _ in PLOT_PERCENTILES])
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"Latency percentiles per target (median of {report['repeat']} runs), {report['started_at']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True

