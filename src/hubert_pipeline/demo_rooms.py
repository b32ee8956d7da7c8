"""Recording conditions of the demo corpus (`demo.room_rt60`, `demo.noise_snr_db`): per file, a synthetic room,
coloured noise at a random SNR and a random level, drawn from a generator seeded by (demo seed, file id), so the
same parameters give the same files whatever the order of synthesis (`hubert_pipeline.demo`)."""

import hashlib
import math
from typing import TYPE_CHECKING

from hubert_pipeline.audio import SAMPLE_RATE
from hubert_pipeline.params import DemoParams

if TYPE_CHECKING:
    import numpy as np


def file_rng(seed: int, fileid: str) -> "np.random.Generator":
    """The generator of one file's condition, seeded by (demo seed, file id) alone."""
    import numpy as np

    digest = hashlib.sha256(f"{seed}/{fileid}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _fft_filter(x: "np.ndarray", response: "np.ndarray") -> "np.ndarray":
    """Linear convolution of `x` with `response`, cut to the length of `x` (the FFT way)."""
    import numpy as np

    n = x.size + response.size - 1
    return np.fft.irfft(np.fft.rfft(x, n) * np.fft.rfft(response, n), n)[: x.size]


def room_response(rng: "np.random.Generator", rt60: float) -> "np.ndarray":
    """A synthetic room: the direct sound at sample 0, then a diffuse tail decaying 60 dB in `rt60` seconds.

    The tail is Gaussian noise under an exponential envelope, starting 2-5 ms after the direct sound, low-passed by a
    random one-pole filter (walls absorb the highs), with a direct-to-reverberant ratio of 3-15 dB.
    """
    import numpy as np

    delay = int(rng.uniform(0.002, 0.005) * SAMPLE_RATE)
    t = np.arange(int(rt60 * SAMPLE_RATE)) / SAMPLE_RATE
    a = rng.uniform(0.2, 0.7)
    tail = _fft_filter(rng.standard_normal(t.size) * 10 ** (-3 * t / rt60), (1 - a) * a ** np.arange(64))
    tail *= math.sqrt(10 ** (-rng.uniform(3, 15) / 10) / np.sum(tail**2))
    return np.concatenate([[1.0], np.zeros(delay - 1), tail])


def coloured_noise(rng: "np.random.Generator", n: int) -> "np.ndarray":
    """Stationary noise of unit power whose spectrum falls as 1 / f**alpha, alpha in [0, 2] (white to brown)."""
    import numpy as np

    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.maximum(np.fft.rfftfreq(n, 1 / SAMPLE_RATE), 20.0)
    noise = np.fft.irfft(spectrum * f ** (-rng.uniform(0.0, 2.0) / 2), n)
    return noise / math.sqrt(np.mean(noise**2))


def room_and_noise(x: "np.ndarray", rng: "np.random.Generator", params: DemoParams) -> "np.ndarray":
    """One recording condition per file: a random room (`room_rt60`), coloured noise at a random SNR
    (`noise_snr_db`, against the file's mean power), a random level (-6..0 dB under a 0.9 peak)."""
    import numpy as np

    if params.room_rt60:
        low, high = params.room_rt60
        x = _fft_filter(x, room_response(rng, rng.uniform(low, high)))
    if params.noise_snr_db:
        low, high = params.noise_snr_db
        power = np.mean(x**2) * 10 ** (-rng.uniform(low, high) / 10)
        x = x + math.sqrt(power) * coloured_noise(rng, x.size)
    return x * (0.9 / max(np.max(np.abs(x)), 1e-9)) * 10 ** (-rng.uniform(0, 6) / 20)
