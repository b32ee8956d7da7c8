"""fairseq's HuBERT recipes (examples/hubert/config/pretrain) as params.yaml values, for any number of GPUs.

    python -m hubert_pipeline.presets base --gpus 16                 # LibriSpeech 960 h, iterations 1 and 2
    python -m hubert_pipeline.presets large --gpus 64 --teacher models:/hubert-pipeline@it2
    python -m hubert_pipeline.presets base --table                   # fairseq key -> our key -> value

params.yaml is rewritten in place (comments kept) and each change is printed. The effective batch is fairseq's:
processes x nodes x accumulate x max_batch_samples = distributed_world_size x max_tokens (update_freq 1). Base trains
both iterations (250k then 400k steps, as in the paper); Large and XLarge train iteration 2 only, on the units of a
Base iteration-2 model's layer 9 (`--teacher`), as the paper does. Data paths are left as they are.
"""

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hubert_pipeline.audio import SAMPLE_RATE

GPUS_PER_NODE = 8


@dataclass(frozen=True)
class Recipe:
    name: str
    world_size: int  # distributed_training.distributed_world_size (update_freq 1)
    max_tokens: int  # dataset.max_tokens: samples per GPU per batch
    lr: float
    clip_norm: float
    normalize: bool  # task.normalize: must match the extractor (layer norm for Large and XLarge)
    iterations: tuple[int, ...]

    @property
    def audio_seconds_per_update(self) -> float:
        return self.world_size * self.max_tokens / SAMPLE_RATE


RECIPES = {
    "base": Recipe("base", 32, 1_400_000, 5e-4, 10.0, normalize=False, iterations=(1, 2)),
    "large": Recipe("large", 128, 900_000, 1.5e-3, 1.0, normalize=True, iterations=(2,)),
    "xlarge": Recipe("xlarge", 256, 360_000, 3e-3, 1.0, normalize=True, iterations=(2,)),
}
MAX_UPDATES = {1: 250_000, 2: 400_000}  # the paper's iterations; fairseq's config file says 400k for both
ITERATION_FROM_UNITS = 2  # the iteration trained on a model's units (the demo starts it from iteration 1's weights)


def _shared_rows(recipe: Recipe) -> list[tuple[str, str, Any]]:
    """(fairseq key, our key, value) of one training section; `train` stands for train_it1 / train_it2."""
    return [
        ("optimization.lr", "train.lr", recipe.lr),
        ("lr_scheduler.warmup_updates (polynomial_decay)", "train.warmup_steps", 32_000),
        ("optimizer.weight_decay", "train.weight_decay", 0.01),
        ("optimizer.adam_betas", "train.betas", [0.9, 0.98]),
        ("optimizer.adam_eps", "train.eps", 1e-6),
        ("optimization.clip_norm", "train.grad_clip", recipe.clip_norm),
        ("criterion.loss_weights", "train.feature_penalty", 10.0),
        ("dataset.max_tokens", "train.max_batch_samples", recipe.max_tokens),
        ("task.min_sample_size", "train.min_sample_size", 32_000),
        ("task.max_sample_size", "train.max_sample_size", 250_000),
        ("(ordered by exact size)", "train.num_buckets", 1000),
        ("task.normalize", "train.normalize", recipe.normalize),
        ("task.pad_audio", "train.pad_audio", False),
        ("model.mask_prob", "train.mask_prob", 0.8),
        ("model.mask_length", "train.mask_length", 10),
        ("checkpoint.save_interval_updates", "train.save_interval", 25_000),
        ("common.log_interval", "train.log_interval", 200),
        ("common.fp16 (bf16 here: no loss scaling)", "train.dtype", "bfloat16"),
    ]


def recipe_rows(recipe: Recipe, gpus: int, gpus_per_node: int = GPUS_PER_NODE) -> list[tuple[str, str, Any]]:
    """Every (fairseq key, our key, value) that turns params.yaml into `recipe` on `gpus` GPUs."""
    accumulate, batch = split_batch(recipe, gpus)
    nodes, per_node = math.ceil(gpus / gpus_per_node), min(gpus, gpus_per_node)
    if nodes * per_node != gpus:
        raise ValueError(f"{gpus} GPUs do not fill nodes of {gpus_per_node}: use a multiple of {gpus_per_node}")
    rows: list[tuple[str, str, Any]] = [
        ("model (architecture, dropouts, layer drop, extractor)", "model.size", recipe.name),
        ("(the demo's changes to the architecture)", "model.overrides", {}),
        ("(this recipe: audio per update checked at training)", "model.recipe", recipe.name),
        ("model.label_rate 50 (it2; it1 uses every 2nd MFCC frame)", "kmeans.k_it1", 100),
        ("km500 (labels of iteration 2)", "kmeans.k", 500),
        ("learn_kmeans.py percent", "kmeans.fit_fraction", 0.1),
        ("(teacher layer; paper: Base it1's 6; 0 = ours chosen by ABX)", "iteration2.layer",
         0 if recipe.name == "base" else 9),
        ("distributed_world_size (one task per GPU)", "execution.slurm.gpus_per_node", per_node),
        ("distributed_world_size / nprocs_per_node", "execution.slurm.nodes", nodes),
    ]  # fmt: skip
    for it in recipe.iterations:
        section = f"train_it{it}"
        rows += [(f, k.replace("train.", f"{section}."), v) for f, k, v in _shared_rows(recipe)]
        rows += [
            ("optimization.max_update", f"{section}.max_steps", MAX_UPDATES[it]),
            ("dataset.max_tokens x world size / GPUs", f"{section}.max_batch_samples", batch),
            ("world size / GPUs (update_freq)", f"{section}.accumulate", accumulate),
            ("nprocs_per_node (one node, local executor)", f"{section}.processes", per_node),
        ]
        if it == ITERATION_FROM_UNITS:
            rows.append(("(paper: iteration 2 trains from random weights)", f"{section}.init_from", ""))
    return rows


def split_batch(recipe: Recipe, gpus: int) -> tuple[int, int]:
    """(accumulate, max_batch_samples) giving the recipe's samples per update on `gpus` GPUs."""
    if gpus < 1:
        raise ValueError(f"--gpus must be at least 1, not {gpus}")
    if gpus <= recipe.world_size:
        if recipe.world_size % gpus:
            raise ValueError(f"{recipe.name}: {recipe.world_size} GPUs' batch cannot be split over {gpus} GPUs evenly")
        return recipe.world_size // gpus, recipe.max_tokens
    batch = recipe.world_size * recipe.max_tokens // gpus
    if batch < 250_000:  # noqa: PLR2004  task.max_sample_size: a batch must hold the longest crop
        raise ValueError(f"{recipe.name} on {gpus} GPUs: {batch} samples per GPU, under max_sample_size 250000")
    return 1, batch


def batch_shortfall(recipe_name: str, seconds_per_update: float) -> str | None:
    """A warning when a run's audio per update is under half its recipe's; None when it is not (or no recipe)."""
    if not recipe_name:
        return None
    reference = RECIPES[recipe_name].audio_seconds_per_update
    if seconds_per_update >= reference / 2:
        return None
    return (
        f"{seconds_per_update:.0f} s of audio per update, under half of the {recipe_name} recipe's {reference:.0f} s: "
        "raise accumulate, max_batch_samples or the number of GPUs, or expect other results than the recipe's"
    )


def apply_rows(params_file: Path, rows: list[tuple[str, str, Any]]) -> list[tuple[str, Any, Any]]:
    """Set every our-key of `rows` in params.yaml (comments kept, atomically); return (key, old, new) changes."""
    from ruamel.yaml import YAML

    from hubert_pipeline.io import atomic_path
    from hubert_pipeline.params import load_params

    yaml = YAML()
    yaml.preserve_quotes = True
    doc = yaml.load(params_file.read_text(encoding="utf-8"))
    changes = []
    for _, key, value in rows:
        *path, last = key.split(".")
        node = doc
        for part in path:
            node = node.setdefault(part, {})
        if node.get(last) != value:
            changes.append((key, node.get(last), value))
            node[last] = value
    with atomic_path(params_file) as tmp, Path(tmp).open("w", encoding="utf-8") as f:
        yaml.dump(doc, f)
    load_params(params_file)  # the result must be valid params
    return changes


def markdown_table(rows: list[tuple[str, str, Any]]) -> str:
    lines = ["| fairseq | ours | value |", "| --- | --- | --- |"]
    lines += [f"| `{f}` | `{k}` | `{v}` |" for f, k, v in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipe", choices=sorted(RECIPES), help="fairseq recipe")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs of the run (default: the recipe's own)")
    parser.add_argument("--gpus-per-node", type=int, default=GPUS_PER_NODE, help="GPUs per SLURM node")
    parser.add_argument("--teacher", default="", help="large/xlarge: the Base iteration-2 model (path or models:/)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file to rewrite")
    parser.add_argument("--table", action="store_true", help="print the key table in Markdown, change nothing")
    args = parser.parse_args()
    recipe = RECIPES[args.recipe]
    rows = recipe_rows(recipe, args.gpus or recipe.world_size, args.gpus_per_node)
    if recipe.iterations == (2,):
        if not args.teacher and not args.table:
            parser.error(f"{recipe.name} starts from a Base iteration-2 model: give it with --teacher")
        rows.append(("(paper: a Base iteration-2 model)", "iteration2.teacher", args.teacher or "<Base it2 model>"))
    if args.table:
        print(markdown_table(rows))
        return
    for key, old, new in apply_rows(args.params, rows):
        print(f"{key}: {old!r} -> {new!r}")


if __name__ == "__main__":
    main()
