"""The benchmark scripts' own input handling (their figures come from running them, not from tests)."""

from __future__ import annotations

import shutil

import pytest
import torch
import soundfile

from sound2sheet import Sound2SheetForConditionalGeneration, Sound2SheetProcessor, read_midi
from sound2sheet.processing_sound2sheet import HELD_AFTER, HELD_THRESHOLD, SUSTAIN_THRESHOLD

from .scripts import REPO_ROOT, load_script

EXAMPLE = REPO_ROOT / "examples" / "example_piano.flac"
MODEL = REPO_ROOT / "models" / "sound2sheet-piano-small"


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


def test_note_endings_places_the_notes_as_transcribe_does_for_each_setting():
    note_endings = load_script("note_endings", folder="benchmarks")
    model = Sound2SheetForConditionalGeneration.from_pretrained(MODEL).eval()
    processor = Sound2SheetProcessor.from_pretrained(MODEL)
    library, unheld, early = (HELD_THRESHOLD, HELD_AFTER), (SUSTAIN_THRESHOLD, 0.0), (0.05, 0.2)
    placed = note_endings.notes_per_setting(processor, model, str(EXAMPLE), [library, unheld, early], bf16=False)
    assert placed[library] == processor.transcribe(str(EXAMPLE), model, bf16=False, refine_offsets=False)
    for other in (unheld, early):  # the same notes; holding lower and sooner only ever ends a note later
        assert [(note.onset, note.pitch) for note in placed[other]] == [(note.onset, note.pitch) for note in placed[library]]
    assert all(a.offset <= b.offset <= c.offset for a, b, c in zip(placed[unheld], placed[library], placed[early]))
    assert sum(c.offset > b.offset for b, c in zip(placed[library], placed[early])) > 5


def test_quality_scores_a_model_with_an_offset_refiner_also_without_it(quality, tmp_path):
    from .conftest import save_tiny_model

    folder = save_tiny_model(tmp_path / "plain", frame_loss_weight=1.0)
    systems = quality.sound2sheet_systems(str(folder), 0, unrefined=True, bf16=False)
    assert list(systems) == ["sound2sheet", "sound2sheet, decoder times"]
    model = Sound2SheetForConditionalGeneration.from_pretrained(folder)
    with torch.no_grad():
        model.add_offset_refiner(4).layers[-1].bias.fill_(0.5)  # every note 1.65x as long
    model.save_pretrained(tmp_path / "refined")
    Sound2SheetProcessor.from_pretrained(folder).save_pretrained(tmp_path / "refined")
    systems = quality.sound2sheet_systems(str(tmp_path / "refined"), 0, unrefined=False, bf16=False)
    assert list(systems) == ["sound2sheet", "sound2sheet, no offset refiner"]
    moved, placed = systems["sound2sheet"](str(EXAMPLE)), systems["sound2sheet, no offset refiner"](str(EXAMPLE))
    assert [(n.onset, n.pitch) for n in moved] == [(n.onset, n.pitch) for n in placed] and placed
    assert placed == quality.sound2sheet_systems(str(folder), 0, False, bf16=False)["sound2sheet"](str(EXAMPLE))
    assert sum(m.offset > p.offset for m, p in zip(moved, placed)) > len(placed) // 2
