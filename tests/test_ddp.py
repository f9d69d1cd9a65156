"""Distributed training on CPU with gloo: two ranks stay identical and match a single-process run on
the same global batch; torchrun runs train.py unchanged."""
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from mpq.checkpoint import load_supernet, safe_load
from mpq.config import load_config
from mpq.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(out_dir, name, *extra):
    # global batch 32: two ranks x 16, or one process x 2 interleaved micro-batches of 16
    return ["data.train_subset=128", "data.val_subset=64", "data.batch_size=32",
            "data.eval_batch_size=32", "train.epochs=1", "train.max_steps=3", "train.warmup_epochs=0",
            "train.num_random=1", f"output.dir={out_dir}", f"output.name={name}",
            "output.progress=false", "eval.bn_recalib_batches=1", "eval.random_configs=0",
            "eval.uniform_bits=[4]", "scheduler.warmup=0.0", "scheduler.period=0.34",
            "scheduler.observe_every=1", *extra]


def _worker(rank, world, port, out_dir, extra=()):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    tr = Trainer(load_config(None, overrides(out_dir, "ddp", *extra)))
    wrapper = type(tr.ddp).__name__
    metrics = tr.fit()
    params = {n: p.detach().clone() for n, p in tr.net.named_parameters()}
    if tr.r2 is not None:
        params.update({f"r2.{n}": p.detach().clone() for n, p in tr.r2.named_parameters()})
    torch.save({"params": params, "metrics": metrics, "world": tr.env.world_size, "wrapper": wrapper},
               os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture
def clean_env(monkeypatch):
    for k in DIST_ENV:
        monkeypatch.delenv(k, raising=False)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("extra", [(), ("idm.enabled=true", "r2.enabled=true", "r2.weight=0.01",
                                          "train.order=[max, random, min]")], ids=["default", "idm-r2-min"])
def test_two_ranks_match_each_other_and_a_single_process(tmp_path, clean_env, extra):
    """The model is wrapped in DistributedDataParallel (no_sync for all but a step's last backward):
    2 ranks x 16 samples equal 1 process x 2 micro-batches of 16, parameter by parameter (also the
    step sizes no subnet sampled, and the R2 parameters outside the DDP module)."""
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), extra), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["world"] == r1["world"] == 2
    assert r0["wrapper"] == "DistributedDataParallel"
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), n
    assert r0["metrics"]["acc"] == r1["metrics"]["acc"]  # metrics reduced across ranks
    # only rank 0 wrote the run folder; its checkpoint is a normal one
    net, ckpt = load_supernet(str(tmp_path / "ddp" / "supernet.pt"))
    assert ckpt["train_state"]["world_size"] == 2 and ckpt["train_state"]["global_step"] == 3

    single = Trainer(load_config(None, overrides(str(tmp_path), "single", "train.micro_batches=2", *extra)))
    assert single.ddp is None
    single.fit()
    assert single.env.world_size == 1
    mine = {n: p for n, p in single.net.named_parameters()}
    if single.r2 is not None:
        mine.update({f"r2.{n}": p for n, p in single.r2.named_parameters()})
    assert set(mine) == set(r0["params"])
    diffs = {n: (p.detach() - r0["params"][n]).abs().max().item() for n, p in mine.items()}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < 1e-4, (worst, diffs[worst])
    moved = [n for n, p in single.net.named_parameters() if n.endswith(".weight")]
    assert moved


def test_torchrun_runs_train_py_unchanged(tmp_path, clean_env):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), os.path.join(ROOT, "train.py"),
           *overrides(str(tmp_path), "tr", "train.max_steps=2")]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = safe_load(str(tmp_path / "tr" / "supernet.pt"))
    assert ckpt["train_state"]["world_size"] == 2 and ckpt["train_state"]["global_step"] == 2
    # rank 0 alone writes: one "training ..." banner, one metrics line
    assert r.stdout.count("training small_mobilenet supernet") == 1
    assert len((tmp_path / "tr" / "metrics.jsonl").read_text().splitlines()) == 1
