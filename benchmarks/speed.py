"""Speed benchmark: every figure is a ratio of two timings taken in the same process, same threads.

    python benchmarks/speed.py [--out benchmarks/results/speed.json] [--kernel eager|compiled|both]

1. supernet training step (one sampled config: forward + backward + SGD step) vs the float model's
   step: torchvision ResNet-18 at 32x32 batch 64, the embedded default small_mobilenet and the
   previous default SmallCNN at 28x28 batch 256 (`--models` picks);
2. exported fixed-precision model inference vs the float model;
3. a full greedy search of a ResNet-18 supernet on a small calibration set: wall time and subnet
   forward passes, fast strategy vs naive greedy;
4. peak memory of supernet training vs float training: the peak RSS of a child process during three
   training steps (VmHWM reset after the first step), and the memory a step adds above the resident set;
5. ONNX: the QDQ ``model.onnx`` of uniform W4A4 (``search.onnx_export``) vs the float ONNX model of the
   same architecture (BatchNorm folded, every layer float): file bytes and onnxruntime CPU inference
   time (ORT_ENABLE_ALL), both sessions in this process.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Sequence

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mpq  # noqa: E402
from mpq.quantizer import set_kernel  # noqa: E402


def median_time(fn: Callable[[], None], warmup: int = 3, repeats: int = 15) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def train_step_fn(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    net.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()
    return step


MODELS = ("resnet18", "small_mobilenet", "small_cnn")


def make_pair(name: str):
    """(float model, supernet of the same weights at W4A4, input batch, labels)."""
    torch.manual_seed(0)
    if name == "resnet18":
        import torchvision
        float_net = torchvision.models.resnet18(num_classes=10)
        x = torch.randn(64, 3, 32, 32)
    else:   # the embedded-default-sized models: small_mobilenet, small_cnn
        float_net = mpq.build_model(name, num_classes=10, in_channels=1)
        x = torch.randn(256, 1, 28, 28)
    y = torch.randint(0, 10, (x.shape[0],))
    supernet = mpq.quantize_model(copy.deepcopy(float_net))
    mpq.calibrate_activations(supernet, x)
    mpq.set_bits(supernet, mpq.uniform_config(supernet, 4, 4))
    return float_net, supernet, x, y


def bench_train_step(kernels: List[str], models: Sequence[str]) -> List[Dict]:
    rows = []
    for name in models:
        float_net, supernet, x, y = make_pair(name)
        for kernel in kernels:
            set_kernel(kernel)
            f_step, q_step = train_step_fn(float_net, x, y), train_step_fn(supernet, x, y)
            # Interleave float / supernet measurements so drift hits both alike.
            tf1 = median_time(f_step)
            tq = median_time(q_step)
            tf2 = median_time(f_step)
            tf = min(tf1, tf2)
            rows.append({"model": name, "kernel": kernel, "float_step_ms": tf * 1e3,
                         "supernet_step_ms": tq * 1e3, "ratio": tq / tf})
        set_kernel("eager")
    return rows


def bench_export(models: Sequence[str]) -> List[Dict]:
    import tempfile
    from mpq.export import export, load_fixed
    rows = []
    for name in models:
        float_net, supernet, x, _ = make_pair(name)
        float_net.eval()
        supernet.eval()
        spec = {"model": {"name": name, "num_classes": 10, "in_channels": int(x.shape[1])},
                "input_size": [1, *x.shape[1:]]}
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "fixed.pt")
            export(supernet, mpq.get_bits(supernet), path, spec=spec)
            fixed = load_fixed(path).eval()
        with torch.inference_mode():
            tf1 = median_time(lambda: float_net(x))
            tx = median_time(lambda: fixed(x))
            ts = median_time(lambda: supernet(x))
            tf2 = median_time(lambda: float_net(x))
        tf = min(tf1, tf2)
        rows.append({"model": name, "batch": int(x.shape[0]), "float_ms": tf * 1e3, "fixed_ms": tx * 1e3,
                     "supernet_eval_ms": ts * 1e3, "ratio": tx / tf})
    return rows


def bench_onnx(models: Sequence[str]) -> List[Dict]:
    import numpy as np
    import onnxruntime as ort
    from mpq.export import fixed_model
    from search.onnx_export import build_onnx
    rows = []
    for name in models:
        float_net, supernet, x, _ = make_pair(name)
        supernet.eval()
        qdq, _ = build_onnx(fixed_model(supernet, mpq.uniform_config(supernet, 4, 4)), list(x.shape[1:]))
        # the float reference: the same architecture with every layer at 32 bits (BN folded as well)
        flt = mpq.quantize_model(copy.deepcopy(float_net), w_bits=(32,), a_bits=(32,), keep_8bit=())
        flt.eval()
        fproto, _ = build_onnx(fixed_model(flt), list(x.shape[1:]))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = torch.get_num_threads()
        sq = ort.InferenceSession(qdq.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        sf = ort.InferenceSession(fproto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        feed = {"input": x.numpy().astype(np.float32)}
        tf1 = median_time(lambda: sf.run(None, feed))
        tq = median_time(lambda: sq.run(None, feed))
        tf2 = median_time(lambda: sf.run(None, feed))
        tf = min(tf1, tf2)
        qb, fb = len(qdq.SerializeToString()), len(fproto.SerializeToString())
        rows.append({"model": name, "batch": int(x.shape[0]), "qdq_bytes": qb, "float_bytes": fb,
                     "bytes_ratio": qb / fb, "ort_float_ms": tf * 1e3, "ort_qdq_ms": tq * 1e3,
                     "ort_ratio": tq / tf})
    return rows


def bench_search(calib_batches: int = 2, batch_size: int = 16) -> List[Dict]:
    """Greedy search of a ResNet-18 supernet (10 classes, 32x32 inputs, BitOPs at 224x224) down to
    the uniform W3A3 BitOPs on a small random calibration set: fast strategy vs naive greedy."""
    import torchvision
    from search.evaluator import Evaluator
    from search.greedy import CostModel, search_supernet
    torch.manual_seed(0)
    net = mpq.quantize_model(torchvision.models.resnet18(num_classes=10))
    n = calib_batches * batch_size
    x, y = torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))
    mpq.calibrate_activations(net, x[:batch_size])
    net.eval()
    batches = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n, batch_size)]
    cost = CostModel(net, (1, 3, 224, 224))
    budget = cost.bitops(mpq.uniform_config(net, 3, 3))
    rows = []
    for strategy in ("naive", "fast"):
        ev = Evaluator(net, batches, batches, batch_size=batch_size, bn_batches=calib_batches)
        t = time.perf_counter()
        res = search_supernet(net, ev, cost, max_bitops=budget, strategy=strategy)
        wall = time.perf_counter() - t
        final = res.final
        rows.append({"strategy": strategy, "budget_G": budget / 1e9, "steps": len(res.path) - 1,
                     "forward_passes": ev.counter.forwards, "wall_s": wall,
                     "final_bitops_G": final.bitops / 1e9, "final_calib_loss": float(final.result["loss"])})
    rows[1]["passes_vs_naive"] = rows[1]["forward_passes"] / rows[0]["forward_passes"]
    rows[0]["passes_vs_naive"] = 1.0
    return rows


CHILD = r"""
import sys, torch
sys.path.insert(0, {root!r})
from benchmarks.speed import make_pair, train_step_fn

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key + ":"))  # KiB

float_net, supernet, x, y = make_pair({name!r})
net = supernet if {quant!r} else float_net
del float_net, supernet
step = train_step_fn(net, x, y)
step()  # first step allocates gradients and optimizer state
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
for _ in range(3):
    step()
print(base, status("VmHWM"))
"""


def bench_memory(models: Sequence[str]) -> List[Dict]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = []
    for name in models:
        peak = {}
        for quant in (False, True):
            code = CHILD.format(root=root, name=name, quant=quant)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            base, high = map(int, out.stdout.strip().splitlines()[-1].split())
            peak[quant] = (base / 1024.0, high / 1024.0)  # KiB -> MiB
        rows.append({"model": name, "float_rss_mib": peak[False][0], "float_peak_mib": peak[False][1],
                     "supernet_rss_mib": peak[True][0], "supernet_peak_mib": peak[True][1],
                     "step_memory_ratio": (peak[True][1] - peak[True][0] + 1e-9) / (peak[False][1] - peak[False][0] + 1e-9),
                     "peak_ratio": peak[True][1] / peak[False][1]})
    return rows


def print_table(title: str, rows: List[Dict]) -> None:
    print(f"\n## {title}")
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r.get(k):.3f}" if isinstance(r.get(k), float) else str(r.get(k))
                                for k in keys) + " |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/speed.json")
    ap.add_argument("--kernel", choices=["eager", "compiled", "both"], default="both")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: train,export,search,memory,onnx")
    ap.add_argument("--models", default=",".join(MODELS),
                    help="models of the train/export/memory sections (comma list of " + ", ".join(MODELS) + ")")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    models = [m for m in args.models.split(",") if m]
    if not models or any(m not in MODELS for m in models):
        ap.error(f"--models: expected a comma list of {', '.join(MODELS)}, got {args.models!r}")
    kernels = ["eager", "compiled"] if args.kernel == "both" else [args.kernel]
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "torch": torch.__version__}}
    sections = [("train", "1. training step: supernet / float", lambda: bench_train_step(kernels, models)),
                ("export", "2. inference: exported fixed-precision / float", lambda: bench_export(models)),
                ("search", "3. greedy search on ResNet-18", bench_search),
                ("memory", "4. peak memory of training: supernet / float", lambda: bench_memory(models)),
                ("onnx", "5. ONNX (onnxruntime): QDQ W4A4 / float", lambda: bench_onnx(models))]
    for key, title, fn in sections:
        if key in skip:
            continue
        rows = fn()
        result[key] = rows
        print_table(title, rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
