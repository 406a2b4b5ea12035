"""Sound2SheetProcessor: the feature extractor and the tokenizer together, and transcription of audio of any length."""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np
import torch
from transformers import BatchFeature, ProcessorMixin
from transformers.modeling_outputs import BaseModelOutput

from .feature_extraction_sound2sheet import audio_duration, iter_audio_windows, load_audio
from .generation_sound2sheet import (
    beam_search_dropping_finished,
    beam_search_drops_finished,
    decodes_continuously,
    decodes_in_rounds,
    generate_continuously,
    generate_in_rounds,
    with_note_grammar,
)
from .notes import Note, pitch_list, sort_notes, write_midi
from .offset_refiner import refine_offsets as refine_note_offsets

AudioInput = Union[str, os.PathLike, np.ndarray]
T = TypeVar("T")

GENERATION_STRATEGIES = ("greedy", "beam", "sample")
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs that compute in bfloat16 natively
BF16_ENCODER = "encoder"  # `transcribe(bf16=...)`: bfloat16 autocast for the encoder, the decoder in float32
# Notes placed on the frame head (`refine_notes_with_frames`): a peak of the onset head counts from ONSET_THRESHOLD, a
# decoded onset moves at most ONSET_REACH seconds to reach one, and an onset peak that no decoded note took becomes a
# note of its own (the decoder missed it) from ADDED_ONSET_THRESHOLD, or whatever its probability when the head hears it
# start its pitch: the pitch's sounding probability under START_BEFORE in the column before the peak and at least
# START_AFTER in one of the START_COLUMNS after it. A pitch sounds while its probability is at least SUSTAIN_THRESHOLD,
# through silences of up to SUSTAIN_GAP seconds, and a note ends OFFSET_LEAD seconds before the head stops hearing it
# (the head's patches span 160 ms, and it hears a pitch a little past its release: short notes came out late), where
# the probability falls through SUSTAIN_THRESHOLD between two columns (interpolated; halfway between them before:
# stage 10 on data/piano-synth-v4's validation split 0.671 -> 0.674 onset+offset F1).
# ONSET_THRESHOLD and ONSET_REACH were chosen on the validation split of data/piano-synth; the others, with
# WINDOW_OVERLAP, with the stage-10 model on the 93 pieces of data/piano-synth-v4's (`benchmarks/quality.py
# --manifest-dir data/piano-synth-v4 --split val --no-basic-pitch`), data/piano-synth's 12 as a check: onset F1 /
# onset+offset F1 0.909 / 0.671 as they are, 0.887 / 0.641 with the windows end to end (`--window-overlap 0`), 0.863 /
# 0.540 with the earlier settings (added from 0.35, no started notes, sounding from 0.3, no gap, no lead, windows end to
# end). Along the way (cached windows, one setting at a time): without started notes or the lead, 0.867 / 0.601 end to
# end, 0.885 / 0.626 overlapping by 0.32 s, 0.883 / 0.619 by 0.16 s; a lead of 0.02, 0.03 or 0.04 s, onset+offset
# 0.647, 0.652, 0.650 (0.03 s sounding from 0.3 or 0.5: 0.647); gaps of 0.16 or 0.32 s 0.006 lower; started notes,
# 0.885 -> 0.906 on onsets (3-hour split: 0.874 -> 0.900), with added peaks from 0.35, 0.45, 0.6, 0.7, 0.8: 0.896,
# 0.906, 0.909, 0.908, 0.904; START_AFTER 0.6 or 0.8, START_BEFORE 0.4 or 0.6, 1 or 3 columns: within 0.003.
ONSET_THRESHOLD = 0.06
ONSET_REACH = 0.25
SUSTAIN_THRESHOLD = 0.4
SUSTAIN_GAP = 0.24
OFFSET_LEAD = 0.03
# A note that has sounded for HELD_AFTER seconds sounds on while its pitch's probability stays at HELD_THRESHOLD or more
# (`end_notes_on_sustain`): a long note dies away, under the pedal too, and the head grows unsure that it still sounds,
# while the offset tolerance grows with the note (a fifth of its length). Chosen with the stage-14 model on the 93
# validation pieces of the 24-hour corpus (`benchmarks/note_endings.py`, each piece decoded once and its notes placed
# with every setting): onset+offset F1 0.689 with none, 0.696 with 0.2 from 1 s; 0.15-0.25 from 1-1.25 s within 0.001
# of it, from 0.5, 0.75, 1.5 or 2 s lower (0.1 from 0.5 s: 0.662); a longer silence sounded through once held (0.32 s)
# within 0.001, 0.8 s lower. The 3-hour corpus's 12 validation pieces as a check: 0.703 -> 0.717.
HELD_THRESHOLD = 0.2
HELD_AFTER = 1.0
ADDED_ONSET_THRESHOLD = 0.6
START_BEFORE = 0.5
START_AFTER = 0.7
START_COLUMNS = 2
# With a frame head that predicts offsets (`config.frame_offsets`), a note ends on the highest peak of its pitch's offset
# probability that is over OFFSET_PEAK_THRESHOLD and within OFFSET_REACH seconds of where the sounding probabilities end
# it (`end_notes_on_sustain`), OFFSET_PEAK_LEAD seconds before the peak: a peak's place does not depend on how well the
# probabilities are calibrated, which an unfamiliar piano shifts. Chosen with a model given offsets for 1000 steps
# (README, "Notes placed on the frame head"), by the mean onset+offset F1 on the 24-hour corpus's validation split and on
# those pieces rendered by TiMidity++ with the freepats piano, among thresholds 0.1 / 0.2 / 0.3, reaches 0.1 / 0.2 /
# 0.4 s and leads 0 / 0.02 s: 0.684 and 0.548 there (0.680 and 0.544 with no lead; a reach of 0.4 s lost 0.01-0.02 on
# the first, 0.1 s up to 0.008 on the second).
OFFSET_PEAK_THRESHOLD = 0.2
OFFSET_REACH = 0.2
OFFSET_PEAK_LEAD = 0.02
# Refined transcription overlaps consecutive windows by WINDOW_OVERLAP seconds (1.14x the windows) and takes each
# stretch of audio from the window it lies furthest inside (`window_ownership`). Cut end to end, the frame head has no
# column over a seam (its columns are 160 ms apart there instead of 40 ms) and hears the first and last 160 ms of a
# window without the context on one side: on the validation split of data/piano-synth, onset recall was 0.62 and 0.45
# in those stretches, against 0.74-0.87 elsewhere.
WINDOW_OVERLAP = 0.32
# Transcription batching, measured on 2 CPU cores (benchmarks/speed.py, benchmarks/transcribe_memory.py). Windows per
# decoding batch: sampling (and greedy search, before continuous batching) decodes in rounds that set finished windows
# aside, so a large batch shares each step's overhead among many rows (greedy, a 5-minute piece, 2 threads: 14.7x
# realtime with batches of 8 in one generate() call each, 26.8x with 48 in rounds, 32.1x with the next batch encoded
# ahead; 128 was about 1.3x faster than 48 in hand runs). But a batch holds about 1 MB per window (cross-attention
# keys and values): from 30 s to 10 min of audio the peak grew 4-13 % with 48 (four runs), 5 % with 32, 26 % with 128,
# and 20-24 % with 48 encoding ahead (three runs), whose encoder work is alive while a batch decodes. Beam search sets
# finished windows aside step by step (4 beams, the same piece, 2 threads: CPU 77 s with batches of 4 in one
# generate() call each; set aside, 44 s with 16, 34 s with 32 or 48, whose peaks were 611, 658 and 740 MB). Other
# options make one generate() call per batch, which runs until its longest window ends: small batches.
# Greedy search decodes a stream of windows with continuous batching (`generate_continuously`): a pool of
# CONTINUOUS_POOL_SIZE windows, each handing its row to the next window as it ends, so every step runs on a full pool.
# 181 s of the test split, 2 threads, no encoding ahead, hand runs (two each): 4.2-5.8 s with 24, 4.6-5.3 s
# with 48, 5.5-6.6 s with 16. With encoding ahead the decoder has one thread: 1.15x slower, but the CPU time is
# 0.75x (benchmarks/speed.py on the 5-minute piece, two runs each); it stays on. Peak memory from 30 s to 10 min of
# audio: +13.2 to +13.7 % with 24 (three runs; 1 window per encoder pass instead of 2: the same), +12.2 % with 16;
# without encoding ahead +10.0 % with 24, +11.6 % with 32 (float32, AVX2 CPU). On an AVX512-BF16 CPU (bfloat16
# autocast), after the pool halves as it runs out (`pool_rows`): +11.9 % and +9.2 % with 24, +8.6 % without encoding
# ahead; greedy search there 45.6x realtime at 0.98x basic-pitch's CPU time (speed.py, 2 threads, one run). With the
# decoder in float32 (`resolve_bf16`: its keys and values take twice the memory) and every window encoded in the
# background thread (`made_ahead`): +11.5 % and +14.7 % with 24, +10.8 % and +10.7 % with 16 before the second change;
# after it, +5.0 % and +8.9 % with 16 and +8.3 % and +10.1 % with 20 (the 30 s baseline alone varies 459-476 MB).
# Greedy search on the 5-minute piece, 2 threads: 0.0232 CPU s per audio s with 24 (0.83x basic-pitch's in the same
# run, 52.7x realtime), 0.0248 with 16 (0.89x, 50.8x realtime): 16 keeps within 10 % at a 7 % CPU cost.
# Windows per feature/encoder pass: the encoder costs the same per window from 1 to 8 windows (1 or 2 threads), and
# its activations are large; with encoding ahead they are alive while a batch decodes (10 min of audio, batch 48: peak
# 591 MB with 8, 563 with 4, 539 with 2). Decoding steps per round.
BATCH_SIZE = 48
CONTINUOUS_POOL_SIZE = 16
BEAM_BATCH_SIZE = 32
ONE_CALL_BATCH_SIZE = 4
ENCODER_BATCH_SIZE = 2
ROUND_TOKENS = 16
MIN_NOTE_SECONDS = 0.01  # a placed note lasts at least one time step
OFFSET_DECIMALS = 3  # offsets from the frame head, to the millisecond (interpolated between its 40 ms columns)
# The frame head's pitches: onset probabilities of MIDI 0-127, then sounding probabilities, then (from a model with
# `config.frame_offsets`) offset probabilities.
FRAME_PITCHES = 128


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


def resolve_bf16(bf16: Union[bool, str, None], model) -> Tuple[bool, bool]:
    """Where `transcribe` runs bfloat16 CPU autocast: (the encoder, the decoder).

    `bf16=True`: both; False: neither; `BF16_ENCODER` ("encoder"): the encoder only. None: the encoder only, and
    exactly when the model runs on a CPU that computes bfloat16 natively (`cpu_has_fast_bf16`). The encoder's large
    matrix products run faster there (`benchmarks/model_speed.py`); the decoder's one-token steps run faster in
    float32: under autocast each step converts weights and cached keys and values, which costs more than the
    products save (`benchmarks/speed.py --bf16 on|auto`). A model on another device: neither.
    """
    if not (bf16 is None or isinstance(bf16, bool) or bf16 == BF16_ENCODER):
        raise ValueError(f"bf16 must be True, False, None or {BF16_ENCODER!r}; got {bf16!r}.")
    if model.device.type != "cpu":
        return False, False
    if bf16 is None:
        bf16 = BF16_ENCODER if cpu_has_fast_bf16() else False
    return bool(bf16), bf16 is True


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


def onset_peaks(
    probabilities: Iterable[np.ndarray],
    window_starts: Iterable[float],
    frame_grid: Tuple[float, float, int],
    threshold: float = ONSET_THRESHOLD,
) -> Dict[int, np.ndarray]:
    """The onset head's peaks: for each MIDI pitch, the sorted times (seconds) of the encoder columns where its onset
    probability is over `threshold` and a maximum along time (of a plateau, the last column).

    Args:
        probabilities: per window, a (columns, pitches) array of onset probabilities (the first 128 of
            `Sound2SheetForConditionalGeneration.frame_probabilities`).
        window_starts: each window's start in seconds.
        frame_grid: (centre of the first column in seconds, seconds between columns, columns), the model's
            `config.frame_grid`.
    """
    times: Dict[int, list] = {}
    for probs, start in zip(probabilities, window_starts):
        for pitch, time, _ in _window_peaks(probs, start, frame_grid, threshold):
            times.setdefault(pitch, []).append(time)
    return {pitch: np.array(sorted(found)) for pitch, found in times.items()}


def _window_peaks(
    probabilities: np.ndarray, window_start: float, frame_grid: Tuple[float, float, int], threshold: float
) -> Iterator[Tuple[int, float, float]]:
    """(pitch, time in seconds, probability) of each onset peak of one window's (columns, pitches) onset
    probabilities (see `onset_peaks`)."""
    first, step, _ = frame_grid
    probs = np.asarray(probabilities, dtype=np.float32)
    for column, pitch in zip(*_peak_cells(probs, threshold)):
        yield int(pitch), round(float(window_start) + first + step * int(column), 6), float(probs[column, pitch])


def _peak_cells(probabilities: np.ndarray, threshold: float) -> Tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of the cells of a (time, pitches) table over `threshold` and a maximum along time (of a
    plateau, the last row)."""
    is_peak = probabilities > threshold
    is_peak[1:] &= probabilities[1:] >= probabilities[:-1]
    is_peak[:-1] &= probabilities[:-1] > probabilities[1:]
    return np.nonzero(is_peak)


def place_notes_on_onsets(notes: Iterable[Note], peaks: Dict[int, np.ndarray], reach: float = ONSET_REACH) -> List[Note]:
    """Decoded notes placed on the onset head's peaks (`onset_peaks`), in onset order.

    Each note's onset moves to the nearest peak of its pitch within `reach` seconds (its offset stays, or follows to
    one time step after the new onset). A note with no peak of its pitch in reach is dropped, and so is a note whose
    peak an earlier note already took: the decoder wrote that onset twice.
    """
    placed, taken = [], set()
    for note in sort_notes(notes):
        times = peaks.get(note.pitch)
        if times is None or not len(times):
            continue
        index = int(np.searchsorted(times, note.onset))
        nearby = times[max(index - 1, 0) : index + 1]
        onset = float(nearby[np.argmin(np.abs(nearby - note.onset))])
        if abs(onset - note.onset) > reach or (note.pitch, onset) in taken:
            continue
        taken.add((note.pitch, onset))
        placed.append(Note(onset, max(note.offset, onset + MIN_NOTE_SECONDS), note.pitch, note.velocity))
    return sort_notes(placed)


def add_missed_onsets(
    placed: Sequence[Note],
    peaks: Dict[int, Tuple[np.ndarray, ...]],
    decoded: Sequence[Note],
    threshold: float = ADDED_ONSET_THRESHOLD,
) -> List[Note]:
    """`placed` and a note for each onset peak that none of them took and that the head is sure of (probability at
    least `threshold`) or hears starting (see `FrameEvidence`): the decoder missed it. In onset order.

    An added note takes the velocity of the decoded note nearest in time (of any pitch; 64 when nothing was decoded)
    and lasts one time step: `end_notes_on_sustain` then gives it its offset.

    Args:
        placed: the decoded notes placed on the onset peaks (`place_notes_on_onsets`): each onset is a peak time.
        peaks: for each MIDI pitch, the sorted times of its onset peaks and their probabilities, and optionally
            whether the head hears each one start its pitch sounding (booleans; none when absent).
        decoded: the decoder's notes, for the velocities.
    """
    taken = {(note.pitch, note.onset) for note in placed}
    onsets = np.array([note.onset for note in decoded])
    velocities = [note.velocity for note in decoded]
    added = []
    for pitch, (times, probabilities, *started) in peaks.items():
        sure = probabilities >= threshold
        if started:
            sure |= np.asarray(started[0], dtype=bool)
        for time in times[sure].tolist():
            if (pitch, time) not in taken:
                velocity = velocities[int(np.argmin(np.abs(onsets - time)))] if velocities else 64
                added.append(Note(time, round(time + MIN_NOTE_SECONDS, 6), pitch, velocity))
    return sort_notes([*placed, *added])


def column_times(
    windows: Sequence[np.ndarray],
    window_starts: Sequence[float],
    first_columns: Sequence[int],
    frame_grid: Tuple[float, float, int],
) -> np.ndarray:
    """The centres, in seconds, of the rows of all `windows` together: window i's rows are its consecutive columns
    from `first_columns[i]` on, its first column centred `frame_grid[0]` seconds after `window_starts[i]`."""
    first, step, _ = frame_grid
    return np.concatenate(
        [
            float(start) + first + step * (column + np.arange(len(window)))
            for window, start, column in zip(windows, window_starts, first_columns)
        ]
    )


def end_notes_on_sustain(
    notes: Iterable[Note],
    sounding: Sequence[np.ndarray],
    window_starts: Sequence[float],
    frame_grid: Tuple[float, float, int],
    first_columns: Optional[Sequence[int]] = None,
    gap: float = SUSTAIN_GAP,
    lead: float = OFFSET_LEAD,
    threshold: float = SUSTAIN_THRESHOLD,
    held_threshold: float = HELD_THRESHOLD,
    held_after: float = HELD_AFTER,
    offsets: Optional[Sequence[np.ndarray]] = None,
    offset_threshold: float = OFFSET_PEAK_THRESHOLD,
    offset_reach: float = OFFSET_REACH,
    offset_lead: float = OFFSET_PEAK_LEAD,
) -> List[Note]:
    """Notes whose offsets come from where the frame head hears their pitch, in onset order.

    A pitch sounds in the columns where its sounding probability is at least `threshold`, or, from `held_after`
    seconds after a note's onset, at least `held_threshold`. From one column after its onset, a note sounds while its
    pitch does, through silences of up to `gap` seconds after which the pitch sounds again, up to where the
    probability falls through the threshold of its last sounding column (interpolated linearly between that column
    and the next); at the latest up to where its pitch starts again, and to the end of the last window when the pitch
    sounds to the end. It ends `lead` seconds before that (one time step after its onset at the earliest), to the
    millisecond. A note never heard ends halfway between the column after its onset and the one before.

    With `offsets` (a head that predicts them), a note whose pitch has an offset peak near that end (before the lead)
    ends on it instead: of the pitch's peaks (over `offset_threshold` and a maximum along time, of a plateau the last
    column, as onset peaks are found) at most `offset_reach` seconds from the end, from one column after the note's
    onset and not past the pitch's next onset, the one of highest probability. Its time is refined between columns by
    the parabola through the peak and its two neighbours (at most half a column; not at the first or last column of a
    stretch of consecutive columns, e.g. a window of windows cut end to end) and cut at the pitch's next onset; the
    note ends `offset_lead` seconds before it. A note with no such peak ends as without `offsets`.

    Args:
        notes: notes with their onsets placed (`place_notes_on_onsets`).
        sounding: per window, a (columns, pitches) array of the frame head's sounding probabilities (the second 128
            of `Sound2SheetForConditionalGeneration.frame_probabilities`; any float type).
        window_starts, frame_grid: as for `onset_peaks`.
        first_columns: per window, the column of its window that the first row of its `sounding` array is (the
            rows are consecutive columns); None: 0 for every window. Overlapping windows keep only the columns they
            own (`window_ownership`), so that the rows of all windows follow each other in time.
        gap: the longest silence, in seconds (rounded to whole columns), that a note sounds through.
        lead: seconds by which a note ends before the head stops hearing it (`OFFSET_LEAD`).
        threshold: the sounding probability from which a pitch sounds (`SUSTAIN_THRESHOLD`).
        held_threshold, held_after: the sounding probability from which the pitch of a note that has sounded for
            `held_after` seconds sounds (`HELD_THRESHOLD`, `HELD_AFTER`); at most `threshold`, which turns it off.
        offsets: per window, a (columns, pitches) array of the frame head's offset probabilities (the third 128 of
            `frame_probabilities`, from a model with `config.frame_offsets`; any float type), its rows the same
            columns as `sounding`'s; None: the notes end on the sounding probabilities alone.
        offset_threshold: the probability over which an offset peak counts (`OFFSET_PEAK_THRESHOLD`).
        offset_reach: the furthest, in seconds, that an offset peak may lie from where the sounding probabilities end
            the note (`OFFSET_REACH`).
        offset_lead: seconds by which a note ends before its offset peak (`OFFSET_PEAK_LEAD`).

    Raises:
        ValueError: `held_threshold` is over `threshold`.
    """
    if held_threshold > threshold:
        raise ValueError(f"held_threshold ({held_threshold}) must not be over threshold ({threshold}).")
    first, step, _ = frame_grid
    bridged = int(round(gap / step))
    notes = sort_notes(notes)
    if not notes:
        return []
    first_columns = [0] * len(window_starts) if first_columns is None else first_columns
    times = column_times(sounding, window_starts, first_columns, frame_grid)
    probabilities = np.concatenate([np.asarray(window) for window in sounding])
    peaks = None if offsets is None else _offset_peaks(offsets, times, step, offset_threshold)
    restarts: Dict[int, list] = {}
    for note in notes:  # in onset order, so each pitch's onsets come out sorted
        restarts.setdefault(note.pitch, []).append(note.onset)
    ended = []
    for note in notes:
        onsets = restarts[note.pitch]
        later = bisect.bisect_right(onsets, note.onset)  # the pitch's next onset, if any
        restart = onsets[later] if later < len(onsets) else math.inf
        begin = int(np.searchsorted(times, note.onset + step, side="left"))
        # Past the column at or after the next onset, a column matters only as the end of a silence sounded through.
        stop = len(times) if restart == math.inf else int(np.searchsorted(times, restart, side="left")) + bridged + 2
        values = probabilities[begin:stop, note.pitch]
        long_from = int(np.searchsorted(times, note.onset + held_after, side="left"))  # its first column held that long
        thresholds = np.full(len(values), threshold, dtype=values.dtype)
        thresholds[max(long_from - begin, 0) :] = held_threshold
        sounds = np.flatnonzero(values >= thresholds)
        breaks = np.flatnonzero(np.diff(sounds, prepend=-1) > bridged + 1)  # silences too long to sound through
        held = sounds[: breaks[0]] if len(breaks) else sounds
        end = int(held[-1]) + 1 if len(held) else 0  # the column after the note's last sounding one
        if end == len(values):  # sounds to the last column looked at: half a column past it
            offset = float(times[begin + end - 1] + step / 2)
        elif end == 0:
            offset = float(times[begin] - step / 2)
        else:  # where the probability falls through the threshold, between the last sounding column and the next
            last, after = float(values[end - 1]), float(values[end])
            crossed = threshold if begin + end - 1 < long_from else held_threshold  # `after` is under it too
            offset = float(times[begin + end - 1] + step * (last - crossed) / (last - after))
        offset = min(offset, restart)
        peak = None if peaks is None else _offset_peak_near(peaks.get(note.pitch), offset, note.onset + step, restart, offset_reach)
        offset = round(offset - lead if peak is None else min(peak, restart) - offset_lead, OFFSET_DECIMALS)
        ended.append(Note(note.onset, round(max(offset, note.onset + MIN_NOTE_SECONDS), 6), note.pitch, note.velocity))
    return ended


def _offset_peaks(
    offsets: Sequence[np.ndarray], times: np.ndarray, step: float, threshold: float
) -> Dict[int, Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """For each pitch with offset peaks (`end_notes_on_sustain`): their column times, the times refined between
    columns, and their probabilities, in time order. `times` are the times of the rows of all windows' `offsets`
    together; the rows are cut into stretches where consecutive columns lie about one `step` apart, and the peaks of
    each stretch are its own."""
    table = np.concatenate([np.asarray(window, dtype=np.float32) for window in offsets])
    if len(table) != len(times):
        raise ValueError(f"offsets hold {len(table)} columns, but the sounding probabilities {len(times)}: align them.")
    seams = np.flatnonzero(np.diff(times) > 1.5 * step) + 1
    found: Dict[int, list] = {}
    for begin, end in zip([0, *seams], [*seams, len(table)]):
        stretch = table[begin:end]
        for row, pitch in zip(*_peak_cells(stretch, threshold)):
            peak = float(stretch[row, pitch])
            shift = 0.0
            if 0 < row < len(stretch) - 1:  # the vertex of the parabola through the peak and its neighbours
                before, after = float(stretch[row - 1, pitch]), float(stretch[row + 1, pitch])
                shift = float(np.clip(0.5 * (before - after) / (before - 2 * peak + after), -0.5, 0.5))
            time = float(times[begin + row])
            found.setdefault(int(pitch), []).append((time, time + shift * step, peak))
    return {pitch: tuple(np.array(column) for column in zip(*sorted(rows))) for pitch, rows in found.items()}


def _offset_peak_near(
    peaks: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]], end: float, earliest: float, latest: float, reach: float
) -> Optional[float]:
    """The refined time of the most probable of a pitch's offset peaks (`_offset_peaks`) whose column lies within
    `reach` seconds of `end` and in [`earliest`, `latest`]; None when there is none."""
    if peaks is None:
        return None
    columns, refined, probabilities = peaks
    eligible = (np.abs(columns - end) <= reach) & (columns >= earliest) & (columns <= latest)
    if not eligible.any():
        return None
    return float(refined[eligible][np.argmax(probabilities[eligible])])


def window_ownership(window_starts: Sequence[float], overlap: float) -> List[Tuple[float, float]]:
    """The stretch of time, [begin, end) in seconds, whose onsets and frames each of the windows starting at
    `window_starts` (in order, overlapping by `overlap` seconds) is trusted with: from half the overlap after its
    start to where the next window's begins; the first window's from minus infinity, the last's to infinity. Each
    moment belongs to exactly one window, the one it lies furthest inside. Without overlap, a window owns itself."""
    begins = [-math.inf] + [_owned_from(start, overlap) for start in window_starts[1:]]
    return list(zip(begins, begins[1:] + [math.inf]))


def _owned_from(window_start: float, overlap: float) -> float:
    """Where the stretch owned by a window starting at `window_start` (not the first) begins (`window_ownership`)."""
    return round(float(window_start) + overlap / 2, 6)


def resolve_window_overlap(window_overlap: Optional[float], refine: bool, window_seconds: float) -> float:
    """Seconds by which `transcribe` overlaps consecutive windows: `window_overlap` if given, else `WINDOW_OVERLAP`
    when the notes are refined on the frame head and 0 otherwise.

    Raises:
        ValueError: `window_overlap` is not in [0, `window_seconds`), or is over 0 without `refine` (unrefined notes
            held across windows are stitched through the tie sections of windows that follow each other end to end).
    """
    if window_overlap is None:
        return WINDOW_OVERLAP if refine else 0.0
    overlap = float(window_overlap)
    if not 0 <= overlap < window_seconds:
        raise ValueError(f"window_overlap must be in [0, {window_seconds}) seconds, got {window_overlap}.")
    if overlap and not refine:
        raise ValueError(
            "window_overlap > 0 needs refine_notes: without the frame head, notes held across windows are stitched "
            "through the tie sections of windows that follow each other end to end."
        )
    return overlap


def windows_needed(duration: float, window_seconds: float, hop: float) -> int:
    """How many windows, each starting `hop` seconds after the one before, cover `duration` seconds of audio: one,
    and one more for each hop while the audio goes on past what the window before holds."""
    return max(1, math.ceil(round((duration - (window_seconds - hop)) / hop, 6)))


def decode_owned_notes(
    tokenizer, windows: Sequence[Sequence[int]], window_starts: Sequence[float], window_length: float, overlap: float
) -> List[Note]:
    """The notes of windows that overlap by `overlap` seconds, in onset order: each window's notes (decoded alone)
    whose onsets lie in the stretch it owns (`window_ownership`). A note held past the end of its window ends there:
    the frame head gives the offsets (`FrameEvidence`). Without overlap, `tokenizer.decode_windows`, which stitches
    held notes through the windows' tie sections."""
    if not overlap:
        return tokenizer.decode_windows(windows, window_starts, window_length=window_length)
    notes = []
    for ids, start, (begin, end) in zip(windows, window_starts, window_ownership(window_starts, overlap)):
        decoded = tokenizer.decode_windows([ids], [start], window_length=window_length)
        notes.extend(note for note in decoded if begin <= note.onset < end)
    return sort_notes(notes)


class FrameEvidence:
    """What the frame head says about a piece, gathered window by window in compact form (its onset peaks with their
    probabilities, and the sounding probabilities in float16: about 16 kB per window instead of the 62 kB of all its
    probabilities; with a head that predicts offsets, their probabilities too, in float16 as `offsets`), to place the
    decoded notes on it once the piece is decoded (`place`).

    Of windows that overlap by `overlap` seconds, each keeps only the columns of the stretch it owns
    (`window_ownership`), and the onset peaks are found along the columns kept from all windows, in time order.
    Without overlap, each window's peaks are its own. A peak is *heard starting* its pitch when, in its window, the
    pitch's sounding probability is under `START_BEFORE` in the column before it and at least `START_AFTER` in one of
    the `START_COLUMNS` columns after it: `place` then adds it as a note whatever its probability, if no decoded note
    took it (`add_missed_onsets`).

    Args:
        frame_grid: the model's `config.frame_grid`.
        overlap: seconds by which consecutive windows overlap.
    """

    def __init__(self, frame_grid: Tuple[float, float, int], overlap: float = 0.0):
        self.frame_grid = tuple(frame_grid)
        self.overlap = float(overlap)
        self.peaks: Dict[int, List[Tuple[float, float, bool]]] = {}  # (time, probability, heard starting)
        self.sounding: List[np.ndarray] = []
        self.offsets: List[np.ndarray] = []  # rows as `sounding`'s, from a head with offsets (else empty)
        self.window_starts: List[float] = []
        self.first_columns: List[int] = []
        self._onsets: Optional[np.ndarray] = None  # the last window's onset probabilities, until the next comes
        self._sounds: Optional[np.ndarray] = None  # and its sounding probabilities, all its columns
        self._before: Optional[np.ndarray] = None  # the last column kept of the window before it

    def add(self, frame_probabilities: np.ndarray, window_start: float):
        """Take one window's (columns, 256) `model.frame_probabilities`, or (columns, 384) from a head with offsets,
        starting at `window_start` seconds (windows in order, all of one width).

        Raises:
            ValueError: the probabilities have another width than 256 or 384, or than the windows before.
        """
        probabilities = np.asarray(frame_probabilities, dtype=np.float32)
        width = probabilities.shape[-1]
        if width not in (2 * FRAME_PITCHES, 3 * FRAME_PITCHES):
            raise ValueError(
                f"frame probabilities must have {2 * FRAME_PITCHES} (onsets, sounding) or {3 * FRAME_PITCHES} (and "
                f"offsets) per column, got {width}."
            )
        with_offsets = width == 3 * FRAME_PITCHES
        if self.window_starts and with_offsets != bool(self.offsets):
            raise ValueError(f"frame probabilities of {width} per column after windows of another width.")
        window_start = float(window_start)
        begin = 0
        if self.window_starts:  # this window owns from half the overlap on, the one before up to there
            first, step, _ = self.frame_grid
            begin = max(0, math.ceil(round((self.overlap / 2 - first) / step, 6)))
            self._close_last(_owned_from(window_start, self.overlap), probabilities[begin : begin + 1, :FRAME_PITCHES])
        self._onsets = probabilities[begin:, :FRAME_PITCHES].copy()
        self._sounds = probabilities[:, FRAME_PITCHES : 2 * FRAME_PITCHES].copy()
        self.sounding.append(probabilities[begin:, FRAME_PITCHES : 2 * FRAME_PITCHES].astype(np.float16))
        if with_offsets:
            self.offsets.append(probabilities[begin:, 2 * FRAME_PITCHES :].astype(np.float16))
        self.window_starts.append(window_start)
        self.first_columns.append(begin)

    def _close_last(self, end: Optional[float], following: Optional[np.ndarray]):
        """Cut the last window's columns at `end` seconds (None: keep them all) and take its onset peaks; with
        overlap, a peak is a maximum along the columns kept from all windows (`following`: the next window's first)."""
        first, step, _ = self.frame_grid
        onsets, begin = self._onsets, self.first_columns[-1]
        times = np.round(self.window_starts[-1] + first + step * (begin + np.arange(len(onsets))), 6)
        if end is not None:
            kept = int(np.searchsorted(times, end, side="left"))
            onsets, times = onsets[:kept], times[:kept]
            self.sounding[-1] = self.sounding[-1][:kept]
            if self.offsets:
                self.offsets[-1] = self.offsets[-1][:kept]
        before = self._before if self.overlap else None
        following = following if self.overlap else None
        table = np.concatenate([rows for rows in (before, onsets, following) if rows is not None])
        shift = 0 if before is None else len(before)
        sounds = self._sounds
        for row, pitch in zip(*_peak_cells(table, ONSET_THRESHOLD)):
            if shift <= row < shift + len(onsets):
                column = begin + row - shift  # in the window
                before = sounds[column - 1, pitch] if column else 0.0
                after = sounds[column + 1 : column + 1 + START_COLUMNS, pitch]
                started = bool(before < START_BEFORE and len(after) and after.max() >= START_AFTER)
                self.peaks.setdefault(int(pitch), []).append((float(times[row - shift]), float(table[row, pitch]), started))
        if len(onsets):
            self._before = onsets[-1:]
        self._onsets = self._sounds = None

    def place(
        self, notes: Iterable[Note], added_onset_threshold: Optional[float] = ADDED_ONSET_THRESHOLD, **ending: float
    ) -> List[Note]:
        """`notes` with onsets on the onset peaks (`place_notes_on_onsets`, which drops the notes the head does not
        support), the peaks that no note took added as notes when they reach `added_onset_threshold` or are heard
        starting (`add_missed_onsets`; None: none added), and offsets where their pitch stops sounding, or on the
        offset peaks near there of a head that predicts them (`end_notes_on_sustain`, given the settings in
        `ending`: `gap`, `lead`, `threshold`, `held_threshold`, `held_after`, ...). Call it once all windows are
        added."""
        if self._onsets is not None:
            self._close_last(None, None)
        notes = list(notes)
        peaks = {}
        for pitch, found in self.peaks.items():
            table = np.array(sorted(found), dtype=np.float64).reshape(-1, 3)
            peaks[pitch] = (table[:, 0], table[:, 1], table[:, 2] > 0)
        placed = place_notes_on_onsets(notes, {pitch: times for pitch, (times, _, _) in peaks.items()})
        if added_onset_threshold is not None:
            placed = add_missed_onsets(placed, peaks, notes, added_onset_threshold)
        return end_notes_on_sustain(
            placed, self.sounding, self.window_starts, self.frame_grid, self.first_columns, offsets=self.offsets or None,
            **ending,
        )

    def sounding_table(self) -> Tuple[np.ndarray, np.ndarray]:
        """The centres (seconds) of the columns kept from all windows, in time order, and their (columns, 128)
        sounding probabilities in float32. Call it once all windows are added."""
        if self._onsets is not None:
            self._close_last(None, None)
        if not self.sounding:
            return np.zeros(0), np.zeros((0, FRAME_PITCHES), dtype=np.float32)
        times = column_times(self.sounding, self.window_starts, self.first_columns, self.frame_grid)
        return times, np.concatenate([np.asarray(window, dtype=np.float32) for window in self.sounding])

    def refine_offsets(self, notes: Iterable[Note], predict) -> List[Note]:
        """`notes` (placed by `place` and cut at the audio's end) with their offsets moved by an offset refiner
        (`predict`: e.g. `model.predict_offset_ratios`; see `sound2sheet.offset_refiner.refine_offsets`)."""
        times, sounding = self.sounding_table()
        return refine_note_offsets(list(notes), times, sounding, predict)

    def placed(self, notes: Iterable[Note], duration: float, predict=None) -> List[Note]:
        """`notes` as transcription gives them: placed (`place`, default settings) and cut at `duration` seconds, and
        with `predict` (an offset refiner's, e.g. `model.predict_offset_ratios`) their offsets then moved by it
        (`refine_offsets`) and cut again."""
        notes = clip_notes(self.place(notes), duration)
        return notes if predict is None else clip_notes(self.refine_offsets(notes, predict), duration)


def refine_notes_with_frames(
    notes: Iterable[Note],
    frame_probabilities: Sequence[np.ndarray],
    window_starts: Sequence[float],
    frame_grid: Tuple[float, float, int],
    added_onset_threshold: Optional[float] = ADDED_ONSET_THRESHOLD,
    window_overlap: float = 0.0,
) -> List[Note]:
    """Decoded notes placed on the frame head's predictions: onsets on its onset peaks (`place_notes_on_onsets`, which
    also drops the notes it does not support), the onsets that the decoder missed and the head is sure of (from
    `added_onset_threshold`) or hears starting its pitch sounding added (`add_missed_onsets`; None adds none), offsets
    where each pitch stops sounding, or on the offset peaks near there of a head that predicts them
    (`end_notes_on_sustain`).

    The decoder chooses most of the notes, with their velocities; its times are tens of milliseconds off, it writes
    surplus notes, and it misses notes in dense passages. The encoder's frame head, trained by the frame loss, places
    onsets and offsets better, and where it is sure of an onset it is usually right.

    Args:
        frame_probabilities: per window, the (columns, 256) array of `model.frame_probabilities`: onset
            probabilities of the 128 MIDI pitches, then sounding probabilities; (columns, 384) from a head with
            offsets (`config.frame_offsets`), then offset probabilities.
        window_overlap: seconds by which the windows overlap; each is trusted with the frames of the stretch it
            owns (`FrameEvidence`). The notes of overlapping windows come from `decode_owned_notes`.
    """
    evidence = FrameEvidence(frame_grid, window_overlap)
    for probabilities, start in zip(frame_probabilities, window_starts):
        evidence.add(probabilities, start)
    return evidence.place(notes, added_onset_threshold)


def encode_windows(model, input_values: torch.Tensor, encoder_batch_size: int = ENCODER_BATCH_SIZE) -> BaseModelOutput:
    """The model's encoder output for a batch of windows, computed `encoder_batch_size` windows at a time: its
    activations are large (hundreds of tokens per window), and in small batches they stay in the CPU's caches."""
    encoder = model.get_encoder()
    hidden = [encoder(chunk).last_hidden_state for chunk in input_values.split(encoder_batch_size)]
    return BaseModelOutput(last_hidden_state=torch.cat(hidden))


def default_batch_size(generate_kwargs: Dict[str, Any], model) -> int:
    """Windows decoded together when the caller gives no `batch_size`: `CONTINUOUS_POOL_SIZE` for greedy search with
    continuous batching (`decodes_continuously`; a model with an encoder), `BATCH_SIZE` for sampling in rounds
    (`decodes_in_rounds`; greedy search of a model without `get_encoder` too),
    `BEAM_BATCH_SIZE` for beam search with finished windows set aside (`beam_search_drops_finished`; 4 beams per
    window), else `ONE_CALL_BATCH_SIZE` (one `generate()` call per batch runs until its longest window ends)."""
    config = getattr(model, "generation_config", None)
    if hasattr(model, "get_encoder") and decodes_continuously(generate_kwargs, config):
        return CONTINUOUS_POOL_SIZE
    if decodes_in_rounds(generate_kwargs, config):
        return BATCH_SIZE
    return BEAM_BATCH_SIZE if beam_search_drops_finished(generate_kwargs, config) else ONE_CALL_BATCH_SIZE


def generate_from_encoder_outputs(model, encoder_outputs: BaseModelOutput, **generate_kwargs) -> torch.LongTensor:
    """`model.generate()` on a batch of encoded windows, with finished windows set aside where the options allow it
    (the same ids as one `generate()` call): greedy search and sampling decode in rounds (`generate_in_rounds`), beam
    search step by step (`beam_search_dropping_finished`). Other options make one `generate()` call."""
    if decodes_in_rounds(generate_kwargs, model.generation_config):
        return generate_in_rounds(model, encoder_outputs, ROUND_TOKENS, **generate_kwargs)
    if beam_search_drops_finished(generate_kwargs, model.generation_config):
        return beam_search_dropping_finished(model, encoder_outputs, **generate_kwargs)
    return model.generate(encoder_outputs=encoder_outputs, num_return_sequences=1, **generate_kwargs)


def generate_with_frames(
    model, input_values: torch.Tensor, frames: bool, **generate_kwargs
) -> Tuple[torch.LongTensor, Optional[torch.Tensor]]:
    """`model.generate()` on a batch of windows (`generate_from_encoder_outputs`), and with `frames` also the frame
    head's (batch, columns, 256 or 384) probabilities (`model.frame_probabilities`): the encoder runs once
    (`encode_windows`), for both. A model without `get_encoder` gets `generate(input_values=...)`."""
    if not hasattr(model, "get_encoder"):
        if frames:
            raise ValueError("Frame probabilities need a model with an encoder (get_encoder) and a frame head.")
        return model.generate(input_values=input_values, num_return_sequences=1, **generate_kwargs), None
    encoder_outputs = encode_windows(model, input_values)
    probabilities = model.frame_probabilities(encoder_outputs.last_hidden_state) if frames else None
    return generate_from_encoder_outputs(model, encoder_outputs, **generate_kwargs), probabilities


def resolve_refine_notes(refine_notes: Optional[bool], model) -> bool:
    """Whether to place the decoded notes on the frame head (`refine_notes_with_frames`): `refine_notes` if given
    (True needs a model with the head), else exactly when the model has the head."""
    has_head = bool(getattr(model, "has_frame_head", False))
    if refine_notes and not has_head:
        raise ValueError(
            "refine_notes=True needs a model with a frame head (trained with frame_loss_weight > 0); this one has none."
        )
    return has_head if refine_notes is None else bool(refine_notes)


def resolve_refine_offsets(refine_offsets: Optional[bool], refine: bool, model) -> bool:
    """Whether transcription moves the placed notes' offsets with the model's offset refiner: None (default) exactly
    when the notes are refined (`refine`) and the model has one (`model.has_offset_refiner`).

    Raises:
        ValueError: `refine_offsets=True` for a model without a refiner, or with unrefined notes.
    """
    has = bool(getattr(model, "has_offset_refiner", False))
    if refine_offsets is None:
        return has and refine
    if refine_offsets and not has:
        raise ValueError("refine_offsets=True, but the model has no offset refiner (`run_transcription.py fit-offsets` fits one).")
    if refine_offsets and not refine:
        raise ValueError("refine_offsets=True needs refined notes: the refiner moves notes placed on the frame head.")
    return bool(refine_offsets)


def cpu_autocast(bf16: bool):
    """A new bfloat16 CPU autocast context with `bf16`, else a null context (a context object is entered once: its
    saved state is its own, and two threads may be inside autocast at once)."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()


def resolve_encode_ahead(encode_ahead: Optional[bool], model) -> bool:
    """Whether `transcribe` encodes the next windows in a background thread while it decodes others: `encode_ahead`
    if given, else exactly when the model runs on a CPU and torch has 2 or more threads."""
    if encode_ahead is not None:
        return bool(encode_ahead)
    return model.device.type == "cpu" and torch.get_num_threads() >= 2


@contextmanager
def threads_shared_out(shared: bool) -> Iterator[None]:
    """With `shared`, torch's intra-op threads (`torch.get_num_threads()`) are halved for the duration of the block,
    so that the encoding thread and the decoding thread together use as many as before; restored on exit."""
    if not shared:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // 2))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def in_background(items: Iterator[T]) -> Iterator[T]:
    """The items of the iterator `items`, each made in one background thread while the caller works on the one
    before (torch releases the GIL while it computes). The first is started at once, before the iteration begins.
    At most two are alive at once: the caller's and the next. An exception raised while making an item is raised
    here, where the item would have come out."""
    done = object()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sound2sheet-ahead")
    future = pool.submit(next, items, done)

    def results() -> Iterator[T]:
        nonlocal future
        try:
            while True:
                item = future.result()
                if item is done:
                    return
                future = pool.submit(next, items, done)
                yield item
                item = None  # not held while the next one is awaited
        finally:
            pool.shutdown(wait=True)

    return results()


@contextmanager
def made_ahead(items: Iterator[T], ahead: bool) -> Iterator[Iterator[T]]:
    """With `ahead`, the items of `items`, each made in a background thread while the caller works on the one before
    (`in_background`), torch's threads shared out between the two for the duration of the block
    (`threads_shared_out`). The first items are made there too, while the caller waits: the encoder's per-thread
    working memory (oneDNN scratchpads, FFT buffers) then lives in one thread, not in both, which keeps the peak of
    long audio closer to that of short audio (`benchmarks/transcribe_memory.py`). Without `ahead`, `items` as they
    are."""
    with threads_shared_out(ahead):
        yield in_background(items) if ahead else items


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
    - `processor.transcribe(audio, model)` transcribes audio of any length: it cuts the audio into windows while
      reading it and runs them through `model.generate()` in batches. With a model that has a frame head, the windows
      overlap (`WINDOW_OVERLAP`), each stretch of audio gets its notes and frames from the window it lies furthest
      inside, and the notes are placed on the head's onsets and offsets (`refine_notes_with_frames`). Without one, the
      windows follow each other end to end and the notes are stitched across their boundaries with the tokenizer's tie
      section, so a note held across windows comes out as one note. Memory is bounded by the window batch, not by the
      audio length (of past windows, only the tokens and the compact frame evidence stay).

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

    def iter_windows(
        self, audio: AudioInput, sampling_rate: Optional[int] = None, overlap: float = 0.0
    ) -> Iterator[np.ndarray]:
        """Mono windows at the extractor's rate, each starting `window_hop(overlap)` seconds after the one before
        (the last one zero-padded), `count_windows` of them.

        Files are read block by block; an array is resampled from `sampling_rate` (default: the extractor's rate).

        Raises:
            ValueError: `overlap` is not in [0, `window_seconds`).
        """
        target = self.feature_extractor.sampling_rate
        overlap_samples = int(round(overlap * target))
        if not 0 <= overlap_samples < self.window_samples:
            raise ValueError(f"overlap must be in [0, {self.window_seconds}) seconds, got {overlap}.")
        hop = self.window_samples - overlap_samples
        if isinstance(audio, (str, os.PathLike)):
            pieces = iter_audio_windows(audio, hop, sampling_rate=target)
        else:
            samples = load_audio(np.asarray(audio), sampling_rate=target, orig_sampling_rate=sampling_rate or target)
            pieces = (np.pad(samples[start : start + hop], (0, max(0, start + hop - len(samples))))
                      for start in range(0, max(len(samples), 1), hop))
        if not overlap_samples:
            yield from pieces
            return
        count = self.count_windows(audio, sampling_rate, overlap)
        piece = next(pieces)
        for _ in range(count):  # a window is a hop of audio and the start of the next one
            following = next(pieces, None)
            head = np.zeros(overlap_samples, dtype=piece.dtype) if following is None else following[:overlap_samples]
            yield np.concatenate([piece, head])
            if following is None:
                return
            piece = following

    def window_hop(self, overlap: float = 0.0) -> float:
        """Seconds from the start of one window to the next when windows overlap by `overlap` seconds."""
        rate = self.feature_extractor.sampling_rate
        return (self.window_samples - int(round(overlap * rate))) / rate

    def duration(self, audio: AudioInput, sampling_rate: Optional[int] = None) -> float:
        """Length in seconds of a file (from its header) or of an array at `sampling_rate`."""
        if isinstance(audio, (str, os.PathLike)):
            return audio_duration(audio)
        return len(np.asarray(audio)) / float(sampling_rate or self.feature_extractor.sampling_rate)

    def count_windows(self, audio: AudioInput, sampling_rate: Optional[int] = None, overlap: float = 0.0) -> int:
        """How many windows `iter_windows` yields for this (file or mono array) audio (`windows_needed`)."""
        return windows_needed(self.duration(audio, sampling_rate), self.window_seconds, self.window_hop(overlap))

    def encoded_batches(
        self,
        windows: Iterable[np.ndarray],
        model,
        batch_size: int,
        bf16: bool = False,
        return_frames: bool = False,
        float_outputs: bool = False,
    ) -> Iterator[Tuple[torch.Tensor, Optional[np.ndarray]]]:
        """Batches of up to `batch_size` windows ready to decode: (their encoder outputs, or their `input_values` for
        a model without `get_encoder`; with `return_frames`, the frame head's (windows, columns, 256 or 384)
        probabilities).

        Each batch is read, featurised and encoded `ENCODER_BATCH_SIZE` windows at a time, so of its audio, spectra
        and encoder activations only one chunk's are held; the encoder outputs of the whole batch are small. What the
        batch keeps goes into buffers made once per batch: kept chunk by chunk between the encoder's large temporaries,
        it would fragment the heap and raise the peak. Inference mode and bfloat16 autocast (with `bf16`) are entered
        per batch: both are per thread, and the batches may be made in another thread than the one decoding them.
        With `float_outputs`, the encoder outputs are kept in float32 (for a decoder that runs outside autocast).
        """
        rate = self.feature_extractor.sampling_rate
        encodes = hasattr(model, "get_encoder")
        windows = iter(windows)
        while True:
            count, encoded, frames = 0, None, None
            with torch.inference_mode(), cpu_autocast(bf16):
                for chunk in _batched(itertools.islice(windows, batch_size), ENCODER_BATCH_SIZE):
                    input_values = self.feature_extractor(chunk, sampling_rate=rate, return_tensors="pt")["input_values"]
                    output = input_values.to(model.device)
                    if encodes:
                        output = encode_windows(model, output).last_hidden_state
                        if float_outputs:
                            output = output.float()
                    if encoded is None:
                        encoded = output.new_empty((batch_size, *output.shape[1:]))
                    encoded[count : count + len(chunk)] = output
                    if return_frames:
                        probabilities = model.frame_probabilities(output).cpu().numpy()
                        if frames is None:
                            frames = np.empty((batch_size, *probabilities.shape[1:]), dtype=probabilities.dtype)
                        frames[count : count + len(chunk)] = probabilities
                    count += len(chunk)
            if not count:
                return
            yield encoded[:count], None if frames is None else frames[:count]

    def generate_windows(
        self,
        windows: Iterable[np.ndarray],
        model,
        batch_size: Optional[int] = None,
        bf16: Union[bool, str, None] = None,
        return_frames: bool = False,
        encode_ahead: Optional[bool] = None,
        **generate_kwargs,
    ) -> Iterator[Union[List[int], Tuple[List[int], np.ndarray]]]:
        """Token ids (decoder start removed) for each window, generated `batch_size` windows at a time (greedy search:
        a pool of `batch_size` windows with continuous batching, each window's ids up to its EOS; `bf16`,
        `encode_ahead` and `grammar`: see `transcribe`). With `return_frames`, (token ids, the frame head's
        (columns, 256 or 384) probabilities, `model.frame_probabilities`) for each window."""
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        generate_kwargs = with_note_grammar(generate_kwargs, self.tokenizer)
        batch_size = batch_size or default_batch_size(generate_kwargs, model)
        encoder_bf16, decoder_bf16 = resolve_bf16(bf16, model)
        encodes = hasattr(model, "get_encoder")
        continuous = encodes and decodes_continuously(generate_kwargs, getattr(model, "generation_config", None))
        ahead = resolve_encode_ahead(encode_ahead, model)
        if continuous:
            yield from self._generate_continuously(
                windows, model, batch_size, encoder_bf16, decoder_bf16, return_frames, ahead, generate_kwargs
            )
            return
        batches = self.encoded_batches(windows, model, batch_size, encoder_bf16, return_frames, not decoder_bf16)
        with made_ahead(batches, ahead) as batches:  # the next batch is made while this one decodes
            for encoded, frames in batches:
                # a model without `get_encoder` runs whole, under the encoder's setting
                with torch.inference_mode(), cpu_autocast(decoder_bf16 if encodes else encoder_bf16):
                    if encodes:
                        encoder_outputs = BaseModelOutput(last_hidden_state=encoded)
                        sequences = generate_from_encoder_outputs(model, encoder_outputs, **generate_kwargs)
                    else:
                        sequences, _ = generate_with_frames(model, encoded, False, **generate_kwargs)
                    encoder_outputs = encoded = None  # not held while the next batch is awaited
                rows = [row[1:] for row in sequences.tolist()]  # drop the decoder start token
                yield from zip(rows, frames) if return_frames else rows

    def _generate_continuously(
        self, windows, model, pool_size, encoder_bf16, decoder_bf16, return_frames, ahead, generate_kwargs
    ):
        """`generate_windows` by greedy search with continuous batching (`generate_continuously`): windows are encoded
        `ENCODER_BATCH_SIZE` at a time (with `ahead`, all of them in a background thread), under bfloat16 autocast
        with `encoder_bf16`, and decoded under it with `decoder_bf16`."""

        def one_by_one(batches):
            for encoded, frames in batches:
                for index in range(len(encoded)):
                    yield encoded[index], None if frames is None else frames[index]

        source = one_by_one(
            self.encoded_batches(windows, model, ENCODER_BATCH_SIZE, encoder_bf16, return_frames, not decoder_bf16)
        )
        with made_ahead(source, ahead) as source:
            for ids, frames in generate_continuously(model, source, pool_size, bf16=decoder_bf16, **generate_kwargs):
                row = ids[1:].tolist()  # the decoder start dropped
                yield (row, frames) if return_frames else row

    def transcribe(
        self,
        audio: AudioInput,
        model,
        sampling_rate: Optional[int] = None,
        batch_size: Optional[int] = None,
        midi_path: Optional[str | os.PathLike] = None,
        progress: bool = False,
        bf16: Union[bool, str, None] = None,
        refine_notes: Optional[bool] = None,
        encode_ahead: Optional[bool] = None,
        window_overlap: Optional[float] = None,
        refine_offsets: Optional[bool] = None,
        **generate_kwargs: Any,
    ) -> List[Note]:
        """Transcribe audio of any length into notes (seconds from the start of the audio), in onset order.

        Args:
            audio: a file path (WAV/FLAC/OGG, any rate and channel count) or an array (at `sampling_rate`).
            model: a [`Sound2SheetForConditionalGeneration`].
            batch_size: windows decoded together; memory grows with it, not with the audio length. None (default):
                `default_batch_size` (a pool of 16 windows for greedy search, which decodes with continuous batching,
                `generate_continuously`; 48 for sampling, 32 for beam search).
            midi_path: also write the notes to this MIDI file.
            progress: show a progress bar over the windows.
            bf16: bfloat16 autocast on CPU: True runs the whole model under it, "encoder" only the encoder (the
                decoder in float32), False neither. None (default): "encoder" where the CPU computes bfloat16
                natively (AMX or AVX512-BF16; `cpu_has_fast_bf16`), else False: PyTorch emulates bfloat16 there
                and float32 is faster. Why the decoder stays in float32: `resolve_bf16`. The notes match
                float32's up to near-ties, which flip; how often depends on the model
                (`benchmarks/bf16_agreement.py`).
            refine_notes: place the decoded notes on the model's frame head (`refine_notes_with_frames`: onsets on
                its onset peaks, dropping the notes it does not support; its sure onsets that no decoded note took
                added as notes; offsets where it stops hearing the pitch). None (default): exactly when the model has
                a frame head (`model.has_frame_head`).
            window_overlap: seconds by which consecutive windows overlap, each trusted with the notes and frames
                of the stretch it lies furthest inside (`window_ownership`); over 0 only with refined notes. None
                (default): `WINDOW_OVERLAP` (0.32 s, 1.14x the windows) with refined notes, else 0. The seams of
                windows cut end to end lose notes (see `WINDOW_OVERLAP`).
            encode_ahead: read, featurise and encode the windows in a background thread (all of them: the first
                while this thread waits, each next one while the ones before decode), with torch's threads
                (`torch.get_num_threads()`) shared out between the two (half each) for the duration of the call and
                restored on return. None (default): exactly when the model runs on a CPU and torch has 2 or more
                threads. On 2 cores, greedy search on a 5-minute piece then costs about the CPU time of 1 thread;
                without it, it runs about 1.15x faster for 1.35x the CPU time (`benchmarks/speed.py --encode-ahead
                on|off`), and its peak memory is lower (`benchmarks/transcribe_memory.py`). It changes torch's
                process-wide thread count while it runs: pass False if other threads of the process use torch
                meanwhile.
            refine_offsets: move the placed notes' offsets with the model's offset refiner
                (`Sound2SheetOffsetRefiner`, `sound2sheet.offset_refiner`). None (default): exactly when the notes are
                refined and the model has one (`model.has_offset_refiner`).
            generate_kwargs: decoding options for `model.generate()` (`num_beams`, `do_sample`, `temperature`, `top_k`,
                `top_p`, `max_new_tokens`, `logits_processor`, ...); see `strategy_generate_kwargs` for named
                strategies. Decoding keeps to the tokenizer's note-event grammar (`NoteEventGrammarLogitsProcessor`:
                times never go back, pitches ascend within a step), which bounds every window's length; pass
                `grammar=False` to decode unconstrained.

        Raises:
            ValueError: the audio cannot be read or is empty or not finite (the message names the file);
                `refine_offsets=True` for a model without an offset refiner or with unrefined notes.
        """
        with_refiner = resolve_refine_offsets(refine_offsets, resolve_refine_notes(refine_notes, model), model)
        if not isinstance(audio, (str, os.PathLike)):  # resample and check an array once, up front
            target = self.feature_extractor.sampling_rate
            audio = load_audio(np.asarray(audio), sampling_rate=target, orig_sampling_rate=sampling_rate or target)
            sampling_rate = target
        notes, evidence = self.decode_notes(
            audio, model, sampling_rate, batch_size=batch_size, progress=progress, bf16=bf16, refine_notes=refine_notes,
            encode_ahead=encode_ahead, window_overlap=window_overlap, **generate_kwargs
        )
        duration = self.duration(audio)
        if evidence is None:
            notes = clip_notes(notes, duration)
        else:
            notes = evidence.placed(notes, duration, model.predict_offset_ratios if with_refiner else None)
        if midi_path is not None:
            write_midi(notes, midi_path)
        return notes

    def decode_notes(
        self,
        audio: AudioInput,
        model,
        sampling_rate: Optional[int] = None,
        batch_size: Optional[int] = None,
        progress: bool = False,
        bf16: Union[bool, str, None] = None,
        refine_notes: Optional[bool] = None,
        encode_ahead: Optional[bool] = None,
        window_overlap: Optional[float] = None,
        **generate_kwargs: Any,
    ) -> Tuple[List[Note], Optional[FrameEvidence]]:
        """The first half of `transcribe` (same arguments): the notes its windows decode (each window's own stretch,
        `decode_owned_notes`), not yet placed on the frame head nor cut at the audio's end, and, when the notes are
        refined, the frame head's `FrameEvidence` to place them with (`evidence.place(notes, **ending)`, which may be
        called with several settings), else None."""
        refine = resolve_refine_notes(refine_notes, model)
        overlap = resolve_window_overlap(window_overlap, refine, self.window_seconds)
        hop = self.window_hop(overlap)
        windows = self.iter_windows(audio, sampling_rate, overlap)
        evidence = FrameEvidence(model.config.frame_grid, overlap) if refine else None
        token_windows = []
        outputs = self.generate_windows(
            windows, model, batch_size=batch_size, bf16=bf16, return_frames=refine, encode_ahead=encode_ahead, **generate_kwargs
        )
        if progress:  # counts decoded windows (a batch at a time), not windows read
            from tqdm.auto import tqdm

            name = os.path.basename(os.fspath(audio)) if isinstance(audio, (str, os.PathLike)) else "audio"
            total = self.count_windows(audio, sampling_rate, overlap)
            outputs = tqdm(outputs, total=total, desc=name, unit="window", leave=False)
        for output in outputs:
            if refine:  # keep only the compact evidence of each window's frame table
                output, frames = output
                evidence.add(frames, len(token_windows) * hop)
            token_windows.append(output)
        starts = [index * hop for index in range(len(token_windows))]
        return decode_owned_notes(self.tokenizer, token_windows, starts, self.window_seconds, overlap), evidence

    def transcribe_pitches(self, audio: AudioInput, model, **kwargs) -> List[int]:
        """The seed API's view: MIDI pitch numbers of the transcribed notes in onset order."""
        return pitch_list(self.transcribe(audio, model, **kwargs))


__all__ = [
    "Sound2SheetProcessor",
    "strategy_generate_kwargs",
    "cpu_has_fast_bf16",
    "resolve_bf16",
    "BF16_ENCODER",
    "onset_peaks",
    "place_notes_on_onsets",
    "add_missed_onsets",
    "end_notes_on_sustain",
    "refine_notes_with_frames",
    "FrameEvidence",
    "window_ownership",
    "decode_owned_notes",
    "resolve_window_overlap",
    "WINDOW_OVERLAP",
    "OFFSET_LEAD",
    "OFFSET_PEAK_THRESHOLD",
    "OFFSET_REACH",
    "OFFSET_PEAK_LEAD",
    "SUSTAIN_GAP",
    "GENERATION_STRATEGIES",
]
