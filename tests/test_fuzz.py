"""Fuzzing the readers and writers that meet untrusted files: random bytes (some behind a real file header) into the
MIDI, audio and manifest readers, random notes into the MusicXML writer. Each either works or raises the project's
clear error naming the file; nothing else escapes."""

from __future__ import annotations

import io
import json
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import soundfile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sound2sheet import Note, read_midi
from sound2sheet.data import ManifestError, read_manifest
from sound2sheet.feature_extraction_sound2sheet import load_audio
from sound2sheet.notes import MidiFileError
from sound2sheet.sheet import ScoreError, write_musicxml

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _valid_midi_bytes() -> bytes:
    import pretty_midi

    score = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(0)
    piano.notes += [pretty_midi.Note(80, 60 + k, 0.25 * k, 0.25 * k + 0.5) for k in range(8)]
    score.instruments.append(piano)
    buffer = io.BytesIO()
    score.write(buffer)
    return buffer.getvalue()


def _valid_audio_bytes(fmt: str) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.sin(np.arange(4000) / 5.0).astype(np.float32) * 0.3, 16000, format=fmt)
    return buffer.getvalue()


MIDI = _valid_midi_bytes()
AUDIO = {"WAV": _valid_audio_bytes("WAV"), "FLAC": _valid_audio_bytes("FLAC"), "OGG": _valid_audio_bytes("OGG")}


def mutated(original: bytes):
    """Random bytes, a real file's header followed by random bytes, or a real file with some bytes overwritten."""
    return st.one_of(
        st.binary(max_size=2048),
        st.binary(max_size=2048).map(lambda tail: original[:64] + tail),
        st.lists(st.tuples(st.integers(0, len(original) - 1), st.integers(0, 255)), min_size=1, max_size=40).map(
            lambda edits: _overwrite(original, edits)
        ),
        st.integers(0, len(original)).map(lambda cut: original[:cut]),
    )


def _overwrite(original: bytes, edits) -> bytes:
    data = bytearray(original)
    for position, value in edits:
        data[position] = value
    return bytes(data)


def _file(data: bytes, suffix: str) -> Path:
    handle = tempfile.NamedTemporaryFile(suffix=suffix, delete=False)
    handle.write(data)
    handle.close()
    return Path(handle.name)


@FUZZ
@given(mutated(MIDI))
def test_read_midi_on_random_bytes(data):
    path = _file(data, ".mid")
    try:
        notes = read_midi(path)
    except MidiFileError as error:
        assert str(error).startswith(f"{path}: ")
    else:
        assert all(isinstance(note, Note) and note.onset < note.offset for note in notes)
    finally:
        path.unlink()


@FUZZ
@given(st.sampled_from(sorted(AUDIO)).flatmap(lambda fmt: st.tuples(st.just(fmt), mutated(AUDIO[fmt]))))
def test_load_audio_on_random_bytes(case):
    fmt, data = case
    path = _file(data, "." + fmt.lower())
    try:
        samples = load_audio(path)
    except ValueError as error:
        assert str(error).startswith(f"{path}: ")
        assert "\n" not in str(error)
    else:
        assert samples.ndim == 1 and len(samples) > 0 and np.isfinite(samples).all()
    finally:
        path.unlink()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)
entry_like = st.fixed_dictionaries(
    {},
    optional={"id": json_values, "audio_path": json_values | st.text(max_size=30), "midi_path": json_values | st.text(max_size=30),
              "duration": json_values, "metadata": json_values},
)


@FUZZ
@given(st.one_of(st.binary(max_size=512).map(lambda b: b.decode("latin-1")), json_values.map(json.dumps),
                 st.lists(entry_like | json_values, max_size=5).map(json.dumps)))
def test_read_manifest_on_random_text(text):
    path = _file(text.encode("utf-8", "surrogatepass"), ".json")
    try:
        entries = read_manifest(path)
    except ManifestError as error:
        assert str(error).startswith(f"{path}: ")
    else:
        assert all(entry.duration > 0 and entry.audio_path and entry.midi_path for entry in entries)
    finally:
        path.unlink()


random_notes = st.lists(
    st.builds(
        lambda onset, length, pitch, velocity: Note(round(onset, 3), round(onset + length, 3), pitch, velocity),
        st.floats(0.0, 30.0), st.floats(0.011, 4.0), st.integers(21, 108), st.integers(1, 127),
    ),
    max_size=60,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(random_notes)
def test_musicxml_of_random_notes_is_well_formed_and_loads(tmp_path, notes):
    import music21

    path = tmp_path / "score.musicxml"
    try:
        write_musicxml(notes, path)
    except ScoreError as error:
        assert str(error).startswith(f"{path}: ")
        return
    ElementTree.parse(path)  # well-formed XML
    score = music21.converter.parse(str(path))
    pitches = [p.midi for p in score.pitches]
    if notes:  # every note is in the score (a note crossing a barline is tied, so appears more than once)
        assert set(pitches) == {note.pitch for note in notes}
