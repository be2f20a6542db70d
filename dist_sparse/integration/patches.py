"""Every change dist_sparse makes to DeepSpeed's objects, installed in one place, recorded, version-checked.

dist_sparse works *inside* DeepSpeed's step: compact state replaces the ZeRO optimizer's gradient bucketing,
epilogue and step, gradient compression takes over the reduction, the sparsifier wraps the inner optimizer's
``step``. Each of these replaces a method on one *instance* (DeepSpeed calls them through ``self``), never on a
class, and each is written against one DeepSpeed release: its private attribute names and call order. So:

- :func:`check_deepspeed_version` refuses a DeepSpeed outside :data:`TESTED_DEEPSPEED` with an error naming both
  versions (``DIST_SPARSE_ALLOW_UNTESTED_DEEPSPEED=1`` turns it into a warning); every entry point calls it
  (``dist-sparse train``, ``dist_sparse.initialize``/``attach``, and so the Trainer and accelerate adapters);
- :func:`replace` is the only way code here replaces an attribute of a DeepSpeed object: it checks the attribute
  exists (a renamed method fails loudly instead of adding a method nobody calls), keeps the original, and records
  the replacement on the object (:func:`installed` lists them, for errors and tests);
- DeepSpeed's name-mangled private attributes are spelled once, below.

This module does not import deepspeed (the version comes from the installed package's metadata).
"""

import logging
import os
from dataclasses import dataclass
from importlib import metadata

from dist_sparse.errors import DistSparseError

log = logging.getLogger("dist_sparse")

# The DeepSpeed releases these patches were written and tested against (also stated in pyproject.toml).
TESTED_DEEPSPEED = (">=0.19.8", "<0.19.9")
ALLOW_UNTESTED_ENV = "DIST_SPARSE_ALLOW_UNTESTED_DEEPSPEED"

# DeepSpeedZeroOptimizer_Stage3's private (name-mangled) attributes that compact state reads and replaces
STAGE3_GRAD_PARTITIONS = "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition"
STAGE3_REDUCE_IPG = "_DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads"

_RECORD = "_dist_sparse_patches"


class UntestedDeepSpeedError(DistSparseError, RuntimeError):
    """The installed DeepSpeed is not a release the patches were tested against."""


def _parse(version: str) -> tuple:
    out = []
    for part in version.split("+")[0].split("."):
        digits = "".join(c for c in part if c.isdigit()) if part else ""
        out.append(int(digits) if digits else 0)
        if digits != part:  # a pre-release or dev tag ends the numeric part
            break
    return tuple(out)


def _satisfies(version: str, spec: tuple) -> bool:
    ops = {">=": lambda a, b: a >= b, "<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
           "==": lambda a, b: a == b}
    v = _parse(version)
    for clause in spec:
        op = next(o for o in (">=", "<=", "==", ">", "<") if clause.startswith(o))
        ref = _parse(clause[len(op):])
        width = max(len(v), len(ref))
        if not ops[op](v + (0,) * (width - len(v)), ref + (0,) * (width - len(ref))):
            return False
    return True


def tested_range() -> str:
    return ",".join(TESTED_DEEPSPEED)


def check_deepspeed_version(version: str | None = None) -> str:
    """Refuse (or, with ``DIST_SPARSE_ALLOW_UNTESTED_DEEPSPEED=1``, warn about) an untested DeepSpeed. Returns the
    installed version."""
    if version is None:
        try:
            version = metadata.version("deepspeed")
        except metadata.PackageNotFoundError as e:
            raise UntestedDeepSpeedError("DeepSpeed is not installed (dist_sparse needs deepspeed "
                                         f"{tested_range()}; `make setup` installs it)") from e
    if _satisfies(version, TESTED_DEEPSPEED):
        return version
    what = (f"DeepSpeed {version} is installed, but dist_sparse's DeepSpeed patches were written and tested against "
            f"deepspeed {tested_range()}")
    if os.environ.get(ALLOW_UNTESTED_ENV, "") not in ("", "0"):
        log.warning("%s; continuing because %s is set: results may be wrong", what, ALLOW_UNTESTED_ENV)
        return version
    raise UntestedDeepSpeedError(f"{what}. Install a tested release (pip install 'deepspeed{tested_range()}'), or "
                                 f"set {ALLOW_UNTESTED_ENV}=1 to run anyway at your own risk")


@dataclass(frozen=True)
class Patch:
    owner: str  # the class name of the patched object
    attribute: str
    by: str  # which dist_sparse feature installed it, and why
    original: object


def replace(obj, attribute: str, new, by: str, *, allow_missing: bool = False):
    """Replace ``obj.attribute`` with ``new`` and record it; returns the original (None when it was missing and
    ``allow_missing``). A second replacement of the same attribute wraps the first: the record keeps both."""
    if not hasattr(obj, attribute) and not allow_missing:
        raise UntestedDeepSpeedError(f"{type(obj).__name__} has no attribute {attribute!r} to replace ({by}): this "
                                     f"DeepSpeed is not one the patches were written for (deepspeed {tested_range()})")
    original = getattr(obj, attribute, None)
    records = obj.__dict__.setdefault(_RECORD, []) if hasattr(obj, "__dict__") else []
    records.append(Patch(type(obj).__name__, attribute, by, original))
    setattr(obj, attribute, new)
    return original


def assign(obj, attribute: str, value, by: str):
    """Set a DeepSpeed *state* attribute that DeepSpeed itself reads (a slot, a flag), recorded like a method
    replacement; returns the old value."""
    return replace(obj, attribute, value, by)


def installed(obj) -> list:
    """The patches recorded on ``obj``, oldest first."""
    return list(getattr(obj, "__dict__", {}).get(_RECORD, []))
