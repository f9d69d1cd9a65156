"""Helpers shared by several test files: a seconds-long training config and a briefly trained
embedded-default-shaped supernet checkpoint."""
import torch
import torch.nn.functional as F

import mpq
from mpq.checkpoint import atomic_save, build_supernet
from mpq.config import load_config


def tiny_config(tmp_path, *extra, name="tiny"):
    """128 Fashion-MNIST samples, batch 32 (4 steps an epoch), small held-out set; ``extra``
    overrides come last and win."""
    return load_config(None, [
        "data.train_subset=128", "data.val_subset=64", "data.batch_size=32", "data.eval_batch_size=64",
        "train.epochs=1", "train.warmup_epochs=0", "train.num_random=1", f"output.dir={tmp_path}",
        f"output.name={name}", "output.progress=false", "eval.bn_recalib_batches=1",
        "eval.random_configs=0", "eval.uniform_bits=[]", *extra])


def tiny_spec(name="small_cnn", in_channels=1, bn="shared"):
    return {"model": {"name": name, "num_classes": 10, "in_channels": in_channels},
            "quant": {"w_bits": [2, 3, 4, 5, 6], "a_bits": [2, 3, 4, 5, 6], "keep_8bit": ["first", "last"],
                      "per_channel": True, "bn": bn},
            "input_size": [1, in_channels, 28, 28]}


def make_checkpoint(path, steps=15, seed=0, spec=None, bn="shared"):
    """A briefly trained small_cnn supernet on Fashion-MNIST (max and min config per step) in the
    trainer's checkpoint format."""
    from mpq.data import build_datasets
    torch.manual_seed(seed)
    spec = spec or tiny_spec(bn=bn)
    net = build_supernet(spec)
    info = build_datasets("fashion_mnist", seed=seed, train_subset=64 * steps)
    loader = torch.utils.data.DataLoader(info.train, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    mpq.calibrate_activations(net, next(iter(loader))[0])
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net.train()
    for x, y in loader:
        opt.zero_grad()
        for cfg in (mpq.max_config(net), mpq.min_config(net)):
            mpq.set_bits(net, cfg)
            F.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    atomic_save({"format": "mpq-supernet", "version": 1, "spec": spec, "model": net.state_dict(),
                 "config": {"data": {"name": "fashion_mnist", "root": None, "seed": seed}}}, path)
    return path
