"""The dataset manifest format, and the checker that validates a dataset before training.

Layout: `DATASET/{train,val,test}/manifest.json`, each a JSON array of entries

    {"id": "bach-bwv66.6", "audio_path": "audio/bach-bwv66.6.flac", "midi_path": "midi/bach-bwv66.6.mid",
     "duration": 42.5, "metadata": {"source": "music21", "soundfont": "FluidR3_GM"}}

`audio_path`, `midi_path` (relative to the manifest's folder; absolute paths also work) and `duration` (the audio's
length in seconds) are required; `id` (defaults to the audio file's stem) and `metadata` (any JSON object) are optional.

`read_manifest` stops at the first problem (a `ManifestError` naming the file, the entry and the field);
`check_dataset` reports every problem of a whole dataset at once, files included, as `Problem`s.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

MANIFEST_NAME = "manifest.json"
SPLIT_FOLDERS = {"train": "train", "validation": "val", "test": "test"}  # datasets split name -> folder
REQUIRED_SPLITS = ("train", "validation")  # training needs both; test is optional
# Seconds the manifest's duration may differ from the audio header's: MAESTRO's durations are rounded, and renderers
# add a release tail of a few hundred milliseconds.
DEFAULT_DURATION_TOLERANCE = 0.5


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file (and the entry and field).

    Attributes:
        path: the manifest file.
        detail: the problem, without the location.
        index: the entry's position in the manifest (None for file-level problems).
        entry_id: the entry's id when it could be determined.
    """

    def __init__(self, path, detail: str, index: Optional[int] = None, entry_id: Optional[str] = None):
        self.path, self.detail, self.index, self.entry_id = str(path), detail, index, entry_id
        super().__init__(f"{_location(self.path, index, entry_id)}: {detail}")


def _location(path: str, index: Optional[int], entry_id: Optional[str]) -> str:
    if index is None:
        return path
    return f"{path}: entry {index}" + (f" ({entry_id})" if entry_id else "")


@dataclass
class ManifestEntry:
    """One audio + MIDI pair of a manifest.

    Args:
        id (`str`): unique name of the piece.
        audio_path (`str`): the audio file (absolute once read from a manifest).
        midi_path (`str`): the aligned MIDI file (absolute once read from a manifest).
        duration (`float`): length of the audio in seconds.
        metadata (`dict`, *optional*): free-form information (composer, source, soundfont...).
        index (`int`, *optional*): position in the manifest it was read from, for messages; not written.
    """

    id: str
    audio_path: str
    midi_path: str
    duration: float
    metadata: Dict = field(default_factory=dict)
    index: int = 0

    def to_json(self, relative_to: str | os.PathLike) -> dict:
        """The entry as written to a manifest in folder `relative_to` (paths made relative to it)."""

        def rel(path: str) -> str:
            try:
                return Path(os.path.relpath(os.path.abspath(path), relative_to)).as_posix()
            except ValueError:  # another drive on Windows: no relative path exists
                return os.path.abspath(path)

        entry = {"id": self.id, "audio_path": rel(self.audio_path), "midi_path": rel(self.midi_path), "duration": float(self.duration)}
        if self.metadata:
            entry["metadata"] = self.metadata
        return entry


def _entry_id(raw: dict) -> Optional[str]:
    """The id an entry would get, when its fields allow it (for messages about a malformed entry)."""
    if isinstance(raw.get("id"), str) and raw["id"]:
        return raw["id"]
    if isinstance(raw.get("audio_path"), str) and raw["audio_path"]:
        return Path(raw["audio_path"]).stem
    return None


def _field(path: Path, index: int, raw: dict, name: str, kinds: tuple, required: bool = True):
    if name not in raw:
        if required:
            raise ManifestError(path, f"missing field '{name}'", index, _entry_id(raw))
        return None
    value = raw[name]
    if not isinstance(value, kinds) or isinstance(value, bool):
        expected = " or ".join(kind.__name__ for kind in kinds)
        raise ManifestError(path, f"field '{name}' must be {expected}, got {type(value).__name__}", index, _entry_id(raw))
    return value


def parse_entry(path: str | os.PathLike, index: int, raw) -> ManifestEntry:
    """Validate the types of one raw manifest entry (entry `index` of manifest `path`) and resolve its paths."""
    path = Path(path)
    if not isinstance(raw, dict):
        raise ManifestError(path, f"expected an object, got {type(raw).__name__}", index)
    audio = _field(path, index, raw, "audio_path", (str,))
    midi = _field(path, index, raw, "midi_path", (str,))
    duration = _field(path, index, raw, "duration", (int, float))
    identifier = _field(path, index, raw, "id", (str,), required=False)
    metadata = _field(path, index, raw, "metadata", (dict,), required=False)
    for name, value in (("audio_path", audio), ("midi_path", midi), ("id", identifier)):
        if value is not None and not value.strip():
            raise ManifestError(path, f"field '{name}' is empty", index, _entry_id(raw))
    if not math.isfinite(duration) or duration <= 0:
        raise ManifestError(path, f"field 'duration' must be a positive number of seconds, got {duration}", index, _entry_id(raw))
    folder = path.parent
    return ManifestEntry(
        id=identifier or Path(audio).stem,
        audio_path=os.path.abspath(folder / audio),  # an absolute `audio` stays as it is
        midi_path=os.path.abspath(folder / midi),
        duration=float(duration),
        metadata=metadata or {},
        index=index,
    )


def load_manifest_json(path: str | os.PathLike) -> list:
    """The raw JSON array of a manifest, with clear errors for a missing file, malformed JSON (line and column) or a
    top level that is not an array."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, "no such manifest file")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ManifestError(path, f"malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError:
        raise ManifestError(path, "not a UTF-8 text file") from None
    except OSError as err:
        raise ManifestError(path, f"cannot read the manifest ({err.strerror or err})") from None
    if not isinstance(raw, list):
        raise ManifestError(path, f"expected a JSON array of entries, got {type(raw).__name__}")
    return raw


def read_manifest(path: str | os.PathLike) -> List[ManifestEntry]:
    """Entries of a manifest file, type-checked, paths made absolute.

    Raises:
        ManifestError: on the first problem (missing file, malformed JSON, wrong types); `check_dataset` lists all.
    """
    path = Path(path)
    return [parse_entry(path, index, raw) for index, raw in enumerate(load_manifest_json(path))]


def write_manifest(entries: List[ManifestEntry], path: str | os.PathLike) -> Path:
    """Write `entries` to the manifest `path` (paths made relative to its folder), whole or not at all; returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.parent.resolve()
    text = json.dumps([entry.to_json(folder) for entry in entries], indent=1, ensure_ascii=False) + "\n"
    tmp = folder / f".{path.name}.{os.getpid()}.partial"  # same folder, so os.replace is atomic
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def manifest_path(dataset_dir: str | os.PathLike, split: str) -> Path:
    """`DATASET/<folder>/manifest.json` for a split name ("train", "validation" or "val", "test")."""
    folder = SPLIT_FOLDERS.get(split, split)
    return Path(dataset_dir) / folder / MANIFEST_NAME


def available_splits(dataset_dir: str | os.PathLike) -> List[str]:
    """The `datasets` split names whose manifest exists, in train/validation/test order."""
    return [split for split in SPLIT_FOLDERS if manifest_path(dataset_dir, split).is_file()]


# --- the checker ---------------------------------------------------------------------------------------------------


@dataclass
class Problem:
    """One thing wrong with a dataset, located as precisely as possible.

    `str(problem)` is one line: `<manifest>: entry <index> (<id>): <message>`, or `<path>: <message>` for problems of
    a whole file or folder.
    """

    manifest: str
    message: str
    index: Optional[int] = None
    entry_id: Optional[str] = None

    def __str__(self) -> str:
        return f"{_location(self.manifest, self.index, self.entry_id)}: {self.message}"


def _first_line(err: Exception) -> str:
    text = str(getattr(err, "error_string", None) or err).strip()  # libsndfile's reason, without the path again
    return text.splitlines()[0] if text else type(err).__name__


def _check_files(entry: ManifestEntry, manifest: str, tolerance: float) -> List[Problem]:
    """Problems of one well-typed entry's files: audio, MIDI, duration, notes against the audio."""
    import soundfile

    from ..notes import MidiFileError, read_midi

    problems: List[Problem] = []

    def problem(message: str):
        problems.append(Problem(manifest, message, entry.index, entry.id))

    audio_seconds = None
    if not os.path.isfile(entry.audio_path):
        problem(f"audio file not found: {entry.audio_path}")
    else:
        try:
            info = soundfile.info(entry.audio_path)
        except Exception as err:  # libsndfile raises several types for corrupt or unsupported files
            problem(f"audio file not readable: {entry.audio_path} ({_first_line(err)})")
        else:
            if info.frames <= 0:
                problem(f"audio file is empty: {entry.audio_path}")
            else:
                audio_seconds = info.frames / float(info.samplerate)
                if abs(audio_seconds - entry.duration) > tolerance:
                    problem(f"duration {entry.duration:.2f} s differs from the audio's {audio_seconds:.2f} s by more than {tolerance:g} s")
    if not os.path.isfile(entry.midi_path):
        problem(f"MIDI file not found: {entry.midi_path}")
        return problems
    try:
        notes = read_midi(entry.midi_path)
    except MidiFileError as err:
        reason = str(err).removeprefix(f"{entry.midi_path}: ").removeprefix("not a readable MIDI file (").removesuffix(")")
        problem(f"MIDI file not readable: {entry.midi_path} ({reason})")
        return problems
    if not notes:
        problem(f"MIDI file has no notes: {entry.midi_path}")
    elif audio_seconds is not None:
        last = max(note.offset for note in notes)
        if last > audio_seconds + tolerance:
            problem(f"notes run to {last:.2f} s, past the end of the audio ({audio_seconds:.2f} s)")
    return problems


def check_dataset(dataset_dir: str | os.PathLike, duration_tolerance: float = DEFAULT_DURATION_TOLERANCE) -> List[Problem]:
    """Every problem of a dataset at once, in manifest order.

    Checks: the dataset folder and the train and val split folders and manifests exist; manifests are well-formed JSON
    arrays (line and column of a syntax error); entries have the right fields and types; the train split has entries;
    no two entries share an id or an audio file (across splits too: a piece in train and test leaks); every audio file
    exists, opens and has samples, and its length matches `duration` within `duration_tolerance` seconds; every MIDI
    file exists, reads and has notes; no note ends more than `duration_tolerance` seconds past the end of the audio.

    Returns:
        `Problem`s (empty when the dataset is ready for training).
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        return [Problem(str(dataset_dir), "no such dataset folder")]
    problems: List[Problem] = []
    for split in REQUIRED_SPLITS:
        path = manifest_path(dataset_dir, split)
        if not path.parent.is_dir():
            problems.append(Problem(str(path.parent), f"missing the {split} split's folder"))
        elif not path.is_file():
            problems.append(Problem(str(path), f"missing the {split} split's manifest"))
    seen_ids: Dict[str, str] = {}
    seen_audio: Dict[str, str] = {}
    for split in available_splits(dataset_dir):
        path = manifest_path(dataset_dir, split)
        try:
            raw_entries = load_manifest_json(path)
        except ManifestError as err:
            problems.append(Problem(err.path, err.detail))
            continue
        if split == "train" and not raw_entries:
            problems.append(Problem(str(path), "the train split has no entries"))
        for index, raw in enumerate(raw_entries):
            try:
                entry = parse_entry(path, index, raw)
            except ManifestError as err:
                problems.append(Problem(err.path, err.detail, err.index, err.entry_id))
                continue
            here = _location(str(path), index, None)
            if entry.id in seen_ids:
                problems.append(Problem(str(path), f"duplicate id '{entry.id}' (also {seen_ids[entry.id]})", index, entry.id))
            if entry.audio_path in seen_audio:
                problems.append(Problem(str(path), f"duplicate audio file {entry.audio_path} (also {seen_audio[entry.audio_path]})", index, entry.id))
            seen_ids.setdefault(entry.id, here)
            seen_audio.setdefault(entry.audio_path, here)
            problems.extend(_check_files(entry, str(path), duration_tolerance))
    return problems


__all__ = [
    "ManifestEntry",
    "ManifestError",
    "Problem",
    "parse_entry",
    "read_manifest",
    "write_manifest",
    "load_manifest_json",
    "manifest_path",
    "available_splits",
    "check_dataset",
    "MANIFEST_NAME",
    "SPLIT_FOLDERS",
    "DEFAULT_DURATION_TOLERANCE",
]
