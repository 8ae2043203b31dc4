"""The multi-rank harness itself: results, collectives, and how failures and hangs are reported.

Rank functions are module-level so that spawned ranks can import them by qualified name.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist

from tests.harness import START_METHOD_ENV, RankFailure, run_ranks

# --------------------------------------------------------------------------------------------
# Rank functions


def _identify(rank: int, world_size: int, tag: str, *, scale: float) -> dict:
    return {
        "rank": rank,
        "world_size": world_size,
        "dist_rank": dist.get_rank(),
        "dist_world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
        "threads": torch.get_num_threads(),
        "omp": os.environ.get("OMP_NUM_THREADS"),
        "pid": os.getpid(),
        "tag": tag,
        "tensor": torch.full((2, 3), scale * rank),
    }


def _collectives(rank: int, world_size: int) -> dict:
    summed = torch.tensor([float(rank + 1)], dtype=torch.float64)
    dist.all_reduce(summed)
    gathered = [torch.empty(2, dtype=torch.int64) for _ in range(world_size)]
    dist.all_gather(gathered, torch.tensor([rank, rank * rank]))
    root_value = torch.tensor([123.0 if rank == 0 else -1.0])
    dist.broadcast(root_value, src=0)
    return {"sum": summed, "gathered": torch.stack(gathered), "broadcast": root_value}


def _large_result(rank: int, world_size: int, numel: int) -> torch.Tensor:
    # Far larger than a pipe buffer (64 KiB): the parent must read while the ranks run.
    return torch.arange(numel, dtype=torch.float32) + rank


def _raise_on_last_rank(rank: int, world_size: int) -> None:
    dist.barrier()
    if rank == world_size - 1:
        time.sleep(0.5)  # let the others reach the all_reduce, so their stacks show it
        raise ValueError(f"rank {rank} cannot go on")
    dist.all_reduce(torch.ones(1))  # the others wait here for a rank that never comes


def _sleep_forever() -> None:
    while True:
        time.sleep(3600)


def _hang(rank: int, world_size: int) -> None:
    if rank == 1:
        _sleep_forever()
    elif rank == 2:
        dist.recv(torch.empty(1), src=0)  # rank 0 never sends: blocks in a p2p the others skip


def _die(rank: int, world_size: int, how: str) -> None:
    if rank == 1:
        if how == "exit":
            os._exit(7)
        faulthandler._sigsegv()
    dist.barrier()


def _unpicklable_result(rank: int, world_size: int):
    return lambda: rank


def _rank_times_two(rank: int, world_size: int) -> int:
    return 2 * rank


# --------------------------------------------------------------------------------------------
# Tests


@pytest.mark.timeout(60)
def test_results_come_back_in_rank_order_with_one_thread_per_rank():
    results = run_ranks(_identify, 4, "hello", scale=0.5)
    assert [r["rank"] for r in results] == [0, 1, 2, 3]
    for rank, r in enumerate(results):
        assert (r["dist_rank"], r["world_size"], r["dist_world_size"]) == (rank, 4, 4)
        assert r["backend"] == "gloo"
        assert r["threads"] == 1 and r["omp"] == "1"
        assert r["tag"] == "hello"
        torch.testing.assert_close(r["tensor"], torch.full((2, 3), 0.5 * rank), rtol=0, atol=0)
    assert len({r["pid"] for r in results}) == 4
    assert os.getpid() not in {r["pid"] for r in results}


@pytest.mark.timeout(60)
def test_collectives_work_across_ranks():
    world_size = 3
    results = run_ranks(_collectives, world_size)
    expected_gather = torch.tensor([[r, r * r] for r in range(world_size)])
    for r in results:
        assert r["sum"].item() == sum(range(1, world_size + 1))
        assert torch.equal(r["gathered"], expected_gather)
        assert r["broadcast"].item() == 123.0


@pytest.mark.timeout(60)
def test_large_tensor_results_do_not_deadlock():
    numel = 4 * 1024 * 1024  # 16 MiB per rank
    results = run_ranks(_large_result, 2, numel)
    for rank, tensor in enumerate(results):
        assert tensor.shape == (numel,)
        assert tensor[0].item() == rank and tensor[-1].item() == numel - 1 + rank


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_world_size_one(start_method, monkeypatch):
    monkeypatch.setenv(START_METHOD_ENV, start_method)
    assert run_ranks(_rank_times_two, 1) == [0]


@pytest.mark.timeout(60)
def test_raising_rank_fails_fast_with_its_traceback():
    timeout = 60.0
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_ranks(_raise_on_last_rank, 3, timeout=timeout)
    elapsed = time.monotonic() - start
    assert elapsed < 20.0, f"took {elapsed:.1f} s: the harness waited instead of failing fast"
    message = str(info.value)
    assert set(info.value.failures) == {2}
    assert "--- rank 2 raised" in message
    assert "ValueError: rank 2 cannot go on" in message
    assert "_raise_on_last_rank" in message
    # The ranks left waiting in the all_reduce are killed, and their stacks are shown too.
    assert "--- rank 0 (killed" in message and "--- rank 1 (killed" in message
    assert "all_reduce" in message


@pytest.mark.timeout(60)
def test_hung_ranks_are_killed_at_the_timeout_with_their_stacks():
    timeout = 8.0
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_ranks(_hang, 3, timeout=timeout)
    elapsed = time.monotonic() - start
    assert timeout <= elapsed < timeout + 10.0
    failures = info.value.failures
    assert set(failures) == {0, 1, 2}
    # Rank 1 sleeps in a helper, rank 2 blocks in a receive, rank 0 waits for them at the end.
    assert "hung" in failures[1] and "inside fn" in failures[1]
    assert "in _sleep_forever" in failures[1] and "in _hang" in failures[1]
    assert "inside fn" in failures[2] and " in recv" in failures[2]
    assert "after fn returned" in failures[0] and " in barrier" in failures[0]
    assert "timed out" in str(info.value)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "how, expected",
    [("exit", "exited with code 7"), ("segv", "killed by signal SIGSEGV")],
)
def test_rank_dying_without_exception_is_reported(how, expected):
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_ranks(_die, 2, how, timeout=60.0)
    assert time.monotonic() - start < 20.0
    # Rank 0 may also fail (gloo sees its peer's connection close); rank 1 is always reported.
    assert 1 in info.value.failures
    report = info.value.failures[1]
    assert expected in report
    if how == "segv":  # faulthandler's crash dump names the frame that crashed
        assert "Segmentation fault" in report and "in _die" in report


@pytest.mark.timeout(60)
def test_unpicklable_result_is_a_rank_failure():
    with pytest.raises(RankFailure, match="is not picklable"):
        run_ranks(_unpicklable_result, 1)


def test_fn_must_be_importable_by_name():
    with pytest.raises(TypeError, match="module-level function"):
        run_ranks(lambda rank, world_size: rank, 2)


@pytest.mark.parametrize("world_size", [0, -1, 1.0])
def test_world_size_must_be_a_positive_int(world_size):
    with pytest.raises(ValueError, match="world_size"):
        run_ranks(_rank_times_two, world_size)


def _print_rank(rank: int, world_size: int) -> None:
    print(f"stdout of rank {rank}", flush=True)
    print(f"stderr of rank {rank}", file=sys.stderr, flush=True)


@pytest.mark.timeout(60)
def test_rank_output_goes_to_the_current_test(capfd):
    run_ranks(_print_rank, 2)
    captured = capfd.readouterr()
    for rank in range(2):
        assert f"stdout of rank {rank}" in captured.out
        assert f"stderr of rank {rank}" in captured.err
