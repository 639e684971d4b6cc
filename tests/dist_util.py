"""Helpers for the tests that start several torch.distributed processes (gloo, CPU)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on this machine now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_and_collect(target, world: int, *args, timeout: float = 120) -> list:
    """Run ``target(rank, world, port, queue, *args)`` in ``world`` spawned processes; every one must
    exit 0 and put one result on the queue. Returns the results sorted."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, queue, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    assert all(p.exitcode == 0 for p in procs)
    return sorted(queue.get(timeout=5) for _ in procs)
