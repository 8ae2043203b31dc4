"""Block attention kernels returning ``(out, lse)`` and their final-statistics backward.

``manual`` (explicit, chunked, any dtype and device), ``sdpa`` and ``flash_attn`` (fused ops),
``dispatch`` (the one selection point, :func:`select_kernel`), ``dropout`` (the mask keyed by
global positions) and ``local`` (attention over keys all on this process, as an autograd
Function, for the Ulysses executor).
"""

from hpattn_dist.kernels.dispatch import KERNEL_BACKENDS, BlockKernel, check_backend_name, select_kernel
from hpattn_dist.kernels.dropout import DropoutSpec, check_dropout_seed, draw_seed, keep_mask, resolve_dropout_seed, seed_input

__all__ = [
    "KERNEL_BACKENDS",
    "BlockKernel",
    "DropoutSpec",
    "check_backend_name",
    "check_dropout_seed",
    "draw_seed",
    "keep_mask",
    "resolve_dropout_seed",
    "seed_input",
    "select_kernel",
]
