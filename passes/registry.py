"""lowbit's passes by name, and the default pipeline (``find-linear-sites -> replace-linears -> verify ->
tie-embedding -> clean-up``)."""

from __future__ import annotations

from .cleanup import CleanUp
from .decompose import DecomposeLowbitOps
from .embedding import TieEmbedding
from .ort_layout import ToMatMulNBits
from .rewrite import ReplaceLinears
from .sites import FindLinearSites
from .verify import Verify


def pass_by_name(name: str, **kwargs):
    """One of lowbit's passes by its name (see :data:`PASS_NAMES`)."""
    table = {"find-linear-sites": FindLinearSites, "replace-linears": ReplaceLinears, "verify": Verify,
             "clean-up": CleanUp, "tie-embedding": TieEmbedding, "to-matmulnbits": ToMatMulNBits, "decompose-lowbit": DecomposeLowbitOps}
    if name not in table:
        raise ValueError(f"unknown pass {name!r}; lowbit's passes are {sorted(table)}")
    return table[name](**kwargs)


PASS_NAMES = ("find-linear-sites", "replace-linears", "verify", "tie-embedding", "clean-up", "to-matmulnbits", "decompose-lowbit")


def default_passes() -> list:
    return [FindLinearSites(), ReplaceLinears(), Verify(), TieEmbedding(), CleanUp()]
