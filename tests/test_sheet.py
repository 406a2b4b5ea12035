"""Notes -> quantized two-staff score -> MusicXML: pitches in the right measures and beats, key, ties, LilyPond."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ElementTree
from collections import Counter

import numpy as np
import pytest

from sound2sheet import Note
from sound2sheet.sheet import ScoreError, estimate_beat, notes_to_score, quantize, render_score, split_hands, write_musicxml

PIECES = {"bach/bwv10.7": ("4/4", -2), "bach/bwv122.6": ("3/4", -2)}  # not reserved; no pickup bar; (meter, sharps)


def corpus_notes(piece: str, tempo: float, jitter: float = 0.0, seed: int = 0):
    """The piece's notes at a steady tempo (seconds), optionally with Gaussian onset/offset jitter."""
    import music21

    rng = np.random.default_rng(seed)
    seconds = 60.0 / tempo
    notes = []
    for element in music21.corpus.parse(piece).stripTies().flatten().notes:
        for pitch in element.pitches:
            onset = 1.0 + float(element.offset) * seconds + (rng.normal(0, jitter) if jitter else 0.0)
            offset = 1.0 + float(element.offset + element.quarterLength) * seconds + (rng.normal(0, jitter) if jitter else 0.0)
            notes.append(Note(round(onset, 4), round(max(offset, onset + 0.05), 4), int(pitch.midi), 80))
    return notes


def measure_beat_pitches(score_or_path):
    """Counter of (measure number, beat offset in the measure, MIDI pitch) over every sounding note start."""
    import music21

    score = music21.converter.parse(str(score_or_path)) if not hasattr(score_or_path, "parts") else score_or_path
    found = Counter()
    for part in score.parts:
        for element in part.recurse().notes:
            if element.tie is not None and element.tie.type in ("stop", "continue"):
                continue
            measure = element.getContextByClass("Measure")
            for pitch in element.pitches:
                found[(measure.number, round(float(element.offset), 3), int(pitch.midi))] += 1
    return found


def original_measure_beat_pitches(piece):
    import music21

    return measure_beat_pitches(music21.corpus.parse(piece))


@pytest.mark.slow
@pytest.mark.parametrize("piece", list(PIECES))
@pytest.mark.parametrize("jitter", [0.0, 0.02])
def test_round_trip_keeps_measures_beats_pitches_key_and_meter(piece, jitter, tmp_path):
    import music21

    notes = corpus_notes(piece, tempo=90.0, jitter=jitter / 2)  # +-20 ms: two standard deviations of 10 ms
    path = write_musicxml(notes, tmp_path / "score.musicxml")
    ElementTree.parse(path)  # well-formed
    parsed = music21.converter.parse(str(path))
    # as sets: two voices on one key at once are one key press on a piano
    assert set(measure_beat_pitches(parsed)) == set(original_measure_beat_pitches(piece))
    meter, sharps = PIECES[piece]
    assert parsed.recurse().getElementsByClass("TimeSignature").first().ratioString == meter
    assert parsed.recurse().getElementsByClass("KeySignature").first().sharps == sharps
    assert len(parsed.parts) == 2


def test_ties_where_notes_cross_barlines(tmp_path):
    import music21

    # at 60 BPM in 4/4: a whole note starting on beat 3 crosses the barline
    notes = [Note(0.0, 1.0, 72, 80), Note(1.0, 2.0, 74, 80), Note(2.0, 6.0, 76, 80), Note(6.0, 8.0, 72, 80),
             Note(0.0, 4.0, 48, 70), Note(4.0, 8.0, 43, 70)]
    parsed = music21.converter.parse(str(write_musicxml(notes, tmp_path / "tie.musicxml", tempo=60.0, time_signature="4/4")))
    tied = [n for n in parsed.parts[0].recurse().notes if n.tie is not None]
    assert [(n.getContextByClass("Measure").number, n.tie.type, n.pitch.midi) for n in tied] == [(1, "start", 76), (2, "stop", 76)]


def test_tempo_estimate_is_exact_for_a_steady_tempo():
    notes = corpus_notes("bach/bwv10.7", tempo=90.0)
    beat = estimate_beat(notes)
    assert beat.tempo == pytest.approx(90.0, rel=0.01)
    assert beat.to_beats(notes[0].onset) == pytest.approx(0.0, abs=0.05)


def test_quantize_picks_16ths_or_triplets():
    assert [quantize(x) for x in (0.26, 0.32, 0.66, 0.74, 1.02)] == [0.25, pytest.approx(1 / 3), pytest.approx(2 / 3), 0.75, 1.0]


def test_hand_split_follows_the_hands():
    # a melody dipping to A3 over a bass line climbing to D4: a fixed middle C split would swap them
    melody = [Note(t, t + 0.5, p, 80) for t, p in zip(np.arange(0, 4, 0.5), (72, 69, 65, 62, 57, 60, 64, 67))]
    bass = [Note(t, t + 1.0, p, 70) for t, p in zip(np.arange(0, 4, 1.0), (40, 45, 48, 50))]
    notes = sorted(melody + bass, key=lambda n: (n.onset, n.pitch))
    right = split_hands(notes)
    assert [n.pitch for n, r in zip(notes, right) if r] == [72, 69, 65, 62, 57, 60, 64, 67]
    assert [n.pitch for n, r in zip(notes, right) if not r] == [40, 45, 48, 50]


def test_a_low_bass_line_goes_to_the_bass_staff():
    score = notes_to_score([Note(0, 1, 36, 80), Note(0, 1, 76, 80), Note(1, 2, 38, 80), Note(1, 2, 74, 80)], tempo=60)
    treble, bass = score.parts
    assert sorted(p.midi for n in treble.recurse().notes for p in n.pitches) == [74, 76]
    assert sorted(p.midi for n in bass.recurse().notes for p in n.pitches) == [36, 38]


def test_dynamics_follow_velocity_levels():
    notes = [Note(i * 0.5, i * 0.5 + 0.4, 60 + i % 5, 30 if i < 8 else 110) for i in range(16)]
    marks = [d.value for d in notes_to_score(notes, tempo=120).parts[0].recurse().getElementsByClass("Dynamic")]
    assert marks == ["pp", "ff"]


def test_no_notes_give_a_bar_of_rest_and_a_bad_tempo_is_a_clear_error(tmp_path):
    import music21

    parsed = music21.converter.parse(str(write_musicxml([], tmp_path / "x.musicxml")))
    assert len(parsed.parts) == 2 and not list(parsed.recurse().notes) and list(parsed.recurse().getElementsByClass("Rest"))
    with pytest.raises(ValueError, match="tempo must be a positive number of BPM"):
        notes_to_score([Note(0, 1, 60, 80)], tempo=-5)


def test_missing_lilypond_says_which_package_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ScoreError) as error:
        render_score([Note(0, 1, 60, 80)], tmp_path / "x.pdf")
    assert str(error.value) == "PDF and PNG scores need LilyPond: install the Debian package 'lilypond' (apt-get install lilypond)"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("lilypond") is None, reason="needs LilyPond (apt-get install lilypond)")
@pytest.mark.parametrize("fmt, magic", [("pdf", b"%PDF"), ("png", b"\x89PNG")])
def test_lilypond_renders_pdf_and_png(tmp_path, fmt, magic):
    notes = corpus_notes("bach/bwv10.7", tempo=90.0)[:40]
    path = render_score(notes, tmp_path / f"score.{fmt}", fmt=fmt)
    assert path.read_bytes()[:4] == magic and path.stat().st_size > 1000


def test_the_beat_follows_an_accelerando():
    """8th notes over 24 beats while the tempo rises from 84 to 120 BPM: one steady tempo drifts off the grid within a
    few bars; the followed beat puts every note on its 8th."""
    from sound2sheet.sheet import BeatMap, choose_beat, track_beat

    positions = np.arange(0.0, 24.0, 0.5)
    tempo = 84.0 + (120.0 - 84.0) * positions / 24.0
    seconds = 0.5 + np.concatenate([[0.0], np.cumsum(60.0 / tempo[:-1] * 0.5)])
    notes = [Note(float(t), float(t) + 0.2, 60 + (k % 5) * 2 + (k % 2) * 12, 70 if k % 2 else 90) for k, t in enumerate(seconds)]
    followed = track_beat(notes)
    assert np.allclose(followed.beats - followed.beats[0], positions)
    assert isinstance(choose_beat(notes), BeatMap)
    steady = estimate_beat(notes)
    drifted = [quantize(steady.to_beats(n.onset)) for n in notes]
    assert not np.allclose(np.array(drifted) - drifted[0], positions)  # what the steady beat alone would write


def test_pitches_musicxml_cannot_spell_are_left_out_with_a_warning_not_misspelled(tmp_path, caplog):
    import music21

    notes = [Note(onset=0.0, offset=0.5, pitch=1, velocity=80), Note(onset=0.5, offset=1.0, pitch=60, velocity=80),
             Note(onset=1.0, offset=1.5, pitch=11, velocity=80), Note(onset=1.5, offset=2.0, pitch=12, velocity=80)]
    with caplog.at_level("WARNING", logger="sound2sheet.sheet"):
        path = write_musicxml(notes, tmp_path / "low.musicxml", tempo=120)
    assert "2 note(s) below MIDI 12 (C0) left out of the score" in caplog.text and "[1, 11]" in caplog.text
    score = music21.converter.parse(str(path))
    assert sorted(p.midi for n in score.recurse().notes for p in n.pitches) == [12, 60]  # not 61 and 71
