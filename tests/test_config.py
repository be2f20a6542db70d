"""Config errors: every bad input is a ConfigError naming the key path, raised before any process group starts."""

import json

import pytest
import torch.distributed as dist

from dist_sparse import config as C
from dist_sparse.cli import train as train_cli
from dist_sparse.errors import ConfigError


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("override,key", [
    ("sparsity.sparsity=1.5", "sparsity.sparsity"),
    ("sparsity.sparsity=-0.1", "sparsity.sparsity"),
    ("sparsity.sparsity=1.0", "sparsity.sparsity"),
    ("sparsity.sparsity=.nan", "sparsity.sparsity"),
    ("sparsity.sparsity='0.5'", "sparsity.sparsity"),
    ("sparsity.method=lottery", "sparsity.method"),
    ("sparsity.distribution=ER", "sparsity.distribution"),
    ("train.stepz=3", "train.stepz"),
    ("train.steps=ten", "train.steps"),
    ("train.steps=true", "train.steps"),
    ("model.n_embd=130", "model.n_embd"),
    ("data.path=/nonexistent/file.txt", "data.path"),
    ("deepspeed.zero_optimization.stage=4", "deepspeed.zero_optimization.stage"),
    ("deepspeed.train_micro_batch_size_per_gpu=0", "deepspeed.train_micro_batch_size_per_gpu"),
    ("optimizer.lr=3", "optimizer.lr"),
])
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as err:
        C.load(None, [override])
    assert err.value.key == key
    assert key in str(err.value)


def test_sparsity_string_in_a_file(tmp_path):
    p = write(tmp_path, "sparsity:\n  method: rigl\n  sparsity: '0.5'\n")
    with pytest.raises(ConfigError, match=r"sparsity\.sparsity: expected float, got str"):
        C.load(p)


def test_duplicate_keys_yaml_and_json(tmp_path):
    with pytest.raises(ConfigError) as err:
        C.load(write(tmp_path, "train:\n  steps: 3\n  steps: 4\n"))
    assert err.value.key == "steps" and "duplicate" in str(err.value)
    with pytest.raises(ConfigError) as err:
        C.load(write(tmp_path, '{"sparsity": {"method": "rigl", "method": "set"}}', "c.json"))
    assert err.value.key == "method" and "duplicate" in str(err.value)


def test_unknown_section_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown section"):
        C.load(write(tmp_path, "trian:\n  steps: 3\n"))
    with pytest.raises(ConfigError, match="not found"):
        C.load(tmp_path / "nope.yaml")


def test_overrides_apply_and_parse_types(tmp_path):
    p = write(tmp_path, "sparsity:\n  method: static\n")
    cfg = C.load(p, ["sparsity.method=rigl", "sparsity.sparsity=0.9", "sparsity.distribution=erk",
                     "train.steps=300", "train.output_dir=/tmp/x", "deepspeed.zero_optimization.stage=2",
                     "train.seed=0", "deepspeed.bf16.enabled=true"])
    assert cfg.sparsity.method == "rigl" and cfg.sparsity.sparsity == 0.9 and cfg.train.steps == 300
    assert cfg.zero_stage == 2 and cfg.deepspeed["bf16"] == {"enabled": True}
    assert cfg.to_dict()["sparsity"]["distribution"] == "erk"


def test_demo_config_is_valid():
    cfg = C.load("configs/demo.yaml")
    assert cfg.sparsity.method == "rigl" and cfg.sparsity.sparsity == 0.9 and cfg.zero_stage == 2


def test_plain_deepspeed_json_with_sparsity_block(tmp_path):
    p = write(tmp_path, json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 1},
                                    "sparsity": {"method": "rigl", "sparsity": 0.8}}), "ds.json")
    ds, sp, comp = C.split_deepspeed_json(p)  # (compression: off unless the file has a block)
    assert "sparsity" not in ds and ds["zero_optimization"]["stage"] == 1
    assert sp.method == "rigl" and sp.sparsity == 0.8 and comp.method == "none"
    with pytest.raises(ConfigError) as err:
        C.split_deepspeed_json({"sparsity": {"sparsity": 2}})
    assert err.value.key == "sparsity.sparsity"


def test_cli_reports_config_error_before_any_process_group(tmp_path, capsys):
    p = write(tmp_path, "sparsity:\n  sparsity: 1.5\n")
    assert train_cli.main([str(p), "--nproc", "2"]) == 2
    assert "sparsity.sparsity" in capsys.readouterr().err
    assert not dist.is_initialized()
