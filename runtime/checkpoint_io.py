"""Reading lowbit's own training checkpoints (``*.pt`` under ``OUTPUT.ckpt/``) without running their code.

The files are ``torch.save`` of tensors, numbers, strings and dicts; they are read with ``weights_only=True``,
which refuses any other object. A file that is not such a checkpoint (a pickle with a payload, a truncated or
foreign file) is refused with :class:`CheckpointError`, naming the file, instead of a traceback.
"""

from __future__ import annotations

from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint file is unreadable or holds objects other than tensors and plain data."""


def load_checkpoint(path: Path) -> dict:
    """The dict saved at ``path``; raises :class:`CheckpointError` for anything else."""
    try:
        # on the CPU first: a checkpoint written on a GPU resumes on a machine without one (the loop moves the
        # tensors to its own device)
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # weights_only refusals are UnpicklingError; truncation, zip and EOF errors vary
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a lowbit checkpoint (refused to load it: {first}); delete it or "
                              "restart with --overwrite") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a lowbit checkpoint (holds {type(state).__name__}, expected a dict); "
                              "delete it or restart with --overwrite")
    return state
