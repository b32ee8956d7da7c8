"""How fast iteration 1 learns on the demo's units, for a model / training setting: train, validate every checkpoint.

    uv run python bench/demo_learning.py mel15 --model '{"frontend": "log_mel"}' --train '{"lr": 1.5e-3}'

Runs the production `train()` and `validate_checkpoints()` (as the stages do) on `outputs/units/it1` of a project where
`dvc repro units_it1` has run; prints the valid loss and masked accuracy of every checkpoint beside the commonest-unit
rate, and appends them as one JSON line to `--results`.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from hubert_pipeline.params import TrainParams, ValidateParams, build
from hubert_pipeline.train import list_checkpoints, train
from hubert_pipeline.validate import validate_checkpoints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="a name for this run (its checkpoint folder under --out)")
    parser.add_argument("--units", type=Path, default=Path("outputs/units/it1"), help="train.jsonl and valid.jsonl")
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--model", default="{}", help="HubertConfig overrides, JSON")
    parser.add_argument(
        "--train", default="{}", help="TrainParams fields, JSON (default: 400 steps, a checkpoint per 100)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/demo_learning"))
    parser.add_argument("--results", type=Path, default=Path("outputs/bench/demo_learning.jsonl"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fields = {"max_steps": 400, "save_interval": 100, "num_workers": 0} | json.loads(args.train)
    cfg = build(TrainParams, fields, "--train")
    start = time.perf_counter()
    train(args.units / "train.jsonl", args.out / args.name, cfg=cfg, model_size=args.size,
          model_overrides=json.loads(args.model), num_classes=args.num_classes)  # fmt: skip
    seconds = time.perf_counter() - start
    scores = validate_checkpoints(args.units / "valid.jsonl", list_checkpoints(args.out / args.name),
                                  cfg=ValidateParams(), train_cfg=cfg)  # fmt: skip
    result = {"name": args.name, "train_seconds": round(seconds), "commonest_unit_rate": scores[0].commonest_rate,
              "valid": [(s.step, round(s.loss, 3), round(s.accuracy, 4)) for s in scores]}  # fmt: skip
    print(json.dumps(result))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a", encoding="utf-8") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
