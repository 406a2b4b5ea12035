"""Manifests and the checker, the datasets builder, training windows, the collator, augmentation, MAESTRO import."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile
import torch

from sound2sheet import Note, Sound2SheetFeatureExtractor, Sound2SheetTokenizer
from sound2sheet.data import (
    Augmentation,
    ManifestError,
    Sound2SheetDataCollator,
    WindowDataset,
    check_dataset,
    load_manifest_dataset,
    notes_of_example,
    pieces_from_dataset,
    read_manifest,
)
from sound2sheet.data.__main__ import main as data_main
from sound2sheet.data.windows import frame_labels
from sound2sheet.data.maestro import MaestroError, import_maestro

from .data_fixtures import edit_manifest, expected_notes, make_dataset, write_midi_with_pedal

EXTRACTOR, TOKENIZER = Sound2SheetFeatureExtractor(), Sound2SheetTokenizer()


@pytest.fixture()
def dataset(tmp_path):
    return make_dataset(tmp_path / "ds")


# --- manifests and the checker ----------------------------------------------------------------------------------------


def test_a_clean_dataset_has_no_problems(dataset, capsys):
    assert check_dataset(dataset) == []
    assert data_main(["check", str(dataset)]) == 0
    assert capsys.readouterr().out.strip() == f"{dataset}: no problems found"


def test_read_manifest_resolves_paths(dataset):
    entries = read_manifest(dataset / "train" / "manifest.json")
    assert [e.id for e in entries] == ["train-0", "train-1"]
    assert entries[0].audio_path == str(dataset / "train" / "audio" / "train-0.flac")
    assert entries[1].metadata == {"k": 1} and entries[1].index == 1


def problems_of(dataset):
    return [str(p) for p in check_dataset(dataset)]


def test_checker_reports_missing_audio(dataset):
    os.remove(dataset / "train" / "audio" / "train-1.flac")
    manifest = dataset / "train" / "manifest.json"
    assert problems_of(dataset) == [f"{manifest}: entry 1 (train-1): audio file not found: {dataset / 'train' / 'audio' / 'train-1.flac'}"]


def test_checker_reports_unreadable_audio(dataset):
    (dataset / "val" / "audio" / "val-0.flac").write_text("garbage")
    [problem] = problems_of(dataset)
    assert problem.startswith(f"{dataset / 'val' / 'manifest.json'}: entry 0 (val-0): audio file not readable: {dataset / 'val' / 'audio' / 'val-0.flac'} (")


def test_checker_reports_missing_and_unreadable_midi(dataset):
    os.remove(dataset / "train" / "midi" / "train-0.mid")
    (dataset / "test" / "midi" / "test-0.mid").write_bytes(b"MThd garbage")
    problems = problems_of(dataset)
    assert problems[0] == f"{dataset / 'train' / 'manifest.json'}: entry 0 (train-0): MIDI file not found: {dataset / 'train' / 'midi' / 'train-0.mid'}"
    assert problems[1].startswith(f"{dataset / 'test' / 'manifest.json'}: entry 0 (test-0): MIDI file not readable: {dataset / 'test' / 'midi' / 'test-0.mid'} (")
    assert len(problems) == 2


def test_checker_reports_duration_mismatch(dataset):
    edit_manifest(dataset / "train" / "manifest.json", lambda e: e[0].update(duration=9.0))
    assert problems_of(dataset) == [
        f"{dataset / 'train' / 'manifest.json'}: entry 0 (train-0): duration 9.00 s differs from the audio's 6.00 s by more than 0.5 s"
    ]


def test_checker_reports_empty_midi(dataset):
    write_midi_with_pedal(dataset / "val" / "midi" / "val-0.mid", [])
    assert problems_of(dataset) == [
        f"{dataset / 'val' / 'manifest.json'}: entry 0 (val-0): MIDI file has no notes: {dataset / 'val' / 'midi' / 'val-0.mid'}"
    ]


def test_checker_reports_notes_outside_the_audio(dataset):
    write_midi_with_pedal(dataset / "val" / "midi" / "val-0.mid", [Note(1.0, 9.0, 60, 80)])
    assert problems_of(dataset) == [
        f"{dataset / 'val' / 'manifest.json'}: entry 0 (val-0): notes run to 9.00 s, past the end of the audio (6.00 s)"
    ]


def test_checker_reports_duplicates_within_and_across_splits(dataset):
    edit_manifest(dataset / "train" / "manifest.json", lambda e: e.append(dict(e[0])))
    edit_manifest(dataset / "test" / "manifest.json", lambda e: e[0].update(id="train-1"))
    train, test = dataset / "train" / "manifest.json", dataset / "test" / "manifest.json"
    assert problems_of(dataset) == [
        f"{train}: entry 2 (train-0): duplicate id 'train-0' (also {train}: entry 0)",
        f"{train}: entry 2 (train-0): duplicate audio file {dataset / 'train' / 'audio' / 'train-0.flac'} (also {train}: entry 0)",
        f"{test}: entry 0 (train-1): duplicate id 'train-1' (also {train}: entry 1)",
    ]


def test_checker_reports_malformed_json_with_line_and_column(dataset):
    (dataset / "val" / "manifest.json").write_text('[\n {"id": "a",\n  "audio_path": }\n]')
    assert problems_of(dataset) == [f"{dataset / 'val' / 'manifest.json'}: malformed JSON at line 3, column 17: Expecting value"]


def test_checker_reports_wrong_types_and_missing_fields(dataset):
    edit_manifest(dataset / "train" / "manifest.json", lambda e: (e[0].update(duration="6"), e[1].pop("midi_path")))
    manifest = dataset / "train" / "manifest.json"
    assert problems_of(dataset) == [
        f"{manifest}: entry 0 (train-0): field 'duration' must be int or float, got str",
        f"{manifest}: entry 1 (train-1): missing field 'midi_path'",
    ]


def test_checker_reports_missing_splits_and_everything_at_once(tmp_path, capsys):
    dataset = make_dataset(tmp_path / "ds", pieces_per_split=(1, 0, 0))
    os.remove(dataset / "val" / "manifest.json")
    os.remove(dataset / "train" / "audio" / "train-0.flac")
    assert data_main(["check", str(dataset)]) == 1
    out = capsys.readouterr()
    assert out.out.splitlines() == [
        f"{dataset / 'val' / 'manifest.json'}: missing the validation split's manifest",
        f"{dataset / 'train' / 'manifest.json'}: entry 0 (train-0): audio file not found: {dataset / 'train' / 'audio' / 'train-0.flac'}",
    ]
    assert out.err.strip() == f"2 problems found in {dataset}"


def test_read_manifest_raises_on_the_first_problem(dataset):
    (dataset / "train" / "manifest.json").write_text('{"entries": []}')
    with pytest.raises(ManifestError, match=r"manifest.json: expected a JSON array of entries, got dict$"):
        read_manifest(dataset / "train" / "manifest.json")


# --- the builder --------------------------------------------------------------------------------------------------


def test_builder_yields_pedal_extended_notes(dataset, tmp_path):
    train = load_manifest_dataset(dataset, "train", cache_dir=str(tmp_path / "cache"))
    assert train["id"] == ["train-0", "train-1"]
    assert train[0]["audio_path"] == str(dataset / "train" / "audio" / "train-0.flac")
    for k, example in enumerate(train):
        got, want = notes_of_example(example), expected_notes(k)
        assert [(n.pitch, n.velocity) for n in got] == [(n.pitch, n.velocity) for n in want]
        times = [t for n in got for t in (n.onset, n.offset)]
        assert times == pytest.approx([t for n in want for t in (n.onset, n.offset)], abs=1e-3)  # MIDI tick rounding
        assert got[0].offset == pytest.approx(2.0, abs=1e-3)  # released at 1.2 s, held by the pedal until 2.0 s


def test_streaming_and_prepared_give_the_same_examples(dataset, tmp_path):
    prepared = list(load_manifest_dataset(dataset, "validation", cache_dir=str(tmp_path / "a")))
    streamed = list(load_manifest_dataset(dataset, "val", streaming=True, cache_dir=str(tmp_path / "b")))
    assert streamed == prepared
    assert not any((tmp_path / "b").rglob("*.arrow"))  # streaming prepares nothing


def test_builder_cache_follows_manifest_edits(dataset, tmp_path):
    cache = str(tmp_path / "cache")
    assert len(load_manifest_dataset(dataset, "train", cache_dir=cache)) == 2
    edit_manifest(dataset / "train" / "manifest.json", lambda e: e.pop())
    assert len(load_manifest_dataset(dataset, "train", cache_dir=cache)) == 1


def test_missing_split_is_a_clear_error(tmp_path):
    dataset = make_dataset(tmp_path / "ds", pieces_per_split=(1, 1, 0))
    os.remove(dataset / "test" / "manifest.json")
    with pytest.raises(ManifestError, match=r"test/manifest.json: no such manifest \(split 'test'\)"):
        load_manifest_dataset(dataset, "test", cache_dir=str(tmp_path / "cache"))


# --- windows, collator, augmentation -----------------------------------------------------------------------------------


def pieces(dataset, tmp_path, split="train"):
    return pieces_from_dataset(load_manifest_dataset(dataset, split, cache_dir=str(tmp_path / "cache")))


def test_validation_windows_tile_each_piece_with_exact_labels(dataset, tmp_path):
    windows = WindowDataset(pieces(dataset, tmp_path), EXTRACTOR, TOKENIZER, train=False)
    assert len(windows) == 6  # 2 pieces x ceil(6 s / 2.56 s)
    assert [windows.window_start(i) for i in range(3)] == [0.0, 2.56, 5.12]
    notes = pieces(dataset, tmp_path)[0][2]
    second = windows[1]
    assert second["input_values"].shape == (256, 128)
    assert second["labels"] == TOKENIZER.encode_notes(notes, window_start=2.56)
    tokens = TOKENIZER.convert_ids_to_tokens(second["labels"])
    assert tokens[:3] == ["<p_48>", "<p_64>", "<tie>"]  # both notes sounding at 2.56 s: tie section
    assert windows[2]["labels"] == TOKENIZER.encode_notes(notes, window_start=5.12)
    assert torch.equal(windows[1]["input_values"], windows[1]["input_values"])


def test_training_windows_are_random_per_epoch_but_reproducible(dataset, tmp_path):
    make = lambda: WindowDataset(pieces(dataset, tmp_path), EXTRACTOR, TOKENIZER, train=True, windows_per_piece=3, seed=7)  # noqa: E731
    first, again = make(), make()
    starts = [first.window_start(i) for i in range(len(first))]
    assert starts == [again.window_start(i) for i in range(len(again))]
    assert all(0.0 <= s <= 6.0 - 2.56 + 1e-9 and abs(round(s * 100) - s * 100) < 1e-6 for s in starts)
    first.set_epoch(1)
    assert [first.window_start(i) for i in range(len(first))] != starts
    item = again[0]
    assert item["labels"] == TOKENIZER.encode_notes(pieces(dataset, tmp_path)[0][2], window_start=starts[0])


def test_windows_at_the_end_of_a_piece_are_padded_with_silence(dataset, tmp_path):
    windows = WindowDataset(pieces(dataset, tmp_path), EXTRACTOR, TOKENIZER, train=False)
    last = windows[2]["input_values"]  # 5.12-7.68 s of a 6 s piece: frames after 0.88 s are silence
    assert torch.all(last[100:] == -1.0)  # the 128 ms STFT window reaches 64 ms past the end
    assert last[:80].max() > -1.0


def test_collator_pads_labels_with_minus_100():
    batch = Sound2SheetDataCollator()([
        {"input_values": torch.zeros(256, 128), "labels": [422, 1]},
        {"input_values": torch.ones(256, 128), "labels": [422, 4, 400, 300, 1]},
    ])
    assert batch["input_values"].shape == (2, 256, 128)
    assert batch["labels"].tolist() == [[422, 1, -100, -100, -100], [422, 4, 400, 300, 1]]


def test_frame_labels_mark_onsets_at_the_nearest_column_and_sounding_notes_at_centres():
    grid = (0.075, 0.04, 61)  # the 16-frame patches at a time stride of 4 frames, over 2.56 s
    notes = [
        Note(1.00, 1.50, 60, 90),  # 1.00 s from a window at 0.5 s: (0.5 - 0.075) / 0.04 = 10.6 -> column 11
        Note(0.40, 0.60, 64, 80),  # starts before the window, sounds until 0.1 s into it: no onset
        Note(0.51, 0.52, 67, 80),  # 10 ms at 0.01 s: onset in column 0, sounds at no column centre
        Note(3.20, 3.50, 72, 80),  # after the window
        Note(2.90, 3.20, 48, 80),  # 2.40 s: (2.40 - 0.075) / 0.04 = 58.1 -> column 58
        Note(3.05, 3.30, 50, 80),  # 2.55 s, inside the last patch (2.40-2.56 s): the last column, 60
        Note(3.06, 3.30, 52, 80),  # 2.56 s: the next window's
    ]
    labels = frame_labels(notes, 0.5, grid)
    assert labels.shape == (61, 256) and labels.dtype == np.float32
    assert sorted(zip(*np.nonzero(labels[:, :128]))) == [(0, 67), (11, 60), (58, 48), (60, 50)]
    sounding = {pitch: np.nonzero(labels[:, 128 + pitch])[0].tolist() for pitch in (60, 64, 67, 48)}
    assert sounding[60] == list(range(11, 24))  # centres 0.515 ... 0.995 s lie in [0.5, 1.0)
    assert sounding[64] == [0]  # the centre at 0.075 s lies before 0.1 s
    assert sounding[67] == []
    assert sounding[48] == list(range(59, 61))  # 2.475 and 2.515 s; 2.435 s is before the onset at 2.40 s
    assert labels.sum() == 4 + 13 + 1 + 2  # pitch 50 sounds at no centre: the last one (2.475 s) is before 2.55 s


def test_frame_labels_with_offsets_mark_each_offset_at_the_nearest_column_of_its_window():
    grid = (0.075, 0.04, 61)  # the window at 0.5 s ends with its last patch at 2.56 s (3.06 s in the piece)
    notes = [
        Note(1.00, 1.50, 60, 90),  # ends 1.00 s into the window: (1.00 - 0.075) / 0.04 = 23.1 -> column 23
        Note(0.40, 0.60, 64, 80),  # starts before the window, ends 0.1 s into it: 0.6 -> column 1
        Note(0.51, 0.52, 67, 80),  # ends at 0.02 s, before the first centre: column 0
        Note(0.30, 0.50, 62, 80),  # ends at the window's start: column 0, as an onset there would be
        Note(2.00, 3.04, 65, 80),  # ends at 2.54 s, inside the last patch: the last column, 60
        Note(3.00, 3.06, 50, 80),  # ends at 2.56 s: the next window's
        Note(2.90, 3.20, 48, 80),  # ends after the window
    ]
    labels = frame_labels(notes, 0.5, grid, offsets=True)
    assert labels.shape == (61, 384) and labels.dtype == np.float32
    assert sorted(zip(*np.nonzero(labels[:, 256:]))) == [(0, 62), (0, 67), (1, 64), (23, 60), (60, 65)]
    # onsets and sounding as without offsets, which stay as they were
    without = frame_labels(notes, 0.5, grid)
    assert without.shape == (61, 256) and without.tobytes() == np.ascontiguousarray(labels[:, :256]).tobytes()
    assert frame_labels(notes, 0.5, grid, offsets=False).tobytes() == without.tobytes()
    assert labels.sum() == without.sum() + 5
    # windows cut end to end mark each offset once: the one at the seam (pitch 62) in the window after it only,
    # the one at the window's end (pitch 50) in the next window's column 0
    before, after = frame_labels(notes, 0.5 - 2.56, grid, offsets=True), frame_labels(notes, 0.5 + 2.56, grid, offsets=True)
    assert before[:, 256 + 62].sum() == 0 and labels[:, 256 + 62].sum() == 1
    assert labels[:, 256 + 50].sum() == 0 and np.nonzero(after[:, 256 + 50])[0].tolist() == [0]


def test_windows_carry_frame_labels_when_given_a_grid_and_the_collator_stacks_them(dataset, tmp_path):
    grid = (0.075, 0.04, 61)
    windows = WindowDataset(pieces(dataset, tmp_path), EXTRACTOR, TOKENIZER, train=False, frame_grid=grid)
    notes = pieces(dataset, tmp_path)[0][2]
    assert np.array_equal(windows[1]["frame_labels"].numpy(), frame_labels(notes, 2.56, grid))
    assert "frame_labels" not in WindowDataset(pieces(dataset, tmp_path), EXTRACTOR, TOKENIZER, train=False)[1]
    batch = Sound2SheetDataCollator()([windows[0], windows[1]])
    assert batch["frame_labels"].shape == (2, 61, 256)
    assert torch.equal(batch["frame_labels"][1], windows[1]["frame_labels"])
    with pytest.raises(ValueError, match="some examples have frame_labels and some do not"):
        Sound2SheetDataCollator()([windows[0], {"input_values": windows[1]["input_values"], "labels": windows[1]["labels"]}])
    with_offsets = WindowDataset(pieces(dataset, tmp_path), EXTRACTOR, TOKENIZER, train=False, frame_grid=grid, frame_offsets=True)
    assert np.array_equal(with_offsets[1]["frame_labels"].numpy(), frame_labels(notes, 2.56, grid, offsets=True))
    assert with_offsets[1]["frame_labels"].shape == (61, 384) and with_offsets[1]["frame_labels"][:, 256:].sum() > 0
    with pytest.raises(ValueError, match="frame_offsets mark offsets in the frame labels: they need a frame_grid"):
        WindowDataset(pieces(dataset, tmp_path), EXTRACTOR, TOKENIZER, train=False, frame_offsets=True)


def test_augmentation_changes_audio_but_not_labels_and_is_seeded(dataset, tmp_path):
    plain = WindowDataset(pieces(dataset, tmp_path), EXTRACTOR, TOKENIZER, train=True, seed=3)
    augmented = WindowDataset(pieces(dataset, tmp_path), EXTRACTOR, TOKENIZER, train=True, seed=3,
                              augment=Augmentation(noise_probability=1.0, reverb_probability=1.0, tilt_probability=1.0))
    for i in range(len(plain)):
        assert augmented[i]["labels"] == plain[i]["labels"]
        assert not torch.equal(augmented[i]["input_values"], plain[i]["input_values"])
    assert torch.equal(augmented[0]["input_values"], augmented[0]["input_values"])
    validation = WindowDataset(pieces(dataset, tmp_path), EXTRACTOR, TOKENIZER, train=False, augment=Augmentation())
    assert validation.augment is None


def test_augmentation_keeps_onsets_in_place():
    rng = np.random.default_rng(0)
    signal = np.zeros(16000, np.float32)
    signal[8000:8400] = np.sin(np.arange(400) * 0.3)
    out = Augmentation(noise_probability=0.0, reverb_probability=1.0, tilt_probability=1.0)(signal, rng)
    energy = np.convolve(out**2, np.ones(80), "same")
    assert abs(int(np.argmax(energy > 0.1 * energy.max())) - 8000) < 80  # onset within 5 ms


# --- MAESTRO ------------------------------------------------------------------------------------------------------


def fake_maestro(root, fmt="json"):
    rows = [
        ("Frédéric Chopin", "Ballade No. 1", "train", 2018, "2018/a.midi", "2018/a.wav", 6.0),
        ("J. S. Bach", "Prelude", "validation", 2017, "2017/b.midi", "2017/b.wav", 6.0),
        ("Claude Debussy", "Clair de lune", "test", 2009, "2009/c.midi", "2009/c.wav", 6.0),
    ]
    for *_, midi, audio, _ in rows:
        (root / midi).parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(root / audio, np.zeros(1000, np.float32), 44100)
        write_midi_with_pedal(root / midi, [Note(0.1, 0.5, 60, 80)])
    columns = ("canonical_composer", "canonical_title", "split", "year", "midi_filename", "audio_filename", "duration")
    if fmt == "json":
        data = {c: {str(i): row[j] for i, row in enumerate(rows)} for j, c in enumerate(columns)}
        (root / "maestro-v3.0.0.json").write_text(json.dumps(data))
    else:
        lines = [",".join(columns)] + [",".join(f'"{v}"' for v in row) for row in rows]
        (root / "maestro-v3.0.0.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_maestro_import_writes_manifests_by_split_without_copying(tmp_path, fmt):
    maestro = fake_maestro(tmp_path / "maestro", fmt)
    counts = import_maestro(maestro, tmp_path / "out")
    assert counts == {"train": 1, "validation": 1, "test": 1}
    raw = json.loads((tmp_path / "out" / "val" / "manifest.json").read_text())
    assert raw == [{"id": "b", "audio_path": os.path.relpath(maestro / "2017" / "b.wav", tmp_path / "out" / "val"),
                    "midi_path": os.path.relpath(maestro / "2017" / "b.midi", tmp_path / "out" / "val"), "duration": 6.0,
                    "metadata": {"composer": "J. S. Bach", "title": "Prelude", "year": 2017}}]
    assert not list((tmp_path / "out").rglob("*.wav"))
    assert read_manifest(tmp_path / "out" / "train" / "manifest.json")[0].audio_path == str(maestro / "2018" / "a.wav")


def test_maestro_import_errors(tmp_path):
    with pytest.raises(MaestroError, match="no such MAESTRO folder"):
        import_maestro(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MaestroError, match="no MAESTRO metadata file"):
        import_maestro(tmp_path / "empty", tmp_path / "out")
    maestro = fake_maestro(tmp_path / "m")
    os.remove(maestro / "2009" / "c.wav")
    with pytest.raises(MaestroError, match=r"maestro-v3.0.0.json: 1 listed file\(s\) not found: .*2009/c.wav"):
        import_maestro(maestro, tmp_path / "out")
