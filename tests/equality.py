"""One harness for the equality of our training with the reference implementations, shared by the tests.

Both sides run with dropout and layer drop off, from the same initial weights, on the same batches and masks:
- torchaudio's port of fairseq (`torchaudio.models.hubert_pretrain_model`), its random masks replaced by ours, scored
  by fairseq's `hubert_criterion` (written out below: fairseq does not install on Python 3.12);
- minimal_hubert: its model (built at our preset's size) and its training step, transcribed from its train.py
  (`MinimalHubertTrainer`: the loop body of `minimal_hubert.train.train`, one process, no DDP).
Our side is always the production code: `hubert_pipeline.train.build_training` and `optimization_step`.
"""

import contextlib
import dataclasses
import types
from collections.abc import Generator
from typing import Any
from unittest import mock

import torch
import torchaudio
from minimal_hubert import model as minimal_hubert_model
from minimal_hubert.config import HuBERTConfig as MinimalHubertConfig
from minimal_hubert.train import LinearDecayLRScheduler
from spidr.config import MaskingConfig
from torch import Tensor, nn
from torch.nn import functional as F
from torchaudio.models.wav2vec2 import components as torchaudio_components

from hubert_pipeline.data import Batch, Collator
from hubert_pipeline.model import HubertConfig, HuBERTPretrain
from hubert_pipeline.params import TrainParams
from hubert_pipeline.train import Optimization, build_training
from hubert_pipeline.units import model_frames

SAMPLE_RATE = 16_000
NUM_CLASSES = 50
NO_DROPOUT = {
    "encoder_projection_dropout": 0.0,
    "encoder_attention_dropout": 0.0,
    "encoder_ff_interm_dropout": 0.0,
    "encoder_dropout": 0.0,
    "encoder_layer_drop": 0.0,
}


def tiny_config(**overrides: Any) -> HubertConfig:
    """The tiny preset without dropout or layer drop: both sides are then deterministic."""
    return HubertConfig.preset("tiny", **NO_DROPOUT, **overrides)


def deterministic_batches(
    count: int,
    *,
    cfg: TrainParams,
    num_classes: int = NUM_CLASSES,
    utterances: int = 2,
    seconds: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> list[Batch]:
    """`count` batches of seeded random audio and units, cropped and masked by our Collator (cfg's masking)."""
    generator = torch.Generator().manual_seed(seed)
    samples = round(seconds * SAMPLE_RATE)
    masking = MaskingConfig(mask_prob=cfg.mask_prob, mask_length=cfg.mask_length)
    collator = Collator(masking, seed=seed, max_sample_size=samples, pad_audio=False)
    batches = []
    for number in range(count):
        items = [
            (number, 0.1 * torch.randn(samples, generator=generator),
             torch.randint(num_classes, (int(model_frames(samples)),), generator=generator))
            for _ in range(utterances)
        ]  # fmt: skip
        batch = collator(items)
        batches.append(dataclasses.replace(batch, waveforms=batch.waveforms.to(dtype)))
    return batches


def build_ours(
    cfg: TrainParams, model_cfg: HubertConfig, *, dtype: torch.dtype = torch.float32
) -> tuple[HuBERTPretrain, Optimization]:
    """Our model, optimizer, LR schedule and scaler as train.py builds them (CPU), the model cast to `dtype`."""
    model, opt = build_training(cfg, model_cfg, NUM_CLASSES, torch.device("cpu"))
    return model.to(dtype), opt  # in place: the optimizer keeps the same Parameter objects


# ---------------------------------------------------------------- torchaudio's port of fairseq


def torchaudio_model(cfg: HubertConfig, train_cfg: TrainParams) -> torchaudio.models.HuBERTPretrainModel:
    """`hubert_pretrain_model` with every size argument of `cfg` (fairseq's HubertModel, its hubert_base options)."""
    if cfg.extractor_mode != "group_norm" or cfg.encoder_layer_norm_first:
        raise ValueError("only the post-norm, group-norm (base) layout is built here")
    return torchaudio.models.hubert_pretrain_model(
        extractor_mode=cfg.extractor_mode,
        extractor_conv_layer_config=list(cfg.conv_layers),
        extractor_conv_bias=False,
        encoder_embed_dim=cfg.encoder_embed_dim,
        encoder_projection_dropout=cfg.encoder_projection_dropout,
        encoder_pos_conv_kernel=cfg.pos_conv_kernel,
        encoder_pos_conv_groups=cfg.pos_conv_groups,
        encoder_num_layers=cfg.encoder_num_layers,
        encoder_num_heads=cfg.encoder_num_heads,
        encoder_attention_dropout=cfg.encoder_attention_dropout,
        encoder_ff_interm_features=cfg.encoder_ff_interm_features,
        encoder_ff_interm_dropout=cfg.encoder_ff_interm_dropout,
        encoder_dropout=cfg.encoder_dropout,
        encoder_layer_norm_first=cfg.encoder_layer_norm_first,
        encoder_layer_drop=cfg.encoder_layer_drop,
        mask_prob=train_cfg.mask_prob,
        mask_selection="static",
        mask_other=0.0,
        mask_length=train_cfg.mask_length,
        no_mask_overlap=False,
        mask_min_space=1,
        mask_channel_prob=0.0,
        mask_channel_selection="static",
        mask_channel_other=0.0,
        mask_channel_length=10,
        no_mask_channel_overlap=False,
        mask_channel_min_space=1,
        skip_masked=False,
        skip_nomask=False,
        num_classes=NUM_CLASSES,
        final_dim=cfg.final_dim,
        feature_grad_mult=cfg.feature_grad_mult,
    )


def torchaudio_forward(model: torchaudio.models.HuBERTPretrainModel, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
    """torchaudio's forward with the batch's mask in place of its random one: (logit_m, logit_u, features_pen).

    Its MaskGenerator still runs (and puts its own mask embedding in); only `_compute_mask_indices` is replaced.
    """

    def batch_mask(shape: tuple[int, int], *_args: Any, **_kwargs: Any) -> Tensor:
        if tuple(shape) != tuple(batch.mask.shape):
            raise AssertionError(f"torchaudio asks for masks of shape {shape}, the batch has {tuple(batch.mask.shape)}")
        return batch.mask

    with mock.patch.object(torchaudio_components, "_compute_mask_indices", batch_mask):
        logit_m, logit_u, features_pen = model(batch.waveforms, batch.labels)
    if logit_m is None or logit_u is None:
        raise AssertionError("built with skip_masked and skip_nomask False, torchaudio returns both logits")
    return logit_m, logit_u, features_pen


def fairseq_hubert_criterion(
    logit_m_list: list[Tensor],
    logit_u_list: list[Tensor],
    extra_losses: list[Tensor],
    *,
    pred_masked_weight: float = 1.0,
    pred_nomask_weight: float = 0.0,
    loss_weights: tuple[float, ...] = (10.0,),
) -> tuple[Tensor, int]:
    """fairseq's HubertCriterion.forward (criterions/hubert_criterion.py, reduce=True): (loss, sample_size).

    Defaults are hubert_base_librispeech.yaml's. The logits are fairseq's `[positive, negatives...]`, so every target
    is 0 (HubertModel.get_targets); HubertModel.get_logits casts them to float32. fairseq's trainer then divides the
    gradients by sample_size: the loss that is optimised is loss / sample_size.
    """
    loss, sample_size = torch.zeros(()), 0
    targ_m_list = [torch.zeros(logits.size(0), dtype=torch.long) for logits in logit_m_list]
    loss_m_list = [
        F.cross_entropy(lg.float(), t, reduction="sum") for lg, t in zip(logit_m_list, targ_m_list, strict=True)
    ]
    if pred_masked_weight > 0:
        loss = loss + pred_masked_weight * sum(loss_m_list)
        sample_size += targ_m_list[0].numel()
    targ_u_list = [torch.zeros(logits.size(0), dtype=torch.long) for logits in logit_u_list]
    loss_u_list = [
        F.cross_entropy(lg.float(), t, reduction="sum") for lg, t in zip(logit_u_list, targ_u_list, strict=True)
    ]
    if pred_nomask_weight > 0:
        loss = loss + pred_nomask_weight * sum(loss_u_list)
        sample_size += targ_u_list[0].numel()
    for penalty, coef in zip(extra_losses, loss_weights, strict=True):  # HubertModel.get_extra_losses: features_pen
        if coef != 0:
            loss = loss + coef * penalty.float() * sample_size
    return loss, sample_size


# ---------------------------------------------------------------- minimal_hubert


@contextlib.contextmanager
def minimal_hubert_sized_as(cfg: HubertConfig) -> Generator[None]:
    """minimal_hubert's model code, with `cfg`'s values where it hard-codes its base/large/xlarge ones."""
    values = MinimalHubertConfig(
        size="base",
        **{name: getattr(cfg, name) for name in MinimalHubertConfig.__dataclass_fields__ if name != "size"},
    )
    original_pos_conv = minimal_hubert_model.ConvPositionalEmbedding

    def pos_conv(embed_dim: int, kernel_size: int, groups: int, depth: int) -> Any:
        return original_pos_conv(embed_dim, cfg.pos_conv_kernel, cfg.pos_conv_groups, depth)

    patches = {
        "HuBERTConfig": types.SimpleNamespace(from_size=lambda _size: values),
        "DEFAULT_CONV_LAYER_CONFIG": [tuple(layer) for layer in cfg.conv_layers],
        "ConvPositionalEmbedding": pos_conv,
        "_LOGIT_TEMPERATURE": cfg.logit_temperature,
    }
    with contextlib.ExitStack() as stack:
        for name, value in patches.items():
            stack.enter_context(mock.patch.object(minimal_hubert_model, name, value))
        yield


def minimal_hubert_copy(ours: HuBERTPretrain) -> minimal_hubert_model.HuBERTPretrain:
    """minimal_hubert's HuBERTPretrain of our model's size and dtype, holding a copy of our weights."""
    with minimal_hubert_sized_as(ours.config):
        reference = minimal_hubert_model.HuBERTPretrain(ours.num_classes)
    ours_state, reference_state = ours.state_dict(), reference.state_dict()
    if {k: v.shape for k, v in ours_state.items()} != {k: v.shape for k, v in reference_state.items()}:
        raise AssertionError("minimal_hubert's model does not have our state-dict keys and shapes")
    reference.to(next(ours.parameters()).dtype)
    with torch.no_grad():  # not load_state_dict: minimal_hubert's pre-hook would convert the keys by its sizes
        for key, value in reference.state_dict().items():
            value.copy_(ours_state[key])
    return reference.train()


class MinimalHubertTrainer:
    """The optimizer, LR schedule, scaler and step of `minimal_hubert.train.train`, one process, no autocast."""

    def __init__(self, model: nn.Module, cfg: TrainParams) -> None:
        self.model, self.max_norm = model, cfg.grad_clip
        self.optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            betas=(cfg.betas[0], cfg.betas[1]),
            eps=cfg.eps,
            fused=True,
        )
        self.scaler = torch.GradScaler("cpu", enabled=False)  # its trainer: enabled for float16 only
        # its optimizer config: max_updates = warmup_steps + decay_steps
        self.scheduler = LinearDecayLRScheduler(self.optimizer, cfg.warmup_steps, cfg.max_steps)

    def step(self, batch: Batch) -> tuple[float, float]:
        """One step of its training loop (world_size 1); returns (loss, lr) as its meters and wandb log see them."""
        num_frames = batch.mask.sum()
        loss, _ = self.model(batch.waveforms, batch.labels, mask=batch.mask, attention_mask=batch.attention_mask)
        loss = loss.sum() * 1 / num_frames
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return float(loss.detach()), float(lr)


# ---------------------------------------------------------------- comparisons


def objective(metrics: dict[str, float], cfg: TrainParams) -> float:
    """The loss our step optimised, from its logged metrics: masked-frame cross-entropy + weighted feature penalty."""
    return metrics["train_loss"] + cfg.feature_penalty * metrics["train_feature_penalty"]


def assert_close_to_scale(ours: dict[str, Tensor], reference: dict[str, Tensor], *, rtol: float) -> None:
    """Every tensor within rtol x its own largest magnitude of the reference (its atol), key by key."""
    assert ours.keys() == reference.keys(), sorted(set(ours) ^ set(reference))
    for key, expected in reference.items():
        atol = rtol * float(expected.abs().max())
        torch.testing.assert_close(ours[key], expected, rtol=rtol, atol=atol, msg=lambda m, k=key: f"{k}: {m}")
