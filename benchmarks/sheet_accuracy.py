"""How much of a performed score comes back in the right measure and beat, and how long MusicXML takes.

    python benchmarks/sheet_accuracy.py [--pieces 10] [--repeats 3]

For --pieces non-reserved chorales of the music21 corpus (no pickup bar, so measure numbers line up), the notes are
performed as the renderer performs them (tempo curve within +-15 %, timing jitter) and turned into a score by
`sound2sheet.sheet`; printed: the share of the original's (measure, beat, pitch) note starts found in the score, per
piece and overall, then at a steady tempo for comparison, and the median time to write MusicXML for a 5-minute piece.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from sound2sheet import Note
from sound2sheet.data.procedural import LOWEST_KEY
from sound2sheet.data.synth import is_reserved, perform
from sound2sheet.sheet import notes_to_score, write_musicxml


def note_starts(score) -> Counter:
    found = Counter()
    for part in score.parts:
        for element in part.recurse().notes:
            if element.tie is not None and element.tie.type in ("stop", "continue"):
                continue
            measure = element.getContextByClass("Measure")
            for pitch in element.pitches:
                found[(measure.number, round(float(element.offset), 3), int(pitch.midi))] = 1
    return found


def candidate_pieces(count: int):
    import music21

    pieces = []
    for path in sorted(music21.corpus.getComposer("bach")):
        name = "bach/" + path.name
        if not name.endswith(".mxl") or is_reserved(name):
            continue
        score = music21.corpus.parse(path)
        measures = score.parts[0].getElementsByClass("Measure")
        if len(score.parts) == 4 and measures.first().number == 1 and len({m.duration.quarterLength for m in measures}) == 1:
            pieces.append((name, score))
        if len(pieces) == count:
            break
    return pieces


def beat_notes(score):
    return [(float(e.offset), float(e.quarterLength), int(p.midi), 80) for e in score.stripTies().flatten().notes for p in e.pitches]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pieces", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    totals = {"curve": [0, 0], "steady": [0, 0]}
    for index, (name, score) in enumerate(candidate_pieces(args.pieces)):
        truth = note_starts(score)
        performed, _ = perform(beat_notes(score), np.random.default_rng(index), max_seconds=1e9, pedal_probability=0.0)
        curve = [Note(on, max(off, on + 0.03), max(p, LOWEST_KEY), v) for on, off, p, v in performed]
        steady = [Note(1 + b * 0.6, 1 + (b + length) * 0.6, p, v) for b, length, p, v in beat_notes(score)]
        row = [name]
        for label, notes in (("curve", curve), ("steady", steady)):
            found = note_starts(notes_to_score(notes))
            hits = sum(1 for key in truth if key in found)
            totals[label][0] += hits
            totals[label][1] += len(truth)
            row.append(f"{label} {hits / len(truth):.3f}")
        print("  ".join(row))
    for label, (hits, total) in totals.items():
        print(f"overall, {'tempo curves +-15 %' if label == 'curve' else 'steady tempo'}: {hits / total:.3f} of {total} note starts in the right measure and beat")
    rng = np.random.default_rng(0)
    long_piece = []
    for t in np.arange(0.0, 300.0, 0.25):  # 5 minutes of 16ths at 60 BPM with chords
        for pitch in rng.choice(np.arange(36, 84), size=int(rng.integers(1, 4)), replace=False):
            long_piece.append(Note(float(t), float(t + 0.25 * rng.integers(1, 5)), int(pitch), int(rng.integers(40, 110))))
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            start = time.perf_counter()
            write_musicxml(long_piece, Path(tmp) / "long.musicxml")
            times.append(time.perf_counter() - start)
    print(f"MusicXML for a 5-minute piece ({len(long_piece)} notes): {statistics.median(times):.1f} s (median of {args.repeats})")


if __name__ == "__main__":
    main()
