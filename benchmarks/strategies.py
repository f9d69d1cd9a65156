"""Search strategies at an equal number of subnet forward passes, on one trained supernet.

    python benchmarks/strategies.py                                  # runs/default/supernet.pt
    python benchmarks/strategies.py --checkpoint runs/X/supernet.pt --bits 3,4 --seeds 0,1

For each budget ``BitOPs(uniform WbAb)`` (``--bits``) and each ``--seeds`` value (the search's
``--seed``: which calibration images are drawn, and the evolution's / random search's RNG), every
strategy of ``search.py`` runs through the library call :func:`search.pipeline.run_search` with the
same data settings:

1. ``fast`` (search.py's default: greedy walk, pick rule, refinement) runs first; its subnet forward
   passes (greedy + refinement; exact evaluations cost calibration + BN batches, proxy ones their
   few batches) are the budget of compute the others get;
2. ``evolution`` with ``--population`` individuals and as many generations as fit that budget
   (each generation evaluates about ``population - parents`` new configurations), and ``random``
   with as many samples as the budget buys;
3. ``reference`` (the paper's greedy; it spends what its rules spend, reported beside it).

Reported per strategy: the exported model's accuracy on the held-out evaluation split, the
calibration loss of its answer, its BitOPs, the forward passes and the seconds spent; the
differences to ``fast`` on the same seed and budget. The uniform W=A configuration at the budget is
listed as the floor every strategy should clear. Writes ``--out`` (JSON) and ``--markdown``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "benchmarks", "results")
STRATEGIES = ("fast", "evolution", "random", "reference")


def _run(checkpoint: str, strategy: str, budget: float, seed: int, out_dir: str, **extra) -> Dict[str, Any]:
    from search.options import SearchOptions
    from search.pipeline import run_search
    o = SearchOptions(checkpoint=checkpoint, out=out_dir, budget=f"{budget:.9g}", strategy=strategy,
                      seed=seed, export=False, onnx=False, sensitivity=False, compare_uniform=False,
                      quiet=True, **extra)
    t0 = time.time()
    doc = run_search(o, log=lambda msg: None).doc
    forwards = doc["search"]["forwards"]["forwards"] + doc["search"]["refine_forwards"]["forwards"]
    return {"strategy": strategy, "accuracy": 100.0 * doc["accuracy"], "calib_loss": doc["results"][0]["calib_loss"],
            "calib_accuracy": 100.0 * doc["calib_accuracy"], "bitops": doc["bitops"], "forwards": forwards,
            "evaluations": doc["search"]["forwards"]["evaluations"] + doc["search"]["refine_forwards"]["evaluations"],
            "seconds": round(time.time() - t0, 1), "source": doc["source"],
            "layers": {n: [v["w_bits"], v["a_bits"]] for n, v in doc["layers"].items()},
            **extra}


def run(checkpoint: str, bits: List[int], seeds: List[int], population: int, log=print) -> Dict[str, Any]:
    import torch

    import mpq
    from mpq.checkpoint import load_supernet
    from search.cost import CostModel
    from search.options import SearchOptions
    net, ckpt = load_supernet(checkpoint)
    cost = CostModel(net, [int(v) for v in ckpt["spec"]["input_size"]])
    o = SearchOptions()
    # one exact evaluation: the calibration batches and the BN re-calibration batches
    per_exact = -(-o.calib_size // o.batch_size) + o.bn_batches
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for b in bits:
            budget = cost.bitops(mpq.uniform_config(net, b, b))
            for seed in seeds:
                out = os.path.join(tmp, f"w{b}s{seed}")
                fast = _run(checkpoint, "fast", budget, seed, out)
                evaluations = max(population, fast["forwards"] // per_exact)
                parents = max(2, population // 4)
                generations = max(1, round((evaluations - population) / (population - parents)))
                found = [fast,
                         _run(checkpoint, "evolution", budget, seed, out, population=population,
                              generations=generations),
                         _run(checkpoint, "random", budget, seed, out, random_samples=evaluations),
                         _run(checkpoint, "reference", budget, seed, out)]
                uniform = mpq.uniform_config(net, b, b)
                for r in found:
                    r.update({"bits": b, "budget": budget, "seed": seed,
                              "d_accuracy": r["accuracy"] - fast["accuracy"],
                              "d_calib_loss": r["calib_loss"] - fast["calib_loss"],
                              "is_uniform": all(tuple(r["layers"][n]) == tuple(uniform[n]) for n in uniform)})
                    log(f"W{b}A{b} seed {seed} {r['strategy']:>9}: {r['accuracy']:.2f}% "
                        f"(calib loss {r['calib_loss']:.4f}), {r['forwards']} forwards, {r['seconds']}s")
                rows += found
    return {"checkpoint": checkpoint, "bits": bits, "seeds": seeds, "population": population,
            "forwards_per_exact_evaluation": per_exact, "rows": rows,
            "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}}


def markdown(result: Dict[str, Any]) -> str:
    lines = ["| budget | strategy | test accuracy | − fast | calib loss | forwards | seconds | uniform? |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for b in result["bits"]:
        for st in STRATEGIES:
            rs = [r for r in result["rows"] if r["bits"] == b and r["strategy"] == st]
            if not rs:
                continue

            def m(key: str, digits: int = 2) -> str:
                vals = [r[key] for r in rs]
                mean = statistics.fmean(vals)
                return (f"{mean:.{digits}f}" if len(vals) < 2 else
                        f"{mean:.{digits}f} ± {statistics.stdev(vals):.{digits}f}")
            lines.append(f"| W{b}A{b} | {st} | {m('accuracy')} | {m('d_accuracy')} | {m('calib_loss', 4)} | "
                         f"{m('forwards', 0)} | {m('seconds', 0)} | {sum(r['is_uniform'] for r in rs)}/{len(rs)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=os.path.join("runs", "default", "supernet.pt"))
    p.add_argument("--bits", default="3,4", help="budgets: BitOPs of uniform WbAb (default 3,4)")
    p.add_argument("--seeds", default="0", help="search seeds (default 0)")
    p.add_argument("--population", type=int, default=24, help="evolution population (default 24)")
    p.add_argument("--out", default=os.path.join(RESULTS, "strategies.json"))
    p.add_argument("--markdown", default=os.path.join(RESULTS, "strategies.md"))
    a = p.parse_args(argv)
    result = run(a.checkpoint, [int(v) for v in a.bits.split(",")], [int(v) for v in a.seeds.split(",")],
                 a.population)
    for path, text in ((a.out, json.dumps(result, indent=1)), (a.markdown, markdown(result))):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text + ("\n" if not text.endswith("\n") else ""))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
