"""Sound2SheetFeatureExtractor: audio of any rate and channel count -> log-mel windows, and the audio readers.

Audio is read with soundfile (WAV, FLAC, OGG) and resampled with soxr; nothing here needs ffmpeg or torchaudio.
`iter_audio_windows` reads long files block by block, so memory stays bounded whatever the file length.

This module imports nothing from the rest of the package.
"""

from __future__ import annotations

import os
from typing import Iterator, List, Optional, Sequence, Union

import numpy as np
import soundfile
import soxr
import torch
from transformers import BatchFeature, SequenceFeatureExtractor
from transformers.audio_utils import mel_filter_bank, window_function

SAMPLING_RATE = 16000  # Hz; piano partials above 8 kHz add little to pitch and onset information
HOP_LENGTH = 160  # samples: 10 ms frames, the time resolution of the note tokens
N_FFT = 2048  # 128 ms at 16 kHz: 7.8 Hz bins resolve the low piano register (Onsets and Frames uses the same)
NUM_MEL_BINS = 128
F_MIN = 30.0  # Hz; just above A0 (27.5 Hz), the lowest piano key
F_MAX = 8000.0  # Hz; the Nyquist frequency at 16 kHz
WINDOW_SECONDS = 2.56  # 256 frames: one model window
LOG_FLOOR = 1e-8  # mel power floor before the log (about -80 dB)
# log10(mel power) lies in about [-8, 2] for audio in [-1, 1]; (x + 4) / 4 maps silence to -1 and loud chords to ~1.
LOG_OFFSET, LOG_SCALE = 4.0, 4.0
READ_BLOCK_SECONDS = 5.0  # how much of a file `iter_audio_windows` holds at a time (measured: 20 s blocks cost ~30 MB more)

AudioSource = Union[str, os.PathLike, np.ndarray]

# In a fresh process, torch's first vectorised math call (log10, cos, erf and tanh were seen) sometimes comes out less
# accurate when two threads make it at once: about one process in ten on a 2-core CPU with torch 2.13, the log10 of the
# features included. Once one call has run on a single thread, later ones are exact. One element is far below the size
# at which torch splits work across threads, so this call runs on this thread alone, and the features, and the
# training runs fed with them, come out bit-identical in every process (benchmarks/process_determinism.py).
torch.log10(torch.ones(1))


# --- reading audio -------------------------------------------------------------------------------------------------


def _check_path(path: str) -> None:
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, not an audio file")
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file")


def _unreadable(path: str, err: Exception) -> ValueError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ValueError(f"{path}: not a readable audio file ({reason})")


def _check_finite(samples: np.ndarray, name: str) -> None:
    if not np.isfinite(samples).all():
        raise ValueError(f"{name}: the audio contains NaN or infinite samples")


def _to_mono(samples: np.ndarray) -> np.ndarray:
    """(samples,) or (samples, channels) -> (samples,) float32, by averaging the channels."""
    if samples.ndim == 1:
        return samples.astype(np.float32, copy=False)
    return samples.mean(axis=1, dtype=np.float32)


def _resample(samples: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    if orig_rate == target_rate:
        return np.ascontiguousarray(samples, dtype=np.float32)
    return soxr.resample(samples, orig_rate, target_rate, quality="HQ").astype(np.float32, copy=False)


def audio_duration(path: str | os.PathLike) -> float:
    """Duration in seconds, from the file header.

    Raises:
        ValueError: the path is missing, a directory, or not a readable audio file (the message names it).
    """
    path = os.fspath(path)
    _check_path(path)
    try:
        info = soundfile.info(path)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as err:
        raise _unreadable(path, err) from None
    return info.frames / float(info.samplerate)


def load_audio(source: AudioSource, sampling_rate: int = SAMPLING_RATE, orig_sampling_rate: Optional[int] = None) -> np.ndarray:
    """Mono float32 samples at `sampling_rate` from a file (WAV/FLAC/OGG, any rate, any channels) or an array.

    A 2-D array's longer axis is time: (samples, channels) and (channels, samples) both work. An array is taken to be
    at `orig_sampling_rate` (default: `sampling_rate`). Channels are averaged; resampling uses soxr (high quality).

    Raises:
        ValueError: a missing path, a directory, an unreadable/corrupt file, empty audio, or NaN/inf samples; the
            message starts with the file path (or "audio array").
    """
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        _check_path(name)
        try:
            samples, rate = soundfile.read(name, dtype="float32", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
            raise _unreadable(name, err) from None
    else:
        name = "audio array"
        samples = np.asarray(source)
        if samples.ndim == 2 and samples.shape[0] < samples.shape[1]:
            samples = samples.T
        if samples.ndim not in (1, 2) or not np.issubdtype(samples.dtype, np.number):
            raise ValueError(f"{name}: expected a 1-D or 2-D array of samples, got shape {samples.shape} ({samples.dtype})")
        samples = samples.astype(np.float32, copy=False)
        rate = int(orig_sampling_rate or sampling_rate)
    if samples.shape[0] == 0:
        raise ValueError(f"{name}: the audio is empty (0 samples)")
    _check_finite(samples, name)
    resampled = _resample(_to_mono(samples), int(rate), sampling_rate)
    if resampled.shape[0] == 0:  # e.g. a corrupt header claiming a rate of billions of Hz
        hint = " (is the sample rate in its header right?)" if isinstance(source, (str, os.PathLike)) else ""
        raise ValueError(
            f"{name}: {samples.shape[0]} samples at {int(rate)} Hz last less than one sample at {sampling_rate} Hz{hint}"
        )
    return resampled


def iter_audio_windows(
    source: AudioSource,
    window_samples: int,
    sampling_rate: int = SAMPLING_RATE,
    block_seconds: float = READ_BLOCK_SECONDS,
) -> Iterator[np.ndarray]:
    """Consecutive mono windows of exactly `window_samples` at `sampling_rate` (the last one zero-padded).

    A file is read `block_seconds` at a time and resampled as a stream, so memory is bounded by the block size, not
    by the file length. An array is loaded with `load_audio` (it is in memory already). Errors as `load_audio`.
    """
    if not isinstance(source, (str, os.PathLike)):
        samples = load_audio(source, sampling_rate)
        for start in range(0, len(samples), window_samples):
            window = samples[start : start + window_samples]
            yield np.pad(window, (0, window_samples - len(window))) if len(window) < window_samples else window
        return
    path = os.fspath(source)
    _check_path(path)
    try:
        audio_file = soundfile.SoundFile(path)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as err:
        raise _unreadable(path, err) from None
    with audio_file:
        if audio_file.frames == 0:
            raise ValueError(f"{path}: the audio is empty (0 samples)")
        stream = None
        if audio_file.samplerate != sampling_rate:
            stream = soxr.ResampleStream(audio_file.samplerate, sampling_rate, 1, dtype="float32", quality="HQ")
        block_frames = max(1, int(block_seconds * audio_file.samplerate))
        pending = np.zeros(0, dtype=np.float32)
        emitted = False
        blocks = audio_file.blocks(blocksize=block_frames, dtype="float32", always_2d=True)
        while True:
            try:
                block = next(blocks)
            except StopIteration:
                break
            except (soundfile.LibsndfileError, RuntimeError) as err:
                raise _unreadable(path, err) from None
            _check_finite(block, path)
            mono = _to_mono(block)
            pending = np.concatenate([pending, stream.resample_chunk(mono) if stream else mono])
            while len(pending) >= window_samples:
                yield pending[:window_samples]
                emitted = True
                pending = pending[window_samples:]
        if stream is not None:
            pending = np.concatenate([pending, stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)])
        while len(pending) >= window_samples:
            yield pending[:window_samples]
            emitted = True
            pending = pending[window_samples:]
        if len(pending) or not emitted:
            yield np.pad(pending, (0, window_samples - len(pending)))


# --- features ------------------------------------------------------------------------------------------------------


class Sound2SheetFeatureExtractor(SequenceFeatureExtractor):
    r"""
    Makes log-mel windows for Sound2Sheet from audio of any sample rate and channel count.

    Features are `(log10(max(mel power, 1e-8)) + 4) / 4` over `feature_size` mel bands (HTK scale, Slaney norm) of a
    Hann-windowed STFT, one frame per `hop_length` samples; `n` samples give exactly `n // hop_length` frames (2.56 s
    at 16 kHz -> 256 frames). Silence is -1.0, the padding value.

    Args:
        feature_size (`int`, *optional*, defaults to 128): number of mel bands.
        sampling_rate (`int`, *optional*, defaults to 16000): rate the model expects; files are resampled to it.
        hop_length (`int`, *optional*, defaults to 160): samples between frames (10 ms).
        n_fft (`int`, *optional*, defaults to 2048): STFT size (128 ms: resolves the low piano register).
        f_min (`float`, *optional*, defaults to 30.0): lowest mel band edge in Hz.
        f_max (`float`, *optional*, defaults to 8000.0): highest mel band edge in Hz.
        window_seconds (`float`, *optional*, defaults to 2.56): the model's window; inputs are padded/cut to it.
        padding_value (`float`, *optional*, defaults to -1.0): feature value of padded frames (= silence).
    """

    model_input_names = ["input_values", "attention_mask"]

    def __init__(
        self,
        feature_size: int = NUM_MEL_BINS,
        sampling_rate: int = SAMPLING_RATE,
        hop_length: int = HOP_LENGTH,
        n_fft: int = N_FFT,
        f_min: float = F_MIN,
        f_max: float = F_MAX,
        window_seconds: float = WINDOW_SECONDS,
        padding_value: float = -1.0,
        return_attention_mask: bool = True,
        **kwargs,
    ):
        super().__init__(
            feature_size=feature_size,
            sampling_rate=sampling_rate,
            padding_value=padding_value,
            return_attention_mask=return_attention_mask,
            **kwargs,
        )
        self.hop_length = hop_length
        self.n_fft = n_fft
        self.f_min = f_min
        self.f_max = f_max
        self.window_seconds = window_seconds
        self.mel_filters = torch.from_numpy(
            mel_filter_bank(
                num_frequency_bins=1 + n_fft // 2,
                num_mel_filters=feature_size,
                min_frequency=f_min,
                max_frequency=f_max,
                sampling_rate=sampling_rate,
                norm="slaney",
                mel_scale="htk",
            ).astype(np.float32)
        )  # (frequency bins, mel bands)
        # The periodic Hann window, computed in float64 by numpy and rounded once. (torch.hann_window, as the first
        # cosine of a process, was up to 7.5e-5 off in some processes: see the note above on the first math call.)
        self.stft_window = torch.from_numpy(window_function(n_fft, "hann", periodic=True).astype(np.float32))

    @property
    def max_frames(self) -> int:
        """Frames in one model window."""
        return int(round(self.window_seconds * self.sampling_rate / self.hop_length))

    def to_dict(self) -> dict:
        output = super().to_dict()
        for derived in ("mel_filters", "stft_window"):
            output.pop(derived, None)
        return output

    def log_mel(self, waveforms: torch.Tensor) -> torch.Tensor:
        """(batch, samples) float32 -> (batch, samples // hop_length, mel bands) normalised log-mel features."""
        spectrum = torch.stft(
            waveforms, self.n_fft, self.hop_length, window=self.stft_window, center=True, pad_mode="reflect" if waveforms.shape[-1] > self.n_fft // 2 else "constant", return_complex=True
        )[..., :-1]  # center=True gives n // hop + 1 frames; the last one is past the end of the audio
        power = spectrum.real.square() + spectrum.imag.square()  # (batch, frequency bins, frames)
        mel = torch.matmul(power.transpose(1, 2), self.mel_filters)
        return (torch.log10(mel.clamp_min(LOG_FLOOR)) + LOG_OFFSET) / LOG_SCALE

    def __call__(
        self,
        raw_audio: Union[AudioSource, Sequence[AudioSource]],
        sampling_rate: Optional[int] = None,
        return_tensors: Optional[str] = None,
        padding: Union[bool, str] = "max_length",
        truncation: bool = True,
        max_frames: Optional[int] = None,
        return_attention_mask: Optional[bool] = None,
        **kwargs,
    ) -> BatchFeature:
        """Features for one input or a batch.

        Args:
            raw_audio: a path, a 1-D array of samples at `sampling_rate`, or a list of them. Paths are read and
                resampled with `load_audio`.
            sampling_rate: rate of array inputs; must be the extractor's (resample with `load_audio` first).
            return_tensors: "pt" or "np" (default: lists of arrays).
            padding: "max_length" pads (and `truncation` cuts) every input to `max_frames` (default: one window);
                "longest" pads to the longest input in the batch.
            max_frames: frames per input with padding="max_length" (default: `self.max_frames`).
        Returns:
            `BatchFeature` with `input_values` (batch, frames, mel bands) and `attention_mask` (batch, frames).
        """
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ValueError(
                f"The model expects audio at {self.sampling_rate} Hz but sampling_rate={sampling_rate} was given; "
                f"resample first, e.g. with sound2sheet.feature_extraction_sound2sheet.load_audio(array, "
                f"{self.sampling_rate}, orig_sampling_rate={sampling_rate})."
            )
        batched = isinstance(raw_audio, (list, tuple)) or (isinstance(raw_audio, np.ndarray) and raw_audio.ndim == 2)
        items = list(raw_audio) if batched else [raw_audio]
        waveforms: List[np.ndarray] = []
        for item in items:
            if isinstance(item, (str, os.PathLike)):
                waveforms.append(load_audio(item, self.sampling_rate))
            else:
                samples = np.asarray(item, dtype=np.float32)
                if samples.ndim != 1:
                    raise ValueError(f"audio array: expected 1-D mono samples, got shape {samples.shape}")
                _check_finite(samples, "audio array")
                waveforms.append(samples)
        target = self.max_frames if max_frames is None else int(max_frames)
        frames = [len(w) // self.hop_length for w in waveforms]
        if padding in ("longest", True):
            width = max(frames)
        elif padding == "max_length":
            width = target
        else:
            raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r}.")
        if truncation and padding == "max_length":
            frames = [min(f, width) for f in frames]
            waveforms = [w[: width * self.hop_length] for w in waveforms]
        width = max([width] + frames)
        longest = max(len(w) for w in waveforms)
        batch = torch.zeros(len(waveforms), max(longest, self.hop_length))
        for row, waveform in enumerate(waveforms):
            batch[row, : len(waveform)] = torch.from_numpy(np.ascontiguousarray(waveform))
        features = self.log_mel(batch)
        values = torch.full((len(waveforms), width, self.feature_size), float(self.padding_value))
        mask = torch.zeros(len(waveforms), width, dtype=torch.int32)
        for row, count in enumerate(frames):
            values[row, :count] = features[row, :count]
            mask[row, :count] = 1
        data = {"input_values": values}
        if return_attention_mask if return_attention_mask is not None else self.return_attention_mask:
            data["attention_mask"] = mask
        if return_tensors == "pt":
            return BatchFeature(data)
        if return_tensors == "np":
            return BatchFeature({k: v.numpy() for k, v in data.items()})
        return BatchFeature({k: list(v.numpy()) for k, v in data.items()})


__all__ = ["Sound2SheetFeatureExtractor", "load_audio", "iter_audio_windows", "audio_duration"]
