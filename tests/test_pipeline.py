"""End to end: the real dvc.yaml in a temporary git repo, the whole pipeline on a tiny demo corpus, real MLflow."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import polars as pl
import pytest
import torch
import yaml
from mlflow.entities import Run
from test_experiments import TINY as REDUCED_TINY
from test_experiments import reduced_project

REPO = Path(__file__).resolve().parents[1]
STAGES = [
    "demo_corpus", "manifest", "mfcc", "kmeans_it1", "units_it1", "pretrain_it1", "validate_it1", "abx_it1",
    "features_it2", "kmeans_it2", "register_units_it1", "units_it2", "pretrain_it2", "validate_it2", "abx_it2",
    "unit_quality", "register_units_it2",
]  # fmt: skip
IT2_STAGES = ["kmeans_it2", "register_units_it1", "units_it2", "pretrain_it2", "validate_it2", "abx_it2",
              "unit_quality", "register_units_it2"]  # fmt: skip
TINY = {
    "demo": {"train_minutes": 1.5, "valid_minutes": 0.3, "abx_minutes": 0.3},
    "mfcc": {"num_shards": 3},
    "kmeans": {"k_it1": 20, "k": 30, "n_init": 1, "fit_fraction": 0.5},
    "train_it1": {"max_steps": 6, "warmup_steps": 2, "save_interval": 3, "log_interval": 2, "num_workers": 0},
    "train_it2": {"max_steps": 4, "warmup_steps": 1, "save_interval": 2, "log_interval": 2, "num_workers": 0},
    "iteration2": {"num_shards": 2},
    "unit_quality": {"every_layer": True},
}


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    for folder in ("stages", "src"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "mlruns").mkdir()  # the checkout's tracked folder, not a developer's store in it
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], root)
    run(["dvc", "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], root)
    run(["dvc", "repro", "pretrain_it2"], root)
    run(["dvc", "repro"], root)
    return root


@pytest.mark.slow
def test_units_match_manifests_one_to_one_at_the_model_frame_rate(project):
    from hubert_pipeline.units import model_frames

    for split in ("train", "valid"):
        manifest = pl.read_csv(project / "outputs" / "manifests" / f"{split}.csv")
        units = pl.read_ndjson(project / "outputs" / "units" / "it1" / f"{split}.jsonl")
        assert units["fileid"].to_list() == manifest["fileid"].to_list()
        for n, u in zip(units["num_samples"], units["units"], strict=True):
            assert len(u) == model_frames(n)
            assert min(u) >= 0
            assert max(u) < TINY["kmeans"]["k_it1"]


@pytest.mark.slow
def test_second_repro_runs_no_stage(project):
    out = run(["dvc", "repro"], project).stdout
    assert "Running stage" not in out
    assert "up to date" in out


@pytest.mark.slow
def test_dvc_metrics_show_lists_pnmi_and_inertia(project):
    out = json.loads(run(["dvc", "metrics", "show", "--json"], project).stdout)
    data = out[""]["data"]
    units = data["metrics/units_it1.json"]["data"]
    assert 0 < units["valid"]["pnmi"] < 1
    assert 0 < units["train"]["phone_purity"] <= 1
    assert data["outputs/kmeans/it1/metrics.json"]["data"]["k"] == TINY["kmeans"]["k_it1"]


@pytest.mark.slow
def test_mlflow_holds_one_tagged_run_per_stage_with_its_metrics(project):
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlruns/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["hubert-pipeline"], output_format="list")
    by_stage = {r.data.tags["stage"]: r for r in runs}
    assert sorted(by_stage) == sorted(STAGES)
    assert len(runs) == len(STAGES)
    assert by_stage["kmeans_it1"].data.metrics["inertia"] > 0
    assert by_stage["kmeans_it1"].data.params["kmeans.k_it1"] == "20"
    assert by_stage["units_it1"].data.tags["iteration"] == "1"
    assert 0 < by_stage["units_it1"].data.metrics["valid_pnmi"] < 1
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(by_stage["kmeans_it1"].info.run_id)}
    assert {"centroids.safetensors", "metrics.json"} <= artifacts
    lengths = pl.read_ndjson(project / "outputs" / "units" / "it1" / "train.jsonl")["num_samples"]
    short = int((lengths < yaml.safe_load((project / "params.yaml").read_text())["train_it1"]["min_sample_size"]).sum())
    pretrain = by_stage["pretrain_it1"]
    assert pretrain.data.metrics["short_files"] == short  # files that never train: counted, and listed
    listed = {a.path for a in mlflow.MlflowClient().list_artifacts(pretrain.info.run_id)}
    assert ("short_files.csv" in listed) == (short > 0)


@pytest.mark.slow
def test_both_iterations_are_registered_and_load_from_the_registry(project):
    from hubert_pipeline.model import HuBERT

    mlflow.set_tracking_uri(f"sqlite:///{project}/mlruns/mlflow.db")
    model = mlflow.MlflowClient().get_registered_model("hubert-pipeline")
    assert set(model.aliases) == {"it1", "it2"}
    version = mlflow.MlflowClient().get_model_version_by_alias("hubert-pipeline", "it1")
    best = json.loads((project / "metrics" / "validate_it1.json").read_text())
    assert version.tags["step"] == str(best["best_step"])
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{project}/mlruns/mlflow.db"
    try:
        loaded = HuBERT.from_pretrained("models:/hubert-pipeline@it1")
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    local = HuBERT.from_pretrained(project / "outputs" / "pretrain" / "it1" / "best")
    for (name, a), (_, b) in zip(loaded.state_dict().items(), local.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def dataset_inputs(run_id: str) -> list:
    inputs = mlflow.MlflowClient().get_run(run_id).inputs
    assert inputs is not None
    return inputs.dataset_inputs


def runs_by_stage(project: Path) -> dict[str, Run]:
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlruns/mlflow.db")
    return {
        r.data.tags["stage"]: r for r in mlflow.search_runs(experiment_names=["hubert-pipeline"], output_format="list")
    }


@pytest.mark.slow
def test_every_run_is_tagged_with_the_hashes_dvc_lock_records_for_the_data_it_read(project):
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    for stage, run in runs_by_stage(project).items():
        recorded = {d["path"]: d["md5"] for d in lock[stage]["deps"] if not d["path"].startswith(("src/", "stages/"))}
        tagged = {k.removeprefix("dvc_dep/"): v for k, v in run.data.tags.items() if k.startswith("dvc_dep/")}
        assert tagged == recorded, stage


@pytest.mark.slow
def test_runs_that_read_the_manifests_log_them_as_train_and_valid_datasets_digested_by_dvc(project):
    runs = runs_by_stage(project)
    both = ["outputs/manifests/train.csv", "outputs/manifests/valid.csv"]
    read = {"mfcc": both, "units_it1": both, "units_it2": both, "unit_quality": both,
            "features_it2": both[:1], "kmeans_it1": []}  # fmt: skip
    for it in (1, 2):
        read |= {f"pretrain_it{it}": [f"outputs/units/it{it}/train.jsonl"],
                 f"validate_it{it}": [f"outputs/units/it{it}/valid.jsonl"]}  # fmt: skip
    for stage, files in read.items():
        inputs = dataset_inputs(runs[stage].info.run_id)
        logged = {(i.dataset.name, i.dataset.digest) for i in inputs}
        expected = {(Path(f).stem, hashlib.md5((project / f).read_bytes()).hexdigest()) for f in files}
        assert logged == expected, stage


@pytest.mark.slow
def test_a_unit_file_traces_back_to_its_audio_kmeans_and_teacher_checkpoint_in_mlflow(project):
    runs = runs_by_stage(project)
    ids = {stage: run.info.run_id for stage, run in runs.items()}
    units = runs["units_it2"].data.tags
    assert units["upstream/manifest"] == ids["manifest"]  # the audio: data/demo hashed by DVC, probed there
    assert units["upstream/kmeans_it2"] == ids["kmeans_it2"]
    assert units["upstream/validate_it1"] == ids["validate_it1"]  # the teacher, registered as @it1
    client = mlflow.MlflowClient()
    for it in (1, 2):
        version = client.get_model_version_by_alias("hubert-pipeline", f"it{it}")
        best = json.loads((project / "metrics" / f"validate_it{it}.json").read_text())["best_step"]
        assert version.run_id == ids[f"validate_it{it}"]
        assert version.tags["checkpoint"] == f"outputs/pretrain/it{it}/checkpoints/step_{best:08d}.pt"
        assert version.tags["train_run_id"] == ids[f"pretrain_it{it}"]
        assert version.tags["kmeans_run_id"] == ids[f"kmeans_it{it}"]
        assert version.tags["units_run_id"] == ids[f"units_it{it}"]
        outs = yaml.safe_load((project / "dvc.lock").read_text())["stages"][f"units_it{it}"]["outs"]
        assert version.tags["units"] == next(o["md5"] for o in outs if o["path"] == f"outputs/units/it{it}")


@pytest.mark.slow
def test_each_iterations_unit_encoder_is_registered_and_gives_the_pipelines_units(project, tmp_path, monkeypatch):
    from hubert_pipeline.encode import encode
    from hubert_pipeline.params import ExecutionParams
    from hubert_pipeline.units import read_units

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project}/mlruns/mlflow.db")
    cpu = ExecutionParams(workers=1, device="cpu")
    valid = project / "outputs" / "manifests" / "valid.csv"
    encode(valid, tmp_path / "it1", model="models:/hubert-pipeline-units@it1", execution=cpu)
    rows = [json.loads(line) for line in (tmp_path / "it1" / "units.jsonl").read_text().splitlines()]
    assert {r["fileid"]: r["units"] for r in rows} == {  # iteration 1's encoder makes iteration 2's targets
        fid: u.tolist() for fid, u in read_units(project / "outputs" / "units" / "it2" / "valid.jsonl").items()
    }
    encode(valid, tmp_path / "it2", model="models:/hubert-pipeline-units@it2", execution=cpu)
    rows = [json.loads(line) for line in (tmp_path / "it2" / "units.jsonl").read_text().splitlines()]
    assert {r["fileid"]: r["units"] for r in rows} == {  # iteration 2's: unit_quality's it2 units
        fid: u.tolist() for fid, u in read_units(project / "outputs" / "unit_quality" / "valid.jsonl").items()
    }
    for it in (1, 2):
        registered = json.loads((project / "outputs" / "registered" / f"units_it{it}.json").read_text())
        assert registered["uri"] == f"models:/hubert-pipeline-units@it{it}"
        meta = json.loads((tmp_path / f"it{it}" / "meta.json").read_text())
        assert meta["provenance"]["model_version"]["version"] == registered["version"]
        assert meta["provenance"]["centroids_sha256"] == registered["centroids_sha256"]


@pytest.mark.slow
def test_abx_per_layer_is_a_metric_and_a_png_and_feeds_iteration_two(project):
    scores = json.loads((project / "outputs" / "abx" / "it1" / "scores.json").read_text())
    layers = [k for k in scores if k.startswith("layer_")]
    assert len(layers) == 4  # tiny model
    assert 0 <= scores["mfcc"]["within"] <= 100
    best = json.loads((project / "outputs" / "abx" / "it1" / "best_layer.json").read_text())["layer"]
    assert scores["best_layer"] == best
    assert min(scores[k]["within"] for k in layers) == scores[f"layer_{best}"]["within"]
    for png in ("outputs/abx/it1/abx.png", "plots/validate_it1.png", "plots/validate_it2.png"):
        assert (project / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_unit_quality_table_compares_mfcc_and_both_iterations_beside_abx(project):
    from hubert_pipeline.layer_quality import gain_units
    from hubert_pipeline.model import HuBERT
    from hubert_pipeline.unit_metrics import pnmi_corrected, pnmi_gain, read_alignments
    from hubert_pipeline.units import read_units

    table = json.loads((project / "metrics" / "unit_quality.json").read_text())
    assert sorted(table) == ["it1_best_layer", "it1_untrained", "it2_best_layer", "mfcc", "mfcc_at_k"]
    best = {it: json.loads((project / "outputs" / "abx" / it / "best_layer.json").read_text())["layer"]
            for it in ("it1", "it2")}  # fmt: skip
    assert table["it1_best_layer"]["source"] == f"it1 layer {best['it1']}"
    assert table["mfcc"]["k"] == TINY["kmeans"]["k_it1"]
    assert table["mfcc_at_k"]["k"] == table["it1_best_layer"]["k"] == TINY["kmeans"]["k"]  # compared at equal k
    assert table["mfcc_at_k"]["pnmi"] != table["mfcc"]["pnmi"]
    assert table["it2_best_layer"]["k"] == TINY["kmeans"]["k"]
    units_it2 = json.loads((project / "metrics" / "units_it2.json").read_text())["valid"]
    assert table["it1_best_layer"]["pnmi"] == units_it2["pnmi"]
    for row in table.values():
        assert 0 < row["pnmi"] < 1
        assert 0 < row["cluster_purity"] <= 1
        assert 0 <= row["abx_within"] <= 100
    mfcc_abx = json.loads((project / "outputs" / "abx" / "it1" / "scores.json").read_text())["mfcc"]["within"]
    assert table["mfcc"]["abx_within"] == mfcc_abx
    # the untrained control: iteration 1's initial weights at iteration 1's layer, scored as that layer is
    assert table["it1_untrained"]["source"] == f"it1 layer {best['it1']}, untrained"
    assert table["it1_untrained"]["k"] == TINY["kmeans"]["k"]
    assert table["it1_untrained"]["pnmi"] != table["it1_best_layer"]["pnmi"]
    untrained = HuBERT.from_pretrained(project / "outputs" / "unit_quality" / "untrained" / "model")
    trained = HuBERT.from_pretrained(project / "outputs" / "pretrain" / "it1" / "best")
    assert untrained.config == trained.config
    assert not torch.equal(untrained.state_dict()["encoder.layers.0.attention.qkv.weight"],
                           trained.state_dict()["encoder.layers.0.attention.qkv.weight"])  # fmt: skip
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlruns/mlflow.db")
    (run_,) = mlflow.search_runs(experiment_names=["hubert-pipeline"], output_format="list",
                                 filter_string="tags.stage = 'unit_quality'")  # fmt: skip
    assert run_.data.metrics["it2_best_layer_pnmi"] == table["it2_best_layer"]["pnmi"]
    history = mlflow.MlflowClient().get_metric_history(run_.info.run_id, "units_pnmi")  # one curve: 0 MFCC, 1, 2
    rows = ("mfcc_at_k", "it1_best_layer", "it2_best_layer")
    assert sorted((m.step, m.value) for m in history) == [(step, table[row]["pnmi"]) for step, row in enumerate(rows)]
    # each comparison's PNMI gain (the rows' PNMI difference, bias-corrected) and its jackknife interval
    alignments = read_alignments(project / "data" / "demo" / "alignments" / "valid.jsonl")
    units = gain_units(project / "outputs" / "unit_quality", project / "outputs" / "units" / "it2")
    for row, other in (("it1_best_layer", "mfcc_at_k"), ("it1_best_layer", "it1_untrained"),
                       ("it2_best_layer", "it1_best_layer")):  # fmt: skip
        gain, low, high = (table[row][f"pnmi_gain_{other}{end}"] for end in ("", "_low", "_high"))
        scored = pnmi_gain(read_units(units[row]), read_units(units[other]), alignments)  # of the units the rows score
        assert scored["plug_in"] == pytest.approx(table[row]["pnmi"] - table[other]["pnmi"], abs=1e-12)
        assert (gain, low, high) == (scored["gain"], scored["low"], scored["high"])
        assert low < gain < high
        assert run_.data.metrics[f"{row}_pnmi_gain_{other}_low"] == low
    assert "units_pnmi_gain_mfcc_at_k" not in run_.data.metrics  # the units_* curves: the table's columns only
    for row, path in units.items():  # each row's PNMI corrected for its small-sample bias, of the row's own units
        assert table[row]["pnmi_corrected"] == pnmi_corrected(read_units(path), alignments)["pnmi"]
        assert table[row]["pnmi_corrected"] < table[row]["pnmi"]  # 30 units on the tiny valid split: too high
    assert "pnmi_corrected" not in table["mfcc"]  # k_it1's units: no row of equal k to compare with


@pytest.mark.slow
def test_every_layer_of_both_models_is_scored_beside_its_abx_as_the_pipeline_scores_its_units(project):
    from hubert_pipeline.layer_quality import layer_quality
    from hubert_pipeline.params import load_params

    layers = json.loads((project / "outputs" / "unit_quality" / "layers.json").read_text())
    table = json.loads((project / "metrics" / "unit_quality.json").read_text())
    assert layers["k"] == TINY["kmeans"]["k"]
    for it in ("it1", "it2"):
        scores = json.loads((project / "outputs" / "abx" / it / "scores.json").read_text())
        rows = layers[it]
        assert list(rows) == ["1", "2", "3", "4"]  # the tiny model's layers
        assert [layer for layer, row in rows.items() if row["chosen"]] == [str(scores["best_layer"])]
        assert rows[str(scores["best_layer"])]["pnmi"] == table[f"{it}_best_layer"]["pnmi"]
        for layer, row in rows.items():
            assert 0 < row["pnmi"] < 1
            assert 0 < row["phone_purity"] <= 1
            assert row["abx_within"] == scores[f"layer_{layer}"]["within"]
        assert len({row["pnmi"] for row in rows.values()}) > 1  # each layer its own k-means
    # a layer scored on its own is the pipeline's: iteration 1's chosen layer as features_it2, kmeans_it2, units_it2
    params = load_params(project / "params.yaml")
    best = json.loads((project / "outputs" / "abx" / "it1" / "best_layer.json").read_text())["layer"]
    old = Path.cwd()
    try:
        os.chdir(project)  # the params' relative paths (alignments)
        quality = layer_quality("outputs/pretrain/it1/best", best, normalize=False, manifests=Path("outputs/manifests"),
                                work=project / "again", params=params)  # fmt: skip
    finally:
        os.chdir(old)
    assert quality["pnmi"] == table["it1_best_layer"]["pnmi"]
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlruns/mlflow.db")
    (run_,) = mlflow.search_runs(experiment_names=["hubert-pipeline"], output_format="list",
                                 filter_string="tags.stage = 'unit_quality'")  # fmt: skip
    history = mlflow.MlflowClient().get_metric_history(run_.info.run_id, "layers_it2_pnmi")  # x = layer
    assert sorted((m.step, m.value) for m in history) == [(int(k), row["pnmi"]) for k, row in layers["it2"].items()]


@pytest.mark.slow
def test_the_summary_shows_the_unit_table_each_iterations_best_and_the_mlflow_command(project):
    from hubert_pipeline.summary import summary

    text = summary(project)
    table = json.loads((project / "metrics" / "unit_quality.json").read_text())
    it1 = table["it1_best_layer"]
    assert f"| {it1['source']} | {it1['k']} | {it1['pnmi']:.3f} |" in text
    assert f"| MFCC | {TINY['kmeans']['k']} |" in text
    validation = json.loads((project / "metrics" / "validate_it1.json").read_text())
    assert f"iteration 1: best checkpoint step {validation['best_step']}" in text
    assert "PNMI at k=30: it2 best layer > it1 best layer > MFCC" in text
    assert "Every layer at k=30" in text  # unit_quality.every_layer
    assert "PNMI at k=30, each model's layer of the highest PNMI: it2 > it1 > MFCC" in text
    corrected = (
        f"MFCC {table['mfcc_at_k']['pnmi_corrected']:.4f}, untrained {table['it1_untrained']['pnmi_corrected']:.4f}"
    )
    assert "PNMI at k=30 bias-corrected by the jackknife over the valid files" in text
    assert corrected in text
    assert f"sqlite:///{project.resolve()}/mlruns/mlflow.db" in text


@pytest.mark.slow
def test_reference_curves_read_every_step_of_both_iterations_from_mlflow(project, tmp_path):
    from hubert_pipeline.curves import band, collect, plot

    table = collect(f"sqlite:///{project}/mlruns/mlflow.db", "hubert-pipeline", {"a": "", "b": ""})
    train_steps = table.filter((pl.col("run") == "a") & (pl.col("kind") == "pretrain") & (pl.col("iteration") == 1))
    assert train_steps["step"].to_list() == [2, 4, 6]  # TINY: 6 steps, log_interval 2
    bands = band(table)
    assert set(bands["runs"].to_list()) == {2}
    assert (bands["loss_min"] == bands["loss_max"]).all()  # the same run twice: a band of zero width
    plot(bands, tmp_path / "curves.png", "test")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_the_same_seeds_give_the_same_unit_quality_table_when_everything_after_the_mfcc_units_reruns(project):
    before = (project / "metrics" / "unit_quality.json").read_text()
    shutil.rmtree(project / "outputs" / "pretrain")  # checkpoints persist across runs: start both iterations afresh
    run(["dvc", "repro", "--force", "--downstream", "pretrain_it1"], project)
    assert (project / "metrics" / "unit_quality.json").read_text() == before


@pytest.mark.slow
def test_exp_run_with_another_k_reruns_only_iteration_two_and_is_tagged_in_mlflow(project):
    out = run(["dvc", "exp", "run", "-n", "k-twelve", "-S", "kmeans.k=12"], project).stdout
    ran = set(re.findall(r"Running stage '(\w+)'", out))
    assert ran == set(IT2_STAGES), out[-2000:]
    units = pl.read_ndjson(project / "outputs" / "units" / "it2" / "train.jsonl")
    assert max(max(u) for u in units["units"]) < 12
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlruns/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["hubert-pipeline"], output_format="list",
                              filter_string="tags.dvc_experiment = 'k-twelve'")  # fmt: skip
    assert {r.data.tags["stage"] for r in runs} == set(IT2_STAGES)
    shown = run(["dvc", "exp", "show", "--json"], project).stdout
    assert "k-twelve" in shown


@pytest.mark.slow
def test_a_teacher_layer_set_in_params_is_the_it1_row_of_the_unit_table_and_of_the_summary(project):
    from hubert_pipeline.summary import summary

    abx = json.loads((project / "outputs" / "abx" / "it1" / "scores.json").read_text())
    layer = 2 if abx["best_layer"] == 1 else 1  # not the layer ABX chose
    out = run(["dvc", "exp", "run", "-n", "teacher-layer", "-S", f"iteration2.layer={layer}"], project).stdout
    assert "features_it2" in set(re.findall(r"Running stage '(\w+)'", out))
    table = json.loads((project / "metrics" / "unit_quality.json").read_text())
    it1 = table["it1_best_layer"]
    assert it1["source"] == f"it1 layer {layer}"  # was ABX's layer: the units of another layer were scored
    assert (it1["abx_within"], it1["abx_across"]) == (abx[f"layer_{layer}"]["within"], abx[f"layer_{layer}"]["across"])
    assert it1["pnmi"] == json.loads((project / "metrics" / "units_it2.json").read_text())["valid"]["pnmi"]
    rows = json.loads((project / "outputs" / "unit_quality" / "layers.json").read_text())["it1"]
    assert [key for key, row in rows.items() if row["chosen"]] == [str(layer)]
    assert rows[str(layer)]["pnmi"] == it1["pnmi"]
    assert json.loads((project / "outputs" / "registered" / "units_it1.json").read_text())["layer"] == layer
    text = summary(project)
    assert f"best layer {abx['best_layer']} by ABX, iteration 2's units from layer {layer} (iteration2.layer)" in text


def no_alignments(params_yaml: Path) -> None:
    params = yaml.safe_load(params_yaml.read_text())
    params["data"]["alignments"] = ""  # params.yaml: "empty: no unit metrics"
    params_yaml.write_text(yaml.safe_dump(params, sort_keys=False))


def test_the_pipeline_parses_and_lists_every_stage_with_empty_alignments(tmp_path):
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    no_alignments(tmp_path / "params.yaml")
    run(["git", "init", "-q"], tmp_path)
    run(["dvc", "init", "-q"], tmp_path)
    listed = run(["dvc", "stage", "list", "--name-only"], tmp_path).stdout.split()  # DVC failed here: an empty dep
    assert sorted(listed) == sorted(STAGES)


@pytest.mark.slow
def test_units_stage_without_alignments_writes_units_and_no_unit_metrics(tmp_path):
    tiny = REDUCED_TINY | {"data": REDUCED_TINY["data"] | {"alignments": ""}}
    root = reduced_project(tmp_path / "p", ("manifest", "mfcc", "kmeans_it1", "units_it1"), tiny)
    run(["dvc", "repro"], root)
    metrics = json.loads((root / "metrics" / "units_it1.json").read_text())
    counts = {"train": 4, "valid": 2}
    assert metrics == {split: {"files": n, "length_adjusted_files": 0} for split, n in counts.items()}
    assert len(pl.read_ndjson(root / "outputs" / "units" / "it1" / "valid.jsonl")) == 2


@pytest.mark.slow
def test_without_alignments_the_whole_pipeline_reruns_its_unit_stages_and_reports_abx_only(project):
    before = (project / "params.yaml").read_text()
    no_alignments(project / "params.yaml")
    try:
        out = run(["dvc", "repro"], project).stdout
        ran = set(re.findall(r"Running stage '(\w+)'", out))
        # register_units_it2 only if unit_quality's it2 centroids (made with or without alignments) changed
        assert (
            {"units_it1", "units_it2", "unit_quality"}
            <= ran
            <= {"units_it1", "units_it2", "unit_quality", "register_units_it2"}
        ), out
        table = json.loads((project / "metrics" / "unit_quality.json").read_text())
        for row in table.values():
            assert row["pnmi"] is None
            assert 0 <= row["abx_across"] <= 100
        summary = json.loads((project / "metrics" / "summary.json").read_text())
        assert sorted(summary) == ["abx1", "abx2", "acc1", "acc2", "loss1", "loss2"]
    finally:
        (project / "params.yaml").write_text(before)


@pytest.mark.slow
def test_killed_pretraining_resumes_from_its_last_checkpoint_on_the_next_repro(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train_it1"].update({"max_steps": 30, "save_interval": 3})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    folder = project / "outputs" / "pretrain" / "it1" / "checkpoints"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    proc = subprocess.Popen(["dvc", "repro", "pretrain_it1"], cwd=project, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 600
    while not (folder / "step_00000012.pt").exists():
        assert proc.poll() is None, "dvc repro ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint of step 12 in 10 minutes"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9 of dvc and the training process
    proc.wait()
    killed_at = max(int(p.stem.removeprefix("step_")) for p in folder.glob("step_*.pt"))
    assert killed_at < 30
    result = run(["dvc", "repro", "pretrain_it1"], project)
    assert f"resuming from outputs/pretrain/it1/checkpoints/step_{killed_at:08d}.pt" in result.stderr
    assert (folder / "step_00000030.pt").is_file()
    assert not list(folder.glob(".*.tmp"))  # no half-written checkpoint left behind
