"""Block attention kernels returning ``(out, lse)`` and their final-statistics backward."""

from hpattn_dist.kernels.dispatch import KERNEL_BACKENDS, BlockKernel, check_backend_name, select_kernel
from hpattn_dist.kernels.dropout import DropoutSpec, draw_seed, keep_mask, resolve_dropout_seed

__all__ = [
    "KERNEL_BACKENDS",
    "BlockKernel",
    "DropoutSpec",
    "check_backend_name",
    "draw_seed",
    "keep_mask",
    "resolve_dropout_seed",
    "select_kernel",
]
