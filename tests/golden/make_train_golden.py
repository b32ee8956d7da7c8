"""Golden values of the production trainer: 20 CPU steps of the tiny model on seeded synthetic audio.

`run_recipe(folder)` trains through `hubert_pipeline.train.train` (manifest, loader, collator, reseeding, DDP-free
step with 2 micro-batches, checkpointing, logging every step) and returns what tests/test_train_golden.py compares:
the per-step metrics and, for every tensor of the final model, its shape, sum, L2 norm and 8 values at fixed
positions, plus a SHA-256 of all the final weights' bytes (informative: equal means bit for bit the same run).

Regenerate ONLY on purpose, when the recipe (the training arithmetic) is meant to change, never to make a failing
test pass after a refactoring; say why in the commit and in NOTE below:

    OMP_NUM_THREADS=1 uv run python tests/golden/make_train_golden.py     # writes tests/golden/train_golden.json

NOTE: generated on CPU, torch 2.14.1 (uv.lock), one thread, from the trainer before its split into parts
(commit "golden values of the trainer, before its split").
"""

import dataclasses
import hashlib
import json
import sys
import tempfile
import wave
from pathlib import Path
from typing import Any

import numpy as np
import torch

GOLDEN = Path(__file__).with_name("train_golden.json")
NUM_CLASSES = 8
SAMPLE_POSITIONS = 8  # values per tensor kept, at evenly spaced flat positions


def write_wav(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


def make_manifest(folder: Path, n_files: int = 8) -> Path:
    """Tones whose pitch class is each frame's unit (learnable), 1-2.5 s long, seeded; 16-bit PCM, so exact."""
    from hubert_pipeline.units import model_frames

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_files):
        n = int((1.0 + 0.5 * (i % 4)) * 16_000)
        segments = rng.integers(0, NUM_CLASSES, size=max(1, n // 3200))
        per = -(-n // len(segments))
        phase = np.cumsum(2 * np.pi * np.repeat(200 + 100 * segments, per)[:n] / 16_000)
        path = folder / f"f{i:02d}.wav"
        write_wav(path, 0.4 * np.sin(phase) + rng.normal(0, 0.01, n))
        units = [int(segments[min(len(segments) - 1, (k * 320 + 200) // per)]) for k in range(model_frames(n))]
        rows.append({"fileid": path.stem, "path": str(path), "num_samples": n, "units": units})
    manifest = folder / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def recipe() -> Any:
    """The settings of the golden run: dropout on (reseeded per step), 2 micro-batches per step, clipping active."""
    from hubert_pipeline.params import TrainParams

    return TrainParams(
        max_steps=20,
        warmup_steps=5,
        lr=2e-3,
        grad_clip=1.0,
        max_batch_samples=2 * 32_000,
        min_sample_size=16_000,
        max_sample_size=32_000,
        num_buckets=2,
        accumulate=2,
        save_interval=10,
        log_interval=1,
        num_workers=0,
        mask_prob=0.5,
        mask_length=4,
    )


def tensor_summary(tensor: torch.Tensor) -> dict[str, Any]:
    flat = tensor.detach().double().flatten()
    positions = torch.linspace(0, flat.numel() - 1, min(SAMPLE_POSITIONS, flat.numel())).round().long()
    return {
        "shape": list(tensor.shape),
        "sum": float(flat.sum()),
        "norm": float(flat.norm()),
        "positions": positions.tolist(),
        "values": flat[positions].tolist(),
    }


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def run_recipe(folder: Path) -> dict[str, Any]:
    """Train the golden run in `folder`; its metrics per step and a summary of its final weights."""
    from hubert_pipeline.train import list_checkpoints, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reductions' order, hence the rounding, depends on the thread count
    try:
        cfg = recipe()
        metrics: dict[int, dict[str, float]] = {}
        train(
            make_manifest(folder),
            folder / "run",
            cfg=cfg,
            model_size="tiny",
            num_classes=NUM_CLASSES,
            log_fn=lambda logged, step: metrics.__setitem__(step, dict(logged)),
        )
    finally:
        torch.set_num_threads(threads)
    checkpoints = list_checkpoints(folder / "run")
    state = torch.load(checkpoints[-1][1], map_location="cpu", weights_only=True)["model"]
    keys = ("train_loss", "train_accuracy", "train_feature_penalty", "lr", "grad_norm")
    result = {
        "recipe": dataclasses.asdict(cfg) | {"model_size": "tiny", "num_classes": NUM_CLASSES},
        "torch": torch.__version__,
        "checkpoint_steps": [step for step, _ in checkpoints],
        "metrics": {key: [metrics[s][key] for s in sorted(metrics)] for key in keys},
        "weights_sha256": weights_digest(state),
        "weights": {key: tensor_summary(value) for key, value in state.items()},
    }
    return json.loads(json.dumps(result))  # as read back from the file (tuples as lists)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        golden = run_recipe(Path(tmp))
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
    losses = golden["metrics"]["train_loss"]
    print(f"wrote {GOLDEN}: {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}", file=sys.stderr)


if __name__ == "__main__":
    main()
