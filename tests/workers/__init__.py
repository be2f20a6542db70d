"""Worker scripts run under torchrun by the tests; each ends with :func:`finish`."""

import json

from dist_sparse import distributed as D


def finish(results, out: str) -> None:
    """Gather every rank's results, have rank 0 write them (a JSON list, one entry per rank) to ``out``, then leave
    the process group cleanly (its threads joined before the interpreter exits)."""
    gathered = D.all_gather_object(results)
    if D.rank() == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    D.shutdown()
