"""What a search reports: ``config.json`` (its entries and how each figure was measured),
``pareto.csv`` / ``pareto.png``, and the summary lines printed at the end.

The functions only shape and write what :func:`search.pipeline.run_search` measured; the keys and
their order are the documented ``config.json`` format (README), so they change only with it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .budget import Target, format_bitops, format_bytes


@dataclass
class Source:
    """The checkpoint a search read: where, which (sha256), what model at what input size."""

    checkpoint: str
    digest: str
    model_name: str
    input_size: List[int]


def result_entry(target: Target, cost, cfg, fixed: Mapping[str, Any], supernet: Mapping[str, Any],
                 chosen: Mapping[str, Any], fname: Optional[str], fbytes: Optional[int],
                 float_bytes: float, onnx_info: Mapping[str, Any]) -> Dict[str, Any]:
    """One budget's ``results`` entry: the configuration, its costs, the exported model's accuracy
    (``fixed``), the supernet's (``supernet``) and the pick's calibration figures (``chosen``)."""
    return {
        "budget": target.as_dict(),
        "layers": {n: {"w_bits": int(w), "a_bits": int(a)} for n, (w, a) in cfg.items()},
        "bitops": cost.bitops(cfg), "size_bytes": cost.size_bytes(cfg),
        "accuracy": fixed["acc"], "loss": fixed["loss"], "eval_samples": fixed["n"],
        "supernet_accuracy": supernet["acc"], "supernet_loss": supernet["loss"],
        "calib_accuracy": chosen["acc"], "calib_loss": chosen["loss"], "source": chosen["source"],
        "z_vs_uniform": chosen.get("z_vs_uniform"), "uniform_ref": chosen.get("uniform_ref"),
        "fixed_model": fname, "fixed_model_bytes": fbytes, "float_model_bytes": float_bytes,
        **onnx_info,
    }


def comparison_entry(u: Mapping[str, Any], uniform_eval: Mapping[str, Any], chosen: Mapping[str, Any],
                     searched_eval: Optional[Mapping[str, Any]], cost) -> Dict[str, Any]:
    """One ``uniform`` entry: a uniform configuration and the searched one at <= its BitOPs, both
    on the evaluation split (``chosen`` is ``{}`` when nothing fits)."""
    return {
        "bits": u["bits"], "bitops": u["bitops"], "size_bytes": u["size_bytes"],
        "accuracy": uniform_eval["acc"], "calib_accuracy": u["acc"],
        "searched_bitops": cost.bitops(chosen["config"]) if chosen else None,
        "searched_accuracy": searched_eval["acc"] if searched_eval else None,
        "searched_source": chosen.get("source") if chosen else None,
        "searched_z_vs_uniform": chosen.get("z_vs_uniform") if chosen else None,
        "searched_layers": ({n: [int(w), int(a)] for n, (w, a) in chosen["config"].items()}
                            if chosen else None)}


def measured(options, split, seed: int, recalibrated: bool) -> Dict[str, str]:
    """How each figure was measured. Training's metrics.jsonl measures the same configurations with
    its own BN batches (``acc_measured`` there), so the two can differ by a little."""
    n_eval, n_calib = len(split.eval_indices), len(split.calib_indices)
    return {
        "accuracy": f"exported fixed model (integer weights, BN folded) on {n_eval} "
                    f"held-out samples (val split)",
        "supernet_accuracy": "supernet, BN " + (
            f"re-calibrated per config on {options.bn_batches} batches of {options.batch_size} "
            f"training images (search seed {seed})" if recalibrated else
            "running statistics from training (switchable BN)")
            + f", on the same {n_eval} held-out samples",
        "calib_accuracy": f"supernet on the {n_calib} calibration samples "
                          f"({split.calib_split} split) that guided the search",
        "onnx_accuracy": "model.onnx in onnxruntime on the held-out samples"}


def data_section(options, data: Mapping[str, Any], split, seed: int) -> Dict[str, Any]:
    """``data``: which data set, seed and splits the search used."""
    return {"name": data["name"], "root": data.get("root"), "seed": seed,
            "calib_split": split.calib_split, "eval_split": "val",
            "calib_samples": len(split.calib_indices),
            "eval_samples": len(split.eval_indices), "bn_batches": options.bn_batches,
            "batch_size": options.batch_size, "bn_split": "train"}


def cost_section(cost, cmin, cmax, input_size: Sequence[int]) -> Dict[str, Any]:
    """``cost``: the achievable range of the supernet's BitOPs and size."""
    return {"max_bitops": cost.bitops(cmax), "min_bitops": cost.bitops(cmin),
            "uniform8_bitops": cost.uniform8_bitops(), "max_size_bytes": cost.size_bytes(cmax),
            "min_size_bytes": cost.size_bytes(cmin), "input_size": list(input_size)}


def search_section(options, stats: Mapping[str, Any]) -> Dict[str, Any]:
    """``search``: the settings of the search and what it spent (``stats``: ``refine_forwards``,
    ``steps``, ``seconds``, ``forwards``, ``uniform_forwards``, ``world_size``, optionally
    ``sensitivity_forwards`` and a per-budget strategy's ``per_budget`` figures)."""
    o = options
    return {"strategy": o.strategy, "score": o.score, "metric": o.metric,
            "select": o.select, "margin": o.margin, "refine": bool(o.refine),
            "refine_margin": o.refine_margin, "greedy_start": o.greedy_start,
            **({"start_tolerance": o.start_tolerance} if o.greedy_start == "sensitivity" else {}),
            "refine_top_k": o.refine_top_k, "refine_steps": o.refine_steps,
            "refine_forwards": stats["refine_forwards"],
            "top_k": o.top_k, "refresh": o.refresh, "proxy_batches": o.proxy_batches,
            "steps": stats["steps"], "full_path": bool(o.full_path),
            "seconds": stats["seconds"], "forwards": stats["forwards"],
            "uniform_forwards": stats["uniform_forwards"], "world_size": stats["world_size"],
            "sensitivity_forwards": stats.get("sensitivity_forwards"),
            **({"population": o.population, "generations": o.generations} if o.strategy == "evolution" else {}),
            **({"random_samples": o.random_samples} if o.strategy == "random" else {}),
            **({"per_budget": stats["per_budget"]} if "per_budget" in stats else {})}


def config_doc(source: Source, results: Sequence[Mapping[str, Any]], preprocess: Mapping[str, Any],
               sections: Mapping[str, Any], comparison: Sequence[Mapping[str, Any]],
               seconds: float) -> Dict[str, Any]:
    """``config.json``: the first budget's answer at the top level (what most users read), then
    ``measured``, ``data``, ``cost``, ``search`` (``sections``), the uniform comparison and every
    budget's entry."""
    first = results[0]
    return {
        "model": source.model_name,
        "checkpoint": os.path.abspath(source.checkpoint),
        "checkpoint_sha256": source.digest,
        "strategy": sections["search"]["strategy"],
        "budget": first["budget"],
        "layers": first["layers"],
        "bitops": first["bitops"], "size_bytes": first["size_bytes"],
        "accuracy": first["accuracy"], "loss": first["loss"],
        "supernet_accuracy": first["supernet_accuracy"], "supernet_loss": first["supernet_loss"],
        "eval_samples": first["eval_samples"],
        "calib_accuracy": first["calib_accuracy"], "source": first["source"],
        "fixed_model": first["fixed_model"], "fixed_model_bytes": first["fixed_model_bytes"],
        "float_model_bytes": first["float_model_bytes"],
        "onnx_model": first.get("onnx_model"), "onnx_model_bytes": first.get("onnx_model_bytes"),
        "onnx_accuracy": first.get("onnx_accuracy"), "encodings": first.get("encodings"),
        "preprocess": preprocess,
        **{k: sections[k] for k in ("measured", "data", "cost", "search")},
        "uniform": list(comparison),
        "results": list(results),
        "seconds": seconds,
    }


def write_outputs(out_dir: str, doc: Mapping[str, Any], segments: Sequence[Tuple[str, Sequence[Any]]],
                  uniform: Sequence[Mapping[str, Any]], targets: Sequence[Target], title: str) -> None:
    """``config.json`` (atomically: a reader never sees half of it), ``pareto.csv`` (the steps of
    every ``(label, steps)`` segment) and ``pareto.png`` (the segments, the uniform configurations,
    each budget's BitOPs limit and its pick)."""
    from . import pareto
    tmp = os.path.join(out_dir, ".config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    os.replace(tmp, os.path.join(out_dir, "config.json"))
    pareto.write_csv(os.path.join(out_dir, "pareto.csv"), [s for _, steps in segments for s in steps])
    sel = [{"bitops": r["bitops"], "acc": r["calib_accuracy"], "label": r["budget"]["text"]}
           for r in doc["results"]]
    limits = [{"bitops": t.max_bitops, "label": t.label} for t in targets if t.max_bitops is not None]
    pareto.plot(os.path.join(out_dir, "pareto.png"), segments, uniform, sel, title=title, budgets=limits)


def summary_lines(results: Sequence[Mapping[str, Any]], comparison: Sequence[Mapping[str, Any]]) -> List[str]:
    """The closing lines: each budget's answer, then each uniform configuration next to the
    searched one at <= its BitOPs."""
    lines = []
    for r in results:
        lines.append(f"budget {r['budget']['text']}: {format_bitops(r['bitops'])} BitOPs, "
                     f"{format_bytes(r['size_bytes'])}, accuracy {100 * r['accuracy']:.2f}% on "
                     f"{r['eval_samples']} held-out samples (supernet {100 * r['supernet_accuracy']:.2f}%; "
                     f"{r['source']})")
    for c in comparison:
        if c["searched_accuracy"] is None:
            continue
        lines.append(f"  uniform W{c['bits']}A{c['bits']}: {format_bitops(c['bitops'])} BitOPs, "
                     f"{100 * c['accuracy']:.2f}%  |  searched at <= its BitOPs: "
                     f"{format_bitops(c['searched_bitops'])}, {100 * c['searched_accuracy']:.2f}%")
    return lines
