"""Whether a plan's widths suit the runtimes users serve with.

Why: llama.cpp's fast prompt kernel (``sgemm.cpp``, tinyBLAS) needs a matmul's inner dimension to be a
multiple of 16 (AVX-512 float32) and its rows a multiple of 4; otherwise it falls back to a generic loop.
The default 20 % export of the benchmark model (MLP 1145) prefilled 1.2–1.4 × *slower* than the dense
model in llama.cpp, the same cut with ``--round-to 64`` (MLP 1152) 0.69–0.77 × (docs/benchmarks.md,
"llama.cpp"). GPU tensor cores and quantisers' group sizes want such multiples too. The default stays
``--round-to 1`` (exact budget); the prune says when a width misses the multiple.
"""

from __future__ import annotations

from torch import nn

from minillm.arch.base import ArchAdapter
from minillm.plan import PrunePlan

#: Width multiple of llama.cpp's fast prompt kernel (and a divisor of GPU / quantiser group sizes).
KERNEL_MULTIPLE = 16


def kernel_width_note(plan: PrunePlan, model: nn.Module, adapter: ArchAdapter) -> str | None:
    """One line when a cut MLP width or hidden size is not a multiple of :data:`KERNEL_MULTIPLE`."""
    shapes = {p.index: adapter.layer_shape(model, p.index) for p in plan.layers}
    odd = sorted({len(p.channels) for p in plan.layers
                  if len(p.channels) < shapes[p.index].intermediate and len(p.channels) % KERNEL_MULTIPLE})
    hidden = len(plan.hidden) if plan.hidden is not None and len(plan.hidden) % KERNEL_MULTIPLE else None
    if not odd and hidden is None:
        return None
    widths = ", ".join([*(f"MLP {w}" for w in odd[:3]), *([f"hidden {hidden}"] if hidden else [])])
    return (f"{widths} not a multiple of {KERNEL_MULTIPLE}: llama.cpp's prompt kernel and GPU kernels run "
            "such widths slower; --round-to 64 keeps them fast")
