"""The offset refiner: its features and targets, the model's refiner module, transcription with it, and fitting it
(`sound2sheet.offset_refiner`, `run_transcription.py fit-offsets`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from sound2sheet import Note, Sound2SheetConfig, Sound2SheetForConditionalGeneration, Sound2SheetProcessor
from sound2sheet.processing_sound2sheet import clip_notes
from sound2sheet.offset_refiner import (
    NUM_OFFSET_FEATURES,
    PITCH_CONTEXT,
    SCALAR_FEATURES,
    SUM_CONTEXT,
    apply_offset_ratios,
    fit_offset_refiner,
    note_offset_features,
    offset_targets,
    score_offset_refiner,
)

from .conftest import piano_like, save_tiny_model
from .data_fixtures import write_split

SCALAR = {name: index for index, name in enumerate(SCALAR_FEATURES)}
TRAJECTORY = len(SCALAR_FEATURES)  # the pitch's probabilities around the end column start here


def test_features_of_hand_made_notes():
    times = 0.02 + 0.04 * np.arange(50)  # columns centred every 40 ms from 0.02 s
    sounding = np.zeros((50, 128), dtype=np.float32)
    sounding[:, 60] = np.linspace(0.0, 0.98, 50)
    sounding[10, 72] = 0.5  # an octave above, in the end column of the first note
    notes = [Note(0.11, 0.41, 60, 90), Note(0.2, 0.44, 64, 70), Note(1.0, 1.5, 60, 80)]
    features = note_offset_features(notes, times, sounding)
    assert features.shape == (3, NUM_OFFSET_FEATURES) == (3, len(SCALAR_FEATURES) + 3 * len(PITCH_CONTEXT) + len(SUM_CONTEXT))
    first = features[0]
    end_column = 10  # the first column at or after 0.41 s (0.42 s)
    assert first[SCALAR["length"]] == pytest.approx(0.3)
    assert first[SCALAR["log_length"]] == pytest.approx(math.log(0.3))
    assert (first[SCALAR["pitch"]], first[SCALAR["velocity"]]) == (60, 90)
    inside = sounding[3:end_column, 60]  # from the column at or after the onset (0.14 s) to the end column
    assert first[SCALAR["peak"]] == pytest.approx(inside.max())
    assert first[SCALAR["mean"]] == pytest.approx(inside.mean())
    assert first[SCALAR["to_restart"]] == pytest.approx(1.0 - 0.41)
    assert first[SCALAR["ending_together"]] == 1  # the second note ends 0.03 s later
    assert first[SCALAR["ending_near"]] == 1
    assert first[SCALAR["to_next_onset"]] == pytest.approx(1.0 - 0.41)
    assert first[SCALAR["sounding_on"]] == 1  # the second note sounds across 0.41 s
    assert first[SCALAR["column_sum"]] == pytest.approx(sounding[end_column].sum())
    assert first[SCALAR["to_column"]] == pytest.approx(0.41 - 0.42)
    assert first[SCALAR["onsets_near"]] == 0
    trajectory = first[TRAJECTORY : TRAJECTORY + len(PITCH_CONTEXT)]
    assert np.allclose(trajectory, sounding[[end_column + k for k in PITCH_CONTEXT], 60])
    octave_above = first[TRAJECTORY + len(PITCH_CONTEXT) + len(SUM_CONTEXT) :][: len(PITCH_CONTEXT)]
    assert octave_above[PITCH_CONTEXT.index(0)] == pytest.approx(0.5) and octave_above.sum() == pytest.approx(0.5)
    last = features[2]
    assert last[SCALAR["to_restart"]] == 10.0 and last[SCALAR["to_next_onset"]] == 10.0  # capped: nothing follows
    # The last note ends in column 37; its context past the last column repeats the last column.
    assert np.allclose(last[TRAJECTORY : TRAJECTORY + len(PITCH_CONTEXT)], sounding[np.clip([37 + k for k in PITCH_CONTEXT], 0, 49), 60])


def test_the_model_reads_as_many_features_as_are_computed():
    from sound2sheet import modeling_sound2sheet

    assert modeling_sound2sheet.NUM_OFFSET_FEATURES == NUM_OFFSET_FEATURES


def test_features_check_the_table_and_handle_no_notes():
    with pytest.raises(ValueError, match=r"sounding must be \(columns, 128\)"):
        note_offset_features([Note(0.1, 0.2, 60, 80)], np.arange(3.0), np.zeros((4, 128)))
    assert note_offset_features([], np.arange(3.0), np.zeros((3, 128))).shape == (0, NUM_OFFSET_FEATURES)


def test_targets_are_log_length_ratios_of_onset_matched_notes():
    reference = [Note(1.0, 2.0, 60, 80), Note(3.0, 3.2, 62, 80)]
    notes = [Note(1.02, 1.52, 60, 80), Note(3.0, 3.4, 64, 80), Note(3.01, 3.11, 62, 80)]
    targets = offset_targets(notes, reference)
    assert targets[0] == pytest.approx(math.log((2.0 - 1.02) / 0.5))
    assert np.isnan(targets[1])  # no reference note of its pitch
    assert targets[2] == pytest.approx(math.log((3.2 - 3.01) / 0.1))
    assert np.isnan(offset_targets(notes, [])).all()


def test_ratios_move_offsets_up_to_the_pitch_restarting_and_keep_a_minimum_length():
    notes = [Note(0.0, 1.0, 60, 80), Note(1.5, 2.0, 60, 80), Note(0.5, 0.9, 64, 70), Note(2.0, 2.5, 67, 60)]
    moved = apply_offset_ratios(notes, [math.log(2.0), math.log(1.5), math.log(0.5), -50.0])
    assert moved == [Note(0.0, 1.5, 60, 80), Note(1.5, 2.25, 60, 80), Note(0.5, 0.7, 64, 70), Note(2.0, 2.01, 67, 60)]
    assert apply_offset_ratios(notes, [0.0] * 4) == notes


def tiny_config(**overrides) -> Sound2SheetConfig:
    return Sound2SheetConfig(num_decoder_layers=1, encoder_config={"num_hidden_layers": 1}, frame_loss_weight=1.0, **overrides)


def test_a_new_refiner_moves_nothing_and_saves_and_loads_with_the_model(tmp_path):
    model = Sound2SheetForConditionalGeneration(tiny_config())
    assert not model.has_offset_refiner
    with pytest.raises(ValueError, match="has no offset refiner"):
        model.predict_offset_ratios(np.zeros((1, NUM_OFFSET_FEATURES)))
    refiner = model.add_offset_refiner(8)
    assert model.has_offset_refiner and model.config.offset_refiner_size == 8
    features = np.random.default_rng(0).normal(size=(5, NUM_OFFSET_FEATURES))
    assert np.array_equal(model.predict_offset_ratios(features), np.zeros(5))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in refiner.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    refiner.set_feature_statistics(torch.arange(NUM_OFFSET_FEATURES, dtype=torch.float32), torch.full((NUM_OFFSET_FEATURES,), 2.0))
    expected = model.predict_offset_ratios(features)
    assert np.abs(expected).min() > 0
    model.save_pretrained(tmp_path)
    loaded = Sound2SheetForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.config.offset_refiner_size == 8
    assert np.array_equal(loaded.predict_offset_ratios(features), expected)
    assert np.allclose(loaded.to(torch.bfloat16).predict_offset_ratios(features), expected, rtol=0.05, atol=0.05)


def test_refiner_settings_are_checked():
    with pytest.raises(ValueError, match="offset_refiner_size must be >= 0"):
        tiny_config(offset_refiner_size=-1)
    with pytest.raises(ValueError, match="needs a frame head"):
        Sound2SheetConfig(offset_refiner_size=8)
    model = Sound2SheetForConditionalGeneration(tiny_config())
    with pytest.raises(ValueError, match="hidden_size must be a positive integer"):
        model.add_offset_refiner(0)
    no_head = Sound2SheetForConditionalGeneration(Sound2SheetConfig(num_decoder_layers=1, encoder_config={"num_hidden_layers": 1}))
    with pytest.raises(ValueError, match="has none"):
        no_head.add_offset_refiner(8)


@pytest.fixture(scope="module")
def frame_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-refiner-model"), frame_loss_weight=1.0)


@pytest.fixture(scope="module")
def piece(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("refiner-audio") / "piece.flac"
    soundfile.write(path, piano_like(6.0, 22050, pitches=(48, 60, 67)), 22050)
    return path


def with_constant_refiner(folder: Path, log_ratio: float) -> Sound2SheetForConditionalGeneration:
    """The model in `folder` with a refiner that predicts `log_ratio` for every note."""
    model = Sound2SheetForConditionalGeneration.from_pretrained(folder).eval()
    refiner = model.add_offset_refiner(4)
    with torch.no_grad():
        refiner.layers[-1].bias.fill_(log_ratio)
    return model


def test_transcription_moves_the_placed_offsets_by_the_refiner(frame_model_dir, piece):
    model = with_constant_refiner(frame_model_dir, math.log(0.5))
    processor = Sound2SheetProcessor.from_pretrained(frame_model_dir)
    placed = processor.transcribe(str(piece), model, refine_offsets=False)
    refined = processor.transcribe(str(piece), model)
    assert len(placed) > 10
    predicted = float(torch.tensor(math.log(0.5)))  # the refiner's float32 output
    assert refined == clip_notes(apply_offset_ratios(placed, [predicted] * len(placed)), 6.0)  # cut at the end again
    assert [(n.onset, n.pitch, n.velocity) for n in refined] == [(n.onset, n.pitch, n.velocity) for n in placed]
    assert sum(n.offset < p.offset for n, p in zip(refined, placed)) > len(placed) // 2
    # Unrefined notes are left alone, and asking for the refiner without refined notes or without a refiner fails.
    assert processor.transcribe(str(piece), model, refine_notes=False) == processor.transcribe(
        str(piece), Sound2SheetForConditionalGeneration.from_pretrained(frame_model_dir).eval(), refine_notes=False
    )
    with pytest.raises(ValueError, match="needs refined notes"):
        processor.transcribe(str(piece), model, refine_notes=False, refine_offsets=True)
    plain = Sound2SheetForConditionalGeneration.from_pretrained(frame_model_dir).eval()
    with pytest.raises(ValueError, match="the model has no offset refiner"):
        processor.transcribe(str(piece), plain, refine_offsets=True)
    assert processor.transcribe(str(piece), plain) == placed


def test_the_pipeline_moves_the_offsets_as_transcribe_does(frame_model_dir, piece, tmp_path):
    from transformers import pipeline

    model = with_constant_refiner(frame_model_dir, 0.4)
    model.save_pretrained(tmp_path)
    Sound2SheetProcessor.from_pretrained(frame_model_dir).save_pretrained(tmp_path)
    transcriber = pipeline("automatic-speech-recognition", model=str(tmp_path))
    processor = Sound2SheetProcessor.from_pretrained(tmp_path)
    refined = processor.transcribe(str(piece), model)
    assert transcriber(str(piece))["notes"] == refined
    placed = transcriber(str(piece), refine_offsets=False)["notes"]
    assert placed == processor.transcribe(str(piece), model, refine_offsets=False) != refined
    with pytest.raises(ValueError, match="needs refined notes"):
        transcriber(str(piece), refine_notes=False, refine_offsets=True)


def halved_dataset(root: Path, piece: Path, notes, pieces=(("train", 2), ("val", 1))) -> Path:
    """A manifest dataset whose pieces are `piece` with `notes` at half their length as the reference."""
    halved = [Note(n.onset, round(n.onset + (n.offset - n.onset) / 2, 4), n.pitch, n.velocity) for n in notes]
    samples = soundfile.read(piece)[0]
    for split, count in pieces:
        write_split(root / split, [(f"{split}-{k}", samples, halved, (), {}) for k in range(count)])
    return root


def test_fitting_learns_the_length_ratio_and_raises_onset_offset_f1(frame_model_dir, piece, tmp_path):
    from sound2sheet.data import load_manifest_dataset

    processor = Sound2SheetProcessor.from_pretrained(frame_model_dir)
    model = Sound2SheetForConditionalGeneration.from_pretrained(frame_model_dir).eval()
    placed = processor.transcribe(str(piece), model)
    dataset = halved_dataset(tmp_path / "data", piece, placed)
    summary = fit_offset_refiner(model, processor, list(load_manifest_dataset(dataset, "train")), hidden_size=16, steps=300)
    assert summary["pieces"] == 2 and summary["notes"] == 2 * len(placed)
    assert summary["matched_notes"] > len(placed)  # most notes match their halved selves by onset
    assert summary["losses"][-1] < 0.1 < summary["losses"][0]
    scores = score_offset_refiner(model, processor, list(load_manifest_dataset(dataset, "val")))
    assert scores["with"]["onset_f1"] == scores["without"]["onset_f1"]
    assert scores["with"]["onset_offset_f1"] > scores["without"]["onset_offset_f1"] + 0.2


def test_fit_offsets_command_writes_a_model_that_transcribes_with_its_refiner(run_transcription, frame_model_dir, piece, tmp_path, capsys):
    processor = Sound2SheetProcessor.from_pretrained(frame_model_dir)
    placed = processor.transcribe(str(piece), Sound2SheetForConditionalGeneration.from_pretrained(frame_model_dir).eval())
    dataset = halved_dataset(tmp_path / "data", piece, placed)
    out = tmp_path / "fitted"
    argv = ["fit-offsets", "--model_name_or_path", str(frame_model_dir), "--manifest_dir", str(dataset), "--output_dir", str(out),
            "--hidden_size", "16", "--steps", "300", "--eval_manifest_dir", str(dataset), "--eval_split", "val"]
    assert run_transcription.main(argv) == 0
    printed = capsys.readouterr().out
    assert "fitted on 2 pieces" in printed and "val onset_offset_f1:" in printed
    summary = json.loads((out / "offset_refiner.json").read_text())
    assert summary["eval"]["with"]["onset_offset_f1"] > summary["eval"]["without"]["onset_offset_f1"] + 0.2
    fitted = Sound2SheetForConditionalGeneration.from_pretrained(out).eval()
    assert fitted.has_offset_refiner and fitted.config.offset_refiner_size == 16
    refined = Sound2SheetProcessor.from_pretrained(out).transcribe(str(piece), fitted)
    assert [(n.onset, n.pitch) for n in refined] == [(n.onset, n.pitch) for n in placed]
    assert refined != placed
    # A folder that holds files is kept; the flags are checked before anything is decoded.
    assert run_transcription.main(argv) == 2
    assert "already holds files" in capsys.readouterr().err
    assert run_transcription.main(argv[:-4] + ["--output_dir", str(tmp_path / "other"), "--steps", "0"]) == 2
    assert "--hidden_size and --steps must be positive" in capsys.readouterr().err
    assert run_transcription.main(["fit-offsets", "--manifest_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "x")]) == 2
    assert "--manifest_dir" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_transcribe_and_evaluate_commands_refuse_a_refiner_the_model_lacks(run_transcription, frame_model_dir, piece, tmp_path, capsys):
    argv = ["transcribe", str(piece), "--model", str(frame_model_dir), "--output-dir", str(tmp_path), "--refine_offsets"]
    assert run_transcription.main(argv) == 2
    assert "has no offset refiner" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_ratios_that_are_not_finite_are_refused_and_huge_ones_are_bounded():
    notes = [Note(1.0, 2.0, 60, 80), Note(3.0, 3.5, 60, 80)]
    with pytest.raises(ValueError, match=r"non-finite length ratio \(nan\) for Note\(onset=1.0"):
        apply_offset_ratios(notes, [float("nan"), 0.0])
    moved = apply_offset_ratios(notes, [1e6, -1e6])
    assert moved == [Note(1.0, 3.0, 60, 80), Note(3.0, 3.01, 60, 80)]


def test_fit_offsets_names_a_corrupt_recording_and_writes_nothing(run_transcription, frame_model_dir, piece, tmp_path, capsys):
    dataset = halved_dataset(tmp_path / "data", piece, [Note(0.5, 1.0, 60, 80)], pieces=(("train", 2),))
    (dataset / "train" / "audio" / "train-1.flac").write_bytes(b"not audio at all")
    out = tmp_path / "fitted"
    argv = ["fit-offsets", "--model_name_or_path", str(frame_model_dir), "--manifest_dir", str(dataset), "--output_dir", str(out)]
    assert run_transcription.main(argv) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("error: --manifest_dir") and "train-1.flac" in error and "Format not recognised" in error
    assert not out.exists() and not out.with_name("fitted.partial").exists()
