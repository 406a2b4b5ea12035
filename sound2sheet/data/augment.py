"""Waveform augmentation for training windows: gain, noise, a small room, a spectral tilt. None of it moves a note.

Every transform keeps the direct sound at its place in time: the room's impulse response starts with the direct path
(a unit first tap) and the tilt is a short, causal biquad filter (its group delay is well under a millisecond above
100 Hz), so the labels cut for a window stay exact. Augmentation is drawn from a `numpy.random.Generator` the caller
seeds; the same generator state gives the same output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple, Union

import numpy as np

RT60_DECAY = math.log(1000.0)  # an amplitude envelope exp(-6.91 t / RT60) falls by 60 dB (a factor 1000) over RT60


def high_shelf_coefficients(gain_db: float, corner_hz: float, sampling_rate: int) -> Tuple[np.ndarray, np.ndarray]:
    """(b, a) of a second-order high-shelf filter (shelf slope 1) from R. Bristow-Johnson's Audio EQ Cookbook.

    A positive `gain_db` brightens (boosts above `corner_hz`), a negative one darkens; 0 dB is the identity.
    """
    amplitude = 10.0 ** (gain_db / 40.0)
    w0 = 2.0 * math.pi * corner_hz / sampling_rate
    cos_w0, alpha = math.cos(w0), math.sin(w0) / 2.0 * math.sqrt(2.0)  # shelf slope S = 1
    root = 2.0 * math.sqrt(amplitude) * alpha
    b = np.array([
        amplitude * ((amplitude + 1) + (amplitude - 1) * cos_w0 + root),
        -2.0 * amplitude * ((amplitude - 1) + (amplitude + 1) * cos_w0),
        amplitude * ((amplitude + 1) + (amplitude - 1) * cos_w0 - root),
    ])
    a = np.array([
        (amplitude + 1) - (amplitude - 1) * cos_w0 + root,
        2.0 * ((amplitude - 1) - (amplitude + 1) * cos_w0),
        (amplitude + 1) - (amplitude - 1) * cos_w0 - root,
    ])
    return b / a[0], a / a[0]


def room_impulse_response(rt60: float, wet: float, sampling_rate: int, rng: np.random.Generator) -> np.ndarray:
    """A synthetic room: a unit direct tap followed by exponentially decaying noise (`wet` times as loud at first)."""
    length = max(2, int(rt60 * sampling_rate))
    decay = np.exp(-RT60_DECAY * np.arange(length) / length)
    response = rng.standard_normal(length) * decay * wet
    response[0] = 1.0
    return response


@dataclass
class Augmentation:
    """Random waveform augmentation of one training window (callable: `augment(samples, rng)`).

    Applied in this order: reverb (probability `reverb_probability`), spectral tilt (`tilt_probability`), gain
    (always), white noise (`noise_probability`). The result is scaled down if it would clip.

    Args:
        gain_db (`tuple[float, float]`, *optional*, defaults to `(-9.0, 6.0)`): uniform range of the gain in dB.
        noise_probability (`float`, *optional*, defaults to 0.5): chance of adding white noise.
        noise_snr_db (`tuple[float, float]`, *optional*, defaults to `(20.0, 50.0)`): uniform range of the
            signal-to-noise ratio in dB (relative to the window's mean power).
        reverb_probability (`float`, *optional*, defaults to 0.3): chance of the synthetic room.
        reverb_seconds (`tuple[float, float]`, *optional*, defaults to `(0.15, 0.8)`): uniform range of the RT60.
        reverb_wet (`tuple[float, float]`, *optional*, defaults to `(0.05, 0.3)`): level of the reverberant tail.
        tilt_probability (`float`, *optional*, defaults to 0.3): chance of the high-shelf EQ.
        tilt_db (`tuple[float, float]`, *optional*, defaults to `(-9.0, 6.0)`): uniform range of the shelf gain.
        tilt_corner_hz (`tuple[float, float]`, *optional*, defaults to `(500.0, 4000.0)`): range of the corner
            frequency (drawn log-uniformly).
        sampling_rate (`int`, *optional*, defaults to 16000): rate of the samples.
    """

    gain_db: Tuple[float, float] = (-9.0, 6.0)
    noise_probability: float = 0.5
    noise_snr_db: Tuple[float, float] = (20.0, 50.0)
    reverb_probability: float = 0.3
    reverb_seconds: Tuple[float, float] = (0.15, 0.8)
    reverb_wet: Tuple[float, float] = (0.05, 0.3)
    tilt_probability: float = 0.3
    tilt_db: Tuple[float, float] = (-9.0, 6.0)
    tilt_corner_hz: Tuple[float, float] = (500.0, 4000.0)
    sampling_rate: int = 16000

    def __post_init__(self):
        for name in ("noise_probability", "reverb_probability", "tilt_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"Augmentation: {name} must be in [0, 1], got {getattr(self, name)}.")
        for name in ("gain_db", "noise_snr_db", "reverb_seconds", "reverb_wet", "tilt_db", "tilt_corner_hz"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"Augmentation: {name} must be a (low, high) range, got {getattr(self, name)}.")
        if not (0 < self.tilt_corner_hz[0] and self.tilt_corner_hz[1] < self.sampling_rate / 2):
            raise ValueError(f"Augmentation: tilt_corner_hz must lie in (0, {self.sampling_rate / 2}) Hz, got {self.tilt_corner_hz}.")

    def __call__(self, samples: np.ndarray, rng: Union[np.random.Generator, int]) -> np.ndarray:
        """The augmented copy of `samples` (1-D float32); `rng` is a numpy Generator or an integer seed."""
        from scipy.signal import fftconvolve, lfilter

        rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
        out = np.asarray(samples, dtype=np.float32).copy()
        if rng.random() < self.reverb_probability:
            response = room_impulse_response(rng.uniform(*self.reverb_seconds), rng.uniform(*self.reverb_wet), self.sampling_rate, rng)
            out = fftconvolve(out, response)[: len(out)].astype(np.float32)
        if rng.random() < self.tilt_probability:
            corner = math.exp(rng.uniform(math.log(self.tilt_corner_hz[0]), math.log(self.tilt_corner_hz[1])))
            b, a = high_shelf_coefficients(rng.uniform(*self.tilt_db), corner, self.sampling_rate)
            out = lfilter(b, a, out).astype(np.float32)
        out *= np.float32(10.0 ** (rng.uniform(*self.gain_db) / 20.0))
        if rng.random() < self.noise_probability:
            power = float(np.mean(np.square(out, dtype=np.float64))) if len(out) else 0.0
            if power > 0.0:
                snr_db = rng.uniform(*self.noise_snr_db)
                out += rng.standard_normal(len(out)).astype(np.float32) * np.float32(math.sqrt(power / 10.0 ** (snr_db / 10.0)))
        peak = float(np.abs(out).max()) if len(out) else 0.0
        return out / np.float32(peak) if peak > 1.0 else out


__all__ = ["Augmentation", "high_shelf_coefficients", "room_impulse_response"]
