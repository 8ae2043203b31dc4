"""Gradient semantics for parameters replicated across a sequence-parallel (SP) group.

Legend: B batch, N global pixels, N_r pixels on group rank r, P size of the SP group, C channels
of the per-pixel loss, L the single-device loss, L_r rank r's local loss.

Note [sequence-parallel gradients]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Every rank of the SP group holds the same parameters ``theta`` and the pixels ``[start_r,
stop_r)`` of the field. The single-device training objective is a per-pixel mean,

    L = 1 / (B * N * C) * sum_{b, p, c} l(b, p, c),

and it splits EXACTLY into per-rank parts whose pixels are disjoint:

    L = sum_r L_r,    L_r = 1 / (B * N * C) * sum_{b, p in rank r, c} l(b, p, c).

So each rank's loss is its local SUM divided by the GLOBAL element count (:func:`sharded_mean`)
-- not its local mean, which would weight the pixels of a short shard more when N % P != 0.

Backward on rank r then yields ``dL_r/dtheta`` as seen through the computations done on rank r
only, while the distributed strategies route every cross-rank term home (the ring backward sends
dK/dV back to the rank that owns those pixels). Summing over the group gives the full gradient:

    sum_r grad_r = dL/dtheta   (all_reduce with SUM over the SP group, :func:`sync_gradients`)

after which every rank holds the single-device gradient, an optimizer step keeps the replicas
identical, and the training step equals the single-device step (up to rounding). The loss value
to log is ``sum_r L_r`` (:func:`global_loss`).

Combining with data parallelism: the SP reduction is a SUM; a data-parallel (DP) reduction on
top is the usual MEAN over the DP group (each DP replica computes its own batch's mean loss).
Tools that AVERAGE over the group they are given (DDP, FSDP2, DeepSpeed) average instead of
summing: over the SP ranks that is off by a factor P. For DDP and FSDP2 over DP x SP ranks,
:func:`ddp_sequence_parallel` and :func:`fsdp_sequence_parallel` make the reduction divide by
P_dp only (a whole-model setting, nothing per module to forget); otherwise multiply each rank's
loss by P (or divide by ``N / P`` instead of ``N``) or reduce the SP group with
:func:`sync_gradients` first.

Parameters the backward does not reach keep ``grad = None`` on every rank where no rank produced
a gradient; where only some ranks did, the others take part with zeros and end with the sum.

Note [one loss rule]
~~~~~~~~~~~~~~~~~~~~
One rule covers every output a sharded model has: **each rank's loss is its share of the
single-device loss, and the shares sum to it** (``sum_r L_r = L``). Then ``backward`` on every
rank and :func:`sync_gradients` give every rank the single-device gradient.

- A SHARDED output (one value per pixel, each rank holding its pixels): the share is the rank's
  part of the per-pixel sum, :func:`sharded_mean` (local sum / GLOBAL count).
- A REPLICATED output (the same value on every rank: a ``[B, C]`` vector after global pooling,
  ``idx_flow.Squeeze``, then a classifier's logits or a discriminator's score): every rank
  computes the whole loss ``L``, so the share is ``L / P``, :func:`replicated_loss`. Taking ``L``
  itself on every rank (the natural ``loss.mean()``) makes every gradient exactly P times too
  large after :func:`sync_gradients`, silently.
- A loss with both kinds of terms (a reconstruction plus a classifier, a generator's adversarial
  term): the sum of the terms' shares.

Why ``L / P`` is exact: a replicated activation ``y`` carries on rank r the gradient of rank r's
share only, and the all-reduce that made it sums those over the ranks on its way back (Note
[replicated activations] in :mod:`hpattn_dist.comm.all_reduce`): ``sum_r dL_r/dy = dL/dy`` reaches
every rank's pixels. The parameters after the pooling (the head) see ``dL/(P dtheta)`` on every
rank, and the sum of :func:`sync_gradients` makes that ``dL/dtheta``.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Iterable, Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from hpattn_dist.comm.agreement import agree_on_shapes, validated_signature
from hpattn_dist.comm.counters import record
from hpattn_dist.comm.groups import GroupInfo, nbytes, resolve_group
from hpattn_dist.comm.waits import run_collective
from hpattn_dist.mesh import _parent_ranks
from hpattn_dist.replicas import check_flushed_rows, flush_fingerprints, flush_row

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "broadcast_parameters", "ddp_sequence_parallel", "fsdp_sequence_parallel", "global_loss",
    "replicated_loss", "sharded_mean", "sync_gradients",
]


def sharded_mean(local: Tensor, npix: int, dim: int = 1) -> Tensor:
    """This rank's share of a per-pixel mean: local SUM / GLOBAL element count.

    Summed over the SP group it is exactly the mean over the full field (Note
    [sequence-parallel gradients]), also for uneven shards.

    Args:
        local: per-element values of this rank's shard, e.g. a squared error ``[B, N_r, C]``
            (pixels along ``dim``, any other dims); may be empty (``N_r = 0``).
        npix: the GLOBAL number of pixels ``N`` (``sum_r N_r``), the same on every rank.
        dim: the pixel dimension of ``local``.

    Returns:
        A 0-dim tensor ``local.sum() / (N * prod(other dims))``.

    Raises:
        ValueError: ``npix`` is not a positive int or ``dim`` is out of range.
    """
    if not isinstance(npix, int) or isinstance(npix, bool) or npix <= 0:
        raise ValueError(f"npix must be a positive int (the global pixel count), got {npix!r}")
    if local.dim() == 0 or not -local.dim() <= dim < local.dim():
        raise ValueError(f"dim={dim} is out of range for local of shape {tuple(local.shape)}")
    others = 1
    for i, size in enumerate(local.shape):
        if i != dim % local.dim():
            others *= size
    return local.sum() / (npix * others)


def replicated_loss(loss: Tensor, process_group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """This rank's share of a loss that every rank computes whole: ``loss / P`` (Note [one loss rule]).

    For a loss on a REPLICATED output (the same on every rank of the SP group), e.g. the cross
    entropy of a classifier after global pooling or a discriminator's score. Summed over the
    group it is ``loss``; with :func:`sync_gradients` the gradients are the single-device ones.
    Add it to the shares of sharded terms (:func:`sharded_mean`) for a loss with both.

    Args:
        loss: the loss every rank computed from the replicated output (any shape; usually 0-dim).
        process_group: the SP group (None: the default group, or one process when
            ``torch.distributed`` is not initialised). It does not communicate.

    Returns:
        ``loss / P``.

    Raises:
        ValueError: ``loss`` is not a floating tensor.
    """
    if not isinstance(loss, Tensor) or not (loss.is_floating_point() or loss.is_complex()):
        raise ValueError(f"replicated_loss: expected a floating tensor, got "
                         f"{getattr(loss, 'dtype', type(loss).__name__)}")
    return loss / resolve_group(process_group, "process_group").world_size


def global_loss(local_loss: Tensor, process_group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """The single-device loss value ``sum_r L_r`` on every rank (for logging; no autograd).

    Args:
        local_loss: this rank's 0-dim loss ``L_r`` (e.g. from :func:`sharded_mean`).
        process_group: the SP group (None: the default group, or no communication when
            ``torch.distributed`` is not initialised).

    Returns:
        A detached 0-dim tensor, identical on every rank.
    """
    info = resolve_group(process_group, "process_group")
    total = local_loss.detach().clone()
    if info.world_size > 1:
        run_collective(info, "all_reduce", "an all_reduce", lambda: dist.all_reduce(
            total, op=dist.ReduceOp.SUM, group=info.group, async_op=True), total.device)
        record("all_reduce", 2 * (info.world_size - 1) * nbytes(total) // info.world_size)
    return total


ParamsLike = Union[nn.Module, Iterable[nn.Parameter]]


def sync_gradients(
    parameters: ParamsLike, process_group: Optional[dist.ProcessGroup] = None
) -> None:
    """Sum parameter gradients over the SP group, in place, so every rank has the full gradient.

    Call it after ``loss.backward()`` and before ``optimizer.step()``, with each rank's loss
    scaled as in Note [sequence-parallel gradients] (:func:`sharded_mean`). Gradients are
    coalesced into ONE flat buffer per (dtype, device) and reduced with one ``all_reduce(SUM)``
    per buffer; each buffer also carries one presence flag per parameter, so ranks that disagree
    on which gradients exist neither hang nor mis-align (see the module notes).

    Args:
        parameters: a module (its ``parameters()``) or an iterable of parameters, in the SAME
            order on every rank. Parameters with ``requires_grad=False`` are skipped.
        process_group: the SP group (None: the default group; nothing to do with one process).

    Raises:
        ValueError: on every rank, when a parameter's gradient is sparse on any rank, or when the
            ranks' parameters differ in number, shape, dtype, device type or ``requires_grad``
            (the message names the first that differs): their buffers would not pair up; or
            when the layers' parameter fingerprints still deferred from the forward on a device
            differ (Note [fingerprint one call late] in :mod:`hpattn_dist.replicas`).

    Communication: one metadata ``all_gather`` (the bucket layout, Note [fail together]), then
    per buffer one ``all_reduce`` recorded under ``"all_reduce"``.
    """
    every = list(parameters.parameters() if isinstance(parameters, nn.Module) else parameters)
    params = [p for p in every if p.requires_grad]
    info = resolve_group(process_group, "process_group")
    if info.world_size == 1:
        return
    _agree_on_buckets(info, every)
    if not params:
        return

    buckets: dict[tuple[str, str], list[nn.Parameter]] = {}
    for p in params:
        buckets.setdefault((str(p.dtype), str(p.device)), []).append(p)

    # Same key order on every rank, so the collectives pair up.
    for key in sorted(buckets):
        bucket = buckets[key]
        numel = sum(p.numel() for p in bucket)
        flat = torch.zeros(numel + len(bucket), dtype=bucket[0].dtype, device=bucket[0].device)
        offset = 0
        for i, p in enumerate(bucket):
            if p.grad is not None:
                flat[offset : offset + p.numel()].copy_(p.grad.reshape(-1))
                flat[numel + i] = 1
            offset += p.numel()
        run_collective(info, "all_reduce", "an all_reduce", lambda: dist.all_reduce(
            flat, op=dist.ReduceOp.SUM, group=info.group, async_op=True), flat.device)
        record("all_reduce", 2 * (info.world_size - 1) * nbytes(flat) // info.world_size)
        present = (flat[numel:] > 0).tolist()  # one device sync per buffer
        offset = 0
        for i, p in enumerate(bucket):
            if present[i]:
                reduced = flat[offset : offset + p.numel()].view_as(p)
                if p.grad is None:
                    p.grad = reduced.clone()
                else:
                    p.grad.copy_(reduced)
            offset += p.numel()


def _layout(params: list) -> list[tuple]:
    """What decides :func:`sync_gradients`' buffers: each parameter's trainability, dtype, device
    type and shape, in order."""
    return [(bool(p.requires_grad), str(p.dtype).replace("torch.", ""), p.device.type, tuple(p.shape))
            for p in params]


def _agree_on_buckets(info: GroupInfo, params: list) -> None:
    """One agreement on the parameters' layout before the buffers are reduced, so that ranks whose
    buffers would differ in size raise together instead of aborting inside the all_reduce (Note
    [fail together]); the sparse-gradient refusal travels in it too."""
    layout = _layout(params)
    try:
        with validated_signature(info, "sync_gradients") as sig:
            for i, p in enumerate(params):
                if p.requires_grad and p.grad is not None and p.grad.is_sparse:
                    raise ValueError(f"sync_gradients: the gradient of parameter {i} is sparse (not supported)")
            # The layers' fingerprints still on their way to the host, checked before the
            # optimizer step (Note [fingerprint one call late] in replicas.py).
            flushed = flush_fingerprints(params)
            sig.set({"parameters": len(params), "layout_crc32": zlib.crc32(repr(layout).encode())},
                    flush_row(flushed), params[0].device if params else None)
    except ValueError as err:
        # Every rank holds the same rows and is here: name the first parameter that differs.
        layouts: list = [None] * info.world_size
        dist.all_gather_object(layouts, layout, group=info.group)
        for i in range(max(len(t) for t in layouts)):
            entries = [t[i] if i < len(t) else None for t in layouts]
            if any(e != entries[0] for e in entries):
                table = "; ".join(f"{info.describe_rank(r)}: " + (
                    "none" if e is None else f"requires_grad={e[0]}, {e[1]} on {e[2]}, shape {e[3]}")
                    for r, e in enumerate(entries))
                raise ValueError(
                    f"sync_gradients: the ranks' parameters differ at parameter {i} (pass the same "
                    f"parameters, with the same requires_grad and dtype, in the same order on every "
                    f"rank): {table}") from err
        raise
    check_flushed_rows(info, "sync_gradients", flushed, sig.per_rank)


def broadcast_parameters(
    module: ParamsLike, process_group: Optional[dist.ProcessGroup] = None, *, buffers: bool = True
) -> None:
    """Copy group rank 0's parameters (and buffers) to every rank of the group, in place.

    Replicated parameters must be equal on every rank of the SP group (the layers check it on
    every call, Note [replicated parameter check] in :mod:`hpattn_dist.replicas`). Call this once
    after building the model on every rank, when the ranks did not seed identically or loaded
    different checkpoints; it is collective over ``process_group``. The tensors are coalesced into
    ONE flat buffer per (dtype, device), one ``broadcast`` each; the ``Parameter`` objects stay
    the same (an optimizer built before keeps working).

    Args:
        module: a module (its parameters and, with ``buffers``, its floating buffers) or an
            iterable of parameters, in the SAME order on every rank.
        process_group: the SP group (None: the default group; nothing to do with one process).
        buffers: also broadcast a module's buffers (e.g. BatchNorm running statistics).

    Raises:
        ValueError: the ranks hold different numbers or shapes of tensors (every rank raises; a
            short all_gather of the layout comes first).

    Communication: one metadata ``all_gather`` and one ``broadcast`` per buffer, recorded under
    ``"broadcast"``.
    """
    if isinstance(module, nn.Module):
        tensors = list(module.parameters())
        if buffers:
            tensors += [b for b in module.buffers() if b.dtype.is_floating_point or b.dtype.is_complex]
    else:
        tensors = list(module)
    info = resolve_group(process_group, "process_group")
    if info.world_size == 1:
        return
    layout = zlib.crc32(repr([(tuple(t.shape), str(t.dtype)) for t in tensors]).encode())
    device = tensors[0].device if tensors else torch.device("cpu")
    agree_on_shapes(info, device, {"tensors": len(tensors), "layout_crc32": layout}, 0, "broadcast_parameters")
    buckets: dict[tuple[str, str], list[Tensor]] = {}
    for t in tensors:
        buckets.setdefault((str(t.dtype), str(t.device)), []).append(t)
    src = info.global_rank(0)
    for key in sorted(buckets):
        bucket = buckets[key]
        with torch.no_grad():
            flat = torch.cat([t.detach().reshape(-1) for t in bucket])
            run_collective(info, "broadcast", "a broadcast", lambda: dist.broadcast(
                flat, src=src, group=info.group, async_op=True), flat.device)
            record("broadcast", nbytes(flat) if info.rank == 0 else 0)
            offset = 0
            for t in bucket:
                t.copy_(flat[offset: offset + t.numel()].view_as(t))
                offset += t.numel()


def _check_sp_split(model: nn.Module, reduce_ranks: tuple[int, ...], sp_size: int, who: str) -> int:
    """``P_dp = len(reduce_ranks) / sp_size`` after checking that it is one.

    The gradient reduction must run over data-parallel replicas of whole SP groups: ``sp_size``
    divides the reduction group, and every ``hpattn_dist`` layer of ``model`` shards its pixels
    over ``sp_size`` ranks of that group (a layer on WORLD, or on a group outside the reduction,
    would be summed over the wrong ranks). The check is local and identical on every rank.
    """
    if not isinstance(sp_size, int) or isinstance(sp_size, bool) or sp_size < 1:
        raise ValueError(f"{who}: sp_size must be a positive int, got {sp_size!r}")
    world = len(reduce_ranks)
    if world % sp_size:
        raise ValueError(f"{who}: sp_size={sp_size} does not divide the size {world} of the group "
                         "the gradients are reduced over")
    for name, m in model.named_modules():
        # The MRO, not type(m): fully_shard swaps the class for a subclass defined in torch.
        ours = any(c.__module__.startswith("hpattn_dist.") for c in type(m).__mro__)
        if not ours or not hasattr(m, "process_group"):
            continue
        group = m.process_group
        if group is not None and not isinstance(group, dist.ProcessGroup):
            continue  # unbound after unpickling: the layer itself raises on use
        ranks = _parent_ranks(group)
        if len(ranks) != sp_size or not set(ranks) <= set(reduce_ranks):
            raise ValueError(
                f"{who}: layer {name or type(m).__name__!r} shards its pixels over global ranks "
                f"{list(ranks)}, which is not a group of sp_size={sp_size} ranks inside the "
                f"gradient reduction group (global ranks {list(reduce_ranks)}); build the layers "
                "with process_group=<the sequence-parallel group>")
    return world // sp_size


def fsdp_sequence_parallel(model: nn.Module, mesh: "DeviceMesh", sp_size: int) -> int:
    """Make FSDP2 reduce the gradients of a sequence-parallel model correctly: SUM over the SP
    ranks, MEAN over the data-parallel ones (Note [sequence-parallel gradients]).

    FSDP2 (``fully_shard`` over a mesh whose ranks are DP x SP, torchtitan style) divides the
    reduced gradient by the number of ranks it reduces over, ``mesh.size() = P_dp * P_sp``, which
    is P_sp too many. This sets the divide factor ``P_dp = mesh.size() / sp_size`` on EVERY
    ``FSDPModule`` inside ``model`` (the root only would leave the other modules' gradients P_sp
    times too small). Call it after the last ``fully_shard``; each rank's loss is then its
    per-sample mean with the pixel sum divided by the GLOBAL pixel count (:func:`sharded_mean`).
    On a CPU mesh it also makes FSDP sum, then divide (a float32 factor would otherwise become
    ``ReduceOp.PREMUL_SUM``, which gloo does not have).

    Args:
        model: the model after ``fully_shard``.
        mesh: the ``DeviceMesh`` passed to ``fully_shard`` (1-D, e.g. the flattened
            ``("dp", "sp")`` mesh; or 2-D for HSDP): FSDP reduces over all its ranks.
        sp_size: the number of ranks sharding the pixels (P_sp).

    Returns:
        The number of FSDP modules set (at least 1).

    Raises:
        ValueError: ``sp_size`` is not a positive int dividing ``mesh.size()``; ``model`` holds
            no FSDP module; a trainable parameter is not sharded by FSDP (its gradient would not
            be reduced) or lives on a mesh of other ranks than ``mesh`` (not the mesh given to
            ``fully_shard``, or FSDP composed with tensor parallelism, which this does not
            handle); an ``hpattn_dist`` layer's group is not ``sp_size`` ranks of ``mesh``.
    """
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    who = "fsdp_sequence_parallel"
    if not isinstance(mesh, DeviceMesh):
        raise ValueError(f"{who}: mesh must be the DeviceMesh passed to fully_shard, "
                         f"got {type(mesh).__name__}")
    ranks = tuple(sorted(mesh.mesh.flatten().tolist()))
    dp_size = _check_sp_split(model, ranks, sp_size, who)
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not modules:
        raise ValueError(f"{who}: the model holds no FSDP module; call fully_shard first")
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if not isinstance(p, DTensor):
            raise ValueError(f"{who}: parameter {name!r} is not sharded by FSDP, so its gradient "
                             "would not be reduced; fully_shard the root module too")
        held = tuple(sorted(p.device_mesh.mesh.flatten().tolist()))
        if held != ranks:
            raise ValueError(
                f"{who}: parameter {name!r} lives on a mesh of global ranks {list(held)}, not on the "
                f"ranks {list(ranks)} of the mesh passed in; pass the mesh given to fully_shard "
                "(FSDP composed with tensor parallelism is not handled)")
    for m in modules:
        m.set_gradient_divide_factor(float(dp_size))
        if mesh.device_type == "cpu":
            m.set_force_sum_reduction_for_comms(True)
    return len(modules)


def _sp_allreduce_hook(state, bucket):  # type: ignore[no-untyped-def]
    """DDP comm hook: ``bucket`` (``dist.GradBucket``) / P_dp, summed over DDP's group.

    ``state`` is ``(group, P_dp)``; returns a ``torch.futures.Future[Tensor]``. Not annotated:
    under ``from __future__ import annotations`` the annotations are strings, which DDP's hook
    check rejects.
    """
    group, dp_size = state
    buf = bucket.buffer()
    buf.div_(dp_size)  # before the sum, as DDP's own hook does (fp16 range)
    fut = dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def ddp_sequence_parallel(ddp_model: nn.Module, sp_size: int) -> int:
    """Make DDP reduce the gradients of a sequence-parallel model correctly: SUM over the SP
    ranks, MEAN over the data-parallel ones (Note [sequence-parallel gradients]).

    DDP over DP x SP ranks averages over all of them, P_sp too many. This registers a DDP
    communication hook (``register_comm_hook``) that divides each gradient bucket by
    ``P_dp = P_ddp / sp_size`` and all-reduces it with SUM over DDP's group: a whole-model
    setting, nothing per module to forget. Call it once, right after wrapping and before the
    first backward; each rank's loss is its per-sample mean with the pixel sum divided by the
    GLOBAL pixel count (:func:`sharded_mean`), as for FSDP2.

    Args:
        ddp_model: the ``DistributedDataParallel`` model, built over a group (or 1-D
            ``device_mesh``) holding whole SP groups (DP x SP ranks).
        sp_size: the number of ranks sharding the pixels (P_sp).

    Returns:
        ``P_dp``, the factor the summed gradients are divided by.

    Raises:
        ValueError: ``ddp_model`` is not a ``DistributedDataParallel``; ``sp_size`` is not a
            positive int dividing DDP's group size; an ``hpattn_dist`` layer's group is not
            ``sp_size`` ranks of DDP's group. DDP itself raises if a comm hook is already set.
    """
    from torch.nn.parallel import DistributedDataParallel

    who = "ddp_sequence_parallel"
    if not isinstance(ddp_model, DistributedDataParallel):
        raise ValueError(f"{who}: expected a DistributedDataParallel model, "
                         f"got {type(ddp_model).__name__}")
    group = ddp_model.process_group
    dp_size = _check_sp_split(ddp_model.module, _parent_ranks(group), sp_size, who)
    ddp_model.register_comm_hook((group, dp_size), _sp_allreduce_hook)
    return dp_size
