"""HuBERT pretraining: one code path for CPU and CUDA, one process or many (DDP), resumable to the step.

    python -m hubert_pipeline.train MANIFEST_WITH_UNITS OUT_DIR --num-classes 100        # one process
    torchrun --nproc-per-node 2 -m hubert_pipeline.train ...                             # DDP (gloo on CPU)
    (under SLURM: one task per GPU, srun python -m hubert_pipeline.train ...)

Checkpoints `OUT_DIR/step_XXXXXXXX.pt` are written atomically every `save_interval` steps exactly and at the last
step; they hold model, optimizer, scheduler, scaler, step and the position in the data order (loaded back with
`torch.load(weights_only=True)`: no pickle). Randomness is stateless: the crops and masks of a batch come from
(seed, epoch, batch number), and the global RNG (dropout, layer drop) is reseeded from (seed, rank, step) at every
step, so a resumed run gives the losses of an uninterrupted one.
"""

import dataclasses
import logging
import math
import os
import re
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import distributed as dist

from hubert_pipeline.params import TrainParams

if TYPE_CHECKING:
    from torch.nn.parallel import DistributedDataParallel

    from hubert_pipeline.data import Batch
    from hubert_pipeline.model import HubertConfig, HuBERTPretrain, Size

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^step_(\d{8})\.pt$")
type LogFn = Callable[[dict[str, float], int], None]


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm is NaN or infinite; the message names the step."""


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"step_{step:08d}.pt"


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, by step."""
    folder = Path(out_dir)
    found = [(int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def lr_lambda(warmup: int, max_steps: int) -> Callable[[int], float]:
    """fairseq's polynomial_decay (power 1): linear warmup to the peak, then linear decay to 0 at max_steps."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (max_steps - step) / max(1, max_steps - warmup))

    return factor


@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int


def init_distributed(device_type: str) -> DistEnv:
    """torchrun / SLURM / single process (spidr's detection); gloo on CPU, NCCL on CUDA."""
    if int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))) <= 1:
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


def fingerprint(manifest: str | Path, num_classes: int, model_cfg: Any, cfg: TrainParams) -> str:
    """What makes a checkpoint resumable: same units, classes, model and trajectory settings.

    Left out: max_steps (a run can be extended), intervals, workers, and init_from (used only at step 0).
    """
    import hashlib
    import json

    digest = hashlib.sha256()
    with Path(manifest).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    ignored = {"max_steps", "save_interval", "log_interval", "num_workers", "init_from", "compile", "processes",
               "accumulate"}  # fmt: skip  # processes x accumulate: checked on resume with a clear error
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ignored}
    key = json.dumps([digest.hexdigest(), num_classes, model_cfg.to_dict(), settings], sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _atomic_save(obj: dict[str, Any], path: Path) -> None:
    from hubert_pipeline.io import atomic_path

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


@dataclasses.dataclass(frozen=True)
class Optimization:
    """What an optimisation step updates besides the model, and the autocast it runs under."""

    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.GradScaler
    autocast_dtype: torch.dtype | None  # None: no autocast (CPU, or float32 on CUDA)


def build_training(
    cfg: TrainParams, model_cfg: "HubertConfig", num_classes: int, device: torch.device
) -> tuple["HuBERTPretrain", Optimization]:
    """A run's model (initial weights from cfg.seed, train mode, on `device`), its AdamW, LR schedule and scaler."""
    from hubert_pipeline.model import HuBERTPretrain

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every run
    model = HuBERTPretrain(model_cfg, num_classes)
    model.to(device).train()
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, cfg.max_steps))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    use_autocast = device.type == "cuda" and dtype != torch.float32
    scaler = torch.GradScaler(device.type, enabled=use_autocast and dtype == torch.float16)
    return model, Optimization(optimizer, scheduler, scaler, dtype if use_autocast else None)


@dataclasses.dataclass(frozen=True)
class StepResult:
    metrics: dict[str, float]  # train_loss, train_accuracy, train_feature_penalty (per masked frame), lr, grad_norm
    stop: bool  # a stop was requested on some rank during this step


def optimization_step(
    model: torch.nn.Module,
    micro: "list[Batch]",
    opt: Optimization,
    *,
    cfg: TrainParams,
    step: int,
    forward_model: torch.nn.Module | None = None,
    world_size: int = 1,
    stop_requested: Callable[[], bool] | None = None,
) -> StepResult:
    """One optimizer step over the micro-batches of this process (cfg.feature_penalty and cfg.grad_clip apply).

    The loss is fairseq's hubert criterion over its sample size: (cross-entropy summed over the masked frames
    + feature_penalty x feature penalty x frames) / masked frames of the whole step, every process and micro-batch.
    Gradients are unscaled, clipped to cfg.grad_clip, the optimizer and the LR schedule stepped, gradients zeroed.
    `forward_model`: the model as called (compiled, DDP-wrapped), `model` by default. `step` names the step
    (0-based) in the error raised on a non-finite loss or gradient norm.
    """
    forward_model = model if forward_model is None else forward_model
    device = micro[0].waveforms.device
    frames = torch.tensor(float(sum(int(b.mask.sum()) for b in micro)), device=device)
    if world_size > 1:
        dist.all_reduce(frames)
    stats = torch.zeros(4, device=device)  # loss sum, correct, penalty sum (x frames), frames
    for i, batch in enumerate(micro):
        sync = i == len(micro) - 1 or world_size == 1
        ctx = nullcontext() if sync else cast("DistributedDataParallel", forward_model).no_sync()
        autocast = torch.autocast(device.type, dtype=opt.autocast_dtype, enabled=opt.autocast_dtype is not None)
        with ctx, autocast:
            frame_loss, out = forward_model(
                batch.waveforms,
                batch.labels,
                mask=batch.mask,
                attention_mask=batch.attention_mask,
                lengths=batch.lengths,
            )
            n = frame_loss.numel()
            total = frame_loss.float().sum() + cfg.feature_penalty * out["feature_penalty"].float() * n
            loss = total * world_size / frames.clamp(min=1)
            opt.scaler.scale(loss).backward()
        stats += torch.stack(
            [
                out["logits_loss"].detach().float().sum(),
                out["correct"].detach().float().sum(),
                out["feature_penalty"].detach().float() * n,
                torch.tensor(float(n), device=device),
            ]
        )
    opt.scaler.unscale_(opt.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    stop = stop_requested is not None and stop_requested()
    stats = torch.cat([stats, torch.tensor([float(stop)], device=device)])
    if world_size > 1:
        dist.all_reduce(stats)
    if not (math.isfinite(float(stats[0])) and math.isfinite(float(grad_norm))):
        raise NonFiniteLossError(
            f"non-finite loss ({float(stats[0]):.4g}) or gradient norm ({float(grad_norm):.4g}) at step {step + 1}"
        )
    lr = opt.scheduler.get_last_lr()[0]
    opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    opt.optimizer.zero_grad(set_to_none=True)
    opt.scheduler.step()
    f = float(stats[3]) or 1.0
    metrics = {
        "train_loss": float(stats[0]) / f,
        "train_accuracy": float(stats[1]) / f,
        "train_feature_penalty": float(stats[2]) / f,
        "lr": float(lr),
        "grad_norm": float(grad_norm),
    }
    return StepResult(metrics, stop=float(stats[4]) > 0)


def train(  # noqa: C901, PLR0912, PLR0915
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
    turns true on any rank, every rank stops after that step, a checkpoint is saved and `launch.Interrupted` raised.
    """
    from spidr.config import MaskingConfig
    from torch.nn.parallel import DistributedDataParallel
    from tqdm import tqdm

    from hubert_pipeline.data import build_loader, read_labeled_manifest
    from hubert_pipeline.model import HubertConfig

    out_dir = Path(out_dir)
    rows = read_labeled_manifest(manifest)  # before any heavy work: a bad manifest fails at once
    if (top := max(max(r["units"], default=0) for r in rows)) >= num_classes:
        raise ValueError(f"{manifest}: unit {top} is out of range for {num_classes} classes")
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    env = init_distributed(device_type)
    device = select_device(env.local_rank)
    is_main = env.rank == 0
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_main:
        for stale in out_dir.glob(".step_*.tmp"):  # a checkpoint being written when the last run was killed
            stale.unlink()

    model_cfg = HubertConfig.preset(model_size, **(model_overrides or {}))
    model, opt = build_training(cfg, model_cfg, num_classes, device)
    optimizer, scheduler, scaler = opt.optimizer, opt.scheduler, opt.scaler

    step, epoch, steps_in_epoch = 0, 0, 0
    run_fingerprint = fingerprint(manifest, num_classes, model_cfg, cfg)
    checkpoints = list_checkpoints(out_dir)
    if checkpoints:
        saved = torch.load(checkpoints[-1][1], map_location="cpu", weights_only=True, mmap=True).get("fingerprint")
        if saved != run_fingerprint:
            # Another experiment's checkpoints (other units, k, model or settings), kept by DVC's `persist`:
            # they are in DVC's cache already, so they are removed rather than resumed from.
            logger.warning(
                "%s holds checkpoints of another configuration (fingerprint %s, this run %s): starting afresh",
                out_dir, saved, run_fingerprint,
            )  # fmt: skip
            if is_main:
                for _, path in checkpoints:
                    path.unlink()
            if env.world_size > 1:
                dist.barrier()
            checkpoints = []
    if checkpoints:
        last_step, last = checkpoints[-1]
        state = torch.load(last, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, steps_in_epoch = int(state["step"]), int(state["epoch"]), int(state["steps_in_epoch"])
        if state["world_size"] * state["accumulate"] != env.world_size * cfg.accumulate:
            raise ValueError(
                f"{last}: saved with {state['world_size']} process(es) x {state['accumulate']} micro-batches per step; "
                f"resuming with {env.world_size} x {cfg.accumulate} would change the batches of every step"
            )
        logger.info("resuming from %s (step %d, epoch %d)", last, last_step, epoch)
        del state
    elif cfg.init_from:
        from hubert_pipeline.model import HuBERT

        encoder = HuBERT.from_pretrained(cfg.init_from)
        missing, _ = model.load_state_dict(encoder.state_dict(), strict=False)
        logger.info("initialised from %s (%d head parameters left random)", cfg.init_from, len(missing))
    if step >= cfg.max_steps:
        logger.info("already trained to step %d", step)
        return checkpoints[-1][1]

    masking = MaskingConfig(mask_prob=cfg.mask_prob, mask_length=cfg.mask_length)
    loader, sampler, collator = build_loader(
        rows,
        masking=masking,
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
    steps_per_epoch = sampler.batches_per_epoch // cfg.accumulate
    if steps_per_epoch == 0:
        raise ValueError(f"{manifest}: too little data for one step of {env.world_size} x {cfg.accumulate} batches")

    forward_model: torch.nn.Module = model
    if cfg.compile and device.type == "cuda":
        forward_model = cast("torch.nn.Module", torch.compile(model, dynamic=True))
    if env.world_size > 1:
        forward_model = DistributedDataParallel(
            forward_model,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,
            find_unused_parameters=model_cfg.encoder_layer_drop > 0,
        )

    def save() -> Path:
        path = checkpoint_path(out_dir, step)
        if is_main:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "step": step,
                "epoch": epoch,
                "steps_in_epoch": steps_in_epoch,
                "world_size": env.world_size,
                "accumulate": cfg.accumulate,
                "num_classes": num_classes,
                "model_config": model_cfg.to_dict(),
                "fingerprint": run_fingerprint,
            }
            _atomic_save(state, path)
            logger.info("saved %s", path)
        if env.world_size > 1:
            dist.barrier()
        return path

    last_path = checkpoint_path(out_dir, step)
    lengths = [int(r["num_samples"]) for r in rows]
    meters: dict[str, float] = {}
    window_start, window_audio = time.perf_counter(), 0.0
    with ExitStack() as stack:
        if env.world_size > 1:
            stack.callback(dist.destroy_process_group)
        pbar = stack.enter_context(tqdm(total=cfg.max_steps, initial=step, disable=not is_main, desc="train"))
        while step < cfg.max_steps:
            if steps_in_epoch >= steps_per_epoch:
                epoch, steps_in_epoch = epoch + 1, 0
            sampler.set_epoch(epoch, skip=steps_in_epoch * cfg.accumulate)
            steps_per_epoch = sampler.batches_per_epoch // cfg.accumulate
            collator.epoch = epoch
            audio_used = sampler.audio_used(lengths, max_sample_size=cfg.max_sample_size, pad_audio=cfg.pad_audio)
            batches = iter(loader)
            while steps_in_epoch < steps_per_epoch and step < cfg.max_steps:
                micro = [next(batches).to(device) for _ in range(cfg.accumulate)]
                torch.manual_seed(hash((cfg.seed, env.rank, step)) % 2**62)
                result = optimization_step(
                    model,
                    micro,
                    opt,
                    cfg=cfg,
                    step=step,
                    forward_model=forward_model,
                    world_size=env.world_size,
                    stop_requested=stop_requested,
                )
                step += 1
                steps_in_epoch += 1
                pbar.update()
                audio = sum(b.audio_seconds for b in micro) * env.world_size
                window_audio += audio
                for key, value in result.metrics.items():
                    meters[key] = meters.get(key, 0.0) + value
                meters["_n"] = meters.get("_n", 0.0) + 1
                if step % cfg.log_interval == 0 or step == cfg.max_steps:
                    elapsed = time.perf_counter() - window_start
                    n = meters.pop("_n")
                    logged = {k: v / n for k, v in meters.items()} | {
                        "audio_seconds_per_second": window_audio / elapsed
                    }
                    logged["epoch"] = float(epoch)
                    logged["epoch_audio_used"] = audio_used  # fraction of the training audio this epoch trains on
                    if is_main:
                        pbar.set_postfix(loss=f"{logged['train_loss']:.3f}", acc=f"{logged['train_accuracy']:.3f}")
                        if log_fn is not None:
                            log_fn(logged, step)
                    meters, window_start, window_audio = {}, time.perf_counter(), 0.0
                if step % cfg.save_interval == 0 or step == cfg.max_steps:
                    last_path = save()
                if result.stop and step < cfg.max_steps:
                    if last_path != checkpoint_path(out_dir, step):
                        last_path = save()
                    from hubert_pipeline.launch import Interrupted

                    raise Interrupted(f"stopped at step {step} on request; resume from {last_path}")
    return last_path


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


if __name__ == "__main__":
    import argparse

    from hubert_pipeline.cli import setup_logging

    parser = argparse.ArgumentParser(
        description=__doc__, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("manifest", help="manifest with units (JSONL from the units stage)")
    parser.add_argument("out_dir", help="checkpoint folder (resumed if it holds checkpoints)")
    parser.add_argument("--num-classes", type=int, required=True, help="k of the k-means that made the units")
    parser.add_argument("--params", default="params.yaml", help="params file")
    parser.add_argument("--iteration", type=int, choices=(1, 2), default=1, help="which train_itN section to use")
    args = parser.parse_args()
    setup_logging()
    from hubert_pipeline.params import load_params

    p = load_params(args.params)
    requested = False
    if os.environ.get("SLURM_JOB_ID"):  # slurm/pretrain.sbatch: --signal=USR2@T before the time limit, --requeue
        import signal

        def _on_signal(signum: int, _frame: Any) -> None:
            global requested  # noqa: PLW0603
            logger.warning("received %s: checkpointing at the end of this step", signal.Signals(signum).name)
            requested = True

        signal.signal(signal.SIGUSR2, _on_signal)
    from hubert_pipeline.launch import Interrupted

    try:
        train(
            args.manifest,
            args.out_dir,
            cfg=p.train_it1 if args.iteration == 1 else p.train_it2,
            model_size=p.model.size,
            model_overrides=p.model.overrides,
            num_classes=args.num_classes,
            stop_requested=lambda: requested,
        )
    except Interrupted as e:
        logger.warning("%s", e)
        if int(os.environ.get("RANK", "0")) == 0:
            import subprocess

            subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=True)
            logger.warning("requeued SLURM job %s: it resumes from the last checkpoint", os.environ["SLURM_JOB_ID"])
        raise SystemExit(0) from None
