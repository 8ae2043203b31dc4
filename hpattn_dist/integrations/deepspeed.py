"""DeepSpeed integration: an ``mpu`` for sequence parallelism, the loss convention, config checks.

    mpu = sequence_parallel_mpu(sequence_parallel_size=2)        # after init_process_group
    model = convert_spatial_attention(model, process_group=mpu.get_sequence_parallel_group())
    engine, *_ = initialize(model, "configs/deepspeed/zero2.json", mpu)   # deepspeed.initialize
    loss = sharded_mean(err_local, npix) * deepspeed_loss_factor(engine)
    engine.backward(loss); engine.step()

Legend: W world size, S sequence-parallel group size, R = W / S data-parallel replicas, N global
pixels, N_r pixels on this rank, B micro-batch per replica, C loss channels.

Rank layout (the same as DeepSpeed's own ``parallel_state_sp``): consecutive ranks form a
sequence-parallel (sp) group, ``sp_i = [i*S, ..., i*S + S - 1]``; the ranks at the same position
of their sp groups form a data-parallel (dp) group, ``dp_j = [j, j + S, j + 2S, ...]``; the
sequence-data-parallel (sdp) group is every rank. ZeRO partitions parameters, gradients and
optimizer state over the sdp group; the ranks of one sp group see the same samples (different
pixels of them), each sp group its own slice of the global batch.

Note [DeepSpeed gradient scaling]
    DeepSpeed 0.19.8 sums each gradient over the sdp group (W ranks) and divides by

    - ``R = W / S`` in ZeRO-0 (``engine._reduce_non_expert_gradients``, engine.py:3884), ZeRO-1/2
      (``stage_1_and_2.py``: average_tensor :1688, allreduce_bucket :1508 and :2380) and ZeRO-3
      with ``reduce_scatter: false`` on its contiguous-bucket path (``stage3.py:1878``);
    - ``W`` in ZeRO-3's default reduce-scatter path (``stage3.py`` ``__avg_scatter_grads`` ->
      ``reduce_scatter_coalesced``, which pre-divides by the group size and ignores S; also taken
      with ``reduce_scatter: false`` when ``contiguous_gradients`` is off or a bucket overflows).

    The single-device model trained on the global batch (R * B samples) with a per-element mean
    loss has gradient ``mean over replicas of grad(L_replica)``, ``L_replica`` the mean over that
    replica's B samples and ALL N pixels. With each rank's loss ``L_rank = local SUM / (B N C)``
    (:func:`hpattn_dist.grad_sync.sharded_mean`: the local sum over the GLOBAL element count of
    the replica), the S ranks of a replica sum to ``L_replica``, and since the attention backward
    sends every key/value gradient home, ``sum over the replica's ranks of g_rank`` is
    ``grad(L_replica)``. So the applied gradient ``(1 / divisor) * sum over W ranks of g_rank``
    is the single-device gradient when each rank's loss is

        L_rank * divisor / R,   i.e.  L_rank * 1 (divisor R)   or   L_rank * S (divisor W).

    :func:`deepspeed_loss_factor` returns that factor for an engine (it refuses the ZeRO-3
    configuration whose divisor depends on bucket sizes). The value to log is the sp-group sum of
    the unscaled ``L_rank`` (:func:`hpattn_dist.grad_sync.global_loss`), averaged over replicas.
    ``tests/integration/test_deepspeed.py`` checks the resulting steps against single-device
    training for ZeRO 0-3.

Note [mpu semantics]
    DeepSpeed reads three families of groups from an ``mpu``:

    - ``get_sequence_parallel_*`` / ``get_sequence_data_parallel_*``: the sp and sdp groups. The
      sdp group is what ZeRO shards and reduces over, and the engine broadcasts the initial
      weights over it (``_broadcast_model``), which makes the ranks of an sp group start equal.
      Without an ``mpu`` (``"sequence_parallel_size"`` in the config only) that broadcast is over
      the plain data-parallel group and sp ranks can train different weights (DeepSpeed issue
      6868): :func:`check_deepspeed_config` warns about it.
    - ``get_data_parallel_*``: the replicas (size R). DeepSpeed uses it for batch-size arithmetic
      (``train_batch_size = micro_batch * grad_accum * R``), its data sampler (the ranks of one sp
      group must read the same sample) and, for ZeRO-3 modules that have no ZeRO parameters yet,
      as the parameter partition group: see Note [ZeRO-3 partition group].
    - ``get_model_parallel_*`` / ``get_tensor_model_parallel_*`` / ``get_pipeline_*``: a group of
      this rank alone. Parameters are replicated, not split, across an sp group, so gradient-norm
      sums over the model-parallel group (gradient clipping) must not add the S identical copies;
      a one-rank group makes those all-reduces no-ops. With the sp group here instead, the
      clipped ZeRO 0-2 steps are 29% off (measured). (DeepSpeed's own ``parallel_state_sp``
      aliases model-parallel = sp and carries an ``initialize_sequence_parallel`` attribute that
      makes DeepSpeed's ``groups`` module and ZeRO optimizers ignore its model- and data-parallel
      groups, though not ZeRO-0's clipping; this class has no such attribute and answers every
      query itself.)

Note [ZeRO-3 partition group]
    For ZeRO-3 DeepSpeed converts a module that has no ZeRO parameters with
    ``zero.Init(module=..., data_parallel_group=mpu.get_data_parallel_group())`` (the R replicas),
    while the stage-3 optimizer partitions over the sdp group (W ranks): with S > 1 the ranks then
    disagree and training is wrong (measured: 6e-2 relative parameter error after one step, and
    different parameters on different ranks). :func:`zero3_init` partitions over the sdp group
    instead and broadcasts from its first rank: build the model inside it, or let it convert a
    built model; :func:`initialize` does the latter for stage 3.

Importing this module does not import deepspeed; the functions that need it import it when called.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist

__all__ = [
    "SequenceParallelMPU",
    "check_deepspeed_config",
    "deepspeed_loss_factor",
    "initialize",
    "sequence_parallel_mpu",
    "zero3_init",
]

ConfigLike = Union[str, os.PathLike, dict]


@dataclass(frozen=True)
class _Axis:
    """One parallel axis as this rank sees it: the group, its global ranks, this rank's index."""

    group: dist.ProcessGroup
    ranks: tuple[int, ...]
    rank: int

    @property
    def world_size(self) -> int:
        return len(self.ranks)


class _Lookup:
    """An ``mpu`` method: ``convert(field)`` of :class:`_Axis` ``axis`` (one row of the table DeepSpeed
    reads), a plain function named after the first attribute that holds it (as tracebacks and
    ``repr`` show it)."""

    def __init__(self, axis: str, field: str, convert: Callable[[Any], Any] = lambda value: value) -> None:
        def get(mpu: "SequenceParallelMPU") -> Any:
            return convert(getattr(getattr(mpu, axis), field))

        self.fn, self.named = get, False

    def __set_name__(self, owner: type, name: str) -> None:
        if not self.named:  # an alias (get_tensor_model_parallel_group = ...) keeps the first name
            self.fn.__name__, self.fn.__qualname__ = name, f"{owner.__qualname__}.{name}"
            self.named = True

    def __get__(self, obj: Any, owner: Optional[type] = None) -> Any:
        return self.fn.__get__(obj, owner)


@dataclass(frozen=True)
class SequenceParallelMPU:
    """The ``mpu`` DeepSpeed reads, for S-way sequence x R-way data parallelism.

    Built by :func:`sequence_parallel_mpu`; pass it as ``deepspeed.initialize(..., mpu=mpu)`` (or
    use :func:`initialize`) and give :meth:`get_sequence_parallel_group` to the attention layers.
    Group semantics: Note [mpu semantics]. Every method is a lookup of one axis (no communication):
    the class body is the table of DeepSpeed's method names.

    Attributes:
        sp: the sequence-parallel axis (size S, consecutive global ranks).
        dp: the data-parallel axis (size R, global ranks ``j, j + S, ...``).
        sdp: the sequence-data-parallel axis (all W ranks).
        single: this rank alone (the model-, tensor- and pipeline-parallel group).
    """

    sp: _Axis
    dp: _Axis
    sdp: _Axis
    single: _Axis

    # sequence parallel: the group the attention layers shard pixels over
    get_sequence_parallel_group = _Lookup("sp", "group")
    get_sequence_parallel_world_size = _Lookup("sp", "world_size")
    get_sequence_parallel_rank = _Lookup("sp", "rank")
    get_sequence_parallel_src_rank = _Lookup("sp", "ranks", itemgetter(0))  # global rank of the group's first rank
    # sequence x data parallel: what ZeRO shards and reduces over
    get_sequence_data_parallel_group = _Lookup("sdp", "group")
    get_sequence_data_parallel_world_size = _Lookup("sdp", "world_size")
    get_sequence_data_parallel_rank = _Lookup("sdp", "rank")
    # data parallel: the replicas
    get_data_parallel_group = _Lookup("dp", "group")
    get_data_parallel_world_size = _Lookup("dp", "world_size")
    get_data_parallel_rank = _Lookup("dp", "rank")
    get_data_parallel_group_ranks = _Lookup("dp", "ranks", list)
    get_data_parallel_src_rank = _Lookup("dp", "ranks", itemgetter(0))
    # model / tensor / pipeline parallel: this rank alone (world size 1, rank 0)
    get_model_parallel_group = _Lookup("single", "group")
    get_model_parallel_world_size = _Lookup("single", "world_size")
    get_model_parallel_rank = _Lookup("single", "rank")
    get_model_parallel_src_rank = _Lookup("single", "ranks", itemgetter(0))

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_src_rank = get_model_parallel_src_rank
    get_pipeline_model_parallel_group = get_model_parallel_group
    get_pipeline_model_parallel_world_size = get_model_parallel_world_size
    get_pipeline_model_parallel_rank = get_model_parallel_rank

    def __repr__(self) -> str:
        return (
            f"SequenceParallelMPU(world={self.sdp.world_size}, sp={list(self.sp.ranks)}, "
            f"dp={list(self.dp.ranks)}, rank={self.sdp.rank})"
        )


def _axis(rank_lists: Sequence[Sequence[int]], me: int) -> _Axis:
    """One process group per rank list, created by every process in the same order (as
    ``dist.new_group`` requires); returns this rank's."""
    mine: Optional[_Axis] = None
    for ranks in rank_lists:
        group = dist.new_group(list(ranks))
        if me in ranks:
            mine = _Axis(group, tuple(ranks), list(ranks).index(me))
    assert mine is not None, "the rank lists cover every rank by construction"
    return mine


def sequence_parallel_mpu(sequence_parallel_size: int) -> SequenceParallelMPU:
    """Build the sp, dp and sdp groups for S-way sequence parallelism; return the ``mpu``.

    Collective over the default process group: every process calls it with the same argument.
    It creates ``R + S + 1`` groups, plus one single-rank group per process (all in one split under
    a bound device, else by each process alone: :func:`_single_rank_group`).

    Args:
        sequence_parallel_size: S, the number of consecutive ranks that share one sample's pixels;
            a positive divisor of the world size W.

    Returns:
        A :class:`SequenceParallelMPU`.

    Raises:
        ValueError: torch.distributed is not initialised, or S does not divide W.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "sequence_parallel_mpu: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group (or deepspeed.init_distributed) first"
        )
    world, me = dist.get_world_size(), dist.get_rank()
    size = sequence_parallel_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or world % size:
        raise ValueError(
            f"sequence_parallel_size must be a positive divisor of the world size {world}, "
            f"got {sequence_parallel_size!r}"
        )
    replicas = world // size
    sp = _axis([range(i * size, (i + 1) * size) for i in range(replicas)], me)
    dp = _axis([range(j, world, size) for j in range(size)], me)
    sdp = _axis([range(world)], me)
    single = _Axis(_single_rank_group(me, world), (me,), 0)
    return SequenceParallelMPU(sp=sp, dp=dp, sdp=sdp, single=single)


def _single_rank_group(me: int, world: int) -> dist.ProcessGroup:
    """This process alone, as a group. Under a bound device (``init_process_group(device_id=...)``)
    every new NCCL group is a communicator split of WORLD that all ranks join, so one process
    creating its own group alone would wait for the others' matching splits: the W single-rank
    groups are split off in ONE call instead (``dist.split_group``, one ``ncclCommSplit``).
    Unbound (gloo, lazily initialised NCCL) each process creates its own, alone."""
    default = dist.distributed_c10d._get_default_group()
    if getattr(default, "bound_device_id", None) is not None:
        return dist.split_group(split_ranks=[[r] for r in range(world)])
    return dist.new_group([me], use_local_synchronization=True)


def deepspeed_loss_factor(engine: Any) -> float:
    """The factor on each rank's loss that makes DeepSpeed's step the single-device step.

    Each rank's loss must be ``sharded_mean(...) * deepspeed_loss_factor(engine)`` (its local sum
    over the replica's global element count, times this factor): 1 for ZeRO 0, 1, 2, S for ZeRO-3
    with its default ``reduce_scatter`` (Note [DeepSpeed gradient scaling]).

    Args:
        engine: a ``deepspeed.DeepSpeedEngine`` (built with a :class:`SequenceParallelMPU`).

    Raises:
        ValueError: ZeRO-3 with ``reduce_scatter: false`` and ``contiguous_gradients: true`` and
            S > 1, where DeepSpeed 0.19.8 divides some buckets by R and others by W.
    """
    size = int(getattr(engine, "sequence_parallel_size", 1) or 1)
    if size == 1 or engine.zero_optimization_stage() != 3:
        return 1.0
    if engine.zero_reduce_scatter() or not engine.zero_contiguous_gradients():
        return float(size)
    raise ValueError(
        "ZeRO-3 with reduce_scatter=false and contiguous_gradients=true: DeepSpeed 0.19.8 divides "
        "the gradient by W/S or by W depending on bucket sizes (Note [DeepSpeed gradient "
        "scaling]); set zero_optimization.reduce_scatter to true"
    )


def _load_config(config: ConfigLike) -> dict:
    if isinstance(config, dict):
        return config
    with open(config, encoding="utf-8") as fh:
        return json.load(fh)


def check_deepspeed_config(config: ConfigLike, mpu: Optional[SequenceParallelMPU]) -> dict:
    """Check a DeepSpeed config against the ``mpu``; return it as a dict.

    Warns (``UserWarning``) when the config sets ``sequence_parallel_size`` > 1 and ``mpu`` is
    None: DeepSpeed then broadcasts the initial weights over the data-parallel group only and the
    ranks of a sequence-parallel group may train different weights (DeepSpeed issue 6868).

    Raises:
        ValueError: the config's ``sequence_parallel_size`` differs from the mpu's S.
    """
    cfg = _load_config(config)
    size = cfg.get("sequence_parallel_size")
    if mpu is None:
        if size is not None and int(size) > 1:
            warnings.warn(
                f"the DeepSpeed config sets sequence_parallel_size={size} but no mpu is given: "
                "DeepSpeed then leaves the ranks of a sequence-parallel group with different "
                "weights (DeepSpeed issue 6868). Pass hpattn_dist.integrations.deepspeed."
                "sequence_parallel_mpu(...) as deepspeed.initialize(..., mpu=mpu).",
                UserWarning,
                stacklevel=2,
            )
        return cfg
    if size is not None and int(size) != mpu.get_sequence_parallel_world_size():
        raise ValueError(
            f"config sequence_parallel_size={size} differs from the mpu's sequence-parallel size "
            f"{mpu.get_sequence_parallel_world_size()}; drop the key (the mpu decides)"
        )
    return cfg


def zero3_init(
    mpu: SequenceParallelMPU,
    config: Optional[ConfigLike] = None,
    module: Optional[torch.nn.Module] = None,
    **kwargs: Any,
):
    """``deepspeed.zero.Init`` partitioning over the sdp group (Note [ZeRO-3 partition group]).

    With ``module=None`` it is a context manager: build the model inside it. With ``module``, the
    module's parameters are converted at once. Either way every parameter is broadcast from the
    first rank, then partitioned. ``kwargs`` go to ``deepspeed.zero.Init``.
    """
    import deepspeed  # noqa: PLC0415 - optional dependency, imported on use

    cfg = None if config is None else _load_config(config)
    return deepspeed.zero.Init(
        module=module,
        data_parallel_group=mpu.get_sequence_data_parallel_group(),
        config_dict_or_path=cfg,
        mpu=mpu,
        **kwargs,
    )


def initialize(model: torch.nn.Module, config: ConfigLike, mpu: SequenceParallelMPU, **kwargs: Any):
    """``deepspeed.initialize(model=model, config=config, mpu=mpu, **kwargs)``, made safe.

    Checks the config (:func:`check_deepspeed_config`) and, for ZeRO-3 with a model that has no
    ZeRO parameters yet, converts it with :func:`zero3_init` first (Note [ZeRO-3 partition
    group]). ``model_parameters`` defaults to the trainable parameters. Returns what
    ``deepspeed.initialize`` returns: ``(engine, optimizer, dataloader, lr_scheduler)``.
    """
    import deepspeed  # noqa: PLC0415

    cfg = check_deepspeed_config(config, mpu)
    stage = int(cfg.get("zero_optimization", {}).get("stage", 0))
    if stage == 3 and not any(hasattr(p, "ds_id") for p in model.parameters()):
        zero3_init(mpu, cfg, module=model)
    kwargs.setdefault("model_parameters", [p for p in model.parameters() if p.requires_grad])
    return deepspeed.initialize(model=model, config=cfg, mpu=mpu, **kwargs)
