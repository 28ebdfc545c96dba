"""Error compensation: after groups are cut, change what remains so each block's output moves least.

One family, three modes (``--compensation``):

* ``none``: slice only.
* ``bias``: FLAP's zeroth-order fix — the removed inputs' calibration mean times their weight columns
  becomes a bias of the closing projection (:mod:`minillm.compensation.bias`).
* ``refit``: exact least squares — the kept input columns of each closing projection (o_proj,
  down_proj) are re-solved from the input second moments ``H = XᵀX`` (:mod:`.refit`), block after
  block on the already-pruned prefix (:mod:`minillm.compensation.sequential`).

:mod:`.hessian` accumulates ``H``; :mod:`.obs` is the Optimal-Brain-Surgeon greedy selection that
uses the same ``H``; :mod:`.block_target` is the refit's block-output target for the MLP
(``--compensation-target block``).
"""

from __future__ import annotations

from typing import get_args

from minillm.defaults import Compensation

COMPENSATIONS: tuple[str, ...] = get_args(Compensation)
