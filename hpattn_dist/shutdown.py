"""Ending the process group so that no backend thread outlives the interpreter.

Note [clean exit]
    A gloo process group runs its collectives on C++ worker threads (``pt_gloo_runloop``). After
    a worker completes a collective it drops its reference to the work, and with it to the
    work's tensors; when Python has already let go of such a tensor, that drop frees the
    tensor's Python object and so takes the GIL. If the interpreter is finalizing by then, the
    GIL acquisition ends the thread (``pthread_exit``) inside a C++ destructor, which calls
    ``std::terminate``: the rank aborts after finishing its work ("terminate called without an
    active exception", SIGABRT). A worker that is descheduled for a few milliseconds between
    completing its last collective and dropping it is enough, so the abort shows under CPU load.

    ``dist.destroy_process_group()`` prevents it only if it really destroys the group: the
    group's destructor waits for its workers and joins them (with the GIL released), before the
    interpreter exits. It does not when something still holds the group object:

    * ``torch.distributed.nn.functional`` binds ``group=group.WORLD`` as the default argument of
      its collectives when it is first imported. ``torch._dynamo`` imports it, and the first
      call of a registered op of this library imports ``torch._dynamo`` (``strategies/ops.py``),
      so any run that initialised its group first pins the default group for the life of the
      process, and its workers run into interpreter finalization;
    * a ``DeviceMesh`` holds its groups (the root mesh, ``_pg_registry``), and DTensor's
      sharding-propagation caches hold meshes for the life of the process (FSDP2);
    * this library's caches of hybrid groups (:func:`hpattn_dist.mesh.hybrid_groups_for`).

    :func:`shutdown_process_group` destroys every group and then drops those references, so the
    groups' destructors join their workers there and then. Anything else the caller keeps (a
    model built with ``process_group=...`` in a global) keeps its group alive until it is
    freed: free it before the end of the program. On the success path every rank
    first meets the others in a barrier, so no peer is still sending when a group goes down; on
    an error path (a peer may be dead or stuck) there is no barrier, and the destructor waits
    for this rank's operations in flight, which end when the peers exit (their connections
    close) or at the group's timeout. On NCCL a failed rank's exit does not wake peers waiting
    in the success-path barrier: they end at the NCCL watchdog's timeout, as their next
    collective would have.
"""

from __future__ import annotations

import contextlib
import gc
import sys
from pathlib import Path
from typing import Iterator

import torch.distributed as dist

__all__ = ["ending_process_group", "shutdown_process_group"]


def shutdown_process_group(*, barrier: bool = True) -> None:
    """Destroy every process group of this process so that their threads are joined now, not
    at interpreter exit (Note [clean exit]). Does nothing if torch.distributed is not initialised.

    Args:
        barrier: meet every rank in a barrier first (the success path). False on an error path,
            where a peer may be dead or stuck and a barrier would wait for the group's timeout.
    """
    if not dist.is_available() or not dist.is_initialized():
        return
    world = dist.group.WORLD
    try:
        if barrier:
            dist.barrier()
    finally:
        dist.destroy_process_group()
        _release_pinned_groups(world)


@contextlib.contextmanager
def ending_process_group() -> Iterator[None]:
    """Run the body, then :func:`shutdown_process_group`: with a barrier when the body returned,
    without one when it raised (KeyboardInterrupt included), re-raising its exception."""
    try:
        yield
    except BaseException:
        shutdown_process_group(barrier=False)
        raise
    shutdown_process_group()


def _release_pinned_groups(world: object) -> None:
    """Drop the references of Note [clean exit] to the destroyed groups."""
    functional = sys.modules.get("torch.distributed.nn.functional")
    if functional is not None and world is not None:
        for fn in vars(functional).values():
            defaults = getattr(fn, "__defaults__", None)
            if defaults and any(d is world for d in defaults):
                # None is what these defaults are when imported before init: the default group.
                fn.__defaults__ = tuple(None if d is world else d for d in defaults)
    from hpattn_dist.mesh import forget_groups

    forget_groups()
    mesh_module = sys.modules.get("torch.distributed.device_mesh")
    if mesh_module is not None and _gloo_threads_alive():
        # DTensor's sharding caches keep meshes (and each root mesh its groups) for the life of
        # the process; a mesh outlives its destroyed groups anyway, so it lets go of them. The
        # scan of every object costs ~0.1-0.3 s, hence only when some group is still alive.
        for obj in gc.get_objects():
            # type(), not isinstance: isinstance reads __class__, which raises ReferenceError on
            # a weakref.proxy whose referent is gone (compiled graphs keep such proxies).
            if issubclass(type(obj), mesh_module.DeviceMesh):
                getattr(obj, "_pg_registry", {}).clear()


def _gloo_threads_alive() -> bool:
    """Whether a gloo thread (``pt_gloo_runloop``, ``gloo_tcp_loop``) runs in this process; True
    where the threads cannot be listed (no ``/proc``)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return True
    for task in tasks.iterdir():
        try:
            if "gloo" in (task / "comm").read_text():
                return True
        except OSError:  # the thread ended meanwhile
            pass
    return False
