import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Generator
from pathlib import Path

import numpy as np
import pytest
import torch


def write_wav(path: Path, samples: np.ndarray, sample_rate: int = 16_000) -> Path:
    """Write int16 PCM; `samples` is (n,) for mono or (n, channels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(samples)
    channels = 1 if data.ndim == 1 else data.shape[1]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes((np.clip(data, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def tone(seconds: float, sample_rate: int = 16_000, freq: float = 220.0, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    noise = np.random.default_rng(seed).normal(0, 0.01, t.shape)
    return 0.3 * np.sin(2 * np.pi * freq * t) + noise


@pytest.fixture
def isolated_mlflow(tmp_path, monkeypatch):
    """An MLflow sqlite store of the test's own."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def one_thread() -> Generator[None]:
    """One torch thread for the test: on 2 shared cores, two threads make small float64 steps 5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SERVER_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "tracking_server.sh"


def server_available() -> str | None:
    """Why scripts/tracking_server.sh cannot run here (no PostgreSQL, or not root), else None."""
    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        return "no PostgreSQL (Debian's postgresql: bash run.sh setup)"
    if os.geteuid() != 0:
        return "not root (the database runs as the system user postgres)"
    return None


@contextlib.contextmanager
def tracking_server(artifacts: Path | None = None) -> Generator[tuple[str, Path]]:
    """An MLflow tracking server on PostgreSQL, on loopback, started and stopped by scripts/tracking_server.sh;
    yields its http:// URI and its folder (in /tmp: the system user postgres cannot enter pytest's tmp_path)."""
    if why := server_available():
        if os.environ.get("CI"):
            pytest.fail(f"the tracking-server tests need PostgreSQL and root: {why}")
        pytest.skip(why)
    data = Path(tempfile.mkdtemp(prefix="hubert-pipeline-mlflow-"))
    data.chmod(0o755)
    args = ["--data", str(data)] + (["--artifacts", str(artifacts)] if artifacts else [])
    out = subprocess.run(["bash", SERVER_SCRIPT, "start", *args], capture_output=True, text=True, check=False)
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        match = re.search(r"MLFLOW_TRACKING_URI=(\S+)", out.stdout)
        assert match, out.stdout
        yield match.group(1), data
    finally:
        subprocess.run(["bash", SERVER_SCRIPT, "stop", "--data", str(data)], check=False, capture_output=True)
        shutil.rmtree(data, ignore_errors=True)
