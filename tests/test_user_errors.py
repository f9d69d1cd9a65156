"""Every class of user mistake, through both command lines: exit status 2, exactly one ``error:`` line
on stderr that names the input, the value and what is allowed, no traceback, nothing written into
the output folder and nothing deleted.

One table (``CASES``) covers the classes: config files, overrides, data files, pretrained files,
resume checkpoints, search checkpoints, budgets and search flags. The command lines run in-process
(``mpq.cli.main`` / ``search.cli.main``).
"""
import gzip
import os
import pickle
import struct

import pytest
import torch

import mpq.cli
import search.cli
from mpq.data import FASHION_MNIST_DIR, FASHION_MNIST_FILES
from support import make_checkpoint

ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0

# keeps a case that fails to fail fast (a few training steps on a small subset)
TRAIN_BASE = ["data.train_subset=256", "data.val_subset=128", "data.batch_size=64", "train.epochs=1",
              "output.progress=false", "eval.uniform_bits=[]", "eval.random_configs=0",
              "eval.bn_recalib_batches=1"]
SEARCH_BASE = ["--calib-size", "128", "--eval-size", "128", "--bn-batches", "1", "--batch-size", "128",
               "--quiet", "--no-export", "--no-compare-uniform", "--no-refine"]


class WritesMarker:
    """Unpickling this would create ``marker``: a pickle payload that runs code on load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _idx(dims, payload=b""):
    return b"\x00\x00\x08" + bytes([len(dims)]) + struct.pack(">" + "I" * len(dims), *dims) + payload


def _data_dir(base, name, images: bytes, gz=True):
    """A Fashion-MNIST folder whose training images are ``images`` (the other files: links to the
    real ones)."""
    d = base / name
    d.mkdir()
    for split in FASHION_MNIST_FILES.values():
        for f in split:
            if f != "train-images-idx3-ubyte.gz":
                os.symlink(os.path.join(FASHION_MNIST_DIR, f), d / f)
    (d / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(images) if gz else images)
    return str(d)


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """One folder of damaged inputs shared by all cases (read-only for them), plus a tiny supernet."""
    b = tmp_path_factory.mktemp("bad")
    ckpt = make_checkpoint(str(b / "supernet.pt"), steps=3)

    def w(name, text):
        (b / name).write_text(text)
        return str(b / name)

    w("invalid.yaml", "train: {epochs: 2\n")
    w("list.yaml", "- train\n- data\n")
    w("dup.yaml", "train:\n  epochs: 2\n  epochs: 3\n")
    w("unknown_key.yaml", "train:\n  epoch: 2\n")
    w("unknown_section.yaml", "trian:\n  epochs: 2\n")
    w("int_key.yaml", "train:\n  1: 2\n")
    w("section_scalar.yaml", "train: 5\n")
    w("wrong_type.yaml", "train:\n  momentum: [0.9]\n")
    w("python_tag.yaml", "train: !!python/object/apply:os.system [echo hi]\n")
    (b / "binary.yaml").write_bytes(b"\xff\xfe\x00\x80 not text")
    unreadable = w("unreadable.yaml", "train:\n  epochs: 1\n")
    os.chmod(unreadable, 0)
    (b / "folder").mkdir()
    # checkpoints and pretrained files
    (b / "empty.pt").write_bytes(b"")
    raw = open(ckpt, "rb").read()
    (b / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    w("text.pt", "this is not a checkpoint\n")
    torch.save({"format": "mpq-supernet", "spec": {}, "model": {},
                "payload": WritesMarker(str(b / "pwned"))}, str(b / "payload.pt"))
    with open(b / "plain_pickle.pt", "wb") as f:
        pickle.dump(WritesMarker(str(b / "pwned")), f, protocol=0)
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(10, 4)},
               str(b / "foreign_state_dict.pt"))
    torch.save([1, 2, 3], str(b / "list.pt"))
    ck = torch.load(ckpt, weights_only=True)
    spec = {**ck["spec"], "model": {**ck["spec"]["model"], "name": "no_such_model"}}
    torch.save({**ck, "spec": spec}, str(b / "unknown_model_spec.pt"))
    # damaged data folders
    _data_dir(b, "data_truncated", open(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz"),
                                        "rb").read(100_000), gz=False)
    _data_dir(b, "data_not_gzip", b"hello, not gzip at all", gz=False)
    _data_dir(b, "data_short", _idx((100, 28, 28), b"\x00" * 1000))
    _data_dir(b, "data_shape", _idx((100, 14, 56), b"\x00" * (100 * 14 * 56)))
    _data_dir(b, "data_header", b"\x00\x00\x08\x03\x00\x00")
    _data_dir(b, "data_magic", b"\x01\x02\x03\x04" + b"\x00" * 100)
    return b, ckpt


def _snapshot(folder):
    out = {}
    for r, ds, fs in os.walk(folder):
        for x in ds + fs:
            p = os.path.join(r, x)
            out[os.path.relpath(p, folder)] = os.lstat(p).st_size
    return out


# (id, command line, arguments, substrings the one error line must hold, marks)
# placeholders: {b} damaged-inputs folder, {ckpt} the tiny supernet, {data} the Fashion-MNIST folder
CASES = [
    # --- config files ---------------------------------------------------------------------------
    ("config-missing", "train", ["--config", "{b}/nope.yaml"], ["--config", "nope.yaml", "no such file"]),
    ("config-folder", "train", ["--config", "{b}/folder"], ["--config", "folder", "is a folder"]),
    ("config-unreadable", "train", ["--config", "{b}/unreadable.yaml"], ["--config", "cannot read"],
     [pytest.mark.skipif(ROOT_USER, reason="root reads files whatever their mode")]),
    ("config-binary", "train", ["--config", "{b}/binary.yaml"], ["--config", "binary.yaml", "cannot read"]),
    ("config-invalid-yaml", "train", ["--config", "{b}/invalid.yaml"], ["--config", "not valid YAML"]),
    ("config-python-tag", "train", ["--config", "{b}/python_tag.yaml"], ["--config", "not valid YAML"]),
    ("config-list", "train", ["--config", "{b}/list.yaml"], ["list.yaml", "expected a mapping", "list"]),
    ("config-duplicate-key", "train", ["--config", "{b}/dup.yaml"], ["dup.yaml", "duplicate key 'epochs'"]),
    ("config-section-scalar", "train", ["--config", "{b}/section_scalar.yaml"],
     ["train", "expected a mapping", "int"]),
    ("config-wrong-type", "train", ["--config", "{b}/wrong_type.yaml"],
     ["train.momentum", "expected a number", "[0.9]"]),
    ("config-unknown-key", "train", ["--config", "{b}/unknown_key.yaml"],
     ["train.epoch", "unknown config key", "did you mean 'epochs'"]),
    ("config-unknown-section", "train", ["--config", "{b}/unknown_section.yaml"],
     ["trian", "unknown config section", "did you mean 'train'"]),
    ("config-int-key", "train", ["--config", "{b}/int_key.yaml"], ["train.1", "unknown config key"]),
    # --- overrides: syntax, types, ranges, choices ----------------------------------------------
    ("override-no-equals", "train", ["train.epochs"], ["train.epochs", "section.key=value"]),
    ("override-no-section", "train", ["epochs=2"], ["epochs", "section.key"]),
    ("override-unknown-key", "train", ["train.epoch=2"], ["train.epoch", "did you mean 'epochs'"]),
    ("override-unknown-section", "train", ["trian.epochs=2"], ["trian", "did you mean 'train'"]),
    ("override-bad-yaml", "train", ["quant.w_bits=[2,3"], ["quant.w_bits", "expected a list", "[2,3"]),
    ("override-str-for-int", "train", ["train.epochs=two"], ["train.epochs", "expected an integer", "'two'"]),
    ("override-bool-for-int", "train", ["train.epochs=true"], ["train.epochs", "expected an integer", "True"]),
    ("override-list-for-float", "train", ["train.lr=[1,2]"], ["train.lr", "expected a number", "[1, 2]"]),
    ("override-nan", "train", ["train.lr=.nan"], ["train.lr", "finite", "nan"]),
    ("override-negative-epochs", "train", ["train.epochs=-1"], ["train.epochs", "must be > 0", "-1"]),
    ("override-negative-lr", "train", ["train.lr=-0.1"], ["train.lr", "must be > 0", "-0.1"]),
    ("override-batch-0", "train", ["data.batch_size=0"], ["data.batch_size", "must be > 0", "0"]),
    ("override-bits-1", "train", ["quant.w_bits=[1,2]"], ["quant.w_bits", "bit-width 1", "allowed"]),
    ("override-bits-9", "train", ["quant.a_bits=[9]"], ["quant.a_bits", "bit-width 9", "allowed"]),
    ("override-bits-33", "train", ["quant.w_bits=33"], ["quant.w_bits", "bit-width 33", "allowed"]),
    ("override-bad-choice", "train", ["quant.bn=foo"], ["quant.bn", "'foo'", "allowed: ['shared', 'switchable']"]),
    ("override-seed-overflow", "train", ["train.seed=99999999999999999999"], ["train.seed", "must be in [0,"]),
    ("override-workers-huge", "train", ["data.workers=100000"], ["data.workers", "100000", "[0, 256]"]),
    ("override-unknown-model", "train", ["model.name=resnet_18"],
     ["model.name", "'resnet_18'", "did you mean 'resnet18'"]),
    ("override-num-classes-too-few", "train", ["model.num_classes=5"],
     ["model.num_classes", "5", "at least 10"]),
    ("override-output-name-path", "train", ["output.name=a/b"], ["output.name", "'a/b'", "plain folder name"]),
    ("override-device-cuda-no-gpu", "train", ["train.device=cuda"], ["train.device", "cuda"],
     [pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")]),
    ("override-resume-bool", "train", ["train.resume=true"], ["train.resume", "True", "'auto'"]),
    ("unknown-option", "train", ["--frobnicate"], ["--frobnicate"]),
    # --- values larger than the data ------------------------------------------------------------
    ("train-subset-larger-than-data", "train", ["data.train_subset=10000000"],
     ["data.train_subset", "10000000", "60000"]),
    ("val-subset-larger-than-data", "train", ["data.val_subset=10000000"],
     ["data.val_subset", "10000000", "10000"]),
    ("batch-larger-than-data", "train", ["data.batch_size=512"], ["data.batch_size", "512", "256 samples"]),
    # --- data files -----------------------------------------------------------------------------
    ("data-root-missing", "train", ["data.root={b}/nope"], ["data.root", "nope", "no such folder"]),
    ("data-root-file", "train", ["data.root={b}/text.pt"], ["data.root", "text.pt", "not a folder"]),
    ("data-root-empty-folder", "train", ["data.root={b}/folder"], ["data.root", "not found"]),
    ("data-truncated-gzip", "train", ["data.root={b}/data_truncated"],
     ["data.root", "train-images-idx3-ubyte.gz", "cannot be read"]),
    ("data-not-gzip", "train", ["data.root={b}/data_not_gzip"], ["data.root", "cannot be read", "gzip"]),
    ("data-truncated-idx", "train", ["data.root={b}/data_short"], ["data.root", "truncated", "78400"]),
    ("data-idx-header-cut", "train", ["data.root={b}/data_header"], ["data.root", "IDX header"]),
    ("data-not-idx", "train", ["data.root={b}/data_magic"], ["data.root", "not an unsigned-byte IDX file"]),
    ("data-wrong-shape", "train", ["data.root={b}/data_shape"], ["data.root", "(100, 14, 56)", "(N, 28, 28)"]),
    ("cifar-missing", "train", ["data.name=cifar10", "model.name=resnet20", "data.root={b}/nope"],
     ["data.root", "no such folder"]),
    ("cifar-empty-folder", "train", ["data.name=cifar10", "model.name=resnet20", "data.root={b}/folder"],
     ["data.root", "cifar-10-batches-py", "not found"]),
    ("imagenet-empty-folder", "train", ["data.name=imagenet", "model.name=resnet18", "data.root={b}/folder"],
     ["data.root", "train", "ImageFolder"]),
    # --- pretrained files -----------------------------------------------------------------------
    ("pretrained-missing", "train", ["model.pretrained={b}/nope.pt"], ["model.pretrained", "nope.pt", "no such file"]),
    ("pretrained-folder", "train", ["model.pretrained={b}/folder"], ["model.pretrained", "is a folder"]),
    ("pretrained-empty", "train", ["model.pretrained={b}/empty.pt"], ["model.pretrained", "empty"]),
    ("pretrained-truncated", "train", ["model.pretrained={b}/truncated.pt"],
     ["model.pretrained", "truncated or corrupted"]),
    ("pretrained-text", "train", ["model.pretrained={b}/text.pt"], ["model.pretrained", "not a PyTorch checkpoint"]),
    ("pretrained-pickle-payload", "train", ["model.pretrained={b}/payload.pt"],
     ["model.pretrained", "refused: not a weights-only checkpoint"]),
    ("pretrained-other-model", "train", ["model.pretrained={b}/foreign_state_dict.pt"],
     ["model.pretrained", "does not fit model 'small_mobilenet'", "missing key"]),
    ("pretrained-a-supernet", "train", ["model.pretrained={ckpt}"], ["model.pretrained", "supernet checkpoint"]),
    ("pretrained-not-a-dict", "train", ["model.pretrained={b}/list.pt"], ["model.pretrained", "does not hold a dict"]),
    # --- resume checkpoints ---------------------------------------------------------------------
    ("resume-missing", "train", ["train.resume={b}/nope.pt"], ["train.resume", "no such file"]),
    ("resume-folder", "train", ["train.resume={b}/folder"], ["train.resume", "is a folder"]),
    ("resume-empty", "train", ["train.resume={b}/empty.pt"], ["train.resume", "empty"]),
    ("resume-truncated", "train", ["train.resume={b}/truncated.pt"], ["train.resume", "truncated or corrupted"]),
    ("resume-pickle-payload", "train", ["train.resume={b}/payload.pt"],
     ["train.resume", "refused: not a weights-only checkpoint"]),
    ("resume-plain-pickle", "train", ["train.resume={b}/plain_pickle.pt"],
     ["train.resume", "refused: not a weights-only checkpoint"]),
    ("resume-foreign", "train", ["train.resume={b}/foreign_state_dict.pt"],
     ["foreign_state_dict.pt", "not an mpq supernet checkpoint"]),
    ("resume-other-model", "train", ["train.resume={ckpt}"], ["different supernet", "model.name"]),
    # --- search checkpoints ---------------------------------------------------------------------
    ("checkpoint-missing", "search", ["--checkpoint", "{b}/nope.pt"], ["checkpoint", "nope.pt", "no such file"]),
    ("checkpoint-folder", "search", ["--checkpoint", "{b}/folder"], ["checkpoint", "is a folder"]),
    ("checkpoint-empty", "search", ["--checkpoint", "{b}/empty.pt"], ["checkpoint", "empty"]),
    ("checkpoint-truncated", "search", ["--checkpoint", "{b}/truncated.pt"], ["checkpoint", "truncated or corrupted"]),
    ("checkpoint-text", "search", ["--checkpoint", "{b}/text.pt"], ["checkpoint", "not a PyTorch checkpoint"]),
    ("checkpoint-pickle-payload", "search", ["--checkpoint", "{b}/payload.pt"],
     ["checkpoint", "refused: not a weights-only checkpoint", "open"]),
    ("checkpoint-plain-pickle", "search", ["--checkpoint", "{b}/plain_pickle.pt"],
     ["checkpoint", "refused: not a weights-only checkpoint"]),
    ("checkpoint-foreign-state-dict", "search", ["--checkpoint", "{b}/foreign_state_dict.pt"],
     ["checkpoint", "not an mpq supernet checkpoint", "plain model state_dict"]),
    ("checkpoint-not-a-dict", "search", ["--checkpoint", "{b}/list.pt"], ["checkpoint", "does not hold a dict"]),
    ("checkpoint-unknown-model", "search", ["--checkpoint", "{b}/unknown_model_spec.pt"],
     ["checkpoint", "invalid model spec", "'no_such_model'"]),
    # --- budgets --------------------------------------------------------------------------------
    ("budget-garbage", "search", ["--checkpoint", "{ckpt}", "--budget", "garbage"], ["budget", "'garbage'", "accepted formats"]),
    ("budget-negative", "search", ["--checkpoint", "{ckpt}", "--budget=-1G"], ["budget", "'-1G'", "negative"]),
    ("budget-zero", "search", ["--checkpoint", "{ckpt}", "--budget", "0"], ["budget", "'0'", "above 0"]),
    ("budget-spaces", "search", ["--checkpoint", "{ckpt}", "--budget", "3 GB"], ["budget", "'3 GB'", "spaces"]),
    ("budget-below-minimum", "search", ["--checkpoint", "{ckpt}", "--budget", "1K"],
     ["budget '1K'", "below the minimum achievable"]),
    ("budget-size-garbage", "search", ["--checkpoint", "{ckpt}", "--budget-size", "lots"], ["budget", "'lots'"]),
    ("budget-size-wrong-kind", "search", ["--checkpoint", "{ckpt}", "--budget-size", "22.8G"],
     ["budget", "'22.8G'", "size budget is expected"]),
    ("budget-size-below-minimum", "search", ["--checkpoint", "{ckpt}", "--budget-size", "100B"],
     ["budget '100B'", "minimum achievable size"]),
    ("budget-ratio-above-1", "search", ["--checkpoint", "{ckpt}", "--budget-ratio", "1.5"],
     ["budget", "'1.5'", "(0, 1]"]),
    ("budget-ratio-negative", "search", ["--checkpoint", "{ckpt}", "--budget-ratio=-0.2"], ["budget", "'-0.2'"]),
    ("budgets-bad-element", "search", ["--checkpoint", "{ckpt}", "--budgets", "1G,garbage"], ["budget", "'garbage'"]),
    ("budgets-empty-element", "search", ["--checkpoint", "{ckpt}", "--budgets", "1G,,2G"], ["budget", "empty"]),
    ("budgets-with-budget", "search", ["--checkpoint", "{ckpt}", "--budgets", "1G", "--budget", "1G"],
     ["--budgets", "--budget"]),
    # --- search flags ---------------------------------------------------------------------------
    ("calib-size-negative", "search", ["--checkpoint", "{ckpt}", "--calib-size", "-5"], ["--calib-size", "-5"]),
    ("calib-size-not-int", "search", ["--checkpoint", "{ckpt}", "--calib-size", "1.5"], ["--calib-size", "'1.5'"]),
    ("calib-size-larger-than-data", "search", ["--checkpoint", "{ckpt}", "--calib-size", "100000"],
     ["--calib-size", "100000"]),
    ("eval-size-larger-than-data", "search", ["--checkpoint", "{ckpt}", "--eval-size", "1000000"],
     ["--eval-size", "1000000", "10000"]),
    ("batch-size-0", "search", ["--checkpoint", "{ckpt}", "--batch-size", "0"], ["--batch-size", "0"]),
    ("bn-batches-negative", "search", ["--checkpoint", "{ckpt}", "--bn-batches", "-1"], ["--bn-batches", "-1"]),
    ("top-k-0", "search", ["--checkpoint", "{ckpt}", "--top-k", "0"], ["--top-k", "0"]),
    ("margin-negative", "search", ["--checkpoint", "{ckpt}", "--margin", "-1"], ["--margin", "-1"]),
    ("margin-nan", "search", ["--checkpoint", "{ckpt}", "--margin", "nan"], ["--margin", "nan"]),
    ("strategy-bad-choice", "search", ["--checkpoint", "{ckpt}", "--strategy", "slow"], ["--strategy", "'slow'"]),
    ("device-garbage", "search", ["--checkpoint", "{ckpt}", "--device", "garbage"], ["--device", "'garbage'"]),
    ("device-cuda-no-gpu", "search", ["--checkpoint", "{ckpt}", "--device", "cuda"], ["--device", "'cuda'"],
     [pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")]),
    ("data-root-flag-missing", "search", ["--checkpoint", "{ckpt}", "--data-root", "{b}/nope"],
     ["no such folder", "nope"]),
    ("data-root-flag-damaged", "search", ["--checkpoint", "{ckpt}", "--data-root", "{b}/data_shape"],
     ["(100, 14, 56)"]),
    ("data-name-unknown", "search", ["--checkpoint", "{ckpt}", "--data-name", "mnist"], ["data.name", "'mnist'"]),
    ("out-is-a-file", "search", ["--checkpoint", "{ckpt}", "--out", "{b}/text.pt"], ["--out", "not a folder"]),
    # need search/cli.py: today a traceback, a silent default or a message without the flag's name
    ("seed-overflow", "search", ["--checkpoint", "{ckpt}", "--seed", "99999999999999999999"], ["--seed"],
     []),
    ("device-meta", "search", ["--checkpoint", "{ckpt}", "--device", "meta"], ["--device", "'meta'"],
     []),
    ("device-empty", "search", ["--checkpoint", "{ckpt}", "--device", ""], ["--device", "''"],
     []),
    ("data-root-flag-named", "search", ["--checkpoint", "{ckpt}", "--data-root", "{b}/nope"],
     ["--data-root", "no such folder"],
     []),
]


def _params():
    out = []
    for case in CASES:
        name, cli, argv, expect = case[:4]
        marks = case[4] if len(case) > 4 else []
        out.append(pytest.param(cli, argv, expect, id=name, marks=marks))
    return out


@pytest.mark.parametrize("cli, argv, expect", _params())
def test_user_error_exits_2_with_one_line(cli, argv, expect, bad, tmp_path, capsys):
    b, ckpt = bad
    fill = lambda s: s.format(b=b, ckpt=ckpt, data=FASHION_MNIST_DIR)  # noqa: E731
    argv = [fill(a) for a in argv]
    out = tmp_path / "out"
    out.mkdir()
    before = _snapshot(b)
    if cli == "train":
        rc = mpq.cli.main([*TRAIN_BASE, f"output.dir={out}", *argv])
    else:
        where = [] if "--out" in argv else ["--out", str(out / "search")]
        rc = search.cli.main([*SEARCH_BASE, *where, *argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for piece in expect:
        assert fill(piece) in lines[0], (piece, lines[0])
    assert _snapshot(out) == {}, "something was written into the output folder"
    assert _snapshot(b) == before, "an input was changed or deleted"
    assert not (b / "pwned").exists(), "a pickle payload ran"
