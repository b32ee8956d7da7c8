"""ABX error per layer (ZeroSpeech 2021 style, with fastabx), and the choice of the layer for the next iteration.

Triphone items from an item file `#file onset offset #phone prev-phone next-phone speaker` (times in seconds, `#file`
the audio file name without extension, the audio anywhere under one folder). Every file is read and run through the
model ONCE: one forward pass gives the output of every transformer layer (`before_residual=False`, fairseq's
`extract_features(output_layer=n)`), kept in memory per layer, plus the 39-d MFCC baseline. fastabx then scores each
feature set as its `zerospeech_abx` does: angular (cosine) distance, frame-wise DTW, `#phone` discriminated within
context (`prev-phone`, `next-phone`), within speaker (by speaker) and across speaker (X from another speaker),
10 items per A/B/X at most in a cell and 5 X speakers per (A, B) across, seed 0; the cell errors are averaged over
contexts, then over speakers. Errors are in %.

Memory: features of the whole split for every layer are held at once (12 layers x 768 floats x 50 Hz is 1.8 MB per
second of audio, 35 GB for the 5.4 h of LibriSpeech dev-clean); each layer's per-file features are freed once its
fastabx dataset (a copy of the item frames) is built.

    python -m hubert_pipeline.abx data/demo/abx.item data/demo/wav/abx --checkpoint models/it1 --output abx.json
"""

import argparse
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from hubert_pipeline.kmeans import resolve_device

if TYPE_CHECKING:
    import polars as pl
    import torch
    from fastabx import Dataset, Task

    from hubert_pipeline.model import HuBERT

logger = logging.getLogger(__name__)

type Rule = Literal["lowest_within", "lowest_across", "lowest_mean"]
type Scores = dict[str, dict[str, float]]

ITEM_HEADER = ("#file", "onset", "offset", "#phone", "prev-phone", "next-phone", "speaker")
MFCC_FREQUENCY = 100  # Hz, hubert_pipeline.features.mfcc
MODEL_FREQUENCY = 50  # Hz, HuBERT frames (320-sample stride)
MAX_SIZE_GROUP = 10  # zerospeech_abx max_size_group, as the ZeroSpeech 2021 code
MAX_X_ACROSS = 5  # zerospeech_abx max_x_across, idem
SEED = 0  # zerospeech_abx seed
# zerospeech_abx with context="within": conditions of each speaker mode, and the order in which cells are averaged
CONDITIONS: dict[str, tuple[list[str], list[str] | None]] = {
    "within": (["prev-phone", "next-phone", "speaker"], None),
    "across": (["prev-phone", "next-phone"], ["speaker"]),
}
LEVELS = [("next-phone", "prev-phone"), "speaker"]


def read_items(items: str | Path) -> "pl.DataFrame":
    """The labels of an item file, onset/offset as decimals (as fastabx reads them); clear errors on a bad file."""
    import polars as pl

    items = Path(items)
    if not items.is_file():
        raise FileNotFoundError(f"ABX item file {items} does not exist")
    with items.open(encoding="utf-8") as f:
        header = tuple(f.readline().split())
    if header != ITEM_HEADER:
        raise ValueError(f"{items}: header {' '.join(header)!r}, expected {' '.join(ITEM_HEADER)!r}")
    df = pl.read_csv(
        items, separator=" ", schema_overrides=dict.fromkeys(("#file", "onset", "offset", "speaker"), pl.String)
    )
    if df.is_empty():
        raise ValueError(f"{items}: no item")
    # as fastabx.dataset.read_labels (which needs a `.item` suffix): exact decimal times
    return df.with_columns(*(df[col].str.to_decimal(inference_length=len(df)) for col in ("onset", "offset")))


def check_frames(labels: "pl.DataFrame", frequency: int, items: str | Path) -> None:
    """Every item must get at least one frame at `frequency` (fastabx's slicing), else name the first ones."""
    import polars as pl
    from fastabx.dataset import item_frontiers

    start, end, _, _ = item_frontiers(frequency, "onset", "offset")
    empty = labels.with_columns(start, end).filter(pl.col("end") <= pl.col("start"))
    if not empty.is_empty():
        first = ", ".join(f"{r['#file']} {r['onset']}-{r['offset']}" for r in empty.head(3).iter_rows(named=True))
        raise ValueError(f"{items}: {len(empty)} item(s) shorter than one frame at {frequency} Hz, e.g. {first}")


def find_audio(fileids: list[str], audio_root: str | Path, extension: str | Sequence[str] = ".wav") -> dict[str, Path]:
    """`<fileid><extension>` of every file id, searched recursively under `audio_root`; errors name what is missing.
    `extension` may be a list (`manifest.extension`)."""
    from hubert_pipeline.audio import file_id

    root = Path(audio_root)
    if not root.is_dir():
        raise FileNotFoundError(f"audio folder {root} does not exist")
    extensions = tuple(e.lower() for e in ((extension,) if isinstance(extension, str) else extension))
    extension = "/".join(extensions)
    wanted, found = set(fileids), {}
    for path in sorted(p for p in root.rglob("*") if p.name.lower().endswith(extensions)):
        fileid = file_id(path)
        if fileid in wanted:
            if fileid in found:
                raise ValueError(f"file id {fileid} has two audio files: {found[fileid]} and {path}")
            found[fileid] = path
    if missing := sorted(wanted - set(found)):
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")  # noqa: PLR2004
        raise FileNotFoundError(
            f"no {extension} audio under {root} for {len(missing)} file id(s) of the items: {shown}"
        )
    return found


def layer_names(model: "HuBERT | None", max_layers: int | None) -> list[str]:
    if model is None:
        return []
    total = model.config.encoder_num_layers
    if max_layers is not None and max_layers < 1:
        raise ValueError(f"max_layers must be >= 1, got {max_layers}")
    return [f"layer_{k}" for k in range(1, min(total, max_layers or total) + 1)]


def extract_features(
    model: "HuBERT | None",
    paths: dict[str, Path],
    *,
    normalize: bool = False,
    device: str = "auto",
    max_layers: int | None = None,
    resample: bool = False,
    downmix: bool = False,
    mfcc: bool = True,
) -> dict[str, dict[str, "torch.Tensor"]]:
    """{"mfcc" | "layer_k": {fileid: (frames, dim) float32 CPU tensor}}: MFCC (100 Hz; not with `mfcc` False) and
    every layer's output (50 Hz).

    One forward pass per file gives all the layers. `normalize` applies layer norm to the waveform (fairseq's
    task.normalize, True for Large models) before the model; the MFCC always see the raw waveform. The model is used in
    eval mode and left on `device` in the mode it came in.
    """
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from hubert_pipeline.audio import AudioSource, load_audio
    from hubert_pipeline.features import mfcc as mfcc_of

    device = str(resolve_device(device))
    layers = layer_names(model, max_layers)
    features: dict[str, dict[str, torch.Tensor]] = {name: {} for name in (["mfcc"] if mfcc else []) + layers}
    was_training = model.training if model is not None else False
    if model is not None:
        model.to(device).eval()
    try:
        with torch.inference_mode():
            for fileid, path in tqdm(paths.items(), desc="ABX features", unit="file"):
                waveform = load_audio(AudioSource(str(path), resample=resample, downmix=downmix))  # (T,)
                if mfcc:
                    features["mfcc"][fileid] = mfcc_of(waveform).cpu()  # (frames, 39)
                if model is None:
                    continue
                x = F.layer_norm(waveform, waveform.shape) if normalize else waveform
                outputs = model.get_intermediate_outputs(
                    x[None].to(device), num_layers=len(layers), before_residual=False
                )  # len(layers) x (1, frames, D)
                for name, out in zip(layers, outputs, strict=True):
                    features[name][fileid] = out[0].float().cpu()
    finally:
        if model is not None:
            model.train(was_training)
    return features


def _dataset(labels: "pl.DataFrame", per_file: dict[str, "torch.Tensor"], frequency: int, device: str) -> "Dataset":
    """A fastabx Dataset from features in memory (fastabx's own slicing of items into frames)."""
    import torch
    from fastabx import Dataset, InMemoryAccessor
    from fastabx.dataset import load_data_from_item

    resolved = torch.device(device)
    indices, data = load_data_from_item(
        {fileid: fileid for fileid in per_file},
        labels,
        frequency,
        per_file.__getitem__,
        "#file",
        "onset",
        "offset",
        resolved,
        progress=False,
    )
    return Dataset(labels=labels, accessor=InMemoryAccessor(indices, data, resolved))


def _task(dataset: "Dataset", speaker: Literal["within", "across"], max_x_across: int | None) -> "Task":
    """zerospeech_abx's Task, subsampled reproducibly.

    fastabx 0.9 builds the cells with polars joins, whose row order varies from run to run with several threads; its
    across-speaker subsampling keeps the first X speakers of a seeded shuffle *in that order*, so the across error
    changed between identical runs (12.6 to 13.1 % on the demo MFCC). Here the cells are sorted on their conditions
    (unique per cell) before the same Subsampler, and again after, so the seed alone decides.
    """
    import polars as pl
    from fastabx import Subsampler, Task

    by, across = CONDITIONS[speaker]
    full = Task(dataset, on="#phone", by=by, across=across)  # every cell, every triplet
    keys = [c for c in full.cells.columns if c not in {"index_a", "index_b", "index_x", "description", "header"}]
    subsampler = Subsampler(MAX_SIZE_GROUP, max_x_across if across else None, SEED)
    cells = subsampler(full.cells.lazy().sort(keys), with_across=across is not None).sort(keys).collect()
    assert isinstance(cells, pl.DataFrame)
    return Task.from_cells(dataset, cells, is_symmetric=across is None)


def score_features(
    labels: "pl.DataFrame",
    per_file: dict[str, "torch.Tensor"],
    frequency: int,
    *,
    device: str = "cpu",
    across: bool = True,
    max_x_across: int | None = MAX_X_ACROSS,
) -> dict[str, float]:
    """{"within": %, "across": %} of one feature set, as fastabx's zerospeech_abx (context within, angular distance).

    `across=False` (fewer than 2 speakers) gives across = NaN.
    """
    from fastabx import Score

    dataset = _dataset(labels, per_file, frequency, device)
    result = {"within": math.nan, "across": math.nan}
    for speaker in ("within", "across") if across else ("within",):
        task = _task(dataset, speaker, max_x_across)
        # Score L2-normalizes the dataset in place (angular distance): idempotent, so both tasks share it
        score = Score(task, "angular", progress=False)
        result[speaker] = 100.0 * score.collapse(levels=LEVELS)
    return result


def abx_per_layer(
    model: "HuBERT | str | None",
    items: str | Path,
    audio_root: str | Path,
    *,
    normalize: bool = False,
    device: str = "auto",
    max_layers: int | None = None,
    extensions: Sequence[str] = (".wav",),
    resample: bool = False,
    downmix: bool = False,
    mfcc: bool = True,
) -> Scores:
    """ABX error (%) within and across speakers of the MFCC baseline and of every layer's output of `model`.

    Keys "mfcc" (not with `mfcc` False), then "layer_1" ... "layer_N" (N = `max_layers` or all; none when `model`
    is None); values {"within": %, "across": %}. With fewer than 2 speakers in the items, "across" is NaN (a
    warning says so). `model` may be a path or models:/ URI (loaded after the items are checked). Audio files have
    one of `extensions`; `resample` / `downmix` read files that are not 16 kHz mono as the other stages do
    (manifest.*).
    """
    from tqdm import tqdm

    labels = read_items(items)
    for frequency in (*([MFCC_FREQUENCY] if mfcc else []), *([MODEL_FREQUENCY] if model is not None else [])):
        check_frames(labels, frequency, items)
    paths = find_audio(sorted(labels["#file"].unique().to_list()), audio_root, extensions)
    speakers = labels["speaker"].n_unique()
    if speakers < 2:  # noqa: PLR2004
        logger.warning("%s has %d speaker: across-speaker ABX is not defined, reported as NaN", items, speakers)
    logger.info("ABX: %d items, %d files, %d speakers in %s", len(labels), len(paths), speakers, items)
    device = str(resolve_device(device))
    if isinstance(model, str):
        from hubert_pipeline.model import HuBERT

        model = HuBERT.from_pretrained(model)
    features = extract_features(model, paths, normalize=normalize, device=device, max_layers=max_layers,
                                resample=resample, downmix=downmix, mfcc=mfcc)  # fmt: skip
    scores: Scores = {}
    for name in tqdm(list(features), desc="ABX scoring", unit="layer"):
        frequency = MFCC_FREQUENCY if name == "mfcc" else MODEL_FREQUENCY
        scores[name] = score_features(labels, features.pop(name), frequency, device=device, across=speakers >= 2)  # noqa: PLR2004
        logger.info("ABX %s: within %.2f %%, across %.2f %%", name, scores[name]["within"], scores[name]["across"])
    return scores


def _layers(scores: Scores) -> Iterator[tuple[int, dict[str, float]]]:
    for name, value in scores.items():
        prefix, _, number = name.partition("_")
        if prefix == "layer" and number.isdigit():
            yield int(number), value


def choose_layer(scores: Scores, rule: Rule = "lowest_within") -> int:
    """The layer (>= 1) with the lowest within, across or mean of both errors; ties go to the lower layer.

    NaN errors never win; ValueError when no layer has a finite error under `rule`.
    """
    keys = {"lowest_within": ("within",), "lowest_across": ("across",), "lowest_mean": ("within", "across")}
    if rule not in keys:
        raise ValueError(f"unknown rule {rule!r}, expected one of {', '.join(keys)}")
    best, best_error = None, math.inf
    for layer, value in sorted(_layers(scores)):
        error = sum(value[k] for k in keys[rule]) / len(keys[rule])
        if error < best_error:  # False for NaN
            best, best_error = layer, error
    if best is None:
        raise ValueError(f"no layer with a finite error for rule {rule!r} among {sorted(scores)}")
    return best


def plot_abx(scores: Scores, path: str | Path, title: str) -> None:
    """PNG of the within and across errors against the layer, the MFCC baseline as horizontal lines (atomic write)."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    from hubert_pipeline.io import atomic_path

    layers = sorted(_layers(scores))
    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        for condition, color in (("within", "tab:blue"), ("across", "tab:orange")):
            if layers:
                x = [layer for layer, _ in layers]
                ax.plot(x, [value[condition] for _, value in layers], "o-", color=color, label=f"{condition} speaker")
            if "mfcc" in scores and math.isfinite(scores["mfcc"][condition]):
                ax.axhline(scores["mfcc"][condition], color=color, linestyle="--", label=f"MFCC {condition}")
        if layers:
            ax.set_xticks([layer for layer, _ in layers])
        ax.set(xlabel="layer", ylabel="ABX error (%)", title=title)
        ax.grid(visible=True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m hubert_pipeline.abx",
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("items", help="item file: #file onset offset #phone prev-phone next-phone speaker")
    parser.add_argument(
        "audio_root", help="folder with <fileid>.<extension> of every item file id (searched recursively)"
    )
    parser.add_argument("--checkpoint", help="model folder, file or models:/ URI; without it, only the MFCC baseline")
    parser.add_argument("--output", required=True, help="JSON of {mfcc|layer_k: {within, across}} errors in %%")
    parser.add_argument("--plot", help="also write this PNG of the errors per layer")
    parser.add_argument("--normalize", action="store_true", help="layer-norm the waveform (task.normalize)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--max-layers", type=int, help="score layers 1 .. this one only (default: all)")
    parser.add_argument("--rule", default="lowest_within", choices=["lowest_within", "lowest_across", "lowest_mean"])
    parser.add_argument("--extension", nargs="+", default=[".wav"], help="audio file extensions")
    parser.add_argument("--resample", action="store_true", help="read files of other rates at 16 kHz (FFmpeg)")
    parser.add_argument("--downmix", action="store_true", help="read files of several channels as mono (FFmpeg)")
    args = parser.parse_args(argv)

    from hubert_pipeline.cli import setup_logging
    from hubert_pipeline.io import write_json
    from hubert_pipeline.model import HuBERT

    setup_logging()
    model = HuBERT.from_pretrained(args.checkpoint) if args.checkpoint else None
    scores = abx_per_layer(
        model, args.items, args.audio_root, normalize=args.normalize, device=args.device, max_layers=args.max_layers,
        extensions=args.extension, resample=args.resample, downmix=args.downmix,
    )  # fmt: skip
    # NaN (across with one speaker) is not JSON: written as null
    write_json(args.output, {k: {c: e if math.isfinite(e) else None for c, e in v.items()} for k, v in scores.items()})
    if args.plot:
        plot_abx(scores, args.plot, title=f"ABX {Path(args.items).stem}: {args.checkpoint or 'MFCC'}")
    if model is not None:
        try:
            logger.info("best layer (%s): %d", args.rule, choose_layer(scores, args.rule))
        except ValueError as e:
            logger.warning("no best layer: %s", e)


if __name__ == "__main__":
    main()
