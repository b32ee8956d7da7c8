"""params.yaml as frozen dataclasses: one per section, unknown or missing keys fail at once, naming the key.

`load_params()` reads the whole file; stages take the sections they need (`params.kmeans.k`). Lists become tuples,
ints are accepted where floats are declared, and `Literal` choices are checked.
"""

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(ValueError):
    """A key or value of params.yaml is wrong; the message names it."""


@dataclass(frozen=True)
class MlflowParams:
    experiment: str = "hubert-pipeline"
    tracking_uri: str = ""


@dataclass(frozen=True)
class ExecutionParams:
    executor: Literal["local", "slurm"] = "local"
    workers: int = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass(frozen=True)
class DemoParams:
    seed: int = 0
    train_minutes: float = 40.0
    valid_minutes: float = 4.0
    abx_minutes: float = 4.0
    voices: tuple[str, ...] = ("kal", "ked", "slt")
    speeds: tuple[float, ...] = (0.9, 1.0, 1.12)
    text: str = ""


@dataclass(frozen=True)
class DataParams:
    train: str = "data/demo/wav/train"
    valid: str = "data/demo/wav/valid"
    alignments: str = "data/demo/alignments"
    abx_items: str = "data/demo/abx.item"
    abx_audio: str = "data/demo/wav/abx"


@dataclass(frozen=True)
class ManifestParams:
    extension: str = ".wav"
    on_bad_file: Literal["fail", "skip"] = "fail"


@dataclass(frozen=True)
class MfccParams:
    num_shards: int = 8
    dtype: Literal["float32", "float16"] = "float32"
    batch_seconds: float = 60.0


@dataclass(frozen=True)
class KmeansParams:
    k: int = 500  # iteration 2
    k_it1: int = 100
    fit_fraction: float = 0.1
    seed: int = 0
    max_iter: int = 100
    tol: float = 1e-4
    n_init: int = 3
    chunk_frames: int = 262_144


@dataclass(frozen=True)
class UnitsParams:
    length_tolerance: int = 2


@dataclass(frozen=True)
class Params:
    mlflow: MlflowParams = MlflowParams()
    execution: ExecutionParams = ExecutionParams()
    demo: DemoParams = DemoParams()
    data: DataParams = DataParams()
    manifest: ManifestParams = ManifestParams()
    mfcc: MfccParams = MfccParams()
    kmeans: KmeansParams = KmeansParams()
    units: UnitsParams = UnitsParams()


def _convert(value: Any, annotation: Any, where: str) -> Any:  # noqa: PLR0911
    origin = get_origin(annotation)
    if origin is Literal:
        if value not in get_args(annotation):
            raise ParamsError(f"{where}: {value!r} is not one of {list(get_args(annotation))}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ParamsError(f"{where}: expected a list, got {value!r}")
        (item_type, _) = get_args(annotation)
        return tuple(_convert(v, item_type, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in get_args(annotation):
            return None
        (inner,) = (a for a in get_args(annotation) if a is not type(None))
        return _convert(value, inner, where)
    if dataclasses.is_dataclass(annotation):
        return build(annotation, value, where)  # type: ignore[arg-type]
    if annotation is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and isinstance(value, bool):
        return value
    if annotation in (int, str) and isinstance(value, annotation) and not isinstance(value, bool):
        return value
    raise ParamsError(f"{where}: expected {getattr(annotation, '__name__', annotation)}, got {value!r}")


def build[T](cls: type[T], section: Any, where: str) -> T:
    """Build dataclass `cls` from a mapping, naming `where` (e.g. `params.yaml:kmeans.k`) in every error."""
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ParamsError(f"{where}: expected a mapping, got {section!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if unknown := sorted(set(section) - names):
        raise ParamsError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(names)}")
    kwargs = {key: _convert(value, hints[key], f"{where}.{key}") for key, value in section.items()}
    return cls(**kwargs)


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: no such params file")
    with path.open(encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    params = build(Params, raw, str(path))
    validate(params, str(path))
    return params


def validate(params: Params, where: str) -> None:
    checks: list[tuple[bool, str]] = [
        (params.execution.workers >= 1, "execution.workers must be >= 1"),
        (params.mfcc.num_shards >= 1, "mfcc.num_shards must be >= 1"),
        (params.mfcc.batch_seconds > 0, "mfcc.batch_seconds must be > 0"),
        (params.kmeans.k >= 1, "kmeans.k must be >= 1"),
        (params.kmeans.k_it1 >= 1, "kmeans.k_it1 must be >= 1"),
        (0 < params.kmeans.fit_fraction <= 1, "kmeans.fit_fraction must be in (0, 1]"),
        (params.kmeans.max_iter >= 1, "kmeans.max_iter must be >= 1"),
        (params.kmeans.n_init >= 1, "kmeans.n_init must be >= 1"),
        (params.kmeans.chunk_frames >= 1, "kmeans.chunk_frames must be >= 1"),
        (params.units.length_tolerance >= 0, "units.length_tolerance must be >= 0"),
        (params.demo.train_minutes > 0, "demo.train_minutes must be > 0"),
        (len(params.demo.voices) > 0, "demo.voices must not be empty"),
        (all(s > 0 for s in params.demo.speeds), "demo.speeds must be > 0"),
        (params.manifest.extension.startswith("."), "manifest.extension must start with '.'"),
    ]
    for ok, message in checks:
        if not ok:
            raise ParamsError(f"{where}: {message}")
