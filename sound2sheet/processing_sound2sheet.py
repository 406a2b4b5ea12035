"""Sound2SheetProcessor: the feature extractor and the tokenizer together, and transcription of audio of any length."""

from __future__ import annotations

import functools
import math
import os
from contextlib import nullcontext
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
from transformers import BatchFeature, ProcessorMixin

from .feature_extraction_sound2sheet import audio_duration, iter_audio_windows, load_audio
from .generation_sound2sheet import with_note_grammar
from .notes import Note, pitch_list, sort_notes, write_midi

AudioInput = Union[str, os.PathLike, np.ndarray]

GENERATION_STRATEGIES = ("greedy", "beam", "sample")
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs that compute in bfloat16 natively


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bfloat16 natively (AMX or AVX512-BF16), read from `cpuinfo` (Linux) once per path.
    Elsewhere, where PyTorch emulates bfloat16 and autocast is several times slower than float32, or unknown: False."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def use_bf16(bf16: Optional[bool], model) -> bool:
    """The autocast decision: `bf16` if given, else bfloat16 exactly when the model runs on a CPU that has it natively."""
    if model.device.type != "cpu":
        return False
    return cpu_has_fast_bf16() if bf16 is None else bool(bf16)


def strategy_generate_kwargs(
    strategy: str = "greedy",
    num_beams: Optional[int] = None,
    temperature: Optional[float] = None,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
) -> dict:
    """`generate()` keyword arguments for a named decoding strategy (the seed's InferenceConfig choices).

    Options that do not apply to the strategy are rejected rather than silently ignored.
    """
    if strategy not in GENERATION_STRATEGIES:
        raise ValueError(f"Unknown decoding strategy '{strategy}'; choose one of {', '.join(GENERATION_STRATEGIES)}.")
    sampling_options = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    if strategy != "sample":
        given = [name for name, value in sampling_options.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply to --strategy sample, not '{strategy}'.")
    if strategy != "beam" and num_beams not in (None, 1):
        raise ValueError(f"num_beams only applies to --strategy beam, not '{strategy}'.")
    if strategy == "greedy":
        return {"do_sample": False, "num_beams": 1}
    if strategy == "beam":
        beams = 4 if num_beams is None else num_beams
        if beams < 2:
            raise ValueError(f"Beam search needs num_beams >= 2, got {beams}.")
        return {"do_sample": False, "num_beams": beams}
    if temperature is not None and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}.")
    return {"do_sample": True, "num_beams": 1, **{k: v for k, v in sampling_options.items() if v is not None}}


def clip_notes(notes: Iterable[Note], duration: float) -> List[Note]:
    """Notes in onset order, cut at `duration` seconds (the padded last window reaches past the audio's end)."""
    clipped = []
    for note in notes:
        if note.onset < duration:
            end = min(note.offset, duration)
            clipped.append(note if end == note.offset else Note(note.onset, end, note.pitch, note.velocity))
    return sort_notes(clipped)


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class Sound2SheetProcessor(ProcessorMixin):
    r"""
    Wraps a [`Sound2SheetFeatureExtractor`] and a [`Sound2SheetTokenizer`] into one processor.

    - `processor(audio=..., notes=...)` makes model inputs for one window: `input_values` (+ `attention_mask`) from the
      audio, and `labels` (padded with -100) from the notes, for training.
    - `processor.transcribe(audio, model)` transcribes audio of any length: it cuts the audio into consecutive windows
      while reading it, runs them through `model.generate()` in batches, and stitches the notes across window boundaries
      with the tokenizer's tie section, so a note held across windows comes out as one note. Memory is bounded by the
      window batch, not by the audio length.

    Args:
        feature_extractor ([`Sound2SheetFeatureExtractor`]): makes log-mel windows.
        tokenizer ([`Sound2SheetTokenizer`]): turns notes into event tokens and back.
    """

    def __init__(self, feature_extractor, tokenizer):
        super().__init__(feature_extractor, tokenizer)

    @property
    def window_seconds(self) -> float:
        return float(self.feature_extractor.window_seconds)

    @property
    def window_samples(self) -> int:
        return int(round(self.window_seconds * self.feature_extractor.sampling_rate))

    def __call__(
        self,
        audio: Union[AudioInput, Sequence[AudioInput], None] = None,
        notes: Union[Sequence[Note], Sequence[Sequence[Note]], None] = None,
        sampling_rate: Optional[int] = None,
        window_start: float = 0.0,
        return_tensors: str = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Model inputs for one window (or a batch of windows).

        Args:
            audio: a path, a 1-D array at the extractor's rate, or a list of them; cut/padded to one window.
            notes: the notes of one window (a list of `Note`) or of each window in the batch (a list of lists), in
                seconds from the start of the audio; encoded relative to `window_start`.
            sampling_rate: rate of array inputs (must be the extractor's; resample with `load_audio` first).
            window_start: where the window starts, in seconds, for the notes.
        """
        if audio is None and notes is None:
            raise ValueError("Pass audio, notes, or both.")
        result = BatchFeature()
        if audio is not None:
            result.update(self.feature_extractor(audio, sampling_rate=sampling_rate, return_tensors=return_tensors, **kwargs))
        if notes is not None:
            batch = [notes] if not notes or isinstance(notes[0], Note) else notes
            sequences = [self.tokenizer.encode_notes(list(window), window_start=window_start) for window in batch]
            longest = max(len(ids) for ids in sequences)
            labels = np.full((len(sequences), longest), -100, dtype=np.int64)
            for row, ids in enumerate(sequences):
                labels[row, : len(ids)] = ids
            result["labels"] = torch.from_numpy(labels) if return_tensors == "pt" else labels
        return result

    def batch_decode(self, *args, **kwargs):
        """Readable text of token ids; see the tokenizer's `batch_decode`."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        """Readable text of token ids; see the tokenizer's `decode`."""
        return self.tokenizer.decode(*args, **kwargs)

    def iter_windows(self, audio: AudioInput, sampling_rate: Optional[int] = None) -> Iterator[np.ndarray]:
        """Consecutive mono windows at the extractor's rate (the last one zero-padded).

        Files are read block by block; an array is resampled from `sampling_rate` (default: the extractor's rate).
        """
        target = self.feature_extractor.sampling_rate
        if isinstance(audio, (str, os.PathLike)):
            yield from iter_audio_windows(audio, self.window_samples, sampling_rate=target)
            return
        samples = load_audio(np.asarray(audio), sampling_rate=target, orig_sampling_rate=sampling_rate or target)
        for start in range(0, max(len(samples), 1), self.window_samples):
            window = samples[start : start + self.window_samples]
            if len(window) < self.window_samples:
                window = np.pad(window, (0, self.window_samples - len(window)))
            yield window

    def duration(self, audio: AudioInput, sampling_rate: Optional[int] = None) -> float:
        """Length in seconds of a file (from its header) or of an array at `sampling_rate`."""
        if isinstance(audio, (str, os.PathLike)):
            return audio_duration(audio)
        return len(np.asarray(audio)) / float(sampling_rate or self.feature_extractor.sampling_rate)

    def count_windows(self, audio: AudioInput, sampling_rate: Optional[int] = None) -> int:
        """How many windows `iter_windows` yields for this (file or mono array) audio."""
        return max(1, math.ceil(round(self.duration(audio, sampling_rate) / self.window_seconds, 6)))

    def generate_windows(
        self,
        windows: Iterable[np.ndarray],
        model,
        batch_size: int = 8,
        bf16: Optional[bool] = None,
        **generate_kwargs,
    ) -> Iterator[List[int]]:
        """Token ids (decoder start removed) for each window, generated `batch_size` windows at a time (`bf16` and
        `grammar`: see `transcribe`)."""
        generate_kwargs = with_note_grammar(generate_kwargs, self.tokenizer)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if use_bf16(bf16, model) else nullcontext()
        for batch in _batched(windows, batch_size):
            features = self.feature_extractor(batch, sampling_rate=self.feature_extractor.sampling_rate, return_tensors="pt")
            with torch.inference_mode(), autocast:
                sequences = model.generate(
                    input_values=features["input_values"].to(model.device), num_return_sequences=1, **generate_kwargs
                )
            for row in sequences.tolist():
                yield row[1:]  # drop the decoder start token

    def transcribe(
        self,
        audio: AudioInput,
        model,
        sampling_rate: Optional[int] = None,
        batch_size: int = 8,
        midi_path: Optional[str | os.PathLike] = None,
        progress: bool = False,
        bf16: Optional[bool] = None,
        **generate_kwargs: Any,
    ) -> List[Note]:
        """Transcribe audio of any length into notes (seconds from the start of the audio), in onset order.

        Args:
            audio: a file path (WAV/FLAC/OGG, any rate and channel count) or an array (at `sampling_rate`).
            model: a [`Sound2SheetForConditionalGeneration`].
            batch_size: windows decoded together; memory grows with it, not with the audio length.
            midi_path: also write the notes to this MIDI file.
            progress: show a progress bar over the windows.
            bf16: run the model under bfloat16 autocast on CPU. None (default): exactly when the CPU computes
                bfloat16 natively (AMX or AVX512-BF16; `cpu_has_fast_bf16`), where it is faster; elsewhere PyTorch
                emulates it and float32 is faster. The notes match float32's up to rare near-ties.
            generate_kwargs: decoding options for `model.generate()` (`num_beams`, `do_sample`, `temperature`, `top_k`,
                `top_p`, `max_new_tokens`, `logits_processor`, ...); see `strategy_generate_kwargs` for named
                strategies. Decoding keeps to the tokenizer's note-event grammar (`NoteEventGrammarLogitsProcessor`:
                times never go back, pitches ascend within a step), which bounds every window's length; pass
                `grammar=False` to decode unconstrained.

        Raises:
            ValueError: the audio cannot be read or is empty or not finite (the message names the file).
        """
        if not isinstance(audio, (str, os.PathLike)):  # resample and check an array once, up front
            target = self.feature_extractor.sampling_rate
            audio = load_audio(np.asarray(audio), sampling_rate=target, orig_sampling_rate=sampling_rate or target)
            sampling_rate = target
        windows = self.iter_windows(audio, sampling_rate)
        if progress:
            from tqdm.auto import tqdm

            name = os.path.basename(os.fspath(audio)) if isinstance(audio, (str, os.PathLike)) else "audio"
            windows = tqdm(windows, total=self.count_windows(audio, sampling_rate), desc=name, unit="window", leave=False)
        token_windows = list(self.generate_windows(windows, model, batch_size=batch_size, bf16=bf16, **generate_kwargs))
        starts = [index * self.window_seconds for index in range(len(token_windows))]
        notes = self.tokenizer.decode_windows(token_windows, starts, window_length=self.window_seconds)
        notes = clip_notes(notes, self.duration(audio))
        if midi_path is not None:
            write_midi(notes, midi_path)
        return notes

    def transcribe_pitches(self, audio: AudioInput, model, **kwargs) -> List[int]:
        """The seed API's view: MIDI pitch numbers of the transcribed notes in onset order."""
        return pitch_list(self.transcribe(audio, model, **kwargs))


__all__ = ["Sound2SheetProcessor", "strategy_generate_kwargs", "cpu_has_fast_bf16", "GENERATION_STRATEGIES"]
