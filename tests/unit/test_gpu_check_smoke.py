"""``launch/gpu_check.py --smoke``: the prepared GPU check runs end to end on the CPU.

No GPU is lent to the test suite, so this checks the script (every section runs and reports;
the CUDA kernels appear with the capability table's reasons, CUDA-only items as skipped), not a
GPU: the single-device run (one subprocess) and the ``--multi`` run under torchrun (2 gloo
ranks). Also the launcher's child handling: its own session, the whole process group killed on
timeout, every timeout capped by the budget left.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "launch" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def test_gpu_check_smoke_run_reports_every_section(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "gpu_check.py"), "--smoke", "--out",
                           str(out)], capture_output=True, text=True, timeout=280, env=_env())
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert proc.returncode == 0 and report["passed"], (proc.stderr[-3000:], json.dumps(sections)[:3000])
    for name in ("environment", "kernels", "kernel_shapes", "verify", "process_group", "autocast", "compile",
                 "windowed", "memory", "throughput", "ring_emulation"):
        assert "error" not in sections[name] and "skipped" not in sections[name], (name, sections[name])

    kernels = sections["kernels"]
    for dtype in ("float16", "bfloat16", "float32", "float64"):
        assert kernels[f"manual/{dtype}"]["passed"] and kernels[f"sdpa:cpu_flash/{dtype}"]["passed"]
        assert "device cpu (needs cuda)" in kernels[f"sdpa:cuda_flash/{dtype}"]["refused"]
        assert kernels["auto"][dtype] == "sdpa:cpu_flash"
    assert any("float64" in r for r in kernels["sdpa:cuda_efficient/float64"]["refused"])
    shapes = sections["kernel_shapes"]
    for d in (32, 96):
        case = shapes[f"sdpa:cpu_flash/D{d}"]
        assert case["passed"] and case["empty_block"]["passed"] and case["nan_row"]["passed"], case

    items = sections["process_group"]["items"]
    assert items["backend"] == "gloo"
    for name in ("all_reduce", "all_to_all_single", "reduce_scatter_tensor",
                 "healpix.scatter+gather cpu tensor", "ring_attention float64 fwd+bwd",
                 "ulysses_attention float64 fwd+bwd", "layer fwd+bwd, exchange timeout 20 s vs none"):
        assert items[name]["passed"] is True, (name, items[name])
    assert "needs CUDA" in items["sync audit of a steady-state layer step"]["skipped"]
    assert sections["autocast"]["passed"] and sections["compile"]["items"]["default"]["passed"]
    assert all(sections["windowed"][mode]["fwd_bwd_s"] > 0 for mode in ("cell", "neighbourhood"))
    assert sections["verify"]["rc"] == 0 and sections["memory"]["rc"] == 0
    assert not [k for k, v in sections["ring_emulation"].items() if "error" in v]


def test_gpu_check_multi_smoke_under_torchrun(tmp_path):
    out = tmp_path / "multi.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "launch" / "gpu_check.py"), "--multi", "--smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=200, env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["passed"] and [r["rank"] for r in report["ranks"]] == [0, 1]
    for ranked in report["ranks"]:
        for name in ("p2p ring exchange", "uneven all_to_all", "ring float64 fwd+bwd", "ulysses float64 fwd+bwd",
                     "hybrid U=2 (sub-groups) float64 fwd+bwd", "auto float64 fwd+bwd",
                     "halo exchange (windowed, float64)"):
            assert ranked[name]["passed"] is True, (name, ranked[name])
        assert "overlap" in ranked["ring step overlap"] and "ratio" in ranked[
            "ring fwd+bwd, exchange timeout 20 s vs none"]


def test_child_killed_with_its_process_group_on_timeout(tmp_path):
    """A child that starts a grandchild and hangs: on timeout both are gone (the launcher killed
    the child's session), and the timeout was the one asked for."""
    gpu_check = _gpu_check()
    pid_file = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
              f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    start = time.monotonic()
    res = gpu_check.run_bounded([sys.executable, "-c", script], timeout=3.0)
    assert res["rc"] == 124 and time.monotonic() - start < 30, res
    grandchild = Path(f"/proc/{int(pid_file.read_text())}/stat")
    time.sleep(0.5)  # killed: gone, or a zombie no one reaped ("Z")
    assert not grandchild.exists() or grandchild.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_child_timeout_capped_by_the_budget_left():
    gpu_check = _gpu_check()
    gpu_check._DEADLINE[0] = time.monotonic() + 2.0
    start = time.monotonic()
    res = gpu_check.run_bounded([sys.executable, "-c", "import time; time.sleep(60)"], timeout=120.0)
    assert res["rc"] == 124 and res["timeout_s"] <= 2.0 and time.monotonic() - start < 20, res
