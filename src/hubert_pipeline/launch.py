"""Where heavy work runs: local processes by default; SLURM through submitit when `execution.executor: slurm`.

Stages call `map_tasks(fn, tasks, execution=...)`: one call of `fn(**task)` per task (a shard, usually). Locally
the tasks run in a pool of `execution.workers` spawned processes (or inline with one worker), with a progress bar;
the first failure stops the stage with the task it came from.
"""

import logging
import multiprocessing as mp
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from tqdm import tqdm

from hubert_pipeline.params import ExecutionParams

logger = logging.getLogger(__name__)


class TaskError(RuntimeError):
    """A task of a stage failed; the message names the task."""


def _limit_threads(num_threads: int) -> None:
    import torch

    torch.set_num_threads(num_threads)


def map_tasks[R](
    fn: Callable[..., R],
    tasks: Sequence[dict[str, Any]],
    *,
    execution: ExecutionParams,
    desc: str,
) -> list[R]:
    """Run fn(**task) for every task and return the results in task order."""
    if execution.executor == "slurm":
        raise NotImplementedError("execution.executor: slurm is not available yet; use local")
    workers = min(execution.workers, len(tasks))
    if workers <= 1:
        return [fn(**task) for task in tqdm(tasks, desc=desc)]
    results: dict[int, R] = {}
    threads = max(1, (mp.cpu_count() or 1) // workers)
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_limit_threads, initargs=(threads,)) as pool:
        futures = {pool.submit(fn, **task): i for i, task in enumerate(tasks)}
        for future in tqdm(as_completed(futures), total=len(futures), desc=desc):
            i = futures[future]
            try:
                results[i] = future.result()
            except Exception as e:
                for f in futures:
                    f.cancel()
                raise TaskError(f"{desc}: task {i} ({tasks[i]}) failed: {type(e).__name__}: {e}") from e
    return [results[i] for i in range(len(tasks))]
