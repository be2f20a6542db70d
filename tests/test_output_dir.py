"""A fresh run into an output directory that holds another run's checkpoints is refused before any work (mixing
them would let ``--resume auto`` pick the other run's newest step), unless ``train.overwrite_output_dir``."""

import pytest

from dist_sparse import checkpoint
from dist_sparse.config import from_dict
from dist_sparse.errors import ConfigError
from dist_sparse.trainer import _resume_target


def committed(root, step):
    d = checkpoint.step_dir(root, step)
    d.mkdir(parents=True)
    (d / checkpoint.MANIFEST).write_text("{}")
    (d / checkpoint.COMMIT_MARKER).write_text("")
    return d


def test_checkpoints_of_an_earlier_run_refuse_a_fresh_start(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    committed(root, 4)
    cfg = from_dict({"train": {"output_dir": str(tmp_path / "run")}})
    with pytest.raises(ConfigError, match="train.output_dir") as err:
        _resume_target(cfg, None, root)
    assert "step_00000004" in str(err.value) and "--resume auto" in str(err.value)
    assert _resume_target(cfg, "auto", root) == checkpoint.step_dir(root, 4)  # continuing it is fine


def test_overwrite_output_dir_deletes_them_first(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    committed(root, 4)
    cfg = from_dict({"train": {"output_dir": str(tmp_path / "run"), "overwrite_output_dir": True}})
    assert _resume_target(cfg, None, root) is None
    assert not root.exists()


def test_an_empty_or_uncommitted_directory_starts_fresh(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    checkpoint.step_dir(root, 2).mkdir(parents=True)  # a crash before the commit marker: not a checkpoint
    assert _resume_target(from_dict({}), None, root) is None
