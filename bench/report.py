"""Turning measurements into figures: the results table, the goals, the JSON and the chart."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

TARGET_LABELS = {
    "direct": "direct to simulator",
    "proxy": "this proxy, caps",
    "proxy_first": "this proxy, caps, each request a new attendee's first",
    "proxy_nocaps": "this proxy, no caps",
    "worker": "this proxy, caps, real worker + host emulator",
    "worker_nocaps": "this proxy, no caps, real worker + host emulator",
    "litellm": "LiteLLM proxy",
    "proxy_keys": "this proxy, caps, personal keys",
    "worker_keys": "this proxy, caps, personal keys, real worker + host emulator",
}


def percentile(samples: list[float], p: float) -> float:
    """Nearest-rank percentile, as wrk's histogram reports it."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def from_histogram(points: list[list[float]], p: float) -> float:
    return next((ms for q, ms in points if q >= p), math.nan)


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def table(result: dict[str, Any]) -> str:
    """The results as a Markdown table (also printed at the end of the run)."""
    lines = [
        "| scenario | target | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | TTFC p50 ms | added TTFC p50 ms "
        "| CPU s/1k req | storage CPU s/1k | gen. CPU % | other CPU % | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["results"]:
        ttfc = row.get("ttfc_ms") or {}
        added_ttfc = row.get("added_ttfc_ms") or {}
        added = row.get("added_ms") or {}
        lines.append(
            f"| {row['scenario']} | {row['target']} | {row['rps']:.0f} | {_fmt(row['latency_ms']['p50'])} "
            f"| {_fmt(row['latency_ms']['p99'])} | {_fmt(added.get('p50'))} | {_fmt(added.get('p99'))} "
            f"| {_fmt(ttfc.get('p50'))} | {_fmt(added_ttfc.get('p50'))} | {_fmt(row['cpu_s_per_1k']['target'], 3)} "
            f"| {_fmt(row['cpu_s_per_1k'].get('storage'), 3)} | {row['generator_cpu_pct']:.0f} "
            f"| {row['background_cpu_pct']:.0f} | {row['errors']} |"
        )
    lines += [
        "",
        "| process | idle RSS MB | peak RSS MB | cold import ms | bare deps ms | ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, info in result["processes"].items():
        imp = info.get("import") or {}
        lines.append(
            f"| {name} | {info['idle_rss_mb']:.0f} | {info['peak_rss_mb']:.0f} | {_fmt(imp.get('module_ms'), 0)} "
            f"| {_fmt(imp.get('deps_ms'), 0)} | {_fmt(imp.get('ratio'))} |"
        )
    lines += ["", "| issue | target | wanted | measured | met |", "|---|---|---|---|---|"]
    for goal in result["goals"]:
        lines.append(
            f"| #{goal.get('issue', 6)} | {goal['goal']} | {goal['wanted']} | {goal['measured']} "
            f"| {'yes' if goal['met'] else 'NO'} |"
        )
    return "\n".join(lines)


def _row(result: dict[str, Any], scenario: str, target: str) -> dict[str, Any] | None:
    return next((r for r in result["results"] if r["scenario"] == scenario and r["target"] == target), None)


def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issues' targets (#21 first, then #6), each with what was measured and whether it is met."""
    out: list[dict[str, Any]] = _targets_21(result)

    def add(goal: str, wanted: str, measured: float | None, ok: bool, unit: str = "") -> None:
        shown = "-" if measured is None else f"{measured:.2f}{unit}"
        out.append({"goal": goal, "wanted": wanted, "measured": shown, "value": measured, "met": bool(ok), "issue": 6})

    chat1 = _row(result, "chat_c1", "proxy")
    if chat1 and chat1.get("added_ms"):
        add(
            "added latency p50, chat c=1 (caps)",
            "<= 1 ms",
            chat1["added_ms"]["p50"],
            chat1["added_ms"]["p50"] <= 1,
            " ms",
        )
        add(
            "added latency p99, chat c=1 (caps)",
            "<= 5 ms",
            chat1["added_ms"]["p99"],
            chat1["added_ms"]["p99"] <= 5,
            " ms",
        )
    ours, theirs = _row(result, "chat_c64", "proxy"), _row(result, "chat_c64", "litellm")
    if ours and theirs and theirs["rps"]:
        ratio = ours["rps"] / theirs["rps"]
        add("req/s vs LiteLLM, chat c=64 (caps)", ">= 3x", ratio, ratio >= 3, "x")
    stream1 = _row(result, "stream_c1", "proxy")
    if stream1 and stream1.get("added_ttfc_ms"):
        value = stream1["added_ttfc_ms"]["p50"]
        add("added time to first chunk p50, stream c=1", "<= 1 ms", value, value <= 1, " ms")
        value = stream1["added_after_first_ms"]["p50"]
        add("added first-to-last chunk time p50, stream c=1", "<= 1 ms (chunks not delayed)", value, value <= 1, " ms")
    procs = result["processes"]
    if "proxy" in procs and "litellm" in procs:
        ratio = procs["proxy"]["peak_rss_mb"] / procs["litellm"]["peak_rss_mb"]
        add("peak RSS vs LiteLLM", "<= 0.5x", ratio, ratio <= 0.5, "x")
    imp = procs.get("proxy", {}).get("import")
    if imp:
        add("cold import function_app / bare deps", "<= 1.2x", imp["ratio"], imp["ratio"] <= 1.2, "x")
    return out


def _targets_21(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue #21's targets, as ratios within this one run (steady state: every attendee warmed first)."""
    out: list[dict[str, Any]] = []

    def add(goal: str, wanted: str, ratio: float, ok: bool, how: str) -> None:
        shown = f"{ratio:.2f}x ({how})"
        out.append({"goal": goal, "wanted": wanted, "measured": shown, "value": ratio, "met": bool(ok), "issue": 21})

    ours, theirs = _row(result, "chat_c64", "proxy"), _row(result, "chat_c64", "litellm")
    if ours and theirs and theirs["rps"]:
        ratio = ours["rps"] / theirs["rps"]
        how = f"{ours['rps']:.0f} / {theirs['rps']:.0f} req/s"
        add("req/s, chat c=64 (caps) vs LiteLLM", ">= 10x", ratio, ratio >= 10, how)
    ours, theirs = _row(result, "chat_c1", "proxy"), _row(result, "chat_c1", "litellm")
    if ours and theirs and ours.get("added_ms") and theirs.get("added_ms") and theirs["added_ms"]["p50"] > 0:
        mine, its = ours["added_ms"]["p50"], theirs["added_ms"]["p50"]
        add("added p50, chat c=1 (caps, steady) vs LiteLLM", "<= 0.3x", mine / its, mine / its <= 0.3,
            f"{mine:.2f} / {its:.2f} ms")  # fmt: skip
    ours = _row(result, "chat_c64", "proxy")
    if ours and ours["cpu_s_per_1k"].get("upstream"):
        cpu = ours["cpu_s_per_1k"]
        ratio = cpu["target"] / cpu["upstream"]
        add("proxy CPU per request vs the simulator's, chat c=64 (caps)", "<= 8x", ratio, ratio <= 8,
            f"{cpu['target']:.3f} / {cpu['upstream']:.3f} ms, same requests")  # fmt: skip
    ours, worker = _row(result, "chat_c64", "proxy"), _row(result, "chat_c64", "worker")
    if ours and worker and worker["rps"]:
        ratio = ours["rps"] / worker["rps"]
        cpu = worker["cpu_s_per_1k"]
        host = cpu.get("host")
        split = "" if host is None else f"; CPU/req host {host:.3f} + worker {cpu['target'] - host:.3f} ms"
        add("req/s in-process vs behind the host emulator, chat c=64 (caps)", "<= 1.5x", ratio, ratio <= 1.5,
            f"{ours['rps']:.0f} / {worker['rps']:.0f}; in-process CPU/req {ours['cpu_s_per_1k']['target']:.3f} ms"
            f"{split}")  # fmt: skip
    return out


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


def chart(result: dict[str, Any], path: Path) -> None:
    """Latency distributions (CDFs), one panel per scenario, one line per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(r["scenario"] for r in result["results"]))
    columns = 3
    rows = math.ceil(len(scenarios) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.8 * rows), squeeze=False)
    colors = {"direct": "#555555", "proxy": "#1f77b4", "proxy_nocaps": "#2ca02c", "litellm": "#d62728"}
    colors.update(worker="#9467bd", worker_nocaps="#8c564b", proxy_keys="#17becf", worker_keys="#bcbd22")
    colors["proxy_first"] = "#ff7f0e"
    for ax, scenario in zip(axes.flat, scenarios, strict=False):
        for row in (r for r in result["results"] if r["scenario"] == scenario):
            points = row["distribution_ms"]
            xs = [ms for _, ms in points]
            ys = [p for p, _ in points]
            label = f"{TARGET_LABELS[row['target']]} ({row['rps']:.0f}/s)"
            ax.plot(xs, ys, color=colors[row["target"]], label=label)
            if row.get("ttfc_distribution_ms"):
                ttfc = row["ttfc_distribution_ms"]
                ax.plot([ms for _, ms in ttfc], [p for p, _ in ttfc], color=colors[row["target"]], linestyle=":")
        title = scenario.replace("_c", ", concurrency ")
        if scenario.startswith("stream"):
            title += " (solid: total, dotted: first chunk)"
        ax.set_title(title, fontsize=9)
        ax.set_xscale("log")
        ax.set_xlabel("latency, ms (log)")
        ax.set_ylabel("percentile")
        ax.set_ylim(0, 100)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(scenarios) :]:
        ax.axis("off")
    machine = result["machine"]
    fig.suptitle(
        f"Latency distributions, {machine['cpus']} CPUs, {result['config']['seconds']:g} s per run "
        f"({result['created'][:10]})",
        fontsize=11,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
