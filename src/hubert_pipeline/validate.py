"""Validation of every checkpoint on identical batches, crops and masks, and the choice of the best one.

The validation loader has no shuffle and a fixed seed: batch n has the same files, crops and masks for every
checkpoint, so differences between checkpoints are the model's alone. The reported loss is the mean cross-entropy
of the masked frames (the feature penalty is a regulariser, left out), the accuracy that of the masked prediction.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from hubert_pipeline.params import TrainParams, ValidateParams

if TYPE_CHECKING:
    from hubert_pipeline.data import Batch

logger = logging.getLogger(__name__)

type Rule = Literal["lowest_loss", "highest_accuracy", "last"]


@dataclass(frozen=True)
class CheckpointScore:
    step: int
    path: str
    loss: float
    accuracy: float
    frames: int
    commonest_rate: float  # share of the commonest unit among the scored frames: a model that learned nothing


@torch.no_grad()
def validate_checkpoints(
    manifest: str | Path,
    checkpoints: list[tuple[int, Path]],
    *,
    cfg: ValidateParams,
    train_cfg: TrainParams,
) -> list[CheckpointScore]:
    from spidr.config import MaskingConfig
    from tqdm import tqdm

    from hubert_pipeline.data import build_loader, read_labeled_manifest
    from hubert_pipeline.model import HubertConfig, HuBERTPretrain

    if not checkpoints:
        raise ValueError("no checkpoint to validate")
    rows = read_labeled_manifest(manifest)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader, _, _ = build_loader(
        rows,
        masking=MaskingConfig(mask_prob=train_cfg.mask_prob, mask_length=train_cfg.mask_length),
        max_batch_samples=cfg.max_batch_samples,
        min_sample_size=min(train_cfg.min_sample_size, *(int(r["num_samples"]) for r in rows)),
        max_sample_size=train_cfg.max_sample_size,
        num_buckets=train_cfg.num_buckets,
        seed=cfg.seed,
        shuffle=False,
        normalize=train_cfg.normalize,
        pad_audio=True,  # whole files (up to max_sample_size): no audio of the validation set is cropped away
        num_workers=0,
    )
    batches = list(loader)  # decoded once, identical for every checkpoint
    commonest = commonest_unit_rate(batches)
    scores = []
    model: HuBERTPretrain | None = None
    for step, path in tqdm(checkpoints, desc="validate"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        if model is None:
            model = HuBERTPretrain(HubertConfig.from_dict(state["model_config"]), int(state["num_classes"]))
        model.load_state_dict(state["model"])
        model.to(device).eval()
        loss_sum, correct, frames = 0.0, 0, 0
        for cpu_batch in batches:
            batch = cpu_batch.to(device)
            frame_loss, out = model(
                batch.waveforms,
                batch.labels,
                mask=batch.mask,
                attention_mask=batch.attention_mask,
                lengths=batch.lengths,
            )
            loss_sum += float(frame_loss.double().sum())
            correct += int(out["correct"].sum())
            frames += frame_loss.numel()
        score = CheckpointScore(step, str(path), loss_sum / max(frames, 1), correct / max(frames, 1), frames, commonest)
        scores.append(score)
        logger.info("step %d: valid loss %.4f, accuracy %.4f", step, scores[-1].loss, scores[-1].accuracy)
    return scores


def commonest_unit_rate(batches: list["Batch"]) -> float:
    """Share of the commonest unit among the masked, labelled frames: the accuracy of always predicting it."""
    scored = torch.cat([b.labels[b.mask & (b.labels >= 0)] for b in batches])
    return float(torch.bincount(scored).max()) / max(scored.numel(), 1)


def health_warning(scores: list[CheckpointScore], max_steps: int) -> str | None:
    """A warning when a checkpoint past half of the run scores under twice the commonest-unit rate, else None.

    HuBERT's masked accuracy climbs far above that rate (Base: about 0.37 at 250k steps on LibriSpeech); a run that
    stays near it learns nothing from its units (shuffled or misaligned units, a learning rate far off, ...).
    """
    late = [s for s in scores if s.step > max_steps / 2 and s.accuracy < 2 * s.commonest_rate]
    if not late:
        return None
    worst = min(late, key=lambda s: s.accuracy)
    return (
        f"valid accuracy {worst.accuracy:.4f} at step {worst.step} (of {max_steps}) is under twice the commonest-unit "
        f"rate {worst.commonest_rate:.4f}: the model is not learning its units"
    )


def choose(scores: list[CheckpointScore], rule: Rule) -> CheckpointScore:
    """The chosen checkpoint; ties go to the later step."""
    match rule:
        case "lowest_loss":
            return min(reversed(scores), key=lambda s: s.loss)
        case "highest_accuracy":
            return max(reversed(scores), key=lambda s: s.accuracy)
        case "last":
            return max(scores, key=lambda s: s.step)
    raise ValueError(f"unknown rule {rule!r}")


def plot_scores(scores: list[CheckpointScore], best: CheckpointScore, path: str | Path, title: str) -> None:
    """PNG of validation loss and accuracy per step (DVC shows image plots; no CDN needed offline)."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    from hubert_pipeline.io import atomic_path

    steps = [s.step for s in scores]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, [s.loss for s in scores], "o-", label="valid loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.axvline(best.step, color="grey", linestyle=":", label=f"chosen: step {best.step}")
    ax2 = ax.twinx()
    ax2.plot(steps, [s.accuracy for s in scores], "s--", color="tab:orange", label="valid accuracy")
    ax2.axhline(2 * best.commonest_rate, color="tab:orange", linestyle=":", label="2 x commonest-unit rate")
    ax2.set_ylabel("accuracy")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="upper right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
