"""The synthetic corpus renderer: audible onsets match the MIDI, reserved pieces are refused, determinism, splits."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil

import mido
import numpy as np
import pretty_midi
import pytest
import soundfile

from sound2sheet.data import check_dataset, read_manifest
from sound2sheet.data.synth import (
    RenderJob,
    RendererSetupError,
    ReservedPieceError,
    available_soundfonts,
    check_not_reserved,
    is_reserved,
    main as synth_main,
    plan_jobs,
    render_audio,
    render_corpus,
    render_job,
    soundfont_nrpn,
    timidity_config,
    write_performance_midi,
)

needs_fluidsynth = pytest.mark.skipif(
    shutil.which("fluidsynth") is None or not available_soundfonts(),
    reason="needs FluidSynth and a GM soundfont (apt-get install fluidsynth fluid-soundfont-gm)",
)
SF2_FONTS = {name: path for name, path in available_soundfonts().items() if path.endswith(".sf2")}
needs_timidity = pytest.mark.skipif(
    shutil.which("timidity") is None or not SF2_FONTS,
    reason="needs TiMidity++ and a GM .sf2 soundfont (apt-get install timidity fluid-soundfont-gm)",
)


def test_reserved_pieces_are_refused():
    assert is_reserved("bach/bwv846.mxl") and is_reserved("bach/bwv846") and is_reserved("./Joplin/Maple_Leaf_Rag.mxl")
    assert not is_reserved("bach/bwv66.6.mxl")
    with pytest.raises(ReservedPieceError) as error:
        check_not_reserved("chopin/mazurka06-2.krn")
    assert str(error.value) == "chopin/mazurka06-2.krn is reserved for evaluation (eval_reserved.txt) and is never rendered for training"
    with pytest.raises(ReservedPieceError, match="bach/bwv846.mxl is reserved for evaluation"):
        plan_jobs(0.01, pieces=["bach/bwv66.6.mxl", "bach/bwv846.mxl"])


def test_the_corpus_listing_excludes_every_reserved_piece():
    from sound2sheet.data.synth import music21_pieces, reserved_pieces

    pieces = music21_pieces()
    assert len(pieces) > 1000
    assert not any(is_reserved(p) for p in pieces)
    reserved_with_extension = {r for r in reserved_pieces() if "." in r.rsplit("/", 1)[-1]}
    assert reserved_with_extension.isdisjoint({p.lower() for p in pieces})


def test_plan_splits_by_piece_and_keeps_the_held_out_soundfont_for_test():
    jobs = plan_jobs(0.3, seed=1, sources=("procedural",), soundfonts=("FluidR3_GM", "TimGM6mb"), exclude_soundfont="TimGM6mb",
                     val_fraction=0.2, test_fraction=0.2, max_piece_seconds=10)
    assert len({job.piece_id for job in jobs}) == len(jobs)
    by_split = {split: [job for job in jobs if job.split == split] for split in ("train", "validation", "test")}
    assert all(by_split.values())
    assert {job.soundfont for job in by_split["test"]} == {"TimGM6mb"}
    assert "TimGM6mb" not in {job.soundfont for job in by_split["train"] + by_split["validation"]}
    again = plan_jobs(0.3, seed=1, sources=("procedural",), soundfonts=("FluidR3_GM", "TimGM6mb"), exclude_soundfont="TimGM6mb",
                      val_fraction=0.2, test_fraction=0.2, max_piece_seconds=10)
    assert again == jobs


def test_a_score_in_two_encodings_is_planned_once():
    # The music21 corpus holds some movements as both .krn and .mxl: one id, one set of files, one manifest entry.
    pieces = ["beethoven/opus18no1/movement1.krn", "bach/bwv66.6.mxl", "beethoven/opus18no1/movement1.mxl"]
    jobs = plan_jobs(1.0, sources=("music21",), pieces=pieces, soundfonts=("FluidR3_GM",))
    assert sorted(job.piece_id for job in jobs) == ["music21-bach-bwv66.6", "music21-beethoven-opus18no1-movement1"]
    assert {job.reference for job in jobs} - {"bach/bwv66.6.mxl"} < set(pieces[0::2])


def test_programs_vary_train_and_val_timbres_and_leave_the_test_split_and_default_plans_unchanged():
    options = dict(sources=("procedural",), soundfonts=("FluidR3_GM", "TimGM6mb"), exclude_soundfont="TimGM6mb",
                   val_fraction=0.2, test_fraction=0.2, max_piece_seconds=10)
    default = plan_jobs(0.5, seed=2, **options)
    assert {job.program for job in default} == {0}
    assert plan_jobs(0.5, seed=2, programs=(0,), **options) == default
    varied = plan_jobs(0.5, seed=2, programs=(0, 1, 2, 3), **options)
    assert [dataclasses.replace(job, program=0) for job in varied] == default  # only the programs differ
    assert {job.program for job in varied if job.split == "test"} == {0}
    assert {job.program for job in varied if job.split != "test"} == {0, 1, 2, 3}
    with pytest.raises(ValueError, match=r"General MIDI piano programs \(0-7\), got \[0, 8\]"):
        plan_jobs(0.5, seed=2, programs=(0, 8), **options)


def test_synths_vary_train_and_val_renderings_and_leave_the_test_split_and_default_plans_unchanged():
    options = dict(sources=("procedural",), soundfonts=("FluidR3_GM", "TimGM6mb"), exclude_soundfont="TimGM6mb",
                   val_fraction=0.2, test_fraction=0.2, max_piece_seconds=10, programs=(0, 1))
    default = plan_jobs(0.5, seed=2, **options)
    assert {job.synth for job in default} == {"fluidsynth"}
    assert plan_jobs(0.5, seed=2, synths=("fluidsynth",), **options) == default
    both = plan_jobs(0.5, seed=2, synths=("fluidsynth", "timidity"), **options)
    assert [dataclasses.replace(job, synth="fluidsynth") for job in both] == default  # only the synthesizers differ
    assert {job.synth for job in both if job.split == "test"} == {"fluidsynth"}
    assert {job.synth for job in both if job.split != "test"} == {"fluidsynth", "timidity"}
    with pytest.raises(ValueError, match=r"synths must be among fluidsynth, timidity, got \['fluidsynth', 'sfizz'\]"):
        plan_jobs(0.5, seed=2, synths=("fluidsynth", "sfizz"), **options)


def test_the_synths_flag_names_an_unknown_synthesizer(capsys, tmp_path):
    assert synth_main(["--out", str(tmp_path), "--hours", "0.01", "--synths", "fluidsynth,sfizz"]) == 2
    assert "synths must be among fluidsynth, timidity, got ['fluidsynth', 'sfizz']" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_timidity_plays_the_piano_programs_from_the_one_soundfont():
    config = timidity_config("/fonts/My Piano.sf2").splitlines()
    assert config[:2] == ['dir "/fonts"', "bank 0"]
    assert config[2:] == [f'{program} %font "My Piano.sf2" 0 {program}' for program in range(8)]
    with pytest.raises(RendererSetupError, match=r"TiMidity\+\+ reads .sf2 soundfonts only, not /fonts/MuseScore_General.sf3"):
        timidity_config("/fonts/MuseScore_General.sf3")


def test_the_programs_flag_names_a_malformed_value(capsys, tmp_path):
    assert synth_main(["--out", str(tmp_path), "--hours", "0.01", "--programs", "0,bright"]) == 2
    assert "--programs must be comma-separated integers" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("synth", [pytest.param("fluidsynth", marks=needs_fluidsynth),
                                   pytest.param("timidity", marks=needs_timidity)])
def test_rendered_onsets_match_the_midi(tmp_path, synth):
    onsets = [0.5, 1.3, 2.2, 3.05]
    performed = [(t, t + 0.4, pitch, 100) for t, pitch in zip(onsets, (48, 60, 72, 84))]
    write_performance_midi(performed, [], tmp_path / "isolated.mid")
    font = next(iter(SF2_FONTS.values())) if synth == "timidity" else next(iter(available_soundfonts().values()))
    audio = render_audio(tmp_path / "isolated.mid", font, np.random.default_rng(0), seconds=4.0, synth=synth)
    assert audio.dtype == np.float32 and len(audio) == 4 * 16000  # padded with silence where the synthesizer stopped
    hop = 80  # 5 ms frames at 16 kHz
    energy = np.array([np.sum(audio[i : i + hop] ** 2) for i in range(0, len(audio) - hop, hop)])
    rises = np.flatnonzero((energy[1:] > 4 * (energy[:-1] + 1e-9)) & (energy[1:] > 0.01 * energy.max())) + 1
    detected = []
    for frame in rises:
        if not detected or frame * hop / 16000 - detected[-1] > 0.2:
            detected.append(frame * hop / 16000)
    assert len(detected) == len(onsets)
    assert np.max(np.abs(np.array(detected) - onsets)) < 0.02


def file_hashes(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.suffix in (".flac", ".mid")}


@needs_fluidsynth
@pytest.mark.slow
def test_rendering_is_deterministic_for_a_seed_and_writes_valid_manifests(tmp_path):
    font = next(iter(available_soundfonts()))
    args = ["--hours", "0.005", "--sources", "procedural", "--soundfonts", font, "--max-piece-seconds", "4",
            "--val-fraction", "0.3", "--test-fraction", "0.3", "--workers", "2"]
    assert synth_main(["--out", str(tmp_path / "a"), "--seed", "3", *args]) == 0
    assert synth_main(["--out", str(tmp_path / "b"), "--seed", "3", *args]) == 0
    assert synth_main(["--out", str(tmp_path / "c"), "--seed", "4", *args]) == 0
    first = file_hashes(tmp_path / "a")
    assert first and first == file_hashes(tmp_path / "b")
    assert first != file_hashes(tmp_path / "c")
    assert check_dataset(tmp_path / "a") == []
    ids = {}
    for split in ("train", "val", "test"):
        for entry in read_manifest(tmp_path / "a" / split / "manifest.json"):
            assert entry.id not in ids
            ids[entry.id] = split
            info = soundfile.info(entry.audio_path)
            assert info.samplerate == 16000 and info.channels == 1
            assert entry.duration == pytest.approx(info.frames / 16000, abs=1e-3)
            assert entry.metadata["source"] == "procedural" and entry.metadata["soundfont"] == font


@needs_fluidsynth
def test_splits_renders_only_those_splits_of_the_same_plan_and_keeps_the_other_manifests(tmp_path, capsys):
    font = next(iter(available_soundfonts()))
    args = ["--hours", "0.005", "--sources", "procedural", "--soundfonts", font, "--max-piece-seconds", "4",
            "--val-fraction", "0.3", "--test-fraction", "0.3", "--workers", "1", "--seed", "0"]  # 3 train, 2 val, 1 test
    assert synth_main(["--out", str(tmp_path / "whole"), *args]) == 0
    part = tmp_path / "part"
    (part / "train").mkdir(parents=True)
    (part / "train" / "manifest.json").write_text("[]  # written before")
    assert synth_main(["--out", str(part), *args, "--splits", "test,val"]) == 0
    assert "test:" in capsys.readouterr().out
    assert (part / "train" / "manifest.json").read_text() == "[]  # written before"  # not rendered, not rewritten
    assert not (part / "train" / "audio").exists()
    whole = file_hashes(tmp_path / "whole")
    rendered = file_hashes(part)
    for split in ("val", "test"):  # the same pieces and bytes as in the whole corpus (manifests: absolute paths)
        files = {name: digest for name, digest in rendered.items() if name.startswith(split + "/audio/")}
        assert files and files == {name: digest for name, digest in whole.items() if name.startswith(split + "/audio/")}
        assert [entry.id for entry in read_manifest(part / split / "manifest.json")] == [
            entry.id for entry in read_manifest(tmp_path / "whole" / split / "manifest.json")]
    assert synth_main(["--out", str(part), *args, "--splits", "test,eval"]) == 2
    assert "--splits must be comma-separated names among train, val, test, got 'test,eval'" in capsys.readouterr().err


@needs_fluidsynth
@pytest.mark.skipif(len(available_soundfonts()) < 2, reason="needs two GM soundfonts (apt-get install fluid-soundfont-gm timgm6mb-soundfont)")
def test_a_finished_piece_is_kept_only_while_the_plan_still_gives_it_its_soundfont(tmp_path):
    first, second = sorted(available_soundfonts())[:2]
    job = RenderJob("procedural-scales-0-00000", "procedural", "scales", "train", first, 5, 3.0)
    entry = render_job(job, str(tmp_path))
    audio = tmp_path / "train" / entry["audio_path"]
    stamp, first_audio = audio.stat().st_mtime_ns, audio.read_bytes()
    assert render_job(job, str(tmp_path)) == entry and audio.stat().st_mtime_ns == stamp  # resumed: not rendered again
    moved = dataclasses.replace(job, soundfont=second)
    again = render_job(moved, str(tmp_path))
    assert again["metadata"]["soundfont"] == second and audio.read_bytes() != first_audio
    assert json.loads((tmp_path / "train" / "audio" / f"{job.piece_id}.json").read_text()) == again
    second_audio = audio.read_bytes()
    honky_tonk = render_job(dataclasses.replace(moved, program=3), str(tmp_path))  # another program: rendered again
    assert honky_tonk["metadata"]["program"] == 3 and "program" not in again["metadata"]
    assert pretty_midi.PrettyMIDI(str(tmp_path / "train" / honky_tonk["midi_path"])).instruments[0].program == 3
    assert audio.read_bytes() != second_audio
    third_audio = audio.read_bytes()
    longer = render_job(dataclasses.replace(moved, program=3, envelope=(0, 600)), str(tmp_path))  # another envelope
    assert longer["metadata"]["envelope"] == {"decay": 0, "release": 600} and "envelope" not in honky_tonk["metadata"]
    assert audio.read_bytes() != third_audio


@needs_timidity
def test_a_piece_planned_for_another_synthesizer_is_rendered_again_and_says_so(tmp_path):
    font = next(iter(SF2_FONTS))
    job = RenderJob("procedural-scales-0-00000", "procedural", "scales", "train", font, 5, 3.0)
    entry = render_job(job, str(tmp_path))
    audio = tmp_path / "train" / entry["audio_path"]
    by_fluidsynth = audio.read_bytes()
    assert "synth" not in entry["metadata"]  # manifests rendered before there was a choice stay as they were
    again = render_job(dataclasses.replace(job, synth="timidity"), str(tmp_path))
    assert again["metadata"]["synth"] == "timidity" and {**again["metadata"], "synth": None} == {**entry["metadata"], "synth": None}
    assert audio.read_bytes() != by_fluidsynth
    assert json.loads((tmp_path / "train" / "audio" / f"{job.piece_id}.json").read_text()) == again
    stamp = audio.stat().st_mtime_ns
    assert render_job(dataclasses.replace(job, synth="timidity"), str(tmp_path)) == again and audio.stat().st_mtime_ns == stamp


@needs_fluidsynth
def test_missing_soundfont_names_the_packages(capsys, tmp_path):
    assert synth_main(["--out", str(tmp_path), "--hours", "0.01", "--soundfonts", "NoSuchFont"]) == 2
    assert "apt-get install fluidsynth fluid-soundfont-gm" in capsys.readouterr().err


def test_a_soundfont_nrpn_is_sent_as_select_then_data_lsb_then_msb():
    as_pairs = lambda messages: [(m.channel, m.control, m.value) for m in messages]  # noqa: E731
    # 8192 + -1200 / 2 = 7592 = 59 * 128 + 40; FluidSynth applies the value when the data entry MSB (6) arrives
    assert as_pairs(soundfont_nrpn(38, -1200)) == [(0, 99, 120), (0, 98, 38), (0, 38, 40), (0, 6, 59)]
    assert as_pairs(soundfont_nrpn(36, 1200, channel=2)) == [(2, 99, 120), (2, 98, 36), (2, 38, 88), (2, 6, 68)]
    with pytest.raises(ValueError, match="An offset of 40000 timecents is beyond a SoundFont NRPN's range"):
        soundfont_nrpn(38, 40000)


def test_envelope_spread_moves_only_train_and_val_fluidsynth_pieces_and_leaves_default_plans_unchanged(capsys, tmp_path):
    options = dict(sources=("procedural",), soundfonts=("FluidR3_GM", "TimGM6mb"), exclude_soundfont="TimGM6mb",
                   val_fraction=0.2, test_fraction=0.2, max_piece_seconds=10, synths=("fluidsynth", "timidity"))
    default = plan_jobs(0.5, seed=2, **options)
    assert {job.envelope for job in default} == {(0, 0)}
    assert plan_jobs(0.5, seed=2, envelope_spread=0, **options) == default
    spread = plan_jobs(0.5, seed=2, envelope_spread=1200, **options)
    assert [dataclasses.replace(job, envelope=(0, 0)) for job in spread] == default  # only the envelopes differ
    moved = [job for job in spread if job.split != "test" and job.synth == "fluidsynth"]
    assert moved and all(job.envelope != (0, 0) and max(map(abs, job.envelope)) <= 1200 for job in moved)
    assert len({job.envelope for job in moved}) == len(moved)  # drawn per piece
    assert {job.envelope for job in spread if job not in moved} == {(0, 0)}  # test pieces and TiMidity++'s
    with pytest.raises(ValueError, match="envelope_spread must be between 0 and 4800 timecents, got -1"):
        plan_jobs(0.5, seed=2, envelope_spread=-1, **options)
    assert synth_main(["--out", str(tmp_path), "--hours", "0.01", "--envelope-spread", "6000"]) == 2
    assert "envelope_spread must be between 0 and 4800 timecents, got 6000.0" in capsys.readouterr().err


@needs_fluidsynth
def test_an_envelope_offset_changes_how_fast_a_released_note_dies_away_and_not_the_notes(tmp_path):
    from sound2sheet.notes import read_midi

    font = next(iter(available_soundfonts().values()))
    performed = [(0.0, 0.5, 60, 100), (0.0, 0.5, 67, 100)]  # keys pressed at time 0: the NRPNs must come first
    tails, notes = [], []
    for release in (-1200, 0, 1200):
        path = tmp_path / f"release{release}.mid"
        write_performance_midi(performed, [], path, envelope=(0, release))
        track = next(t for t in mido.MidiFile(path).tracks if any(m.type == "note_on" for m in t))
        controls = [m.control for m in track if m.type == "control_change"]
        assert controls == ([99, 98, 38, 6] if release else [])
        if release:
            first_note = next(i for i, m in enumerate(track) if m.type == "note_on")
            assert max(i for i, m in enumerate(track) if m.type == "control_change") < first_note
        audio = render_audio(path, font, np.random.default_rng(0), seconds=2.0)
        tails.append(float(np.sum(audio[int(0.6 * 16000) : int(0.8 * 16000)] ** 2)))  # after the keys lift
        notes.append(read_midi(path))
    assert tails[0] < 0.5 * tails[1] and tails[2] > 2 * tails[1]
    assert notes[0] == notes[1] == notes[2]


@needs_timidity
def test_a_soundfont_timidity_cannot_read_stops_the_corpus_before_anything_is_rendered(monkeypatch, tmp_path):
    import sound2sheet.data.synth as synth

    (tmp_path / "Compressed.sf3").write_bytes(b"RIFF")
    monkeypatch.setitem(synth.SOUNDFONT_CANDIDATES, "Compressed", (str(tmp_path / "Compressed.sf3"),))
    font = next(iter(SF2_FONTS))
    jobs = [RenderJob("procedural-scales-0-00000", "procedural", "scales", "train", font, 5, 3.0, synth="timidity"),
            RenderJob("procedural-scales-0-00001", "procedural", "scales", "train", "Compressed", 6, 3.0, synth="timidity")]
    with pytest.raises(RendererSetupError, match=r"TiMidity\+\+ reads .sf2 soundfonts only, not .*Compressed.sf3"):
        render_corpus(tmp_path / "out", jobs, progress=False)
    assert not (tmp_path / "out").exists()
