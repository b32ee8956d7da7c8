"""Stage demo_corpus: synthesize the demo corpus (wav/, alignments/, abx.item) with festival."""

import time

import _checkout  # noqa: F401  first: the library of this checkout, not the editable install's

from hubert_pipeline.cli import parser, setup_logging

if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("output", help="corpus folder")
    args = p.parse_args()
    setup_logging()

    import mlflow

    from hubert_pipeline.demo import synthesize_demo
    from hubert_pipeline.params import load_params
    from hubert_pipeline.tracking import stage_run

    params = load_params(args.params)
    with stage_run("demo_corpus", mlflow_params=params.mlflow, params={"demo": params.demo}):
        start = time.perf_counter()
        summary = synthesize_demo(args.output, params.demo, workers=params.execution.workers)
        mlflow.log_metric("seconds", time.perf_counter() - start)
        mlflow.log_dict(summary, "summary.json")
