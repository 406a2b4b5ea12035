"""The transcription command contract (DESIGN.md): outputs, formats, strategies, errors, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sound2sheet import read_midi

REPO_ROOT = Path(__file__).resolve().parents[1]


def transcribe(run_transcription, capsys, *args):
    code = run_transcription.main(["transcribe", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_writes_midi_and_json_named_after_the_audio(run_transcription, capsys, tiny_model_dir, audio_files, tmp_path):
    code, out, err = transcribe(run_transcription, capsys, audio_files["flac"], "--output-dir", tmp_path / "out", "--model", tiny_model_dir)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["piece.json", "piece.mid"]
    payload = json.loads((tmp_path / "out" / "piece.json").read_text())
    assert payload["audio"] == str(audio_files["flac"])
    assert payload["pitches"] == [note["pitch"] for note in payload["notes"]]
    midi_notes = read_midi(tmp_path / "out" / "piece.mid")
    assert [n.pitch for n in midi_notes] == payload["pitches"]
    assert f"{audio_files['flac']}: {len(midi_notes)} notes" in out


def test_musicxml_output(run_transcription, capsys, tiny_model_dir, audio_files, tmp_path):
    import music21

    code, _, err = transcribe(run_transcription, capsys, audio_files["flac"], "--output-dir", tmp_path, "--model", tiny_model_dir,
                              "--format", "musicxml,midi", "--tempo", "100")
    assert code == 0, err
    score = music21.converter.parse(str(tmp_path / "piece.musicxml"))
    # The tiny random model writes some pitches below C0 (MIDI 12), which MusicXML cannot spell: the score leaves them out.
    midi_pitches = sorted(n.pitch for n in read_midi(tmp_path / "piece.mid") if n.pitch >= 12)
    assert sorted(p.midi for n in score.recurse().notes for p in n.pitches if not (n.tie and n.tie.type != "start")) == midi_pitches


def test_pianoroll_output(run_transcription, capsys, tiny_model_dir, audio_files, tmp_path):
    from matplotlib import image

    code, _, err = transcribe(run_transcription, capsys, audio_files["wav"], "--output-dir", tmp_path, "--model", tiny_model_dir,
                              "--format", "pianoroll")
    assert code == 0, err
    assert image.imread(tmp_path / "short.pianoroll.png").shape[:2] == (600, 1200)


def test_pdf_without_lilypond_names_the_package(run_transcription, capsys, tiny_model_dir, audio_files, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    code, _, err = transcribe(run_transcription, capsys, audio_files["wav"], "--output-dir", tmp_path, "--model", tiny_model_dir, "--format", "pdf")
    assert code == 2
    assert err.strip() == "error: PDF and PNG scores need LilyPond: install the Debian package 'lilypond' (apt-get install lilypond)"


@pytest.mark.parametrize(
    "options",
    [["--strategy", "beam", "--num-beams", "2"], ["--strategy", "sample", "--top-k", "5", "--temperature", "0.9", "--top-p", "0.95"]],
    ids=["beam", "sample"],
)
def test_every_strategy_runs(run_transcription, capsys, tiny_model_dir, audio_files, tmp_path, options):
    code, _, err = transcribe(run_transcription, capsys, audio_files["wav"], "--output-dir", tmp_path, "--model", tiny_model_dir, *options)
    assert code == 0, err
    assert (tmp_path / "short.mid").exists()


def test_a_bad_file_fails_alone_and_the_exit_code_says_so(run_transcription, capsys, tiny_model_dir, audio_files, tmp_path):
    broken = tmp_path / "broken.wav"
    broken.write_text("not audio")
    code, _, err = transcribe(
        run_transcription, capsys, broken, audio_files["wav"], tmp_path / "missing.flac", "--output-dir", tmp_path / "out", "--model", tiny_model_dir
    )
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines[0].startswith(f"error: {broken}: not a readable audio file")
    assert lines[1] == f"error: {tmp_path / 'missing.flac'}: no such file"
    assert lines[2] == "error: 2 of 3 files failed"
    assert (tmp_path / "out" / "short.mid").exists()
    assert not (tmp_path / "out" / "broken.mid").exists()


def test_outputs_never_escape_the_output_dir(run_transcription, capsys, tiny_model_dir, audio_files, tmp_path):
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    relative = os.path.relpath(audio_files["wav"], nested)  # ../../../audio0/short.wav
    out_dir = tmp_path / "out"
    cwd = os.getcwd()
    os.chdir(nested)
    try:
        code, _, err = transcribe(run_transcription, capsys, relative, "--output-dir", out_dir, "--model", tiny_model_dir)
    finally:
        os.chdir(cwd)
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["short.json", "short.mid"]


def test_same_stem_inputs_do_not_overwrite_each_other(run_transcription):
    assert run_transcription.output_stems(["a/x.wav", "b/x.flac", "../../x.wav", ".hidden.wav"]) == ["x", "x-2", "x-3", "hidden"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "midi,mp3"], "error: unknown --format 'mp3'; choose from midi, json, musicxml, pdf, png, pianoroll"),
        (["--time-signature", "5/8"], "error: --time-signature must be 3/4 or 4/4, got 5/8"),
        (["--strategy", "greedy", "--temperature", "0.5"], "error: temperature only apply to --strategy sample, not 'greedy'."),
        (["--batch-size", "0"], "error: --batch-size must be >= 1, got 0"),
        (["--model", "/no/such/model"], "error: --model /no/such/model: no such model folder"),
    ],
)
def test_argument_errors_are_one_line_and_exit_2(run_transcription, capsys, tiny_model_dir, audio_files, tmp_path, args, message):
    extra = [] if "--model" in args else ["--model", str(tiny_model_dir)]
    code, _, err = transcribe(run_transcription, capsys, audio_files["wav"], "--output-dir", tmp_path, *extra, *args)
    assert code == 2
    assert err.strip() == message


def test_unknown_subcommand(run_transcription, capsys):
    assert run_transcription.main(["transcibe", "x.wav"]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown subcommand 'transcibe'; choose one of train, evaluate, transcribe, average, fit-offsets"


@pytest.mark.slow
def test_the_command_line_contract_in_a_subprocess(tiny_model_dir, audio_files, tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run_transcription.py"), "transcribe", str(audio_files["flac"]), str(audio_files["wav"]),
         "--output-dir", str(tmp_path), "--model", str(tiny_model_dir), "--format", "midi,json", "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["piece.json", "piece.mid", "short.json", "short.mid"]
    unknown = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run_transcription.py"), "transcribe", "x.wav", "--output-dir", str(tmp_path), "--colour", "red"],
        capture_output=True, text=True, timeout=300,
    )
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines() == ["error: unrecognized arguments: --colour red"]


@pytest.mark.parametrize("flag, expected", [((), None), (("--encode_ahead",), True), (("--encode_ahead", "false"), False)])
def test_encode_ahead_flag_reaches_transcribe(run_transcription, capsys, tiny_model_dir, audio_files, tmp_path, monkeypatch, flag, expected):
    from sound2sheet import Sound2SheetProcessor

    seen = []
    original = Sound2SheetProcessor.transcribe

    def spy(self, *args, **kwargs):
        seen.append(kwargs["encode_ahead"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Sound2SheetProcessor, "transcribe", spy)
    code, _, err = transcribe(run_transcription, capsys, audio_files["wav"], "--output-dir", tmp_path, "--model", tiny_model_dir, *flag)
    assert code == 0, err
    assert seen == [expected]
