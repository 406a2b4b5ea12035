"""notes.py: the Note record, MIDI reading with sustain-pedal extension, writing, malformed files."""

from __future__ import annotations

import pytest

from sound2sheet.notes import MidiFileError, Note, apply_sustain_pedal, pitch_list, read_midi, write_midi

from .data_fixtures import write_midi_with_pedal


def assert_same_notes(got, expected):
    """Equal pitches and velocities in order, and times equal up to MIDI tick rounding."""
    assert [(n.pitch, n.velocity) for n in got] == [(n.pitch, n.velocity) for n in expected]
    assert [t for n in got for t in (n.onset, n.offset)] == pytest.approx([t for n in expected for t in (n.onset, n.offset)], abs=2e-3)


def test_note_validates_its_fields():
    with pytest.raises(ValueError, match="Note pitch must be in 0-127, got 128"):
        Note(0.0, 1.0, 128, 80)
    with pytest.raises(ValueError, match="Note velocity must be in 1-127, got 0"):
        Note(0.0, 1.0, 60, 0)
    with pytest.raises(ValueError, match="Note offset must be finite and after its onset"):
        Note(1.0, 1.0, 60, 80)


def test_pedal_extends_released_keys_until_the_pedal_lifts(tmp_path):
    write_midi_with_pedal(
        tmp_path / "pedal.mid",
        [
            Note(0.0, 0.5, 60, 80),  # released while the pedal (0.2-2.0) is down: sounds until 2.0
            Note(0.1, 0.3, 64, 70),  # released while the pedal is down, but 64 is struck again at 1.0: cut there
            Note(1.0, 1.2, 64, 75),  # its own release is under the pedal too: sounds until 2.0
            Note(2.5, 3.0, 67, 90),  # after the pedal: its own release
            Note(3.5, 3.6, 72, 60),  # under a pedal that is never lifted: falls back to the key release
        ],
        pedal=[(0.2, 2.0)],
    )
    import pretty_midi

    midi = pretty_midi.PrettyMIDI(str(tmp_path / "pedal.mid"))
    midi.instruments[0].control_changes.append(pretty_midi.ControlChange(64, 100, 3.55))
    midi.write(str(tmp_path / "pedal.mid"))
    assert_same_notes(read_midi(tmp_path / "pedal.mid"), [
        Note(0.0, 2.0, 60, 80), Note(0.1, 1.0, 64, 70), Note(1.0, 2.0, 64, 75), Note(2.5, 3.0, 67, 90), Note(3.5, 3.6, 72, 60),
    ])
    assert_same_notes(read_midi(tmp_path / "pedal.mid", sustain=False), [
        Note(0.0, 0.5, 60, 80), Note(0.1, 0.3, 64, 70), Note(1.0, 1.2, 64, 75), Note(2.5, 3.0, 67, 90), Note(3.5, 3.6, 72, 60),
    ])


def test_overlapping_and_duplicate_same_pitch_notes_are_cut_and_merged():
    notes = apply_sustain_pedal([(0.0, 1.0, 60, 80), (0.5, 1.5, 60, 90), (2.0, 2.5, 62, 70), (2.0, 2.4, 62, 100)], pedal=[])
    assert notes == [Note(0.0, 0.5, 60, 80), Note(0.5, 1.5, 60, 90), Note(2.0, 2.5, 62, 100)]


def test_write_read_round_trip_and_pitch_list(tmp_path):
    notes = [Note(0.25, 0.75, 60, 100), Note(0.25, 1.5, 48, 64), Note(1.0, 1.25, 72, 30)]
    write_midi(notes, tmp_path / "out.mid")
    assert_same_notes(read_midi(tmp_path / "out.mid"), sorted(notes, key=lambda n: (n.onset, n.pitch)))
    assert pitch_list(notes) == [48, 60, 72]
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize(
    "content, reason",
    [(b"", "not a readable MIDI file"), (b"\x00\x01garbage" * 10, "not a readable MIDI file"), (b"MThd\x00\x00\x00\x06", "not a readable MIDI file")],
    ids=["empty", "random-bytes", "truncated-header"],
)
def test_malformed_midi_names_the_file(tmp_path, content, reason):
    path = tmp_path / "bad.mid"
    path.write_bytes(content)
    with pytest.raises(MidiFileError) as error:
        read_midi(path)
    assert str(error.value).startswith(f"{path}: {reason}")
    with pytest.raises(MidiFileError, match=f"^{tmp_path / 'missing.mid'}: no such MIDI file$"):
        read_midi(tmp_path / "missing.mid")
