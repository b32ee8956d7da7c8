"""K-means on a feature store: k-means++ on a sample, then chunked Lloyd iterations, on CPU or CUDA.

Replaces the recipes' sklearn MiniBatchKMeans fitted on CPU after loading every frame in RAM and saved with joblib
(pickle): the fit streams chunks from the store when the fit set is larger than a few chunks, runs on CUDA when there is
one, and the centroids are a safetensors file.

Algorithm (deterministic for a given seed on CPU):
1. fit set: the files `store.sample_fileids(fit_fraction, seed=seed)` (recipe: 10 % of the training files);
2. init: a seeded sample of `init_sample_size(k)` frames; on it, `n_init` greedy k-means++ runs (sklearn's: 2 + ln k
   candidates per centre), each refined by at most INIT_MAX_ITER Lloyd iterations on the sample alone; the best by
   sample inertia is kept (ranking refined inits is more telling than ranking raw ones, and the refined init saves
   iterations on the whole set, which cost the most);
3. Lloyd iterations on every fit frame until the relative inertia improvement falls below `tol` (or `max_iter`):
   assignment by argmin of ||c||² - 2 x·c (a matmul per block of frames), centres from sums accumulated in float64
   across blocks (`index_add_`), an empty cluster re-seeded with the frame farthest from its centre.

Memory: a fit set of at most IN_MEMORY_CHUNKS x chunk_frames frames is loaded once onto the device; a larger one is
streamed from the store (memory-mapped shards) chunk by chunk at every iteration, so memory stays bounded by
`chunk_frames` whatever the size of the store. Frames are centred on the mean of the init sample, which keeps the
float32 expansion of squared distances accurate.

    python -m hubert_pipeline.kmeans features/mfcc kmeans-it1.safetensors --k 100 --fit-fraction 0.1
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and numpy are imported inside functions so that `--help` is instant
    from collections.abc import Callable, Iterator

    import numpy as np
    import torch

    from hubert_pipeline.store import FeatureStore

logger = logging.getLogger(__name__)

IN_MEMORY_CHUNKS = 4  # a fit set of at most this many chunks is held on the device; a larger one is streamed
INIT_SAMPLE_MIN = 30_000  # frames of the init sample: sklearn MiniBatchKMeans's init_size (3 x batch 10,000) ...
INIT_SAMPLE_PER_CLUSTER = 100  # ... or this many per cluster if more: a smaller sample overfits (lower inertia on
# the sample than on the whole set), so that more Lloyd iterations on the whole set are needed afterwards
INIT_MAX_ITER = 20  # Lloyd iterations on the init sample at most, per init: enough to rank the inits
BLOCK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 27}  # (frames x k) scores computed at once: cache-sized on CPU
FORMAT = "hubert_pipeline.kmeans/1"


@dataclass(frozen=True)
class KMeansResult:
    centroids: torch.Tensor  # (k, dim) float32, CPU
    inertia: float  # mean squared distance of a fit frame to its nearest centroid
    n_iter: int  # Lloyd iterations (centroid updates) on the whole fit set
    num_frames: int  # frames fitted on
    num_files: int


def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA if available, else CPU; any torch device string otherwise ('cpu', 'cuda', 'cuda:1')."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu' or 'cuda'") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available here: use 'cpu' or 'auto'")
    return resolved


def init_sample_size(k: int) -> int:
    return max(INIT_SAMPLE_MIN, INIT_SAMPLE_PER_CLUSTER * k)


def _check_arguments(*, k: int, fit_fraction: float, max_iter: int, tol: float, n_init: int, chunk_frames: int) -> None:
    checks = {
        "k": (k, k >= 1, ">= 1"),
        "fit_fraction": (fit_fraction, 0 < fit_fraction <= 1, "in (0, 1]"),
        "max_iter": (max_iter, max_iter >= 1, ">= 1"),
        "tol": (tol, tol >= 0, ">= 0"),
        "n_init": (n_init, n_init >= 1, ">= 1"),
        "chunk_frames": (chunk_frames, chunk_frames >= 1, ">= 1"),
    }
    for name, (value, ok, expected) in checks.items():
        if not ok:
            raise ValueError(f"kmeans.{name} must be {expected}, got {value!r}")


class _FitFrames:
    """The fit frames, shifted by `shift`, as blocks on the device: held in memory or streamed from the store."""

    def __init__(
        self, store: FeatureStore, fileids: list[str], *, num_frames: int, chunk_frames: int, device: torch.device
    ) -> None:
        import torch

        self.store, self.fileids, self.chunk_frames, self.device = store, fileids, chunk_frames, device
        self.shift = torch.zeros(store.meta.dim, device=device)
        self.frames: torch.Tensor | None = None  # (num_frames, dim) when held on the device
        if num_frames <= IN_MEMORY_CHUNKS * chunk_frames:
            self.frames = torch.cat(list(self._stream()))

    def _stream(self) -> Iterator[torch.Tensor]:
        import torch

        for chunk in self.store.iter_chunks(self.fileids, chunk_frames=self.chunk_frames):
            yield torch.from_numpy(chunk).to(self.device)

    def chunks(self) -> Iterator[torch.Tensor]:
        """Shifted (frames, dim) chunks covering every fit frame, always in the same order."""
        if self.frames is not None:
            yield from self.frames.split(self.chunk_frames)
        else:
            for chunk in self._stream():
                yield chunk - self.shift

    def gather(self, rows: np.ndarray) -> torch.Tensor:
        """The frames at sorted global row indices `rows`, unshifted, as one (len(rows), dim) tensor."""
        import numpy as np
        import torch

        if self.frames is not None:
            return self.frames[torch.from_numpy(rows).to(self.device)] + self.shift
        parts, start = [], 0
        for chunk in self.chunks():
            lo, hi = np.searchsorted(rows, [start, start + len(chunk)])
            parts.append(chunk[torch.from_numpy(rows[lo:hi] - start).to(self.device)] + self.shift)
            start += len(chunk)
        return torch.cat(parts)

    def set_shift(self, shift: torch.Tensor) -> None:
        """Subtract `shift` (a mean) from every frame: distances are unchanged, float32 cancellation much smaller."""
        if self.frames is not None:
            self.frames -= shift - self.shift
        self.shift = shift.clone()


def _blocks(chunks: Iterator[torch.Tensor], block: int) -> Iterator[torch.Tensor]:
    for chunk in chunks:
        yield from chunk.split(block)


@dataclass
class _Pass:
    """Statistics of one assignment pass over the fit frames."""

    sums: torch.Tensor  # (k, dim) float64
    counts: torch.Tensor  # (k,) int64
    sse: float  # sum of squared distances to the nearest centroid
    num_frames: int
    farthest: torch.Tensor  # (<= k, dim) the frames farthest from their centroid, farthest first


def _assignment_pass(blocks: Iterator[torch.Tensor], centroids: torch.Tensor) -> _Pass:
    import torch

    k, dim = centroids.shape
    norms = (centroids * centroids).sum(1)  # (k,)
    sums = torch.zeros(k, dim, dtype=torch.float64, device=centroids.device)
    counts = torch.zeros(k, dtype=torch.int64, device=centroids.device)
    sse = torch.zeros((), dtype=torch.float64, device=centroids.device)
    far_dist = torch.empty(0, device=centroids.device)
    far_rows = torch.empty(0, dim, device=centroids.device)
    num_frames = 0
    for x in blocks:  # (n, dim)
        scores, labels = torch.addmm(norms, x, centroids.T, alpha=-2).min(1)  # (n,) min of ||c||² - 2 x·c
        dist = scores.add_((x * x).sum(1)).clamp_(min=0)  # (n,) squared distances (frames are centred: accurate)
        sse += dist.sum(dtype=torch.float64)
        sums += torch.zeros_like(centroids).index_add_(0, labels, x)  # float32 within a block, float64 across blocks
        counts += torch.bincount(labels, minlength=k)
        top = dist.topk(min(k, len(dist)))
        far_dist, order = torch.cat([far_dist, top.values]).topk(min(k, len(far_dist) + len(top.values)))
        far_rows = torch.cat([far_rows, x[top.indices]])[order]
        num_frames += len(x)
    return _Pass(sums, counts, float(sse), num_frames, far_rows)


def _update(stats: _Pass) -> torch.Tensor:
    import torch

    centroids = (stats.sums / stats.counts.clamp(min=1).unsqueeze(1)).float()
    empty = torch.nonzero(stats.counts == 0).squeeze(1)
    if len(empty):
        logger.warning("%d empty cluster(s) re-seeded with the farthest frames", len(empty))
        centroids[empty] = stats.farthest[: len(empty)]
    return centroids


def _lloyd(
    chunks: Callable[[], Iterator[torch.Tensor]],
    centroids: torch.Tensor,
    *,
    block: int,
    max_iter: int,
    tol: float,
    desc: str | None,
) -> tuple[torch.Tensor, float, int]:
    """Lloyd iterations until the relative inertia improvement is below `tol`; return centroids, inertia, updates.

    The returned inertia is that of the returned centroids (the last pass assigns, it does not update).
    """
    from tqdm import tqdm

    previous = math.inf
    with tqdm(total=max_iter, desc=desc, unit="it", disable=desc is None) as bar:
        for iteration in range(max_iter + 1):
            stats = _assignment_pass(_blocks(chunks(), block), centroids)
            inertia = stats.sse / stats.num_frames
            (logger.info if desc else logger.debug)("k-means iteration %d: inertia %.6g", iteration, inertia)
            if previous - inertia <= tol * inertia or iteration == max_iter:
                return centroids, inertia, iteration
            centroids = _update(stats)
            previous = inertia
            bar.set_postfix(inertia=f"{inertia:.5g}")
            bar.update()
    raise AssertionError  # unreachable: the loop always returns


def _kmeans_plusplus(x: torch.Tensor, k: int, rng: np.random.Generator) -> torch.Tensor:
    """Greedy k-means++ (Arthur & Vassilvitskii; sklearn's variant): each centre is the best of 2 + ln k candidates."""
    import torch

    num, trials = len(x), 2 + int(math.log(k))
    norms = (x * x).sum(1)  # (num,)

    def sqdist(rows: torch.Tensor) -> torch.Tensor:  # (len(rows), num) squared distances of the frames `rows`
        return torch.addmm(norms, x[rows], x.T, alpha=-2).add_(norms[rows].unsqueeze(1)).clamp_(min=0)

    first = torch.tensor([int(rng.integers(num))], device=x.device)
    chosen = [first]
    closest = sqdist(first).squeeze(0)  # (num,) squared distance to the nearest chosen centre
    uniforms = torch.from_numpy(rng.random((k - 1, trials))).to(x.device)  # drawn at once: no device sync per centre
    for c in range(k - 1):
        cumulative = closest.double().cumsum(0)
        candidates = torch.searchsorted(cumulative, uniforms[c] * cumulative[-1], right=True).clamp_(max=num - 1)
        potentials = torch.minimum(closest, sqdist(candidates))  # (trials, num)
        best = potentials.sum(1).argmin()
        closest = potentials[best]
        chosen.append(candidates[best].unsqueeze(0))
    return x[torch.cat(chosen)]


def fit_kmeans(
    store: FeatureStore | str | Path,
    *,
    k: int,
    fit_fraction: float,
    seed: int,
    max_iter: int,
    tol: float,
    n_init: int,
    chunk_frames: int,
    device: str = "auto",
) -> KMeansResult:
    """Fit k centroids on a seeded fraction of the store's files (see the module docstring for the algorithm)."""
    import numpy as np

    _check_arguments(
        k=k, fit_fraction=fit_fraction, max_iter=max_iter, tol=tol, n_init=n_init, chunk_frames=chunk_frames
    )
    if isinstance(store, str | Path):
        from hubert_pipeline.store import FeatureStore as Store

        store = Store(store)
    target = resolve_device(device)
    if len(store) == 0 or store.meta.num_frames == 0:
        raise ValueError(
            f"{store.root}: the feature store is empty ({len(store)} files, {store.meta.num_frames} frames)"
        )
    fileids = store.sample_fileids(fit_fraction, seed=seed)
    lengths = dict(zip(store.index["fileid"].to_list(), store.index["length"].to_list(), strict=True))
    num_frames = sum(lengths[f] for f in fileids)
    if k > num_frames:
        raise ValueError(
            f"k={k} clusters but only {num_frames} frames to fit them on ({len(fileids)} of the {len(store)} files of "
            f"{store.root}, fit_fraction={fit_fraction}): raise kmeans.fit_fraction or lower kmeans.k"
        )
    data = _FitFrames(store, fileids, num_frames=num_frames, chunk_frames=chunk_frames, device=target)
    logger.info(
        "k-means: k=%d on %d frames of %d files of %s (dim %d), on %s, %s",
        k,
        num_frames,
        len(fileids),
        store.root,
        store.meta.dim,
        target,
        "streamed" if data.frames is None else "in memory",
    )
    block = max(1024, BLOCK_ELEMENTS.get(target.type, BLOCK_ELEMENTS["cuda"]) // k)

    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(num_frames, size=min(num_frames, init_sample_size(k)), replace=False))
    sample = data.gather(rows)  # (m, dim)
    shift = sample.double().mean(0).float()
    data.set_shift(shift)
    sample -= shift
    best: tuple[torch.Tensor, float] | None = None
    for run in range(n_init):
        init = _kmeans_plusplus(sample, k, rng)
        init, inertia, _ = _lloyd(
            lambda: iter((sample,)), init, block=block, max_iter=min(max_iter, INIT_MAX_ITER), tol=tol, desc=None
        )
        logger.info("k-means++ init %d/%d: inertia %.6g on the %d-frame sample", run + 1, n_init, inertia, len(sample))
        if best is None or inertia < best[1]:
            best = (init, inertia)
    assert best is not None
    centroids, inertia, n_iter = _lloyd(data.chunks, best[0], block=block, max_iter=max_iter, tol=tol, desc="k-means")
    logger.info("k-means: inertia %.6g after %d iterations", inertia, n_iter)
    return KMeansResult((centroids + shift).cpu(), inertia, n_iter, num_frames, len(fileids))


def save_centroids(path: str | Path, result: KMeansResult, metadata: dict[str, str] | None = None) -> None:
    """Write the centroids as a safetensors file (tensor `centroids`), with the fit statistics as string metadata."""
    from safetensors.torch import save_file

    from hubert_pipeline.io import atomic_path

    k, dim = result.centroids.shape
    ours = {
        "format": FORMAT,
        "inertia": repr(result.inertia),
        "k": str(k),
        "dim": str(dim),
        "n_iter": str(result.n_iter),
        "num_frames": str(result.num_frames),
        "num_files": str(result.num_files),
    }
    extra = dict(metadata or {})
    for key, value in extra.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"{path}: metadata must map strings to strings, got {key!r}: {value!r}")
        if key in ours:
            raise ValueError(f"{path}: metadata key {key!r} is reserved for the fit statistics {sorted(ours)}")
    with atomic_path(path) as tmp:
        save_file({"centroids": result.centroids.float().contiguous().cpu()}, tmp, metadata=extra | ours)


def _open_centroids(path: str | Path) -> tuple[torch.Tensor, dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no k-means centroids file there")
    try:
        with safe_open(path, framework="pt") as f:
            if "centroids" not in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                raise ValueError(f"{path}: no tensor 'centroids' in this safetensors file (it has {list(f.keys())})")
            return f.get_tensor("centroids"), f.metadata() or {}
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file of k-means centroids ({e})") from e


def load_centroids(path: str | Path, *, dim: int | None = None) -> torch.Tensor:
    """The (k, dim) float32 centroids saved by `save_centroids`; `dim`, if given, must match."""
    centroids, _ = _open_centroids(path)
    if centroids.ndim != 2:  # noqa: PLR2004
        raise ValueError(f"{path}: centroids have shape {tuple(centroids.shape)}, expected (k, dim)")
    if dim is not None and centroids.shape[1] != dim:
        raise ValueError(f"{path}: centroids have dim {centroids.shape[1]} but the features have dim {dim}")
    return centroids.float()


def load_centroids_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata saved with the centroids (inertia, k, dim, n_iter, ... and the caller's own keys)."""
    return _open_centroids(path)[1]


def predict(features: torch.Tensor | np.ndarray, centroids: torch.Tensor, *, chunk_frames: int = 65536) -> torch.Tensor:
    """Index (int64) of the nearest centroid of each row of `features` (frames, dim).

    Runs on the device of `features` if it is a tensor (the result stays there), on that of `centroids` otherwise.
    """
    import numpy as np
    import torch

    if features.ndim != 2 or centroids.ndim != 2:  # noqa: PLR2004
        raise ValueError(
            f"expected features (frames, dim) and centroids (k, dim), "
            f"got {tuple(features.shape)} and {tuple(centroids.shape)}"
        )
    if features.shape[1] != centroids.shape[1]:
        raise ValueError(f"features have dim {features.shape[1]} but the centroids have dim {centroids.shape[1]}")
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    device = features.device if isinstance(features, torch.Tensor) else centroids.device
    centroids = centroids.to(device, torch.float32)
    shift = centroids.mean(0)  # distances are shift-invariant; centring reduces float32 cancellation
    centroids = centroids - shift
    norms = (centroids * centroids).sum(1)
    labels = torch.empty(len(features), dtype=torch.int64, device=device)
    for start in range(0, len(features), chunk_frames):
        chunk = features[start : start + chunk_frames]
        if isinstance(chunk, np.ndarray):  # a copy: store arrays are read-only memory maps, maybe float16
            chunk = torch.from_numpy(np.array(chunk, dtype=np.float32))
        x = chunk.to(device, torch.float32) - shift
        labels[start : start + len(x)] = torch.addmm(norms, x, centroids.T, alpha=-2).argmin(1)
    return labels


def main() -> None:
    import argparse

    from hubert_pipeline.params import KmeansParams

    defaults = KmeansParams()
    parser = argparse.ArgumentParser(
        prog="python -m hubert_pipeline.kmeans",
        description="Fit k-means on a feature store and write the centroids as safetensors.",
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("store", type=Path, help="feature store folder (written by the features stage)")
    parser.add_argument("output", type=Path, help="centroids file to write (.safetensors)")
    parser.add_argument("--k", type=int, required=True, help="number of clusters (recipe: 100 on MFCC, 500 on layers)")
    parser.add_argument("--fit-fraction", type=float, default=defaults.fit_fraction, help="fraction of files fitted on")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the file sample and the init")
    parser.add_argument("--max-iter", type=int, default=defaults.max_iter, help="Lloyd iterations at most")
    parser.add_argument("--tol", type=float, default=defaults.tol, help="stop below this relative inertia improvement")
    parser.add_argument("--n-init", type=int, default=defaults.n_init, help="k-means++ initialisations")
    parser.add_argument("--chunk-frames", type=int, default=defaults.chunk_frames, help="frames per chunk (memory)")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from hubert_pipeline.store import FeatureStore, IncompleteStoreError

    try:
        result = fit_kmeans(
            FeatureStore(args.store),
            k=args.k,
            fit_fraction=args.fit_fraction,
            seed=args.seed,
            max_iter=args.max_iter,
            tol=args.tol,
            n_init=args.n_init,
            chunk_frames=args.chunk_frames,
            device=args.device,
        )
    except (ValueError, IncompleteStoreError) as e:  # bad input: the message says what to change, no traceback
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    save_centroids(
        args.output, result, {"store": str(args.store), "fit_fraction": str(args.fit_fraction), "seed": str(args.seed)}
    )
    print(
        f"{args.output}: k={args.k}, inertia {result.inertia:.6g}, "
        f"{result.n_iter} iterations, {result.num_frames} frames"
    )


if __name__ == "__main__":
    main()
