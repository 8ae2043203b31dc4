"""Bytes a rank holds through one attention layer's forward and backward, for every strategy.

Legend: B batch, H heads, D head dim, E = H * D, P ranks, U Ulysses degree, R = P / U ring degree,
h = H / U, N_r this rank's pixels, M_j pixels of Ulysses group j (M = this rank's group), s the
itemsize of the layer, a the accumulation itemsize (fp32, fp64 for fp64). Units: ``px`` = one
``[B, N_r, E]`` tensor (= one ``[B, H, N_r, D]``) of the layer's dtype; ``hq`` = one
``[B, h, M, D]`` head-layout tensor (``hq = px`` for equal shards).

Note [activation memory]
~~~~~~~~~~~~~~~~~~~~~~~~
What a rank holds is counted event by event, in the order the code allocates and frees: a
:class:`Ledger` takes each tensor's bytes when it is made and returns them when its last
reference goes; its running maximum is the peak. The quantity is what an allocator counts (torch's
``max_memory_allocated``; on the CPU the profiler's allocation events, Note [allocated peak]):
the bytes of the tensors created from the start of the layer's forward to the end of its
backward, the layer's input ``x [B, N_r, E]`` and the incoming gradient not counted, its output
``y`` and the parameter gradients counted. Each schedule below follows one code path of today's
executors; a change there changes its schedule here, and ``tests/distributed/test_cost_model.py``
holds every schedule to the allocator's peak within 15% (nside 16-64, P 2-4).

Global attention, through the registered ops (Note [attention as one op]; for U > 1 the three
ops of Note [ulysses op memory]):

* forward: the fused projection ``qkv`` (3 px); for U > 1 the head exchange (a (U - 1)/U send
  buffer and receive buffer, then q, k, v in three hq buffers of their own); for U = 1 a
  contiguous copy of q (1 px); the NaN-row mask of q and lse; per ring step (R > 1: the own K/V
  stacked, 2 hq) the block computed on, the block in flight (none after the last step) and the
  block sent the step before (its posted send holds it until the next post), the kernel's output
  (the first block's output is the accumulator; later ones are merged, the merge's product) and
  the kernel's scratch; for U > 1 the output home in ``[B, N_r, H, D]`` memory (1 px, a (U - 1)/U
  receive buffer), so the layer's reshape before ``out_proj`` is a view, and ``qkv`` freed at
  the end (the door saves shapes only); for U = 1 the layer's transpose copy (1 px); ``y`` (1 px).
* saved between forward and backward: for U = 1 qkv (3 px), the output (1 px), lse and the
  transpose copy; for U > 1 the head-layout q, k, v (3 hq), ``out_h`` (1 hq), lse and the output
  (1 px); ``y``.
* backward: ``out_proj``'s input gradient (1 px) and the parameter gradients; for U > 1 the
  gradient to heads (1 hq, heads-minor, read by the fused kernel in place; a receive buffer), the
  pixel gradient then freed; for R > 1 the stacked K/V (2 hq) and per ring step the block in
  flight, the dK/dV accumulators in flight (2 x 2 a/s hq); the kernel's block gradients (3 hq) and
  its scratch; for R > 1 dk, dv copied out of the accumulators (U = 1: one of them, 1 px; U > 1:
  both, heads-minor); for U > 1 the engine frees the residuals and the door sends dq, dk, dv home
  one at a time (a 1 hq send buffer and a 1 px result each); the stack of dq, dk, dv into the qkv
  gradient (3 px) and dx (1 px).

The block kernels' own scratch is a property of the kernel: on the CPU, the flash kernel's
per-thread tiles (:func:`cpu_flash_scratch`; ``dout`` reaches its backward in the
``[B, N, h, D]`` layout it reads, no copy); on CUDA (FlashAttention-2 / memory-efficient) an fp32 ``dq`` accumulator (1 hq * 4/s).

Windowed (local) attention (Note [local attention plan]) holds, besides qkv and the layer's
copies, the extended K/V rows ``[N_r + R_halo, 2, B, H, D]``, the unit-major query, output and
(backward) gradient copies, and per chunk of units the gathered window keys, bounded by the
executor's ``_CHUNK_ELEMENTS``. Its schedule is :func:`local_layer_memory`.

A change to an executor changes its schedule here: global attention's is :func:`_global_schedule`,
windowed attention's :func:`local_layer_memory`; ``tests/distributed/test_cost_model.py`` fails
until they agree again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

__all__ = ["LayerMemory", "Ledger", "MemoryCase", "cpu_flash_scratch", "global_layer_memory",
           "local_layer_memory", "unit_batches"]


@dataclass(frozen=True)
class MemoryCase:
    """One rank of one layer call.

    Attributes:
        batch, heads, head_dim: B, H, D (E = H * D).
        sizes: every rank's pixel count N_p, group-rank order.
        rank: the rank counted.
        itemsize: s, bytes per element of the layer's dtype.
        acc_itemsize: a, bytes per element of the accumulators (4, or 8 for float64).
        device: ``"cuda"`` (fused GPU kernels) or ``"cpu"`` (the CPU flash kernel).
        threads: torch threads of a CPU rank (the CPU kernel's tiles are per thread).
        bias: the projections have biases (their gradients are counted).
    """

    batch: int
    heads: int
    head_dim: int
    sizes: tuple[int, ...]
    rank: int
    itemsize: int
    acc_itemsize: int = 4
    device: str = "cuda"
    threads: int = 1
    bias: bool = True

    @property
    def embed_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def n_local(self) -> int:
        return self.sizes[self.rank]

    @property
    def px(self) -> int:
        """Bytes of one ``[B, N_r, E]`` tensor of the layer's dtype."""
        return self.batch * self.n_local * self.embed_dim * self.itemsize

    @property
    def param_grads(self) -> int:
        """Bytes of the projections' parameter gradients (qkv: 3E x E, out: E x E, and biases)."""
        e = self.embed_dim
        return (4 * e * e + (4 * e if self.bias else 0)) * self.itemsize


@dataclass(frozen=True)
class LayerMemory:
    """Bytes above the layer's input (Note [activation memory]).

    Attributes:
        saved: held from the end of the forward to its backward (the output ``y`` included).
        forward: peak during the forward.
        peak: peak over the forward and the backward.
    """

    saved: int
    forward: int
    peak: int


@dataclass
class Ledger:
    """Running bytes of named tensors and their maximum (Note [activation memory])."""

    live: int = 0
    peak: int = 0
    held: dict = field(default_factory=dict)

    def add(self, name: str, nbytes: int) -> None:
        self.held[name] = self.held.get(name, 0) + int(nbytes)
        self.live += int(nbytes)
        self.peak = max(self.peak, self.live)

    def free(self, *names: str) -> None:
        for name in names:
            self.live -= self.held.pop(name, 0)

    def spike(self, nbytes: int) -> None:
        """Bytes made and freed again before anything else is: only the peak sees them."""
        self.peak = max(self.peak, self.live + int(nbytes))


def cpu_flash_scratch(n_q: int, n_k: int, head_dim: int, threads: int, backward: bool) -> int:
    """Bytes of the per-thread tiles of torch's CPU flash attention (fp32), forward or backward:
    ``q_split x kv_split`` scores (two tiles backward), plus row statistics and an output tile."""
    q_split = min(256 if n_q >= 768 else 64 if n_q >= 192 else 32, n_q)
    kv_split = min(512, n_k)
    tile = q_split * kv_split
    per_thread = 2 * tile if backward else tile + 2 * q_split + q_split * head_dim
    return 4 * threads * per_thread


class _Kernel:
    """The block kernel's transients on this device (Note [activation memory])."""

    def __init__(self, case: MemoryCase) -> None:
        self.case = case

    def forward_scratch(self, n_q: int, n_k: int) -> int:
        c = self.case
        return cpu_flash_scratch(n_q, n_k, c.head_dim, c.threads, False) if c.device == "cpu" else 0

    def backward_scratch(self, n_q: int, n_k: int, q_bytes: int) -> int:
        c = self.case
        if c.device == "cpu":  # dout arrives in the layout the kernel reads (Note [head exchange memory])
            return cpu_flash_scratch(n_q, n_k, c.head_dim, c.threads, True)
        return q_bytes * 4 // c.itemsize  # FlashAttention-2 / efficient: an fp32 dq accumulator


def _global_schedule(case: MemoryCase, u_deg: int) -> LayerMemory:
    """The ledger of ring (U = 1), Ulysses (U = P) and hybrid attention through the op (Note
    [activation memory]; for U > 1 the three ops of Note [ulysses op memory])."""
    c, led, kernel = case, Ledger(), _Kernel(case)
    b, d, s, a = c.batch, c.head_dim, c.itemsize, c.acc_itemsize
    r_deg = len(c.sizes) // u_deg
    h = c.heads // u_deg
    ring_i = c.rank // u_deg
    group = [sum(c.sizes[j * u_deg:(j + 1) * u_deg]) for j in range(r_deg)]  # M_j
    m = group[ring_i]
    px = c.px
    hq = b * h * m * d * s  # one head-layout tensor of this rank's Ulysses group
    lse = b * h * m * a
    sent_px = (u_deg - 1) * c.n_local * b * h * d * s  # one tensor's pieces for the other U - 1 ranks
    recv_hq = (m - c.n_local) * b * h * d * s  # one tensor's pieces from them

    def block(j: int) -> int:
        return 2 * b * h * group[j] * d * s

    # ---- forward
    led.add("qkv", 3 * px)
    if u_deg > 1:  # attention_fwd: q, k, v to heads, each in a buffer of its own
        led.add("send", 3 * sent_px)
        led.add("recv", 3 * recv_hq)
        led.free("send")
        led.add("qkv_h", 3 * hq)
        led.free("recv")
    else:
        led.add("q_contiguous", px)
    led.spike(hq // s)  # the NaN-row mask of q (bool), once per call
    led.add("lse", lse)
    if r_deg > 1:
        led.add("block", block(ring_i))  # the own K/V, stacked
    first = True
    for step in range(r_deg):
        src = (ring_i - step) % r_deg
        if step < r_deg - 1:
            led.add("next", block((ring_i - step - 1) % r_deg))
        if group[src] > 0:
            if first:  # the first block's result is the accumulator
                led.add("acc", hq * a // s)
                led.spike(kernel.forward_scratch(m, group[src]) + (hq if a != s else 0))
                first = False
            else:
                led.add("out_b", hq)
                led.spike(kernel.forward_scratch(m, group[src]))
                led.spike(hq * a // s * (1 if a == s else 2))  # the merge's product (and block_out.to)
                led.free("out_b")
        led.free("retired")  # the block sent last step: its send held it through this step
        if step < r_deg - 1:
            led.held["retired"] = led.held.pop("block", 0)
            led.held["block"] = led.held.pop("next")
    led.free("block", "retired")
    if a != s:
        led.add("out_h", hq)
        led.free("acc")
    else:
        led.held["out_h"] = led.held.pop("acc", 0)
    if u_deg > 1:  # heads_to_pixels: [B, N_r, H, D] memory, so the reshape before out_proj is a view
        led.add("out", px)
        led.spike((u_deg - 1) * c.n_local * b * h * d * s)
    else:
        led.free("q_contiguous")
        led.held["out"] = led.held.pop("out_h")
        led.add("out_t", px)  # out.transpose(1, 2).reshape(B, N_r, E) before out_proj
    led.add("y", px)
    if u_deg > 1:
        led.free("qkv")  # the door saves only shapes: the head-layout tensors are the residuals
    saved, forward = led.live, led.peak

    # ---- backward
    led.add("d_out_t", px)
    led.add("param_grads", c.param_grads)
    led.free("out_t" if u_deg == 1 else "out")
    if u_deg > 1:  # pixels_to_heads: dout in the layout the fused backward reads in place
        led.add("dout_h", hq)
        led.spike(recv_hq)
        led.free("d_out_t")
    if r_deg > 1:
        led.add("block", block(ring_i))  # K/V stacked again
    dq_first = True
    for step in range(r_deg):
        src = (ring_i - step) % r_deg
        if step < r_deg - 1:
            led.add("next", block((ring_i - step - 1) % r_deg))
        if group[src] > 0:
            kv_b = block(src) // 2
            led.add("dq_b", hq)
            led.add("dkv_b", 2 * kv_b)
            led.spike(kernel.backward_scratch(m, group[src], hq))
            if dq_first:
                led.held["dq"] = led.held.pop("dq_b")
                if a != s:
                    led.add("dq", hq * a // s - hq)
                dq_first = False
            else:
                led.free("dq_b")
        if r_deg > 1:
            if step == 0:
                led.add("grads", block(src) * a // s)
            else:
                led.free("sent")  # the exchange posted last step is done
            led.free("dkv_b")
            led.held["sent"] = led.held.pop("grads")
            led.add("grads", block((src - 1) % r_deg) * a // s)
        if step < r_deg - 1:
            led.free("block")
            led.held["block"] = led.held.pop("next")
    led.free("block", "sent")
    if a != s:
        led.add("dq_cast", hq)
        led.free("dq")
    if r_deg > 1:
        if u_deg > 1:
            led.add("dkv_copy", 2 * hq)  # dk, dv from the accumulators, in the heads-minor layout
            led.free("grads")
        else:
            if a != s:
                led.add("dkv_cast", 2 * px)
                led.free("grads")
            led.add("dv_copy", px)  # dk, dv are halves of one buffer: the op copies one
    if u_deg > 1:  # the engine frees dout_h and the residuals; the door sends dq, dk, dv home
        led.free("dout_h", "qkv_h", "out_h", "lse")
        for i in range(3):
            led.add("send", hq)
            led.add(f"grad_px{i}", px)
            led.free("send")
        led.free("dq", "dq_cast", "dkv_b", "dkv_copy", "grads")
    led.free("out_h", "lse", "out")
    led.free("qkv")
    led.add("dqkv", 3 * px)  # the three gradients stacked into the projection's layout
    led.free("grad_px0", "grad_px1", "grad_px2", "dq", "dq_cast", "dkv_b", "grads", "dkv_cast", "dv_copy")
    led.add("dx", px)
    led.free("dqkv", "d_out_t")
    return LayerMemory(saved, forward, led.peak)


def global_layer_memory(case: MemoryCase, strategy: str, ulysses_degree: Optional[int] = None) -> LayerMemory:
    """Memory of ``DistributedSpatialSelfAttention`` with ``strategy`` (Note [activation memory]).

    Raises:
        ValueError: an unknown strategy, or a Ulysses degree that does not divide P and H.
    """
    from hpattn_dist.cost_model.communication import degree_for

    u_deg = degree_for(strategy, len(case.sizes), ulysses_degree)
    if case.heads % u_deg:
        raise ValueError(f"heads={case.heads} is not divisible by the Ulysses degree {u_deg}")
    return _global_schedule(case, u_deg)


def unit_batches(sizes: tuple[int, ...], rank: int, window_nside: int, mode: str) -> tuple[int, int, dict[int, int]]:
    """``(c, U_r, {m: units whose window holds m cells})`` of rank ``rank`` (Note [local attention plan])."""
    from hpattn_dist.healpix import npix2nside
    from hpattn_dist.local.windows import check_window_fits, window_cells

    c = check_window_fits(npix2nside(sum(sizes)), window_nside)
    start = sum(sizes[:rank])
    stop = start + sizes[rank]
    if stop <= start:
        return c, 0, {}
    cells = window_cells(window_nside, mode)[start // c:(stop - 1) // c + 1]
    counts: dict[int, int] = {}
    for m in (cells >= 0).sum(dim=1).tolist():
        counts[m] = counts.get(m, 0) + 1
    return c, (stop - 1) // c - start // c + 1, counts


def local_layer_memory(case: MemoryCase, window_nside: int, mode: str) -> LayerMemory:
    """Memory of ``DistributedLocalSpatialSelfAttention`` (Note [activation memory]): the ledger of
    today's windowed executor (``hpattn_dist.local.attention``, chunks of ``_CHUNK_ELEMENTS``
    gathered K/V elements)."""
    from hpattn_dist.cost_model.communication import halo_rows
    from hpattn_dist.local.attention import _CHUNK_ELEMENTS

    c_, led, kernel = case, Ledger(), _Kernel(case)
    b, h, d, s, a = c_.batch, c_.heads, c_.head_dim, c_.itemsize, c_.acc_itemsize
    px = c_.px
    halo = halo_rows(c_.sizes, window_nside, mode)[c_.rank]
    c, units, batches = unit_batches(c_.sizes, c_.rank, window_nside, mode)
    row = b * h * d * s  # one pixel of one of q, k, v
    kv_row = 2 * row
    q_units = units * c * row  # whole cells, padded
    ext = (c_.n_local + halo.received) * kv_row
    # the largest chunk: n units of m window cells, at most _CHUNK_ELEMENTS gathered K/V elements
    per_key = 2 * b * h * d
    chunk_units = {m: min(n, max(1, _CHUNK_ELEMENTS // (per_key * m * c))) for m, n in batches.items()}
    gathered = max((n * m * c * kv_row for m, n in chunk_units.items()), default=0)
    q_chunk = max((n * c * row for n in chunk_units.values()), default=0)
    keys = max((m * c for m in batches), default=0)

    # ---- forward
    led.add("qkv", 3 * px)
    led.add("kv_ext", ext)
    if any(r.received for r in halo_rows(c_.sizes, window_nside, mode)):  # cached
        led.add("send", halo.sent * kv_row)
        led.add("kv_halo", halo.received * kv_row)
        led.free("send")
    led.spike(q_units)  # the padded copy, permuted into units
    led.add("q_units", q_units)
    led.add("out_units", q_units * a // s)
    led.add("lse_units", units * b * h * c * a)
    if batches:  # the previous chunk's keys live until the next gather completes
        led.spike(2 * gathered + q_chunk + max(q_chunk, kernel.forward_scratch(c, keys)))
    led.add("out", px)
    led.free("kv_ext", "q_units", "out_units")
    led.add("out_t", px)
    led.add("y", px)
    saved, forward = led.live, led.peak

    # ---- backward
    led.add("d_out_t", px)
    led.add("param_grads", c_.param_grads)
    led.free("out_t")
    led.add("kv_ext", ext)
    led.spike(q_units)
    led.add("q_units", q_units)
    led.spike(px + q_units)  # dout made contiguous, then padded
    led.add("dout_units", q_units)
    led.spike(q_units)
    led.add("out_units", q_units)
    led.spike(q_units * a // s)
    led.add("delta", units * b * h * c * a)
    led.add("dq_units", q_units * a // s)
    led.add("dkv_ext", ext * a // s)
    # Per chunk: the keys, the block gradients dk, dv, their stack and its row-major copy (4
    # gathered) with the queries' rows; a chunk's tensors live until the next chunk replaces them,
    # so the last chunk's keys, gradients and stack (3 gathered) are still held at the end, when
    # the halo rows' gradients come home and are added (a new 2 px) and dq leaves the units.
    if batches:
        led.spike(4 * gathered * a // s + 2 * q_chunk + kernel.backward_scratch(c, keys, q_chunk))
    led.spike(3 * gathered * a // s + halo.sent * kv_row * a // s + 2 * px * a // s + px)
    led.free("kv_ext", "q_units", "dout_units", "out_units", "delta", "dkv_ext", "kv_halo", "dq_units")
    led.free("out", "lse_units")
    led.add("dqkv", 3 * px)
    led.add("dx", px)
    led.free("dqkv", "d_out_t", "qkv")
    return LayerMemory(saved, forward, led.peak)
