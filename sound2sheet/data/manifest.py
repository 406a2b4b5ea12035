"""The dataset manifest format, and the checker that validates a dataset before training.

Layout (the seed's): `DATASET/{train,val,test}/manifest.json`, each a JSON array of entries

    {"id": "bach-bwv66.6", "audio_path": "audio/bach-bwv66.6.flac", "midi_path": "midi/bach-bwv66.6.mid",
     "duration": 42.5, "metadata": {"source": "music21", "soundfont": "FluidR3_GM"}}

`id` (defaults to the audio file's stem) and `metadata` are optional; paths are relative to the manifest's folder
(absolute paths also work); `duration` is the audio's length in seconds.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

MANIFEST_NAME = "manifest.json"
SPLIT_FOLDERS = {"train": "train", "validation": "val", "test": "test"}  # datasets split name -> folder
DEFAULT_DURATION_TOLERANCE = 0.5  # seconds between the manifest's duration and the audio header's


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file (and the entry)."""


@dataclass
class ManifestEntry:
    """One audio + MIDI pair of a manifest, with paths resolved to absolute ones."""

    id: str
    audio_path: str
    midi_path: str
    duration: float
    metadata: Dict = field(default_factory=dict)
    index: int = 0  # position in the manifest, for messages

    def to_json(self, relative_to: Path) -> dict:
        def rel(path: str) -> str:
            return os.path.relpath(path, relative_to)

        entry = {"id": self.id, "audio_path": rel(self.audio_path), "midi_path": rel(self.midi_path), "duration": self.duration}
        if self.metadata:
            entry["metadata"] = self.metadata
        return entry


def _field(path: Path, index: int, raw: dict, name: str, kinds, required: bool = True):
    if name not in raw:
        if required:
            raise ManifestError(f"{path}: entry {index}: missing field '{name}'")
        return None
    value = raw[name]
    if not isinstance(value, kinds) or isinstance(value, bool):
        expected = " or ".join(kind.__name__ for kind in (kinds if isinstance(kinds, tuple) else (kinds,)))
        raise ManifestError(f"{path}: entry {index}: field '{name}' must be {expected}, got {type(value).__name__}")
    return value


def parse_entry(path: Path, index: int, raw) -> ManifestEntry:
    """Validate the types of one raw manifest entry and resolve its paths."""
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: entry {index}: expected an object, got {type(raw).__name__}")
    audio = _field(path, index, raw, "audio_path", str)
    midi = _field(path, index, raw, "midi_path", str)
    duration = _field(path, index, raw, "duration", (int, float))
    if duration <= 0:
        raise ManifestError(f"{path}: entry {index}: field 'duration' must be > 0, got {duration}")
    identifier = _field(path, index, raw, "id", str, required=False) or Path(audio).stem
    metadata = _field(path, index, raw, "metadata", dict, required=False) or {}
    folder = path.parent
    return ManifestEntry(
        id=identifier,
        audio_path=str((folder / audio).resolve()) if not os.path.isabs(audio) else audio,
        midi_path=str((folder / midi).resolve()) if not os.path.isabs(midi) else midi,
        duration=float(duration),
        metadata=metadata,
        index=index,
    )


def load_manifest_json(path: str | os.PathLike) -> list:
    """The raw JSON array of a manifest, with clear errors for a missing file or malformed JSON."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest file")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not a UTF-8 text file") from None
    if not isinstance(raw, list):
        raise ManifestError(f"{path}: expected a JSON array of entries, got {type(raw).__name__}")
    return raw


def read_manifest(path: str | os.PathLike) -> List[ManifestEntry]:
    """Entries of a manifest file, type-checked, paths resolved. Raises `ManifestError` on the first problem."""
    path = Path(path)
    return [parse_entry(path, index, raw) for index, raw in enumerate(load_manifest_json(path))]


def write_manifest(entries: List[ManifestEntry], path: str | os.PathLike) -> Path:
    """Write entries (paths made relative to the manifest's folder), whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps([entry.to_json(path.parent.resolve()) for entry in entries], indent=1))
    os.replace(tmp, path)
    return path


def manifest_path(dataset_dir: str | os.PathLike, split: str) -> Path:
    """`DATASET/<folder>/manifest.json` for a split name ("train", "validation"/"val", "test")."""
    folder = SPLIT_FOLDERS.get(split, split)
    return Path(dataset_dir) / folder / MANIFEST_NAME


def available_splits(dataset_dir: str | os.PathLike) -> List[str]:
    """The datasets split names whose manifest exists, in train/validation/test order."""
    return [split for split in SPLIT_FOLDERS if manifest_path(dataset_dir, split).is_file()]


# --- the checker ---------------------------------------------------------------------------------------------------


@dataclass
class Problem:
    """One thing wrong with a dataset, located as precisely as possible."""

    manifest: str
    message: str
    index: Optional[int] = None
    entry_id: Optional[str] = None

    def __str__(self) -> str:
        where = self.manifest
        if self.index is not None:
            where += f": entry {self.index}" + (f" ({self.entry_id})" if self.entry_id else "")
        return f"{where}: {self.message}"


def _check_entry(entry: ManifestEntry, manifest: str, tolerance: float) -> List[Problem]:
    import soundfile

    from ..notes import MidiFileError, read_midi

    problems = []

    def problem(message):
        problems.append(Problem(manifest, message, entry.index, entry.id))

    audio_seconds = None
    if not os.path.isfile(entry.audio_path):
        problem(f"audio file not found: {entry.audio_path}")
    else:
        try:
            info = soundfile.info(entry.audio_path)
            audio_seconds = info.frames / float(info.samplerate)
        except Exception as err:  # libsndfile raises several types for corrupt files
            problem(f"audio file not readable: {entry.audio_path} ({str(err).strip().splitlines()[0]})")
        else:
            if info.frames == 0:
                problem(f"audio file is empty: {entry.audio_path}")
            elif abs(audio_seconds - entry.duration) > tolerance:
                problem(f"duration {entry.duration:.2f} s differs from the audio's {audio_seconds:.2f} s by more than {tolerance} s")
    if not os.path.isfile(entry.midi_path):
        problem(f"MIDI file not found: {entry.midi_path}")
        return problems
    try:
        notes = read_midi(entry.midi_path)
    except MidiFileError as err:
        problem(f"MIDI file not readable: {str(err).split(': ', 1)[-1]} ({entry.midi_path})")
        return problems
    if not notes:
        problem(f"MIDI file has no notes: {entry.midi_path}")
    elif audio_seconds is not None:
        last = max(note.offset for note in notes)
        first = min(note.onset for note in notes)
        if first >= audio_seconds or last > audio_seconds + tolerance:
            problem(f"notes run to {last:.2f} s, past the end of the audio ({audio_seconds:.2f} s)")
    return problems


def check_dataset(dataset_dir: str | os.PathLike, duration_tolerance: float = DEFAULT_DURATION_TOLERANCE) -> List[Problem]:
    """Every problem of a dataset at once: missing splits, malformed manifests, wrong types, missing/unreadable/empty
    audio or MIDI, duration mismatches, notes past the audio, duplicate ids or audio files (also across splits)."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        return [Problem(str(dataset_dir), "no such dataset folder")]
    problems: List[Problem] = []
    for required in ("train", "validation"):
        if not manifest_path(dataset_dir, required).is_file():
            problems.append(Problem(str(manifest_path(dataset_dir, required)), f"missing the {required} split's manifest"))
    seen_ids: Dict[str, str] = {}
    seen_audio: Dict[str, str] = {}
    for split in available_splits(dataset_dir):
        path = manifest_path(dataset_dir, split)
        try:
            raw_entries = load_manifest_json(path)
        except ManifestError as err:
            problems.append(Problem(str(path), str(err).split(": ", 1)[1]))
            continue
        for index, raw in enumerate(raw_entries):
            try:
                entry = parse_entry(path, index, raw)
            except ManifestError as err:
                problems.append(Problem(str(path), str(err).split(": ", 2)[2], index))
                continue
            where = f"{path}: entry {index}"
            if entry.id in seen_ids:
                problems.append(Problem(str(path), f"duplicate id '{entry.id}' (also {seen_ids[entry.id]})", index, entry.id))
            if entry.audio_path in seen_audio:
                problems.append(Problem(str(path), f"duplicate audio file {entry.audio_path} (also {seen_audio[entry.audio_path]})", index, entry.id))
            seen_ids.setdefault(entry.id, where)
            seen_audio.setdefault(entry.audio_path, where)
            problems.extend(_check_entry(entry, str(path), duration_tolerance))
    return problems


__all__ = [
    "ManifestEntry",
    "ManifestError",
    "Problem",
    "read_manifest",
    "write_manifest",
    "load_manifest_json",
    "manifest_path",
    "available_splits",
    "check_dataset",
    "MANIFEST_NAME",
    "SPLIT_FOLDERS",
]
