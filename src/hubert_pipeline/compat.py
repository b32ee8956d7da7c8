"""Checkpoint compatibility: fairseq, torchaudio, transformers and our own folders, in and out.

Layouts that load (`load_state_dict_any` + `to_native`, or simply `HuBERT.from_pretrained`):
- our folder: `config.json` ({"format": "hubert_pipeline", "config": ..., "num_classes": ...}) + `model.safetensors`;
- a transformers `HubertModel` folder (`config.json` with "model_type": "hubert" + safetensors or pytorch_model.bin);
- a minimal_hubert folder (`config.json` {"size": ...} + `model.safetensors`);
- `.safetensors` files; `.pt/.pth/.bin` files read with `torch.load(weights_only=True)`: torchaudio state dicts,
  fairseq checkpoints whose weights are under "model" and whose config, if any, is plain data. Real fairseq
  checkpoints pickle omegaconf and fairseq objects: pass `trust_pickle=True` (CLI `--trust-pickle`) once, for a
  file you trust, and save the result in our layout.
Configs are read from the checkpoint where it has one, else inferred from tensor shapes (`infer_config`).

    python -m hubert_pipeline.convert hubert_base_ls960.pt out/hubert_base --trust-pickle --to hf

The model imports this module to load (`HuBERT.from_pretrained`), never the other way round.
"""

import contextlib
import json
import logging
import pickle
import re
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Generator, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from hubert_pipeline.model_config import FAIRSEQ_CONV_LAYERS, SIZES, HubertConfig, Size

logger = logging.getLogger(__name__)


class Model(Protocol):
    """What is saved of a `hubert_pipeline.model.HuBERT` (this module does not import the model: it loads for it)."""

    config: HubertConfig

    def state_dict(self) -> dict[str, Any]: ...


NATIVE_FORMAT = "hubert_pipeline"
MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
_NATIVE_PREFIXES = ("feature_extractor.", "feature_projection.", "encoder.", "mask_embedding", "logit_generator.")
_FAIRSEQ_SPECIAL_SYMBOLS = 4  # fairseq Dictionary: <s>, <pad>, </s>, <unk> come before the units

# (pattern, replacement), applied in order to every key: fairseq, then torchaudio, then transformers names.
_KEY_RULES: list[tuple[str, str]] = [
    (r"^(?:(?:module|w2v_encoder\.w2v_model|w2v_model|wav2vec2|hubert)\.)+", ""),  # DDP, fine-tuned, wrappers
    (r"^(feature_extractor\.conv_layers\.\d+)\.0\.", r"\1.conv."),
    (r"^(feature_extractor\.conv_layers\.\d+)\.2\.(1\.)?", r"\1.layer_norm."),
    (r"^post_extract_proj\.", "feature_projection.0.projection."),
    (r"^layer_norm\.", "feature_projection.0.layer_norm."),
    (r"^encoder\.pos_conv\.0\.", "encoder.pos_conv_embed.convs.0."),
    (r"\.self_attn_layer_norm\.", ".layer_norm."),
    (r"\.self_attn\.", ".attention."),
    (r"\.fc1\.", ".feed_forward.intermediate_dense."),
    (r"\.fc2\.", ".feed_forward.output_dense."),
    (r"^(mask_emb|mask_generator\.mask_embedding|masked_spec_embed)$", "mask_embedding"),
    (r"^label_embs_concat$", "logit_generator.label_embeddings"),
    (r"^final_proj\.", "logit_generator.final_proj."),
    (r"^encoder\.transformer\.", "encoder."),
    (r"^encoder\.feature_projection\.", "feature_projection.0."),
    (r"^feature_projection\.(?!0\.)", "feature_projection.0."),
    (r"^encoder\.pos_conv_embed\.conv\.", "encoder.pos_conv_embed.convs.0."),
    (r"\.attention\.out_proj\.", ".attention.proj."),
    (r"\.weight_g$", ".parametrizations.weight.original0"),
    (r"\.weight_v$", ".parametrizations.weight.original1"),
]
# Our key -> transformers key, for export.
_HF_RULES: list[tuple[str, str]] = [
    (r"^mask_embedding$", "masked_spec_embed"),
    (r"^feature_projection\.0\.", "feature_projection."),
    (r"^encoder\.pos_conv_embed\.convs\.0\.", "encoder.pos_conv_embed.conv."),
    (r"\.attention\.proj\.", ".attention.out_proj."),
    (r"\.parametrizations\.weight\.original0$", ".weight_g"),  # the layout of the hub's checkpoints; transformers
    (r"\.parametrizations\.weight\.original1$", ".weight_v"),  # 4.x and 5.x both rename it on load
]
# transformers HubertConfig field -> ours.
_HF_FIELDS = {
    "hidden_size": "encoder_embed_dim",
    "num_hidden_layers": "encoder_num_layers",
    "num_attention_heads": "encoder_num_heads",
    "intermediate_size": "encoder_ff_interm_features",
    "do_stable_layer_norm": "encoder_layer_norm_first",
    "num_conv_pos_embeddings": "pos_conv_kernel",
    "num_conv_pos_embedding_groups": "pos_conv_groups",
    "feat_proj_dropout": "encoder_projection_dropout",
    "attention_dropout": "encoder_attention_dropout",
    "activation_dropout": "encoder_ff_interm_dropout",
    "hidden_dropout": "encoder_dropout",
    "layerdrop": "encoder_layer_drop",
}
# fairseq HubertConfig field -> ours.
_FAIRSEQ_FIELDS = {
    "encoder_embed_dim": "encoder_embed_dim",
    "encoder_layers": "encoder_num_layers",
    "encoder_attention_heads": "encoder_num_heads",
    "encoder_ffn_embed_dim": "encoder_ff_interm_features",
    "layer_norm_first": "encoder_layer_norm_first",
    "final_dim": "final_dim",
    "dropout_input": "encoder_projection_dropout",
    "attention_dropout": "encoder_attention_dropout",
    "activation_dropout": "encoder_ff_interm_dropout",
    "dropout": "encoder_dropout",
    "encoder_layerdrop": "encoder_layer_drop",
    "conv_pos": "pos_conv_kernel",
    "conv_pos_groups": "pos_conv_groups",
    "logit_temp": "logit_temperature",
    "feature_grad_mult": "feature_grad_mult",
}


def native_key(key: str) -> str:
    for pattern, replacement in _KEY_RULES:
        key = re.sub(pattern, replacement, key)
    return key


def infer_config(state_dict: Mapping[str, Tensor], **overrides: Any) -> HubertConfig:
    """HubertConfig of a state dict in any layout: structure from shapes, the rest from the preset of its width.

    `overrides` (fields the checkpoint's own config states) win; strides, heads, dropouts and layer_norm_first
    cannot be read from shapes.
    """
    sd = {native_key(k): v for k, v in state_dict.items()}
    if any(re.match(r"^feature_extractor\.conv_layers\.\d+\.conv\.bias$", k) for k in sd):
        raise ValueError("convolutions with bias are not supported (fairseq conv_bias=True)")
    conv_ids = sorted(
        int(m[1]) for k in sd if (m := re.match(r"^feature_extractor\.conv_layers\.(\d+)\.conv\.weight$", k))
    )
    convs = [sd[f"feature_extractor.conv_layers.{i}.conv.weight"] for i in conv_ids]
    if not convs or "feature_projection.0.projection.weight" not in sd:
        raise ValueError("not a HuBERT state dict: no conv feature extractor or feature projection found")
    kernels = [w.shape[2] for w in convs]
    if "conv_layers" in overrides:
        strides = [s for _, _, s in overrides["conv_layers"]]
    elif kernels == [k for _, k, _ in FAIRSEQ_CONV_LAYERS]:
        strides = [s for _, _, s in FAIRSEQ_CONV_LAYERS]
    else:
        raise ValueError(f"conv kernels {kernels} are not fairseq's: give conv_layers to know the strides")
    embed_dim = sd["feature_projection.0.projection.weight"].shape[0]
    presets: dict[int, Size] = {HubertConfig.preset(s).encoder_embed_dim: s for s in SIZES}
    size: Size = presets.get(embed_dim, "large" if overrides.get("encoder_layer_norm_first") else "base")
    preset = HubertConfig.preset(size)
    pos_conv = sd.get("encoder.pos_conv_embed.convs.0.parametrizations.weight.original1")
    if pos_conv is None:
        raise ValueError("no weight-normed positional convolution (encoder.pos_conv_embed) in the state dict")
    if "logit_generator.label_embeddings" in sd:
        final_dim = sd["logit_generator.label_embeddings"].shape[1]
    elif "logit_generator.final_proj.weight" in sd:
        final_dim = sd["logit_generator.final_proj.weight"].shape[0]
    else:
        final_dim = preset.final_dim
    inferred = {
        "extractor_mode": "layer_norm" if "feature_extractor.conv_layers.1.layer_norm.weight" in sd else "group_norm",
        "conv_layers": tuple((w.shape[0], k, s) for w, k, s in zip(convs, kernels, strides, strict=True)),
        "encoder_embed_dim": embed_dim,
        "encoder_num_layers": len({k.split(".")[2] for k in sd if k.startswith("encoder.layers.")}),
        "encoder_num_heads": preset.encoder_num_heads if embed_dim in presets else max(1, embed_dim // 64),
        "encoder_ff_interm_features": sd["encoder.layers.0.feed_forward.intermediate_dense.weight"].shape[0],
        "final_dim": final_dim,
        "pos_conv_kernel": pos_conv.shape[2],
        "pos_conv_groups": embed_dim // pos_conv.shape[1],
    }
    return preset.replace(**{**inferred, **overrides})


def to_native(
    state_dict: Mapping[str, Tensor], *, for_pretraining: bool, config: HubertConfig | None = None
) -> tuple[dict[str, Tensor], HubertConfig]:
    """Our keys for a fairseq, torchaudio, transformers or native state dict, and its config (`config` if given)."""
    is_fairseq = any(".self_attn." in k for k in state_dict)
    config = config or infer_config(state_dict)
    sd: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = defaultdict(dict)
    for key, tensor in state_dict.items():
        new = native_key(key)
        if m := re.match(r"^(encoder\.layers\.\d+\.attention)\.(q|k|v)_proj\.(weight|bias)$", new):
            qkv[f"{m[1]}.qkv.{m[3]}"][m[2]] = tensor
        elif new.startswith(_NATIVE_PREFIXES):
            sd[new] = tensor
        else:
            logger.info("dropping %s: not part of HuBERT", key)
    for key, parts in qkv.items():  # spidr's SelfAttention: one (3D, D) projection, q then k then v
        sd[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if not for_pretraining:
        return {k: v for k, v in sd.items() if not k.startswith(("mask_embedding", "logit_generator."))}, config
    missing = {"mask_embedding", "logit_generator.label_embeddings", "logit_generator.final_proj.weight"} - set(sd)
    if missing:
        raise ValueError(f"not a pretraining checkpoint: {', '.join(sorted(missing))} missing")
    if is_fairseq:  # fairseq's label embeddings have rows for its dictionary's special symbols first
        sd["logit_generator.label_embeddings"] = sd["logit_generator.label_embeddings"][_FAIRSEQ_SPECIAL_SYMBOLS:]
    sd.setdefault("logit_generator.logit_temp", torch.tensor(config.logit_temperature))
    return sd, config


class _Stub:
    """Stand-in for a fairseq class (Dictionary, ...): keeps whatever state was pickled, does nothing else."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.__dict__.update(state if isinstance(state, dict) else {"state": state})


class _TolerantUnpickler(pickle.Unpickler):
    """Unpickles fairseq objects as stubs, so that fairseq need not be installed."""

    def find_class(self, module: str, name: str) -> Any:
        if module.split(".", maxsplit=1)[0] == "fairseq":
            return type(name, (_Stub,), {"__module__": module})
        return super().find_class(module, name)


_tolerant_pickle = type("TolerantPickle", (), {"Unpickler": _TolerantUnpickler, "load": pickle.load})


def _cfg_get(cfg: Any, key: str) -> Any:
    with contextlib.suppress(Exception):  # omegaconf raises on missing values ("???"); absent is absent
        return cfg[key] if isinstance(cfg, Mapping) or hasattr(cfg, "keys") else getattr(cfg, key, None)
    return None


def _fairseq_overrides(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    cfg = _cfg_get(checkpoint.get("cfg"), "model") or checkpoint.get("args")  # fairseq >= 0.10 / older Namespace
    if cfg is None:
        return {}
    out = {ours: v for theirs, ours in _FAIRSEQ_FIELDS.items() if (v := _cfg_get(cfg, theirs)) is not None}
    if out.get("final_dim") == 0:  # fairseq: 0 means encoder_embed_dim; the shapes tell
        del out["final_dim"]
    if (mode := _cfg_get(cfg, "extractor_mode")) is not None:
        out["extractor_mode"] = "group_norm" if mode == "default" else mode
    if _cfg_get(cfg, "conv_bias"):
        raise ValueError("convolutions with bias are not supported (fairseq conv_bias=True)")
    return out


def _hf_overrides(hf: Mapping[str, Any]) -> dict[str, Any]:
    if hf.get("conv_bias") or not hf.get("feat_proj_layer_norm", True) or hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError("unsupported transformers config: conv_bias, no feat_proj_layer_norm, or not gelu")
    out = {ours: hf[theirs] for theirs, ours in _HF_FIELDS.items() if theirs in hf}
    if "feat_extract_norm" in hf:
        out["extractor_mode"] = {"group": "group_norm", "layer": "layer_norm"}[hf["feat_extract_norm"]]
    if {"conv_dim", "conv_kernel", "conv_stride"} <= set(hf):
        out["conv_layers"] = tuple(zip(hf["conv_dim"], hf["conv_kernel"], hf["conv_stride"], strict=True))
    if isinstance(ours := hf.get(NATIVE_FORMAT), Mapping):  # written by export_hf: the fields HF has no name for
        out = {**{k: ours[k] for k in ("final_dim", "logit_temperature", "feature_grad_mult") if k in ours}, **out}
    return out


def _load_torch(path: Path, *, trust_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            raise ValueError(
                f"{path} holds pickled Python objects (a fairseq checkpoint's omegaconf config or dictionaries), which "
                "are not loaded by default. If you trust the file, convert it once: `python -m hubert_pipeline.convert "
                f"{path} OUT_DIR --trust-pickle` (or pass trust_pickle=True)"
            ) from e
        logger.warning("unpickling %s with weights_only=False (trust_pickle)", path)
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_tolerant_pickle)


def _load_folder_weights(folder: Path) -> dict[str, Tensor]:
    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    if (index := folder / "model.safetensors.index.json").is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(folder / shard).items()}
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _folder_meta(path: Path) -> dict[str, Any]:
    """A checkpoint folder's config.json; {} for a file or a folder without one."""
    return json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}


def _native_config(meta: Mapping[str, Any]) -> HubertConfig | None:
    """The config of our own layout's config.json (`save_native`); None for any other."""
    return HubertConfig.from_dict(meta["config"]) if meta.get("format") == NATIVE_FORMAT else None


def _load_folder(path: Path) -> tuple[dict[str, Tensor], HubertConfig | None]:
    weights = _load_folder_weights(path)
    meta = _folder_meta(path)
    if (native := _native_config(meta)) is not None:
        return weights, native
    if meta.get("model_type") == "hubert":
        return weights, infer_config(weights, **_hf_overrides(meta))
    if "model_type" in meta:
        raise ValueError(f"{path}: transformers model_type {meta['model_type']!r} is not 'hubert'")
    if meta.get("size") in {"base", "large", "xlarge"}:  # minimal_hubert's hub folders
        return weights, HubertConfig.preset(meta["size"])
    return weights, None


def config_of(source: str | Path, *, trust_pickle: bool = False) -> HubertConfig:
    """The architecture of a checkpoint (any layout, or an MLflow URI): a native folder's config.json alone, without
    its weights; other layouts are loaded to infer it."""
    with local_source(source) as path:
        if (native := _native_config(_folder_meta(path))) is not None:
            return native
        weights, config = load_state_dict_any(path, trust_pickle=trust_pickle)
    return config or infer_config(weights)


def load_state_dict_any(
    source: str | Path, *, trust_pickle: bool = False
) -> tuple[dict[str, Tensor], HubertConfig | None]:
    """The raw state dict of a local checkpoint in any supported layout, and its config when it carries one."""
    path = Path(source)
    if path.is_dir():
        return _load_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == ".safetensors":
        return load_file(path), None
    checkpoint = _load_torch(path, trust_pickle=trust_pickle)
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"{path} holds a {type(checkpoint).__name__}, not a state dict or checkpoint dict")
    for key in ("model", "model_weight", "state_dict"):  # fairseq, s3prl, lightning
        if isinstance(checkpoint.get(key), Mapping):
            weights = dict(checkpoint[key])
            if isinstance(checkpoint.get("model_config"), Mapping):  # our training checkpoints (step_*.pt)
                return weights, HubertConfig.from_dict(dict(checkpoint["model_config"]))
            overrides = _fairseq_overrides(checkpoint)
            return weights, infer_config(weights, **overrides) if overrides else None
    return dict(checkpoint), None


@contextlib.contextmanager
def local_source(source: str | Path) -> Generator[Path]:
    """A local path for `source`: itself, or an MLflow URI (models:/name@alias, runs:/...) downloaded to a temp dir."""
    if not str(source).startswith(MLFLOW_SCHEMES):
        yield Path(source)
        return
    import mlflow

    from hubert_pipeline.tracking import reading_uri

    uri = reading_uri()  # the project's store, as the stages resolve it; never a new ./mlflow.db
    # models:/ URIs are resolved through the process's registry whatever download_artifacts is given: set it
    mlflow.set_tracking_uri(uri)
    with tempfile.TemporaryDirectory(prefix="hubert-mlflow-") as tmp:
        path = mlflow.artifacts.download_artifacts(artifact_uri=str(source), dst_path=tmp, tracking_uri=uri,
                                                   registry_uri=uri)  # fmt: skip
        yield Path(path)


@contextlib.contextmanager
def _atomic_dir(out_dir: str | Path) -> Generator[Path]:
    """A temp folder beside `out_dir` that replaces it only if the block succeeds."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        yield tmp
        old = out.parent / f"{tmp.name}.old"
        if out.exists():
            out.replace(old)
        tmp.replace(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _owns_storage(tensor: Tensor) -> bool:
    full = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    return bool(tensor.storage_offset() == 0 and full)


def _save_tensors(state_dict: Mapping[str, Tensor], path: Path) -> None:
    """safetensors refuses tensors that share storage (views such as q/k/v of qkv): those are copied."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_file({k: v if _owns_storage(v) else v.clone() for k, v in tensors.items()}, path)


def save_native(model: Model, out_dir: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write our layout: config.json (format, config, num_classes, **extra) + model.safetensors, atomically."""
    meta: dict[str, Any] = {"format": NATIVE_FORMAT, "config": model.config.to_dict(),
                            "num_classes": getattr(model, "num_classes", None)}  # fmt: skip
    if clash := sorted(set(meta) & set(extra or {})):
        raise ValueError(f"extra keys {clash} are reserved")
    with _atomic_dir(out_dir) as tmp:
        _save_tensors(model.state_dict(), tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps({**meta, **(extra or {})}, indent=2, sort_keys=True) + "\n")


def read_native_metadata(folder: str | Path) -> dict[str, Any]:
    """config.json of a folder written by `save_native` (with its `extra` entries)."""
    return json.loads((Path(folder) / "config.json").read_text())


def hf_config(model: Model) -> dict[str, Any]:
    cfg = model.config
    return {
        "architectures": ["HubertModel"],
        "model_type": "hubert",
        **{theirs: getattr(cfg, ours) for theirs, ours in _HF_FIELDS.items()},
        "feat_extract_norm": "group" if cfg.extractor_mode == "group_norm" else "layer",
        "feat_extract_activation": "gelu",
        "hidden_act": "gelu",
        "conv_dim": [c for c, _, _ in cfg.conv_layers],
        "conv_kernel": [k for _, k, _ in cfg.conv_layers],
        "conv_stride": [s for _, _, s in cfg.conv_layers],
        "num_feat_extract_layers": len(cfg.conv_layers),
        "conv_bias": False,
        "feat_proj_layer_norm": True,
        "layer_norm_eps": 1e-5,
        "mask_time_prob": 0.05 if hasattr(model, "mask_embedding") else 0.0,  # no masked_spec_embed without one
        "dtype": "float32",
        NATIVE_FORMAT: cfg.to_dict(),
    }


def export_hf(model: Model, out_dir: str | Path) -> None:
    """Write a transformers `HubertModel` folder (config.json + model.safetensors), atomically."""
    if model.config.frontend != "conv":
        raise ValueError(
            f"a model with the {model.config.frontend} front end has no transformers equivalent (HubertModel reads "
            "waveforms through the conv extractor): keep it in our layout (--to native)"
        )
    sd: dict[str, Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("logit_generator."):
            continue
        if m := re.match(r"^(encoder\.layers\.\d+\.attention)\.qkv\.(weight|bias)$", key):
            for name, part in zip("qkv", tensor.chunk(3, dim=0), strict=True):
                sd[f"{m[1]}.{name}_proj.{m[2]}"] = part
            continue
        for pattern, replacement in _HF_RULES:
            key = re.sub(pattern, replacement, key)  # noqa: PLW2901
        sd[key] = tensor
    with _atomic_dir(out_dir) as tmp:
        _save_tensors(sd, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(hf_config(model), indent=2) + "\n")


if __name__ == "__main__":  # the former command, `python -m hubert_pipeline.compat SRC OUT`: now `...convert`
    import runpy
    import sys

    print("python -m hubert_pipeline.compat is now python -m hubert_pipeline.convert", file=sys.stderr)
    runpy.run_module("hubert_pipeline.convert", run_name="__main__", alter_sys=True)
