"""Small datasets in the manifest layout, written by the tests themselves (no FluidSynth needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import pretty_midi
import soundfile

from sound2sheet import Note

from .conftest import piano_like


def write_midi_with_pedal(path: Path, notes: List[Note], pedal=()):
    midi = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(0)
    piano.notes = [pretty_midi.Note(velocity=n.velocity, pitch=n.pitch, start=n.onset, end=n.offset) for n in notes]
    for down, up in pedal:
        piano.control_changes += [pretty_midi.ControlChange(64, 127, down), pretty_midi.ControlChange(64, 0, up)]
    midi.instruments.append(piano)
    midi.write(str(path))


def edit_manifest(path: Path, change):
    """Apply `change` to the list of raw entries of the manifest at `path` and write it back."""
    entries = json.loads(path.read_text())
    change(entries)
    path.write_text(json.dumps(entries))


def write_split(folder: Path, pieces, rate: int = 22050):
    """`folder`/{audio,midi}/ and manifest.json for `pieces`: (name, audio samples, notes, pedal intervals, metadata)."""
    (folder / "audio").mkdir(parents=True)
    (folder / "midi").mkdir()
    entries = []
    for name, samples, notes, pedal, metadata in pieces:
        soundfile.write(folder / "audio" / f"{name}.flac", samples, rate)
        write_midi_with_pedal(folder / "midi" / f"{name}.mid", notes, pedal=pedal)
        entries.append({"id": name, "audio_path": f"audio/{name}.flac", "midi_path": f"midi/{name}.mid",
                        "duration": len(samples) / rate, "metadata": metadata})
    (folder / "manifest.json").write_text(json.dumps(entries, indent=1))


def make_dataset(root: Path, pieces_per_split=(2, 1, 1), seconds: float = 6.0) -> Path:
    """DATASET/{train,val,test}/ with piano-like FLACs and MIDIs; piece k of a split has a pedal over 1.0-2.0 s."""
    for split, count in zip(("train", "val", "test"), pieces_per_split):
        pieces = [
            (f"{split}-{k}", piano_like(seconds, 22050, pitches=(48 + k, 60, 67)),
             [Note(0.5, 1.2, 60 + k, 90), Note(2.4, 3.0, 64, 70), Note(2.5, 5.5, 48, 60)], [(1.0, 2.0)], {"k": k})
            for k in range(count)
        ]
        write_split(root / split, pieces)
    return root


# The notes make_dataset's pieces sound (pedal-extended: the first note is held by the pedal until 2.0 s).
def expected_notes(k: int) -> List[Note]:
    return [Note(0.5, 2.0, 60 + k, 90), Note(2.4, 3.0, 64, 70), Note(2.5, 5.5, 48, 60)]
