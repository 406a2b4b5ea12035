"""Bad input end to end: every case through the Python API and, all together in one batch, through
`run_transcription.py transcribe`. Each case gives a correct result or a one-line error naming the file and the
problem; in a batch the other files are still transcribed and the exit code says that some failed."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from sound2sheet import Sound2SheetForConditionalGeneration, Sound2SheetProcessor, read_midi
from sound2sheet.data import check_dataset
from sound2sheet.data.__main__ import main as data_main
from sound2sheet.notes import Note

from .conftest import piano_like
from .data_fixtures import edit_manifest, make_dataset, write_midi_with_pedal


def _truncated_flac(path: Path) -> Path:
    full = path.with_name("full-for-truncation.flac")
    soundfile.write(full, piano_like(5.0, 44100), 44100)
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: len(data) // 3])
    return path


def _non_finite(path: Path, value: float) -> Path:
    samples = piano_like(1.0, 16000)
    samples[800] = value
    soundfile.write(path, samples, 16000, subtype="FLOAT")
    return path


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


def _written(path: Path, rate: int, samples: np.ndarray) -> Path:
    soundfile.write(path, samples, rate)
    return path


# name -> (how to make it in a folder, the error it must give: None for a file that must be transcribed,
#          "either" where libsndfile may decode the complete frames before a cut)
CASES = {
    "empty": (lambda d: _bytes(d / "empty.wav", b""), "{path}: not a readable audio file ("),
    "truncated": (lambda d: _truncated_flac(d / "truncated.flac"), "either"),
    "text": (lambda d: _bytes(d / "notes.wav", b"these are my notes, not audio\n"), "{path}: not a readable audio file ("),
    "zeros": (lambda d: _written(d / "zeros.wav", 16000, np.zeros(32000, np.float32)), None),
    "nan": (lambda d: _non_finite(d / "nan.wav", np.nan), "{path}: the audio contains NaN or infinite samples"),
    "inf": (lambda d: _non_finite(d / "inf.wav", np.inf), "{path}: the audio contains NaN or infinite samples"),
    "tenth-second": (lambda d: _written(d / "click.wav", 44100, piano_like(0.1, 44100)), None),
    "8k-mono": (lambda d: _written(d / "phone.wav", 8000, piano_like(3.0, 8000)), None),
    "96k-6ch": (lambda d: _written(d / "surround.flac", 96000, np.stack([piano_like(2.0, 96000)] * 6, axis=1)), None),
    "directory": (lambda d: _folder(d / "a_folder.wav"), "{path}: is a directory, not an audio file"),
    "missing": (lambda d: d / "never_recorded.flac", "{path}: no such file"),
}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("bad-input")
    return {name: make(folder) for name, (make, _) in CASES.items()}


@pytest.fixture(scope="module")
def transcriber(tiny_model_dir):
    return Sound2SheetForConditionalGeneration.from_pretrained(tiny_model_dir).eval(), Sound2SheetProcessor.from_pretrained(tiny_model_dir)


def check_notes(notes, duration: float):
    assert all(isinstance(note, Note) for note in notes)
    assert all(0.0 <= note.onset < note.offset <= duration + 1e-6 for note in notes)


@pytest.mark.parametrize("case", list(CASES))
def test_api(case, bad_files, transcriber, tmp_path):
    model, processor = transcriber
    path, expected = bad_files[case], CASES[case][1]
    midi_path = tmp_path / "out.mid"
    try:
        notes = processor.transcribe(path, model, midi_path=midi_path)
    except ValueError as error:
        assert expected is not None, f"{case}: {error}"
        if expected != "either":
            assert str(error).startswith(expected.format(path=path))
        else:
            assert str(error).startswith(f"{path}: not a readable audio file")
        assert "\n" not in str(error)
        assert not midi_path.exists()
    else:
        assert expected in (None, "either"), f"{case}: transcribed, but should fail with {expected}"
        check_notes(notes, soundfile.info(str(path)).duration)
        assert midi_path.is_file()
        assert [note.pitch for note in read_midi(midi_path)] == [note.pitch for note in notes]


@pytest.fixture(scope="module")
def batch_run(run_transcription, bad_files, tiny_model_dir, tmp_path_factory, audio_files):
    """Every bad file and one good file in one `transcribe` call."""
    out = tmp_path_factory.mktemp("bad-input-out")
    inputs = [*bad_files.values(), audio_files["wav"]]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run_transcription.main(["transcribe", *map(str, inputs), "--output-dir", str(out), "--model", str(tiny_model_dir)])
    return code, err.getvalue(), out


@pytest.mark.parametrize("case", list(CASES))
def test_command_line_batch(case, batch_run, bad_files):
    code, err, out = batch_run
    path, expected = bad_files[case], CASES[case][1]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    mine = [line for line in errors if line.startswith(f"error: {path}:")]
    stem = path.stem
    if expected is None or (expected == "either" and not mine):
        assert mine == []
        assert (out / f"{stem}.mid").is_file() and (out / f"{stem}.json").is_file()
        payload = json.loads((out / f"{stem}.json").read_text())
        check_notes([Note(n["onset"], n["offset"], n["pitch"], n["velocity"]) for n in payload["notes"]], soundfile.info(str(path)).duration)
    else:
        assert len(mine) == 1
        prefix = f"{path}: not a readable audio file" if expected == "either" else expected.format(path=path)
        assert mine[0].startswith(f"error: {prefix}")
        assert not (out / f"{stem}.mid").exists() and not (out / f"{stem}.json").exists()
    # whatever failed, the good file was transcribed and the exit code says that some failed
    assert code == 1
    assert (out / "short.mid").is_file()
    failed = sum(1 for name in CASES if any(line.startswith(f"error: {bad_files[name]}:") for line in errors))
    assert errors[-1] == f"error: {failed} of {len(CASES) + 1} files failed"


# Transcribes argv[2] with the model folder argv[1] and prints the notes count and the peak RSS in MB.
PEAK_MEMORY_SCRIPT = (
    "import resource, sys\n"
    "from sound2sheet import Sound2SheetForConditionalGeneration, Sound2SheetProcessor\n"
    "model = Sound2SheetForConditionalGeneration.from_pretrained(sys.argv[1]).eval()\n"
    "processor = Sound2SheetProcessor.from_pretrained(sys.argv[1])\n"
    "notes = processor.transcribe(sys.argv[2], model, batch_size=16, midi_path=sys.argv[3], max_new_tokens=8)\n"
    "print(len(notes), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
)


@pytest.mark.slow
def test_an_hour_of_audio_is_transcribed_in_bounded_memory(tiny_model_dir, tmp_path):
    """Peak memory for a 1-hour file stays close to a 1-minute file's: windows stream through, the audio never
    sits in memory whole (that alone would be 230 MB as float32)."""
    block = (piano_like(10.0, 16000) * 32767).astype(np.int16)
    for name, minutes in (("minute.wav", 1), ("hour.wav", 60)):
        with soundfile.SoundFile(tmp_path / name, "w", 16000, 1, subtype="PCM_16") as handle:
            for _ in range(6 * minutes):
                handle.write(block)
    peaks = {}
    for name in ("minute.wav", "hour.wav"):
        result = subprocess.run(
            [sys.executable, "-c", PEAK_MEMORY_SCRIPT, str(tiny_model_dir), str(tmp_path / name), str(tmp_path / f"{name}.mid")],
            capture_output=True, text=True, timeout=1800, env=dict(os.environ, OMP_NUM_THREADS="2"),
        )
        assert result.returncode == 0, result.stderr[-2000:]
        peaks[name] = float(result.stdout.split()[1])
    assert peaks["hour.wav"] < peaks["minute.wav"] * 1.15 + 20, peaks


# --- MIDI and manifests ---------------------------------------------------------------------------------------


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "ds", pieces_per_split=(2, 1, 0))


def test_a_midi_with_no_notes(dataset, tmp_path, capsys):
    midi = dataset / "val" / "midi" / "val-0.mid"
    write_midi_with_pedal(midi, [])
    assert read_midi(midi) == []
    assert data_main(["check", str(dataset)]) == 1
    out = capsys.readouterr()
    assert out.out.splitlines() == [f"{dataset / 'val' / 'manifest.json'}: entry 0 (val-0): MIDI file has no notes: {midi}"]


def test_a_midi_with_overlapping_same_pitch_notes(dataset, capsys):
    midi = dataset / "train" / "midi" / "train-0.mid"
    # three overlapping strikes of C4: note-ons at 0.5, 1.0, 1.2 s, note-offs at 1.5, 2.0, 3.0 s
    import pretty_midi

    score = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(0)
    piano.notes += [pretty_midi.Note(70, 60, 0.5, 2.0), pretty_midi.Note(90, 60, 1.0, 1.5), pretty_midi.Note(50, 60, 1.2, 3.0)]
    score.instruments.append(piano)
    score.write(str(midi))
    notes = read_midi(midi)
    assert [(n.onset, n.pitch) for n in notes] == [(0.5, 60), (1.0, 60), (1.2, 60)]
    assert all(a.offset <= b.onset for a, b in zip(notes, notes[1:]))  # each strike ends where the next begins
    # pretty_midi ends every open note of a pitch at its first note-off; the later offs have nothing left to end
    assert [(n.onset, n.offset) for n in notes] == [(0.5, 1.0), (1.0, 1.2), (1.2, 1.5)]
    assert data_main(["check", str(dataset)]) == 0
    assert capsys.readouterr().out == f"{dataset}: no problems found\n"


def test_a_manifest_with_wrong_types(dataset, capsys):
    manifest = dataset / "train" / "manifest.json"
    edit_manifest(manifest, lambda entries: (entries[0].update(duration="6 s"), entries[1].update(audio_path=3, metadata=[1])))
    assert data_main(["check", str(dataset)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{manifest}: entry 0 (train-0): field 'duration' must be int or float, got str",
        f"{manifest}: entry 1 (train-1): field 'audio_path' must be str, got int",
    ]
    assert len(check_dataset(dataset)) == 2
