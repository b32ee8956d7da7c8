"""Where heavy work runs: local processes by default; SLURM through submitit when `execution.executor: slurm`.

Three shapes of work, each with the same call for both executors:
- `map_tasks(fn, tasks)`: one call of `fn(**task)` per task (a shard). Locally a pool of `execution.workers`
  spawned processes, or threads for tasks made of torch operations and file I/O (inline with one worker); on
  SLURM one job array, `array_parallelism` tasks at once.
- `run_job(fn, kwargs)`: one call (k-means, validation, ABX). Locally inline; on SLURM one job, with one GPU
  when the cluster has them (`gpus_per_node` > 0).
- `run_distributed(fn, kwargs, processes)`: DDP training. Locally `processes` spawned processes on 127.0.0.1;
  on SLURM one job of `nodes` x (`gpus_per_node` or `tasks_per_node`) tasks, one per GPU. On SIGUSR2 (sent
  `signal_delay_s` before the time limit, or by `scancel --signal=USR2`) the training saves a checkpoint at the
  step boundary, the job is requeued through submitit's checkpointing and resumes from that checkpoint.

The stage waits for its jobs with a progress bar, and the first failed or vanished (cancelled, killed) task fails
it with that task's log path. A task's result counts only once submitit has written it, after the task returned,
and tasks write their outputs atomically, so partial outputs are never taken for complete ones.
SLURM jobs are recorded in `<log_folder>/<name>/jobs.json`: rerunning a stage after its submitting process died
waits for the jobs still queued or running, reuses the results of finished ones and resubmits only the rest.
"""

import getpass
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError
from tqdm import tqdm

from hubert_pipeline.io import write_json
from hubert_pipeline.params import ExecutionParams, SlurmParams

logger = logging.getLogger(__name__)


class TaskError(RuntimeError):
    """A task of a stage failed; the message names the task and, on SLURM, its log."""


def _limit_threads(num_threads: int) -> None:
    import torch

    torch.set_num_threads(num_threads)


def map_tasks[R](
    fn: Callable[..., R],
    tasks: Sequence[dict[str, Any]],
    *,
    execution: ExecutionParams,
    desc: str,
    gpu: bool = False,
    threads: bool = False,
) -> list[R]:
    """Run fn(**task) for every task and return the results in task order. `gpu`: a task can use a GPU.

    `threads`: the local pool is made of threads, not spawned processes, for tasks that spend their time in torch
    operations and file I/O (both release the GIL). Starting a process that imports torch costs seconds, often
    more than a shard's work; threads start at once and scale as well on such tasks (bench/bench_mfcc.py).
    """
    if execution.executor == "slurm":
        return _slurm_map(fn, tasks, slurm=execution.slurm, desc=desc, gpu=gpu)
    workers = min(execution.workers, len(tasks))
    if workers <= 1:
        return [fn(**task) for task in tqdm(tasks, desc=desc)]
    per_worker = max(1, (mp.cpu_count() or 1) // workers)
    pool: Executor
    if threads:
        import torch

        default_threads = torch.get_num_threads()
        pool = ThreadPoolExecutor(workers, initializer=_limit_threads, initargs=(per_worker,))
    else:
        ctx = mp.get_context("spawn")
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_limit_threads, initargs=(per_worker,))
    results: dict[int, R] = {}
    try:
        with pool:
            futures = {pool.submit(fn, **task): i for i, task in enumerate(tasks)}
            try:
                for future in tqdm(as_completed(futures), total=len(futures), desc=desc):
                    i = futures[future]
                    try:
                        results[i] = future.result()
                    except Exception as e:
                        raise TaskError(f"{desc}: task {i} ({tasks[i]}) failed: {type(e).__name__}: {e}") from e
            except BaseException:  # a failed task or Ctrl-C: the queued tasks are dropped, the running ones finish
                for f in futures:
                    f.cancel()
                raise
    finally:
        if threads:
            torch.set_num_threads(default_threads)  # the workers' setting is the process's
    return [results[i] for i in range(len(tasks))]


def run_job[R](
    fn: Callable[..., R], kwargs: dict[str, Any], *, execution: ExecutionParams, desc: str, gpu: bool = False
) -> R:
    """fn(**kwargs), inline or as one SLURM job (with one GPU when `gpu` and the cluster has GPUs)."""
    if execution.executor == "slurm":
        return _slurm_map(fn, [kwargs], slurm=execution.slurm, desc=desc, gpu=gpu)[0]
    return fn(**kwargs)


def training_processes(execution: ExecutionParams, processes: int) -> int:
    """Processes of a training run: `processes` locally, nodes x tasks per node (one per GPU) on SLURM."""
    if execution.executor == "slurm":
        return execution.slurm.nodes * (execution.slurm.gpus_per_node or execution.slurm.tasks_per_node)
    return max(1, processes)


def run_distributed(fn: Callable[..., Any], kwargs: dict[str, Any], *, execution: ExecutionParams, desc: str,
                    processes: int) -> None:  # fmt: skip
    """fn(**kwargs, stop_requested=...) in every process of a DDP group (RANK, WORLD_SIZE, MASTER_* set).

    Locally: `processes` processes on this machine. On SLURM: one job of nodes x tasks per node; `fn` raises
    `Interrupted` after checkpointing when `stop_requested()` turned true, and the job is requeued.
    """
    if execution.executor == "slurm":
        _slurm_distributed(fn, kwargs, slurm=execution.slurm, desc=desc)
        return
    if processes <= 1:
        fn(**kwargs, stop_requested=None)
        return
    import torch.multiprocessing as tmp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = max(1, (mp.cpu_count() or 1) // processes)
    tmp.spawn(_local_rank_entry, args=(processes, port, threads, fn, kwargs), nprocs=processes)


def _local_rank_entry(rank: int, world_size: int, port: int, threads: int, fn: Callable[..., Any],
                      kwargs: dict[str, Any]) -> None:  # fmt: skip
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )  # fmt: skip
    _limit_threads(threads)
    fn(**kwargs, stop_requested=None)


# --- SLURM -------------------------------------------------------------------------------------------------------


def _name(desc: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in desc).strip("-") or "job"


def _library_path_line() -> str:
    """A job-script line: jobs import the library from the checkout the stage imported it from.

    submitit unpickles a task's function by module name, so without it a job of a DVC experiment running in
    `.dvc/tmp/exps/...` would import the workspace's library (the editable install). Explicit, not left to sbatch's
    environment export, which clusters may turn off (`SBATCH_EXPORT=NONE`).
    """
    src = Path(__file__).resolve().parents[1]
    return f'export PYTHONPATH={shlex.quote(str(src))}"${{PYTHONPATH:+:$PYTHONPATH}}"'


def _executor(slurm: SlurmParams, name: str, *, gpus_per_node: int, nodes: int = 1, tasks_per_node: int = 1) -> Any:
    if slurm.conf:
        os.environ["SLURM_CONF"] = str(Path(slurm.conf).resolve())
    executor = submitit.SlurmExecutor(folder=Path(slurm.log_folder).resolve() / name,
                                      max_num_timeout=slurm.max_requeues)  # fmt: skip
    params: dict[str, Any] = {
        "job_name": f"hubert-{name}",
        "time": slurm.time_minutes,
        "nodes": nodes,
        "ntasks_per_node": tasks_per_node,
        "cpus_per_task": slurm.cpus_per_task,
        "mem": f"{int(slurm.mem_gb * 1024)}M",
        "signal_delay_s": slurm.signal_delay_s,
        "array_parallelism": slurm.array_parallelism,
        "setup": [*slurm.setup, _library_path_line()],
        "additional_parameters": dict(slurm.additional),
    }
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    for key in ("account", "partition", "qos", "constraint"):
        if value := getattr(slurm, key):
            params[key] = value
    executor.update_parameters(**params)
    return executor


def _fingerprint(fn: Callable[..., Any], tasks: Sequence[dict[str, Any]], extra: Any = None) -> str:
    spec = [f"{fn.__module__}.{getattr(fn, '__qualname__', type(fn).__name__)}", list(tasks), extra]
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _queue() -> dict[str, str] | None:
    """Job id (array tasks expanded, `123_4`) -> state of this user's jobs in squeue; None when squeue fails."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i %T"],
            check=True, capture_output=True, text=True, timeout=60,
        ).stdout  # fmt: skip
    except (subprocess.SubprocessError, OSError) as e:
        logger.warning("squeue failed (%s): job states unknown, still waiting", e)
        return None
    return dict(line.split(maxsplit=1) for line in out.splitlines() if line.strip())


def _final_state(job_id: str) -> str:
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", job_id], check=False, capture_output=True, text=True, timeout=60
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return "UNKNOWN"
    for field in out.split():
        if field.startswith("JobState="):
            return field.removeprefix("JobState=")
    return "UNKNOWN (no longer known to slurmctld)"


def _vanished_state(job_id: str, last_seen: str | None) -> str:
    """Why a job left the queue without a result: slurmctld's final state, or what the last squeue implies."""
    state = _final_state(job_id)
    if state.startswith("UNKNOWN") and last_seen == "PENDING":
        # a pending job leaves the queue only by starting (slurmctld then keeps its record for MinJobAge) or by
        # being cancelled: SLURM purges a pending array task cancelled with scancel
        return "CANCELLED while pending"
    return state


def _cancel(job_ids: Sequence[str]) -> None:
    if job_ids:
        subprocess.run(["scancel", *job_ids], capture_output=True, check=False)


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log yet)"
    return "\n".join("    " + line for line in text[-lines:])


def _error_line(trace: str) -> str:
    """The exception line of a submitit FailedJobError (its traceback sits between two dashed lines)."""
    lines = [line.strip() for line in trace.splitlines()]
    dashes = [i for i, line in enumerate(lines) if line and set(line) == {"-"}]
    block = lines[dashes[0] + 1 : dashes[1]] if len(dashes) >= 2 else lines  # noqa: PLR2004
    return next((line for line in reversed(block) if line), "see the log")


def _wait(jobs: list[Any], *, desc: str, labels: list[str], poll: float) -> list[Any]:
    """Results of the jobs in order; the first failed or vanished job cancels the others and raises TaskError."""
    results: list[Any] = [None] * len(jobs)
    pending = set(range(len(jobs)))
    vanished_at: dict[int, float] = {}
    last_seen: dict[int, str] = {}  # state in squeue at the last poll
    grace = max(2 * poll, 10.0)  # a result file written at the very end may show up after squeue forgot the job

    def fail(i: int, why: str) -> TaskError:
        _cancel([jobs[j].job_id for j in pending if j != i])
        log = Path((jobs[i].task(0) if jobs[i].num_tasks > 1 else jobs[i]).paths.stderr)
        return TaskError(f"{desc}: task {i} ({labels[i]}), SLURM job {jobs[i].job_id}, {why}; log: {log}\n"
                         f"{_log_tail(log)}")  # fmt: skip

    with tqdm(total=len(jobs), desc=f"{desc} (SLURM)") as bar:
        while pending:
            queue = _queue()
            for i in sorted(pending):
                job = jobs[i].task(0) if jobs[i].num_tasks > 1 else jobs[i]  # a multi-task job: rank 0's result
                if Path(job.paths.result_pickle).exists():
                    try:
                        results[i] = job.result()
                    except (FailedJobError, UncompletedJobError) as e:
                        raise fail(i, f"failed: {_error_line(str(e))}") from None
                    pending.discard(i)
                    bar.update()
                elif queue is not None and job.job_id not in queue:
                    since = vanished_at.setdefault(i, time.monotonic())
                    if time.monotonic() - since > grace:
                        raise fail(i, f"ended {_vanished_state(job.job_id, last_seen.get(i))} without a result")
                else:
                    vanished_at.pop(i, None)
                    last_seen[i] = (queue or {}).get(job.job_id, last_seen.get(i, "?"))
            if queue is not None:
                states = [queue.get(jobs[i].job_id, "?") for i in pending]
                bar.set_postfix({s.lower(): states.count(s) for s in sorted(set(states))})
            if pending:
                time.sleep(poll)
    return results


def _slurm_map[R](fn: Callable[..., R], tasks: Sequence[dict[str, Any]], *, slurm: SlurmParams, desc: str,
                  gpu: bool) -> list[R]:  # fmt: skip
    name = _name(desc)
    gpus = 1 if gpu and slurm.gpus_per_node > 0 else 0
    executor = _executor(slurm, name, gpus_per_node=gpus)
    folder = Path(executor.folder)
    fingerprint = _fingerprint(fn, tasks)
    jobs: list[Any] = [None] * len(tasks)
    if earlier := _earlier_job_ids(folder, fingerprint):
        queue = _queue() or {}
        for i, job_id in enumerate(earlier):
            job = submitit.SlurmJob(folder=folder, job_id=job_id)
            ok = Path(job.paths.result_pickle).exists() and _succeeded(job)
            if ok or job_id in queue:
                jobs[i] = job
        if reused := sum(j is not None for j in jobs):
            logger.info("%s: %d/%d task(s) of an earlier submission are done or still queued", desc, reused,
                        len(tasks))  # fmt: skip
    todo = [i for i, job in enumerate(jobs) if job is None]
    if todo:
        submitted = executor.map_array(_Task(fn), [tasks[i] for i in todo])
        for i, job in zip(todo, submitted, strict=True):
            jobs[i] = job
        logger.info("%s: submitted %d task(s) as SLURM job %s; logs in %s", desc, len(todo),
                    submitted[0].job_id.split("_")[0], folder)  # fmt: skip
    _record_jobs(folder, fingerprint, [j.job_id for j in jobs], desc)
    labels = [", ".join(f"{k}={v}" for k, v in task.items() if k in ("shard", "split", "iteration")) or "job"
              for task in tasks]  # fmt: skip
    return _wait(jobs, desc=desc, labels=labels, poll=slurm.poll_seconds)


def _earlier_job_ids(folder: Path, fingerprint: str) -> list[str]:
    """The job ids recorded for the same work by an earlier run of the stage, or []."""
    path = folder / "jobs.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    return list(record["job_ids"]) if record.get("fingerprint") == fingerprint else []


def _record_jobs(folder: Path, fingerprint: str, job_ids: list[str], desc: str) -> None:
    write_json(folder / "jobs.json", {"fingerprint": fingerprint, "job_ids": job_ids, "desc": desc})


def _succeeded(job: Any) -> bool:
    try:
        job.result()
    except Exception:  # noqa: BLE001  a failed earlier task is simply run again
        return False
    return True


def _slurm_distributed(fn: Callable[..., Any], kwargs: dict[str, Any], *, slurm: SlurmParams, desc: str) -> None:
    name = _name(desc)
    tasks_per_node = slurm.gpus_per_node or slurm.tasks_per_node
    executor = _executor(slurm, name, gpus_per_node=slurm.gpus_per_node, nodes=slurm.nodes,
                         tasks_per_node=tasks_per_node)  # fmt: skip
    folder = Path(executor.folder)
    same_work = {k: v for k, v in kwargs.items() if k != "run_id"}  # each stage execution has its own MLflow run
    fingerprint = _fingerprint(fn, [same_work], [slurm.nodes, tasks_per_node])
    earlier = _earlier_job_ids(folder, fingerprint)
    job = None
    if earlier and earlier[0] in (_queue() or {}):
        job = submitit.SlurmJob(folder=folder, job_id=earlier[0])
        logger.info("%s: SLURM job %s of an earlier submission is still queued or running: waiting for it", desc,
                    job.job_id)  # fmt: skip
    if job is None:
        job = executor.submit(_DistributedTask(fn, kwargs))
        logger.info("%s: submitted SLURM job %s (%d node(s) x %d task(s)); logs in %s", desc, job.job_id,
                    slurm.nodes, tasks_per_node, folder)  # fmt: skip
        _record_jobs(folder, fingerprint, [job.job_id], desc)
    _wait([job], desc=desc, labels=[f"{slurm.nodes * tasks_per_node} tasks"], poll=slurm.poll_seconds)


class _Task:
    """A SLURM array task: torch threads limited to the task's CPUs, then fn(**task)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, task: dict[str, Any]) -> Any:
        _limit_threads(int(os.environ.get("SLURM_CPUS_PER_TASK", "1")))
        return self.fn(**task)


class _DistributedTask(submitit.helpers.Checkpointable):
    """One task of a SLURM training job; checkpointable: on SIGUSR2 it saves, then the job is requeued."""

    def __init__(self, fn: Callable[..., Any], kwargs: dict[str, Any]) -> None:
        self.fn = fn
        self.kwargs = kwargs

    def __call__(self) -> None:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        _limit_threads(int(os.environ.get("SLURM_CPUS_PER_TASK", "1")))
        requested = threading.Event()
        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's handler: calls checkpoint(), requeues, exits

        def on_signal(signum: int, _frame: Any) -> None:
            logger.warning("received %s: checkpointing at the end of this step", signal.Signals(signum).name)
            requested.set()

        signal.signal(signal.SIGUSR2, on_signal)
        from hubert_pipeline.train import Interrupted

        try:
            self.fn(**self.kwargs, stop_requested=requested.is_set)
        except Interrupted:
            if callable(requeue):
                requeue(signal.SIGUSR2, None)  # rank 0 requeues the job and exits; other ranks return
            else:
                raise
