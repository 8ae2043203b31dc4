"""DeepSpeed integration on real engines (CPU, gloo): sequence parallelism x ZeRO 0-3 trains
exactly like one device, DeepSpeed's own Ulysses agrees with ours and with float64, the example
script runs under torchrun.

Engines are slow to start, so each world size is ONE run_ranks call that trains every ZeRO stage
in turn (one model, one engine per stage) and returns parameter snapshots; the parent compares
them with a float64 single-device run on the same global batch.

Legend: W world size, S sequence-parallel size, R = W / S replicas, B micro-batch per replica,
N pixels.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

if "deepspeed" not in sys.modules:
    # These tests run gloo on CPU: keep DeepSpeed from picking (or probing for) a GPU.
    os.environ["DS_ACCELERATOR"] = "cpu"
deepspeed = pytest.importorskip(
    "deepspeed", reason="deepspeed is not installed (pip install -e '.[test]' installs it)"
)

from hpattn_dist import convert_spatial_attention  # noqa: E402
from hpattn_dist.grad_sync import global_loss  # noqa: E402
from hpattn_dist.healpix import nside2npix, shard_bounds  # noqa: E402
from hpattn_dist.integrations.deepspeed import (  # noqa: E402
    check_deepspeed_config,
    deepspeed_loss_factor,
    initialize,
    sequence_parallel_mpu,
)
from hpattn_dist.strategies import sharded_attention  # noqa: E402
from launch.healpix_model import ModelConfig, build_model, local_loss, make_batch  # noqa: E402
from tests.harness import run_ranks  # noqa: E402
from tests.reference import reference_attention  # noqa: E402

pytestmark = pytest.mark.deepspeed

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "configs" / "deepspeed"
STAGES = (0, 1, 2, 3)
STEPS = 3
SNAPSHOT_STEPS = (1, 3)
NSIDE = 2  # N = 48 pixels
GLOBAL_BATCH = 2  # R * B for both world sizes
LR = 0.05
CLIP = 1.0  # the shipped configs' clipping; the gradient norms here are 4-11, so it acts
SEED = 1234
MODEL = dict(embed_dim=16, num_heads=2, depth=2, mlp_ratio=2.0, attn_backend="auto")
RTOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def deepspeed_cpu_op() -> None:
    """Build, or load from the torch-extensions cache, the op DeepSpeed's CPU backend compiles
    with g++/ninja at its first ``init_distributed`` (deepspeed_shm_comm, used for inference
    all-reduces only). Done once here, in one process, so that the ranks below and the script find
    it cached instead of compiling it concurrently inside their timeouts (about 1-3 minutes on 2
    cores when the cache is cold)."""
    from deepspeed.comm.torch import build_shm_op

    t0 = time.perf_counter()
    try:
        build_shm_op()
    except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, ...
        pytest.skip(f"DeepSpeed cannot build its CPU communication op here: {exc}")
    elapsed = time.perf_counter() - t0
    if elapsed > 5:
        print(f"\nDeepSpeed CPU op JIT build: {elapsed:.1f} s (now cached)")


def _model_cfg() -> ModelConfig:
    return ModelConfig(batch_size=GLOBAL_BATCH, **MODEL)


def _batches(dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(SEED + 1)
    return [make_batch(_model_cfg(), NSIDE, gen, dtype=dtype) for _ in range(STEPS)]


def _ds_config(stage: int, micro_batch: int, clip: float) -> dict:
    """The shipped fp32 config of ``stage`` with SGD, clipping ``clip`` and this micro-batch."""
    cfg = check_deepspeed_config(CONFIGS / f"zero{stage}.json", None)
    cfg = dict(cfg)
    cfg.update(
        train_micro_batch_size_per_gpu=micro_batch,
        gradient_accumulation_steps=1,
        gradient_clipping=clip,  # 0.0 = off; DeepSpeed >= 0.19.3 clips to 1.0 by default
        optimizer={"type": "SGD", "params": {"lr": LR}},
        zero_allow_untested_optimizer=True,
        steps_per_print=10**9,
    )
    cfg.pop("train_batch_size", None)
    cfg.pop("scheduler", None)
    return cfg


def _ds_env(rank: int, world_size: int) -> None:
    # deepspeed.init_distributed reads these; the harness already initialised torch.distributed.
    os.environ.update(
        DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )


def _full_params(engine, stage: int) -> dict[str, torch.Tensor]:
    params = dict(engine.module.named_parameters())
    if stage == 3:
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            return {n: p.detach().clone() for n, p in params.items()}
    return {n: p.detach().clone() for n, p in params.items()}


def _train_every_stage(rank: int, world_size: int, sp_size: int, variants: list) -> dict:
    """Train ``STEPS`` steps for each ``(ZeRO stage, clip)``; return snapshots, losses, mpu facts."""
    _ds_env(rank, world_size)
    deepspeed.init_distributed(dist_backend="gloo")
    mpu = sequence_parallel_mpu(sp_size)
    out: dict = {
        "sp_ranks": mpu.sp.ranks, "dp_ranks": mpu.dp.ranks, "sdp_size": mpu.sdp.world_size,
        "sp": (mpu.get_sequence_parallel_rank(), mpu.get_sequence_parallel_world_size()),
        "dp": (mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()),
        "mp": (mpu.get_model_parallel_rank(), mpu.get_model_parallel_world_size()),
    }
    try:
        sequence_parallel_mpu(world_size + 1)
    except ValueError as exc:
        out["bad_size_error"] = str(exc)

    replicas = world_size // sp_size
    micro = GLOBAL_BATCH // replicas
    npix = nside2npix(NSIDE)
    start, stop = shard_bounds(npix, sp_size)[mpu.get_sequence_parallel_rank()]
    b0 = mpu.get_data_parallel_rank() * micro
    batches = _batches(torch.float32)
    group = mpu.get_sequence_parallel_group()

    for stage, clip in variants:
        t0 = time.perf_counter()
        torch.manual_seed(SEED)
        model = convert_spatial_attention(build_model(_model_cfg()), process_group=group, strategy="ring")
        engine, *_ = initialize(model, _ds_config(stage, micro, clip), mpu)
        t_init = time.perf_counter() - t0
        factor = deepspeed_loss_factor(engine)
        snaps, losses = {}, []
        for step, (x_full, y_full) in enumerate(batches, start=1):
            x = x_full[b0 : b0 + micro, start:stop]
            y = y_full[b0 : b0 + micro, start:stop]
            loss = local_loss(engine(x), y, npix)  # this rank's share of its replica's mean
            engine.backward(loss * factor)
            engine.step()
            losses.append(float(global_loss(loss, group)))  # the replica's mean loss
            if step in SNAPSHOT_STEPS:
                snaps[step] = _full_params(engine, stage)
        out[stage, clip] = {"snaps": snaps, "losses": losses, "factor": factor,
                      "init_s": t_init, "total_s": time.perf_counter() - t0}
        engine.destroy()
    return out


def _reference_run(clip: float) -> tuple[dict[int, dict[str, torch.Tensor]], list[list[float]], dict]:
    """Single-device float64 SGD (gradient norm clipped to ``clip`` if > 0) on the global batch:
    snapshots and per-sample losses."""
    torch.manual_seed(SEED)
    model = build_model(_model_cfg())
    initial = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    model = model.double()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    snaps, losses = {}, []
    for step, (x, y) in enumerate(_batches(torch.float32), start=1):
        x, y = x.double(), y.double()
        opt.zero_grad()
        err = (model(x) - y) ** 2  # [R*B, N, 1]
        err.mean().backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append([e.mean().item() for e in err.detach().chunk(GLOBAL_BATCH)])
        if step in SNAPSHOT_STEPS:
            snaps[step] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return snaps, losses, initial


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over parameters of max|a - b| / max|b| (``b`` the reference)."""
    assert a.keys() == b.keys()
    return max(((a[n].double() - b[n]).abs().max() / b[n].abs().max()).item() for n in b)


def _update_err(p: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], p0: dict[str, torch.Tensor]) -> float:
    """||(p - p0) - (ref - p0)|| / ||ref - p0|| over all parameters together (2-norms)."""
    num = sum(((p[n].double() - ref[n]) ** 2).sum() for n in p0)
    den = sum(((ref[n] - p0[n]) ** 2).sum() for n in p0)
    return (num / den).sqrt().item()


def _check_world(results: list[dict], world_size: int, sp_size: int, variants: list, capsys) -> None:
    replicas = world_size // sp_size
    for rank, res in enumerate(results):
        first = rank - rank % sp_size
        assert res["sp_ranks"] == tuple(range(first, first + sp_size))
        assert res["dp_ranks"] == tuple(range(rank % sp_size, world_size, sp_size))
        assert res["sp"] == (rank % sp_size, sp_size) and res["dp"] == (rank // sp_size, replicas)
        assert res["mp"] == (0, 1) and res["sdp_size"] == world_size
        assert "sequence_parallel_size" in res["bad_size_error"]
    lines = []
    for stage, clip in variants:
        ref_snaps, ref_losses, initial = _reference_run(clip)
        per_rank = [res[stage, clip] for res in results]
        name = f"W={world_size} S={sp_size} ZeRO-{stage}" + (f" clip {clip:g}" if clip else "")
        expected_factor = float(sp_size) if stage == 3 else 1.0
        assert all(r["factor"] == expected_factor for r in per_rank)
        for step in SNAPSHOT_STEPS:
            errs = [_rel(r["snaps"][step], ref_snaps[step]) for r in per_rank]
            # The update must match too, not just the parameter (which starts equal): the relative
            # 2-norm error of p - p0 over all parameters. (Per tensor it is not meaningful for
            # LayerNorm weights ~1 whose updates ~3e-4 are a few hundred fp32 ulps of 1.)
            delta_errs = [_update_err(r["snaps"][step], ref_snaps[step], initial) for r in per_rank]
            spread = max(
                (per_rank[i]["snaps"][step][n] - per_rank[j]["snaps"][step][n]).abs().max().item()
                for i in range(world_size) for j in range(world_size)
                if i // sp_size == j // sp_size for n in initial
            )
            lines.append(
                f"{name} step {step}: param rel err "
                f"{max(errs):.2e}, update rel err {max(delta_errs):.2e}, sp-group spread {spread:.1e}"
            )
            assert max(errs) <= RTOL, lines[-1]
            assert max(delta_errs) <= 1e-4, lines[-1]
            assert spread == 0.0, lines[-1]
        micro = GLOBAL_BATCH // replicas
        for rank, r in enumerate(per_rank):  # each rank logs its replica's mean loss
            first = (rank // sp_size) * micro
            ref = [sum(s[first : first + micro]) / micro for s in ref_losses]
            torch.testing.assert_close(torch.tensor(r["losses"], dtype=torch.float64),
                                       torch.tensor(ref, dtype=torch.float64), rtol=1e-5, atol=0)
        lines.append(
            f"{name}: engine init {max(r['init_s'] for r in per_rank):.2f} s, "
            f"init + {STEPS} steps {max(r['total_s'] for r in per_rank):.2f} s"
        )
    with capsys.disabled():
        print("\n" + "\n".join(lines))


NO_CLIP = [(stage, 0.0) for stage in STAGES]
WITH_CLIP = [(stage, CLIP) for stage in STAGES]


@pytest.mark.parametrize(
    "world_size, sp_size, variants",
    [(4, 2, NO_CLIP + WITH_CLIP), (2, 2, NO_CLIP)],
    ids=["W4=2sp x 2dp", "W2=2sp x 1dp"],
)
def test_zero_stages_equal_single_device(world_size: int, sp_size: int, variants: list, capsys) -> None:
    """ZeRO 0-3 (and, at W = 4, with gradient clipping: the norm must not count the S
    replicated copies) after 1 and 3 steps equal float64 single-device SGD."""
    results = run_ranks(_train_every_stage, world_size, sp_size, variants, timeout=180.0)
    _check_world(results, world_size, sp_size, variants, capsys)


# --------------------------------------------------------------------------------------------
# DeepSpeed-Ulysses cross-check
# --------------------------------------------------------------------------------------------


def _local_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Local attention for DeepSpeed's DistributedAttention: ``[B, N, H_r, D]`` in and out."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    )
    return out.transpose(1, 2)


def _ulysses_cross_check(rank: int, world_size: int, sp_size: int) -> dict:
    """Forward and gradients of DeepSpeed's Ulysses and of our strategies on one sp group."""
    from deepspeed.sequence.layer import DistributedAttention

    _ds_env(rank, world_size)
    deepspeed.init_distributed(dist_backend="gloo")
    mpu = sequence_parallel_mpu(sp_size)
    group = mpu.get_sequence_parallel_group()
    B, H, N, D = 2, 4, 48, 8
    start, stop = shard_bounds(N, sp_size)[mpu.get_sequence_parallel_rank()]
    results = {}
    for dtype in (torch.float64, torch.float32):
        gen = torch.Generator().manual_seed(7 + mpu.get_data_parallel_rank())
        q, k, v, g = (torch.randn(B, H, N, D, generator=gen, dtype=torch.float64) for _ in range(4))
        ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        ref_out = reference_attention(*ref_inputs)
        ref_out.backward(g)
        ref = [ref_out[:, :, start:stop]] + [t.grad[:, :, start:stop] for t in ref_inputs]

        ds_attn = DistributedAttention(_local_sdpa, group, scatter_idx=2, gather_idx=1)
        candidates = {
            "deepspeed": lambda a, b, c: ds_attn(
                a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2), batch_dim_idx=0
            ).transpose(1, 2),
            "ring": lambda a, b, c: sharded_attention("ring", a, b, c, group),
            "ulysses": lambda a, b, c: sharded_attention("ulysses", a, b, c, group),
        }
        for name, fn in candidates.items():
            local = [t[:, :, start:stop].to(dtype).clone().requires_grad_() for t in (q, k, v)]
            out = fn(*local)
            out.backward(g[:, :, start:stop].to(dtype))
            got = [out] + [t.grad for t in local]
            results[(name, str(dtype))] = max(
                ((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref)
            )
    return results


def test_deepspeed_ulysses_and_ours_equal_float64_oracle(capsys) -> None:
    per_rank = run_ranks(_ulysses_cross_check, 4, 2, timeout=120.0)
    worst = {key: max(r[key] for r in per_rank) for key in per_rank[0]}
    with capsys.disabled():
        print("\n" + ", ".join(f"{n} {d}: {e:.1e}" for (n, d), e in sorted(worst.items())))
    for (name, dtype), err in worst.items():
        assert err <= (1e-12 if dtype == "torch.float64" else 1e-5), (name, dtype, err)


# --------------------------------------------------------------------------------------------
# Config checks and the example script
# --------------------------------------------------------------------------------------------


def test_config_without_mpu_warns_and_mismatch_raises() -> None:
    with pytest.warns(UserWarning, match="6868"):
        check_deepspeed_config({"sequence_parallel_size": 2}, None)
    cfg = check_deepspeed_config(CONFIGS / "zero2.json", None)  # no warning: no sp size
    assert cfg["zero_optimization"]["stage"] == 2


def test_config_mismatch_raises_and_loss_factor_rules() -> None:
    mpu = SimpleNamespace(get_sequence_parallel_world_size=lambda: 2)
    with pytest.raises(ValueError, match="sequence_parallel_size"):
        check_deepspeed_config({"sequence_parallel_size": 4}, mpu)

    def engine(stage: int, reduce_scatter: bool = True, contiguous: bool = True, sp: int = 2):
        return SimpleNamespace(
            sequence_parallel_size=sp, zero_optimization_stage=lambda: stage,
            zero_reduce_scatter=lambda: reduce_scatter, zero_contiguous_gradients=lambda: contiguous,
        )

    assert [deepspeed_loss_factor(engine(s)) for s in STAGES] == [1.0, 1.0, 1.0, 2.0]
    assert deepspeed_loss_factor(engine(3, sp=1)) == 1.0
    assert deepspeed_loss_factor(engine(3, reduce_scatter=False, contiguous=False)) == 2.0
    with pytest.raises(ValueError, match="reduce_scatter"):
        deepspeed_loss_factor(engine(3, reduce_scatter=False))


def test_importing_hpattn_dist_does_not_import_deepspeed() -> None:
    code = ("import sys, hpattn_dist, hpattn_dist.integrations.deepspeed; "
            "assert 'deepspeed' not in sys.modules, 'deepspeed was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT, timeout=120)


def test_shipped_configs() -> None:
    for stage in STAGES:
        cfg = json.loads((CONFIGS / f"zero{stage}.json").read_text())
        assert cfg["zero_optimization"]["stage"] == stage
        assert not cfg.get("bf16", {}).get("enabled", False)
    for path in CONFIGS.glob("*_bf16.json"):
        cfg = json.loads(path.read_text())
        assert cfg["bf16"]["enabled"] is True, path


STEP_LINE = re.compile(r"^step +(\d+)/(\d+) .*loss ([-+.e\d]+)", re.MULTILINE)


def test_script_accepts_both_local_rank_spellings() -> None:
    from launch.train_deepspeed import parse_args

    assert parse_args(["--local_rank=3"]).local_rank == 3
    assert parse_args(["--local-rank", "1", "--deepspeed-config", "x.json"]).local_rank == 1
    assert parse_args([]).local_rank is None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _script_reference_losses(steps: int, nside: int, micro: int) -> list[float]:
    """What launch/train_deepspeed.py must log with configs/deepspeed/zero1.json at R = 1:
    single-device float64 AdamW with gradient clipping 1.0 on the same seeded model and batches."""
    from launch.train import DEFAULT_CONFIG, load_config

    model_cfg, train_cfg = load_config(DEFAULT_CONFIG, {"nside": nside, "steps": steps})
    ds = json.loads((CONFIGS / "zero1.json").read_text())
    opt_params = {k: v for k, v in ds["optimizer"]["params"].items() if k != "torch_adam"}
    torch.manual_seed(train_cfg.seed)
    model = build_model(model_cfg).double()
    opt = torch.optim.AdamW(model.parameters(), **opt_params)
    gen = torch.Generator().manual_seed(train_cfg.seed + 1)
    data_cfg = ModelConfig.from_dict({**model_cfg.__dict__, "batch_size": micro})
    losses = []
    for _ in range(steps):
        x, y = make_batch(data_cfg, nside, gen, dtype=torch.float32)
        opt.zero_grad()
        loss = ((model(x.double()) - y.double()) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), ds["gradient_clipping"])
        opt.step()
        losses.append(loss.item())
    return losses


def test_train_deepspeed_script_two_steps_deepspeed_launcher(tmp_path: Path, capsys) -> None:
    """The example under the deepspeed launcher (``--local_rank=N``) at W = 2 = 2 sp x 1 dp."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    metrics = tmp_path / "metrics.json"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
           "--master_port", str(_free_port()), str(REPO_ROOT / "launch" / "train_deepspeed.py"),
           "--deepspeed_config", str(CONFIGS / "zero1.json"), "--sequence-parallel-size", "2",
           "--steps", "2", "--nside", "2", "--metrics", str(metrics)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    steps = STEP_LINE.findall(proc.stdout)
    assert [(int(i), int(n)) for i, n, _ in steps] == [(1, 2), (2, 2)], proc.stdout[-4000:]
    logged = [float(x) for _, _, x in steps]
    result = json.loads(metrics.read_text())
    assert result["world_size"] == 2 and result["sequence_parallel_size"] == 2
    micro = json.loads((CONFIGS / "zero1.json").read_text())["train_micro_batch_size_per_gpu"]
    ref = _script_reference_losses(2, 2, micro)
    with capsys.disabled():
        print(f"\nscript (deepspeed launcher, W=2): losses {result['losses']} vs single-device "
              f"{ref}, {elapsed:.1f} s")
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(ref, dtype=torch.float32),
                               rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor(logged), torch.tensor(ref, dtype=torch.float32),
                               rtol=1e-5, atol=0)
