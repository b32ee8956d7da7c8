"""The figures that decide an experiment, in one small metrics file that `dvc exp show` fits in 120 columns.

Per iteration N (the suffix): `pnmiN`, the PNMI of the units of that model's best layer, and `abxN`, its ABX error
across speakers in % (both from the unit_quality table); `accN` and `lossN`, the chosen checkpoint's masked-prediction
accuracy and loss on the valid split (from the validate stage). Rounded to 4 significant digits, for short columns;
the full metric files stay where they are. The README's Experiments section gives the `dvc exp show` command.
"""

from typing import Any


def _short(value: float) -> float:
    return float(f"{value:.4g}")


def experiment_summary(unit_quality: dict[str, dict[str, Any]], validate: dict[int, dict[str, Any]]) -> dict:
    """{"pnmi1", "abx1", "acc1", "loss1", "pnmi2", ...} from the unit_quality table and the validate metrics."""
    summary = {}
    for it in sorted(validate):
        row = unit_quality[f"it{it}_best_layer"]
        summary |= {
            f"pnmi{it}": _short(row["pnmi"]),
            f"abx{it}": _short(row["abx_across"]),
            f"acc{it}": _short(validate[it]["best_accuracy"]),
            f"loss{it}": _short(validate[it]["best_loss"]),
        }
    return summary
