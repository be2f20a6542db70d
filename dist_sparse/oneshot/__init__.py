"""One-shot pruning of Hugging Face checkpoints: magnitude, Wanda, SparseGPT; unstructured or N:M.

Entry points: :func:`dist_sparse.oneshot.pipeline.sparsify_checkpoint` (what ``dist-sparse sparsify`` runs) and
:func:`dist_sparse.oneshot.eval.evaluate_checkpoint` (``dist-sparse eval``). See ``docs/oneshot.md``.
"""

METHODS = ("magnitude", "wanda", "sparsegpt")
