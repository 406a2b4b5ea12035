"""Piano-roll pictures of transcriptions (matplotlib): one transcription, or a prediction over its reference.

In the comparison, notes are matched as mir_eval's onset-only note F1 matches them (50 ms, same pitch): hits are drawn
in blue, missed reference notes in orange and false alarms in purple (the Okabe-Ito colour-blind-safe palette).

This module imports only `sound2sheet.notes` from the package.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Sequence, Tuple


from .notes import Note, notes_to_arrays, sort_notes

HIT, MISS, FALSE_ALARM = "#0072B2", "#E69F00", "#CC79A7"  # Okabe-Ito blue, orange, reddish purple
ONSET_TOLERANCE = 0.05  # seconds, mir_eval's standard
DPI = 100


def match_notes(reference: Sequence[Note], prediction: Sequence[Note]) -> Dict[str, List[int]]:
    """Indices (into the onset-sorted lists) of hits, misses and false alarms under onset-only matching."""
    import mir_eval

    reference, prediction = sort_notes(reference), sort_notes(prediction)
    if not reference or not prediction:
        return {"hits": [], "misses": list(range(len(reference))), "false_alarms": list(range(len(prediction))), "pairs": []}
    ref_intervals, ref_pitches, _ = notes_to_arrays(reference)
    est_intervals, est_pitches, _ = notes_to_arrays(prediction)
    to_hz = lambda p: 440.0 * 2.0 ** ((p - 69.0) / 12.0)  # noqa: E731
    pairs = mir_eval.transcription.match_notes(
        ref_intervals, to_hz(ref_pitches.astype(float)), est_intervals, to_hz(est_pitches.astype(float)),
        onset_tolerance=ONSET_TOLERANCE, offset_ratio=None,
    )
    matched_ref = {r for r, _ in pairs}
    matched_est = {e for _, e in pairs}
    return {
        "hits": sorted(e for _, e in pairs),
        "misses": [i for i in range(len(reference)) if i not in matched_ref],
        "false_alarms": [i for i in range(len(prediction)) if i not in matched_est],
        "pairs": sorted(pairs),
    }


def _figure(width: int, height: int):
    from matplotlib.figure import Figure

    return Figure(figsize=(width / DPI, height / DPI), dpi=DPI)


def _pitch_range(*note_lists) -> Tuple[int, int]:
    pitches = [n.pitch for notes in note_lists for n in notes]
    if not pitches:
        return 21, 108
    return max(0, min(pitches) - 2), min(127, max(pitches) + 2)


def _save(figure, path: Path) -> Path:
    tmp = path.with_name(path.stem + ".partial.png")
    try:
        figure.savefig(tmp, dpi=DPI, format="png")
        os.replace(tmp, path)
    except OSError as err:
        raise OSError(f"{path}: cannot write the picture ({err.strerror or err})") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _draw(axes, notes: Sequence[Note], colour, alpha_by_velocity: bool = True):
    from matplotlib.patches import Rectangle

    for note in notes:
        alpha = 0.35 + 0.65 * note.velocity / 127 if alpha_by_velocity else 0.85
        axes.add_patch(Rectangle((note.onset, note.pitch - 0.4), note.duration, 0.8, color=colour, alpha=alpha, linewidth=0))


def _frame(axes, notes_lists, title: str):
    low, high = _pitch_range(*notes_lists)
    end = max([n.offset for notes in notes_lists for n in notes] + [1.0])
    axes.set_xlim(0, end)
    axes.set_ylim(low - 0.5, high + 0.5)
    axes.set_xlabel("time (s)")
    axes.set_ylabel("MIDI pitch")
    axes.set_title(title)
    axes.grid(axis="y", color="#dddddd", linewidth=0.5)


def plot_pianoroll(notes: Sequence[Note], path: str | os.PathLike, width: int = 1200, height: int = 600, title: str = "Transcription") -> Path:
    """Write a PNG piano roll (time across, pitch up, loudness as opacity) of `width` x `height` pixels."""
    path = Path(path)
    figure = _figure(width, height)
    axes = figure.add_subplot()
    _draw(axes, notes, HIT)
    _frame(axes, [notes], title)
    figure.tight_layout()
    return _save(figure, path)


def plot_comparison(reference: Sequence[Note], prediction: Sequence[Note], path: str | os.PathLike,
                    width: int = 1200, height: int = 600, title: str = "Prediction vs reference") -> Path:
    """Write a PNG overlaying prediction and reference: hits, misses and false alarms in distinct colours."""
    from matplotlib.patches import Patch

    path = Path(path)
    reference, prediction = sort_notes(reference), sort_notes(prediction)
    matches = match_notes(reference, prediction)
    figure = _figure(width, height)
    axes = figure.add_subplot()
    _draw(axes, [prediction[i] for i in matches["hits"]], HIT, alpha_by_velocity=False)
    _draw(axes, [reference[i] for i in matches["misses"]], MISS, alpha_by_velocity=False)
    _draw(axes, [prediction[i] for i in matches["false_alarms"]], FALSE_ALARM, alpha_by_velocity=False)
    _frame(axes, [reference, prediction], title)
    kinds = ((HIT, "hit", "hits"), (MISS, "missed", "misses"), (FALSE_ALARM, "false alarm", "false_alarms"))
    handles = [Patch(color=colour, label=f"{label} ({len(matches[key])})") for colour, label, key in kinds if matches[key]]
    if handles:
        axes.legend(handles=handles, loc="upper right", fontsize="small")
    figure.tight_layout()
    return _save(figure, path)


__all__ = ["plot_pianoroll", "plot_comparison", "match_notes", "HIT", "MISS", "FALSE_ALARM"]
