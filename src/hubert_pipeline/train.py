"""HuBERT pretraining: one code path for CPU and CUDA, one process or many (DDP), resumable to the step.

    python -m hubert_pipeline.train MANIFEST_WITH_UNITS OUT_DIR --num-classes 100        # one process
    torchrun --nproc-per-node 2 -m hubert_pipeline.train ...                             # DDP (gloo on CPU)
    (under SLURM: one task per GPU, srun python -m hubert_pipeline.train ...)

Read top to bottom: `build_forward_model` (compile, DDP), `TrainingData` (loader and the position in the data
order), `MetricWindow` (the logged averages), `_loop` (step, log, save, stop on request), `train` (build, resume,
loop). The step and what it updates are `hubert_pipeline.step`'s (`build_training`, `optimization_step`, importable
from here too); checkpoints are `hubert_pipeline.checkpoint`'s, every `save_interval` steps exactly and at the last.
Randomness is stateless:
the crops and masks of a batch come from (seed, epoch, batch number), and the global RNG (dropout, layer drop) is
reseeded from (seed, rank, step) at every step, so a resumed run gives the losses of an uninterrupted one.
"""

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import distributed as dist

from hubert_pipeline.checkpoint import Checkpointer, TrainState, fingerprint, list_checkpoints
from hubert_pipeline.params import TrainParams
from hubert_pipeline.step import (
    NonFiniteLossError,
    Optimization,
    StepResult,
    build_training,
    lr_lambda,
    optimization_step,
)

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from hubert_pipeline.data import Batch, Collator, ResumableBatchSampler
    from hubert_pipeline.model import HubertConfig, HuBERTPretrain, Size

# The step's API, also importable from here (tests/equality.py, bench/train_throughput.py use it):
__all__ = ["NonFiniteLossError", "Optimization", "build_training", "initial_model", "list_checkpoints",
           "lr_lambda", "optimization_step", "train"]  # fmt: skip

logger = logging.getLogger(__name__)

type LogFn = Callable[[dict[str, float], int], None]


@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int


def init_distributed(device_type: str) -> DistEnv:
    """torchrun / SLURM / single process (spidr's detection); gloo on CPU, NCCL on CUDA.

    Launched by torchrun (WORLD_SIZE set), a process group is made even for one process (its collectives are then
    skipped: world_size 1), so that `torchrun --nproc-per-node 1` exercises the NCCL set-up (bench/gpu_check.py).
    """
    if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return DistEnv(0, 0, 1)
    from spidr.environment import distributed_environment

    env = distributed_environment()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistEnv(env.global_rank, env.local_rank, env.world_size)


def select_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


# ---------------------------------------------------------------- building a run


def build_forward_model(
    model: torch.nn.Module, *, compile_model: bool, find_unused_parameters: bool, world_size: int
) -> torch.nn.Module:
    """The model as the step calls it: compiled (inductor, on CPU too) if asked, wrapped in DDP on many processes."""
    forward_model = model
    if compile_model:
        forward_model = cast("torch.nn.Module", torch.compile(model, dynamic=True))
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        forward_model = DistributedDataParallel(
            forward_model,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,
            find_unused_parameters=find_unused_parameters,
        )
    return forward_model


@dataclasses.dataclass
class TrainingData:
    """This process's loader, and the epoch bookkeeping of the resumable batch order (every rank the same)."""

    loader: "DataLoader"
    sampler: "ResumableBatchSampler"
    collator: "Collator"
    lengths: list[int]  # samples of every file of the manifest
    cfg: TrainParams
    steps_per_epoch: int = 0
    audio_used: float = 0.0  # fraction of the training audio this epoch trains on

    @classmethod
    def build(cls, rows: list[dict], cfg: TrainParams, env: DistEnv, *, epoch: int, manifest: str | Path) -> Any:
        from spidr.config import MaskingConfig

        from hubert_pipeline.data import build_loader

        loader, sampler, collator = build_loader(
            rows,
            masking=MaskingConfig(mask_prob=cfg.mask_prob, mask_length=cfg.mask_length),
            max_batch_samples=cfg.max_batch_samples,
            min_sample_size=cfg.min_sample_size,
            max_sample_size=cfg.max_sample_size,
            num_buckets=cfg.num_buckets,
            seed=cfg.seed,
            shuffle=True,
            normalize=cfg.normalize,
            pad_audio=cfg.pad_audio,
            num_workers=cfg.num_workers,
            rank=env.rank,
            world_size=env.world_size,
            accumulate=cfg.accumulate,
        )
        sampler.set_epoch(epoch)  # bucketing gives each epoch its own number of batches
        data = cls(loader, sampler, collator, [int(r["num_samples"]) for r in rows], cfg)
        data.steps_per_epoch = sampler.batches_per_epoch // cfg.accumulate
        if data.steps_per_epoch == 0:
            raise ValueError(f"{manifest}: too little data for one step of {env.world_size} x {cfg.accumulate} batches")
        return data

    def epoch_batches(self, state: TrainState) -> Iterator["Batch"]:
        """The batches of this process from `state`'s position on, moving `state` to the next epoch if it is done."""
        if state.steps_in_epoch >= self.steps_per_epoch:
            state.epoch, state.steps_in_epoch = state.epoch + 1, 0
        self.sampler.set_epoch(state.epoch, skip=state.steps_in_epoch * self.cfg.accumulate)
        self.steps_per_epoch = self.sampler.batches_per_epoch // self.cfg.accumulate
        self.collator.epoch = state.epoch
        self.audio_used = self.sampler.audio_used(
            self.lengths, max_sample_size=self.cfg.max_sample_size, pad_audio=self.cfg.pad_audio
        )
        return iter(self.loader)


# ---------------------------------------------------------------- the loop


class MetricWindow:
    """The steps since the last log: their results (read back only when logged), audio and model FLOPs.

    Logged besides the step's metrics: audio_seconds_per_second (every process), model_flops_per_second (this
    process: `hubert_pipeline.flops`) and, on a GPU of the peak table, mfu (that rate over its dense bf16 peak).
    """

    def __init__(self, peak_flops: float | None = None) -> None:
        self.peak_flops = peak_flops
        self.reset()

    def reset(self) -> None:
        self.results: list[StepResult] = []
        self.audio, self.flops, self.start = 0.0, 0.0, time.perf_counter()

    def add(self, result: StepResult, audio_seconds: float, flops: float) -> None:
        self.results.append(result)
        self.audio += audio_seconds
        self.flops += flops

    def flush(self, data: TrainingData, state: TrainState) -> dict[str, float]:
        """Means of the window's metrics, its throughput, the epoch; starts a new window."""
        sums: dict[str, float] = {}
        for result in self.results:
            for key, value in result.metrics.items():
                sums[key] = sums.get(key, 0.0) + value
        logged = {k: v / len(self.results) for k, v in sums.items()}
        elapsed = time.perf_counter() - self.start
        logged["audio_seconds_per_second"] = self.audio / elapsed
        logged["model_flops_per_second"] = self.flops / elapsed
        if self.peak_flops is not None:
            logged["mfu"] = logged["model_flops_per_second"] / self.peak_flops
        logged["epoch"] = float(state.epoch)
        logged["epoch_audio_used"] = data.audio_used
        self.reset()
        return logged


def _step_flops(model: torch.nn.Module, micro: "list[Batch]") -> float:
    from hubert_pipeline.flops import train_step_flops

    cfg, num_classes = cast("HubertConfig", model.config), cast("int", model.num_classes)
    return sum(train_step_flops(cfg, num_classes, batch=b.waveforms.shape[0], samples=b.waveforms.shape[1],
                                masked_frames=b.masked_frames) for b in micro)  # fmt: skip


def _peak_flops(device: torch.device) -> float | None:
    from hubert_pipeline.flops import peak_flops

    return peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def _log(window: MetricWindow, data: TrainingData, state: TrainState, *, pbar: Any, log_fn: LogFn | None) -> None:
    """The window's means to the log, the progress bar and `log_fn`, on rank 0; the others (no bar) read nothing."""
    if pbar.disable:
        window.reset()
        return
    logged = window.flush(data, state)
    mfu = f", MFU {logged['mfu']:.1%}" if "mfu" in logged else ""
    logger.info("step %d: loss %.4f, %.1f audio s/s, %.3g model FLOP/s%s", state.step, logged["train_loss"],
                logged["audio_seconds_per_second"], logged["model_flops_per_second"], mfu)  # fmt: skip
    pbar.set_postfix(loss=f"{logged['train_loss']:.3f}", acc=f"{logged['train_accuracy']:.3f}")
    if log_fn is not None:
        log_fn(logged, state.step)


class Interrupted(Exception):  # noqa: N818  a signal, not an error
    """Raised by `train` when it stopped early on request (SIGUSR2 under SLURM) after saving a checkpoint."""


def _interrupt(path: Path | None, step: int) -> None:
    raise Interrupted(f"stopped at step {step} on request; resume from {path}")


def _loop(
    model: torch.nn.Module,
    forward_model: torch.nn.Module,
    opt: Optimization,
    data: TrainingData,
    checkpointer: Checkpointer,
    state: TrainState,
    *,
    cfg: TrainParams,
    env: DistEnv,
    log_fn: LogFn | None,
    stop_requested: Callable[[], bool] | None,
) -> Path | None:
    """Steps from `state` to cfg.max_steps: log every log_interval, save every save_interval, stop on request."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    is_main, window = env.rank == 0, MetricWindow(_peak_flops(device))
    with ExitStack() as stack:
        if dist.is_initialized():
            stack.callback(dist.destroy_process_group)
        pbar = stack.enter_context(tqdm(total=cfg.max_steps, initial=state.step, disable=not is_main, desc="train"))
        while state.step < cfg.max_steps:
            batches = data.epoch_batches(state)
            while state.steps_in_epoch < data.steps_per_epoch and state.step < cfg.max_steps:
                micro = [next(batches).to(device) for _ in range(cfg.accumulate)]
                torch.manual_seed(hash((cfg.seed, env.rank, state.step)) % 2**62)
                result = optimization_step(model, micro, opt, cfg=cfg, step=state.step, forward_model=forward_model,
                                           world_size=env.world_size, stop_requested=stop_requested)  # fmt: skip
                state.step, state.steps_in_epoch = state.step + 1, state.steps_in_epoch + 1
                pbar.update()
                window.add(result, sum(b.audio_seconds for b in micro) * env.world_size, _step_flops(model, micro))
                if state.step % cfg.log_interval == 0 or state.step == cfg.max_steps:
                    _log(window, data, state, pbar=pbar, log_fn=log_fn)
                if state.step % cfg.save_interval == 0 or state.step == cfg.max_steps:
                    checkpointer.save(model, opt, state)
                if result.stop and state.step < cfg.max_steps:
                    _interrupt(checkpointer.save_final(model, opt, state), state.step)
    return checkpointer.last_path


def _initialise_weights(model: torch.nn.Module, init_from: str) -> None:
    """Iteration 2: the encoder's weights from a trained model; the pretraining head stays random."""
    from hubert_pipeline.model import HuBERT

    encoder = HuBERT.from_pretrained(init_from)
    missing, _ = model.load_state_dict(encoder.state_dict(), strict=False)
    logger.info("initialised from %s (%d head parameters left random)", init_from, len(missing))


def initial_model(cfg: TrainParams, model_cfg: "HubertConfig", num_classes: int) -> "HuBERTPretrain":
    """The weights a fresh run of `cfg` starts from, on the CPU: cfg.seed's draw, then cfg.init_from's encoder where
    set. The untrained control of the unit-quality table (what training added is measured against these)."""
    model, _ = build_training(cfg, model_cfg, num_classes, torch.device("cpu"))
    if cfg.init_from:
        _initialise_weights(model, cfg.init_from)
    return model.eval()


def train(
    manifest: str | Path,
    out_dir: str | Path,
    *,
    cfg: TrainParams,
    model_size: "Size",
    model_overrides: dict[str, Any] | None = None,
    num_classes: int,
    log_fn: LogFn | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> Path:
    """Train until cfg.max_steps (resuming from the last checkpoint in out_dir); return the last checkpoint.

    `stop_requested` (SLURM preemption or time-out, see hubert_pipeline.launch) is polled at every step; when it
    turns true on any rank, every rank stops after that step, a checkpoint is saved and `Interrupted` raised.
    """
    from hubert_pipeline.data import read_labeled_manifest
    from hubert_pipeline.model import HubertConfig
    from hubert_pipeline.sources import training_code

    rows = read_labeled_manifest(manifest)  # before any heavy work: a bad manifest fails at once
    if (top := max((int(r["units"].max()) for r in rows if len(r["units"])), default=0)) >= num_classes:
        raise ValueError(f"{manifest}: unit {top} is out of range for {num_classes} classes")
    env = init_distributed("cuda" if torch.cuda.is_available() else "cpu")
    device = select_device(env.local_rank)
    model_cfg = HubertConfig.preset(model_size, **(model_overrides or {}))
    checkpointer = Checkpointer(
        out_dir,
        fingerprint=fingerprint(manifest, num_classes, model_cfg, cfg),
        rank=env.rank,
        world_size=env.world_size,
        meta={"accumulate": cfg.accumulate, "num_classes": num_classes, "model_config": model_cfg.to_dict(),
              "code": training_code()},
        max_steps=cfg.max_steps,
        resume_other_code=cfg.resume_other_code,
    )  # fmt: skip
    checkpointer.init_state()
    model, opt = build_training(cfg, model_cfg, num_classes, device)
    state = checkpointer.load_existing_run(model, opt, device, accumulate=cfg.accumulate)
    if state is None:
        state = TrainState()
        if cfg.init_from:
            _initialise_weights(model, cfg.init_from)
    if state.step >= cfg.max_steps:
        logger.info("already trained to step %d", state.step)
        return cast("Path", checkpointer.last_path)
    data = TrainingData.build(rows, cfg, env, epoch=state.epoch, manifest=manifest)
    forward_model = build_forward_model(model, compile_model=cfg.compile, world_size=env.world_size,
                                        find_unused_parameters=model_cfg.encoder_layer_drop > 0)  # fmt: skip
    last = _loop(model, forward_model, opt, data, checkpointer, state, cfg=cfg, env=env, log_fn=log_fn,
                 stop_requested=stop_requested)  # fmt: skip
    return cast("Path", last)


def train_process(
    *, run_id: str | None, tracking_uri: str | None, stop_requested: Callable[[], bool] | None = None, **kwargs: Any
) -> None:
    """`train` in one process of a (possibly distributed) run; rank 0 logs to the MLflow run `run_id`."""
    from hubert_pipeline.cli import setup_logging
    from hubert_pipeline.tracking import metric_logger

    setup_logging()
    log_fn = None
    if run_id and int(os.environ.get("RANK", "0")) == 0:
        log_fn = metric_logger(run_id, tracking_uri)
    train(**kwargs, log_fn=log_fn, stop_requested=stop_requested)


def main() -> None:
    """The CLI; under SLURM, SIGUSR2 (sent before the time limit) checkpoints, requeues the job and exits."""
    import argparse

    parser = argparse.ArgumentParser(
        description=__doc__, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("manifest", help="manifest with units (JSONL from the units stage)")
    parser.add_argument("out_dir", help="checkpoint folder (resumed if it holds checkpoints)")
    parser.add_argument("--num-classes", type=int, required=True, help="k of the k-means that made the units")
    parser.add_argument("--params", default="params.yaml", help="params file")
    parser.add_argument("--iteration", type=int, choices=(1, 2), default=1, help="which train_itN section to use")
    args = parser.parse_args()
    from hubert_pipeline.cli import setup_logging
    from hubert_pipeline.params import load_params

    setup_logging()
    p = load_params(args.params)
    requested: list[bool] = []
    if os.environ.get("SLURM_JOB_ID"):  # slurm/pretrain.sbatch: --signal=USR2@T before the time limit, --requeue
        import signal

        def on_signal(signum: int, _frame: Any) -> None:
            logger.warning("received %s: checkpointing at the end of this step", signal.Signals(signum).name)
            requested.append(True)

        signal.signal(signal.SIGUSR2, on_signal)
    try:
        train(args.manifest, args.out_dir, cfg=p.train_it1 if args.iteration == 1 else p.train_it2,
              model_size=p.model.size, model_overrides=p.model.overrides, num_classes=args.num_classes,
              stop_requested=lambda: bool(requested))  # fmt: skip
    except Interrupted as e:
        logger.warning("%s", e)
        if int(os.environ.get("RANK", "0")) == 0:
            import subprocess

            subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=True)
            logger.warning("requeued SLURM job %s: it resumes from the last checkpoint", os.environ["SLURM_JOB_ID"])
        raise SystemExit(0) from None


if __name__ == "__main__":
    main()
