"""Training examples: windows cut from pieces, their features and note tokens; the collator; augmentation.

Training draws random windows from each piece (a fresh draw every epoch, reproducible from the seed, the epoch and
the example index); validation tiles every piece with fixed, consecutive windows. Audio is read with soundfile,
only the window's part of the file, and resampled with soxr.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import soundfile
import soxr
import torch

from ..notes import Note

GRID = 0.01  # window starts on the token grid, so note times stay exact relative to the window


def read_segment(path: str, start: float, samples: int, sampling_rate: int) -> np.ndarray:
    """`samples` mono samples at `sampling_rate` from `start` seconds into the file (zero-padded past its end)."""
    try:
        with soundfile.SoundFile(path) as audio:
            rate = audio.samplerate
            first = int(round(start * rate))
            audio.seek(min(first, audio.frames))
            data = audio.read(int(math.ceil(samples * rate / sampling_rate)) + 1, dtype="float32", always_2d=True)
    except Exception as err:  # libsndfile raises several types for corrupt files
        raise ValueError(f"{path}: not a readable audio file ({str(err).strip().splitlines()[0]})") from None
    mono = data.mean(axis=1, dtype=np.float32)
    if not np.isfinite(mono).all():
        raise ValueError(f"{path}: the audio contains NaN or infinite samples")
    if rate != sampling_rate and len(mono):
        mono = soxr.resample(mono, rate, sampling_rate, quality="HQ").astype(np.float32, copy=False)
    if len(mono) < samples:
        mono = np.pad(mono, (0, samples - len(mono)))
    return mono[:samples]


@dataclass
class Augmentation:
    """Waveform augmentation for training windows; none of it moves a note in time.

    Gain (uniform in dB), white noise at a random signal-to-noise ratio, a small room (exponentially decaying noise
    impulse response whose first tap is the direct sound, so onsets stay where they are), and a spectral tilt (a
    first-order low- or high-shelf mix).
    """

    gain_db: Tuple[float, float] = (-9.0, 6.0)
    noise_probability: float = 0.5
    noise_snr_db: Tuple[float, float] = (20.0, 50.0)
    reverb_probability: float = 0.3
    reverb_seconds: Tuple[float, float] = (0.15, 0.8)  # RT60
    tilt_probability: float = 0.3
    sampling_rate: int = 16000

    def __call__(self, samples: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        from scipy.signal import fftconvolve, lfilter

        out = samples.astype(np.float32, copy=True)
        if rng.random() < self.reverb_probability:
            rt60 = rng.uniform(*self.reverb_seconds)
            length = int(rt60 * self.sampling_rate)
            decay = np.exp(-6.9 * np.arange(length) / length)  # -60 dB over rt60
            response = rng.standard_normal(length) * decay * rng.uniform(0.05, 0.3)
            response[0] = 1.0
            out = fftconvolve(out, response)[: len(out)].astype(np.float32)
        if rng.random() < self.tilt_probability:
            coefficient = rng.uniform(0.3, 0.9)
            low = lfilter([1 - coefficient], [1, -coefficient], out).astype(np.float32)
            mix = rng.uniform(-0.5, 0.5)
            out = out + mix * (low - out) if mix > 0 else out + (-mix) * (out - low)
        out *= np.float32(10 ** (rng.uniform(*self.gain_db) / 20))
        if rng.random() < self.noise_probability:
            power = float(np.mean(out**2))
            if power > 0:
                snr = rng.uniform(*self.noise_snr_db)
                out += rng.standard_normal(len(out)).astype(np.float32) * np.float32(math.sqrt(power / 10 ** (snr / 10)))
        peak = float(np.abs(out).max()) if len(out) else 0.0
        return out / peak if peak > 1.0 else out


class WindowDataset(torch.utils.data.Dataset):
    """Model-ready windows (`input_values`, `labels`) cut from pieces.

    Args:
        pieces: sequence of (audio path, duration in seconds, notes) — e.g. from `pieces_from_dataset`.
        feature_extractor: a `Sound2SheetFeatureExtractor` (sets the window length and sample rate).
        tokenizer: a `Sound2SheetTokenizer` (encodes each window's notes, with its tie section).
        train: random windows (`windows_per_piece` per piece per epoch) if True, else fixed tiling windows.
        seed: base of the random draws; the window of example i in epoch e depends only on (seed, e, i).
        augment: an `Augmentation` applied to training windows (never to validation).
        max_target_length: labels longer than this are cut (EOS kept).
        max_windows: keep only the first N examples (e.g. to bound validation time).
    """

    def __init__(
        self,
        pieces: Sequence[Tuple[str, float, List[Note]]],
        feature_extractor,
        tokenizer,
        train: bool = True,
        windows_per_piece: int = 4,
        seed: int = 0,
        augment: Optional[Augmentation] = None,
        max_target_length: int = 1024,
        max_windows: Optional[int] = None,
    ):
        self.pieces = list(pieces)
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.augment = augment if train else None
        self.max_target_length = max_target_length
        self.window_seconds = float(feature_extractor.window_seconds)
        self.window_samples = int(round(self.window_seconds * feature_extractor.sampling_rate))
        if train:
            self.index = [(piece, draw) for piece in range(len(self.pieces)) for draw in range(windows_per_piece)]
        else:
            self.index = [
                (piece, round(k * self.window_seconds, 6))
                for piece, (_, duration, _) in enumerate(self.pieces)
                for k in range(max(1, math.ceil(round(duration / self.window_seconds, 6))))
            ]
        if max_windows is not None:
            self.index = self.index[:max_windows]

    def set_epoch(self, epoch: int):
        """Draw new training windows for this epoch (the Trainer/accelerate call this)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.index)

    def _rng(self, item: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, item])

    def window_start(self, item: int) -> float:
        piece, value = self.index[item]
        if not self.train:
            return value
        duration = self.pieces[piece][1]
        latest = max(0.0, duration - self.window_seconds)
        return round(round(self._rng(item).uniform(0.0, latest) / GRID) * GRID, 6)

    def __getitem__(self, item: int) -> dict:
        piece, _ = self.index[item]
        audio_path, _, notes = self.pieces[piece]
        start = self.window_start(item)
        samples = read_segment(audio_path, start, self.window_samples, self.feature_extractor.sampling_rate)
        if self.augment is not None:
            samples = self.augment(samples, self._rng(item))
        features = self.feature_extractor(samples, sampling_rate=self.feature_extractor.sampling_rate, return_tensors="pt")
        labels = self.tokenizer.encode_notes(notes, window_start=start, window_length=self.window_seconds)
        if len(labels) > self.max_target_length:
            labels = labels[: self.max_target_length - 1] + [self.tokenizer.eos_token_id]
        return {"input_values": features["input_values"][0], "labels": labels}


@dataclass
class Sound2SheetDataCollator:
    """Stacks `input_values` and pads `labels` with -100 (ignored by the loss) to the longest in the batch."""

    label_pad_token_id: int = -100

    def __call__(self, features: List[dict]) -> dict:
        input_values = torch.stack([torch.as_tensor(f["input_values"], dtype=torch.float32) for f in features])
        longest = max(len(f["labels"]) for f in features)
        labels = torch.full((len(features), longest), self.label_pad_token_id, dtype=torch.long)
        for row, feature in enumerate(features):
            labels[row, : len(feature["labels"])] = torch.as_tensor(feature["labels"], dtype=torch.long)
        return {"input_values": input_values, "labels": labels}


def pieces_from_dataset(dataset) -> List[Tuple[str, float, List[Note]]]:
    """(audio path, duration, notes) for every example of a manifest dataset (see `load_manifest_dataset`)."""
    from .builder import notes_of_example

    return [(example["audio_path"], float(example["duration"]), notes_of_example(example)) for example in dataset]


__all__ = ["WindowDataset", "Sound2SheetDataCollator", "Augmentation", "read_segment", "pieces_from_dataset"]
