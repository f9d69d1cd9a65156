"""Config loading, overrides and validation; the CLI's user-error contract."""
import glob
import os
import subprocess
import sys

import pytest
import yaml

from mpq import UserError
from mpq.cli import main
from mpq.config import DEFAULT_YAML, SCHEMA, dump_config, load_config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_embedded_default_is_the_one_default_yaml():
    """One copy: configs/default.yaml is a link to the package's mpq/default.yaml, which is what the
    embedded default reads."""
    from mpq.config import DEFAULT_CONFIG_FILE
    link = os.path.join(ROOT, "configs", "default.yaml")
    assert os.path.realpath(link) == os.path.realpath(DEFAULT_CONFIG_FILE)
    with open(link, encoding="utf-8") as f:
        assert f.read() == DEFAULT_YAML


def test_default_has_every_schema_key_and_validates():
    raw = yaml.safe_load(DEFAULT_YAML)
    assert set(raw) == set(SCHEMA)
    for section, fields in SCHEMA.items():
        assert set(raw[section]) == set(fields), section
    cfg = load_config()
    assert cfg["model"]["name"] == "small_mobilenet" and cfg["data"]["name"] == "fashion_mnist"


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg["quant"]["w_bits"]


def test_paper_configs_hyperparameters():
    cfg = load_config(os.path.join(ROOT, "configs", "imagenet_resnet18.yaml"))
    assert cfg["model"]["name"] == "resnet18" and cfg["data"]["name"] == "imagenet"
    assert cfg["quant"]["w_bits"] == [2, 3, 4, 5, 6] and cfg["quant"]["keep_8bit"] == ["first", "last"]
    assert cfg["distill"]["kd_weight"] == 0.5 and cfg["idm"]["weight"] == 0.01
    assert cfg["scheduler"]["enabled"] and cfg["train"]["num_random"] >= 1


def test_overrides_are_yaml_scalars_and_lists():
    cfg = load_config(None, ["train.epochs=2", "data.root=/data/imagenet", "quant.w_bits=[2,4]",
                             "train.lr=1e-3", "train.grad_clip=null", "distill.enabled=false",
                             "train.resume=auto"])
    assert cfg["train"]["epochs"] == 2 and cfg["data"]["root"] == "/data/imagenet"
    assert cfg["quant"]["w_bits"] == [2, 4] and cfg["train"]["lr"] == pytest.approx(1e-3)
    assert cfg["train"]["grad_clip"] is None and cfg["distill"]["enabled"] is False
    assert cfg["train"]["resume"] == "auto"


def test_config_file_merges_over_default(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 7\nquant:\n  bn: switchable\n")
    cfg = load_config(str(p), ["train.epochs=8"])
    assert cfg["train"]["epochs"] == 8 and cfg["quant"]["bn"] == "switchable"
    assert cfg["train"]["lr"] == load_config()["train"]["lr"]


def test_dump_roundtrip():
    cfg = load_config(None, ["data.root=/a b", "quant.a_bits=[3, 8]"])
    assert validate(yaml.safe_load(dump_config(cfg))) == cfg


@pytest.mark.parametrize("override, key, words", [
    (["train.foo=1"], "train.foo", "unknown config key"),
    (["bogus.lr=1"], "bogus", "unknown config section"),
    (["train.epochs=abc"], "train.epochs", "expected an integer"),
    (["train.epochs=2.5"], "train.epochs", "expected an integer"),
    (["distill.enabled=3"], "distill.enabled", "expected true or false"),
    (["train.lr=fast"], "train.lr", "expected a number"),
    (["quant.w_bits=[0, 2]"], "quant.w_bits", "bit-width 0 is not supported"),
    (["quant.a_bits=[2, 9]"], "quant.a_bits", "bit-width 9"),
    (["train.lr=-0.1"], "train.lr", "must be > 0, got -0.1"),
    (["quant.w_bits=[]"], "quant.w_bits", "must not be empty"),
    (["train.epochs=0"], "train.epochs", "must be > 0"),
    (["data.batch_size=0"], "data.batch_size", "must be > 0"),
    (["distill.kd_weight=1.5"], "distill.kd_weight", "must be in [0, 1]"),
    (["quant.bn=weird"], "quant.bn", "not allowed"),
    (["train.order=[max, min]"], "train.order", "must contain"),
    (["train.order=[min, random, max]"], "train.order", "'max' must come first"),
    (["train.micro_batches=3"], "train.micro_batches", "must divide"),
    (["model.name=null"], "model.name", "must not be null"),
    (["train.resume=3"], "train.resume", "expected false, 'auto'"),
    (["noequals"], "noequals", "expected section.key=value"),
])
def test_bad_values_are_refused_naming_the_key(override, key, words):
    with pytest.raises(UserError) as e:
        load_config(None, override)
    msg = str(e.value)
    assert msg.startswith(key) or f"{key!r}" in msg, msg
    assert words in msg, msg


def test_bad_file_key_and_missing_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 0.1\n  lrr: 0.2\n")
    with pytest.raises(UserError, match=r"^train\.lrr: unknown config key"):
        load_config(str(p))
    with pytest.raises(UserError, match="no such file"):
        load_config(str(tmp_path / "missing.yaml"))
    p.write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(str(p))


def test_cli_user_error_exit_2_one_line(capsys):
    assert main(["train.lr=-0.1"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: train.lr: must be > 0, got -0.1"
    assert main(["--config", "/nonexistent/x.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --config")


def test_cli_subprocess_no_traceback():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "quant.w_bits=[0]"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert r.stderr.startswith("error: quant.w_bits")


def test_cli_print_config(capsys):
    assert main(["--print-config", "train.epochs=5"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["train"]["epochs"] == 5
