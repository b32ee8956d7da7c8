"""fairseq's recipes as params.yaml: every value key by key, the effective batch kept over any number of GPUs."""

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hubert_pipeline.params import load_params
from hubert_pipeline.presets import RECIPES, apply_rows, batch_shortfall, recipe_rows

REPO = Path(__file__).resolve().parents[1]
# The values of fairseq's examples/hubert/config/pretrain/hubert_{base_librispeech,large_librivox,xlarge_librivox}.yaml
FAIRSEQ: dict[str, dict[str, Any]] = {
    "base": {"distributed_world_size": 32, "max_tokens": 1_400_000, "lr": 0.0005, "clip_norm": 10.0,
             "normalize": False, "model": {"encoder_layers": 12, "encoder_embed_dim": 768, "final_dim": 256,
                                           "extractor_mode": "group_norm", "encoder_layerdrop": 0.05}},
    "large": {"distributed_world_size": 128, "max_tokens": 900_000, "lr": 0.0015, "clip_norm": 1.0,
              "normalize": True, "model": {"encoder_layers": 24, "encoder_embed_dim": 1024, "final_dim": 768,
                                           "extractor_mode": "layer_norm", "encoder_layerdrop": 0.0}},
    "xlarge": {"distributed_world_size": 256, "max_tokens": 360_000, "lr": 0.003, "clip_norm": 1.0,
               "normalize": True, "model": {"encoder_layers": 48, "encoder_embed_dim": 1280, "final_dim": 1024,
                                            "extractor_mode": "layer_norm", "encoder_layerdrop": 0.0}},
}  # fmt: skip
SHARED = {"warmup_updates": 32_000, "weight_decay": 0.01, "adam_betas": (0.9, 0.98), "adam_eps": 1e-6,
          "loss_weights": 10.0, "min_sample_size": 32_000, "max_sample_size": 250_000, "pad_audio": False,
          "mask_prob": 0.8}  # fmt: skip


def applied(tmp_path, name, gpus):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    rows = recipe_rows(RECIPES[name], gpus)
    if name != "base":
        rows.append(("", "iteration2.teacher", "models:/hubert-pipeline@it2"))
    apply_rows(params, rows)
    return load_params(params)


@pytest.mark.parametrize("name", ["base", "large", "xlarge"])
@pytest.mark.parametrize("gpus", [8, 16, 32])
def test_each_recipe_gives_fairseqs_values_and_its_samples_per_update_on_any_gpu_count(tmp_path, name, gpus):
    from hubert_pipeline.model import HubertConfig

    fs = FAIRSEQ[name]
    p = applied(tmp_path, name, gpus)
    sections = [p.train_it1, p.train_it2] if name == "base" else [p.train_it2]
    for cfg in sections:
        assert (cfg.lr, cfg.grad_clip, cfg.normalize) == (fs["lr"], fs["clip_norm"], fs["normalize"])
        assert (cfg.warmup_steps, cfg.weight_decay, cfg.betas, cfg.eps, cfg.feature_penalty) == (
            SHARED["warmup_updates"], SHARED["weight_decay"], SHARED["adam_betas"], SHARED["adam_eps"],
            SHARED["loss_weights"])  # fmt: skip
        assert (cfg.min_sample_size, cfg.max_sample_size, cfg.pad_audio, cfg.mask_prob) == (
            SHARED["min_sample_size"],
            SHARED["max_sample_size"],
            SHARED["pad_audio"],
            SHARED["mask_prob"],
        )
        assert cfg.init_from == ""  # the demo's iteration 2 starts from iteration 1; the paper's from random weights
        processes = p.execution.slurm.nodes * p.execution.slurm.gpus_per_node
        assert processes == gpus
        assert processes * cfg.accumulate * cfg.max_batch_samples == fs["distributed_world_size"] * fs["max_tokens"]
    model = HubertConfig.preset(p.model.size, **p.model.overrides)
    assert (model.encoder_num_layers, model.encoder_embed_dim, model.final_dim) == (
        fs["model"]["encoder_layers"],
        fs["model"]["encoder_embed_dim"],
        fs["model"]["final_dim"],
    )
    assert (model.extractor_mode, model.encoder_layer_drop) == (
        fs["model"]["extractor_mode"],
        fs["model"]["encoder_layerdrop"],
    )
    assert p.model.recipe == name


def test_large_starts_from_a_base_iteration_two_teacher_at_layer_nine_and_leaves_iteration_one_alone(tmp_path):
    before = load_params(REPO / "params.yaml")
    p = applied(tmp_path, "large", 64)
    assert (p.iteration2.teacher, p.iteration2.layer) == ("models:/hubert-pipeline@it2", 9)
    assert p.train_it1 == before.train_it1
    assert (p.train_it2.max_steps, p.train_it2.accumulate, p.train_it2.max_batch_samples) == (400_000, 2, 900_000)


def test_more_gpus_than_the_recipe_split_its_batch_and_impossible_counts_are_refused():
    rows = {k: v for _, k, v in recipe_rows(RECIPES["base"], 64)}
    assert (rows["train_it1.accumulate"], rows["train_it1.max_batch_samples"]) == (1, 700_000)
    with pytest.raises(ValueError, match="cannot be split over 12 GPUs"):
        recipe_rows(RECIPES["base"], 12)
    with pytest.raises(ValueError, match="multiple of 6"):
        recipe_rows(RECIPES["large"], 16, gpus_per_node=6)
    with pytest.raises(ValueError, match="under max_sample_size"):
        recipe_rows(RECIPES["xlarge"], 512)


def test_a_run_with_under_half_its_recipes_audio_per_update_is_warned():
    assert RECIPES["base"].audio_seconds_per_update == 2800
    assert batch_shortfall("", 30.0) is None  # no recipe: the demo
    assert batch_shortfall("base", 1400.0) is None
    warning = batch_shortfall("base", 1399.0)
    assert warning is not None
    assert "under half of the base recipe's 2800 s" in warning


def test_the_command_rewrites_params_in_place_keeping_comments_and_prints_each_change(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    out = subprocess.run([sys.executable, "-m", "hubert_pipeline.presets", "base", "--gpus", "16", "--params",
                          str(params)], capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "train_it1.accumulate: 1 -> 2" in out
    text = params.read_text()
    assert "# optimization.max_update (recipe: 250k)" in text
    assert load_params(params).train_it1.max_steps == 250_000
    assert "kmeans.fit_fraction: 1.0 -> 0.1" in out  # the recipe's 10 %, where the demo fits on every file
    assert "train_it1.mask_length: 2 -> 10" in out  # the recipe's spans, where the demo masks 2 frames
    table = subprocess.run([sys.executable, "-m", "hubert_pipeline.presets", "large", "--table"],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "| `optimization.clip_norm` | `train_it2.grad_clip` | `1.0` |" in table
    refused = subprocess.run([sys.executable, "-m", "hubert_pipeline.presets", "large", "--params", str(params)],
                             capture_output=True, text=True, check=False)  # fmt: skip
    assert refused.returncode == 2
    assert "--teacher" in refused.stderr
