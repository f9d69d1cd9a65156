"""What a training run records in its folder (rank 0 only), in one place:

* ``metrics.jsonl``: one line per evaluation (epoch, step, losses, accuracies, frozen bit-widths and
  how the accuracies were measured);
* ``scheduler.jsonl``: one line per bit-width-freezing update (the full frozen state after it);
* ``config.yaml``: the resolved config; ``tb/``: TensorBoard scalars;
* ``train.log``: everything printed, captured by :class:`mpq.rundir.RunFolder` (which also holds the
  folder's lock).

On resume the step-stamped logs are trimmed to the checkpoint's step (:meth:`RunLog.trim`), so a
crash after a line was written but before its checkpoint does not leave it twice.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

METRICS_LOG = "metrics.jsonl"
SCHEDULER_LOG = "scheduler.jsonl"
CONFIG_FILE = "config.yaml"


class RunLog:
    """The run's records; every method is a no-op unless ``enabled`` (rank 0)."""

    def __init__(self, run_dir: str, enabled: bool = True) -> None:
        self.run_dir, self.enabled = run_dir, enabled
        self.writer = None

    def print(self, msg: str) -> None:
        """One line of output (also into ``train.log``)."""
        if self.enabled:
            print(msg, flush=True)

    def open(self, config_text: str, step: int) -> None:
        """Start (or, at ``step`` > 0, continue) the records: trims the step-stamped logs to ``step``,
        writes ``config.yaml`` and opens TensorBoard (purging its scalars after ``step``)."""
        if not self.enabled:
            return
        if step > 0:
            for name in (SCHEDULER_LOG, METRICS_LOG):
                self.trim(name, step)
        with open(os.path.join(self.run_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
            f.write(config_text)
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(os.path.join(self.run_dir, "tb"), purge_step=step if step else None)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def append(self, name: str, entry: Dict[str, Any]) -> None:
        """One JSON line of ``name`` (``metrics.jsonl`` / ``scheduler.jsonl``)."""
        if not self.enabled:
            return
        with open(os.path.join(self.run_dir, name), "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def epoch(self, entry: Dict[str, Any], results: Dict[str, Dict[str, float]], summary: str) -> None:
        """An evaluated epoch: its ``metrics.jsonl`` line, accuracy/loss scalars, the printed line."""
        self.append(METRICS_LOG, entry)
        for k, v in results.items():
            self.scalar(f"acc/{k}", v["acc"], entry["step"])
            self.scalar(f"val_loss/{k}", v["loss"], entry["step"])
        self.print(summary)
        self.flush()

    def scheduler_update(self, step: int, steps_per_epoch: int, sched) -> None:
        """One line of ``scheduler.jsonl`` per freezing update: the full frozen state after it."""
        if not self.enabled:
            return
        u = sched.last_update or {}
        entry = {"step": step, "epoch": round(step / max(steps_per_epoch, 1), 4),
                 "ratio": round(float(u.get("ratio", 0.0)), 6), "layers": u.get("layers"),
                 "frozen": sched.frozen()}
        if sched.freeze_acts:
            entry["frozen_acts"] = sched.frozen_acts()
        self.append(SCHEDULER_LOG, entry)
        self.scalar("sched/frozen_layers", len(entry["frozen"]), step)
        self.scalar("sched/frozen", sched.num_frozen(), step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def trim(self, name: str, step: int) -> None:
        """Drop the lines of a step-stamped log written after ``step`` (they will be written again):
        freezing updates, and an epoch recorded just before a crash or from a newer checkpoint that
        turned out damaged. Lines that do not parse are dropped too."""
        path = os.path.join(self.run_dir, name)
        if not self.enabled or not os.path.isfile(path):
            return
        keep = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    if int(json.loads(line)["step"]) <= step:
                        keep.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError, TypeError):
                    continue
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(tmp, path)


def epoch_summary(epoch: int, epochs: int, step: int, elapsed: float, train_loss: Dict[str, float],
                  results: Dict[str, Dict[str, float]], num_frozen: int) -> str:
    """The one line printed per evaluated epoch."""
    accs = " ".join(f"{k} {v['acc']:.2f}" for k, v in results.items())
    losses = " ".join(f"{k} {v:.3f}" for k, v in train_loss.items())
    return (f"epoch {epoch + 1}/{epochs} step {step} [{elapsed:.0f}s] loss: {losses} | acc%: {accs} | "
            f"frozen {num_frozen}")


def metrics_entry(epoch: int, step: int, elapsed: float, lr: float, train_loss: Dict[str, float],
                  results: Dict[str, Dict[str, float]], frozen: Dict[str, Any],
                  measured: Optional[Dict[str, str]]) -> Dict[str, Any]:
    """One line of ``metrics.jsonl``."""
    return {"epoch": epoch + 1, "step": step, "time_s": round(elapsed, 2), "lr": lr,
            "train_loss": {k: round(v, 5) for k, v in train_loss.items()},
            "acc": {k: round(v["acc"], 3) for k, v in results.items()},
            "val_loss": {k: round(v["loss"], 5) for k, v in results.items()},
            "num_frozen": sum(len(v) for v in frozen.values()), "frozen": frozen,
            "acc_measured": measured}
