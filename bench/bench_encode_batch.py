"""Benchmark: `hubert-encode --batch-seconds S` (files sorted by length, in zero-padded batches) vs one by one.

On the demo corpus's valid split (synthesized with festival unless `--corpus` is given) and on the same audio cut
into short files (`--piece-seconds`), the production code runs as `hubert-encode` runs it: chunks of `--chunk-files`
files in file-id order, each forwarded file by file (`UnitEncoder.units`, S = 0) or in the batches of
`encode.length_batches` (`UnitEncoder.units_batch`). Printed per corpus and S: throughput in audio seconds per second
of the model forwards and the nearest-centroid search (audio read beforehand; best of `--repeats`, runs interleaved),
its ratio to one-by-one's in the same run, the padded audio over the real audio, and the fraction of frames whose
unit equals the one-by-one unit (the features differ by float rounding only: a unit flips where a frame is nearly
equidistant from two centroids).

    uv run python bench/bench_encode_batch.py     # tiny log-mel model (the demo's) of random weights, k=500 on it
    uv run python bench/bench_encode_batch.py --corpus data/demo/wav/valid --model models:/hubert-pipeline-units@it2
    uv run python bench/bench_encode_batch.py --size base --frontend conv --files 6 --repeats 1

Without `--model`, a seeded random model of `--size` / `--frontend` is saved and `--k` centroids are fitted
(`kmeans.fit_kmeans`, the k-means stage's defaults) on its layer `--layer` outputs over the corpus.
"""

import argparse
import contextlib
import tempfile
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import numpy as np
import torch

from hubert_pipeline.audio import SAMPLE_RATE, AudioSource, load_audio
from hubert_pipeline.compat import save_native
from hubert_pipeline.demo import synthesize_demo
from hubert_pipeline.encode import length_batches, list_inputs
from hubert_pipeline.kmeans import fit_kmeans, save_centroids
from hubert_pipeline.model import HuBERT, HubertConfig
from hubert_pipeline.params import DemoParams, KmeansParams
from hubert_pipeline.store import finalize_store, write_shard
from hubert_pipeline.unit_encoder import FRAME_RATE, EncoderParts, UnitEncoder, layer_output, open_parts


def read_corpus(folder: Path) -> list[torch.Tensor]:
    """The waveforms of a folder's WAV files, in file-id order (as `hubert-encode` lists them)."""
    items = list_inputs(folder, extensions=(".wav",), resample=False, downmix=False)
    return [load_audio(AudioSource(**item["source"])) for item in items]


def cut(waveforms: list[torch.Tensor], low: float, high: float, seed: int = 0) -> list[torch.Tensor]:
    """Every waveform cut into consecutive pieces of seeded random lengths in [low, high] seconds."""
    rng, pieces = np.random.default_rng(seed), []
    for waveform in waveforms:
        start = 0
        while len(waveform) - start >= low * SAMPLE_RATE:
            size = int(rng.uniform(low, high) * SAMPLE_RATE)
            pieces.append(waveform[start : start + size])
            start += size
    return pieces


def random_parts(folder: Path, waveforms: list[torch.Tensor], args: argparse.Namespace) -> EncoderParts:
    """A seeded random model, and k-means centroids fitted on its layer outputs over `waveforms`."""
    torch.manual_seed(0)
    model = HuBERT(HubertConfig.preset(args.size, frontend=args.frontend)).eval()
    save_native(model, folder / "checkpoint")
    features = ((f"{i:06d}", layer_output(model, w, args.layer, normalize=False).numpy())
                for i, w in enumerate(waveforms))  # fmt: skip
    dim = model.config.encoder_embed_dim
    write_shard(folder / "store", 0, features, dtype="float32", dim=dim)
    finalize_store(folder / "store", num_shards=1, dim=dim, dtype="float32", frame_rate=FRAME_RATE)
    k = KmeansParams()
    result = fit_kmeans(folder / "store", k=args.k, fit_fraction=1.0, seed=k.seed, max_iter=k.max_iter, tol=k.tol,
                        n_init=k.n_init, chunk_frames=k.chunk_frames, device="cpu")  # fmt: skip
    save_centroids(folder / "centroids.safetensors", result)
    return EncoderParts(str(folder / "checkpoint"), args.layer, str(folder / "centroids.safetensors"))


def encode_all(encoder: UnitEncoder, waveforms: list[torch.Tensor], batch_seconds: float, chunk_files: int) -> list:
    """Units of every waveform, chunk by chunk, batched as `hubert-encode --batch-seconds` batches them."""
    units: list = []
    for start in range(0, len(waveforms), chunk_files):
        chunk, found = waveforms[start : start + chunk_files], {}
        for batch in length_batches([len(w) for w in chunk], batch_seconds):
            found |= dict(zip(batch, encoder.units_batch([chunk[i] for i in batch]), strict=True))
        units += [found[i] for i in range(len(chunk))]
    return units


def padding(waveforms: list[torch.Tensor], batch_seconds: float, chunk_files: int) -> float:
    """Padded audio forwarded over the real audio."""
    padded = 0
    for start in range(0, len(waveforms), chunk_files):
        lengths = [len(w) for w in waveforms[start : start + chunk_files]]
        padded += sum(len(b) * max(lengths[i] for i in b) for b in length_batches(lengths, batch_seconds))
    return padded / sum(len(w) for w in waveforms)


def measure(encoder: UnitEncoder, waveforms: list[torch.Tensor], args: argparse.Namespace) -> Iterator[str]:
    """Table rows for one corpus: one-by-one, then each S."""
    settings, best, units = [0.0, *args.seconds], {}, {}
    for _ in range(args.repeats):
        for s in settings:  # interleaved: the machine's speed drifts
            start = time.perf_counter()
            units[s] = encode_all(encoder, waveforms, s, args.chunk_files)
            best[s] = min(best.get(s, float("inf")), time.perf_counter() - start)
    audio = sum(len(w) for w in waveforms) / SAMPLE_RATE
    reference = np.concatenate(units[0.0])
    for s in settings:
        differ = int((np.concatenate(units[s]) != reference).sum())
        yield (f"| {s:g} | {audio / best[s]:.3g} | {best[0.0] / best[s]:.2f}x | "
               f"{padding(waveforms, s, args.chunk_files):.3f} | {100 * (1 - differ / len(reference)):.3f} % "
               f"({differ} of {len(reference)} differ) |")  # fmt: skip


@contextlib.contextmanager
def encoder_parts(args: argparse.Namespace, work: Path, waveforms: list[torch.Tensor]) -> Generator[EncoderParts]:
    if args.model:
        with open_parts(args.model, layer=args.layer if args.centroids else None, centroids=args.centroids) as found:
            yield found[0]
    else:
        yield random_parts(work, waveforms, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("--corpus", type=Path, help="a folder of 16 kHz WAV files (default: synthesize the demo's)")
    parser.add_argument("--minutes", type=float, default=4.0, help="minutes of the synthesized valid split")
    parser.add_argument("--files", type=int, default=0, help="only the first N files of the corpus; 0: all")
    parser.add_argument("--piece-seconds", type=float, nargs="*", default=[0.5, 2.0],
                        help="low high: the corpus also cut into files this long; none: not")  # fmt: skip
    parser.add_argument("--seconds", type=float, nargs="+", default=[16.0, 64.0], help="S of --batch-seconds")
    parser.add_argument("--model", help="units model or checkpoint (with --layer, --centroids); default: random")
    parser.add_argument("--centroids", help="centroids of --model")
    parser.add_argument("--layer", type=int, default=2, help="layer (1-based)")
    parser.add_argument("--size", default="tiny", help="random model's size")
    parser.add_argument("--frontend", choices=("conv", "log_mel"), default="log_mel", help="random model's front end")
    parser.add_argument("--k", type=int, default=500, help="centroids fitted for the random model")
    parser.add_argument("--chunk-files", type=int, default=100, help="hubert-encode's --chunk-files")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-encode-") as tmp:
        work = Path(tmp)
        if args.corpus is None:
            params = DemoParams(train_minutes=0.0, valid_minutes=args.minutes, abx_minutes=0.0)
            synthesize_demo(work / "demo", params, workers=2)
        corpus = read_corpus(args.corpus or work / "demo" / "wav" / "valid")[: args.files or None]
        corpora = {"as is": corpus}
        if pieces := args.piece_seconds:
            corpora[f"cut into {pieces[0]:g}-{pieces[1]:g} s"] = cut(corpus, *pieces)
        with encoder_parts(args, work, corpus) as parts:
            encoder = UnitEncoder.load(parts)
            print(f"model {args.model or f'random {args.size} {args.frontend}'}, layer {parts.layer}, k={encoder.k}, "
                  f"{args.threads} thread(s), best of {args.repeats}")  # fmt: skip
            for name, waveforms in corpora.items():
                lengths = [len(w) / SAMPLE_RATE for w in waveforms]
                print(f"\n{name}: {len(waveforms)} files, {sum(lengths) / 60:.1f} min, "
                      f"{min(lengths):.2f}-{max(lengths):.2f} s (median {np.median(lengths):.2f})")  # fmt: skip
                print("| S (s) | audio s / s | vs one by one | padded / real audio | units equal to one by one |")
                print("| --- | --- | --- | --- | --- |")
                for row in measure(encoder, waveforms, args):
                    print(row)


if __name__ == "__main__":
    main()
