"""HuBERT and its masked-prediction pretraining head, in torchaudio's component style on spidr's components.

The modules are built exactly as `minimal_hubert` builds them, so state dicts are interchangeable: a
`HuBERTPretrain(HubertConfig.preset("base"), 100)` has the same keys and shapes as minimal_hubert's
`HuBERTPretrain(100, "base")`. Checkpoints of fairseq, torchaudio and transformers load through
`from_pretrained` (see `hubert_pipeline.compat`).

    cfg = HubertConfig.preset("tiny", encoder_dropout=0.0)
    model = HuBERTPretrain(cfg, num_classes=100)
    loss, out = model(waveforms, labels, mask=mask, attention_mask=None)   # (B, T) audio, (B, frames) labels
    feats = HuBERT.from_pretrained("models:/hubert@it1").get_intermediate_outputs(waveforms, num_layers=6)
"""

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Self, cast

import torch
from spidr.models.components import (
    ConvLayerBlock,
    ConvPositionalEmbedding,
    FeatureExtractor,
    FeatureProjection,
    FeedForward,
    LayerNorm,
    SelfAttention,
    Transformer,
    TransformerLayer,
)
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import weight_norm

from hubert_pipeline.model_config import (
    FAIRSEQ_CONV_LAYERS,
    MEL_HOP,
    MEL_WINDOW,
    N_FFT,
    SIZES,
    HubertConfig,
    Size,
    conv_frames,
)

# The configuration's names, importable from here as before (`from hubert_pipeline.model import HubertConfig`).
__all__ = ["FAIRSEQ_CONV_LAYERS", "SIZES", "HuBERT", "HuBERTPretrain", "HubertConfig", "Size", "conv_frames"]


class GradMultiply(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by `scale` (fairseq's GradMultiply)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor, None]:
        return grad_outputs[0] * ctx.scale, None


class LogitGenerator(nn.Module):
    """Cosine similarity of projected frames to every label embedding, over a temperature: (N, D) -> (N, C)."""

    def __init__(self, encoder_embed_dim: int, final_dim: int, num_classes: int, temperature: float) -> None:
        super().__init__()
        self.label_embeddings = nn.Parameter(torch.empty(num_classes, final_dim))
        nn.init.uniform_(self.label_embeddings)
        self.final_proj = nn.Linear(encoder_embed_dim, final_dim)
        self.logit_temp = nn.Buffer(torch.tensor(temperature))

    def forward(self, x: Tensor) -> Tensor:
        # Same logits as fairseq's [positive, all negatives with the positive set to -inf], as one matmul:
        # cross-entropy over classes then equals fairseq's loss without a (C, N, D) tensor of targets.
        x = self.final_proj(x)
        with torch.autocast(x.device.type, enabled=False):  # logits in float32, as fairseq's
            x = F.normalize(x.float(), dim=-1, eps=1e-8)  # (N, final_dim)
            embeddings = F.normalize(self.label_embeddings.float(), dim=-1, eps=1e-8)  # (C, final_dim)
            return x @ embeddings.t() / self.logit_temp  # (N, C)


class LogMelFrontEnd(nn.Module):
    """MelHuBERT's front end: (B, T) audio -> (B, frames, 2 * mel_bins), the conv extractor's frames exactly.

    Log-mel power every 10 ms over a 25 ms Hann window (HTK mel scale, 20 Hz-8 kHz); frame i stacks the 10 ms frames
    2i and 2i+1, so it starts at sample 320 i like the conv extractor's frame i. No parameters: checkpoints hold none.
    """

    def __init__(self, mel_bins: int, conv_layers: tuple[tuple[int, int, int], ...]) -> None:
        super().__init__()
        self.mel_bins, self.conv_layers = mel_bins, conv_layers
        with torch.device("cpu"):  # constants, not in state dicts: real even when the model is built on "meta"
            import torchaudio  # here: a first import on "meta" would put torchaudio's module constants there

            fbank = torchaudio.functional.melscale_fbanks(N_FFT // 2 + 1, 20.0, 8000.0, mel_bins, 16_000,
                                                          mel_scale="htk")  # fmt: skip
            window = torch.hann_window(MEL_WINDOW, periodic=False)
        self.fbank = nn.Buffer(fbank, persistent=False)  # (N_FFT // 2 + 1, mel_bins)
        self.window = nn.Buffer(window, persistent=False)

    def forward(self, waveforms: Tensor) -> Tensor:
        batch, frames = waveforms.shape[0], conv_frames(waveforms.shape[1], self.conv_layers)
        x = F.pad(waveforms.float(), (0, MEL_HOP))  # the last frame's second half may need a 10 ms more
        x = x.unfold(-1, MEL_WINDOW, MEL_HOP)[:, : 2 * frames]  # (B, 2 frames, MEL_WINDOW)
        x = x - x.mean(dim=-1, keepdim=True)
        power = torch.fft.rfft(x * self.window, n=N_FFT).abs().pow(2)  # (B, 2 frames, N_FFT // 2 + 1)
        mel = torch.log(power @ self.fbank + 1e-6)  # (B, 2 frames, mel_bins)
        return mel.reshape(batch, frames, 2 * self.mel_bins)


def masked_group_norm(x: Tensor, frames: Tensor, norm: nn.GroupNorm) -> Tensor:
    """`norm` (one group per channel) over each item's first `frames` (B,) frames only: (B, C, T) -> (B, C, T).

    In float32, as autocast runs group_norm; the frames past an item's own are normalised with its statistics.
    Sums as matrix products and a norm: no more (B, C, T) temporaries than two (memory-bound on a CPU).
    """
    x = x.float()
    own = (torch.arange(x.shape[-1], device=x.device) < frames[:, None]).unsqueeze(-1).float()  # (B, T, 1)
    count = frames.to(x)[:, None, None]
    mean = torch.bmm(x, own) / count  # (B, C, 1)
    centred = (x - mean).mul_(own.transpose(1, 2))  # zero past each item's frames
    var = torch.linalg.vector_norm(centred, dim=-1, keepdim=True).square() / count
    scale = torch.rsqrt(var + norm.eps) * norm.weight.float()[:, None]
    return torch.addcmul(norm.bias.float()[:, None] - mean * scale, x, scale)


def _front_end(cfg: HubertConfig) -> nn.Module:
    if cfg.frontend == "log_mel":
        return LogMelFrontEnd(cfg.mel_bins, cfg.conv_layers)
    blocks, in_channels = nn.ModuleList(), 1
    for i, (out_channels, kernel_size, stride) in enumerate(cfg.conv_layers):
        norm: nn.Module | None = None
        if cfg.extractor_mode == "layer_norm":
            norm = LayerNorm(normalized_shape=out_channels, elementwise_affine=True)
        elif i == 0:
            norm = nn.GroupNorm(num_groups=out_channels, num_channels=out_channels, affine=True)
        blocks.append(ConvLayerBlock(in_channels, out_channels, kernel_size, stride, norm, bias=False))
        in_channels = out_channels
    return FeatureExtractor(blocks)


def init_bert_params(encoder: nn.Module) -> None:
    """fairseq's `init_bert_params` on the transformer: every Linear N(0, 0.02) with zero bias (q, k, v included).

    spidr's `Transformer.init_weights` reaches the Linear children before their attention parent, so its xavier
    init of q/k/v/out wins there; fairseq's normal init wins everywhere in its TransformerEncoder.
    """
    for module in encoder.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def hubert_components(cfg: HubertConfig) -> tuple[nn.Module, nn.Sequential, Transformer]:
    feature_extractor = _front_end(cfg)
    pos_conv = ConvPositionalEmbedding(cfg.encoder_embed_dim, cfg.pos_conv_kernel, cfg.pos_conv_groups, depth=1)
    conv = cast("nn.Conv1d", pos_conv.convs[0])
    nn.init.normal_(conv.weight, mean=0.0, std=math.sqrt(4.0 / (cfg.encoder_embed_dim * cfg.pos_conv_kernel)))
    nn.init.constant_(cast("Tensor", conv.bias), 0.0)
    pos_conv.convs[0] = weight_norm(conv, dim=2)  # fairseq inits the conv, then applies weight norm
    pos_conv.layer_norm = nn.Identity()  # ty: ignore[invalid-assignment]  (fairseq's has no norm there)
    layers = nn.ModuleList()
    for _ in range(cfg.encoder_num_layers):
        attn = SelfAttention(
            cfg.encoder_embed_dim, cfg.encoder_num_heads, qkv_bias=True, dropout=cfg.encoder_attention_dropout
        )
        ff = FeedForward(cfg.encoder_embed_dim, cfg.encoder_ff_interm_features, cfg.encoder_ff_interm_dropout)
        layers.append(TransformerLayer(attn, cfg.encoder_dropout, ff, layer_norm_first=cfg.encoder_layer_norm_first))
    # spidr's Transformer normalises before the layers when told `layer_norm_first`: that is the post-norm model.
    encoder = Transformer(
        layers, pos_conv, cfg.encoder_dropout, cfg.encoder_layer_drop, layer_norm_first=not cfg.encoder_layer_norm_first
    )
    init_bert_params(encoder.layers)
    in_features = 2 * cfg.mel_bins if cfg.frontend == "log_mel" else cfg.conv_layers[-1][0]
    feature_projection = nn.Sequential(
        FeatureProjection(in_features, cfg.encoder_embed_dim),
        nn.Dropout(cfg.encoder_projection_dropout),
    )
    return feature_extractor, feature_projection, encoder


class HuBERT(nn.Module):
    """Conv feature extractor, feature projection, transformer encoder: (B, T) audio -> (B, frames, D)."""

    def __init__(self, cfg: HubertConfig) -> None:
        super().__init__()
        self.config = cfg
        self.feature_extractor, self.feature_projection, self.encoder = hubert_components(cfg)
        self.receptive_field = 1 + sum((k - 1) * math.prod(s for _, _, s in cfg.conv_layers[:i])
                                       for i, (_, k, _) in enumerate(cfg.conv_layers))  # fmt: skip

    def _conv_features(self, waveforms: Tensor, lengths: Tensor | None = None) -> Tensor:
        """(B, T) audio -> (B, frames, C) front-end features.

        `lengths` (B,) gives each waveform's samples in a zero-padded batch. The group-norm extractor normalises
        over time: there each waveform goes through it alone (CPU), or conv layer 0 is normalised over each waveform's
        own frames only (GPU), so its features are the ones it would get unpadded (fairseq crops batches instead);
        padded frames get zeros. The other front ends' frames see only their own samples (and zeros past the end, as
        unpadded).
        """
        if waveforms.ndim != 2:  # noqa: PLR2004
            raise ValueError(f"waveforms must be (batch, samples), got shape {tuple(waveforms.shape)}")
        shortest = waveforms.shape[1] if lengths is None else int(lengths.min())
        if shortest < self.receptive_field:
            raise ValueError(f"waveforms of {shortest} samples: at least {self.receptive_field} needed")
        if self.config.frontend == "log_mel":
            return self.feature_extractor(waveforms)
        mult = self.config.feature_grad_mult
        with nullcontext() if mult != 0.0 else torch.no_grad():
            if self.config.extractor_mode == "group_norm" and self._padded(waveforms, lengths):
                # On a CPU the extractor is memory-bound: a padded batch is no faster than one waveform at a time,
                # and slower when large (docs/benchmarks.md, units in padded batches); a GPU takes one pass.
                per_waveform = self._one_by_one if waveforms.device.type == "cpu" else self._group_norm_per_waveform
                x = per_waveform(waveforms, cast("Tensor", lengths))
            else:
                x = self.feature_extractor(waveforms)  # (B, frames, C)
        return GradMultiply.apply(x, mult) if mult not in {0.0, 1.0} and torch.is_grad_enabled() else x

    @staticmethod
    def _padded(waveforms: Tensor, lengths: Tensor | None) -> bool:
        return lengths is not None and bool((lengths != waveforms.shape[1]).any())

    def _one_by_one(self, waveforms: Tensor, lengths: Tensor) -> Tensor:
        feats = [self.feature_extractor(w[None, : int(n)])[0] for w, n in zip(waveforms, lengths, strict=True)]
        frames = conv_frames(waveforms.shape[1], self.config.conv_layers)
        return torch.stack([F.pad(f, (0, 0, 0, frames - f.shape[0])) for f in feats])  # (B, frames, C)

    def _group_norm_per_waveform(self, waveforms: Tensor, lengths: Tensor) -> Tensor:
        """The group-norm extractor on a padded batch, conv layer 0 normalised over each waveform's own frames."""
        first, *rest = cast("list[ConvLayerBlock]", list(cast("FeatureExtractor", self.feature_extractor).conv_layers))
        x = first.conv(waveforms.unsqueeze(1))  # (B, C, frames of layer 0)
        own = (lengths.to(x.device) - first.kernel_size) // first.stride + 1  # (B,)
        x = F.gelu(masked_group_norm(x, own, cast("nn.GroupNorm", first.layer_norm)))
        for block in rest:
            x = block(x)
        x = x.transpose(1, 2)  # (B, frames, C)
        return x * self.frame_mask(lengths, waveforms.shape[1]).to(x.device).unsqueeze(-1)

    def frame_mask(self, lengths: Tensor, num_samples: int) -> Tensor:
        """(B, frames) bool, True on each waveform's own frames: `lengths` (B,) samples in a batch of `num_samples`."""
        layers = self.config.conv_layers
        own = torch.tensor([conv_frames(int(n), layers) for n in lengths.tolist()], device=lengths.device)
        return torch.arange(conv_frames(num_samples, layers), device=lengths.device) < own[:, None]

    def _attention_mask(self, waveforms: Tensor, lengths: Tensor | None, given: Tensor | None) -> Tensor | None:
        if given is not None or not self._padded(waveforms, lengths):
            return given
        return self.frame_mask(cast("Tensor", lengths), waveforms.shape[1])[:, None, None, :].to(waveforms.device)

    def forward(
        self, waveforms: Tensor, *, attention_mask: Tensor | None = None, lengths: Tensor | None = None
    ) -> Tensor:
        """(B, T) audio -> (B, frames, D). `attention_mask`: bool (B, 1, 1, frames), True on real frames (spidr's).

        `lengths` (B,): samples of each waveform in a zero-padded batch; the attention mask is made from them unless
        given. Each waveform's frames are then those it gets alone, up to float rounding.
        """
        x = self.feature_projection(self._conv_features(waveforms, lengths))  # (B, frames, D)
        return self.encoder(x, self._attention_mask(waveforms, lengths, attention_mask))

    def get_intermediate_outputs(
        self,
        waveforms: Tensor,
        *,
        attention_mask: Tensor | None = None,
        lengths: Tensor | None = None,
        num_layers: int | None = None,
        before_residual: bool = True,
    ) -> list[Tensor]:
        """Outputs of the first `num_layers` layers (all by default), each (B, frames, D).

        `before_residual=True` gives each layer's feed-forward output before its residual (minimal_hubert's and
        spidr's default); `False` gives the layer outputs, as fairseq's `extract_features(output_layer=n)`.
        `lengths` and `attention_mask` as in `forward`.
        """
        x = self.feature_projection(self._conv_features(waveforms, lengths))
        mask = self._attention_mask(waveforms, lengths, attention_mask)
        return self.encoder.get_intermediate_outputs(x, mask, num_layers, before_residual=before_residual)

    @classmethod
    def from_pretrained(cls, source: str | Path, *, trust_pickle: bool = False) -> Self:
        """Load a checkpoint in any layout of `hubert_pipeline.compat`, or an MLflow URI (`models:/name@alias`),
        read from the store `hubert_pipeline.tracking.reading_uri` resolves (MLFLOW_TRACKING_URI, else the checkout's).

        The model is returned in eval mode.

        `trust_pickle` allows full unpickling of `.pt` files (fairseq checkpoints); only for files you trust.
        """
        from hubert_pipeline.compat import load_state_dict_any, local_source

        with local_source(source) as path:
            state_dict, config = load_state_dict_any(path, trust_pickle=trust_pickle)
        return cls.from_state_dict(state_dict, config)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Tensor], config: HubertConfig | None = None) -> Self:
        """A model (eval mode, float32) from a state dict in any layout; `config` inferred from shapes if not given.

        No copy is made: the model's parameters share memory with the float32 tensors of `state_dict`.
        """
        from hubert_pipeline.compat import to_native

        state_dict, config = to_native(state_dict, for_pretraining=issubclass(cls, HuBERTPretrain), config=config)
        state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
        with torch.device("meta"):  # no random init of weights that are overwritten at once
            model = cls._build(config, state_dict)
        model.load_state_dict(state_dict, strict=True, assign=True)
        return model.eval()

    @classmethod
    def _build(cls, config: HubertConfig, state_dict: dict[str, Tensor]) -> Self:  # noqa: ARG003
        return cls(config)


class HuBERTPretrain(HuBERT):
    """HuBERT with a mask embedding and the masked-prediction head (fairseq's HubertModel)."""

    def __init__(self, cfg: HubertConfig, num_classes: int) -> None:
        super().__init__(cfg)
        self.num_classes = num_classes
        self.logit_generator = LogitGenerator(cfg.encoder_embed_dim, cfg.final_dim, num_classes, cfg.logit_temperature)
        self.mask_embedding = nn.Parameter(torch.empty(cfg.encoder_embed_dim))
        nn.init.uniform_(self.mask_embedding)

    def forward(  # ty: ignore[incompatible-method-override]  (a pretraining step, not an encoder call)
        self,
        waveforms: Tensor,
        labels: Tensor,
        *,
        mask: Tensor | None,
        attention_mask: Tensor | None,
        lengths: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of every masked frame whose label is not padding (-1), flattened in (batch, frame) order.

        waveforms (B, T); labels (B, frames) with -1 on padding; mask (B, frames) bool, True = replaced by the mask
        embedding and predicted (None: nothing masked, every non-padding frame predicted). Returns
        `(loss (N,), {"logits_loss": (N,), "correct": (N,) bool, "feature_penalty": scalar})`; the feature penalty
        (mean squared conv feature, fairseq's `features_pen`; 0 for the log-mel front end, which learns nothing) is
        left for the trainer to weight. `lengths` (B,): samples of each waveform in a zero-padded batch.
        """
        features = self._conv_features(waveforms, lengths)  # (B, frames, C)
        if self.config.frontend == "log_mel":
            feature_penalty = features.new_zeros((), dtype=torch.float32)
        else:
            feature_penalty = features.float().pow(2).mean()
        x = self.feature_projection(features)  # (B, frames, D)
        if labels.shape != x.shape[:2]:
            raise ValueError(f"labels {tuple(labels.shape)} do not match the model's frames {tuple(x.shape[:2])}")
        selected = labels >= 0
        if mask is not None:
            if mask.shape != labels.shape:
                raise ValueError(f"mask {tuple(mask.shape)} does not match labels {tuple(labels.shape)}")
            x = torch.where(mask.unsqueeze(-1), self.mask_embedding.to(x.dtype).expand_as(x), x)
            selected = selected & mask
        x = self.encoder(x, attention_mask)
        index = torch.nonzero(selected, as_tuple=True)
        target = labels[index]  # (N,)
        logits = self.logit_generator(x[index])  # (N, C)
        logits_loss = F.cross_entropy(logits, target, reduction="none")
        correct = logits.argmax(dim=-1) == target
        return logits_loss, {"logits_loss": logits_loss, "correct": correct, "feature_penalty": feature_penalty}

    @classmethod
    def _build(cls, config: HubertConfig, state_dict: dict[str, Tensor]) -> Self:
        return cls(config, num_classes=state_dict["logit_generator.label_embeddings"].shape[0])
