"""Ablation of the one-shot paper's two fixes on the embedded default: the supernet trained WITH the
bit-width freezing scheduler + information-distortion mitigation (IDM) against one trained WITHOUT
both (everything else equal: same data, seed, sandwich sampling, in-place distillation).

    python benchmarks/ablation.py                       # two runs of the embedded default
    python benchmarks/ablation.py --jobs 2              # both at once, one thread each
    python benchmarks/ablation.py train.epochs=1        # any config override applies to both runs

Prints the held-out accuracy of the max, min and fixed configs of both supernets and the
differences, and writes them to ``<out>/ablation.json`` (default ``runs/ablation``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "with_sched_idm": ["scheduler.enabled=true", "idm.enabled=true"],
    "without_sched_idm": ["scheduler.enabled=false", "idm.enabled=false"],
}


def run_variant(name: str, out: str, overrides, threads: int) -> subprocess.Popen:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"output.dir={out}", f"output.name={name}",
           "output.progress=false", *overrides, *VARIANTS[name]]
    log = open(os.path.join(out, f"{name}.log"), "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def last_metrics(path: str):
    with open(path, encoding="utf-8") as f:
        lines = [json.loads(l) for l in f if l.strip()]
    return lines[-1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("runs", "ablation"), help="output folder")
    p.add_argument("--jobs", type=int, default=1, choices=(1, 2), help="runs at once (2: one thread each)")
    p.add_argument("overrides", nargs="*", help="config overrides applied to both runs")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    results, times = {}, {}
    names = list(VARIANTS)
    pending = list(names)
    while pending:
        batch, pending = pending[:args.jobs], pending[args.jobs:]
        t0 = time.time()
        procs = {n: run_variant(n, args.out, args.overrides, 1 if args.jobs > 1 else 0) for n in batch}
        for n, proc in procs.items():
            rc = proc.wait()
            times[n] = round(time.time() - t0, 1)
            if rc != 0:
                print(f"{n}: train.py failed (exit {rc}); see {os.path.join(args.out, n + '.log')}",
                      file=sys.stderr)
                return 1
            results[n] = last_metrics(os.path.join(args.out, n, "metrics.jsonl"))
    a, b = results[names[0]]["acc"], results[names[1]]["acc"]
    keys = [k for k in a if k in b]
    print(f"{'config':<10} {'with sched+IDM':>15} {'without':>10} {'delta':>8}")
    for k in keys:
        print(f"{k:<10} {a[k]:>15.2f} {b[k]:>10.2f} {a[k] - b[k]:>+8.2f}")
    summary = {"overrides": args.overrides, "wall_s": times,
               "acc": {n: results[n]["acc"] for n in names},
               "delta": {k: round(a[k] - b[k], 3) for k in keys},
               "num_frozen_end": {n: results[n].get("num_frozen") for n in names}}
    with open(os.path.join(args.out, "ablation.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    print(f"wall time: {times}; written {os.path.join(args.out, 'ablation.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
