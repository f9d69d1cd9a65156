"""``python train.py`` / ``mpq-train``: train a one-shot mixed-precision supernet.

User errors (bad config key or value, missing file, bad checkpoint) print one line ``error: ...`` on
stderr and exit with status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .errors import UserError
from .rundir import sigterm_exits

USAGE_EXAMPLES = """\
examples:
  python train.py                                        # embedded default: small_mobilenet, Fashion-MNIST, CPU
  python train.py train.epochs=1 output.name=quick       # any key can be overridden
  python train.py --config configs/cifar10_resnet20.yaml data.root=/data/cifar
  python train.py --config configs/imagenet_resnet18.yaml data.root=/data/imagenet train.epochs=150
  torchrun --nproc_per_node 8 train.py --config configs/imagenet_resnet18.yaml data.root=/data/imagenet
  python train.py --config configs/recipe_paper.yaml     # the paper's training recipe on the embedded default
  python train.py --config ... --resume                  # continue from the newest valid checkpoint
  python train.py output.name=quick --overwrite          # replace the earlier run in runs/quick

Results go to <output.dir>/<output.name>/: config.yaml, supernet.pt (latest checkpoint),
ckpt-stepN.pt, metrics.jsonl, scheduler.jsonl (one line per freezing update), train.log (what was
printed), tb/ (TensorBoard). One job per run folder: a second one exits 2 while the first runs.
"""


def build_parser() -> argparse.ArgumentParser:
    from .config import describe_schema
    p = argparse.ArgumentParser(
        prog="train.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a one-shot mixed-precision quantization supernet (sandwich sampling, "
                    "in-place distillation, IDM, bit-width freezing scheduler). Runs as one process or "
                    "under torchrun (DDP).",
        epilog=USAGE_EXAMPLES + "\nconfig keys (section.key = default  [type] meaning):\n" + describe_schema())
    p.add_argument("--config", metavar="FILE", action="append",
                   help="YAML config merged over the embedded default; repeat to merge several in "
                        "order (e.g. --config configs/imagenet_resnet50.yaml --config configs/recipe_paper.yaml)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest valid checkpoint of the run (same as train.resume=auto)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run folder that holds an earlier run, deleting its checkpoints, "
                        "metrics and logs (without it such a run exits 2 and touches nothing)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config and exit without training")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, values parsed as YAML (e.g. train.lr=0.1 quant.w_bits=[2,4])")
    return p




def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()

    def _arg_error(message: str) -> None:
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)

    parser.error = _arg_error  # type: ignore[method-assign]
    try:
        args = parser.parse_intermixed_args(argv)  # options may come between the overrides
    except SystemExit as e:  # --help (0) or a usage error (2, one line printed above)
        return int(e.code or 0)
    try:
        from .config import dump_config, load_config
        overrides = list(args.overrides)
        if args.resume:
            overrides.append("train.resume=auto")
        cfg = load_config(args.config, overrides)
        if args.print_config:
            sys.stdout.write(dump_config(cfg))
            return 0
        from .trainer import Trainer, TrainingInterrupted
        try:
            with sigterm_exits():
                Trainer(cfg, overwrite=args.overwrite).fit()
        except TrainingInterrupted as e:
            print(f"interrupted (signal {e.signum}); checkpoint written: {e.path}" if e.path
                  else f"interrupted (signal {e.signum})", file=sys.stderr)
            return 128 + e.signum
    except UserError as e:
        if os.environ.get("RANK", "0") in ("", "0"):  # under torchrun every rank fails alike; one line
            msg = " ".join(str(e).split())
            print(f"error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:  # the environment (a full disk, a vanished mount), not a bug: one line
        if os.environ.get("RANK", "0") in ("", "0"):
            print(f"error: {e.filename or 'I/O'}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
