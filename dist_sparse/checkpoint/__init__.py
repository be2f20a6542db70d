"""Checkpoints: per-rank safetensors keyed by (parameter name, flat range), a manifest with checksums, a commit marker.

Layout of ``<output_dir>/checkpoints/step_00000100/``:

- ``rank_00000.safetensors`` ... one per rank: for every trainable parameter, the range this rank holds
  (``[start, start + length)`` of the flattened tensor) of the fp32 master weights, the Adam moments and, for
  sparsified parameters, the mask bits; the ranges are in the file's metadata. Because every piece is addressed by
  global range, a checkpoint written by N ranks loads on M ranks by intersecting ranges (resharding is exact).
- ``model.safetensors``: the model's own (low-precision) weights, written by rank 0.
- ``compression_rank_00000.safetensors`` ... (only with gradient compression): each rank's error-feedback state,
  full-size per-rank tensors keyed ``{name}::residual`` / ``{name}::momentum`` (not ranges: see
  docs/compression.md); passed in as ``extra_files``.
- ``trainer.json``: step, world size, ZeRO stage, optimizer step count, engine counters, fp16 loss-scaler state,
  lr scheduler state, sparsifier state, every rank's RNG state (as lists of bytes), the config.
- ``manifest.json``: size and SHA-256 of every file above, written by rank 0 after a barrier.
- ``COMMITTED``: written last; ``checkpoints/latest`` names the newest committed checkpoint and is replaced
  (atomically) only after the marker exists. A checkpoint without the marker is never resumed from.

Everything is safetensors or JSON: nothing here is unpickled. DeepSpeed's own checkpoint files are pickles loaded
with ``weights_only=False``, which is why dist_sparse does not use them. :func:`safe_torch_load` is the one way
dist_sparse reads a torch file (``weights_only=True``).
"""

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dist_sparse import distributed as D
from dist_sparse.errors import CheckpointError
from dist_sparse.masks.packing import pack_bits, unpack_bits

COMMIT_MARKER = "COMMITTED"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer.json"
MODEL_FILE = "model.safetensors"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.safetensors"


def step_dir(root, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no partial file behind
        raise


def _atomic_save_file(tensors: dict, path: Path, metadata: dict, inject_enospc: bool = False) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        if inject_enospc:  # fault injection: a disk that fills up part-way through the file
            tmp.write_bytes(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _nbytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _write_problem(exc: OSError, path: Path, needed: int) -> tuple:
    """One line naming the file, what it needed and what was free (a full disk or a quota is the usual cause)."""
    try:
        free = f"{shutil.disk_usage(path.parent).free} bytes free there"
    except OSError:
        free = "free space unknown"
    cause = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}.get(
        exc.errno, exc.strerror or str(exc))
    return str(path), f"{cause} writing about {needed} bytes ({free})"


def _agree(problem: tuple | None, out: Path, needed_total: int | None = None) -> None:
    """Every rank learns whether any rank failed to write its part (one all-gather) and then all raise together:
    a rank that raised alone would leave its peers waiting in the next collective. The unfinished directory is
    removed (it has no commit marker, so it is never resumed from either way)."""
    _raise_if_failed(D.all_gather_object(problem), out, needed_total)


def _raise_if_failed(problems: list, out: Path, needed_total: int | None = None) -> None:
    failed = [(r, p) for r, p in enumerate(problems) if p]
    if not failed:
        return
    if D.rank() == 0 and not is_committed(out):
        shutil.rmtree(out, ignore_errors=True)
    r, (path, message) = failed[0]
    total = f"; the whole checkpoint needs about {needed_total} bytes" if needed_total else ""
    raise CheckpointError(path, f"checkpoint not written (rank {r}): {message}{total}; the previous committed "
                          "checkpoint stays the newest")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def safe_torch_load(path):
    """Load a torch file with ``weights_only=True``: tensors and plain containers only; a pickle that would run
    code (or build arbitrary objects) is refused with a CheckpointError naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError: all mean "not a plain tensor file"
        raise CheckpointError(path, f"refused to load (not a plain tensor file; weights_only=True): {exc}") from exc


# ----------------------------------------------------------------------------------------------------------------
# saving


def _rng_state() -> list:
    states = [torch.get_rng_state()]
    if torch.cuda.is_available():
        states += list(torch.cuda.get_rng_state_all())
    return [s.tolist() for s in states]


def save(root, step: int, views: list, sparsifier, state_keys: list, model_state: dict | None,
         trainer_state: dict, fault=None, extra_files: dict | None = None) -> Path:
    """Write a checkpoint for ``step`` on every rank (a collective). Returns its directory.

    ``extra_files``: this rank's further safetensors files, ``{file name: (tensors, metadata)}``; they are covered
    by the manifest and the commit marker like the rest."""
    rank = D.rank()
    root = Path(root)
    out = step_dir(root, step)
    if rank == 0:
        if out.exists():  # an earlier, uncommitted attempt at the same step
            shutil.rmtree(out)
        out.mkdir(parents=True)
    D.barrier()

    tensors, ranges = {}, {}
    masked = set(sparsifier.order) if sparsifier is not None else set()
    for v in views:
        # replicated (ZeRO-0) tensors: each rank saves only its 1/N slice, so the checkpoint is sharded anyway
        start, length = (v.score_start, v.score_len) if v.replicated else (v.mask_start, v.mask_len)
        cut = slice(start - v.mask_start, start - v.mask_start + length)
        ranges[v.name] = [start, length, list(v.shape)]
        tensors[f"{v.name}::master"] = v.master()[cut].detach().float().cpu().clone()
        for key in state_keys:
            value = v.state(key)
            if value is None:
                raise CheckpointError(out, f"optimizer state {key!r} of {v.name} is not available")
            tensors[f"{v.name}::{key}"] = value[cut].detach().float().cpu().clone()
        if v.name in masked:
            tensors[f"{v.name}::mask"] = pack_bits(sparsifier.mask(v.name)[cut].cpu())
            if v.name in sparsifier.frozen:  # freezing: which positions keep their value (their values: the masters)
                tensors[f"{v.name}::frozen"] = pack_bits(sparsifier.frozen_mask(v.name)[cut].cpu())
            if v.name in sparsifier.grad_sums:  # RigL's growth window is open: its gradient sum (score range)
                tensors[f"{v.name}::grow_grad_sum"] = sparsifier.grad_sums[v.name].detach().float().cpu().clone()
    # a full disk or a quota (ENOSPC, EDQUOT) on any rank stops every rank with the file and the bytes named
    needed = _nbytes(tensors) + sum(_nbytes(t) for t, _ in (extra_files or {}).values())
    problem, path = None, out / rank_file(rank)
    try:
        _atomic_save_file(tensors, path, {"ranges": json.dumps(ranges), "rank": str(rank)},
                          inject_enospc=fault is not None and fault.active("enospc", step))
        for name, (extra, metadata) in (extra_files or {}).items():
            path = out / name
            _atomic_save_file(extra, path, metadata)
    except OSError as exc:
        problem = _write_problem(exc, path, needed)

    gathered = D.all_gather_object((_rng_state(), problem, needed))
    rng = [g[0] for g in gathered]
    total = sum(g[2] for g in gathered)
    _raise_if_failed([g[1] for g in gathered], out, total)
    if rank == 0:
        try:
            path = out / MODEL_FILE
            if model_state is not None:
                # clone: tied weights share storage, which safetensors refuses to write twice
                model = {k: v.detach().cpu().clone() for k, v in model_state.items()}
                _atomic_save_file(model, path, {"format": "dist_sparse.model.v1"})
            path = out / TRAINER_STATE
            _atomic_write_text(path, json.dumps({**trainer_state, "step": step, "rng": rng}))
        except OSError as exc:
            problem = _write_problem(exc, path, total)
    _agree(problem if rank == 0 else None, out, total)  # also the barrier: every rank's shard is on disk
    if fault is not None:
        fault.maybe("save_before_commit", step)
    if rank == 0:
        try:
            files = sorted(p.name for p in out.iterdir() if p.is_file() and ".tmp" not in p.name)
            manifest = {name: {"sha256": sha256(out / name), "bytes": (out / name).stat().st_size} for name in files}
            path = out / MANIFEST
            _atomic_write_text(path, json.dumps({"step": step, "world_size": D.world_size(),
                                                 "files": manifest}, indent=1))
            path = out / COMMIT_MARKER
            _atomic_write_text(path, f"{step}\n")
            path = root / LATEST
            _atomic_write_text(path, out.name + "\n")
        except OSError as exc:
            problem = _write_problem(exc, path, 4096)
    _agree(problem if rank == 0 else None, out)
    return out


# ----------------------------------------------------------------------------------------------------------------
# finding and verifying


def is_committed(path: Path) -> bool:
    return (path / COMMIT_MARKER).is_file() and (path / MANIFEST).is_file()


def committed_checkpoints(root) -> list:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and is_committed(p)]
    return [p for _, p in sorted(found)]


def resolve(resume: str, root) -> Path:
    """``auto``: the newest committed checkpoint under ``root``; otherwise the given directory, which must be a
    committed checkpoint. Missing or uncommitted targets are errors, never a silent fresh start."""
    if resume == "auto":
        found = committed_checkpoints(root)
        if not found:
            raise CheckpointError(root, "--resume auto: no committed checkpoint found")
        return found[-1]
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(path, "resume target does not exist")
    if path.name == LATEST or (path / LATEST).is_file():  # a checkpoints root was given
        return resolve("auto", path if path.is_dir() else path.parent)
    if not is_committed(path):
        raise CheckpointError(path, f"checkpoint is not committed (no {COMMIT_MARKER}): it was never finished")
    return path


def verify(path: Path, names: list) -> None:
    """Check size and SHA-256 of ``names`` against the manifest, on every rank; any rank's failure makes every
    rank raise (one all-reduce, so a corrupt file never leaves a peer waiting in a later collective)."""
    problem = None
    try:
        manifest = json.loads((path / MANIFEST).read_text())["files"]
        for name in names:
            f = path / name
            if name not in manifest:
                problem = f"{f}: not listed in the manifest"
            elif not f.is_file():
                problem = f"{f}: missing"
            elif f.stat().st_size != manifest[name]["bytes"]:
                problem = f"{f}: size {f.stat().st_size} != {manifest[name]['bytes']} in the manifest (truncated?)"
            elif sha256(f) != manifest[name]["sha256"]:
                problem = f"{f}: checksum mismatch (corrupt)"
            if problem:
                break
    except (OSError, ValueError, KeyError) as exc:
        problem = f"{path / MANIFEST}: unreadable manifest: {exc}"
    flag = torch.tensor([1 if problem else 0], dtype=torch.int64)
    D.all_reduce_max(flag)
    if problem:
        raise CheckpointError(problem.split(":")[0], problem.split(": ", 1)[1])
    if int(flag[0]):
        raise CheckpointError(path, "another rank found a missing, truncated or corrupt checkpoint file")


# ----------------------------------------------------------------------------------------------------------------
# loading


def read_trainer_state(path: Path) -> dict:
    try:
        return json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(path / TRAINER_STATE, f"unreadable: {exc}") from exc


def _read_pieces(path: Path, world: int, wanted: set) -> dict:
    """name -> list of (start, length, {kind: tensor}) from every rank file (what a resharding load needs)."""
    pieces: dict = {}
    for r in range(world):
        f = path / rank_file(r)
        try:
            with safe_open(str(f), framework="pt") as sf:
                ranges = json.loads(sf.metadata()["ranges"])
                for name, (start, length, _shape) in ranges.items():
                    if name not in wanted or length == 0:
                        continue
                    kinds = {k.split("::", 1)[1]: sf.get_tensor(k) for k in sf.keys() if k.startswith(name + "::")}
                    pieces.setdefault(name, []).append((start, length, kinds))
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f, f"cannot read checkpoint shard: {exc}") from exc
    return pieces


def _assemble(pieces: list, kind: str, start: int, length: int, dtype) -> torch.Tensor | None:
    """The range [start, start + length) of one tensor kind, cut from the saved pieces that overlap it."""
    out = torch.zeros(length, dtype=dtype)
    covered = torch.zeros(length, dtype=torch.bool)
    for p_start, p_len, kinds in pieces:
        if kind not in kinds:
            return None
        lo, hi = max(start, p_start), min(start + length, p_start + p_len)
        if lo >= hi:
            continue
        src = kinds[kind]
        if kind in ("mask", "frozen"):  # bit-packed
            src = unpack_bits(src, p_len)
        out[lo - start: hi - start] = src[lo - p_start: hi - p_start].to(dtype)
        covered[lo - start: hi - start] = True
    if not bool(covered.all()):
        raise CheckpointError("<checkpoint>", f"saved pieces cover {int(covered.sum())} of {length} elements")
    return out


def load(path: Path, views: list, sparsifier, state_keys: list) -> dict:
    """Fill this rank's master weights, optimizer moments and masks from the checkpoint (any saved world size).

    Returns the trainer state. Files are verified against the manifest first (on every rank)."""
    trainer = read_trainer_state(path)
    saved_world = int(trainer["world_size"])  # pieces are assembled by global range, whatever this world size
    names = [rank_file(r) for r in range(saved_world)] + [TRAINER_STATE]
    if (path / MODEL_FILE).exists():
        names.append(MODEL_FILE)
    verify(path, names)
    pieces = _read_pieces(path, saved_world, {v.name for v in views})
    masked = set(sparsifier.order) if sparsifier is not None else set()
    with torch.no_grad():
        for v in views:
            if v.name not in pieces and v.mask_len:
                raise CheckpointError(path, f"parameter {v.name} is not in the checkpoint")
            if v.mask_len == 0:
                continue
            p = pieces[v.name]
            frozen = None
            if v.name in masked:  # the mask first: packed views lay out their values by it
                mask = _assemble(p, "mask", v.mask_start, v.mask_len, torch.bool)
                if mask is None:
                    raise CheckpointError(path, f"no mask saved for sparsified parameter {v.name}")
                sparsifier.set_mask(v.name, mask)
                frozen = _assemble(p, "frozen", v.mask_start, v.mask_len, torch.bool)
            master = _assemble(p, "master", v.mask_start, v.mask_len, torch.float32)
            if frozen is not None:
                # the frozen values are the saved masters; set before the load, as compact state packs only the
                # trainable positions (active, not frozen)
                sparsifier.set_frozen(v.name, frozen, master)
            states = {}
            for key in state_keys:
                states[key] = _assemble(p, key, v.mask_start, v.mask_len, torch.float32)
                if states[key] is None or (v.store is None and v.state(key) is None):
                    raise CheckpointError(path, f"optimizer state {key!r} of {v.name} cannot be restored")
            v.load(master, states)
    # an open RigL growth window (grow_grad_steps > 1): its gradient sums, over this rank's score range
    window_steps = int((trainer.get("sparsifier") or {}).get("grad_sum_steps", 0))
    if sparsifier is not None:
        sparsifier.grad_sums = {}
        for v in sparsifier.views:
            if window_steps and v.score_len:
                value = _assemble(pieces.get(v.name, []), "grow_grad_sum", v.score_start, v.score_len, torch.float32)
                if value is None:
                    raise CheckpointError(path, f"no growth-gradient sum saved for {v.name} (grad_sum_steps > 0)")
                sparsifier.grad_sums[v.name] = value.to(v.master().device)
    # masks of ranks that hold nothing of a parameter: an empty mask
    if sparsifier is not None:
        for v in sparsifier.views:
            if v.mask_len == 0:
                sparsifier.set_mask(v.name, torch.zeros(0, dtype=torch.bool))
    stores = {id(v.store): v.store for v in views if v.store is not None}  # packed values: install them now
    for store in stores.values():
        store.finish_load()
    return trainer


def load_model_state(path: Path) -> dict:
    f = path / MODEL_FILE
    try:
        with safe_open(str(f), framework="pt") as sf:
            return {k: sf.get_tensor(k) for k in sf.keys()}
    except Exception as exc:
        raise CheckpointError(f, f"cannot read model weights: {exc}") from exc


def restore_rng(trainer_state: dict) -> None:
    states = trainer_state.get("rng") or []
    rank = D.rank()
    if rank < len(states) and states[rank]:
        mine = states[rank]
        torch.set_rng_state(torch.tensor(mine[0], dtype=torch.uint8))
        if torch.cuda.is_available() and len(mine) > 1:
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in mine[1:]])
