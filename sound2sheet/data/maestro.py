"""Import MAESTRO (Hawthorne et al. 2019: 200 h of virtuosic piano with aligned MIDI) as Sound2Sheet manifests.

    python -m sound2sheet.data.maestro MAESTRO_DIR --out DATASET

MAESTRO_DIR is the unpacked release: year folders (`2004/` ... `2018/`) holding the `.wav` and `.midi` files, and
the metadata file listing every performance with its `split`, `midi_filename`, `audio_filename` (relative to
MAESTRO_DIR), `duration`, `canonical_composer`, `canonical_title` and `year`. The metadata is read from
`maestro-v3.0.0.json` (column-oriented: `{"split": {"0": "train", ...}, ...}`) or `maestro-v3.0.0.csv`, or from an
earlier release's file (v1/v2 JSON is a list of records).

Writes `DATASET/{train,val,test}/manifest.json` by MAESTRO's own split (`validation` -> `val`), pointing at the
original audio and MIDI files by relative paths (nothing is copied). Each entry's metadata keeps composer, title and
year.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

from .manifest import ManifestEntry, manifest_path, write_manifest

METADATA_NAMES = (
    "maestro-v3.0.0.json",
    "maestro-v3.0.0.csv",
    "maestro-v2.0.0.json",
    "maestro-v2.0.0.csv",
    "maestro-v1.0.0.json",
    "maestro-v1.0.0.csv",
)
REQUIRED_COLUMNS = ("split", "midi_filename", "audio_filename", "duration")
SPLITS = ("train", "validation", "test")  # MAESTRO's split names, also the `datasets` split names
METADATA_FIELDS = {"canonical_composer": "composer", "canonical_title": "title", "year": "year"}  # MAESTRO -> ours
MAX_LISTED_MISSING = 3  # missing files named in the error message; the rest are counted


class MaestroError(ValueError):
    """The MAESTRO folder or its metadata cannot be used; the message names the file."""


def find_metadata(maestro_dir: str | os.PathLike) -> Path:
    """MAESTRO's metadata file in `maestro_dir` (or in its single `maestro-v*` subfolder).

    Raises:
        MaestroError: no such folder, or no metadata file in it.
    """
    maestro_dir = Path(maestro_dir)
    if not maestro_dir.is_dir():
        raise MaestroError(f"{maestro_dir}: no such MAESTRO folder")
    for folder in [maestro_dir] + sorted(maestro_dir.glob("maestro-v*")):
        for name in METADATA_NAMES:
            if (folder / name).is_file():
                return folder / name
    raise MaestroError(f"{maestro_dir}: no MAESTRO metadata file (expected {METADATA_NAMES[0]} or {METADATA_NAMES[1]})")


def _rows_from_json(path: Path) -> List[Dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MaestroError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if isinstance(data, list):  # v1/v2: one record per performance
        if not all(isinstance(row, dict) for row in data):
            raise MaestroError(f"{path}: expected a list of records (objects)")
        return data
    if isinstance(data, dict) and all(isinstance(column, dict) for column in data.values()):  # v3: column-oriented
        if "split" not in data:
            raise MaestroError(f"{path}: missing column 'split'")
        keys = sorted(data["split"], key=lambda key: int(key) if str(key).isdigit() else str(key))
        return [{name: column.get(key) for name, column in data.items()} for key in keys]
    raise MaestroError(f"{path}: expected MAESTRO's column-oriented JSON object (or a list of records)")


def _rows_from_csv(path: Path) -> List[Dict]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def read_metadata(path: str | os.PathLike) -> List[Dict]:
    """MAESTRO's performances as dicts (one per row), from its JSON or CSV metadata file.

    Raises:
        MaestroError: malformed JSON (with line and column), an unexpected layout, or a missing required column.
    """
    path = Path(path)
    rows = _rows_from_json(path) if path.suffix.lower() == ".json" else _rows_from_csv(path)
    for index, row in enumerate(rows):
        missing = [column for column in REQUIRED_COLUMNS if row.get(column) in (None, "")]
        if missing:
            raise MaestroError(f"{path}: row {index}: missing {', '.join(missing)}")
    return rows


def _metadata_of(row: Dict) -> Dict:
    metadata = {}
    for theirs, ours in METADATA_FIELDS.items():
        value = row.get(theirs)
        if value in (None, ""):
            continue
        if ours == "year":
            try:
                value = int(value)  # the CSV gives "2018", the JSON 2018
            except (TypeError, ValueError):
                pass
        metadata[ours] = value
    return metadata


def import_maestro(maestro_dir: str | os.PathLike, out_dir: str | os.PathLike, check_files: bool = True) -> Dict[str, int]:
    """Write `out_dir/{train,val,test}/manifest.json` from MAESTRO's metadata; returns the pieces per split.

    Args:
        maestro_dir: the unpacked MAESTRO release.
        out_dir: the dataset folder to write (manifests only).
        check_files: fail when a listed audio or MIDI file is missing (MAESTRO ships MIDI-only downloads too).

    Raises:
        MaestroError: no metadata, malformed metadata, an unknown split, a bad duration, or (with `check_files`)
            missing audio/MIDI files (the first few named, the rest counted). Nothing is written then.
    """
    metadata_file = find_metadata(maestro_dir)
    root = metadata_file.parent.resolve()
    by_split: Dict[str, List[ManifestEntry]] = {split: [] for split in SPLITS}
    missing: List[str] = []
    for index, row in enumerate(read_metadata(metadata_file)):
        split = str(row["split"]).strip()
        if split not in by_split:
            raise MaestroError(f"{metadata_file}: row {index}: unknown split '{row['split']}' (expected {', '.join(SPLITS)})")
        try:
            duration = float(row["duration"])
        except (TypeError, ValueError):
            raise MaestroError(f"{metadata_file}: row {index}: duration must be a number, got {row['duration']!r}") from None
        audio, midi = root / str(row["audio_filename"]), root / str(row["midi_filename"])
        if check_files:
            missing += [str(path) for path in (audio, midi) if not path.is_file()]
        by_split[split].append(
            ManifestEntry(
                id=Path(str(row["audio_filename"])).stem,
                audio_path=str(audio),
                midi_path=str(midi),
                duration=duration,
                metadata=_metadata_of(row),
                index=len(by_split[split]),
            )
        )
    if missing:
        shown = ", ".join(missing[:MAX_LISTED_MISSING])
        more = f" and {len(missing) - MAX_LISTED_MISSING} more" if len(missing) > MAX_LISTED_MISSING else ""
        raise MaestroError(f"{metadata_file}: {len(missing)} listed file(s) not found: {shown}{more}")
    for split, entries in by_split.items():
        write_manifest(entries, manifest_path(out_dir, split))
    return {split: len(entries) for split, entries in by_split.items()}


def main(argv: Optional[List[str]] = None) -> int:
    """The command line; returns 0 on success, 1 on a MAESTRO error (one line on stderr); argparse exits with 2."""
    parser = argparse.ArgumentParser(prog="python -m sound2sheet.data.maestro", description=__doc__.split("\n\n")[0])
    parser.add_argument("maestro_dir", help="the unpacked MAESTRO folder (holding maestro-v3.0.0.json or .csv)")
    parser.add_argument("--out", required=True, help="dataset folder to write {train,val,test}/manifest.json to")
    parser.add_argument("--no-check-files", action="store_true", help="do not check that every listed file exists")
    args = parser.parse_args(argv)
    try:
        counts = import_maestro(args.maestro_dir, args.out, check_files=not args.no_check_files)
    except (MaestroError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for split, count in counts.items():
        print(f"{split}: {count} pieces -> {manifest_path(args.out, split)}")
    return 0


__all__ = ["import_maestro", "read_metadata", "find_metadata", "MaestroError", "main"]


if __name__ == "__main__":
    sys.exit(main())
