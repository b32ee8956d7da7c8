"""The model's configuration: one frozen dataclass (fairseq's name of each field beside it) and its size presets.

Torch-free, so that what only needs sizes (checkpoint conversion in `hubert_pipeline.compat`, FLOPs in
`hubert_pipeline.flops`) imports it without the model; `hubert_pipeline.model` builds the modules from it.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Self

type Size = Literal["tiny", "base", "large", "xlarge"]

SIZES: tuple[Size, ...] = ("tiny", "base", "large", "xlarge")
FAIRSEQ_CONV_LAYERS: tuple[tuple[int, int, int], ...] = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2
N_FFT, MEL_WINDOW, MEL_HOP = 512, 400, 160  # the log-mel front end: 25 ms windows every 10 ms at 16 kHz


@dataclass(frozen=True)
class HubertConfig:
    extractor_mode: Literal["group_norm", "layer_norm"]  # extractor_mode ("default" is group_norm)
    conv_layers: tuple[tuple[int, int, int], ...]  # conv_feature_layers: (channels, kernel, stride) per layer
    encoder_embed_dim: int  # encoder_embed_dim
    encoder_num_layers: int  # encoder_layers
    encoder_num_heads: int  # encoder_attention_heads
    encoder_ff_interm_features: int  # encoder_ffn_embed_dim
    encoder_layer_norm_first: bool  # layer_norm_first
    final_dim: int  # final_dim
    encoder_projection_dropout: float  # dropout_input
    encoder_attention_dropout: float  # attention_dropout
    encoder_ff_interm_dropout: float  # activation_dropout
    encoder_dropout: float  # dropout
    encoder_layer_drop: float  # encoder_layerdrop
    pos_conv_kernel: int = 128  # conv_pos
    pos_conv_groups: int = 16  # conv_pos_groups
    logit_temperature: float = 0.1  # logit_temp
    feature_grad_mult: float = 0.1  # feature_grad_mult: scale of the gradients into the conv extractor (1.0 = none)
    # "conv": fairseq's waveform CNN. "log_mel": MelHuBERT's front end (no fairseq equivalent): 80 log-mel bands
    # every 10 ms, two frames stacked per 20 ms frame; no learned extractor, about a third less compute at scale.
    frontend: Literal["conv", "log_mel"] = "conv"
    mel_bins: int = 80

    def __post_init__(self) -> None:
        layers = tuple(tuple(int(v) for v in layer) for layer in self.conv_layers)  # JSON/YAML give lists
        object.__setattr__(self, "conv_layers", layers)
        if self.frontend not in {"conv", "log_mel"}:
            raise ValueError(f"frontend must be 'conv' or 'log_mel', not {self.frontend!r}")
        if self.extractor_mode not in {"group_norm", "layer_norm"}:
            raise ValueError(f"extractor_mode must be 'group_norm' or 'layer_norm', not {self.extractor_mode!r}")
        if not layers or any(len(layer) != 3 for layer in layers):  # noqa: PLR2004
            raise ValueError(f"conv_layers must be non-empty (channels, kernel, stride) triples, not {layers}")
        if self.encoder_embed_dim % self.encoder_num_heads or self.encoder_embed_dim % self.pos_conv_groups:
            raise ValueError(
                f"encoder_embed_dim {self.encoder_embed_dim} must be divisible by encoder_num_heads "
                f"{self.encoder_num_heads} and pos_conv_groups {self.pos_conv_groups}"
            )

    @classmethod
    def preset(cls, size: Size, **overrides: Any) -> Self:
        if size not in _PRESETS:
            raise ValueError(f"unknown model size {size!r}; sizes: {', '.join(SIZES)}")
        return cls(**_PRESETS[size]).replace(**overrides)

    def replace(self, **overrides: Any) -> Self:
        fields = {f.name for f in dataclasses.fields(self)}
        if unknown := sorted(set(overrides) - fields):
            raise ValueError(f"unknown HubertConfig field(s) {', '.join(unknown)}; fields: {', '.join(sorted(fields))}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["conv_layers"] = [list(layer) for layer in self.conv_layers]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        fields = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(d) - fields):
            raise ValueError(f"unknown HubertConfig field(s) {', '.join(unknown)}")
        return cls(**d)


_BASE: dict[str, Any] = {  # fairseq hubert_base_librispeech.yaml
    "extractor_mode": "group_norm",
    "conv_layers": FAIRSEQ_CONV_LAYERS,
    "encoder_embed_dim": 768,
    "encoder_num_layers": 12,
    "encoder_num_heads": 12,
    "encoder_ff_interm_features": 3072,
    "encoder_layer_norm_first": False,
    "final_dim": 256,
    "encoder_projection_dropout": 0.1,
    "encoder_attention_dropout": 0.1,
    "encoder_ff_interm_dropout": 0.0,
    "encoder_dropout": 0.1,
    "encoder_layer_drop": 0.05,
}
_LARGE: dict[str, Any] = {  # fairseq hubert_large_librivox.yaml (feature_grad_mult 1.0 there)
    **_BASE,
    "extractor_mode": "layer_norm",
    "encoder_embed_dim": 1024,
    "encoder_num_layers": 24,
    "encoder_num_heads": 16,
    "encoder_ff_interm_features": 4096,
    "encoder_layer_norm_first": True,
    "final_dim": 768,
    "encoder_projection_dropout": 0.0,
    "encoder_attention_dropout": 0.0,
    "encoder_dropout": 0.0,
    "encoder_layer_drop": 0.0,
    "feature_grad_mult": 1.0,
}
_PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized: same receptive field and 50 Hz frames as the others, 0.93 M parameters.
    "tiny": {
        **_BASE,
        "conv_layers": tuple((64, k, s) for _, k, s in FAIRSEQ_CONV_LAYERS),
        "encoder_embed_dim": 128,
        "encoder_num_layers": 4,
        "encoder_num_heads": 4,
        "encoder_ff_interm_features": 512,
        "final_dim": 64,
        "encoder_projection_dropout": 0.05,
        "encoder_attention_dropout": 0.05,
        "encoder_dropout": 0.05,
        "encoder_layer_drop": 0.0,
        "pos_conv_kernel": 64,
    },
    "base": _BASE,
    "large": _LARGE,
    "xlarge": {**_LARGE, "encoder_embed_dim": 1280, "encoder_num_layers": 48, "encoder_ff_interm_features": 5120,
               "final_dim": 1024},
}  # fmt: skip


def conv_frames(num_samples: int, conv_layers: tuple[tuple[int, int, int], ...]) -> int:
    """Frames of a conv extractor with these (channels, kernel, stride) layers for `num_samples` of audio."""
    for _, kernel, stride in conv_layers:
        num_samples = max((num_samples - kernel) // stride + 1, 0)
    return num_samples
