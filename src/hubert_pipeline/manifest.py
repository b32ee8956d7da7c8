"""Manifests: the audio files of a corpus, probed once, with their exact lengths and what they were on disk.

A manifest is spidr's CSV format: `fileid,path,num_samples` for files in a folder, plus
`archive,byte_offset,byte_size` for files inside an uncompressed tar archive, plus the file's own `sample_rate`
and `channels` (a file that is not 16 kHz mono is read converted: `audio.source_of`; `num_samples` is then the
converted length), plus `file_size,file_mtime_ns` of the file (or archive) as probed: `check_sources` finds files
that moved or changed since, before a stage spends hours on them. Bad files either fail the stage (default) or
are skipped and listed with their reason.

A manifest inside a pipeline (a folder holding dvc.yaml above it) names the files inside that folder relative to
it, so that it means the same files wherever the project is: in a `dvc exp run --temp/--queue` copy, restored from
DVC's run cache or pulled from a remote, in a clone elsewhere. Readers resolve them against the same folder.
"""

import dataclasses
import logging
import tarfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import polars as pl

from hubert_pipeline.audio import AudioSource, BadAudioError, Probe, Verify, file_id, probe, probe_format, source_of
from hubert_pipeline.io import atomic_path, project_root

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("fileid", "path", "num_samples")
ARCHIVE_COLUMNS = ("archive", "byte_offset", "byte_size")
STAT_COLUMNS = ("file_size", "file_mtime_ns")
LISTED = 20  # bad files named in an error message


def _matches(name: str, extensions: Sequence[str]) -> bool:
    return name.lower().endswith(tuple(e.lower() for e in extensions))


def _describe_contents(names: list[str]) -> str:
    """`12 .flac, 3 .txt`: what a folder holds instead, for the error naming it."""
    counts: dict[str, int] = {}
    for name in names:
        base = name.rsplit("/", 1)[-1]
        suffix = "." + base.rsplit(".", 1)[1].lower() if "." in base else ""
        counts[suffix] = counts.get(suffix, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:5]
    return ", ".join(f"{n} {s or '(no extension)'}" for s, n in top) or "nothing"


def listed(listing: Path, extensions: Sequence[str]) -> list[tuple[str, AudioSource]]:
    """(file id, source) of each file a fairseq manifest lists, sorted by path: the corpus folder on the first line,
    then one file per line, `relative/path.flac<TAB>num_samples` (the count is ignored: every file is probed).

    The listing, not the audio, is then what DVC hashes: at scale DVC's first hash of a corpus folder (every byte,
    again in each `dvc exp run --queue/--temp` copy) costs more than the manifest stage itself (docs/benchmarks.md).
    """
    lines = [line for line in listing.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{listing}: empty listing (a fairseq .tsv: the corpus folder on its first line)")
    base = Path(lines[0].strip())
    relative = [line.split("\t", 1)[0] for line in lines[1:]]
    if other := [r for r in relative if not _matches(r, extensions)]:
        raise ValueError(f"{listing}: {len(other)} listed file(s) are not {'/'.join(extensions)} "
                         f"(manifest.extension), e.g. {other[:3]}")  # fmt: skip
    paths = sorted(base.resolve() / r for r in relative)
    return [(file_id(path), AudioSource(str(path))) for path in paths]


def discover(root: str | Path, extensions: str | Sequence[str]) -> Iterator[tuple[str, AudioSource]]:
    """(file id, source) of every audio file under a folder, inside an uncompressed tar archive, or listed by a
    fairseq manifest (.tsv), sorted by path."""
    extensions = (extensions,) if isinstance(extensions, str) else tuple(extensions)
    root = Path(root)
    if root.is_file() and root.suffix == ".tsv":
        yield from listed(root, extensions)
    elif root.is_dir():
        paths = sorted(p for p in root.resolve().rglob("*") if p.is_file() and _matches(p.name, extensions))
        for path in paths:
            yield file_id(path), AudioSource(str(path))
    elif root.is_file() and tarfile.is_tarfile(root):
        with tarfile.open(root, mode="r:") as tar:  # "r:" refuses compressed archives
            members = sorted((m for m in tar.getmembers() if m.isfile() and _matches(m.name, extensions)),
                             key=lambda m: m.name)  # fmt: skip
        for m in members:
            yield file_id(m.name), AudioSource(m.name, str(root.resolve()), m.offset_data, m.size)
    elif root.is_file():
        raise ValueError(f"{root}: not a folder, an uncompressed tar archive or a fairseq manifest (.tsv)")
    else:
        raise FileNotFoundError(f"{root}: no such folder or archive")


def discover_all(root: str | Path, extensions: str | Sequence[str]) -> list[tuple[str, AudioSource]]:
    """`discover`, with an error naming the folder, the extensions and what it holds instead when it finds none."""
    extensions = (extensions,) if isinstance(extensions, str) else tuple(extensions)
    items = list(discover(root, extensions))
    if not items:
        root = Path(root)
        if root.suffix == ".tsv":
            raise ValueError(f"{root}: lists no files (a fairseq .tsv: the corpus folder, then one file per line)")
        if root.is_dir():
            held = _describe_contents([p.name for p in root.rglob("*") if p.is_file()])
        else:
            with tarfile.open(root, mode="r:") as tar:
                held = _describe_contents([m.name for m in tar.getmembers() if m.isfile()])
        raise ValueError(f"{root}: no {'/'.join(extensions)} files found (manifest.extension); it holds: {held}")
    return items


def _probe_one(item: tuple[str, AudioSource], verify: Verify) -> tuple[str, AudioSource, Probe | str]:
    fileid, source = item
    try:
        return fileid, source, probe_format(source, verify)
    except BadAudioError as e:
        return fileid, source, str(e)


def _stat(source: AudioSource) -> tuple[int, int]:
    st = Path(source.archive or source.path).stat()
    return st.st_size, st.st_mtime_ns


def check_unique_ids(items: list[tuple[str, AudioSource]], root: str | Path) -> None:
    seen: dict[str, str] = {}
    for fid, src in items:
        if fid in seen:
            raise ValueError(f"{root}: file id {fid!r} is given by both {seen[fid]} and {src}; file ids must be unique")
        seen[fid] = str(src)


def build_manifest(
    root: str | Path,
    *,
    extension: str | Sequence[str] = ".wav",
    on_bad_file: Literal["fail", "skip"] = "fail",
    verify: Verify = "header",
    resample: bool = False,
    downmix: bool = False,
    workers: int = 1,
    items: list[tuple[str, AudioSource]] | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Probe every file under `root` (or the `items` discovered there): (manifest sorted by file id, skipped files
    with their reason). With on_bad_file="fail", BadAudioError lists every bad file (up to 20), nothing written.
    `resample` / `downmix` admit files of other rates / several channels, read converted to 16 kHz mono."""
    from tqdm import tqdm

    items = discover_all(root, extension) if items is None else items
    check_unique_ids(items, root)
    items = [(fid, dataclasses.replace(src, resample=resample, downmix=downmix)) for fid, src in items]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(tqdm(pool.map(lambda item: _probe_one(item, verify), items), total=len(items),
                            desc=f"probe {root}", mininterval=2))  # fmt: skip
    good = [(fid, src, n) for fid, src, n in results if isinstance(n, Probe)]
    bad = [(fid, str(src), reason) for fid, src, reason in results if isinstance(reason, str)]
    for _, _, reason in bad:
        logger.warning("bad audio file: %s", reason)
    if bad and on_bad_file == "fail":
        listing = "\n  ".join(reason for _, _, reason in bad[:LISTED])
        more = f"\n  ... and {len(bad) - LISTED} more" if len(bad) > LISTED else ""
        raise BadAudioError(
            f"{len(bad)} bad audio file(s) under {root} "
            f"(set manifest.on_bad_file: skip to leave them out):\n  {listing}{more}"
        )
    return _manifest_frame(good), pl.DataFrame(
        bad, schema={"fileid": pl.String, "path": pl.String, "reason": pl.String}, orient="row"
    )


def _manifest_frame(good: list[tuple[str, AudioSource, Probe]]) -> pl.DataFrame:
    has_archive = any(src.archive for _, src, _ in good)
    schema = {"fileid": pl.String, "path": pl.String, "num_samples": pl.Int64}
    if has_archive:
        schema |= {"archive": pl.String, "byte_offset": pl.Int64, "byte_size": pl.Int64}
    schema |= {"sample_rate": pl.Int64, "channels": pl.Int64, "file_size": pl.Int64, "file_mtime_ns": pl.Int64}
    rows = []
    for fid, src, found in good:
        row: dict[str, object] = {"fileid": fid, "path": src.path, "num_samples": found.num_samples}
        if has_archive:
            row |= {"archive": src.archive, "byte_offset": src.byte_offset, "byte_size": src.byte_size}
        row |= {"sample_rate": found.sample_rate, "channels": found.channels}
        rows.append(row | dict(zip(STAT_COLUMNS, _stat(src), strict=True)))
    return pl.DataFrame(rows, schema=schema).sort("fileid")


def short_files(manifest: pl.DataFrame, min_samples: int) -> pl.DataFrame:
    """The files shorter than `min_samples` (train_itN.min_sample_size): they never train."""
    return manifest.filter(pl.col("num_samples") < min_samples).select("fileid", "path", "num_samples")


def read_manifest(path: str | Path, *, resolve: bool = True) -> pl.DataFrame:
    """Read a manifest (CSV or JSONL) and check its columns, naming the file when they are wrong; its relative
    paths resolved against its project's folder (`resolve=False`: as written)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such manifest")
    df = pl.read_ndjson(path) if path.suffix == ".jsonl" else pl.read_csv(path)
    if missing := [c for c in MANIFEST_COLUMNS if c not in df.columns]:
        raise ValueError(f"{path}: manifest lacks column(s) {missing}")
    root = project_root(path)
    return resolved_sources(df, root) if resolve and root else df


def _source_columns(df: pl.DataFrame) -> dict[str, pl.Expr]:
    """The columns naming a file on disk: `archive` where a row has one (its `path` is then the member's name inside
    the archive), else `path`."""
    if "archive" not in df.columns:
        return {"path": pl.lit(value=True)}
    return {"path": pl.col("archive").is_null(), "archive": pl.col("archive").is_not_null()}


def relative_sources(df: pl.DataFrame, root: Path | None) -> pl.DataFrame:
    """`df` with the files under `root` named relative to it (files elsewhere keep their absolute path)."""
    if root is None:
        return df
    prefix = f"{root.resolve()}/"
    return df.with_columns(
        pl.when(on & pl.col(c).str.starts_with(prefix)).then(pl.col(c).str.strip_prefix(prefix)).otherwise(pl.col(c))
        .alias(c)
        for c, on in _source_columns(df).items()
    )  # fmt: skip


def resolved_sources(df: pl.DataFrame, root: Path) -> pl.DataFrame:
    """`relative_sources` undone: relative file names made absolute against `root`."""
    return df.with_columns(
        pl.when(on & ~pl.col(c).str.starts_with("/")).then(pl.lit(f"{root}/") + pl.col(c)).otherwise(pl.col(c))
        .alias(c)
        for c, on in _source_columns(df).items()
    )  # fmt: skip


def check_sources(manifest: pl.DataFrame | list[dict], name: str | Path, *, workers: int = 8) -> None:
    """ValueError naming `name` and the files (up to 20) that are gone, or whose size changed, since the manifest
    stage probed them. A file with a new modification time but its size is probed again (cheap for WAV and
    FLAC): a `dvc checkout` rewrites files unchanged, an edit that keeps the size changes the length, mostly."""
    rows = manifest.to_dicts() if isinstance(manifest, pl.DataFrame) else manifest
    if not rows or STAT_COLUMNS[0] not in rows[0]:
        return  # a manifest of an earlier version: nothing recorded to compare
    with ThreadPoolExecutor(workers) as pool:
        problems = [p for p in pool.map(_source_problem, rows) if p]
    if problems:
        listing = "\n  ".join(problems[:LISTED])
        more = f"\n  ... and {len(problems) - LISTED} more" if len(problems) > LISTED else ""
        raise ValueError(
            f"{name}: {len(problems)} file(s) moved or changed since the manifest stage probed them; "
            f"rerun it (dvc repro manifest):\n  {listing}{more}"
        )


def _source_problem(row: dict) -> str | None:
    source = source_of(row)
    try:
        size, mtime = _stat(source)
    except OSError:
        return f"{source.archive or source.path}: no longer exists"
    if size != row["file_size"]:
        return f"{source}: {size} bytes, {row['file_size']} when probed"
    if mtime != row["file_mtime_ns"]:
        try:
            samples = probe(source)
        except BadAudioError as e:
            return f"{e} (modified since probed)"
        if samples != row["num_samples"]:
            return f"{source}: modified since probed: {samples} samples, {row['num_samples']} in the manifest"
    return None


def write_csv(df: pl.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        df.write_csv(tmp)


def write_manifest(df: pl.DataFrame, path: str | Path) -> None:
    """Write a manifest (CSV), the files inside its project named relative to the project's folder."""
    write_csv(relative_sources(df, project_root(path)), path)


def check_splits_apart(roots: dict[str, str | Path], found: dict[str, list[tuple[str, AudioSource]]]) -> None:
    """ValueError, before any probing, when data.train and data.valid overlap: one inside the other, or sharing
    file ids (validation on training files measures nothing)."""
    (a, root_a), (b, root_b) = roots.items()
    path_a, path_b = Path(root_a).resolve(), Path(root_b).resolve()
    if path_a == path_b or path_a in path_b.parents or path_b in path_a.parents:
        raise ValueError(f"data.{a} ({root_a}) and data.{b} ({root_b}) overlap: one is inside the other")
    if shared := sorted({fid for fid, _ in found[a]} & {fid for fid, _ in found[b]}):
        raise ValueError(
            f"data.{a} ({root_a}) and data.{b} ({root_b}) overlap: {len(shared)} file id(s) are in both, "
            f"e.g. {shared[:5]}"
        )


def read_checked_manifest(path: str | Path) -> pl.DataFrame:
    """`read_manifest`, then `check_sources`: what a stage that reads audio calls before its expensive work."""
    manifest = read_manifest(path)
    check_sources(manifest, path)
    return manifest
