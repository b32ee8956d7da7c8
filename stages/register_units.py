"""Stages register_units_it1 / register_units_it2: the iteration's unit encoder (its chosen checkpoint, the layer
chosen by ABX, the centroids fitted on that layer) registered in MLflow as one pyfunc model,
`models:/<validate.registered_model>-units@itN`, that `mlflow.pyfunc.load_model(...).predict` and
`mlflow models serve` turn audio into units with."""

import json
import os
from pathlib import Path

import _checkout  # noqa: F401  first: the library of this checkout, not the editable install's

from hubert_pipeline.cli import parser, setup_logging

if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--iteration", type=int, choices=(1, 2), required=True)
    p.add_argument("checkpoint", help="the iteration's model folder (it1: iteration2.teacher)")
    p.add_argument("layer_file", help="best_layer.json of the iteration's ABX stage")
    p.add_argument("centroids", help="centroids.safetensors fitted on that layer")
    p.add_argument("output", help="JSON of the registered version (name, alias, version, layer, digests)")
    args = p.parse_args()
    setup_logging()

    import mlflow

    from hubert_pipeline.io import write_json
    from hubert_pipeline.params import load_params
    from hubert_pipeline.tracking import stage_run
    from hubert_pipeline.unit_encoder import EncoderParts
    from hubert_pipeline.units_registry import register_units_model, units_model_name

    params = load_params(args.params)
    layer = int(json.loads(Path(args.layer_file).read_text())["layer"])
    if args.iteration == 1 and params.iteration2.layer:  # units_it2 uses this layer when it is set
        layer = params.iteration2.layer
    normalize = (params.train_it1 if args.iteration == 1 else params.train_it2).normalize
    parts = EncoderParts(args.checkpoint, layer, args.centroids, normalize)
    stage, alias = f"register_units_it{args.iteration}", f"it{args.iteration}"
    name = units_model_name(params.validate.registered_model)
    with stage_run(stage, mlflow_params=params.mlflow, iteration=args.iteration) as run:
        tags = {"iteration": str(args.iteration), "checkpoint": args.checkpoint, "run_id": run.info.run_id,
                "dvc_experiment": os.environ.get("DVC_EXP_NAME", "")}  # fmt: skip
        registered = register_units_model(parts, name=name, alias=alias, tags=tags)
        write_json(args.output, registered)
        mlflow.log_params({"layer": layer, "normalize": normalize, "registered_model": name})
        mlflow.set_tag("registered_model", f"{registered['uri']} (version {registered['version']})")
