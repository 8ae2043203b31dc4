"""launch/train.py and launch/healpix_model.py: the sharded training step equals the single-device
step, the script runs in one process and under a real torchrun, configs load and check themselves.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import healpy
import numpy as np
import pytest
import torch

from launch import healpix_model, train
from tests.harness import run_ranks

REPO_ROOT = Path(__file__).resolve().parents[2]
RTOL = 1e-10
# One progress line per step on rank 0: "step  3/30 [###-----] loss 1.234e-01 | 12.3 ms/step".
STEP_LINE = re.compile(r"^step +(\d+)/\d+ \[[#-]+\] loss ([-+.e\d]+|nan|inf) \|", re.MULTILINE)


def test_pixel_centres_match_healpy() -> None:
    for nside in (1, 2, 4, 8, 32):
        npix = 12 * nside * nside
        ours = healpix_model.pixel_centres(nside).numpy()
        ref = np.stack(healpy.pix2vec(nside, np.arange(npix), nest=True), axis=-1)
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-13)
    some = torch.tensor([[0, 5], [47, 13]])
    ours = healpix_model.pixel_centres(2, some, dtype=torch.float32)
    assert ours.shape == (2, 2, 3) and ours.dtype == torch.float32


def test_make_batch_is_seeded_and_antipodal() -> None:
    cfg = healpix_model.ModelConfig(batch_size=3, num_bumps=1, kappa=6.0)
    x1, y1 = healpix_model.make_batch(cfg, 4, torch.Generator().manual_seed(7), dtype=torch.float64)
    x2, y2 = healpix_model.make_batch(cfg, 4, torch.Generator().manual_seed(7), dtype=torch.float64)
    assert x1.shape == (3, 192, 4) and y1.shape == (3, 192, 1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # One bump (Note [the synthetic task]): s = a exp(k (c - 1)), y = a exp(k/2 (-c - 1)) with
    # c = n . d, so y = a * (s / a) ** (-1/2) * exp(-k): the target is the input seen from the
    # antipode, reconstructed here from the input alone.
    s, y = x1[..., 3], y1[..., 0]
    a = torch.sign(s)
    expected = a * (s / a).pow(-0.5) * np.exp(-cfg.kappa)
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=0)


def test_configs_load_and_bad_values_raise() -> None:
    for name in ("train_small.json", "train_gpu.json"):
        model_cfg, train_cfg = train.load_config(REPO_ROOT / "configs" / name)
        assert model_cfg.embed_dim % model_cfg.num_heads == 0 and train_cfg.steps > 0
    _, train_cfg = train.load_config(REPO_ROOT / "configs" / "train_small.json", {"nside": 8, "steps": None})
    assert train_cfg.nside == 8 and train_cfg.steps == 30
    with pytest.raises(ValueError, match="nside"):
        train.TrainConfig(nside=3)
    with pytest.raises(ValueError, match="strategy"):
        train.TrainConfig(strategy="nope")
    with pytest.raises(ValueError, match="ulysses_degree"):
        train.TrainConfig(strategy="hybrid")
    with pytest.raises(ValueError, match="unknown train config keys"):
        train.TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="num_heads"):
        healpix_model.ModelConfig(embed_dim=10, num_heads=3)
    with pytest.raises(ValueError, match="unknown model config keys"):
        healpix_model.ModelConfig.from_dict({"width": 3})


# --------------------------------------------------------------------------------------------
# One optimizer step at world 2 == the same step at world 1 (float64)
# --------------------------------------------------------------------------------------------

STEP_MODEL = dict(embed_dim=16, num_heads=4, depth=2, batch_size=2, attn_backend="manual")
STEP_TRAIN = dict(nside=2, steps=2, lr=1e-2, weight_decay=0.01, grad_clip=0.5, dtype="float64", device="cpu")


def _run_steps(group) -> dict:
    model_cfg = healpix_model.ModelConfig(**STEP_MODEL)
    train_cfg = train.TrainConfig(**STEP_TRAIN)
    model, optimizer = train.build(model_cfg, train_cfg, group, torch.device("cpu"))
    generator = torch.Generator().manual_seed(train_cfg.seed + 1)
    losses, states = [], []
    for _ in range(train_cfg.steps):
        x_full, y_full = healpix_model.make_batch(model_cfg, train_cfg.nside, generator, dtype=torch.float64)
        losses.append(float(train.train_step(model, optimizer, x_full, y_full, group, train_cfg.grad_clip)))
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return {"losses": losses, "states": states}


def _ranks_steps(rank: int, world: int) -> dict:
    import torch.distributed as dist

    return _run_steps(dist.group.WORLD)


def test_train_step_world2_equals_world1() -> None:
    reference = _run_steps(None)  # one process, no torch.distributed: the single-device step
    initial = train.build(
        healpix_model.ModelConfig(**STEP_MODEL), train.TrainConfig(**STEP_TRAIN), None, torch.device("cpu")
    )[0].state_dict()
    results = run_ranks(_ranks_steps, 2, timeout=60.0)
    for result in results:
        np.testing.assert_allclose(result["losses"], reference["losses"], rtol=RTOL, atol=0)
        for step, (state, ref_state) in enumerate(zip(result["states"], reference["states"])):
            assert state.keys() == ref_state.keys()
            for key, ref_value in ref_state.items():
                assert not torch.equal(ref_value, initial[key]), (step, key)  # the step moved it
                err = (state[key] - ref_value).abs().max() / ref_value.abs().max()
                assert err < RTOL, (step, key, float(err))


# --------------------------------------------------------------------------------------------
# The script itself
# --------------------------------------------------------------------------------------------


def test_main_single_process_without_torchrun(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    metrics_path = tmp_path / "metrics.json"
    metrics = train.main(["--steps", "3", "--nside", "2", "--device", "cpu", "--metrics", str(metrics_path)])
    out = capsys.readouterr().out
    assert "world 1" in out and "step 3/3" in out and len(STEP_LINE.findall(out)) == 3
    saved = json.loads(metrics_path.read_text())
    assert saved["world_size"] == 1 and len(saved["losses"]) == 3 == len(metrics["losses"])
    assert all(np.isfinite(saved["losses"]))
    # the summary shows the smoothed loss (a weighted mean, written out independently here)
    losses = saved["losses"]
    weights = [0.8 ** (len(losses) - 1 - i) for i in range(len(losses))]
    want = sum(w * x for w, x in zip(weights, losses)) / sum(weights)
    assert saved["smoothed_losses"][-1] == pytest.approx(want, rel=1e-12)
    assert f"-> {want:.3e} at step 3" in out and "first loss" not in out


def test_smoothed_losses_follow_the_trend_not_one_step() -> None:
    losses = [1.0, 0.5, 0.25, 2.0, 0.1]  # one bad batch at step 4
    ema = train.smoothed(losses)
    assert ema[0] == 1.0 and ema[3] < 1.1 and 0.7 < ema[-1] < 0.8  # the jump to 2.0 is damped


def test_torchrun_smoke_two_ranks(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    metrics_path = tmp_path / "metrics.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "launch/train.py", "--steps", "2", "--device", "cpu", "--metrics", str(metrics_path)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world 2" in proc.stdout
    assert [m[0] for m in STEP_LINE.findall(proc.stdout)] == ["1", "2"], proc.stdout
    saved = json.loads(metrics_path.read_text())
    assert saved["world_size"] == 2 and len(saved["losses"]) == 2 and all(np.isfinite(saved["losses"]))


def test_run_sh_builds_the_torchrun_command() -> None:
    env = dict(os.environ, DRY_RUN="1", NPROC="3")
    env.pop("MASTER_ADDR", None)
    env.pop("NGPU", None)
    proc = subprocess.run(["bash", "launch/run.sh", "--steps", "2"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "--nproc_per_node=3" in proc.stdout and "--standalone" in proc.stdout
    assert "launch/train.py" in proc.stdout and proc.stdout.rstrip().endswith("--steps 2")
    env.update(NNODES="2", NGPU="8", MASTER_ADDR="node0", NODE_RANK="1")
    proc = subprocess.run(["bash", "launch/run.sh"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert all(s in proc.stdout for s in ("--nnodes=2", "--nproc_per_node=8", "--node_rank=1",
                                          "--master_addr=node0"))
