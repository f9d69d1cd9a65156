"""Per-layer sensitivity: how much the calibration loss rises (and accuracy drops) when ONE layer's
weights, or its input activations, go to a lower bit-width while every other layer stays at its
highest bit-widths. What AIMET's per-layer analysis and NNCF's HAWQ report first: which layers
tolerate low bits, and what each layer costs.

For every non-pinned layer ``l``, kind ``k`` (weight / activation) and candidate ``b`` below the
layer's highest one::

    loss_increase(l, k, b) = loss(max config with l's k at b) - loss(max config)
    acc_drop(l, k, b)      = acc(max config) - acc(max config with l's k at b)

measured by the search's evaluator (``exact``: all calibration samples, BN re-calibrated per
configuration as the search scores; ``proxy``: its cheap pre-ranking batches). Each row also holds
the layer's share of the max configuration's BitOPs and of its weight size (``cost`` gives both:
the total minus the total with that layer's bits set to 0).
"""
from __future__ import annotations

import csv
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from mpq.supernet import is_pinned, max_config, quant_layers, unwrap

FIELDS = ("layer", "kind", "bits", "loss", "acc", "loss_increase", "acc_drop", "bitops_share",
          "size_share")
MODES = ("exact", "proxy")


def layer_shares(cost, config: Mapping[str, Tuple[int, int]]) -> Dict[str, Tuple[float, float]]:
    """``{layer: (share of BitOPs, share of weight size)}`` of ``config``."""
    bitops, size = cost.bitops(config), cost.size_bytes(config)
    out = {}
    for name in config:
        without = dict(config)
        without[name] = (0, 0)
        out[name] = ((bitops - cost.bitops(without)) / bitops if bitops else 0.0,
                     (size - cost.size_bytes(without)) / size if size else 0.0)
    return out


def layer_sensitivity(net, evaluator, cost, mode: str = "exact",
                      progress: Optional[Callable[[int, int], None]] = None) -> List[Dict[str, Any]]:
    """The sensitivity rows (module docstring), layers in network order, bits ascending.
    ``progress(done, total)`` after each evaluation."""
    if mode not in MODES:
        raise ValueError(f"sensitivity mode {mode!r} is not allowed; allowed: {list(MODES)}")
    net = unwrap(net)
    run = evaluator.exact if mode == "exact" else evaluator.proxy
    top = max_config(net)
    base = run(top)
    shares = layer_shares(cost, top)
    jobs: List[Tuple[str, str, int, Dict[str, Tuple[int, int]]]] = []
    for name, layer in quant_layers(net).items():
        if is_pinned(layer):
            continue
        w_top, a_top = top[name]
        for b in sorted(layer.w_candidates):
            if b < w_top:
                jobs.append((name, "weight", b, {**top, name: (b, a_top)}))
        for b in sorted(layer.a_candidates):
            if b < a_top:
                jobs.append((name, "activation", b, {**top, name: (w_top, b)}))
    rows = []
    for i, (name, kind, b, config) in enumerate(jobs):
        r = run(config)
        rows.append({"layer": name, "kind": kind, "bits": b, "loss": r["loss"], "acc": r["acc"],
                     "loss_increase": r["loss"] - base["loss"], "acc_drop": base["acc"] - r["acc"],
                     "bitops_share": shares[name][0], "size_share": shares[name][1]})
        if progress:
            progress(i + 1, len(jobs))
    return rows


def write_csv(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """``sensitivity.csv``: one row per (layer, kind, bits), the columns of :data:`FIELDS`."""
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in FIELDS})
    os.replace(tmp, path)


def read_csv(path: str) -> List[Dict[str, Any]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["bits"] = int(r["bits"])
        for k in FIELDS[3:]:
            r[k] = float(r[k])
    return rows


def most_sensitive(rows: Sequence[Mapping[str, Any]], kind: str, n: int = 5) -> List[str]:
    """The ``n`` layers whose ``kind`` at its lowest bit-width raises the loss most."""
    worst: Dict[str, float] = {}
    for r in rows:
        if r["kind"] == kind:
            worst[r["layer"]] = max(worst.get(r["layer"], float("-inf")), r["loss_increase"])
    return sorted(worst, key=worst.get, reverse=True)[:n]


def plot(path: str, rows: Sequence[Mapping[str, Any]], title: Optional[str] = None, label_top: int = 5) -> None:
    """``sensitivity.png``: two panels (weights, activations), loss increase vs bit-width, one line
    per layer coloured by its depth (colour bar: layer index), the ``label_top`` most sensitive
    layers of each panel named, so the plot stays readable with 50+ layers."""
    import matplotlib
    from matplotlib import cm, colors, ticker
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers: List[str] = []
    for r in rows:
        if r["layer"] not in layers:
            layers.append(r["layer"])
    norm = colors.Normalize(vmin=0, vmax=max(len(layers) - 1, 1))
    cmap = matplotlib.colormaps["viridis"]
    fig = Figure(figsize=(11, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, kind in zip(axes, ("weight", "activation")):
        named = set(most_sensitive(rows, kind, label_top))
        for i, name in enumerate(layers):
            pts = sorted((r["bits"], r["loss_increase"]) for r in rows if r["layer"] == name and r["kind"] == kind)
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "-o", color=cmap(norm(i)), markersize=2.5,
                    linewidth=1.8 if name in named else 0.7, alpha=1.0 if name in named else 0.5,
                    label=f"{i}: {name}" if name in named else None, zorder=3 if name in named else 2)
        ax.set_title(f"{kind}s at lower bits (others at max)")
        ax.set_xlabel("bit-width")
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        if named:
            ax.legend(title=f"most sensitive {len(named)}", fontsize=7, title_fontsize=7, loc="best")
        ax.grid(True, alpha=0.3)
        ax.set_yscale("symlog", linthresh=1e-3)
    axes[0].set_ylabel("calibration loss increase")
    sm = cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=list(axes), label="layer index (input -> output)")
    fig.suptitle(title or "per-layer sensitivity")
    tmp = path + ".tmp.png"
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


def tolerant_start(net, rows: Sequence[Mapping[str, Any]], tolerance: float) -> Dict[str, Tuple[int, int]]:
    """A greedy start from the sensitivity report: every non-pinned layer's weight and activation
    at the lowest bit-width whose loss increase (alone, others at max) is at most ``tolerance``,
    else at its highest; pinned layers keep their bits. ``search.py --greedy-start sensitivity``."""
    net = unwrap(net)
    start = dict(max_config(net))
    for name, layer in quant_layers(net).items():
        if is_pinned(layer):
            continue
        w, a = start[name]
        for r in rows:
            if r["layer"] != name or r["loss_increase"] > tolerance:
                continue
            if r["kind"] == "weight":
                w = min(w, int(r["bits"]))
            else:
                a = min(a, int(r["bits"]))
        start[name] = (w, a)
    return start
