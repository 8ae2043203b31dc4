"""The ``hpattn-dist`` command line, end to end: real spawned gloo ranks, real exit codes.

``verify`` is itself the comparison with the float64 oracle; these tests check that it passes
(with float64 errors at rounding level), that it FAILS when the self-test knobs force a failure,
and that ``bench --json`` is well formed and internally consistent: the bytes each rank counted
equal the closed form for its strategy, and the ring's call counts are P - 1 / P. Speed is not
tested. Each test launches the CLI once (one local launch per world size).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpattn_dist.tools.bench import BenchConfig, expected_bytes
from hpattn_dist.tools.cli import main
from hpattn_dist.tools.config import default_config_path, load_section
from hpattn_dist.tools.verify import VerifyConfig

pytestmark = pytest.mark.timeout(120)

TINY = ["--nside", "2", "--batch", "1", "--embed-dim", "16", "--heads", "4"]


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------------
# configs (in-process, fast)
# --------------------------------------------------------------------------------------------


def test_config_files_match_the_dataclass_defaults():
    assert VerifyConfig.load(default_config_path("verify")) == VerifyConfig()
    assert BenchConfig.load(default_config_path("bench")) == BenchConfig()


def test_default_configs_are_package_data_found_from_any_cwd(tmp_path):
    # The defaults live inside the package (a wheel has no repo configs/) and pyproject ships them.
    import tomllib

    import hpattn_dist.tools

    package = Path(hpattn_dist.tools.__file__).resolve().parent
    code = ("from hpattn_dist.tools.config import default_config_path as d; "
            "print(d('verify')); print(d('bench'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, check=True, env={**os.environ, "PYTHONPATH": str(package.parents[1])})
    found = [Path(line) for line in out.stdout.split()]
    assert found == [package / "configs" / "verify.toml", package / "configs" / "bench.toml"]
    pyproject = tomllib.loads((package.parents[1] / "pyproject.toml").read_text())
    shipped = {p.resolve() for pattern in pyproject["tool"]["setuptools"]["package-data"]["hpattn_dist.tools"]
               for p in package.glob(pattern)}
    assert set(found) <= shipped


@pytest.mark.parametrize("cls,kwargs,word", [
    (VerifyConfig, {"nside": 3}, "nside"),
    (VerifyConfig, {"embed_dim": 30, "num_heads": 4}, "embed_dim"),
    (VerifyConfig, {"dtypes": ("float8",)}, "dtypes"),
    (VerifyConfig, {"strategies": ("nope",)}, "strategies"),
    (VerifyConfig, {"tolerance_scale": -1.0}, "tolerance_scale"),
    (BenchConfig, {"mode": "fast"}, "mode"),
    (BenchConfig, {"repeats": 0}, "repeats"),
    (BenchConfig, {"backend": "flash"}, "backend"),
])
def test_config_validation_names_the_field(cls, kwargs, word):
    with pytest.raises(ValueError, match=word):
        cls(**kwargs)


def test_unknown_config_key_is_an_error(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[verify]\nnside = 4\nnsides = 8\n")
    with pytest.raises(ValueError, match="nsides"):
        load_section(path, "verify", VerifyConfig)
    assert VerifyConfig.load(None, nside=4).nside == 4


def test_bad_flag_value_exits_2_before_spawning(capsys):
    assert main(["verify", "--nside", "3"]) == 2
    assert "nside" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------------


def test_verify_passes_at_world_1_and_3(tmp_path, monkeypatch):
    monkeypatch.delenv("MKL_CBWR", raising=False)  # the ranks must pin it themselves
    out = tmp_path / "verify.json"
    rc = main(["verify", *TINY, "--nproc", "1,3", "--dtypes", "float64,float32",
               "--json", str(out)])
    assert rc == 0
    runs = _json(out)["runs"]
    assert [r["world_size"] for r in runs] == [1, 3]
    for run in runs:
        assert run["passed"]
        # Note [float64 reproducibility]: the ranks pinned MKL, and MKL took the pin
        assert run["platform"]["MKL_CBWR"] == "COMPATIBLE"
        assert run["platform"]["mkl_cbwr_in_force"] in ("COMPATIBLE", None)
        ran = [c for c in run["cases"] if c["skipped"] is None]
        assert {c["strategy"] for c in ran} >= {"ring"}
        for case in ran:
            assert case["passed"]
            names = {q["name"] for q in case["quantities"]}
            assert names == {"out", "dx", "dqkv_proj.weight", "dqkv_proj.bias",
                             "dout_proj.weight", "dout_proj.bias"}
            bound = 1e-10 if case["dtype"] == "float64" else 1e-5
            key = "rel" if case["dtype"] == "float64" else "max_abs"
            for q in case["quantities"]:
                assert q[key] <= bound * max(1.0, q["ref_max"]), (case, q)
    # heads (4) not divisible by P=3: ulysses reports why instead of running
    skipped = [c for c in runs[1]["cases"] if c["strategy"] == "ulysses"]
    assert skipped and all(c["skipped"] and "divisible" in c["skipped"] for c in skipped)
    # the three ranks' identical errors are reported once, not once per rank
    assert all(c["skipped"].count("not divisible") == 1 and "ranks 0-2" in c["skipped"] for c in skipped)
    # what ran: auto resolved (H=4, P=3: ring), hybrid U=1 named a ring
    executed = {c["strategy"]: c["executed"] for c in runs[1]["cases"] if c["skipped"] is None}
    assert executed["auto"] == "ring" and executed["hybrid:U1"] == "ring" and executed["ring"] == "ring"


@pytest.mark.parametrize("flag", [["--inject-error", "1e-3"], ["--tolerance-scale", "0"]])
def test_verify_fails_when_forced(tmp_path, flag):
    out = tmp_path / "verify.json"
    rc = main(["verify", *TINY, "--nproc", "1", "--strategies", "ring", "--backends", "manual",
               "--dtypes", "float64", *flag, "--json", str(out)])
    assert rc == 1
    report = _json(out)
    assert not report["passed"]
    failed = {q["name"] for c in report["cases"] for q in c["quantities"] if not q["passed"]}
    assert "out" in failed
    # a persistent error is not blamed on the platform
    assert all(c["unreproducible"] is None for c in report["cases"])


# Note [float64 reproducibility]: a float64 result that changes between two runs of the same case
# in one process fails AND is named. The first call is perturbed by 3e-10 relative, the size
# seen with MKL; in-process, world 1, no process group.
_ONE_CASE = dict(nside=2, batch=1, embed_dim=16, num_heads=4, strategies=("ring",),
                 backends=("manual",), dtypes=("float64",))


def _perturb_first_call(output):
    return output + 3e-10 * output.detach()


def test_verify_names_a_result_that_changes_on_rerun(monkeypatch):
    from hpattn_dist.tools import verify

    made = []
    real = verify.make_distributed_layer

    def layer_whose_first_forward_is_off(*args, **kwargs):
        layer = real(*args, **kwargs)
        if not made:
            layer.register_forward_hook(lambda m, i, out: _perturb_first_call(out))
        made.append(layer)
        return layer

    monkeypatch.setattr(verify, "make_distributed_layer", layer_whose_first_forward_is_off)
    (case,) = verify.run_verify(VerifyConfig(**_ONE_CASE))
    assert len(made) == 2  # ran twice
    assert not case.passed  # still a failure: the first result was wrong
    assert case.unreproducible is not None and "passed" in case.unreproducible
    assert "MKL_CBWR=COMPATIBLE" in case.unreproducible
    worst = max(q.rel for q in case.quantities)
    assert 1e-10 < worst < 1e-9  # the first run's figures are the ones reported
    table = verify.format_table([case], VerifyConfig(**_ONE_CASE), 1)
    assert "not reproducible" in table and "FAIL" in table


def test_verify_names_an_oracle_that_changes_on_rerun(monkeypatch):
    from hpattn_dist.tools import verify

    calls = []
    real = verify.oracle_reference

    def oracle_whose_first_call_is_off(*args):
        ref = real(*args)
        if not calls:
            ref["out"] = _perturb_first_call(ref["out"])
        calls.append(1)
        return ref

    monkeypatch.setattr(verify, "oracle_reference", oracle_whose_first_call_is_off)
    (case,) = verify.run_verify(VerifyConfig(**_ONE_CASE))
    assert len(calls) == 2 and not case.passed
    assert case.unreproducible is not None and "oracle moved by" in case.unreproducible
    assert "moved by 0.0e+00" not in case.unreproducible


def test_processes_the_suite_starts_pin_mkl(monkeypatch):
    """The pytest process (conftest) and the harness ranks run with MKL pinned. MKL itself is
    asked where torch exports its service symbol (else None: only the variable is checked)."""
    from hpattn_dist.tools.platform import PINNED_MATH_ENV
    from hpattn_dist.tools.verify import mkl_cbwr_in_force
    from tests.harness import START_METHOD_ENV, run_ranks

    assert set(PINNED_MATH_ENV) <= set(os.environ)  # pinned by conftest, or set by the caller
    assert mkl_cbwr_in_force() in (os.environ["MKL_CBWR"], None)  # pinned in time
    # a fresh rank (spawn: the fork server would inherit this process's variable) pins it itself
    monkeypatch.delenv("MKL_CBWR")
    monkeypatch.setenv(START_METHOD_ENV, "spawn")
    ((env, mode),) = run_ranks(_rank_mkl_mode, 1, timeout=60.0)
    assert env == "COMPATIBLE" and mode in ("COMPATIBLE", None)


def _rank_mkl_mode(rank, world_size):
    import torch

    from hpattn_dist.tools.verify import mkl_cbwr_in_force

    a = torch.randn(8, 8, dtype=torch.float64)
    torch.exp(a @ a)
    return os.environ.get("MKL_CBWR"), mkl_cbwr_in_force()


# --------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------


def test_bench_json_schema_and_bytes_match_the_formula(tmp_path):
    out = tmp_path / "bench.json"
    ds = importlib.util.find_spec("deepspeed") is not None
    rc = main(["bench", *TINY[2:], "--nsides", "2,4", "--nproc", "2", "--warmup", "0",
               "--repeats", "2", "--strategies", "ring,ulysses,hybrid,auto", "--json", str(out),
               *([] if ds else ["--no-deepspeed"])])
    assert rc == 0
    report = _json(out)
    assert report["schema"] == "hpattn_dist.bench/1" and report["mode"] == "scaling"
    assert report["world_size"] == 2
    assert BenchConfig(**{k: tuple(v) if isinstance(v, list) else v
                          for k, v in report["config"].items()}).nsides == (2, 4)
    records = report["records"]
    impls = {(r["impl"], r["strategy"], r["nside"]) for r in records}
    for nside in (2, 4):
        assert ("oracle", None, nside) in impls
        for s in ("ring", "ulysses", "hybrid", "auto"):
            assert ("hpattn_dist", s, nside) in impls
        if ds:
            assert ("deepspeed_ulysses", "ulysses", nside) in impls
    for r in records:
        if "skipped" in r:
            # at P = 2 no Ulysses degree 1 < U < P exists: hybrid says so instead of running
            assert r["strategy"] == "hybrid" and "Ulysses degree" in r["skipped"], r
            continue
        assert len(r["fwd_times"]) == 2 and len(r["fwd_bwd_times"]) == 2
        assert r["fwd_s"] > 0 and r["fwd_bwd_s"] > 0
        assert len(r["peak_mem_bytes_per_rank"]) == r["world_size"]
        if r["impl"] != "hpattn_dist":
            continue
        assert r["efficiency_fwd_bwd"] > 0
        head_dim = r["embed_dim"] // r["num_heads"]
        n = r["npix"] // 2
        for rank, (counted, comm) in enumerate(zip(r["payload_bytes_per_rank"], r["comm_per_rank"])):
            formula = expected_bytes(r["strategy"], [n, n], rank, r["batch"], r["num_heads"],
                                     head_dim, __import__("torch").float32)
            assert r["expected_bytes_per_rank"][rank] == formula
            assert counted == formula["total"] > 0
            if r["strategy"] == "ring":
                # independent closed form, equal shards (X = B H N_r D, fp32):
                # fwd 2 (P-1) s X, bwd 2 (P-1) s X + 2 P a X
                x = r["batch"] * r["num_heads"] * n * head_dim
                assert counted == 4 * (2 * x + 2 * x + 2 * 2 * x)
                assert comm["calls"]["ring.forward"] == 1
                assert comm["calls"]["ring.backward.kv"] == 1
                assert comm["calls"]["ring.backward.dkv"] == 2


def test_bench_memory_and_emulation_modes(tmp_path):
    mem, emu = tmp_path / "mem.json", tmp_path / "emu.json"
    assert main(["bench", "--mode", "memory", "--nsides", "4,8", "--nproc", "2",
                 "--json", str(mem)]) == 0
    records = _json(mem)["records"]
    assert [r["nside"] for r in records] == [4, 8]
    for r in records:
        assert len(r["peak_mem_bytes_per_rank"]) == 2
        assert r["full_score_matrix_bytes"] == r["batch"] * r["num_heads"] * r["npix"] ** 2 * 4
    assert main(["bench", "--mode", "emulation", "--nsides", "4", "--blocks", "1,3",
                 "--nproc", "1", "--warmup", "0", "--repeats", "1", "--json", str(emu)]) == 0
    records = _json(emu)["records"]
    assert [r["blocks"] for r in records] == [1, 3]
    for r in records:
        # the blocked ring path computes the same attention as the fused call
        assert r["max_abs_diff_out"] < 1e-5
        assert r["ratio_fwd"] > 0 and r["ratio_fwd_bwd"] > 0


def test_dataclass_roundtrip_of_report_config():
    cfg = BenchConfig(nsides=(4,), strategies=("ring",))
    assert BenchConfig(**dataclasses.asdict(cfg)) == cfg


def test_verify_reads_a_ring_ordered_field(tmp_path):
    import torch

    from hpattn_dist.healpix import reorder
    from hpattn_dist.tools.verify import load_field, run_verify

    x_nest = torch.randn(1, 48, 8, dtype=torch.float64)
    path = tmp_path / "field.pt"
    torch.save(reorder(x_nest, dim=1, inp="NESTED", out="RING")[0], path)  # [N, E]
    cfg = VerifyConfig.load(None, field=str(path), field_ordering="RING", num_heads=2,
                            strategies=("ring",), backends=("manual",), dtypes=("float64",))
    assert (cfg.nside, cfg.batch, cfg.embed_dim) == (2, 1, 8)
    torch.testing.assert_close(load_field(cfg), x_nest, rtol=0, atol=0)
    (case,) = run_verify(cfg)  # one process, no process group
    assert case.passed and all(q.rel < 1e-12 for q in case.quantities)
    with pytest.raises(ValueError, match="field"):
        VerifyConfig.load(None, field=str(tmp_path / "missing.pt"))


def test_torchrun_wrapper_runs_verify(tmp_path):
    """launch/torchrun_multinode.sh: torchrun sets RANK/WORLD_SIZE/...; the CLI reads them."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "verify.json"
    script = Path(__file__).resolve().parents[2] / "launch" / "torchrun_multinode.sh"
    env = dict(os.environ, NPROC_PER_NODE="2", MASTER_PORT=str(port), PYTHON=sys.executable)
    env.pop("MKL_CBWR", None)  # a torchrun rank of verify pins MKL itself
    proc = subprocess.run(
        ["bash", str(script), "verify", *TINY, "--strategies", "ring", "--dtypes", "float64",
         "--json", str(out)], env=env, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = _json(out)
    assert report["world_size"] == 2 and report["passed"]
    assert report["platform"]["MKL_CBWR"] == "COMPATIBLE"
    assert report["platform"]["mkl_cbwr_in_force"] in ("COMPATIBLE", None)


# --------------------------------------------------------------------------------------------
# what the tables and --help explain (in-process, fast)
# --------------------------------------------------------------------------------------------


def test_every_option_has_help_with_its_default():
    import argparse

    from hpattn_dist.tools.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, sub in subparsers.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{command} {action.option_strings} has no help"
            assert "default" in action.help, f"{command} {action.option_strings}: {action.help!r}"
        strategies = next(a for a in sub._actions if "--strategies" in a.option_strings)
        assert "ring,ulysses,hybrid,auto" in strategies.help


def test_help_defaults_are_the_configs_defaults():
    from hpattn_dist.tools.cli import DEFAULTS, STRATEGY_NAMES
    from hpattn_dist.strategies import STRATEGIES

    assert STRATEGY_NAMES == STRATEGIES
    for command, cls in (("verify", VerifyConfig), ("bench", BenchConfig)):
        config = cls.load(default_config_path(command))
        for name, shown in DEFAULTS[command].items():
            value = getattr(config, name)
            if isinstance(value, tuple):
                value = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
            assert str(shown) == str(value), (command, name, shown, value)


def test_verify_table_shows_the_deciding_column_and_what_ran():
    from hpattn_dist.tools.verify import CaseResult, Quantity, format_table

    def case(strategy, executed, violation):
        qs = [Quantity(n, 0.2 if n == "dout_proj.weight" else 1e-3, 10.0, violation if n == "dout_proj.weight" else 0.1)
              for n in ("out", "dx", "dqkv_proj.weight", "dout_proj.weight")]
        return CaseResult(strategy, "manual", "manual", "bfloat16", qs, executed=executed)

    cfg = VerifyConfig()
    text = format_table([case("auto", "ulysses", 0.5), case("hybrid:U2", "ulysses", 1.5),
                         CaseResult("ulysses", "manual", "manual", "float64", skipped="H=4 not divisible"),
                         CaseResult("ulysses", "manual", "manual", "float32", skipped="H=4 not divisible")],
                        cfg, 2)
    lines = text.splitlines()
    assert "err/tol" in lines[3] and "decides" in text
    auto = next(line for line in lines if line.startswith("auto=ulysses "))
    assert "5.0e-01  PASS" in auto  # a large absolute parameter error (0.2) can pass: err/tol shows why
    hybrid = next(line for line in lines if line.startswith("hybrid:U2=ulysses "))
    assert "1.5e+00  FAIL (dout_proj.weight)" in hybrid
    assert sum(line.startswith("ulysses ") for line in lines) == 1  # one line per strategy and reason

