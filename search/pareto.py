"""The search path as a table (``pareto.csv``) and a plot (``pareto.png``).

``pareto.csv`` columns: ``step`` (0 = the start configuration), ``bitops``, ``size_bytes``, ``acc``
and ``loss`` (measured on the calibration set), ``score`` (of the move that led there), ``move``
(e.g. ``layer1.0.conv1.w6->5``) and ``config`` (JSON ``{layer: [w_bits, a_bits]}``).
"""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Iterable, Mapping, Optional, Sequence, Tuple

COLUMNS = ("step", "bitops", "size_bytes", "acc", "loss", "score", "move", "config")


def config_json(config: Mapping[str, Sequence[int]]) -> str:
    """Compact JSON ``{"layer": [w, a], ...}`` in layer order."""
    return json.dumps({k: [int(v[0]), int(v[1])] for k, v in config.items()}, separators=(",", ":"))


def write_csv(path: str, steps: Iterable[Any]) -> None:
    """Write the path (:class:`search.greedy.Step` objects) to ``path``."""
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for s in steps:
            r = s.result
            w.writerow([s.index, f"{s.bitops:.6g}" if s.bitops is not None else "",
                        f"{s.size_bytes:.6g}" if s.size_bytes is not None else "",
                        f"{r['acc']:.6f}" if "acc" in r else "", f"{r['loss']:.6f}" if "loss" in r else "",
                        "" if s.score is None else f"{s.score:.6g}",
                        "" if s.move is None else str(s.move), config_json(s.config)])
    os.replace(tmp, path)


def read_csv(path: str) -> list:
    """Rows of a ``pareto.csv`` as dicts (numbers parsed, ``config`` as a dict)."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out = dict(row)
            out["step"] = int(row["step"])
            for k in ("bitops", "size_bytes", "acc", "loss", "score"):
                out[k] = float(row[k]) if row[k] != "" else None
            out["config"] = {k: tuple(v) for k, v in json.loads(row["config"]).items()}
            rows.append(out)
    return rows


def plot(path: str, segments: Sequence[Tuple[str, Sequence[Any]]], uniform: Sequence[Mapping[str, Any]] = (),
         selected: Sequence[Mapping[str, Any]] = (), title: Optional[str] = None,
         budgets: Sequence[Mapping[str, Any]] = ()) -> None:
    """Accuracy vs BitOPs: each ``(label, steps)`` segment of the search (a line: the greedy path,
    a reference walk, the best per generation), the uniform configurations (squares, labelled
    ``W{b}A{b}``), each budget's BitOPs limit (dashed vertical line, labelled) and the selected
    configurations (stars, labelled with their budget and accuracy). ``uniform`` / ``selected`` /
    ``budgets`` items hold ``bitops`` (and ``acc``) and ``label``. Accuracies are on the
    calibration samples (a reference walk's: on the one batch that scored the move)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps_all = [s for _, steps in segments for s in steps]
    top = max([s.bitops for s in steps_all] + [u["bitops"] for u in uniform]
              + [b["bitops"] for b in budgets] or [1.0])
    scale, unit = (1e9, "GBitOPs") if top >= 1e9 else (1e6, "MBitOPs")
    for label, steps in segments:
        xs = [s.bitops / scale for s in steps]
        ys = [100.0 * s.result.get("acc", float("nan")) for s in steps]
        ax.plot(xs, ys, "-o", markersize=3, linewidth=1.0, alpha=0.8, label=label)
    if uniform:
        ax.plot([u["bitops"] / scale for u in uniform], [100.0 * u["acc"] for u in uniform], "s",
                color="tab:red", markersize=7, label="uniform W=A bits")
        for u in uniform:
            ax.annotate(u["label"], (u["bitops"] / scale, 100.0 * u["acc"]), textcoords="offset points",
                        xytext=(4, -10), fontsize=8, color="tab:red")
    for i, b in enumerate(budgets):
        ax.axvline(b["bitops"] / scale, color="tab:gray", linestyle="--", linewidth=1.0,
                   label="budget" if i == 0 else None)
        ax.annotate(f"budget {b['label']}", (b["bitops"] / scale, 1.0), xycoords=("data", "axes fraction"),
                    textcoords="offset points", xytext=(-3, -4), rotation=90, ha="right", va="top",
                    fontsize=7, color="tab:gray")
    if selected:
        ax.plot([s["bitops"] / scale for s in selected], [100.0 * s["acc"] for s in selected], "*",
                color="tab:green", markersize=13, label="selected for budget", zorder=5)
        for s in selected:
            ax.annotate(f"{s['label']}: {100.0 * s['acc']:.2f}%", (s["bitops"] / scale, 100.0 * s["acc"]),
                        textcoords="offset points", xytext=(6, 6), fontsize=8, color="tab:green")
    ax.set_xlabel(unit)
    ax.set_ylabel("calibration accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.set_title(title or "mixed-precision search: accuracy vs BitOPs")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
