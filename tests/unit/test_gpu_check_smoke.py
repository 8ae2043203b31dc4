"""``launch/gpu_check.py --smoke``: the prepared GPU check runs end to end on the CPU.

No GPU is lent to the test suite, so this checks the script (every section runs and reports;
the CUDA kernels appear with the capability table's reasons), not a GPU. One subprocess run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_smoke_run_reports_every_section(tmp_path):
    out = tmp_path / "smoke.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "gpu_check.py"), "--smoke", "--out",
                           str(out)], capture_output=True, text=True, timeout=220, env=env)
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert proc.returncode == 0 and report["passed"], (proc.stderr[-3000:], json.dumps(sections)[:3000])
    for name in ("environment", "kernels", "verify", "process_group", "memory", "throughput",
                 "ring_emulation"):
        assert "error" not in sections[name], (name, sections[name])

    kernels = sections["kernels"]
    for dtype in ("float16", "bfloat16", "float32", "float64"):
        assert kernels[f"manual/{dtype}"]["passed"] and kernels[f"sdpa:cpu_flash/{dtype}"]["passed"]
        assert "device cpu (needs cuda)" in kernels[f"sdpa:cuda_flash/{dtype}"]["refused"]
        assert kernels["auto"][dtype] == "sdpa:cpu_flash"
    assert any("float64" in r for r in kernels["sdpa:cuda_efficient/float64"]["refused"])

    items = sections["process_group"]["items"]
    assert items["backend"] == "gloo"
    for name in ("all_reduce", "all_to_all_single", "reduce_scatter_tensor",
                 "healpix.scatter+gather cpu tensor", "ring_attention float64 fwd+bwd",
                 "ulysses_attention float64 fwd+bwd"):
        assert items[name]["passed"] is True, (name, items[name])
    assert sections["verify"]["rc"] == 0 and sections["memory"]["rc"] == 0
    assert not [k for k, v in sections["ring_emulation"].items() if "error" in v]
