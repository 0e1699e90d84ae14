"""Run a function on N gloo processes (torch.multiprocessing spawn) and collect rank 0's result.

Start few processes and run many checks in each: importing megatron costs seconds per process.
"""

from __future__ import annotations

import os
import queue as pyqueue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    rank: int,
    world: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple,
    queue: Any,
    setup: Callable[[], None] | None,
) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    from salt_megatron.runtime import destroy_distributed, init_distributed

    try:
        if setup is not None:
            setup()  # e.g. a fake accelerator, before any process group exists
        init_distributed()
        result = fn(*args)
        queue.put((rank, "ok", result))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
        raise
    finally:
        destroy_distributed()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    setup: Callable[[], None] | None = None,
) -> list[Any]:
    """Call ``fn(*args)`` on ``world_size`` ranks; return the per-rank results in rank order.

    ``fn`` (and ``setup``, run in each worker before torch.distributed starts) must be importable
    (module level, or a ``functools.partial`` of one). Any rank's exception fails the call, with
    its traceback.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, setup))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = float("inf")  # once a rank fails, the others get 30 s to report before a kill
    while len(results) < world_size:
        try:
            rank, status, payload = queue.get(timeout=2.0)
        except pyqueue.Empty:
            if time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                break
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if any(r not in results for r in dead):
                for p in procs:
                    p.kill()
                codes = {r: procs[r].exitcode for r in dead if r not in results}
                raise RuntimeError(f"distributed worker died without a result: {codes}") from None
            continue
        if status == "error":
            errors.append(f"rank {rank}:\n{payload}")
            deadline = min(deadline, time.monotonic() + 30.0)
        results[rank] = payload
    for p in procs:
        p.join()
    if errors:
        raise RuntimeError("distributed worker failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
