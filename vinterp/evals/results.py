"""A sweep's results on disk: one file per finished cell, the summaries and reports.

``cells/L{layer}_S{scale}.jsonl`` holds a row per question/prompt, then a ``summary`` row
(each metric's mean and 95% confidence interval); ``summary.csv``, ``summary.md`` and a
heatmap per metric are written from the summaries. Every file is written whole.

Example::

    rows = summarize(Path("happy-sweep"))
    write_reports(Path("happy-sweep"), rows, plots=False)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

METRICS = ("ab", "behavior", "fluency")
#: which way is better, per metric (fluency is an NLL: lower is better)
HIGHER_IS_BETTER = {"ab": True, "behavior": True, "fluency": False}
METRIC_TITLES = {"ab": "A/B effect (logprob matching - non-matching answer)",
                 "behavior": "behaviour score (logprob positive - negative label)",
                 "fluency": "fluency (mean token NLL, lower is better)"}

_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201,
         2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069,
         2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def mean_ci(values: Iterable[float | None]) -> dict[str, Any]:
    """Mean and 95% confidence interval (Student t) of the non-missing values."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    m = sum(xs) / n
    if n == 1:
        return {"mean": m, "lo": m, "hi": m, "n": 1}
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    t = _T975[n - 2] if n - 2 < len(_T975) else 1.96
    half = t * sd / math.sqrt(n)
    return {"mean": m, "lo": m - half, "hi": m + half, "n": n}


def cell_name(layer: int, scale: float) -> str:
    """The cell's file name, e.g. ``L08_S+4.0.jsonl``: the scale in its shortest exact form,
    so two scales never share a file (rounded to 3 decimals, 0.0002 and 0.0004 once both
    became ``S+0.000``, and a resumed sweep took one for the other)."""
    return f"L{int(layer):02d}_S{float(scale):+}.jsonl"


def finished_cell(cells: Path, layer: int, scale: float) -> dict[str, Any] | None:
    """Cell ``(layer, scale)``'s summary row if it is finished, else ``None``.

    Sweeps written before the exact names used ``L08_S+4.000.jsonl``; such a file counts only
    when the scale it stored is exactly this one."""
    row = read_cell(cells / cell_name(layer, scale))
    if row is None:
        old = read_cell(cells / f"L{int(layer):02d}_S{float(scale):+.3f}.jsonl")
        if old is not None and old.get("layer") == layer and old.get("scale") == float(scale):
            row = old
    return row


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a whole file or nothing (temporary file in the same folder, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_cell(path: Path) -> dict[str, Any] | None:
    """A cell file's summary row (``None`` if the file is not a finished cell)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        last = json.loads(lines[-1]) if lines else None
    except (OSError, json.JSONDecodeError):
        return None
    return last if isinstance(last, dict) and last.get("type") == "summary" else None


def summarize(out: Path, layers: Sequence[int] | None = None,
              scales: Sequence[float] | None = None,
              metrics: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The summary rows of the finished cells in ``out`` (all, or the given grid's)."""
    rows = []
    for path in sorted((Path(out) / "cells").glob("*.jsonl")):
        s = read_cell(path)
        if s is None:
            continue
        if layers is not None and s["layer"] not in layers:
            continue
        if scales is not None and not any(math.isclose(s["scale"], x) for x in scales):
            continue
        if any(r["layer"] == s["layer"] and r["scale"] == s["scale"] for r in rows):
            continue   # a cell under both its old and its exact name (finished_cell)
        rows.append(s)
    rows.sort(key=lambda r: (r["layer"], r["scale"]))
    return rows


def metrics_of(rows: list[dict[str, Any]]) -> list[str]:
    return [m for m in METRICS if any(m in r for r in rows)]


def write_reports(out: Path, rows: list[dict[str, Any]], metrics: Sequence[str] | None = None,
                  plots: bool = True) -> None:
    """``summary.csv``, ``summary.md`` and a heatmap PNG per metric."""
    metrics = list(metrics or metrics_of(rows))

    def fmt(v: Any) -> str:
        return "" if v is None else f"{v:.4f}"

    head = ["layer", "scale"] + [f"{m}_{k}" for m in metrics for k in ("mean", "lo", "hi", "n")]
    csv = [",".join(head)]
    md = ["| layer | scale | " + " | ".join(f"{m} (95% CI)" for m in metrics) + " |",
          "|---:|---:|" + "---:|" * len(metrics)]
    for r in rows:
        vals = [str(r["layer"]), f"{r['scale']:g}"]
        cells = []
        for m in metrics:
            s = r.get(m) or {}
            vals += [fmt(s.get("mean")), fmt(s.get("lo")), fmt(s.get("hi")), str(s.get("n", 0))]
            cells.append("–" if s.get("mean") is None else
                         f"{s['mean']:.3f} [{s['lo']:.3f}, {s['hi']:.3f}]")
        csv.append(",".join(vals))
        md.append(f"| {r['layer']} | {r['scale']:g} | " + " | ".join(cells) + " |")
    write_atomic(out / "summary.csv", "\n".join(csv) + "\n")
    write_atomic(out / "summary.md", "\n".join(md) + "\n")
    if plots and rows:
        for m in metrics:
            heatmap(rows, m, out / f"heatmap_{m}.png")


def heatmap(rows: list[dict[str, Any]], metric: str, path: Path) -> None:
    """A layer x scale heatmap of one metric's means (annotated), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    layers = sorted({r["layer"] for r in rows})
    scales = sorted({r["scale"] for r in rows})
    grid = torch.full((len(layers), len(scales)), float("nan"))
    for r in rows:
        v = (r.get(metric) or {}).get("mean")
        if v is not None:
            grid[layers.index(r["layer"]), scales.index(r["scale"])] = v
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(scales), 1.2 + 0.45 * len(layers)))
    cmap = "viridis_r" if not HIGHER_IS_BETTER[metric] else "coolwarm"
    im = ax.imshow(grid.numpy(), aspect="auto", cmap=cmap, origin="lower")
    ax.set_xticks(range(len(scales)), [f"{s:g}" for s in scales])
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_xlabel("scale")
    ax.set_ylabel("layer")
    ax.set_title(METRIC_TITLES[metric], fontsize=9)
    for i in range(len(layers)):
        for j in range(len(scales)):
            v = float(grid[i, j])
            if math.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue())
