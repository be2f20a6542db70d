"""Typed errors. Every error a user can cause names the key path, parameter or file at fault."""


class DistSparseError(Exception):
    """Base class of every error dist_sparse raises on purpose."""


class ConfigError(DistSparseError, ValueError):
    """A config value is missing, unknown, of the wrong type or out of range.

    ``key`` is the dotted path of the offending key (``sparsity.sparsity``), so a user can find it in the file.
    """

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")


class CheckpointError(DistSparseError, RuntimeError):
    """A checkpoint is missing, uncommitted, corrupt or unsafe. ``path`` names the file or directory."""

    def __init__(self, path, message: str):
        self.path = str(path)
        super().__init__(f"{path}: {message}")


class UnsupportedModelError(DistSparseError, ValueError):
    """The model architecture has no layers dist_sparse knows how to sparsify."""


class DataError(DistSparseError, ValueError):
    """Input data that cannot be prepared: no files match, an unknown format, a missing text column, an unusable
    tokenizer. ``where`` names the file, column or command-line option at fault."""

    def __init__(self, where: str, message: str):
        self.where = str(where)
        self.message = message
        super().__init__(f"{where}: {message}")
