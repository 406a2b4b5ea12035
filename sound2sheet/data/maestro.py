"""Import MAESTRO (Hawthorne et al. 2019, 200 h of piano with aligned MIDI) as Sound2Sheet manifests.

    python -m sound2sheet.data.maestro MAESTRO_DIR --out DATASET

Reads MAESTRO's own metadata file (maestro-v3.0.0.json, column-oriented, or maestro-v3.0.0.csv; earlier versions'
files are found too) and writes `DATASET/{train,val,test}/manifest.json` by MAESTRO's split, pointing at the original
audio and MIDI files (relative paths; nothing is copied). Metadata keeps composer, title and year.
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

METADATA_NAMES = ("maestro-v3.0.0.json", "maestro-v3.0.0.csv", "maestro-v2.0.0.json", "maestro-v2.0.0.csv",
                  "maestro-v1.0.0.json", "maestro-v1.0.0.csv")
REQUIRED_COLUMNS = ("split", "midi_filename", "audio_filename", "duration")
SPLITS = {"train": "train", "validation": "validation", "test": "test"}


class MaestroError(ValueError):
    """The MAESTRO folder or its metadata cannot be used; the message names the file."""


def find_metadata(maestro_dir: str | os.PathLike) -> Path:
    maestro_dir = Path(maestro_dir)
    if not maestro_dir.is_dir():
        raise MaestroError(f"{maestro_dir}: no such MAESTRO folder")
    for name in METADATA_NAMES:
        if (maestro_dir / name).is_file():
            return maestro_dir / name
    raise MaestroError(f"{maestro_dir}: no MAESTRO metadata file ({' or '.join(METADATA_NAMES[:2])})")


def read_metadata(path: str | os.PathLike) -> List[Dict]:
    """MAESTRO's rows as dicts, from its column-oriented JSON or its CSV."""
    path = Path(path)
    try:
        if path.suffix == ".json":
            columns = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(columns, dict) or any(c not in columns for c in REQUIRED_COLUMNS):
                raise MaestroError(f"{path}: expected MAESTRO's column-oriented JSON with {', '.join(REQUIRED_COLUMNS)}")
            keys = sorted(columns["split"], key=lambda k: int(k))
            rows = [{column: values.get(key) for column, values in columns.items()} for key in keys]
        else:
            with path.open(newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
            if rows and any(c not in rows[0] for c in REQUIRED_COLUMNS):
                raise MaestroError(f"{path}: expected MAESTRO's CSV columns {', '.join(REQUIRED_COLUMNS)}")
    except json.JSONDecodeError as err:
        raise MaestroError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    return rows


def import_maestro(maestro_dir: str | os.PathLike, out_dir: str | os.PathLike, check_files: bool = True) -> Dict[str, int]:
    """Write manifests for every MAESTRO split; returns the number of pieces per split.

    Raises:
        MaestroError: no metadata, malformed metadata, an unknown split, or (with `check_files`) missing audio/MIDI.
    """
    maestro_dir = Path(maestro_dir).resolve()
    metadata = find_metadata(maestro_dir)
    by_split: Dict[str, List[ManifestEntry]] = {split: [] for split in SPLITS.values()}
    missing = []
    for index, row in enumerate(read_metadata(metadata)):
        split = SPLITS.get(str(row["split"]).strip())
        if split is None:
            raise MaestroError(f"{metadata}: row {index}: unknown split '{row['split']}'")
        audio, midi = maestro_dir / row["audio_filename"], maestro_dir / row["midi_filename"]
        if check_files:
            missing += [str(p) for p in (audio, midi) if not p.is_file()]
        by_split[split].append(ManifestEntry(
            id=Path(row["audio_filename"]).stem,
            audio_path=str(audio),
            midi_path=str(midi),
            duration=float(row["duration"]),
            metadata={k: row[k] for k in ("canonical_composer", "canonical_title", "year") if row.get(k) not in (None, "")},
            index=len(by_split[split]),
        ))
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise MaestroError(f"{metadata}: files listed but not found: {shown}")
    for split, entries in by_split.items():
        write_manifest(entries, manifest_path(out_dir, split))
    return {split: len(entries) for split, entries in by_split.items()}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sound2sheet.data.maestro", description=__doc__.split("\n\n")[0])
    parser.add_argument("maestro_dir", help="the unpacked MAESTRO folder (holding maestro-v3.0.0.json)")
    parser.add_argument("--out", required=True, help="dataset folder to write the manifests to")
    parser.add_argument("--no-check-files", action="store_true", help="do not check that every listed file exists")
    args = parser.parse_args(argv)
    try:
        counts = import_maestro(args.maestro_dir, args.out, check_files=not args.no_check_files)
    except MaestroError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split, count in counts.items():
        print(f"{split}: {count} pieces")
    return 0


if __name__ == "__main__":
    sys.exit(main())
