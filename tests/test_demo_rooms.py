"""The demo's recording conditions: the drawn SNR, a room's decay, one condition per file, the same on every run."""

from hubert_pipeline.audio import SAMPLE_RATE
from hubert_pipeline.demo_rooms import file_rng, room_and_noise, room_response
from hubert_pipeline.params import DemoParams


def _speech_like(seconds: float = 3.0):
    import numpy as np

    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return np.sin(2 * np.pi * 150 * t) * np.sin(2 * np.pi * 3 * t) ** 2  # a 150 Hz voice, 3 syllables a second


def test_noise_is_added_at_the_drawn_snr_and_the_file_keeps_its_length():
    import numpy as np

    x = _speech_like()
    for snr in (15.0, 30.0):
        y = room_and_noise(x, file_rng(0, "a"), DemoParams(room_rt60=(), noise_snr_db=(snr, snr)))
        gain = np.dot(y, x) / np.dot(x, x)  # the random level; the noise is independent of x
        measured = 10 * np.log10(np.mean(x**2) / np.mean((y / gain - x) ** 2))
        assert y.shape == x.shape
        assert abs(measured - snr) < 0.3, (snr, measured)
        assert 0.9 * 10 ** (-6 / 20) - 1e-9 <= np.abs(y).max() <= 0.9 + 1e-9


def test_a_room_starts_with_the_direct_sound_and_decays_60_db_in_its_rt60():
    import numpy as np

    for rt60 in (0.1, 0.5):
        h = room_response(file_rng(1, f"room{rt60}"), rt60)
        assert h[0] == 1.0  # the direct sound at 0, then 2-5 ms of nothing: the alignments hold
        assert not h[1:32].any()
        schroeder = np.cumsum((h[32:] ** 2)[::-1])[::-1]  # energy decay curve of the tail
        decay_db = 10 * np.log10(schroeder / schroeder[0])
        t = np.arange(decay_db.size) / SAMPLE_RATE
        fit = (decay_db > -25) & (decay_db < -5)  # T20, as acousticians measure it
        slope = np.polyfit(t[fit], decay_db[fit], 1)[0]
        assert abs(-60 / slope - rt60) < 0.15 * rt60, (rt60, -60 / slope)


def test_each_file_gets_its_own_condition_and_the_same_one_on_every_run():
    import numpy as np

    x, params = _speech_like(), DemoParams(room_rt60=(0.1, 0.5), noise_snr_db=(15.0, 35.0))
    a, again, b = (room_and_noise(x, file_rng(0, f), params) for f in ("kal_train_00001", "kal_train_00001", "b"))
    assert np.array_equal(a, again)
    assert not np.allclose(a, b, atol=1e-3)
    dry = room_and_noise(x, file_rng(0, "a"), DemoParams(room_rt60=(), noise_snr_db=()))
    assert np.allclose(dry / (np.dot(dry, x) / np.dot(x, x)), x)  # off: only the level changes
