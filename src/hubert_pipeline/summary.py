"""The pipeline's results at a glance.

- On one screen (`python -m hubert_pipeline.summary`, what `bash run.sh demo` prints at the end): the unit-quality
  table, each iteration's best checkpoint and layer, the goals a run of HuBERT should reach, and the command that
  opens the MLflow UI.
- In one small metrics file that `dvc exp show` fits in 120 columns (`experiment_summary`, written by the
  unit_quality stage as metrics/summary.json): per iteration N, `pnmiN` (PNMI of the units of that model's best
  layer), `abxN` (its ABX error across speakers, %), `accN` and `lossN` (the chosen checkpoint's masked-prediction
  accuracy and loss on the valid split), rounded to 4 significant digits. The README's Experiments section gives the
  `dvc exp show` command; the full metric files stay where they are.
"""

import argparse
import json
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from hubert_pipeline.tracking import checkout_uri

ROWS = (("mfcc", "MFCC"), ("mfcc_at_k", "MFCC"), ("it1_untrained", None), ("it1_best_layer", None),
        ("it2_best_layer", None))  # fmt: skip
COLUMNS = ("k", "pnmi", "phone_purity", "cluster_purity", "abx_within", "abx_across")
HEADER = ("units", "k", "PNMI", "phone purity", "cluster purity", "ABX within %", "ABX across %")
# The PNMI gains the unit_quality stage writes (row, the row it is compared with), and the rows' short names
GAINS = (("it1_best_layer", "mfcc_at_k"), ("it1_best_layer", "it1_untrained"), ("it2_best_layer", "it1_best_layer"))
SHORT = {"mfcc_at_k": "MFCC", "it1_untrained": "untrained", "it1_best_layer": "it1", "it2_best_layer": "it2"}


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _reader(root: Path, rev: str | None) -> Callable[[str], dict[str, Any] | None]:
    """Reads a project file of the workspace, or of a git revision or DVC experiment (`rev`, through DVC's API:
    metrics from git, outputs from the DVC cache); None where it is missing."""
    if rev is None:
        return lambda relative: _read(root / relative)
    import dvc.api
    from dvc.exceptions import PathMissingError

    def read(relative: str) -> dict[str, Any] | None:
        try:
            return json.loads(dvc.api.read(relative, repo=str(root), rev=rev))
        except (PathMissingError, FileNotFoundError):
            return None

    return read


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if value < 1 else f"{value:.2f}"
    return "" if value is None else str(value)


def unit_table(table: dict[str, dict[str, Any]]) -> str:
    """The unit-quality table in Markdown, as the README shows it."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    same_k = table.get("mfcc", {}).get("k") == table.get("mfcc_at_k", {}).get("k")  # kmeans.k_it1 == kmeans.k
    for key, name in ROWS:
        if key in table and not (key == "mfcc_at_k" and same_k):
            row = table[key]
            lines.append("| " + " | ".join([name or row["source"], *(_cell(row.get(c)) for c in COLUMNS)]) + " |")
    return "\n".join(lines)


def corrected_line(table: dict[str, dict[str, Any]]) -> str | None:
    """The rows' PNMI at kmeans.k corrected for the small-sample bias (the jackknife's), where the table has it."""
    rows = [key for key in SHORT if table.get(key, {}).get("pnmi_corrected") is not None]
    if not rows:
        return None
    values = ", ".join(f"{SHORT[key]} {table[key]['pnmi_corrected']:.4f}" for key in rows)
    return (f"PNMI at k={table[rows[0]]['k']} bias-corrected by the jackknife over the valid files (the table's "
            f"plug-in PNMI, fairseq's, is too high on a small split): {values}")  # fmt: skip


def layer_table(layers: dict[str, Any]) -> str:
    """PNMI and ABX of every layer of both models in Markdown (`*`: the layer whose units the next iteration used:
    ABX's choice, or iteration2.layer where set for iteration 1)."""
    header = ("layer", "it1 PNMI", "it1 ABX within %", "it1 ABX across %", "it2 PNMI", "it2 ABX within %",
              "it2 ABX across %")  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for layer in sorted({int(n) for it in ("it1", "it2") for n in layers.get(it, {})}):
        cells = [str(layer)]
        for it in ("it1", "it2"):
            row = layers.get(it, {}).get(str(layer), {})
            mark = "*" if row.get("chosen") else ""
            cells += [_cell(row.get("pnmi")) + mark, _cell(row.get("abx_within")), _cell(row.get("abx_across"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_layer_pnmi(layers: dict[str, Any] | None, it: str) -> float | None:
    """The highest PNMI of a model's layers, where every layer was scored (unit_quality.every_layer)."""
    rows = (layers or {}).get(it, {})
    values = [row.get("pnmi") for row in rows.values()]
    return max(values) if values and None not in values else None


class Goal(NamedTuple):
    text: str
    reached: bool | None  # None where the figures are missing
    figures: str  # the values compared, printed beside the verdict: a near tie must be seen as one


def goals(
    table: dict[str, dict[str, Any]], validation: dict[str, Any] | None, layers: dict[str, Any] | None = None
) -> list[Goal]:
    """The goals of a run that learns, each with its verdict and the figures it compares."""
    pnmi = {key: table[key]["pnmi"] for key in ("mfcc_at_k", "it1_best_layer", "it2_best_layer")
            if table.get(key, {}).get("pnmi") is not None}  # fmt: skip
    out: list[Goal] = []
    if len(pnmi) == 3:  # noqa: PLR2004
        k = table["mfcc_at_k"]["k"]
        it2, it1, mfcc = pnmi["it2_best_layer"], pnmi["it1_best_layer"], pnmi["mfcc_at_k"]
        figures = f"it2 {it2:.4f}, it1 {it1:.4f}, MFCC {mfcc:.4f}"
        gains = [gain for row, other in reversed(GAINS) if other != "it1_untrained"  # it2 - it1, it1 - MFCC
                 if (gain := gain_text(table[row], other, f"{SHORT[row]} - {SHORT[other]}"))]  # fmt: skip
        if gains:
            figures += f"; {', '.join(gains)} ({GAIN_LEGEND})"
        out.append(Goal(f"PNMI at k={k}: it2 best layer > it1 best layer > MFCC", it2 > it1 > mfcc, figures))
        best = {it: best_layer_pnmi(layers, it) for it in ("it1", "it2")}
        if None not in best.values():  # every layer scored: the layers of the best units, whichever ABX chose
            b2, b1 = best["it2"], best["it1"]
            out.append(Goal(f"PNMI at k={k}, each model's layer of the highest PNMI: it2 > it1 > MFCC",
                            b2 > b1 > mfcc, f"it2 {b2:.4f}, it1 {b1:.4f}, MFCC {mfcc:.4f}"))  # fmt: skip  # ty: ignore[unsupported-operator]
    if "it1_best_layer" in table and "mfcc" in table:
        it1, mfcc = table["it1_best_layer"]["abx_across"], table["mfcc"]["abx_across"]
        figures = f"it1 {it1:.2f} %, MFCC {mfcc:.2f} %"
        if "it1_untrained" in table:  # an untrained model may be below MFCC too: then this goal shows no learning
            figures += f", it1 untrained {table['it1_untrained']['abx_across']:.2f} %"
        out.append(Goal("ABX across speakers: it1 best layer below MFCC", it1 < mfcc, figures))
    if (control := untrained_goal(table)) is not None:
        out.append(control)
    if validation is not None:
        rate, accuracy = validation.get("commonest_unit_rate"), validation["best_accuracy"]
        reached, figures = (None, f"accuracy {accuracy:.3f}, commonest unit not reported") if rate is None else (
            accuracy >= 2 * rate, f"accuracy {accuracy:.3f}, commonest unit {rate:.3f}")  # fmt: skip
        out.append(Goal("it1 valid masked accuracy at least twice the commonest-unit rate", reached, figures))
    return out


GAIN_LEGEND = "gains bias-corrected, 95 % intervals, by the jackknife over the valid files; one across 0: level"


def gain_text(row: dict[str, Any], other: str, name: str = "") -> str | None:
    """`name +0.0027 [-0.0020, +0.0052]`: a row's PNMI gain over the row `other` and its interval (without a name:
    the figures only); None where the table has none (tables written before the gains, or without alignments)."""
    key = f"pnmi_gain_{other}"
    if row.get(key) is None:
        return None
    return f"{name} {row[key]:+.4f} [{row[key + '_low']:+.4f}, {row[key + '_high']:+.4f}]".lstrip()


def untrained_goal(table: dict[str, dict[str, Any]]) -> Goal | None:
    """Training added to iteration 1's layer: its units (PNMI, where measured) and ABX across speakers better than
    the same layer's with iteration 1's initial weights (the untrained control row); None without that row."""
    if "it1_untrained" not in table or "it1_best_layer" not in table:
        return None
    start, trained = table["it1_untrained"], table["it1_best_layer"]
    better, figures = trained["abx_across"] < start["abx_across"], []
    if None not in (trained["pnmi"], start["pnmi"]):
        better = better and trained["pnmi"] > start["pnmi"]
        gain = gain_text(trained, "it1_untrained", "gain")
        figures.append(f"PNMI {trained['pnmi']:.4f} against {start['pnmi']:.4f}" + (f", {gain}" if gain else ""))
    figures.append(f"ABX across {trained['abx_across']:.2f} % against {start['abx_across']:.2f} %")
    return Goal("it1 best layer better than the same layer untrained", better, ", ".join(figures))


def iteration_line(
    it: int, validation: dict[str, Any] | None, best_layer: dict[str, Any] | None, used_layer: int | None = None
) -> str:
    """`best_layer`: abx_itN's best_layer.json; `used_layer`: the layer whose units the next iteration used."""
    if validation is None:
        return f"iteration {it}: not run"
    line = (f"iteration {it}: best checkpoint step {validation['best_step']} (rule {validation['rule']}): "
            f"valid loss {validation['best_loss']:.3f}, masked accuracy {validation['best_accuracy']:.3f}")  # fmt: skip
    if (rate := validation.get("commonest_unit_rate")) is not None:
        line += f" (commonest unit {rate:.3f})"
    if best_layer is not None:
        line += f"; best layer {best_layer['layer']} by ABX"
        if used_layer is not None and used_layer != best_layer["layer"]:
            line += f", iteration {it + 1}'s units from layer {used_layer} (iteration2.layer)"
    return line


def chosen_layer(per_layer: dict[str, Any] | None, it: int) -> int | None:
    """The layer layers.json marks chosen for iteration `it`: the one whose units the next iteration used."""
    rows = (per_layer or {}).get(f"it{it}", {})
    return next((int(layer) for layer, row in rows.items() if row.get("chosen")), None)


def summary(root: Path, rev: str | None = None) -> str:
    """The summary of the workspace's results, or of the git revision or DVC experiment `rev`."""
    read = _reader(root, rev)
    table = read("metrics/unit_quality.json")
    validation = {it: read(f"metrics/validate_it{it}.json") for it in (1, 2)}
    layers = {it: read(f"outputs/abx/it{it}/best_layer.json") for it in (1, 2)}
    per_layer = read("outputs/unit_quality/layers.json")
    where = f" of {rev}" if rev else ""
    parts = [f"Unit quality{where} (valid split; metrics/unit_quality.json):", ""]
    parts += [unit_table(table), ""] if table else ["(no unit_quality table yet: run `dvc repro`)", ""]
    if table and (corrected := corrected_line(table)):
        parts += [corrected, ""]
    if per_layer and per_layer.get("every_layer"):
        legend = "outputs/unit_quality/layers.json; * the layer whose units the next iteration used"
        parts += [f"Every layer at k={per_layer['k']} ({legend}):", ""]
        parts += [layer_table(per_layer), ""]
    parts += [iteration_line(it, validation[it], layers[it], chosen_layer(per_layer, it)) for it in (1, 2)]
    if table:
        parts += ["", "Goals of a run that learns:"]
        marks = {True: "yes", False: "NO", None: "?"}
        parts += [
            f"  [{marks[goal.reached]}] {goal.text} ({goal.figures})" for goal in goals(table, validation[1], per_layer)
        ]
    parts += ["", "Compare the iterations in MLflow (loss and accuracy per step, validation, ABX per layer, PNMI):",
              f"  {mlflow_ui_command(checkout_uri(root))}"]  # fmt: skip
    return "\n".join(parts)


def mlflow_ui_command(uri: str) -> str:
    """How to browse the store at `uri`: a tracking server is opened as it is, any other store through `mlflow ui`."""
    if uri.startswith(("http://", "https://", "databricks")):
        return f"open {uri}"
    return f"uv run mlflow ui --backend-store-uri {shlex.quote(uri)}   # then open http://127.0.0.1:5000"


def _short(value: float) -> float:
    return float(f"{value:.4g}")


def experiment_summary(unit_quality: dict[str, dict[str, Any]], validate: dict[int, dict[str, Any]]) -> dict:
    """{"pnmi1", "abx1", "acc1", "loss1", "pnmi2", ...} from the unit_quality table and the validate metrics."""
    summary = {}
    for it in sorted(validate):
        row = unit_quality[f"it{it}_best_layer"]
        if row.get("pnmi") is not None:  # None without data.alignments
            summary[f"pnmi{it}"] = _short(row["pnmi"])
        summary |= {
            f"abx{it}": _short(row["abx_across"]),
            f"acc{it}": _short(validate[it]["best_accuracy"]),
            f"loss{it}": _short(validate[it]["best_loss"]),
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--root", type=Path, default=Path(), help="the project folder (where dvc.yaml is)")
    parser.add_argument("--rev", help="a DVC experiment (e.g. demo-long) or git revision instead of the workspace")
    args = parser.parse_args()
    if args.rev is None:  # the workspace's files: no DVC to import
        print(summary(args.root))
        return
    from dvc.scm import RevError

    try:
        print(summary(args.root, args.rev))
    except RevError as e:  # a mistyped or deleted experiment: its name, not DVC's traceback
        parser.exit(2, f"--rev {args.rev}: {e}; the experiments here: uv run dvc exp list --all-commits\n")


if __name__ == "__main__":
    main()
