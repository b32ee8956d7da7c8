"""Units for downstream use: a folder, tar, manifest or single audio file → units, with what made them.

    hubert-encode data/demo/wav/valid units_valid --model models:/hubert-pipeline-units@it1
    python -m hubert_pipeline.encode corpus.tar out --model outputs/pretrain/it1/best --layer 2 \\
        --centroids outputs/kmeans/it2/centroids.safetensors --deduplicate --workers 4

The model is a registered units model (`models:/<name>-units@itN`, from the `register_units_itN` stages: checkpoint,
layer and centroids in one), or a checkpoint (folder, HF folder, file, `models:/<name>@itN`: the layer and centroids
then come from the registered `<name>-units@itN`, unless `--layer` and `--centroids` are given). Units are those of
the pipeline's own units stages for the same files (one code path: `unit_encoder.UnitEncoder`). Files are read as
the manifest stage reads them (`--resample`, `--downmix` as `manifest.resample`, `manifest.downmix`).

Output folder OUT (written when every file is done; `meta.json` last):
- `units.jsonl`: one line per file, in file-id order: `{"fileid": ..., "units": [...]}`, and `"durations": [...]`
  (frames per unit, 20 ms each) with `--deduplicate` (runs of equal units merged; durations sum to the frames).
- `units.safetensors`: the same as arrays (no pickle): `units` int32 (all files' units concatenated), `offsets`
  int64 (files + 1: file i is `units[offsets[i]:offsets[i + 1]]`), `durations` int32 (with `--deduplicate`,
  aligned with `units`); metadata `format` (`hubert-pipeline-units/1`), `fileids` (JSON list, file order),
  `provenance` (JSON, as meta.json's).
- `meta.json`: `provenance` (model as given, its registry name/version/alias, sha256 of the checkpoint and of
  the centroids, layer, normalize, k, frame rate), files, frames, deduplicated, input (and `batch_seconds`, if
  not 0).
Work happens in `OUT/.work/`: files in chunks of `--chunk-files`, each chunk written atomically, so a killed run
rerun with the same command skips the chunks it finished. With `--batch-seconds S` each chunk's files are read,
sorted by length and forwarded in zero-padded batches of at most S seconds (see its help). Shards of chunks run on
`--workers` local processes, or as a SLURM job array (`--executor slurm`, cluster settings from `--params`'s
`execution.slurm`).
"""

import argparse
import dataclasses
import hashlib
import itertools
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

from hubert_pipeline.audio import AUDIO_EXTENSIONS, SAMPLE_RATE, AudioSource, file_id
from hubert_pipeline.io import atomic_open, atomic_path, write_json

logger = logging.getLogger(__name__)

FORMAT = "hubert-pipeline-units/1"
MANIFEST_SUFFIXES = (".csv", ".jsonl")
WORK = ".work"
JOB_KEY = ("provenance", "deduplicate", "chunk_files", "inputs_sha256", "batch_seconds")  # what a rerun must match


def list_inputs(path: str | Path, *, extensions: tuple[str, ...], resample: bool, downmix: bool) -> list[dict]:
    """Every file to encode, sorted by file id: {"fileid", "source": AudioSource fields}."""
    from hubert_pipeline.manifest import check_unique_ids, discover_all, read_manifest

    path = Path(path)
    if path.is_file() and path.suffix in MANIFEST_SUFFIXES:
        from hubert_pipeline.audio import source_of

        items = [(row["fileid"], source_of(row)) for row in read_manifest(path).iter_rows(named=True)]
    elif path.is_file() and path.suffix.lower() in AUDIO_EXTENSIONS:
        items = [(file_id(path), AudioSource(str(path.resolve()), resample=resample, downmix=downmix))]
    else:
        found = discover_all(path, extensions)
        items = [(fid, dataclasses.replace(src, resample=resample, downmix=downmix)) for fid, src in found]
    check_unique_ids(items, path)
    return [{"fileid": fid, "source": dataclasses.asdict(src)} for fid, src in sorted(items, key=lambda x: x[0])]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _keep_local(parts: Any, model: str, work: Path) -> Any:
    """Parts that outlive the download of a registry model: its checkpoint and centroids copied into the work
    folder (workers and SLURM tasks read them there); local parts as absolute paths."""
    from hubert_pipeline.compat import MLFLOW_SCHEMES

    if not model.startswith(MLFLOW_SCHEMES):
        return dataclasses.replace(parts, checkpoint=str(Path(parts.checkpoint).resolve()),
                                   centroids=str(Path(parts.centroids).resolve()))  # fmt: skip
    target = work / "model"
    if not (target / "done").is_file():
        shutil.rmtree(target, ignore_errors=True)
        copy = shutil.copytree if Path(parts.checkpoint).is_dir() else shutil.copy
        copy(parts.checkpoint, target / "checkpoint")
        shutil.copy(parts.centroids, target / "centroids.safetensors")
        (target / "done").write_text("")
    return dataclasses.replace(parts, checkpoint=str(target / "checkpoint"),
                               centroids=str(target / "centroids.safetensors"))  # fmt: skip


def prepare(out: Path, job: dict[str, Any], items: list[dict]) -> bool:
    """Write (or check, on a rerun) the work folder's job; True when OUT is already complete for this job."""
    key = {k: job.get(k) for k in JOB_KEY}
    for done in (out / "meta.json", out / WORK / "job.json"):
        if done.is_file():
            found = json.loads(done.read_text())
            if {k: found.get(k) for k in key} != key:
                raise ValueError(
                    f"{out} holds units of another model, centroids, layer, options or input files ({done}): "
                    "give another output folder, or delete it"
                )
            if done.name == "meta.json":
                return True
    work = out / WORK
    (work / "chunks").mkdir(parents=True, exist_ok=True)
    with atomic_open(work / "inputs.jsonl") as f:
        f.writelines(json.dumps(item) + "\n" for item in items)
    return False


def _chunk_path(work: Path, chunk: int) -> Path:
    return work / "chunks" / f"chunk-{chunk:06d}.jsonl"


def _row(fileid: str, units: Any, deduplicate: bool) -> str:
    from hubert_pipeline.unit_encoder import deduplicate as runs

    if not deduplicate:
        return json.dumps({"fileid": fileid, "units": units.tolist()}, separators=(",", ":"))
    values, durations = runs(units)
    return json.dumps({"fileid": fileid, "units": values.tolist(), "durations": durations.tolist()},
                      separators=(",", ":"))  # fmt: skip


def length_batches(lengths: list[int], batch_seconds: float) -> list[list[int]]:
    """Indices of files forwarded together: sorted by length, each batch's size x longest <= `batch_seconds` of
    audio (a longer file alone); `batch_seconds` 0: every file alone, in order."""
    if batch_seconds <= 0:
        return [[i] for i in range(len(lengths))]
    budget, batches = batch_seconds * SAMPLE_RATE, [cast("list[int]", [])]
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if batches[-1] and (len(batches[-1]) + 1) * lengths[i] > budget:
            batches.append([])
        batches[-1].append(i)
    return [b for b in batches if b]


def _read_batches(items: list[dict], batch_seconds: float) -> Iterator[tuple[list[int], list[Any]]]:
    """(indices, waveforms) of each forward: one file read at a time, or all the chunk's read, then by length."""
    from hubert_pipeline.audio import load_audio

    if batch_seconds <= 0:
        for i, item in enumerate(items):
            yield [i], [load_audio(AudioSource(**item["source"]))]
        return
    waveforms = [load_audio(AudioSource(**item["source"])) for item in items]
    for batch in length_batches([len(w) for w in waveforms], batch_seconds):
        yield batch, [waveforms[i] for i in batch]


def _chunk_units(encoder: Any, items: list[dict], batch_seconds: float, bar: Any) -> list[Any]:
    """Units of a chunk's files, in their order."""
    units: list[Any] = [None] * len(items)
    for batch, waveforms in _read_batches(items, batch_seconds):
        for i, found in zip(batch, encoder.units_batch(waveforms), strict=True):
            units[i] = found
        bar.update(len(batch))
    return units


def encode_shard(work: str, chunks: list[int], device: str) -> int:
    """Encode the chunks of one shard not written yet (each atomically); the number of files encoded."""
    from tqdm import tqdm

    from hubert_pipeline.unit_encoder import EncoderParts, UnitEncoder

    root = Path(work)
    job = json.loads((root / "job.json").read_text())
    items = [json.loads(line) for line in (root / "inputs.jsonl").read_text().splitlines()]
    size = job["chunk_files"]
    todo = [c for c in chunks if not _chunk_path(root, c).is_file()]
    if not todo:
        return 0
    encoder = UnitEncoder.load(EncoderParts(**job["parts"]), device)
    bar = tqdm(total=sum(len(items[c * size : (c + 1) * size]) for c in todo), desc="encode", unit="file")
    for chunk in todo:
        part = items[chunk * size : (chunk + 1) * size]
        units = _chunk_units(encoder, part, job.get("batch_seconds", 0.0), bar)
        rows = [_row(item["fileid"], u, job["deduplicate"]) + "\n" for item, u in zip(part, units, strict=True)]
        with atomic_open(_chunk_path(root, chunk)) as f:
            f.writelines(rows)
    bar.close()
    return bar.n


def merge(out: Path, num_chunks: int) -> dict[str, Any]:
    """The chunks, in order, into units.jsonl and units.safetensors; then meta.json (last) and no work folder."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    work = out / WORK
    job = json.loads((work / "job.json").read_text())
    fileids, units, durations, offsets = [], [], [], [0]
    with atomic_open(out / "units.jsonl") as f:
        for chunk in range(num_chunks):
            text = _chunk_path(work, chunk).read_text()
            f.write(text)
            for row in map(json.loads, text.splitlines()):
                fileids.append(row["fileid"])
                units.append(np.asarray(row["units"], dtype=np.int32))
                durations.append(np.asarray(row.get("durations", []), dtype=np.int32))
                offsets.append(offsets[-1] + len(row["units"]))
    tensors = {"units": torch.from_numpy(np.concatenate(units)), "offsets": torch.tensor(offsets, dtype=torch.int64)}
    if job["deduplicate"]:
        tensors["durations"] = torch.from_numpy(np.concatenate(durations))
    frames = int(tensors["durations"].sum()) if job["deduplicate"] else offsets[-1]
    metadata = {"format": FORMAT, "fileids": json.dumps(fileids), "provenance": json.dumps(job["provenance"])}
    with atomic_path(out / "units.safetensors") as tmp:
        save_file(tensors, tmp, metadata=metadata)
    meta = {k: job[k] for k in (*JOB_KEY, "input") if k in job}
    meta |= {"format": FORMAT, "files": len(fileids), "frames": frames}
    write_json(out / "meta.json", meta)
    shutil.rmtree(work)
    return meta


def encode(
    inputs: str | Path,
    out: str | Path,
    *,
    model: str,
    layer: int | None = None,
    centroids: str | None = None,
    normalize: bool | None = None,
    deduplicate: bool = False,
    extensions: tuple[str, ...] = AUDIO_EXTENSIONS,
    resample: bool = False,
    downmix: bool = False,
    chunk_files: int = 100,
    batch_seconds: float = 0.0,
    shards: int = 0,
    execution: Any = None,
) -> dict[str, Any]:
    """Encode every file of `inputs` into OUT (see the module's docstring); meta.json's content."""
    from hubert_pipeline.launch import map_tasks
    from hubert_pipeline.params import ExecutionParams
    from hubert_pipeline.unit_encoder import open_parts

    if batch_seconds < 0:
        raise ValueError(f"--batch-seconds must be >= 0 (0: one file at a time), got {batch_seconds}")
    out, execution = Path(out), execution or ExecutionParams(workers=1, device="cpu")
    items = list_inputs(inputs, extensions=extensions, resample=resample, downmix=downmix)
    with open_parts(model, layer=layer, centroids=centroids, normalize=normalize) as (parts, provenance):
        job = {"provenance": provenance, "deduplicate": deduplicate, "chunk_files": chunk_files,
               "inputs_sha256": _digest(items), "input": str(inputs)}  # fmt: skip
        if batch_seconds > 0:  # absent by default: the job and meta.json of one-by-one runs stay as they were
            job["batch_seconds"] = batch_seconds
        if prepare(out, job, items):
            logger.info("%s: already complete", out)
            return json.loads((out / "meta.json").read_text())
        job["parts"] = dataclasses.asdict(_keep_local(parts, model, out / WORK))
    write_json(out / WORK / "job.json", job)
    num_chunks = -(-len(items) // chunk_files)
    done = sum(_chunk_path(out / WORK, c).is_file() for c in range(num_chunks))
    if done:
        logger.info("%s: %d of %d chunks already written, resuming", out, done, num_chunks)
    num_shards = max(1, min(shards or execution.workers, num_chunks))
    tasks = [{"work": str((out / WORK).resolve()), "chunks": list(range(s, num_chunks, num_shards)),
              "device": execution.device} for s in range(num_shards)]  # fmt: skip
    map_tasks(encode_shard, tasks, execution=execution, desc=f"encode {out}", gpu=True)
    return merge(out, num_chunks)


def read_units_file(path: str | Path) -> dict[str, Any]:
    """units.safetensors → {"fileids", "units": list of int arrays, "durations" (or None), "provenance"}."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    tensors = load_file(path)
    with safe_open(path, framework="numpy") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file (format {metadata.get('format')!r})")
    spans = list(itertools.pairwise(tensors["offsets"].tolist()))
    durations = tensors.get("durations")
    return {
        "fileids": json.loads(metadata["fileids"]),
        "units": [tensors["units"][a:b] for a, b in spans],
        "durations": None if durations is None else [durations[a:b] for a, b in spans],
        "provenance": json.loads(metadata["provenance"]),
    }


BATCH_HELP = (
    "0 (default): one file per forward, as the units stages. S > 0: batch by length: each chunk's files are read, "
    "sorted by length and forwarded in zero-padded batches of at most S seconds (batch size x longest file), for "
    "GPUs on corpora of short files. Units equal one by one's on every frame measured (0 of 52,944 demo frames "
    "differ; float rounding could flip a frame nearly equidistant from two centroids). CPU, demo model: 2.3x the "
    "throughput on 0.5-2 s files at S=16, none on 3-15 s files, 0.76x at S=64 (docs/benchmarks.md)"
)


def _parser() -> argparse.ArgumentParser:
    from hubert_pipeline.cli import parser

    p = parser(__doc__ or "")
    p.prog = "hubert-encode"
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("inputs", help="audio folder, uncompressed tar, manifest (.csv/.jsonl) or one audio file")
    p.add_argument("output", help="output folder (units.jsonl, units.safetensors, meta.json)")
    p.add_argument("--model", required=True, help="units model or checkpoint: folder, file or models:/name@alias")
    p.add_argument("--layer", type=int, help="transformer layer, 1-based (default: the units model's)")
    p.add_argument("--centroids", help="centroids.safetensors (default: the units model's)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="layer-normalize waveforms (default: the units model's, else off)")  # fmt: skip
    p.add_argument("--deduplicate", action="store_true", help="merge runs of equal units, with their durations")
    p.add_argument("--extension", action="append", help="file extensions taken from a folder or tar (default: all)")
    p.add_argument("--resample", action="store_true", help="read files of other rates at 16 kHz (FFmpeg)")
    p.add_argument("--downmix", action="store_true", help="read files of several channels as mono (FFmpeg)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="where the model runs")
    p.add_argument("--workers", type=int, default=1, help="local processes (one shard each)")
    p.add_argument("--shards", type=int, default=0, help="shards (SLURM array tasks); 0: --workers")
    p.add_argument("--chunk-files", type=int, default=100, help="files per atomically written chunk (resume unit)")
    p.add_argument("--batch-seconds", type=float, default=0.0, metavar="S", help=BATCH_HELP)
    p.add_argument("--executor", choices=("local", "slurm"), default="local",
                   help="slurm: one array task per shard, settings from --params's execution.slurm")  # fmt: skip
    return p


def main() -> None:
    args = _parser().parse_args()
    from hubert_pipeline.cli import setup_logging

    setup_logging()
    from hubert_pipeline.params import ExecutionParams, load_params

    if args.executor == "slurm":
        base = load_params(args.params).execution
        execution = dataclasses.replace(base, executor="slurm", device=args.device)
    else:
        execution = ExecutionParams(workers=args.workers, device=args.device)
    try:
        meta = encode(
            args.inputs, args.output, model=args.model, layer=args.layer, centroids=args.centroids,
            normalize=args.normalize, deduplicate=args.deduplicate,
            extensions=tuple(args.extension) if args.extension else AUDIO_EXTENSIONS, resample=args.resample,
            downmix=args.downmix, chunk_files=args.chunk_files, batch_seconds=args.batch_seconds, shards=args.shards,
            execution=execution,
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as e:  # bad input: the message says what to change
        raise SystemExit(f"hubert-encode: error: {e}") from e
    print(f"{args.output}: {meta['files']} files, {meta['frames']} frames, layer {meta['provenance']['layer']}, "
          f"k={meta['provenance']['k']}")  # fmt: skip


if __name__ == "__main__":
    main()
