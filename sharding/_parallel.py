"""Run ``process_item`` over many items in order: in-process, in a process pool, or as Ray tasks.

Results come back in submission order (so shards are deterministic) with a bounded number in
flight (so a fast pool cannot pile up a dataset's worth of encoded samples in memory while the
single writer catches up).
"""

from __future__ import annotations

import multiprocessing as mp
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import sharding
from sharding._samples import ItemResult, SamplePlan, process_item
from sharding.records import Reader, SourceItem

_worker_reader: Reader | None = None


def _init_worker(reader: Reader) -> None:
    global _worker_reader
    _worker_reader = reader


def _pool_task(item: SourceItem, plan: SamplePlan) -> ItemResult:
    return process_item(_worker_reader, item, plan)


def run_ordered(
    reader: Reader,
    tasks: Iterable[tuple[SourceItem, SamplePlan]],
    workers: int = 1,
    ray_address: str | None = None,
    use_ray: bool = False,
) -> Iterator[ItemResult]:
    """Yield ``process_item(reader, item, plan)`` for each task, in order."""
    if use_ray:
        yield from _run_ray(reader, tasks, ray_address)
    elif workers <= 1:
        for item, plan in tasks:
            yield process_item(reader, item, plan)
    else:
        yield from _run_pool(reader, tasks, workers)


def _run_pool(reader: Reader, tasks, workers: int) -> Iterator[ItemResult]:
    # spawn, not fork: the parent may hold threads (webdataset pulls in torch, Ray's client), and
    # forking a threaded process can deadlock; the reader is sent once per worker
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(reader,)) as pool:
        pending: deque[Any] = deque()
        for item, plan in tasks:
            pending.append(pool.apply_async(_pool_task, (item, plan)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _run_ray(reader: Reader, tasks, address: str | None) -> Iterator[ItemResult]:
    import ray  # ray core only (tasks); only needed for --ray builds

    started = not ray.is_initialized()
    if started:
        # on a remote cluster, ship this package to the workers (they must still see the source
        # files, e.g. on a shared filesystem); a local Ray imports it from this environment
        runtime_env = {"py_modules": [sharding]} if address else None
        ray.init(
            address=address or None,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env=runtime_env,
        )
    try:
        remote = ray.remote(num_cpus=1)(process_item)
        reader_ref = ray.put(reader)
        window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        pending: deque[Any] = deque()
        try:
            for item, plan in tasks:
                pending.append(remote.remote(reader_ref, item, plan))
                if len(pending) >= window:
                    yield ray.get(pending.popleft())
            while pending:
                yield ray.get(pending.popleft())
        finally:
            for ref in pending:
                ray.cancel(ref)
    finally:
        if started:
            ray.shutdown()
