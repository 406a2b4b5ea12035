"""Training examples: windows of the model's length cut from whole pieces, with their features and note tokens.

A piece is an audio file, its duration and its notes (a `Piece`; `pieces_from_dataset` makes them from the manifest
dataset). `WindowDataset` turns pieces into model-ready examples `{"input_values": (256, 128), "labels": [ids]}`:

- training (`train=True`): `windows_per_piece` random windows per piece and epoch. The start of window `item` in
  epoch `epoch` is drawn from `numpy.random.default_rng([seed, epoch, item])`, and its augmentation from a separate
  stream of the same seed, so a window depends only on (seed, epoch, item): not on the DataLoader's worker count, the
  worker that happens to load it, or the shuffling order. Call `set_epoch` (the Trainer callback
  `sound2sheet.training.DatasetEpochCallback` does) to draw new windows each epoch.
- validation (`train=False`): fixed windows tiling every piece from 0 s (the last one padded with silence), never
  augmented: the same examples every time.

Window starts lie on the 10 ms token grid, so note times relative to the window stay exact; the tokenizer clips the
notes to the window and lists the notes already sounding at its start in the tie section. Only the window's part of
the audio file is read (soundfile seek + read) and resampled with soxr, with a margin on each side so the resampling
filter sees real signal rather than an edge.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import soundfile
import soxr
import torch

from ..notes import Note
from .augment import Augmentation

WINDOW_GRID = 0.01  # seconds: the tokenizer's time step; window starts on it keep note times exact
# Seconds read on each side of a window so soxr's filter sees real signal rather than an edge; measured: with 10 ms
# a window matches the whole-file resampling to ~1e-7 (44.1/48/96 kHz; 1e-6 at 8 kHz), with 3 ms only to ~1e-4.
RESAMPLE_MARGIN = 0.01
WINDOW_STREAM, AUGMENT_STREAM = 0, 1  # independent random streams of one example: its start, its augmentation


class Piece(NamedTuple):
    """One whole recording: the audio file, its duration in seconds, and its notes."""

    audio_path: str
    duration: float
    notes: List[Note]


def read_segment(path: str, start: float, samples: int, sampling_rate: int) -> np.ndarray:
    """`samples` mono float32 samples at `sampling_rate` from `start` seconds into the file, zero-padded past its end.

    Reads just that part of the file (plus `RESAMPLE_MARGIN` on each side for the resampler), averages the channels
    and resamples with soxr; matches the same stretch of `load_audio(path, sampling_rate)` to within the
    resampler's rounding.

    Raises:
        ValueError: the file is missing or unreadable, or holds NaN/infinite samples (the message names it).
    """
    target_first = int(round(start * sampling_rate))  # the window's first sample on the output grid
    try:
        with soundfile.SoundFile(path) as audio:
            rate, total = audio.samplerate, audio.frames
            # Output sample j of a resampled stretch that begins at input sample `begin` sits at begin / rate + j /
            # sampling_rate. With `begin` a multiple of `step` input samples (= `step_out` output samples), that is
            # exactly the output grid of the whole file, as `load_audio` resamples it.
            common = math.gcd(rate, sampling_rate)
            step, step_out = rate // common, sampling_rate // common
            margin = int(math.ceil(RESAMPLE_MARGIN * rate)) if rate != sampling_rate else 0
            ideal = target_first * rate / sampling_rate  # the window's start in input samples (maybe fractional)
            begin = min(int(max(0.0, ideal - margin) // step) * step, (total // step) * step)
            skip = target_first - (begin // step) * step_out  # output samples before the window
            needed = int(math.ceil((skip + samples) * rate / sampling_rate)) + margin
            audio.seek(begin)
            data = audio.read(needed, dtype="float32", always_2d=True)
    except Exception as err:  # libsndfile raises several types for missing or corrupt files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a readable audio file ({reason})") from None
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(mono).all():
        raise ValueError(f"{path}: the audio contains NaN or infinite samples")
    if rate != sampling_rate and len(mono):
        mono = soxr.resample(mono, rate, sampling_rate, quality="HQ").astype(np.float32, copy=False)
    mono = mono[skip : skip + samples]
    if len(mono) < samples:
        mono = np.pad(mono, (0, samples - len(mono)))
    return np.ascontiguousarray(mono, dtype=np.float32)


def frame_labels(
    notes: Sequence[Note],
    window_start: float,
    frame_grid: Tuple[float, float, int],
    num_pitches: int = 128,
    offsets: bool = False,
) -> np.ndarray:
    """(columns, 2 x num_pitches) float32 targets of the model's auxiliary frame head for one window; (columns,
    3 x num_pitches) with `offsets` (for a model with `config.frame_offsets`).

    `frame_grid` is (centre of the first column in seconds, seconds between columns, columns), as
    `Sound2SheetConfig.frame_grid` gives it. Column `c` (centred at `first + c x step` into the window) has 1 at
    pitch `p` when a note of pitch `p` starts nearest to that centre (onsets before the first centre go to column
    0, after the last to the last column), and 1 at `num_pitches + p` when such a note sounds at the centre. The
    columns cover the window up to the end of the last patch, `(columns - 1) x step + 2 x first + 10 ms` (a patch
    centred at `first` spans frames 0 to `2 x first / 10 ms`); onsets from there on belong to the next window.
    With `offsets`, column `c` also has 1 at `2 x num_pitches + p` when a note of pitch `p` ends nearest to its
    centre, placed as the onsets are: offsets before the first centre go to column 0 (from the window's start on),
    offsets from the end of the last patch on belong to the next window, and offsets before the window's start to the
    window before.
    """
    first, step, columns = frame_grid
    labels = np.zeros((columns, (3 if offsets else 2) * num_pitches), dtype=np.float32)
    window_end = (columns - 1) * step + 2 * first + 0.01
    centres = first + step * np.arange(columns)

    def nearest_column(time: float) -> int:
        return min(max(int(round((time - first) / step)), 0), columns - 1)

    for note in notes:
        onset, offset = note.onset - window_start, note.offset - window_start
        if offset < 0 or onset >= window_end or not 0 <= note.pitch < num_pitches:
            continue
        if onset >= 0:
            labels[nearest_column(onset), note.pitch] = 1.0
        labels[(centres >= onset) & (centres < offset), num_pitches + note.pitch] = 1.0
        if offsets and offset < window_end:
            labels[nearest_column(offset), 2 * num_pitches + note.pitch] = 1.0
    return labels


def validation_window_starts(duration: float, window_seconds: float) -> List[float]:
    """Starts of the fixed windows tiling a piece of `duration` seconds: 0, w, 2w, ... (at least one window)."""
    count = max(1, math.ceil(round(duration / window_seconds, 6)))
    return [round(k * window_seconds, 6) for k in range(count)]


def random_window_start(duration: float, window_seconds: float, rng: np.random.Generator) -> float:
    """A start drawn uniformly from [0, duration - window_seconds] (0 for shorter pieces), on the 10 ms grid."""
    latest = max(0.0, duration - window_seconds)
    return round(round(rng.uniform(0.0, latest) / WINDOW_GRID) * WINDOW_GRID, 6)


def truncate_labels(ids: List[int], max_length: int, eos_token_id: int) -> List[int]:
    """`ids` cut to at most `max_length` tokens, the last one kept as EOS."""
    if len(ids) <= max_length:
        return ids
    return ids[: max_length - 1] + [eos_token_id]


class WindowDataset(torch.utils.data.Dataset):
    """Model-ready windows (`input_values`, `labels`) cut from pieces; see the module docstring for the sampling.

    Args:
        pieces: `Piece`s or (audio path, duration in seconds, notes) tuples, e.g. from `pieces_from_dataset`.
        feature_extractor: a `Sound2SheetFeatureExtractor` (sets the window length and the sample rate).
        tokenizer: a `Sound2SheetTokenizer` (encodes each window's notes, with its tie section and EOS).
        train: random windows (`windows_per_piece` per piece per epoch) if True, else fixed tiling windows.
        windows_per_piece: training windows drawn per piece and epoch.
        seed: base of the random draws; example `item` of epoch `epoch` depends only on (seed, epoch, item).
        augment: an `Augmentation` applied to training windows (ignored when `train=False`).
        max_target_length: labels longer than this are cut (EOS kept).
        max_windows: keep only the first N examples (e.g. to bound validation time).
        frame_grid: (first column centre in seconds, seconds between columns, columns), e.g. `model.config.frame_grid`;
            when given, examples also carry `frame_labels` (see `frame_labels`) for the auxiliary frame loss.
        frame_offsets: with `frame_grid`, the `frame_labels` also mark offsets (`model.config.frame_offsets`).
    """

    def __init__(
        self,
        pieces: Sequence,
        feature_extractor,
        tokenizer,
        train: bool = True,
        windows_per_piece: int = 4,
        seed: int = 0,
        augment: Optional[Augmentation] = None,
        max_target_length: int = 1024,
        max_windows: Optional[int] = None,
        frame_grid: Optional[Tuple[float, float, int]] = None,
        frame_offsets: bool = False,
    ):
        if windows_per_piece < 1:
            raise ValueError(f"windows_per_piece must be at least 1, got {windows_per_piece}.")
        if max_target_length < 2:
            raise ValueError(f"max_target_length must be at least 2 (one event and EOS), got {max_target_length}.")
        if frame_offsets and frame_grid is None:
            raise ValueError("frame_offsets mark offsets in the frame labels: they need a frame_grid.")
        self.pieces = [Piece(str(path), float(duration), list(notes)) for path, duration, notes in pieces]
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        self.train = train
        self.seed = int(seed)
        self.epoch = 0
        self.augment = augment if train else None
        self.max_target_length = max_target_length
        self.frame_grid = tuple(frame_grid) if frame_grid is not None else None
        self.frame_offsets = bool(frame_offsets)
        self.sampling_rate = int(feature_extractor.sampling_rate)
        self.window_seconds = float(feature_extractor.window_seconds)
        self.window_samples = int(round(self.window_seconds * self.sampling_rate))
        if train:
            self.index = [(piece, None) for piece in range(len(self.pieces)) for _ in range(windows_per_piece)]
        else:
            self.index = [
                (piece, start)
                for piece, (_, duration, _) in enumerate(self.pieces)
                for start in validation_window_starts(duration, self.window_seconds)
            ]
        if max_windows is not None:
            self.index = self.index[:max_windows]

    def set_epoch(self, epoch: int):
        """Draw this epoch's training windows (validation windows never change)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.index)

    def _rng(self, item: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, item, stream])

    def window_start(self, item: int) -> float:
        """Where example `item` starts in its piece, in seconds."""
        piece, start = self.index[item]
        if start is not None:
            return start
        return random_window_start(self.pieces[piece].duration, self.window_seconds, self._rng(item, WINDOW_STREAM))

    def window_samples_of(self, item: int) -> np.ndarray:
        """The (augmented, for training) waveform of example `item`: `window_samples` samples at the model's rate."""
        piece, _ = self.index[item]
        samples = read_segment(self.pieces[piece].audio_path, self.window_start(item), self.window_samples, self.sampling_rate)
        if self.augment is not None:
            samples = self.augment(samples, self._rng(item, AUGMENT_STREAM))
        return samples

    def labels_of(self, item: int) -> List[int]:
        """The token ids of example `item`: its piece's notes clipped to the window, tie section first, EOS last."""
        piece, _ = self.index[item]
        ids = self.tokenizer.encode_notes(self.pieces[piece].notes, window_start=self.window_start(item), window_length=self.window_seconds)
        return truncate_labels(ids, self.max_target_length, self.tokenizer.eos_token_id)

    def __getitem__(self, item: int) -> dict:
        if not -len(self) <= item < len(self):
            raise IndexError(f"WindowDataset index {item} out of range for {len(self)} windows")
        item = item % len(self)
        features = self.feature_extractor(self.window_samples_of(item), sampling_rate=self.sampling_rate, return_tensors="pt")
        example = {"input_values": features["input_values"][0], "labels": self.labels_of(item)}
        if self.frame_grid is not None:
            piece, _ = self.index[item]
            example["frame_labels"] = torch.from_numpy(
                frame_labels(self.pieces[piece].notes, self.window_start(item), self.frame_grid, offsets=self.frame_offsets)
            )
        return example


def pieces_from_dataset(dataset) -> List[Piece]:
    """The `Piece` of every example of a manifest dataset (see `load_manifest_dataset`; streaming ones too)."""
    from .builder import notes_of_example

    return [Piece(example["audio_path"], float(example["duration"]), notes_of_example(example)) for example in dataset]


__all__ = [
    "Piece",
    "WindowDataset",
    "read_segment",
    "validation_window_starts",
    "random_window_start",
    "truncate_labels",
    "frame_labels",
    "pieces_from_dataset",
    "WINDOW_GRID",
]
