"""Read a sweep's output directory: the best cell per metric and the Pareto front of
effect vs fluency (``vinterp steer show``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vinterp.evals.results import HIGHER_IS_BETTER, metrics_of, summarize


def _mean(row: dict[str, Any], metric: str) -> float | None:
    return (row.get(metric) or {}).get("mean")


def best_cells(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per metric, the cell with the best mean (highest; lowest for fluency's NLL)."""
    out = {}
    for m in metrics_of(rows):
        have = [r for r in rows if _mean(r, m) is not None]
        if have:
            sign = 1 if HIGHER_IS_BETTER[m] else -1
            out[m] = max(have, key=lambda r: sign * _mean(r, m))
    return out


def pareto_front(rows: list[dict[str, Any]], effect: str = "ab",
                 fluency: str = "fluency") -> list[dict[str, Any]]:
    """Cells no other cell beats on both effect (higher) and fluency NLL (lower), by effect."""
    pts = [r for r in rows if _mean(r, effect) is not None and _mean(r, fluency) is not None]
    front = []
    for r in pts:
        e, f = _mean(r, effect), _mean(r, fluency)
        dominated = any(_mean(o, effect) >= e and _mean(o, fluency) <= f
                        and (_mean(o, effect) > e or _mean(o, fluency) < f) for o in pts)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: _mean(r, effect))


def _cell(r: dict[str, Any], metrics: list[str]) -> str:
    parts = [f"layer {r['layer']:>3} scale {r['scale']:+7.2f}"]
    for m in metrics:
        s = r.get(m) or {}
        if s.get("mean") is not None:
            parts.append(f"{m} {s['mean']:+.3f} [{s['lo']:+.3f}, {s['hi']:+.3f}]")
    return "  ".join(parts)


def show(out_dir: str | Path) -> str:
    """The report ``vinterp steer show`` prints."""
    out = Path(out_dir)
    if not (out / "cells").is_dir():
        raise FileNotFoundError(f"{out} is not a sweep output directory (no cells/ in it)")
    rows = summarize(out)
    if not rows:
        raise ValueError(f"{out} holds no finished cells")
    metrics = metrics_of(rows)
    layers = sorted({r["layer"] for r in rows})
    scales = sorted({r["scale"] for r in rows})
    lines = [f"{out}: {len(rows)} cells ({len(layers)} layers x {len(scales)} scales), "
             f"metrics: {', '.join(metrics)}", "", "best cell per metric:"]
    for m, r in best_cells(rows).items():
        lines.append(f"  {m:<9} {_cell(r, metrics)}")
    effect = "ab" if "ab" in metrics else "behavior"
    if effect in metrics and "fluency" in metrics:
        lines += ["", f"Pareto front ({effect} effect up, fluency NLL down):"]
        lines += [f"  {_cell(r, metrics)}" for r in pareto_front(rows, effect)]
    return "\n".join(lines)
