"""Multi-rank test harness: run a function on real spawned ranks with a gloo process group.

    results = run_ranks(fn, world_size, *args, timeout=60.0, backend="gloo", **kwargs)

runs ``fn(rank, world_size, *args, **kwargs)`` in ``world_size`` separate processes, each with an
initialised default process group, and returns the per-rank return values in rank order. Ranks are
forked from a ``multiprocessing`` fork server that has imported torch once (Note [fork server]);
``HPATTN_RANKS_START_METHOD=spawn`` starts each rank as a fresh interpreter instead (slower).
The ranks write to the parent's current stdout/stderr, so pytest captures their output per test.

``fn`` must be picklable by reference: a module-level function of an importable module (a test
module under ``tests/`` is fine: every test folder is a package, and the repository root is put
on each rank's ``sys.path``).

Failure handling (Note [rank failure report]):

- A rank whose ``fn`` raises sends its formatted traceback home at once. The harness then asks
  every rank that is still running to dump its Python stacks (``SIGUSR1`` ->
  ``faulthandler``), kills them all, and raises :class:`RankFailure`. This takes about a second,
  whatever ``timeout`` is.
- A rank that dies without a Python exception (segfault, ``os._exit``) is reported with its exit
  code and, for a fatal signal, the ``faulthandler`` crash dump.
- When the whole job has not finished ``timeout`` seconds after it started (start-up included),
  every unfinished rank is reported as hung with its Python stacks at that moment.

Each rank runs with ``OMP_NUM_THREADS=1`` and ``torch.set_num_threads(1)`` (the CI machine has two
cores and tests start up to a handful of ranks), and with MKL pinned to one code path
(``MKL_CBWR``, unless already set; Note [float64 reproducibility] in :mod:`hpattn_dist.tools.verify`).
The process group uses a ``FileStore`` in a temporary folder, so no TCP port is reserved, and
its own timeout is longer than ``timeout`` so that the harness, which can dump stacks, always
reports a hang first. After ``fn`` returns, each rank runs a barrier and destroys the process
group (:func:`hpattn_dist.shutdown.shutdown_process_group`, Note [clean exit]) before sending
its result; a result therefore means the rank finished cleanly.

Results travel as ``pickle`` bytes over one pipe per rank, read while the ranks run, so a large
tensor cannot dead-lock a rank at exit. They are plain pickles, not shared memory: CPU tensors
are copied, and a non-leaf tensor that requires grad must be detached by ``fn``.

Linux/macOS only (``SIGUSR1``). Outside pytest, the calling script needs the usual
``if __name__ == "__main__":`` guard, since each rank re-imports the main module.
"""

from __future__ import annotations

import datetime
import faulthandler
import multiprocessing
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable, Optional

from hpattn_dist.tools.platform import pin_math_library

__all__ = ["RankFailure", "attempt", "run_ranks"]

REPO_ROOT = Path(__file__).resolve().parents[1]

# "forkserver" (default) or "spawn": how ranks are started (see Note [fork server]).
START_METHOD_ENV = "HPATTN_RANKS_START_METHOD"

# Seconds to wait for ranks to write their stacks after SIGUSR1, and for a killed rank to go.
_DUMP_GRACE_S = 1.0
_KILL_GRACE_S = 5.0
# The process group's own timeout exceeds the harness timeout by this much (see module doc).
_PG_TIMEOUT_MARGIN_S = 30.0

# What a rank was doing, shared with the parent so a hang report can say it.
_PHASE_START, _PHASE_IMPORT, _PHASE_INIT, _PHASE_FN, _PHASE_TEARDOWN, _PHASE_SEND = range(6)
_PHASE_TEXT = {
    _PHASE_START: "starting (spawn, unpickling the harness)",
    _PHASE_IMPORT: "importing torch and the test module",
    _PHASE_INIT: "in init_process_group",
    _PHASE_FN: "inside fn",
    _PHASE_TEARDOWN: "after fn returned, in the final barrier / destroy_process_group "
    "(usually waiting for another rank)",
    _PHASE_SEND: "sending its result",
}


class RankFailure(AssertionError):
    """One or more ranks raised, crashed or hung.

    The message holds, for every such rank, its formatted traceback (or its Python stacks at kill
    time for a hung rank), and then the stacks of the ranks that were still running and had to be
    killed. ``failures`` maps each failed rank to its report.
    """

    def __init__(self, message: str, failures: Optional[dict[int, str]] = None) -> None:
        super().__init__(message)
        self.failures: dict[int, str] = dict(failures or {})


# --------------------------------------------------------------------------------------------
# Rank side


def _rank_main(
    job: bytes,
    rank: int,
    world_size: int,
    backend: str,
    store_path: str,
    stack_path: str,
    pg_timeout_s: float,
    conn: Connection,
    phase: Any,
    stdio: tuple[int, int],
) -> None:
    """Entry point of one spawned rank; sends exactly one message, b"ok" + pickle or b"er" + text.

    ``job`` is the pickled ``(fn, args, kwargs)``: it is unpickled here, after the stack-dump
    handlers are installed, so a rank stuck importing the test module still reports its stack.
    """
    # Write where the parent writes now (pytest's capture of the current test), not where the
    # fork server's stdout happened to point when it started.
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, target in zip(stdio, (1, 2)):
        if fd != target:  # under spawn the fds arrive with their own numbers
            os.dup2(fd, target)
            os.close(fd)

    # Stacks on SIGUSR1 (the parent asks, e.g. on timeout) and on fatal signals (segfault, abort).
    # The file stays open for the life of the process.
    stack_file = open(stack_path, "w", buffering=1)  # noqa: SIM115
    faulthandler.enable(file=stack_file, all_threads=True)
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True, chain=False)

    phase.value = _PHASE_IMPORT
    try:
        if str(REPO_ROOT) not in sys.path:
            sys.path.insert(0, str(REPO_ROOT))
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        fn, args, kwargs = pickle.loads(job)
        phase.value = _PHASE_INIT
        dist.init_process_group(
            backend=backend,
            init_method=f"file://{store_path}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout_s),
        )
        phase.value = _PHASE_FN
        result = fn(rank, world_size, *args, **kwargs)
        phase.value = _PHASE_TEARDOWN
        try:
            payload = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise TypeError(
                f"the return value of {getattr(fn, '__qualname__', fn)!r} on rank {rank} "
                f"({type(result).__name__}) is not picklable: {exc}"
            ) from exc
        from hpattn_dist.shutdown import shutdown_process_group

        shutdown_process_group()  # barrier, then no gloo thread left (Note [clean exit])
        phase.value = _PHASE_SEND
    except BaseException:  # noqa: BLE001 - report everything, SystemExit included
        conn.send_bytes(b"er" + traceback.format_exc().encode("utf-8", "replace"))
        conn.close()
        # Stay alive until the parent kills us: a dead peer makes gloo raise "connection closed"
        # in every other rank, which would bury this traceback under secondary ones. Alive, the
        # peers stay where they are and the parent can show their stacks.
        parent = multiprocessing.parent_process()
        if parent is not None:
            wait([parent.sentinel], timeout=pg_timeout_s)
        return
    conn.send_bytes(b"ok" + payload)
    conn.close()


# --------------------------------------------------------------------------------------------
# Parent side


def _context() -> multiprocessing.context.BaseContext:
    method = os.environ.get(START_METHOD_ENV, "forkserver")
    if method not in ("forkserver", "spawn"):
        raise ValueError(f"{START_METHOD_ENV} must be 'forkserver' or 'spawn', got {method!r}")
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        # Note [fork server]: the server imports torch once (single-threaded, no process group,
        # no tensor op run yet), and each rank is a fork of it: ~0.1 s per rank instead of ~1.5 s.
        # The preload list is process-global; the server inherits the environment of the first
        # run_ranks call, in which OMP_NUM_THREADS=1 is set.
        # idx_flow (healpy, scikit-learn: seconds to import) too; a module that is not installed
        # is skipped by multiprocessing. torch._dynamo: a registered op's first call imports it
        # (seconds; Note [attention as one op] in hpattn_dist/strategies/ops.py).
        ctx.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", __name__, "idx_flow"])
    return ctx


class _ParentStdio:
    """Pickles as duplicates of the parent's current fds 1 and 2; unpickles as ``(out, err)``."""

    def __reduce__(self):
        from multiprocessing import reduction

        return (_ParentStdio._detach, (reduction.DupFd(1), reduction.DupFd(2)))

    @staticmethod
    def _detach(out: Any, err: Any) -> tuple[int, int]:
        return out.detach(), err.detach()


def _pickle_job(fn: Callable[..., Any], args: tuple, kwargs: dict) -> bytes:
    try:
        pickle.dumps(fn)
    except Exception as exc:
        raise TypeError(
            f"run_ranks: fn={fn!r} cannot be sent to a spawned rank ({exc}). Use a module-level "
            "function of an importable module (no lambda, closure or function defined in a test)."
        ) from exc
    try:
        return pickle.dumps((fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise TypeError(f"run_ranks: the extra args/kwargs are not picklable: {exc}") from exc


def _read_stack(path: Path) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        text = ""
    return text or "(no Python stack was written)"


class _Rank:
    def __init__(self, rank: int, process: multiprocessing.process.BaseProcess, conn: Connection,
                 stack_path: Path, phase: Any) -> None:
        self.rank = rank
        self.phase = phase
        self.process = process
        self.conn: Optional[Connection] = conn
        self.stack_path = stack_path
        self.result: Any = None
        self.done = False  # sent its result
        self.failure: Optional[str] = None


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    backend: str = "gloo",
    **kwargs: Any,
) -> list:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` spawned ranks.

    Each rank has an initialised default process group (``backend``, ``FileStore`` rendezvous in
    a temporary folder), ``OMP_NUM_THREADS=1`` and ``torch.set_num_threads(1)``.

    Args:
        fn: module-level function (pickled by qualified name).
        world_size: number of ranks, >= 1.
        *args, **kwargs: passed to ``fn`` after ``rank, world_size``; must be picklable.
        timeout: seconds for the whole job, process start-up included.
        backend: ``torch.distributed`` backend name.

    Returns:
        The ranks' return values in rank order (unpickled copies).

    Raises:
        RankFailure: a rank raised, exited abnormally, or the job exceeded ``timeout``; all ranks
            are killed and the message holds each failed rank's traceback or stack dump.
        ValueError: ``world_size < 1`` or ``timeout <= 0``.
        TypeError: ``fn`` or the arguments cannot be pickled.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"run_ranks: world_size must be a positive int, got {world_size!r}")
    if not timeout > 0:
        raise ValueError(f"run_ranks: timeout must be > 0 seconds, got {timeout!r}")
    job = _pickle_job(fn, args, kwargs)

    name = getattr(fn, "__qualname__", repr(fn))
    start = time.monotonic()
    deadline = start + timeout
    ctx = _context()
    workdir = Path(tempfile.mkdtemp(prefix="hpattn_ranks_"))
    ranks: list[_Rank] = []
    try:
        # Children inherit the environment at start(): set the per-rank variables only around it.
        env_patch = {
            **pin_math_library(dict(os.environ)),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(
                [str(REPO_ROOT)]
                + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
            ),
        }
        saved_env = {k: os.environ.get(k) for k in env_patch}
        os.environ.update(env_patch)
        try:
            for rank in range(world_size):
                reader, writer = ctx.Pipe(duplex=False)
                phase = ctx.Value("i", _PHASE_START, lock=False)
                stack_path = workdir / f"rank{rank}.stack"
                process = ctx.Process(
                    target=_rank_main,
                    name=f"{name}[rank {rank}/{world_size}]",
                    args=(job, rank, world_size, backend, str(workdir / "store"), str(stack_path),
                          timeout + _PG_TIMEOUT_MARGIN_S, writer, phase, _ParentStdio()),
                    daemon=True,
                )
                process.start()
                writer.close()  # so the reader sees EOF if the rank dies without sending
                ranks.append(_Rank(rank, process, reader, stack_path, phase))
        finally:
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

        failed = _collect(ranks, deadline)
        if failed is None:
            return [r.result for r in ranks]
        _raise_failure(ranks, name, world_size, timeout, time.monotonic() - start, timed_out=failed)
    finally:
        for r in ranks:
            if r.process.is_alive():
                r.process.kill()
            r.process.join(_KILL_GRACE_S)
            if r.conn is not None:
                r.conn.close()
        shutil.rmtree(workdir, ignore_errors=True)
    raise AssertionError("unreachable")  # pragma: no cover


def _collect(ranks: list[_Rank], deadline: float) -> Optional[bool]:
    """Read results until every rank has finished.

    Returns None on success, else whether the failure is a timeout.
    """
    while True:
        waiting = {}
        for r in ranks:
            if not r.done and r.failure is None:
                if r.conn is not None:
                    waiting[r.conn] = r
                waiting[r.process.sentinel] = r
        if not waiting:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return True
        for obj in wait(list(waiting), timeout=remaining):
            r = waiting[obj]
            if r.done or r.failure is not None:
                continue
            if obj is r.conn:
                _receive(r)
            else:  # the process exited; its message, if any, is already in the pipe
                r.process.join()
                if r.conn is not None and r.conn.poll():
                    _receive(r)
                if not r.done and r.failure is None:
                    r.failure = _describe_death(r)
        if any(r.failure is not None for r in ranks):
            return False
    # Every rank sent a result; they exit right after. A crash at exit is still a failure.
    for r in ranks:
        r.process.join(max(0.0, deadline - time.monotonic()))
        if r.process.exitcode is None:
            r.failure = "sent its result but did not exit before the timeout"
        elif r.process.exitcode != 0:
            r.failure = "sent its result, then " + _describe_death(r)
    if any(r.failure is not None for r in ranks):
        return False
    return None


def _receive(r: _Rank) -> None:
    assert r.conn is not None
    try:
        data = r.conn.recv_bytes()
    except (EOFError, OSError):
        r.conn.close()
        r.conn = None
        return
    if data.startswith(b"ok"):
        try:
            r.result = pickle.loads(data[2:])
            r.done = True
        except Exception:  # noqa: BLE001
            r.failure = "its result could not be unpickled here:\n" + traceback.format_exc()
    else:
        r.failure = "raised:\n" + data[2:].decode("utf-8", "replace")


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _phase_text(r: _Rank) -> str:
    return _PHASE_TEXT.get(r.phase.value, f"phase {r.phase.value}")


def _describe_death(r: _Rank) -> str:
    code = r.process.exitcode
    if code is not None and code < 0:
        try:
            how = f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
    else:
        how = f"exited with code {code}"
    return (
        f"{how} while {_phase_text(r)}, without reporting an exception; its Python stacks:\n"
        f"{_read_stack(r.stack_path)}"
    )


_KILLED_BY_US = (-signal.SIGKILL, -signal.SIGUSR1)


def _raise_failure(ranks: list[_Rank], name: str, world_size: int, timeout: float, elapsed: float,
                   timed_out: bool) -> None:
    pending = [r for r in ranks if not r.done and r.failure is None]
    running = [r for r in pending if r.process.is_alive()]
    # Ask every still-running rank for its Python stacks, then give them a moment to write.
    size_before = {r.rank: _file_size(r.stack_path) for r in running}
    for r in running:
        try:
            os.kill(r.process.pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
    grace_end = time.monotonic() + _DUMP_GRACE_S
    while running and time.monotonic() < grace_end:
        if all(_file_size(r.stack_path) > size_before[r.rank] for r in running):
            time.sleep(0.05)  # the dump is written in one go; let it finish
            break
        time.sleep(0.02)
    for r in running:
        r.process.kill()
    for r in running:
        r.process.join(_KILL_GRACE_S)
    # A message may have arrived since; a rank that we did not kill died on its own (it may have
    # looked alive above while it was exiting).
    for r in pending:
        if r.conn is not None and r.conn.poll():
            _receive(r)
        # (SIGUSR1 kills a rank that had not installed its handler yet: that one we killed too.)
        if r.failure is None and not r.done and r.process.exitcode not in _KILLED_BY_US:
            r.failure = _describe_death(r)
    running = [r for r in running if r.failure is None and not r.done]

    failures: dict[int, str] = {}
    if timed_out:
        for r in running:
            failures[r.rank] = (
                f"hung: still running after the {timeout:g} s timeout, {_phase_text(r)}; "
                f"its Python stacks:\n{_read_stack(r.stack_path)}"
            )
        running = []
    for r in ranks:
        if r.failure is not None:
            failures[r.rank] = r.failure

    lines = [
        f"run_ranks({name}, world_size={world_size}) failed after {elapsed:.1f} s: "
        f"rank(s) {sorted(failures)} " + ("timed out" if timed_out else "failed")
    ]
    for rank in sorted(failures):
        lines.append(f"\n--- rank {rank} {failures[rank]}")
    if running:
        lines.append("\n=== ranks still running, killed after the failure above ===")
        for r in running:
            lines.append(f"\n--- rank {r.rank} (killed while {_phase_text(r)}); "
                         f"its Python stacks:\n{_read_stack(r.stack_path)}")
    raise RankFailure("\n".join(lines), failures)


def attempt(fn: Callable[[], Any]) -> Optional[str]:
    """Run ``fn`` (on a rank); None, or ``"<ExceptionType>: <message>"`` for the parent to check."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the parent checks the type
        return f"{type(exc).__name__}: {exc}"
    return None
