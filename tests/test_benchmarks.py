"""The benchmark scripts' own input handling (their figures come from running them, not from tests)."""

from __future__ import annotations

import shutil

import pytest
import soundfile

from sound2sheet import read_midi

from .scripts import REPO_ROOT, load_script

EXAMPLE = REPO_ROOT / "examples" / "example_piano.flac"


@pytest.fixture(scope="module")
def quality():
    return load_script("quality", folder="benchmarks")


def test_quality_scores_a_given_recording_against_the_midi_file_beside_it(quality):
    (piece,) = quality.recordings([str(EXAMPLE)])
    assert piece.id == "example_piano" and piece.audio_path == str(EXAMPLE)
    assert piece.seconds == pytest.approx(soundfile.info(EXAMPLE).duration)
    assert piece.reference == read_midi(EXAMPLE.with_suffix(".mid")) and piece.reference


def test_quality_names_a_missing_recording_or_reference(quality, tmp_path):
    with pytest.raises(SystemExit, match=r"--audio .*nope\.flac: no such file"):
        quality.recordings([str(tmp_path / "nope.flac")])
    lonely = tmp_path / "lonely.flac"
    shutil.copy(EXAMPLE, lonely)
    with pytest.raises(SystemExit, match=r"--audio .*lonely\.flac: no reference MIDI file .*lonely\.mid beside it"):
        quality.recordings([str(lonely)])
