"""PNMI gains between the unit-quality table's rows, with their 95 % jackknife interval over the valid files, for
the workspace or DVC experiments, also those whose table was written before the unit_quality stage added them.

    uv run python bench/pnmi_gains.py                       # the workspace's last `dvc repro`
    uv run python bench/pnmi_gains.py --rev ctl-s1 ctl-s2   # DVC experiments (their outputs from the DVC cache)

Reads each run's metrics/unit_quality.json, its rows' valid units (outputs/unit_quality, outputs/units/it2), the
valid alignments (data.alignments), and adds the bias-corrected PNMI and the gains as the stage does
(`hubert_pipeline.layer_quality.add_jackknife`). Prints one Markdown line per run: PNMI at kmeans.k of MFCC and of
iteration 1's and 2's rows, plug-in (the table's) / bias-corrected, and each gain with its interval.
"""

import argparse
import json
import tempfile
from pathlib import Path

import yaml

from hubert_pipeline.layer_quality import add_jackknife, gain_units
from hubert_pipeline.summary import GAINS, SHORT, gain_text

WORK, IT1_UNITS = Path("outputs/unit_quality"), Path("outputs/units/it2")


def fetch(relative: Path, rev: str | None, into: Path) -> Path:
    """The project file `relative` of the workspace (rev None) or of a DVC experiment, as a local path."""
    if rev is None:
        return relative
    import dvc.api

    local = into / relative
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_bytes(dvc.api.read(str(relative), repo=".", rev=rev, mode="rb"))
    return local


def gains_of(rev: str | None) -> dict[str, dict]:
    with tempfile.TemporaryDirectory(prefix="pnmi_gains-") as tmp:
        params = yaml.safe_load(fetch(Path("params.yaml"), rev, Path(tmp)).read_text())
        table = json.loads(fetch(Path("metrics/unit_quality.json"), rev, Path(tmp)).read_text())
        alignments = fetch(Path(params["data"]["alignments"]) / "valid.jsonl", rev, Path(tmp))
        units = {row: fetch(path, rev, Path(tmp)) for row, path in gain_units(WORK, IT1_UNITS).items() if row in table}
        add_jackknife(table, units, alignments)
    return table


def line(name: str, table: dict[str, dict]) -> str:
    rows = ("mfcc_at_k", "it1_best_layer", "it2_best_layer")
    cells = [name] + [f"{table[row]['pnmi']:.4f} / {table[row]['pnmi_corrected']:.4f}" for row in rows]
    cells += [gain_text(table.get(row, {}), other) or "" for row, other in GAINS]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rev", nargs="+", default=[None], help="DVC experiments or git revisions (default: the workspace)"
    )
    args = parser.parse_args()
    header = ["run", "MFCC", "it1", "it2"] + [f"{SHORT[row]} - {SHORT[other]}" for row, other in GAINS]
    print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    for rev in args.rev:
        print(line(rev or "workspace", gains_of(rev)), flush=True)


if __name__ == "__main__":
    main()
