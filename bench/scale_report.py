"""Markdown tables of bench/bench_scale.py's results: figures per stage and size, growth, projections.

Projections assume a stage's CPU time is fixed + per-hour (per-file for the manifest) as measured between the two
largest corpora, spread over CLUSTER_CORES cores without loss (the stages shard their work: local workers or SLURM
array tasks), and memory likewise fixed + per-hour per process.
"""

from pathlib import Path
from typing import Any

STAGES = ("manifest", "mfcc", "kmeans_it1", "units_it1", "pretrain_it1")
BEGIN, END = "<!-- bench_scale:begin -->", "<!-- bench_scale:end -->"
CLUSTER_CORES = 32  # one CPU node
TARGETS = {  # name: (training hours, files, corpus GB as distributed)
    "LibriSpeech 960 h": (960.0, 281_241, 60.0),
    "Libri-Light 60k h": (60_000.0, round(60_000 * 3600 / 12.3), 3_600.0),  # cut into LibriSpeech-length files
}
STAGE_HEADER = (
    "| corpus | wall s | CPU s (user + sys where measured) | audio h / wall h | peak RSS GB | peak anon GB "
    "| disk written GB | DVC overhead s (share) | DVC CPU s | `dvc status` s | load |"
)
NOTES = {"manifest": " (per file)", "pretrain_it1": " (its fixed steps, not a recipe: start-up grows)"}
DVC_GOAL = 0.10  # DVC's overhead at most 10 % of the stage's work
LONG_STAGE_S = 60.0


def hours_of(r: dict[str, Any]) -> float:
    return r["train_hours"] + r["valid_hours"]


def _cpu_cell(c: dict[str, Any]) -> str:
    """CPU seconds, with user and system apart where measured (runs before the split have the sum only)."""
    return f"{c['cpu_s']:.1f} ({c['user_s']:.1f} + {c['sys_s']:.1f})" if "sys_s" in c else f"{c['cpu_s']:.1f}"


def _stage_rows(results: dict[str, dict[str, Any]], stage: str) -> list[str]:
    rows = []
    for name, r in results.items():
        if stage not in r["stages"]:
            continue
        s = r["stages"][stage]
        c, o = s["command"], s["dvc_overhead"]
        share = o["wall_s"] / max(c["wall_s"], 1e-9)
        load = "-".join(f"{x:.1f}" for x in s["load_average"])
        rows.append(
            f"| {name} ({hours_of(r):.2f} h, {r['train_files'] + r['valid_files']} files) | {c['wall_s']:.1f} "
            f"| {_cpu_cell(c)} | {hours_of(r) * 3600 / c['wall_s']:,.0f} | {c['peak_rss_gb']:.2f} "
            f"| {c['peak_anon_gb']:.2f} | {s['disk_written_gb']:.3f} | {o['wall_s']:.1f} ({share:.0%}) "
            f"| {o['cpu_s']:.1f} | {s['dvc_status']['wall_s']:.1f} | {load} |"
        )
    return rows


def stage_tables(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for stage in STAGES:
        lines += [
            f"**{stage}**",
            "",
            STAGE_HEADER,
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
            *_stage_rows(results, stage),
            "",
        ]
    return lines


def _slope(a: dict[str, Any], b: dict[str, Any], stage: str, key: str, per: str = "hours") -> tuple[float, float]:
    """(fixed, per unit) of a stage's figure between two corpora: per audio hour or per file."""

    def x(r: dict[str, Any]) -> float:
        return hours_of(r) if per == "hours" else r["train_files"] + r["valid_files"]

    def y(r: dict[str, Any]) -> float:
        s = r["stages"][stage]
        return s["command"][key] if key in s["command"] else s[key]

    slope = (y(b) - y(a)) / (x(b) - x(a))
    return y(a) - slope * x(a), slope


def growth_table(results: dict[str, dict[str, Any]]) -> list[str]:
    sizes = list(results.items())
    (na, a), (nb, b) = sizes[-2:]
    earlier = sizes[-3] if len(sizes) > 2 else None
    before = f"{earlier[0]} → {na}, " if earlier else ""
    header = (
        f"| stage | CPU s / audio h at {na} | at {nb} | ratio | CPU s per added audio h ({before}{na} → {nb}) "
        f"| peak anon GB {na} → {nb} | DVC overhead at {nb} (goal <= 10 % when > 1 min) |"
    )
    lines = [header, "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for stage in STAGES:
        ca, cb = (r["stages"][stage]["command"] for r in (a, b))
        per_a, per_b = ca["cpu_s"] / hours_of(a), cb["cpu_s"] / hours_of(b)
        slopes = [_slope(x, y, stage, "cpu_s")[1] for x, y in ([(earlier[1], a)] if earlier else []) + [(a, b)]]
        share = b["stages"][stage]["dvc_overhead"]["wall_s"] / cb["wall_s"]
        verdict = "n/a (< 1 min)" if cb["wall_s"] < LONG_STAGE_S else ("met" if share <= DVC_GOAL else "**missed**")
        lines.append(
            f"| {stage} | {per_a:.2f} | {per_b:.2f} | {per_b / per_a:.2f} | {', '.join(f'{x:.3f}' for x in slopes)} "
            f"| {ca['peak_anon_gb']:.2f} → {cb['peak_anon_gb']:.2f} | {share:.0%}: {verdict} |"
        )
    return lines


def _project(b: dict[str, Any], stage: str, key: str, per: str, slope: float, target: float) -> float:
    """The figure at `target` (hours or files): the largest corpus's plus the growth measured (0 if negative)."""
    s = b["stages"][stage]
    y = s["command"][key] if key in s["command"] else s[key]
    x = hours_of(b) if per == "hours" else b["train_files"] + b["valid_files"]
    return y + max(slope, 0.0) * (target - x)


def projection_table(results: dict[str, dict[str, Any]]) -> list[str]:
    a, b = list(results.values())[-2:]
    names = list(TARGETS)
    columns = f"CPU min, wall min on {CLUSTER_CORES} cores, anon GB in one process"
    lines = [
        f"| stage | {' | '.join(f'{n}: {columns}' for n in names)} |",
        "| --- | " + " | ".join("---" for _ in names) + " |",
    ]
    for stage in STAGES:
        per = "files" if stage == "manifest" else "hours"
        _, slope = _slope(a, b, stage, "cpu_s", per)
        _, mem_slope = _slope(a, b, stage, "peak_anon_gb")
        cells = []
        for hours, files, _ in TARGETS.values():
            cpu_min = _project(b, stage, "cpu_s", per, slope, files if per == "files" else hours) / 60
            memory = _project(b, stage, "peak_anon_gb", "hours", mem_slope, hours)
            cells.append(f"{cpu_min:,.1f}, {cpu_min / CLUSTER_CORES:,.2f}, {memory:,.1f}")
        lines.append(f"| {stage}{NOTES.get(stage, '')} | {' | '.join(cells)} |")
    return lines


def dvc_projection(results: dict[str, dict[str, Any]]) -> list[str]:
    """DVC's first-run hashing of the corpus (manifest) and of the MFCC store, at the measured rates."""
    b = list(results.values())[-1]
    corpus_rate = b["corpus_gb"] / max(b["stages"]["manifest"]["dvc_overhead"]["wall_s"], 1e-9)
    store_gb = b["stages"]["mfcc"]["disk_written_gb"]
    store_rate = store_gb / max(b["stages"]["mfcc"]["dvc_overhead"]["wall_s"], 1e-9)
    rates = (
        f"Measured at {hours_of(b):.0f} h: the corpus ({b['corpus_gb']:.1f} GB of WAV) hashed at {corpus_rate:.2f} "
        f"GB/s, the MFCC store ({store_gb:.2f} GB) at {store_rate:.2f} GB/s"
    )
    lines = [rates, "(DVC's overhead over each). At those rates:", ""]
    for name, (hours, _, corpus_gb) in TARGETS.items():
        store = store_gb / hours_of(b) * hours
        lines.append(
            f"- {name}: the corpus ({corpus_gb:,.0f} GB) {corpus_gb / corpus_rate / 60:,.0f} min, once; "
            f"the MFCC store ({store:,.0f} GB) {store / store_rate / 60:,.0f} min, once per new store"
        )
    return lines


def rehash_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    """DVC hashing the whole corpus again (`dvc status manifest` after its files' mtimes changed), 1 and 2 jobs."""
    lines = [
        "| corpus | corpus GB | 1 checksum job: wall s, CPU s | 2 jobs: wall s, CPU s |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        if "rehash_corpus" not in r:
            continue
        one, two = r["rehash_corpus"]["1"], r["rehash_corpus"]["2"]
        cells = (f"{one['wall_s']:.1f}, {one['cpu_s']:.1f}", f"{two['wall_s']:.1f}, {two['cpu_s']:.1f}")
        lines.append(f"| {name} | {r['corpus_gb']:.2f} | {cells[0]} | {cells[1]} |")
    return lines


def render(results: dict[str, dict[str, Any]]) -> str:
    rehash = "`dvc status manifest` after every corpus file's mtime changed (DVC hashes the corpus again):"
    lines = [BEGIN, "", *stage_tables(results), rehash, "", *rehash_lines(results), ""]
    if len(results) > 1 and all(len(r["stages"]) == len(STAGES) for r in results.values()):
        (na, _), (nb, _) = list(results.items())[-2:]
        lines += [
            f"Growth from {na} to {nb} (CPU seconds: load distorts them less than wall time):",
            "",
            *growth_table(results),
            "",
            f"Projection (fixed + per-hour cost between {na} and {nb}; manifest per file):",
            "",
            *projection_table(results),
            "",
            *dvc_projection(results),
            "",
        ]
    return "\n".join([*lines, END])


def write_between_markers(path: Path, text: str) -> None:
    """Replace what lies between the markers in `path` (appended at the end if the markers are not there)."""
    doc = path.read_text() if path.is_file() else ""
    if BEGIN in doc and END in doc:
        doc = doc[: doc.index(BEGIN)] + text + doc[doc.index(END) + len(END) :]
    else:
        doc = doc.rstrip("\n") + ("\n\n" if doc else "") + text + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(doc)
    tmp.replace(path)
