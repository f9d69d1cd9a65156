"""data.name=synthetic: seeded random images (a machine without data sets can train), checked
against their definition, and a short training run on them."""
import json

import torch

from mpq.config import load_config
from mpq.data import build_datasets, preprocess_of
from mpq.trainer import Trainer


def test_synthetic_images_are_seeded_shaped_and_class_dependent():
    info = build_datasets("synthetic", seed=3, synthetic={"shape": [3, 8, 8], "classes": 4, "size": [64, 16]})
    assert (len(info.train), len(info.val), info.num_classes, info.in_channels) == (64, 16, 4, 3)
    assert info.input_size == (1, 3, 8, 8)
    again = build_datasets("synthetic", seed=3, synthetic={"shape": [3, 8, 8], "classes": 4, "size": [64, 16]})
    other = build_datasets("synthetic", seed=4, synthetic={"shape": [3, 8, 8], "classes": 4, "size": [64, 16]})
    x, y = info.train[5]
    x2, y2 = again.train[5]
    assert x.shape == (3, 8, 8) and 0 <= y < 4
    assert torch.equal(x, x2) and y == y2                      # same seed, same sample
    assert not torch.equal(x, other.train[5][0])               # another seed, another sample
    assert not torch.equal(info.train[5][0], info.val[5][0])   # the splits differ
    # x = 0.5 * prototype[y] + N(0, 1): the class mean of many samples approaches 0.5 * prototype
    proto = info.train.prototypes
    xs = torch.stack([info.train[i][0] for i in range(64)])
    ys = torch.tensor([info.train[i][1] for i in range(64)])
    c = int(ys.mode().values)
    residual = xs[ys == c] - 0.5 * proto[c]
    assert abs(float(residual.mean())) < 0.15 and 0.8 < float(residual.std()) < 1.2
    assert torch.equal(info.val.prototypes, proto)             # the same classes in both splits
    assert preprocess_of("synthetic", synthetic_shape=[3, 8, 8])["input_size"] == [3, 8, 8]


def test_training_runs_on_synthetic_data(tmp_path):
    cfg = load_config(None, ["data.name=synthetic", "data.synthetic_shape=[3,16,16]", "data.synthetic_classes=5",
                             "data.synthetic_size=[96,32]", "data.train_subset=null", "data.batch_size=32",
                             "data.eval_batch_size=32", "model.name=resnet20", "train.epochs=1",
                             "eval.bn_recalib_batches=1", "eval.random_configs=0", "eval.uniform_bits=[4]",
                             f"output.dir={tmp_path}", "output.name=syn", "output.progress=false",
                             "train.device=cpu"])
    metrics = Trainer(cfg).fit()
    assert metrics["step"] == 3 and set(metrics["acc"]) == {"max", "min", "w4a4"}
    line = json.loads((tmp_path / "syn" / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(0.0 <= a <= 100.0 for a in line["acc"].values())
