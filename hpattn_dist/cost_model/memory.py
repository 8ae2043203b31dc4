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

Windowed (local) attention is one registered op between the layer's projections. The layer holds
``qkv`` (3 px, freed at once) and its head-major contiguous copy q, k, v (3 px, the op's
residuals), then the op, the output's transpose copy (1 px) and ``y``; saved: q, k, v, the output,
lse, the edge cells' K/V and the transpose copy. Backward: ``out_proj``'s input gradient (1 px),
the op's contiguous copy of its transposed ``dout`` (1 px), then the op, dq, dk, dv stacked
(3 px) and dx. What the op holds is ONE count, Note [local attention memory]
(:func:`local_attention_units` of the rank's plan, also held to the live bytes by
``tests/distributed/test_memory.py``); its schedule here is :func:`local_layer_memory`.

A change to an executor changes its schedule here: global attention's is :func:`_global_schedule`,
windowed attention's :func:`local_layer_memory`; ``tests/distributed/test_cost_model.py`` fails
until they agree again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

__all__ = ["LayerMemory", "Ledger", "LocalMemoryUnits", "MemoryCase", "WindowGeometry", "WindowGroupShape",
           "cpu_flash_scratch", "global_layer_memory", "local_attention_units", "local_layer_memory",
           "unit_batches"]


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


def _ring_steps(led: Ledger, r_deg: int, ring_i: int, block: Callable[[int], int], *,
                retire: bool) -> Iterator[tuple[int, int]]:
    """The K/V blocks a rank of a ring of ``r_deg`` holds through one pass (forward or backward):
    its own block, stacked (``r_deg > 1``); at each step the block computed on and the next one in
    flight (none after the last step); ``retire``: the block of the step before stays one step
    more (forward: its posted send holds it until the next post). Yields ``(step, src)``, the step
    and the ring rank whose block it computes on, while those blocks are held; ``block(j)``: the
    bytes of ring rank j's block."""
    if r_deg > 1:
        led.add("block", block(ring_i))
    for step in range(r_deg):
        if step < r_deg - 1:
            led.add("next", block((ring_i - step - 1) % r_deg))
        yield step, (ring_i - step) % r_deg
        led.free("retired")
        if step < r_deg - 1:
            if retire:
                led.held["retired"] = led.held.pop("block", 0)
            else:
                led.free("block")
            led.held["block"] = led.held.pop("next")
    led.free("block", "retired")


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
    first = True
    for step, src in _ring_steps(led, r_deg, ring_i, block, retire=True):
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
    dq_first = True
    for step, src in _ring_steps(led, r_deg, ring_i, block, retire=False):  # K/V stacked again
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
    led.free("sent")
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


@dataclass(frozen=True)
class WindowGroupShape:
    """The cells of one window group (Note [local attention plan]).

    Attributes:
        pad: a group of padded squares (three calls, one per column offset); else a list.
        query_cells: its query cells (``A * C * Y``).
        key_cells: the key cells it lays out: squares, the padded grids (``(s + 2)**2 * C``); a
            list, ``Y * m``.
        window_cells: the key cells of one window in one call: 3 (a column), or a list's m.
    """

    pad: bool
    query_cells: int
    key_cells: int
    window_cells: int


@dataclass(frozen=True)
class WindowGeometry:
    """What Note [local attention memory] counts from one rank's plan of windowed attention
    (:meth:`hpattn_dist.local.plan.LocalPlan.geometry`).

    Attributes:
        cell_pixels, key_cell_pixels: ``c_q``, ``c_k``.
        n_units: the cells holding this rank's queries, ``U_r``.
        n_local_keys: ``Nk_r``.
        edge_pixels: the edge cells' pixels, zero block included (``(E + z) * c_k``).
        rows_sent, rows_received: the halo rows (Note [halo traffic]).
        groups: the window groups, in the order they run.
        in_place: one list reads q, k, v in place over the whole rank (its kernel's outputs are
            the results).
    """

    cell_pixels: int
    key_cell_pixels: int
    n_units: int
    n_local_keys: int
    edge_pixels: int
    rows_sent: int
    rows_received: int
    groups: tuple[WindowGroupShape, ...]
    in_place: bool


@dataclass(frozen=True)
class LocalMemoryUnits:
    """What one windowed call holds above its inputs, in units of one ``[B, H, Nk_r, D]`` tensor
    of the layer's dtype (Note [local attention memory]).

    Attributes:
        edge: the edge cells' K/V the forward saves for the backward (``2e``).
        forward: peak during the forward, the output and ``edge`` included.
        backward: peak during the backward with q, k, v, out and dout given, dq, dk, dv and the
            saved ``edge`` included.
    """

    edge: float
    forward: float
    backward: float


def local_attention_units(geometry: WindowGeometry, acc_ratio: float = 1.0) -> LocalMemoryUnits:
    """Note [local attention memory] (``hpattn_dist/local/execute.py``), the ONE count of what the
    windowed op holds: from each group's share g of the rank's units and, for squares, its padded
    border b; the edge cells e, the halo rows sent s and received r (each per ``Nk_r``).

    ``acc_ratio``: the accumulation itemsize over the layer's (2 for bf16 / fp16, else 1); the
    backward's accumulators (dq, dk, dv, the edge cells' and the grids' gradients, the sum of a
    group's dq, the gradients' halo trip) count that many units each.
    """
    geo, a = geometry, acc_ratio
    n_units, n_r = geo.n_units, geo.n_local_keys
    if n_r == 0 or n_units == 0:
        return LocalMemoryUnits(0.0, 0.0, 0.0)
    if geo.in_place:
        return LocalMemoryUnits(0.0, 1.0, 3.0)  # the kernel's outputs are the results
    e = geo.edge_pixels / n_r
    s, r = geo.rows_sent / n_r, geo.rows_received / n_r
    fwd = bwd = 0.0
    for group in geo.groups:
        g = group.query_cells / n_units
        if group.pad:
            b = group.key_cells / group.query_cells
            fwd = max(fwd, g * (3 + 2 * b))  # q, padded K/V, kernel out, merge accumulator
            # q, dout, out; K/V and their gradient grids; dq (the kernel's and the sum); dk, dv
            bwd = max(bwd, g * (3 + 2 * b + 2 * b * a + 1 + a + 6))
        else:
            m = group.window_cells
            fwd = max(fwd, g * (1 + 2 * m + 1))
            bwd = max(bwd, g * (3 + 4 * m + 1))
    exchange_fwd = max(2 * s + 2 * r, 3 * r + 2 * e)  # all_to_all buffers; edge cells filled
    exchange_bwd = 3 * a + 2 * e + (2 * r + 2 * s) * a  # dq, dk, dv, the saved edge cells, the trips
    return LocalMemoryUnits(2 * e, max(1 + 2 * e + fwd, exchange_fwd),
                            max(3 * a + 2 * e + 2 * e * a + bwd, exchange_bwd))


def local_layer_memory(case: MemoryCase, geometry: WindowGeometry) -> LayerMemory:
    """Memory of ``DistributedLocalSpatialSelfAttention`` (Note [activation memory]): the layer's
    projections and copies around ONE windowed op, whose own bytes are :func:`local_attention_units`
    of this rank's plan (``geometry``: :meth:`hpattn_dist.local.plan.LocalPlan.geometry`)."""
    c, geo, led, kernel = case, geometry, Ledger(), _Kernel(case)
    px = c.px
    units = local_attention_units(geo, c.acc_itemsize / c.itemsize)
    lse = c.batch * c.heads * c.n_local * c.acc_itemsize
    edge = round(units.edge * px)
    # the kernel's scratch in its largest call: c_q queries of a group's windows against a window's keys
    calls = [(group.query_cells, group.window_cells) for group in geo.groups]
    cells, keys = max(calls, default=(0, 0), key=lambda call: call[0] * call[1])
    q_bytes = cells * geo.cell_pixels * c.batch * c.heads * c.head_dim * c.itemsize
    n_keys = keys * geo.key_cell_pixels

    # ---- forward
    led.add("qkv_proj", 3 * px)
    led.add("qkv", 3 * px)  # q, k, v: one contiguous [3, B, H, N_r, D] copy, the op's residuals
    led.free("qkv_proj")
    if cells:
        led.spike(round(units.forward * px) + lse + kernel.forward_scratch(geo.cell_pixels, n_keys))
    led.add("out", px)
    led.add("lse", lse)
    led.add("edge", edge)  # the edge cells' K/V, saved: the backward sends only gradients
    led.add("out_t", px)  # out.transpose(1, 2).reshape(B, N_r, E) before out_proj
    led.add("y", px)
    saved, forward = led.live, led.peak

    # ---- backward
    led.add("d_out_t", px)
    led.add("param_grads", c.param_grads)
    led.free("out_t")
    if c.heads > 1:  # dout reaches the op as a transposed view of d_out_t: the op copies it
        led.add("dout", px)
    if cells:  # the count's backward holds the saved edge cells, which are held already
        led.spike(round((units.backward - units.edge) * px) + kernel.backward_scratch(geo.cell_pixels, n_keys, q_bytes))
    led.add("dq_dk_dv", 3 * px)
    led.free("dout", "d_out_t", "qkv", "out", "lse", "edge")  # the op's residuals go with its node
    led.add("dqkv", 3 * px)  # dq, dk, dv stacked into the projection's layout
    led.free("dq_dk_dv")
    led.add("dx", px)
    led.free("dqkv")
    return LayerMemory(saved, forward, led.peak)
