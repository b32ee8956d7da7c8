"""One optimisation step of HuBERT pretraining, and what it updates: model, AdamW, LR schedule, gradient scaler.

`build_training` makes a run's model and its `Optimization`; `optimization_step` runs one step over the
micro-batches of this process (fairseq's hubert criterion over the masked frames of the whole step, every process).
`hubert_pipeline.train` loops over it; tests/equality.py and bench/train_throughput.py call these same functions.
"""

import dataclasses
import math
from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING, cast

import torch
from torch import distributed as dist

from hubert_pipeline.params import TrainParams

if TYPE_CHECKING:
    from torch.nn.parallel import DistributedDataParallel

    from hubert_pipeline.data import Batch
    from hubert_pipeline.model import HubertConfig, HuBERTPretrain


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm is NaN or infinite; the message names the step."""


def lr_lambda(warmup: int, max_steps: int) -> Callable[[int], float]:
    """fairseq's polynomial_decay (power 1): linear warmup to the peak, then linear decay to 0 at max_steps."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (max_steps - step) / max(1, max_steps - warmup))

    return factor


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
    """A step's sums over every process, left on the device: reading `metrics` is a host synchronisation."""

    stats: torch.Tensor  # (5,): loss sum, correct, feature penalty x frames, masked frames, stop flag
    grad_norm: torch.Tensor  # () the norm before clipping
    lr: float
    stop: bool  # a stop was requested on some rank during this step

    @property
    def metrics(self) -> dict[str, float]:
        """train_loss, train_accuracy, train_feature_penalty (per masked frame), lr, grad_norm."""
        loss, correct, penalty, frames, _ = self.stats.tolist()
        f = frames or 1.0
        return {
            "train_loss": loss / f,
            "train_accuracy": correct / f,
            "train_feature_penalty": penalty / f,
            "lr": float(self.lr),
            "grad_norm": float(self.grad_norm),
        }


def _accumulate_gradients(
    forward_model: torch.nn.Module, micro: "list[Batch]", opt: Optimization, cfg: TrainParams, world_size: int
) -> torch.Tensor:
    """Forward and backward of every micro-batch; (4,) sums: loss, correct, penalty x frames, masked frames.

    Each micro-batch's loss is divided by the masked frames of the whole step on every process (fairseq's
    sample_size), times world_size because DDP averages the gradients of the processes: the gradient is that of
    the global sum of losses over the global count of masked frames, however the frames fall on the ranks.
    """
    device = micro[0].waveforms.device
    frames = torch.full((), float(sum(b.masked_frames for b in micro)), device=device)  # counted on the host
    if world_size > 1:
        dist.all_reduce(frames)
    stats = torch.zeros(4, device=device)
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
                torch.full((), float(n), device=device),
            ]
        )
    return stats


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

    Host synchronisations: one per step, the (loss, gradient norm, stop flag) read back together, which two
    features need at every step: the error naming the step of a non-finite loss, and every rank stopping after the
    same step on a stop request. The masked frames are counted on the host (`Batch.masked_frames`), the metrics
    stay on the device (`StepResult.metrics` reads them). Left in the model: its boolean indexing of the masked
    frames (one per micro-batch, as in fairseq and minimal_hubert), and with padded batches one more (`lengths`);
    float16 adds the scaler's inf check.
    """
    forward_model = model if forward_model is None else forward_model
    stats = _accumulate_gradients(forward_model, micro, opt, cfg, world_size)
    opt.scaler.unscale_(opt.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    stop = stop_requested is not None and stop_requested()
    stats = torch.cat([stats, stats.new_full((1,), float(stop))])
    if world_size > 1:
        dist.all_reduce(stats)
    loss_sum, norm, stopped = torch.stack([stats[0].double(), grad_norm.double(), stats[4].double()]).tolist()
    if not (math.isfinite(loss_sum) and math.isfinite(norm)):
        raise NonFiniteLossError(f"non-finite loss ({loss_sum:.4g}) or gradient norm ({norm:.4g}) at step {step + 1}")
    lr = opt.scheduler.get_last_lr()[0]
    opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    opt.optimizer.zero_grad(set_to_none=True)
    opt.scheduler.step()
    return StepResult(stats, grad_norm.detach(), float(lr), stop=stopped > 0)
