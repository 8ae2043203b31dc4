"""Every registered op of the library carries ``torch.Tag.cudagraph_unsafe``.

The ops communicate, read the agreed plan on the host and wait on peers: nothing a CUDA graph can
capture or replay. With the tag, inductor's CUDA-graph trees (``torch.compile(mode=
"reduce-overhead")``) graph the code around them and run the ops eagerly, instead of capturing a
collective whose replay would send stale buffers or hang.
"""

from __future__ import annotations

import torch
from torch._library.custom_ops import OPDEFS

import hpattn_dist  # noqa: F401  (registers torch.ops.hpattn)


def test_every_hpattn_op_is_cudagraph_unsafe():
    names = sorted(name for name in OPDEFS if name.startswith("hpattn::"))
    assert {"hpattn::attention_fwd", "hpattn::attention_bwd", "hpattn::window_attention_fwd",
            "hpattn::window_attention_bwd"} <= set(names), names
    for name in names:
        op = getattr(torch.ops.hpattn, name.split("::")[1]).default
        assert torch.Tag.cudagraph_unsafe in op.tags, (name, op.tags)
