"""params.yaml as frozen dataclasses: one per section, unknown or missing keys fail at once, naming the key.

`load_params()` reads the whole file; stages take the sections they need (`params.kmeans.k`). Lists become tuples,
ints are accepted where floats are declared, and `Literal` choices are checked.
"""

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin, get_type_hints

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(ValueError):
    """A key or value of params.yaml is wrong; the message names it."""


@dataclass(frozen=True)
class MlflowParams:
    experiment: str = "hubert-pipeline"
    tracking_uri: str = ""


@dataclass(frozen=True)
class SlurmParams:
    """Cluster settings for `execution.executor: slurm` (ready profiles: slurm/profiles/*.yaml)."""

    profile: str = ""  # a YAML file of these keys; its values replace the ones below
    conf: str = ""  # SLURM_CONF for the client commands (sbatch, squeue); empty: the system's
    account: str = ""
    partition: str = ""
    qos: str = ""
    constraint: str = ""
    time_minutes: int = 240  # per job; training checkpoints, requeues and resumes past it
    nodes: int = 1  # training job
    gpus_per_node: int = 0  # training: one task per GPU (NCCL); 0: CPU nodes, tasks_per_node tasks (gloo)
    tasks_per_node: int = 1  # training tasks per node when gpus_per_node is 0
    cpus_per_task: int = 4
    mem_gb: float = 16.0  # per node
    array_parallelism: int = 64  # array tasks (shards) running at once
    max_requeues: int = 5  # preemptions / time-outs a job may be requeued after
    signal_delay_s: int = 120  # SIGUSR2 this long before the time limit: checkpoint, requeue
    log_folder: str = "logs/slurm"  # submitit's job files and logs, one folder per stage
    setup: tuple[str, ...] = ()  # shell lines run before each job (module load, ...)
    additional: dict[str, Any] = dataclasses.field(default_factory=dict)  # other sbatch options
    poll_seconds: float = 5.0  # how often the stage checks its jobs


@dataclass(frozen=True)
class ExecutionParams:
    executor: Literal["local", "slurm"] = "local"
    workers: int = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    slurm: SlurmParams = SlurmParams()


@dataclass(frozen=True)
class DemoParams:
    seed: int = 0
    train_minutes: float = 40.0
    valid_minutes: float = 4.0
    abx_minutes: float = 4.0
    voices: tuple[str, ...] = ("kal", "ked", "slt")
    speeds: tuple[float, ...] = (0.9, 1.0, 1.12)
    text: str = ""
    room_rt60: tuple[float, ...] = ()  # (low, high) seconds, a random room per file; (): dry
    noise_snr_db: tuple[float, ...] = ()  # (low, high) dB of coloured noise per file; (): clean


@dataclass(frozen=True)
class DataParams:
    train: str = "data/demo/wav/train"
    valid: str = "data/demo/wav/valid"
    alignments: str = "data/demo/alignments"
    abx_items: str = "data/demo/abx.item"
    abx_audio: str = "data/demo/wav/abx"


@dataclass(frozen=True)
class ManifestParams:
    extension: str | tuple[str, ...] = ".wav"  # one extension or a list: [.flac, .wav]
    on_bad_file: Literal["fail", "skip"] = "fail"
    verify: Literal["header", "full"] = "header"  # full: decode every file, FLAC against its MD5 (header: WAV/FLAC
    # lengths from their headers, checked against the file)
    resample: bool = False  # files of other rates read at 16 kHz through FFmpeg's resampler (else refused)
    downmix: bool = False  # files of several channels read as mono through FFmpeg's downmix (else refused)

    @property
    def extensions(self) -> tuple[str, ...]:
        return (self.extension,) if isinstance(self.extension, str) else self.extension


@dataclass(frozen=True)
class ConvertParams:
    """The convert-once stages (`convert@<name>`, off while `corpora` is empty): each corpus folder or tar converted
    to 16 kHz mono files under outputs/converted/<name>, which data.train / data.valid then name."""

    corpora: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> folder or tar, e.g. {train: ...}
    extension: str | tuple[str, ...] = ".mp3"  # the files converted (Common Voice: .mp3)
    format: Literal["flac", "wav", "wav16"] = "flac"  # flac: 24-bit; wav: float32 (exact); wav16: 16-bit PCM

    @property
    def extensions(self) -> tuple[str, ...]:
        return (self.extension,) if isinstance(self.extension, str) else self.extension


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
    tol: float = 3e-4
    n_init: int = 3
    chunk_frames: int = 262_144


@dataclass(frozen=True)
class UnitsParams:
    length_tolerance: int = 2


@dataclass(frozen=True)
class ModelParams:
    size: Literal["tiny", "base", "large", "xlarge"] = "tiny"
    overrides: dict[str, Any] = dataclasses.field(
        default_factory=dict
    )  # HubertConfig fields, e.g. {encoder_layer_drop: 0}
    recipe: Literal["", "base", "large", "xlarge"] = ""  # the fairseq recipe followed (hubert_pipeline.presets)


@dataclass(frozen=True)
class TrainParams:
    """One pretraining iteration. Defaults are the demo's; fairseq names of the recipe values in comments."""

    max_steps: int = 400  # optimization.max_update (recipe: 250k it1, 400k it2)
    lr: float = 5e-4  # optimization.lr (Base)
    warmup_steps: int = 40  # lr_scheduler.warmup_updates (recipe 32k)
    weight_decay: float = 0.01  # optimizer.weight_decay
    betas: tuple[float, ...] = (0.9, 0.98)  # optimizer.adam_betas
    eps: float = 1e-6  # optimizer.adam_eps
    grad_clip: float = 10.0  # optimization.clip_norm
    feature_penalty: float = 10.0  # criterion.loss_weights (features_pen)
    max_batch_samples: int = 480_000  # samples per process per micro-batch (fairseq max_tokens 1.4M)
    accumulate: int = 1  # micro-batches per step (optimization.update_freq)
    min_sample_size: int = 32_000  # task.min_sample_size (2 s)
    max_sample_size: int = 250_000  # task.max_sample_size (15.6 s)
    num_buckets: int = 1000  # (fairseq orders by exact size: as many buckets as it takes)
    normalize: bool = False  # task.normalize (False for Base, True for Large)
    pad_audio: bool = False  # task.pad_audio: crop to the shortest file of the batch
    mask_prob: float = 0.8  # model.mask_prob
    mask_length: int = 10  # model.mask_length
    save_interval: int = 100  # checkpoint every N steps exactly (and at the last step)
    log_interval: int = 10
    seed: int = 0
    processes: int = 1  # local processes (DDP: gloo on CPU, NCCL on GPU)
    num_workers: int = 1  # data-loading workers per process
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"  # autocast dtype on CUDA; CPU trains in float32
    compile: bool = False  # torch.compile the model (inductor; on CPU too)
    init_from: str = ""  # iteration 2: start from this checkpoint (path or models:/ URI) instead of random weights
    resume_other_code: bool = False  # resume a run in the checkpoint folder written by other training code


@dataclass(frozen=True)
class ValidateParams:
    max_batch_samples: int = 480_000
    seed: int = 0
    rule: Literal["lowest_loss", "highest_accuracy", "last"] = "lowest_loss"
    registered_model: str = "hubert-pipeline"


@dataclass(frozen=True)
class AbxParams:
    rule: Literal["lowest_within", "lowest_across", "lowest_mean"] = "lowest_within"  # which layer feeds iteration 2


@dataclass(frozen=True)
class UnitQualityParams:
    every_layer: bool = False  # PNMI and purities of every layer of both models, not only of the layers ABX chose
    untrained: bool = True  # a row for iteration 1's initial weights at its chosen layer: what training added


@dataclass(frozen=True)
class Iteration2Params:
    teacher: str = "outputs/pretrain/it1/best"  # model whose layer makes the iteration-2 targets (folder or file)
    layer: int = 0  # 0: the layer chosen by ABX; else this layer (HuBERT Base recipe: 6)
    num_shards: int = 4
    dtype: Literal["float32", "float16"] = "float16"


@dataclass(frozen=True)
class Params:
    mlflow: MlflowParams = MlflowParams()
    execution: ExecutionParams = ExecutionParams()
    demo: DemoParams = DemoParams()
    data: DataParams = DataParams()
    manifest: ManifestParams = ManifestParams()
    convert: ConvertParams = ConvertParams()
    mfcc: MfccParams = MfccParams()
    kmeans: KmeansParams = KmeansParams()
    units: UnitsParams = UnitsParams()
    model: ModelParams = ModelParams()
    train_it1: TrainParams = TrainParams()
    train_it2: TrainParams = TrainParams()
    validate: ValidateParams = ValidateParams()
    abx: AbxParams = AbxParams()
    iteration2: Iteration2Params = Iteration2Params()
    unit_quality: UnitQualityParams = UnitQualityParams()


def _convert(value: Any, annotation: Any, where: str) -> Any:  # noqa: C901, PLR0911, PLR0912  one branch per type
    origin = get_origin(annotation)
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
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
        alternatives = [a for a in get_args(annotation) if a is not type(None)]
        for inner in alternatives[:-1]:  # the first alternative that takes the value; the last one's error
            try:
                return _convert(value, inner, where)
            except ParamsError:
                pass
        return _convert(value, alternatives[-1], where)
    if dataclasses.is_dataclass(annotation):
        return build(annotation, value, where)  # type: ignore[arg-type]
    if annotation is Any:
        return value
    if annotation is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and isinstance(value, bool):
        return value
    if annotation in (int, str) and isinstance(value, annotation) and not isinstance(value, bool):
        return value
    raise ParamsError(f"{where}: expected {getattr(annotation, '__name__', annotation)}, got {value!r}")


def build[T: "DataclassInstance"](cls: type[T], section: Any, where: str) -> T:
    """Build dataclass `cls` from a mapping, naming `where` (e.g. `params.yaml:kmeans.k`) in every error."""
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ParamsError(f"{where}: expected a mapping, got {section!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(section) - names):
        raise ParamsError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(names)}")
    kwargs = {key: _convert(value, hints[key], f"{where}.{key}") for key, value in section.items()}
    return cls(**kwargs)


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: no such params file")
    with path.open(encoding="utf-8") as f:
        import yaml  # here: the training step imports params without PyYAML

        raw = yaml.safe_load(f)
    params = build(Params, raw, str(path))
    if profile := params.execution.slurm.profile:
        params = _apply_profile(raw, Path(profile), str(path))
    validate(params, str(path))
    return params


def _apply_profile(raw: dict[str, Any], profile: Path, where: str) -> Params:
    """The values of a SLURM profile (slurm/profiles/*.yaml) replace those of `execution.slurm`."""
    if not profile.is_file():
        raise ParamsError(f"{where}: execution.slurm.profile: no such file {profile}")
    with profile.open(encoding="utf-8") as f:
        import yaml

        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ParamsError(f"{profile}: expected a mapping of execution.slurm keys")
    if "profile" in values:
        raise ParamsError(f"{profile}: a profile cannot name another profile")
    build(SlurmParams, values, str(profile))  # errors name the profile's keys
    execution = dict(raw.get("execution") or {})
    execution["slurm"] = dict(execution.get("slurm") or {}) | values
    return build(Params, raw | {"execution": execution}, where)


def _is_range(values: tuple[float, ...], low: float, high: float) -> bool:
    return not values or (len(values) == 2 and low <= values[0] <= values[1] <= high)  # noqa: PLR2004


def validate(params: Params, where: str) -> None:
    checks: list[tuple[bool, str]] = [
        (params.execution.workers >= 1, "execution.workers must be >= 1"),
        (params.execution.slurm.nodes >= 1, "execution.slurm.nodes must be >= 1"),
        (params.execution.slurm.gpus_per_node >= 0, "execution.slurm.gpus_per_node must be >= 0"),
        (params.execution.slurm.tasks_per_node >= 1, "execution.slurm.tasks_per_node must be >= 1"),
        (params.execution.slurm.cpus_per_task >= 1, "execution.slurm.cpus_per_task must be >= 1"),
        (params.execution.slurm.time_minutes >= 1, "execution.slurm.time_minutes must be >= 1"),
        (params.execution.slurm.array_parallelism >= 1, "execution.slurm.array_parallelism must be >= 1"),
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
        (_is_range(params.demo.room_rt60, 0.05, 2.0), "demo.room_rt60 must be [] or [low, high] in [0.05, 2] s"),
        (_is_range(params.demo.noise_snr_db, -10, 100), "demo.noise_snr_db must be [] or [low, high] in [-10, 100] dB"),
    ]
    checks += _extension_checks("manifest.extension", params.manifest.extensions)
    checks += _extension_checks("convert.extension", params.convert.extensions)
    for name in ("train_it1", "train_it2"):
        t: TrainParams = getattr(params, name)
        checks += [
            (t.max_steps >= 1, f"{name}.max_steps must be >= 1"),
            (0 <= t.warmup_steps < t.max_steps, f"{name}.warmup_steps must be in [0, max_steps)"),
            (t.save_interval >= 1, f"{name}.save_interval must be >= 1"),
            (t.log_interval >= 1, f"{name}.log_interval must be >= 1"),
            (t.processes >= 1, f"{name}.processes must be >= 1"),
            (t.accumulate >= 1, f"{name}.accumulate must be >= 1"),
            (len(t.betas) == 2, f"{name}.betas must have two values"),  # noqa: PLR2004
            (t.min_sample_size <= t.max_sample_size, f"{name}.min_sample_size must be <= max_sample_size"),
            (t.max_sample_size <= t.max_batch_samples, f"{name}.max_sample_size must be <= max_batch_samples"),
            (0 <= t.mask_prob <= 1, f"{name}.mask_prob must be in [0, 1]"),
        ]
    for ok, message in checks:
        if not ok:
            raise ParamsError(f"{where}: {message}")


def _extension_checks(key: str, extensions: tuple[str, ...]) -> list[tuple[bool, str]]:
    from hubert_pipeline.audio import AUDIO_EXTENSIONS

    known = ", ".join(AUDIO_EXTENSIONS)
    checks = [(len(extensions) > 0, f"{key} must name at least one extension")]
    for ext in extensions:
        checks += [
            (ext.startswith("."), f"{key} {ext!r} must start with '.'"),
            (ext.lower() in AUDIO_EXTENSIONS, f"{key} {ext!r} is not an audio extension ({known})"),
        ]
    return checks
