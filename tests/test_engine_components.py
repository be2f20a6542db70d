"""The step as components: one schedule decides each step's kind, DeepSpeed patches are installed in one place and
version-checked, names are validated against registries that user plugins extend, method hooks beyond the two
scores (masked forward over dense weights, a gradient term), and imports that only go downward."""

import json
import os
import subprocess
import sys

import pytest
import tomllib
import torch
from safetensors.torch import load_file

from dist_sparse import config as C
from dist_sparse.config import SparsityConfig
from dist_sparse.errors import ConfigError
from dist_sparse.integration import patches
from dist_sparse.methods import build_method
from dist_sparse.sparsifier import Sparsifier
from dist_sparse.step import StepSchedule
from tests.distributed_utils import ROOT, dist_sparse_train
from tests.fakes import TensorView

PLUGIN = "tests.plugin_method"


@pytest.fixture
def plugin_method():
    """The plugin imported for one test and unregistered after it (other tests see only the built-in names)."""
    import importlib

    from dist_sparse import distributions
    from dist_sparse.compression.base import COMPRESSORS
    from dist_sparse.methods import METHODS

    module = importlib.import_module(PLUGIN)
    yield module
    for registry, names in ((METHODS, (module.NAME, "plugin_straight_through")), (COMPRESSORS, ("plugin_topk",)),
                            (distributions.DISTRIBUTIONS, ("plugin_half",))):
        for name in names:
            registry.pop(name, None)
    sys.modules.pop(PLUGIN, None)


# -- DeepSpeed versions and patches ----------------------------------------------------------------------------------
def test_untested_deepspeed_is_refused_naming_both_versions(monkeypatch):
    monkeypatch.delenv(patches.ALLOW_UNTESTED_ENV, raising=False)
    assert patches.check_deepspeed_version("0.19.8") == "0.19.8"
    for other in ("0.19.9", "0.20.0", "0.18.2", "1.0.0"):
        with pytest.raises(patches.UntestedDeepSpeedError) as err:
            patches.check_deepspeed_version(other)
        assert other in str(err.value) and ">=0.19.8,<0.19.9" in str(err.value)
        assert patches.ALLOW_UNTESTED_ENV in str(err.value)


def test_override_turns_the_refusal_into_a_warning(monkeypatch, caplog):
    monkeypatch.setenv(patches.ALLOW_UNTESTED_ENV, "1")
    with caplog.at_level("WARNING", logger="dist_sparse"):
        assert patches.check_deepspeed_version("0.21.0") == "0.21.0"
    assert "0.21.0" in caplog.text and "results may be wrong" in caplog.text


def test_installed_deepspeed_is_tested_and_pyproject_states_the_range():
    from importlib import metadata

    patches.check_deepspeed_version(metadata.version("deepspeed"))
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"deepspeed{patches.tested_range()}" in deps


def test_every_entry_point_checks_the_version(monkeypatch, capsys):
    """``dist-sparse train`` refuses an untested DeepSpeed before launching ranks; ``import_deepspeed`` (behind
    ``dist_sparse.initialize``, the Trainer and accelerate adapters) and ``attach`` refuse it too."""
    from dist_sparse.cli import train as train_cli
    from dist_sparse.integration import deepspeed as ds
    from dist_sparse.integration import engine

    monkeypatch.delenv(patches.ALLOW_UNTESTED_ENV, raising=False)
    monkeypatch.setattr(patches.metadata, "version", lambda name: "0.99.0")
    assert train_cli.main([str(ROOT / "configs" / "demo.yaml"), "--nproc", "2", "--set", "train.steps=1"]) == 2
    assert "DeepSpeed 0.99.0 is installed" in capsys.readouterr().err
    with pytest.raises(patches.UntestedDeepSpeedError, match="0.99.0"):
        ds.import_deepspeed()
    with pytest.raises(patches.UntestedDeepSpeedError, match="0.99.0"):
        engine.attach(None, None, SparsityConfig())


def test_zero_support_check_answers_listed_optimizers_without_importing_muon():
    """The engine's ZeRO optimizer check answers a listed optimizer from DeepSpeed's list (no import of its Muon
    optimizer, whose torch.compile decorators cost seconds per process) and gives DeepSpeed's answer for others.
    In a fresh interpreter: another test in this process may have imported Muon already."""
    code = """
import sys, torch
from dist_sparse.integration.deepspeed import import_deepspeed, init_distributed
init_distributed()  # one process (DeepSpeed's own check asks for the rank)
from deepspeed.runtime import engine
from deepspeed.runtime.zero import utils
w = [torch.nn.Parameter(torch.zeros(2))]
MUON = "deepspeed.runtime.zero.muon.muon_optimizer"
assert engine.is_zero_supported_optimizer(torch.optim.AdamW(w)) is True
assert MUON not in sys.modules
assert engine.is_zero_supported_optimizer(torch.optim.SGD(w, lr=0.1)) is False
assert MUON in sys.modules  # an unlisted optimizer: DeepSpeed's own check ran (and imported Muon)
import_deepspeed()  # installed once per process, recorded
assert len(patches_of(engine)) == 1, patches_of(engine)
"""
    prelude = "from dist_sparse.integration.patches import installed as patches_of\n"
    proc = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_replace_records_and_refuses_a_missing_method():
    class Opt:
        def step(self):
            return "original"

    opt = Opt()
    original = patches.replace(opt, "step", lambda: "new", by="a test")
    assert opt.step() == "new" and original() == "original"
    (rec,) = patches.installed(opt)
    assert (rec.owner, rec.attribute, rec.by) == ("Opt", "step", "a test")
    with pytest.raises(patches.UntestedDeepSpeedError, match="renamed_in_a_later_release"):
        patches.replace(opt, "renamed_in_a_later_release", lambda: None, by="a test")


# -- registries and plugins --------------------------------------------------------------------------------------------
def test_plugin_names_are_valid_in_a_config(plugin_method):
    cfg = C.from_dict({"plugins": ["tests.plugin_method"],
                       "sparsity": {"method": plugin_method.NAME, "distribution": "plugin_half"},
                       "compression": {"method": "plugin_topk"}})
    assert cfg.sparsity.method == plugin_method.NAME and cfg.plugins == ["tests.plugin_method"]
    assert cfg.to_dict()["plugins"] == ["tests.plugin_method"]


def test_without_the_plugin_the_names_are_unknown():
    """In a fresh process (nothing registered yet) the plugin's names are config errors naming the key."""
    code = ("from dist_sparse import config as C\n"
            "from dist_sparse.errors import ConfigError\n"
            "for raw, key in (({'sparsity': {'method': 'plugin_magnitude_once'}}, 'sparsity.method'),\n"
            "                 ({'sparsity': {'distribution': 'plugin_half'}}, 'sparsity.distribution'),\n"
            "                 ({'compression': {'method': 'plugin_topk'}}, 'compression.method')):\n"
            "    try:\n"
            "        C.from_dict(raw)\n"
            "    except ConfigError as e:\n"
            "        assert e.key == key, e\n"
            "    else:\n"
            "        raise SystemExit('accepted ' + key)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_plugin_that_cannot_be_imported_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        C.from_dict({"plugins": ["tests.no_such_plugin"]})
    assert err.value.key == "plugins[0]" and "tests.no_such_plugin" in str(err.value)
    with pytest.raises(ConfigError) as err:
        C.from_dict({"plugins": "tests.plugin_method"})
    assert err.value.key == "plugins"


def test_the_python_api_accepts_a_registered_class(plugin_method):
    cfg = SparsityConfig(method=plugin_method.MagnitudeOnce)
    cfg.check("sparsity")
    assert cfg.method == plugin_method.NAME

    class Unregistered(plugin_method.MagnitudeOnce):
        name = "never_registered"

    with pytest.raises(ConfigError) as err:
        SparsityConfig(method=Unregistered).check("sparsity")
    assert err.value.key == "sparsity.method"


def test_a_plugin_method_runs_through_the_sparsifier(plugin_method):
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    view = TensorView("layer.weight", weight)
    cfg = SparsityConfig(method=plugin_method.NAME, sparsity=0.75, distribution="uniform")
    sp = Sparsifier(build_method(cfg, {"layer.weight": (8, 16)}, total_steps=10, seed=0), [view])
    expect = weight.abs().view(-1) >= weight.abs().view(-1).kthvalue(128 - 32 + 1).values
    sp.initialize()
    assert torch.equal(sp.mask("layer.weight"), expect)  # the 32 largest |w|


# -- the schedule decides, once --------------------------------------------------------------------------------------
def test_step_plans_from_the_schedule():
    def schedule(method, **kw):
        cfg = SparsityConfig(method=method, sparsity=0.5, distribution="uniform", update_interval=5, end_step=50, **kw)
        return StepSchedule(build_method(cfg, {"w": (4, 4)}, total_steps=None, seed=0))

    rigl = schedule("rigl", grow_grad_steps=3)
    plans = {s: rigl.plan(s) for s in range(1, 11)}
    assert [s for s, p in plans.items() if p.mask_update] == [5, 10]
    assert [s for s, p in plans.items() if p.dense_grad] == [3, 4, 5, 8, 9, 10]  # the growth window
    assert all(p.skip_optimizer_step == p.replaces_optimizer_step == p.mask_update for p in plans.values())
    gmp = schedule("magnitude")
    assert gmp.plan(5).mask_update and not gmp.plan(5).dense_grad and not gmp.plan(5).skip_optimizer_step
    dense = StepSchedule(None)
    assert not any(dense.plan(s).mask_update or dense.plan(s).dense_grad for s in range(20))


# -- method hooks beyond the scores ---------------------------------------------------------------------------------
def test_grad_deltas_and_dense_weights_through_the_sparsifier(plugin_method):
    g = torch.Generator().manual_seed(1)
    weight, grad = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    view = TensorView("layer.weight", weight, grad)
    cfg = SparsityConfig(method="plugin_straight_through", sparsity=0.75, distribution="uniform")
    sp = Sparsifier(build_method(cfg, {"layer.weight": (8, 16)}, total_steps=10, seed=0), [view])
    sp.initialize()
    mask = sp.mask("layer.weight")
    assert bool((weight.view(-1)[~mask] != 0).all())  # dense weights: pruned masters are kept
    before_w, before_g = weight.clone().view(-1), grad.clone().view(-1)
    sp.before_step(sp.schedule.plan(3))
    expect = before_g + (~mask).float() * before_w * plugin_method.StraightThroughDecay.decay
    assert torch.equal(grad.view(-1), expect)  # the method's term added; pruned gradients not zeroed
    weight.add_(1.0)
    sp.after_optimizer_step()
    assert bool((weight.view(-1)[~mask] != 0).all())  # not masked after the optimizer step


@pytest.mark.slow
def test_plugin_straight_through_method_trains_dense_masters_under_deepspeed(tmp_path):
    """Through ``dist-sparse train`` on 2 ranks, ZeRO-2: every rank imports the plugin named in the config; the
    straight-through method keeps training the pruned master weights (they are nonzero in the checkpoint), while
    the exported model, like every forward, sees them masked."""
    out = tmp_path / "run"
    dist_sparse_train(out, ["plugins=[tests.plugin_method]", "sparsity.method=plugin_straight_through",
                            "sparsity.sparsity=0.75", "train.steps=4", "train.save_final_model=true",
                            "deepspeed.zero_optimization.stage=2", "model.n_layer=1", "model.n_embd=32",
                            "model.n_head=2", "model.block_size=32", "train.eval_batches=2"], nproc=2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "plugin_straight_through" and abs(summary["achieved_sparsity"] - 0.75) < 0.01
    from dist_sparse.masks.io import load_masks
    from dist_sparse.masks.packing import unpack_bits

    masks = load_masks(out / "final")
    weights = load_file(str(out / "final" / "model.safetensors"))
    ckpt = sorted((out / "checkpoints").glob("step_*"))[-1]
    pruned_masters = 0
    for rank_file in sorted(ckpt.glob("rank_*.safetensors")):
        shard = load_file(str(rank_file))
        for name in masks:
            master = shard[f"{name}::master"]
            bits = shard[f"{name}::mask"]

            keep = unpack_bits(bits, master.numel())
            pruned_masters += int((master[~keep] != 0).sum())
    assert pruned_masters > 0, "pruned master weights were zeroed: the masters are not trained dense"
    for name, mask in masks.items():
        assert name in weights, name
        w = weights[name].reshape(mask.shape)
        assert bool((w[~mask.bool()] == 0).all()), f"{name}: the exported model is not masked"


# -- imports go downward --------------------------------------------------------------------------------------------
def test_no_import_circles():
    tool = ROOT.parent / "shared" / "tools" / "import_circles.py"
    if not tool.is_file():
        pytest.skip(f"{tool} is absent")
    proc = subprocess.run([sys.executable, str(tool), str(ROOT / "dist_sparse")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
