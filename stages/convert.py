"""Stages convert@<name>: convert one corpus of convert.corpora once to 16 kHz mono files (convert.format).

Off while convert.corpora is empty (DVC makes no stage); data.train / data.valid then name the outputs
(outputs/converted/<name>). The output persists across runs: a killed conversion resumes where it stopped.
"""

import time

import _checkout  # noqa: F401  first: the library of this checkout, not the editable install's

from hubert_pipeline.cli import parser, setup_logging

if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("corpus", help="folder or uncompressed tar of audio files (convert.extension)")
    p.add_argument("output", help="folder of the converted files: same sub-folders and file ids")
    args = p.parse_args()
    setup_logging()

    import mlflow

    from hubert_pipeline.params import load_params
    from hubert_pipeline.tracking import stage_run
    from hubert_pipeline.transcode import convert_corpus

    params = load_params(args.params)
    cfg = params.convert
    with stage_run("convert", mlflow_params=params.mlflow, params={"convert": cfg, "corpus": args.corpus}):
        start = time.perf_counter()
        report = convert_corpus(args.corpus, args.output, extensions=cfg.extensions, fmt=cfg.format,
                                execution=params.execution)  # fmt: skip
        elapsed = time.perf_counter() - start
        mlflow.log_metrics({"converted_files": report.converted, "skipped_files": report.skipped,
                            "converted_hours": report.seconds / 3600, "seconds": elapsed})  # fmt: skip
