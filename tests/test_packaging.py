"""What ``pip install`` puts in site-packages: every package of the source tree, ``kernels/`` as
``dist_sparse.kernels`` (no generic top-level ``kernels`` package), and the DeepSpeed range the patches state."""

import tomllib

from tests.distributed_utils import ROOT


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_is_installed_and_kernels_live_under_dist_sparse():
    cfg = _setuptools()
    packages = set(cfg["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "dist_sparse").rglob("__init__.py")}
    missing = on_disk - packages
    assert not missing, f"packages missing from pyproject.toml's [tool.setuptools] packages: {sorted(missing)}"
    assert "dist_sparse.kernels" in packages and not any(p.split(".")[0] != "dist_sparse" for p in packages)
    assert cfg["package-dir"] == {"dist_sparse.kernels": "kernels"} and (ROOT / "kernels" / "__init__.py").is_file()


def test_kernels_import_as_dist_sparse_kernels():
    import dist_sparse.kernels.block_sparse_attn as bsa

    assert hasattr(bsa, "reference_block_sparse_attention")
