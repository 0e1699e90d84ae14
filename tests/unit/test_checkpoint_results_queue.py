"""megatron's write results must be readable right after they are put (synchronous saves)."""

from __future__ import annotations

from megatron.core.dist_checkpointing.strategies import filesystem_async

from salt_megatron.checkpoint import trainer_state


def test_results_read_at_once_after_the_put() -> None:
    """A plain fork-context queue loses this race about every other time (a failed save)."""
    previous = filesystem_async._results_queue
    results = {0: [("item", i) for i in range(2000)]}
    try:
        for _ in range(20):
            filesystem_async._results_queue = None
            trainer_state.use_results_queue()
            q = filesystem_async._results_queue
            q.put(results)  # what megatron's writer does in this process on a synchronous save
            assert q.get_nowait() == results  # what its finalization does right after
            q.close()
            q.join_thread()
    finally:
        filesystem_async._results_queue = previous
