"""Timed notes, and reading/writing them as MIDI.

A :class:`Note` is what every other part of Sound2Sheet speaks: the tokenizer encodes notes into event tokens,
the data pipeline reads them from MIDI, the metrics compare them and the score writer quantizes them.

Reading a MIDI file follows the MAESTRO evaluation convention for the sustain pedal: a note sounds until its key
is released or, when the pedal (CC64 >= 64) is down at that moment, until the pedal is released, whichever is
later; a note never sounds past the next onset of the same pitch.

This module imports nothing from the rest of the package.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Iterable, List, Sequence

import numpy as np

SUSTAIN_CC = 64  # General MIDI controller number of the damper (sustain) pedal
PEDAL_DOWN_THRESHOLD = 64  # MIDI convention: CC64 values >= 64 mean "pedal down"
MIN_NOTE_DURATION = 1e-3  # seconds; shorter notes carry no information and break mir_eval


@dataclass(frozen=True, order=True)
class Note:
    """One sounding note.

    Args:
        onset (`float`): start time in seconds.
        offset (`float`): end time in seconds (strictly after `onset`).
        pitch (`int`): MIDI pitch number, 0-127 (piano keys are 21-108).
        velocity (`int`): MIDI velocity, 1-127.
    """

    onset: float
    offset: float
    pitch: int
    velocity: int = 80

    def __post_init__(self):
        if not 0 <= int(self.pitch) <= 127:
            raise ValueError(f"Note pitch must be in 0-127, got {self.pitch}.")
        if not 1 <= int(self.velocity) <= 127:
            raise ValueError(f"Note velocity must be in 1-127, got {self.velocity}.")
        if not (np.isfinite(self.onset) and np.isfinite(self.offset)) or self.offset <= self.onset:
            raise ValueError(f"Note offset must be finite and after its onset, got onset={self.onset}, offset={self.offset}.")

    @property
    def duration(self) -> float:
        return self.offset - self.onset

    def to_dict(self) -> dict:
        return asdict(self)


class MidiFileError(ValueError):
    """A MIDI file could not be read or written; the message names the file."""


def sort_notes(notes: Iterable[Note]) -> List[Note]:
    """Notes in onset order (then pitch), the order every part of the package uses."""
    return sorted(notes, key=lambda n: (n.onset, n.pitch, n.offset, n.velocity))


def pitch_list(notes: Iterable[Note]) -> List[int]:
    """The seed API's view of a transcription: MIDI pitch numbers in onset order."""
    return [note.pitch for note in sort_notes(notes)]


def _pedal_intervals(control_changes) -> List[tuple]:
    """(down, up) times of the sustain pedal from a track's control changes; an unreleased pedal never lifts."""
    intervals, down_since = [], None
    for cc in sorted((cc for cc in control_changes if cc.number == SUSTAIN_CC), key=lambda cc: cc.time):
        is_down = cc.value >= PEDAL_DOWN_THRESHOLD
        if is_down and down_since is None:
            down_since = cc.time
        elif not is_down and down_since is not None:
            intervals.append((down_since, cc.time))
            down_since = None
    if down_since is not None:
        intervals.append((down_since, float("inf")))
    return intervals


def _release_time(key_release: float, pedal: Sequence[tuple]) -> float:
    """When a note released at `key_release` stops sounding, given the pedal's (down, up) intervals."""
    for down, up in pedal:
        if down <= key_release < up:
            return up
    return key_release


def apply_sustain_pedal(raw_notes: Sequence[tuple], pedal: Sequence[tuple]) -> List[Note]:
    """Extend `(onset, key_release, pitch, velocity)` tuples through the pedal, cut at the next same-pitch onset.

    Notes struck twice at the same time on the same pitch are merged into one (the louder velocity, the later release).
    """
    by_pitch: dict = {}
    for onset, release, pitch, velocity in raw_notes:
        by_pitch.setdefault(int(pitch), []).append((float(onset), float(release), int(velocity)))
    notes = []
    for pitch, strikes in by_pitch.items():
        strikes.sort()
        items = [strikes[0]]
        for onset, release, velocity in strikes[1:]:
            if onset - items[-1][0] < MIN_NOTE_DURATION:  # a duplicate strike
                items[-1] = (items[-1][0], max(items[-1][1], release), max(items[-1][2], velocity))
            else:
                items.append((onset, release, velocity))
        for i, (onset, release, velocity) in enumerate(items):
            offset = _release_time(release, pedal)
            if i + 1 < len(items):
                offset = min(offset, items[i + 1][0])
            if not np.isfinite(offset):  # pedal held to the end of the file: fall back to the key release
                offset = release
            if offset - onset >= MIN_NOTE_DURATION:
                notes.append(Note(onset, offset, pitch, max(1, min(127, velocity))))
    return sort_notes(notes)


def read_midi(path: str | os.PathLike, sustain: bool = True) -> List[Note]:
    """Read the sounding notes of a MIDI file (all non-drum tracks), offsets extended through the sustain pedal.

    Args:
        path: the MIDI file.
        sustain: extend offsets through CC64 as MAESTRO's evaluation does; `False` keeps the key releases.

    Raises:
        MidiFileError: the file is missing or is not a readable MIDI file.
    """
    import pretty_midi

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MidiFileError(f"{path}: no such MIDI file")
    try:
        midi = pretty_midi.PrettyMIDI(path)
    except Exception as err:  # mido/pretty_midi raise many types (IOError, EOFError, KeyError, ValueError...)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MidiFileError(f"{path}: not a readable MIDI file ({reason})") from None
    notes = []
    for instrument in midi.instruments:
        if instrument.is_drum:
            continue
        raw = [(n.start, n.end, n.pitch, n.velocity) for n in instrument.notes if n.end > n.start]
        pedal = _pedal_intervals(instrument.control_changes) if sustain else []
        notes.extend(apply_sustain_pedal(raw, pedal))
    return sort_notes(notes)


def notes_to_pretty_midi(notes: Iterable[Note], program: int = 0):
    """A `pretty_midi.PrettyMIDI` with one piano track holding `notes` (no pedal: offsets are already sounding ends)."""
    import pretty_midi

    midi = pretty_midi.PrettyMIDI()
    instrument = pretty_midi.Instrument(program=program, name="Piano")
    for note in sort_notes(notes):
        instrument.notes.append(
            pretty_midi.Note(velocity=int(note.velocity), pitch=int(note.pitch), start=float(note.onset), end=float(note.offset))
        )
    midi.instruments.append(instrument)
    return midi


def write_midi(notes: Iterable[Note], path: str | os.PathLike, program: int = 0) -> str:
    """Write `notes` to a single-track MIDI file at `path`, written whole or not at all; returns the path."""
    path = os.fspath(path)
    tmp = f"{path}.partial"
    try:
        notes_to_pretty_midi(notes, program=program).write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise MidiFileError(f"{path}: cannot write MIDI ({err.strerror or err})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def notes_to_arrays(notes: Sequence[Note]):
    """(intervals [n, 2] seconds, pitches [n] MIDI, velocities [n]) numpy arrays, in onset order."""
    notes = sort_notes(notes)
    intervals = np.array([[n.onset, n.offset] for n in notes], dtype=np.float64).reshape(-1, 2)
    pitches = np.array([n.pitch for n in notes], dtype=np.int64)
    velocities = np.array([n.velocity for n in notes], dtype=np.int64)
    return intervals, pitches, velocities


__all__ = [
    "Note",
    "MidiFileError",
    "read_midi",
    "write_midi",
    "notes_to_pretty_midi",
    "notes_to_arrays",
    "apply_sustain_pedal",
    "sort_notes",
    "pitch_list",
]
