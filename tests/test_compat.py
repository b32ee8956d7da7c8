import json
import sys
import types

import mlflow
import pytest
import torch
import torchaudio
import transformers
from mlflow import MlflowClient
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch.testing import assert_close

from hubert_pipeline import convert
from hubert_pipeline.compat import (
    config_of,
    export_hf,
    infer_config,
    load_state_dict_any,
    read_native_metadata,
    save_native,
    to_native,
)
from hubert_pipeline.model import HuBERT, HubertConfig, HuBERTPretrain

ATOL = 1e-4
NUM_CLASSES = 50


@pytest.fixture(scope="module")
def waveforms():
    return torch.randn(2, 6_000, generator=torch.Generator().manual_seed(0))  # short: base models are slow on CPU


def seeded(model_cls, *args, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return model_cls(*args, **kwargs).eval()


def custom() -> HubertConfig:
    """Pre-norm, layer-norm extractor, non-default widths and positional conv."""
    return HubertConfig.preset(
        "large",
        conv_layers=((96, 10, 5),) + ((96, 3, 2),) * 4 + ((96, 2, 2),) * 2,
        encoder_embed_dim=192,
        encoder_num_layers=2,
        encoder_num_heads=6,
        encoder_ff_interm_features=384,
        final_dim=48,
        pos_conv_kernel=32,
        pos_conv_groups=8,
    )


def hidden(model: HuBERT, waveforms: torch.Tensor) -> torch.Tensor:
    """The encoder output, also of a pretraining model."""
    with torch.no_grad():
        return HuBERT.forward(model, waveforms)


def assert_same_hidden_states(ours: HuBERT, reference_hidden: torch.Tensor, waveforms: torch.Tensor) -> None:
    assert_close(hidden(ours, waveforms), reference_hidden, atol=ATOL, rtol=ATOL)


@pytest.mark.slow
def test_torchaudio_pretrain_base_loads_with_identical_hidden_states(waveforms):
    reference = seeded(torchaudio.models.hubert_pretrain_base, num_classes=NUM_CLASSES)
    ours = HuBERTPretrain.from_state_dict(reference.state_dict())
    assert ours.config == HubertConfig.preset("base")
    assert ours.num_classes == NUM_CLASSES
    assert_close(ours.mask_embedding, reference.mask_generator.mask_embedding)
    assert_close(ours.logit_generator.label_embeddings, reference.logit_generator.label_embeddings)
    with torch.no_grad():
        assert_same_hidden_states(ours, reference.wav2vec2(waveforms)[0], waveforms)


@pytest.mark.slow
def test_torchaudio_hubert_base_loads_with_identical_hidden_states(waveforms):
    reference = seeded(torchaudio.models.hubert_base)
    ours = HuBERT.from_state_dict(reference.state_dict())
    assert ours.config == HubertConfig.preset("base")
    assert not ours.training
    with torch.no_grad():
        assert_same_hidden_states(ours, reference(waveforms)[0], waveforms)


def test_torchaudio_state_dict_file_of_tiny_shape_loads_as_the_tiny_preset(tmp_path, waveforms):
    tiny = HubertConfig.preset("tiny")
    torch.manual_seed(0)
    reference = torchaudio.models.wav2vec2_model(
        extractor_mode="group_norm",
        extractor_conv_layer_config=list(tiny.conv_layers),
        extractor_conv_bias=False,
        encoder_embed_dim=tiny.encoder_embed_dim,
        encoder_projection_dropout=0.0,
        encoder_pos_conv_kernel=tiny.pos_conv_kernel,
        encoder_pos_conv_groups=tiny.pos_conv_groups,
        encoder_num_layers=tiny.encoder_num_layers,
        encoder_num_heads=tiny.encoder_num_heads,
        encoder_attention_dropout=0.0,
        encoder_ff_interm_features=tiny.encoder_ff_interm_features,
        encoder_ff_interm_dropout=0.0,
        encoder_dropout=0.0,
        encoder_layer_norm_first=False,
        encoder_layer_drop=0.0,
        aux_num_out=None,
    ).eval()
    torch.save(reference.state_dict(), tmp_path / "tiny.pth")
    ours = HuBERT.from_pretrained(tmp_path / "tiny.pth")
    assert ours.config == tiny
    with torch.no_grad():
        assert_same_hidden_states(ours, reference(waveforms)[0], waveforms)


def test_torchaudio_pre_norm_layer_norm_model_loads_given_its_hyperparameters(waveforms):
    torch.manual_seed(0)
    reference = torchaudio.models.wav2vec2_model(
        extractor_mode="layer_norm",
        extractor_conv_layer_config=None,
        extractor_conv_bias=False,
        encoder_embed_dim=256,
        encoder_projection_dropout=0.0,
        encoder_pos_conv_kernel=128,
        encoder_pos_conv_groups=16,
        encoder_num_layers=2,
        encoder_num_heads=4,
        encoder_attention_dropout=0.0,
        encoder_ff_interm_features=512,
        encoder_ff_interm_dropout=0.0,
        encoder_dropout=0.0,
        encoder_layer_norm_first=True,
        encoder_layer_drop=0.0,
        aux_num_out=None,
    ).eval()
    state_dict = reference.state_dict()
    cfg = infer_config(state_dict, encoder_layer_norm_first=True, encoder_num_heads=4)
    assert (cfg.extractor_mode, cfg.encoder_num_layers, cfg.encoder_ff_interm_features) == ("layer_norm", 2, 512)
    state_dict, cfg = to_native(state_dict, for_pretraining=False, config=cfg)
    ours = HuBERT(cfg).eval()
    ours.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        assert_same_hidden_states(ours, reference(waveforms)[0], waveforms)


@pytest.mark.parametrize("stable_layer_norm", [False, True])
def test_transformers_model_folder_loads_with_identical_hidden_states(tmp_path, waveforms, stable_layer_norm):
    hf_cfg = transformers.HubertConfig(
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        conv_dim=(128,) * 7,
        do_stable_layer_norm=stable_layer_norm,
        feat_extract_norm="layer" if stable_layer_norm else "group",
    )
    torch.manual_seed(0)
    reference = transformers.HubertModel(hf_cfg).eval()
    reference.save_pretrained(tmp_path / "hf")
    ours = HuBERT.from_pretrained(tmp_path / "hf")
    assert ours.config.encoder_layer_norm_first == stable_layer_norm
    assert ours.config.encoder_num_heads == 4
    with torch.no_grad():
        assert_same_hidden_states(ours, reference(waveforms).last_hidden_state, waveforms)


@pytest.mark.parametrize(
    ("model_cls", "cfg"),
    [(HuBERT, HubertConfig.preset("tiny")), (HuBERTPretrain, custom())],
    ids=["tiny", "custom_pretrain"],
)
def test_exported_model_loads_in_transformers_with_identical_hidden_states(tmp_path, waveforms, model_cls, cfg):
    ours = seeded(model_cls, cfg, *([NUM_CLASSES] if model_cls is HuBERTPretrain else []))
    export_hf(ours, tmp_path / "hf")
    hf, info = transformers.HubertModel.from_pretrained(tmp_path / "hf", output_loading_info=True)  # ty: ignore[not-iterable]
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    assert (hf.config.hidden_size, hf.config.do_stable_layer_norm) == (
        cfg.encoder_embed_dim,
        cfg.encoder_layer_norm_first,
    )
    with torch.no_grad():
        assert_close(hf.eval()(waveforms).last_hidden_state, hidden(ours, waveforms), atol=ATOL, rtol=ATOL)
    back = HuBERT.from_pretrained(tmp_path / "hf")
    assert back.config == cfg
    with torch.no_grad():
        assert_close(hidden(back, waveforms), hidden(ours, waveforms))


def fairseq_state_dict(model) -> dict[str, torch.Tensor]:
    """Our weights under fairseq's HubertModel names, with the dictionary's 4 special symbols' embeddings first."""
    sd = {}
    layer_norm_mode = model.config.extractor_mode == "layer_norm"
    for i, block in enumerate(model.feature_extractor.conv_layers):
        sd[f"feature_extractor.conv_layers.{i}.0.weight"] = block.conv.weight
        if block.layer_norm is not None:
            norm = (
                f"feature_extractor.conv_layers.{i}.2.1" if layer_norm_mode else f"feature_extractor.conv_layers.{i}.2"
            )
            sd[f"{norm}.weight"], sd[f"{norm}.bias"] = block.layer_norm.weight, block.layer_norm.bias
    projection = model.feature_projection[0]
    sd |= {"layer_norm.weight": projection.layer_norm.weight, "layer_norm.bias": projection.layer_norm.bias}
    sd |= {
        "post_extract_proj.weight": projection.projection.weight,
        "post_extract_proj.bias": projection.projection.bias,
    }
    pos_conv = model.encoder.pos_conv_embed.convs[0]
    sd["encoder.pos_conv.0.weight_g"] = pos_conv.parametrizations.weight.original0
    sd["encoder.pos_conv.0.weight_v"] = pos_conv.parametrizations.weight.original1
    sd["encoder.pos_conv.0.bias"] = pos_conv.bias
    sd |= {
        "encoder.layer_norm.weight": model.encoder.layer_norm.weight,
        "encoder.layer_norm.bias": model.encoder.layer_norm.bias,
    }
    for i, layer in enumerate(model.encoder.layers):
        prefix = f"encoder.layers.{i}"
        for name, part in zip("qkv", layer.attention.qkv.weight.chunk(3), strict=True):
            sd[f"{prefix}.self_attn.{name}_proj.weight"] = part
        for name, part in zip("qkv", layer.attention.qkv.bias.chunk(3), strict=True):
            sd[f"{prefix}.self_attn.{name}_proj.bias"] = part
        modules = {
            "self_attn.out_proj": layer.attention.proj,
            "self_attn_layer_norm": layer.layer_norm,
            "fc1": layer.feed_forward.intermediate_dense,
            "fc2": layer.feed_forward.output_dense,
            "final_layer_norm": layer.final_layer_norm,
        }
        for name, module in modules.items():
            sd[f"{prefix}.{name}.weight"], sd[f"{prefix}.{name}.bias"] = module.weight, module.bias
    sd["mask_emb"] = model.mask_embedding
    specials = torch.randn(4, model.config.final_dim)
    sd["label_embs_concat"] = torch.cat([specials, model.logit_generator.label_embeddings])
    sd["final_proj.weight"] = model.logit_generator.final_proj.weight
    sd["final_proj.bias"] = model.logit_generator.final_proj.bias
    return {k: v.detach().clone() for k, v in sd.items()}


def fairseq_model_cfg(cfg: HubertConfig) -> dict:
    return {
        "_name": "hubert",
        "extractor_mode": "default" if cfg.extractor_mode == "group_norm" else "layer_norm",
        "encoder_layers": cfg.encoder_num_layers,
        "encoder_embed_dim": cfg.encoder_embed_dim,
        "encoder_ffn_embed_dim": cfg.encoder_ff_interm_features,
        "encoder_attention_heads": cfg.encoder_num_heads,
        "layer_norm_first": cfg.encoder_layer_norm_first,
        "final_dim": cfg.final_dim,
        "conv_pos": cfg.pos_conv_kernel,
        "conv_pos_groups": cfg.pos_conv_groups,
        "conv_bias": False,
        "dropout": 0.0,
        "label_rate": "???",  # omegaconf's missing value: reading it raises
    }


@pytest.mark.parametrize("cfg", [HubertConfig.preset("tiny"), custom()], ids=["tiny", "custom"])
def test_fairseq_checkpoint_of_plain_tensors_loads_as_a_pretraining_model(tmp_path, waveforms, cfg):
    ours = seeded(HuBERTPretrain, cfg, NUM_CLASSES)
    model_cfg = {k: v for k, v in fairseq_model_cfg(cfg).items() if k != "label_rate"}
    torch.save({"model": fairseq_state_dict(ours), "cfg": {"model": model_cfg}}, tmp_path / "checkpoint_best.pt")
    loaded = HuBERTPretrain.from_pretrained(tmp_path / "checkpoint_best.pt")
    assert loaded.config == cfg.replace(encoder_dropout=0.0)
    assert_close(loaded.state_dict(), ours.state_dict())
    with torch.no_grad():
        assert_close(hidden(loaded, waveforms), hidden(ours, waveforms))


def test_fairseq_checkpoint_with_pickled_objects_loads_only_when_trusted(tmp_path, monkeypatch, waveforms):
    cfg = custom()
    ours = seeded(HuBERTPretrain, cfg, NUM_CLASSES)

    class Dictionary:  # pickled by reference, as fairseq.data.dictionary.Dictionary
        def __init__(self, symbols: list[str]) -> None:
            self.symbols = symbols

    Dictionary.__module__, Dictionary.__qualname__ = "fairseq.data.dictionary", "Dictionary"
    dictionary_module = types.ModuleType("fairseq.data.dictionary")
    setattr(dictionary_module, "Dictionary", Dictionary)  # noqa: B010
    for name in ("fairseq", "fairseq.data"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "fairseq.data.dictionary", dictionary_module)
    dictionary = Dictionary(["<s>", "<pad>", "</s>", "<unk>", *map(str, range(NUM_CLASSES))])
    checkpoint = {
        "model": fairseq_state_dict(ours),
        "cfg": OmegaConf.create({"model": fairseq_model_cfg(cfg), "task": {"_name": "hubert_pretraining"}}),
        "task_state": {"dictionaries": [dictionary]},
    }
    torch.save(checkpoint, tmp_path / "hubert.pt")
    for name in ("fairseq", "fairseq.data", "fairseq.data.dictionary"):
        monkeypatch.delitem(sys.modules, name)  # as on a machine without fairseq

    with pytest.raises(ValueError, match="--trust-pickle"):
        HuBERTPretrain.from_pretrained(tmp_path / "hubert.pt")
    loaded = HuBERTPretrain.from_pretrained(tmp_path / "hubert.pt", trust_pickle=True)
    assert loaded.config.encoder_layer_norm_first
    assert loaded.config.encoder_num_heads == cfg.encoder_num_heads
    with torch.no_grad():
        assert_close(hidden(loaded, waveforms), hidden(ours, waveforms))


def test_native_folder_round_trips_weights_config_and_extra_metadata(tmp_path, waveforms):
    ours = seeded(HuBERTPretrain, HubertConfig.preset("tiny"), NUM_CLASSES)
    save_native(seeded(HuBERT, HubertConfig.preset("tiny")), tmp_path / "ckpt")  # replaced below
    save_native(ours, tmp_path / "ckpt", extra={"step": 1234})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folders left
    meta = read_native_metadata(tmp_path / "ckpt")
    assert (meta["format"], meta["num_classes"], meta["step"]) == ("hubert_pipeline", NUM_CLASSES, 1234)
    loaded = HuBERTPretrain.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == ours.config
    assert_close(loaded.state_dict(), ours.state_dict())
    encoder_only = HuBERT.from_pretrained(tmp_path / "ckpt")
    assert not hasattr(encoder_only, "logit_generator")
    with torch.no_grad():
        assert_close(encoder_only(waveforms), hidden(ours, waveforms))


def test_config_of_reads_a_native_folder_without_its_weights_and_infers_other_layouts(tmp_path):
    cfg = HubertConfig.preset("tiny", encoder_layer_drop=0.3, logit_temperature=0.2)  # fields no weight shape carries
    save_native(seeded(HuBERT, cfg), tmp_path / "native")
    (tmp_path / "native" / "model.safetensors").unlink()  # config.json alone says the architecture
    assert config_of(tmp_path / "native") == cfg
    ours = seeded(HuBERT, HubertConfig.preset("tiny"))
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, tmp_path / "model.safetensors")
    assert config_of(tmp_path / "model.safetensors") == HuBERT.from_pretrained(tmp_path / "model.safetensors").config


def test_reserved_extra_metadata_keys_are_refused(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_native(HuBERT(HubertConfig.preset("tiny")), tmp_path / "ckpt", extra={"config": {}})


def test_safetensors_file_of_native_weights_loads_with_an_inferred_config(tmp_path):
    ours = seeded(HuBERT, HubertConfig.preset("tiny"))
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, tmp_path / "model.safetensors")
    loaded = HuBERT.from_pretrained(tmp_path / "model.safetensors")
    assert loaded.config == ours.config
    assert_close(loaded.state_dict(), ours.state_dict())


@pytest.mark.slow
def test_mlflow_registry_alias_and_version_uris_load_identical_weights(tmp_path, monkeypatch, isolated_mlflow):
    monkeypatch.chdir(tmp_path)
    ours = seeded(HuBERTPretrain, HubertConfig.preset("tiny"), NUM_CLASSES)
    save_native(ours, tmp_path / "ckpt")
    experiment = mlflow.create_experiment("pretrain", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_artifacts(str(tmp_path / "ckpt"), artifact_path="model")
    client = MlflowClient()
    client.create_registered_model("hubert")
    version = client.create_model_version("hubert", source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client.set_registered_model_alias("hubert", "it1", version.version)
    for uri in ("models:/hubert@it1", f"models:/hubert/{version.version}", f"runs:/{run.info.run_id}/model"):
        loaded = HuBERTPretrain.from_pretrained(uri)
        assert loaded.config == ours.config
        assert_close(loaded.state_dict(), ours.state_dict())


def test_transformers_folder_of_another_model_type_is_refused(tmp_path):
    export_hf(HuBERT(HubertConfig.preset("tiny")), tmp_path / "hf")
    meta = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**meta, "model_type": "wav2vec2"}))
    with pytest.raises(ValueError, match="wav2vec2"):
        load_state_dict_any(tmp_path / "hf")


def test_encoder_only_checkpoint_cannot_resume_pretraining(tmp_path):
    export_hf(HuBERT(HubertConfig.preset("tiny")), tmp_path / "hf")
    with pytest.raises(ValueError, match="not a pretraining checkpoint"):
        HuBERTPretrain.from_pretrained(tmp_path / "hf")


def test_missing_checkpoint_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        HuBERT.from_pretrained(tmp_path / "nothing.pt")


def test_convert_cli_writes_a_transformers_folder(tmp_path, monkeypatch, waveforms):
    ours = seeded(HuBERTPretrain, HubertConfig.preset("tiny"), NUM_CLASSES)
    save_native(ours, tmp_path / "ckpt")
    monkeypatch.setattr(sys, "argv", ["convert", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--to", "hf"])
    convert.main()
    hf = transformers.HubertModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert_close(hf(waveforms).last_hidden_state, hidden(ours, waveforms), atol=ATOL, rtol=ATOL)


def test_a_log_mel_model_round_trips_in_our_layout_and_is_refused_by_the_transformers_export(tmp_path, waveforms):
    ours = seeded(HuBERT, HubertConfig.preset("tiny", frontend="log_mel")).eval()
    save_native(ours, tmp_path / "mel")
    loaded = HuBERT.from_pretrained(tmp_path / "mel")
    assert loaded.config.frontend == "log_mel"
    with torch.no_grad():
        assert_close(loaded(waveforms), ours(waveforms))
    with pytest.raises(ValueError, match="log_mel front end has no transformers equivalent"):
        export_hf(ours, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
