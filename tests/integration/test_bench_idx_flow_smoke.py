"""launch/bench_idx_flow.py smoke: its single-process measurement runs at a tiny size (in-process).

The full script (a single process plus P gloo ranks) is a benchmark, not a test: run it by hand.
"""

from __future__ import annotations

import contextlib
import io
import json

import torch

from launch import bench_idx_flow


def test_single_process_role_measures_a_tiny_vit() -> None:
    buf = io.StringIO()
    argv = ["--nside", "2", "--embed-dim", "8", "--depth", "1", "--heads", "2", "--warmup", "0",
            "--repeats", "1", "--world", "1", "--role", "single"]
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(buf):
            assert bench_idx_flow.main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # the role sets the thread count of its process
    line = next(li for li in buf.getvalue().splitlines() if li.startswith(bench_idx_flow._MARK))
    result = json.loads(line[len(bench_idx_flow._MARK):])
    assert result["fwd_bwd_s"] > 0 and result["threads"] >= 1
    # Saved activations include at least the token embeddings [B, N_out, E] in float32.
    assert result["saved_bytes"] >= 2 * 12 * 8 * 4
    assert result["bytes_sent"] == 0


def test_single_process_role_measures_the_medium_model() -> None:
    buf = io.StringIO()
    argv = ["--model", "medium", "--nside", "4", "--embed-dim", "8", "--depth", "1", "--heads", "2",
            "--warmup", "0", "--repeats", "1", "--world", "1", "--role", "single"]
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(buf):
            assert bench_idx_flow.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    line = next(li for li in buf.getvalue().splitlines() if li.startswith(bench_idx_flow._MARK))
    result = json.loads(line[len(bench_idx_flow._MARK):])
    assert result["train_step_s"] == result["fwd_bwd_s"] > 0 and result["bytes_sent"] == 0
