import json
import os
import subprocess
import sys

from hubert_pipeline.layer_quality import layer_rows
from hubert_pipeline.summary import corrected_line, experiment_summary, goals, layer_table, summary, unit_table


def test_summary_takes_each_iterations_best_layer_units_and_its_chosen_checkpoint():
    row = {"source": "x", "k": 500, "pnmi": 0.3, "phone_purity": 0.2, "cluster_purity": 0.1, "abx_within": 9.0}
    table = {
        "mfcc": row | {"abx_across": 20.0},
        "it1_best_layer": row | {"pnmi": 0.31, "abx_across": 37.9},
        "it2_best_layer": row | {"pnmi": 0.33, "abx_across": 38.1},
    }
    validate = {
        1: {"best_step": 400, "best_accuracy": 0.053, "best_loss": 4.2},
        2: {"best_accuracy": 0.04, "best_loss": 5.47},
    }
    assert experiment_summary(table, validate) == {
        "pnmi1": 0.31, "abx1": 37.9, "acc1": 0.053, "loss1": 4.2,
        "pnmi2": 0.33, "abx2": 38.1, "acc2": 0.04, "loss2": 5.47,
    }  # fmt: skip


def test_the_mfcc_row_at_the_layers_k_is_left_out_when_iteration_1_used_that_k_already():
    row = {"source": "MFCC", "pnmi": 0.6, "abx_across": 20.0}
    layers = {"it1_best_layer": row | {"source": "it1 layer 1", "k": 500}}
    assert unit_table({"mfcc": row | {"k": 100}, "mfcc_at_k": row | {"k": 500}} | layers).count("| MFCC |") == 2
    assert unit_table({"mfcc": row | {"k": 500}, "mfcc_at_k": row | {"k": 500}} | layers).count("| MFCC |") == 1


def test_summary_figures_are_rounded_to_four_significant_digits_for_short_columns():
    row = {"pnmi": 0.163694786, "abx_across": 38.348880610}
    summary = experiment_summary({"it1_best_layer": row}, {1: {"best_accuracy": 0.0984293, "best_loss": 2.842083}})
    assert summary == {"pnmi1": 0.1637, "abx1": 38.35, "acc1": 0.09843, "loss1": 2.842}


def mlflow_line(text: str) -> str:
    (line,) = [line for line in text.splitlines() if "mlflow ui" in line or line.strip().startswith("open ")]
    return line.strip()


def test_summary_opens_the_checkouts_default_store_when_nothing_names_another(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "params.yaml").write_text("mlflow:\n  tracking_uri: ''\n")
    line = mlflow_line(summary(tmp_path))
    assert line.startswith(f"uv run mlflow ui --backend-store-uri sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db ")


def test_summary_opens_the_store_of_params_tracking_uri_and_mlflow_tracking_uri_before_it(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "params.yaml").write_text("mlflow:\n  tracking_uri: sqlite:////shared/runs.db\n")
    assert mlflow_line(summary(tmp_path)).startswith("uv run mlflow ui --backend-store-uri sqlite:////shared/runs.db ")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert mlflow_line(summary(tmp_path)) == "open http://mlflow.example:5000"


def test_summary_cli_prints_the_uri_of_mlflow_tracking_uri(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = "postgresql://u@db/mlflow"
    out = subprocess.run([sys.executable, "-m", "hubert_pipeline.summary", "--root", str(tmp_path)], env=env,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert mlflow_line(out).startswith("uv run mlflow ui --backend-store-uri postgresql://u@db/mlflow ")
    assert "sqlite" not in out


def test_without_alignments_the_summary_has_no_pnmi_and_no_pnmi_goal():
    row = {"source": "x", "k": 30, "pnmi": None, "phone_purity": None, "cluster_purity": None, "abx_within": 9.0}
    table = {name: row | {"abx_across": 20.0} for name in ("mfcc", "mfcc_at_k", "it1_best_layer", "it2_best_layer")}
    validate = {1: {"best_accuracy": 0.05, "best_loss": 4.2}}
    assert experiment_summary(table, validate) == {"abx1": 20.0, "acc1": 0.05, "loss1": 4.2}
    assert [goal.text for goal in goals(table, None)] == ["ABX across speakers: it1 best layer below MFCC"]


def test_every_layers_pnmi_gives_a_goal_of_its_own_beside_the_layers_abx_chose():
    """ABX chose iteration 2's layer 3 (PNMI 0.61, below iteration 1's 0.65); its layer 1 (0.66) is above both."""
    row = {"source": "x", "k": 500, "phone_purity": 0.5, "cluster_purity": 0.1, "abx_within": 1.0, "abx_across": 9.0}
    table = {"mfcc_at_k": row | {"pnmi": 0.64}, "mfcc": row | {"pnmi": 0.47, "abx_across": 12.0},
             "it1_best_layer": row | {"pnmi": 0.65}, "it2_best_layer": row | {"pnmi": 0.61}}  # fmt: skip
    abx = {f"layer_{n}": {"within": w, "across": 9.0} for n, w in ((1, 1.6), (2, 1.6), (3, 1.1))}
    pnmi = {"it1": {1: 0.65, 2: 0.64, 3: 0.62}, "it2": {1: 0.66, 2: 0.65, 3: 0.61}}
    chosen = {"it1": 1, "it2": 3}
    layers = {it: layer_rows(abx, chosen[it], {"pnmi": pnmi[it][chosen[it]]}, lambda n, it=it: {"pnmi": pnmi[it][n]})
              for it in ("it1", "it2")}  # fmt: skip
    assert layers["it2"]["3"] == {"pnmi": 0.61, "phone_purity": None, "cluster_purity": None, "abx_within": 1.1,
                                  "abx_across": 9.0, "chosen": True}  # fmt: skip
    reached = {goal.text: goal.reached for goal in goals(table, None, layers)}
    assert reached["PNMI at k=500: it2 best layer > it1 best layer > MFCC"] is False
    assert reached["PNMI at k=500, each model's layer of the highest PNMI: it2 > it1 > MFCC"] is True
    assert [goal.figures for goal in goals(table, None, layers)] == [  # what each verdict compares: ties are seen
        "it2 0.6100, it1 0.6500, MFCC 0.6400",
        "it2 0.6600, it1 0.6500, MFCC 0.6400",
        "it1 9.00 %, MFCC 12.00 %",
    ]
    assert "| 3 | 0.620 | 1.10 | 9.00 | 0.610* | 1.10 | 9.00 |" in layer_table(layers)
    unscored = {it: layer_rows(abx, chosen[it], {"pnmi": 0.6}, lambda _: {}) for it in ("it1", "it2")}
    assert len(goals(table, None, unscored)) == 2  # only the chosen layers scored: no goal of every layer


def test_the_untrained_control_is_a_row_and_a_goal_and_is_shown_beside_the_abx_goal():
    """The demo's seed 0 (2026-12-07): iteration 1's initial weights are already below MFCC across speakers."""
    row = {"k": 500, "phone_purity": 0.5, "cluster_purity": 0.1, "abx_within": 1.0}
    table = {"mfcc": row | {"source": "MFCC", "k": 100, "pnmi": 0.470, "abx_across": 20.19},
             "mfcc_at_k": row | {"source": "MFCC", "pnmi": 0.6268, "abx_across": 20.19},
             "it1_untrained": row | {"source": "it1 layer 1, untrained", "pnmi": 0.5847, "abx_across": 18.07},
             "it1_best_layer": row | {"source": "it1 layer 1", "pnmi": 0.6269, "abx_across": 17.48},
             "it2_best_layer": row | {"source": "it2 layer 1", "pnmi": 0.6296, "abx_across": 17.24}}  # fmt: skip
    text = unit_table(table).splitlines()
    names = ["| MFCC", "| MFCC", "| it1 layer 1, untrained", "| it1 layer 1", "| it2 layer 1"]
    assert [line.split(" | ")[0] for line in text[2:]] == names
    verdicts = {goal.text: (goal.reached, goal.figures) for goal in goals(table, None)}
    abx = "it1 17.48 %, MFCC 20.19 %, it1 untrained 18.07 %"
    assert verdicts["ABX across speakers: it1 best layer below MFCC"] == (True, abx)
    control = "PNMI 0.6269 against 0.5847, ABX across 17.48 % against 18.07 %"
    assert verdicts["it1 best layer better than the same layer untrained"] == (True, control)
    table["it1_best_layer"]["abx_across"] = 18.5  # better units, worse ABX: not better
    assert not {g.text: g.reached for g in goals(table, None)}["it1 best layer better than the same layer untrained"]
    del table["it1_untrained"]
    assert "it1 best layer better than the same layer untrained" not in {g.text for g in goals(table, None)}


def test_the_pnmi_goals_show_each_gain_with_its_interval_over_the_valid_files():
    """The demo's seed 0 (2026-12-07): the ordering holds, by gains within the valid split's noise."""
    row = {"k": 500, "phone_purity": 0.5, "cluster_purity": 0.1, "abx_within": 1.0, "abx_across": 17.0}
    table = {"mfcc_at_k": row | {"source": "MFCC", "pnmi": 0.6268},
             "it1_untrained": row | {"source": "it1 layer 1, untrained", "pnmi": 0.5847, "abx_across": 18.07},
             "it1_best_layer": row | {"source": "it1 layer 1", "pnmi": 0.6269, "pnmi_gain_mfcc_at_k": 0.0014,
                                      "pnmi_gain_mfcc_at_k_low": -0.0041, "pnmi_gain_mfcc_at_k_high": 0.0069,
                                      "pnmi_gain_it1_untrained": 0.0457, "pnmi_gain_it1_untrained_low": 0.0384,
                                      "pnmi_gain_it1_untrained_high": 0.0530},
             "it2_best_layer": row | {"source": "it2 layer 1", "pnmi": 0.6296, "pnmi_gain_it1_best_layer": 0.0041,
                                      "pnmi_gain_it1_best_layer_low": -0.0001,
                                      "pnmi_gain_it1_best_layer_high": 0.0083}}  # fmt: skip
    verdicts = {goal.text: (goal.reached, goal.figures) for goal in goals(table, None)}
    ordering = ("it2 0.6296, it1 0.6269, MFCC 0.6268; it2 - it1 +0.0041 [-0.0001, +0.0083], it1 - MFCC +0.0014 "
                "[-0.0041, +0.0069] (gains bias-corrected, 95 % intervals, by the jackknife over the valid files; "
                "one across 0: level)")  # fmt: skip
    assert verdicts["PNMI at k=500: it2 best layer > it1 best layer > MFCC"] == (True, ordering)
    control = "PNMI 0.6269 against 0.5847, gain +0.0457 [+0.0384, +0.0530], ABX across 17.00 % against 18.07 %"
    assert verdicts["it1 best layer better than the same layer untrained"] == (True, control)
    assert "pnmi_gain_mfcc_at_k" not in unit_table(table)  # the table's columns stay the README's
    assert corrected_line(table) is None  # a table written before the bias-corrected PNMI
    for key, value in (("mfcc_at_k", 0.5737), ("it1_untrained", 0.5294), ("it1_best_layer", 0.5751)):
        table[key]["pnmi_corrected"] = value
    assert corrected_line(table) == (
        "PNMI at k=500 bias-corrected by the jackknife over the valid files (the table's plug-in PNMI, fairseq's, is "
        "too high on a small split): MFCC 0.5737, untrained 0.5294, it1 0.5751")  # fmt: skip


def _write_results(root, pnmi: float, layer: int) -> None:
    row = {"source": "MFCC", "k": 500, "pnmi": 0.6, "phone_purity": 0.5, "cluster_purity": 0.1, "abx_within": 1.0,
           "abx_across": 20.0}  # fmt: skip
    table = {"mfcc_at_k": row, "it1_best_layer": row | {"source": f"it1 layer {layer}", "pnmi": pnmi}}
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics" / "unit_quality.json").write_text(json.dumps(table))
    (root / "outputs" / "abx" / "it1").mkdir(parents=True, exist_ok=True)
    (root / "outputs" / "abx" / "it1" / "best_layer.json").write_text(json.dumps({"layer": layer}))


def test_summary_of_a_revision_reads_its_files_not_the_workspaces(tmp_path, monkeypatch):
    """`--rev` (a DVC experiment such as demo-long, or a commit) reads the results of that revision."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "params.yaml").write_text("mlflow:\n  tracking_uri: ''\n")
    _write_results(tmp_path, 0.654, layer=1)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "results"], check=True)
    _write_results(tmp_path, 0.321, layer=3)
    assert "| it1 layer 3 | 500 | 0.321 |" in summary(tmp_path)
    old = summary(tmp_path, rev="HEAD")
    assert "| it1 layer 1 | 500 | 0.654 |" in old
    assert "0.321" not in old
    assert "Unit quality of HEAD" in old
    cmd = [sys.executable, "-m", "hubert_pipeline.summary", "--root", str(tmp_path), "--rev", "ml5-s0"]
    unknown = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert unknown.returncode == 2
    assert "--rev ml5-s0: unknown Git revision 'ml5-s0'; the experiments here: uv run dvc exp list" in unknown.stderr
    assert "Traceback" not in unknown.stderr
