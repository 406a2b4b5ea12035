"""From transcribed notes (seconds) to a readable two-staff piano score: MusicXML, and PDF/PNG through LilyPond.

The steps, each replaceable by a user's choice:

1. the beat, from the note onsets: one steady tempo (`estimate_beat`), or a beat that follows a changing tempo
   (`track_beat`), whichever places the onsets better (`choose_beat`); or a steady `tempo=` given;
2. quantization of onsets and lengths to a grid of 16ths and 8th-note triplets (whichever is nearer per note);
3. the hands: a split point that follows the music (`split_hands`), not a fixed middle C;
4. the score (music21): treble and bass staves in a piano brace, measures with ties across barlines and rests
   (music21's `makeNotation`), the key signature (Krumhansl-Schmuckler analysis), the time signature (given, or 3/4 vs
   4/4 from accent periodicity), a tempo mark, and dynamics (pp ... ff) where the loudness level changes.

This module imports only `sound2sheet.notes` from the package.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .notes import Note, sort_notes

logger = logging.getLogger(__name__)

# MusicXML writes octaves 0-9: MIDI pitches below 12 (C0) have no spelling, and music21 would put them in octave 4.
LOWEST_WRITABLE_PITCH = 12

TEMPO_RANGE = (40.0, 208.0)  # BPM a metronome covers
GRID = (0.25, 1 / 3)  # 16th notes and 8th-note triplets, in quarter notes
MIN_LENGTH = 0.25  # shortest written note, in quarter notes
DYNAMICS = ((0, "pp"), (40, "p"), (56, "mp"), (72, "mf"), (88, "f"), (104, "ff"))  # velocity thresholds
LILYPOND_PACKAGE = "lilypond"


class ScoreError(RuntimeError):
    """A score could not be written or rendered; the message names the file (or the missing tool)."""


@dataclass
class Beat:
    """A steady beat: `tempo` quarter notes per minute, the first beat at `offset` seconds."""

    tempo: float
    offset: float

    @property
    def seconds_per_beat(self) -> float:
        return 60.0 / self.tempo

    def to_beats(self, seconds: float) -> float:
        return (seconds - self.offset) / self.seconds_per_beat


def _grid_fit(onsets: np.ndarray, period: float, tolerance: float = 0.025) -> Tuple[float, float]:
    """(score, phase) of the 16th-note grid of this beat period: the share of onsets within `tolerance` s of it, less
    a small penalty for the mean distance; the phase (within one 16th) is searched. (Triplets join only at
    quantization: the union of both grids is so dense that almost any tempo would fit it.)"""
    best = (-np.inf, 0.0)
    sixteenth = period * 0.25
    for phase in np.linspace(0.0, sixteenth, 24, endpoint=False):
        positions = (onsets - onsets[0] - phase) / sixteenth
        error = np.abs(positions - np.round(positions)) * sixteenth
        score = float(np.mean(error <= tolerance)) - 0.1 * float(np.mean(error)) / tolerance
        if score > best[0] + 1e-9:
            best = (score, phase)
    return best


def _beat_phase(onsets: np.ndarray, weights: np.ndarray, period: float, phase: float) -> float:
    """Of the four 16th-shifted grids, the one whose beats carry the most weight (long notes fall on beats);
    ties go to the grid with the first onset on a beat."""
    best_shift, best_weight = 0, -1.0
    for shift in range(4):
        positions = (onsets - onsets[0] - phase - shift * period / 4) / period
        on_beat = np.abs(positions - np.round(positions)) < 0.1
        weight = float(np.sum(weights[on_beat]))
        if weight > best_weight * 1.05:
            best_shift, best_weight = shift, weight
    return phase + best_shift * period / 4


def _chord_onsets(notes: Sequence[Note], spread: float = 0.035) -> Tuple[np.ndarray, np.ndarray]:
    """(onset times, weights): near-simultaneous onsets (a chord played with a little spread) merged into their mean,
    each weighted by its notes' total length (capped at 2 s)."""
    ordered = sorted(notes, key=lambda n: n.onset)
    groups, weights = [[ordered[0].onset]], [min(ordered[0].duration, 2.0)]
    for note in ordered[1:]:
        if note.onset - groups[-1][0] <= spread:
            groups[-1].append(note.onset)
            weights[-1] += min(note.duration, 2.0)
        else:
            groups.append([note.onset])
            weights.append(min(note.duration, 2.0))
    return np.array([np.mean(g) for g in groups]), np.array(weights)


def estimate_beat(notes: Sequence[Note]) -> Beat:
    """The steady tempo and first beat that best explain the onsets.

    Chords are merged into one onset; candidate beat periods come from the inter-onset intervals (each interval read as
    1/4 .. 2 beats); every candidate is scored by how many onsets fall on its 16th-note grid (25 ms tolerance), with a
    mild preference for tempi near 100 BPM between a tempo and its doubles and halves; the winner is refined by a
    least-squares fit.
    """
    if not notes:
        return Beat(120.0, 0.0)
    onsets, weights = _chord_onsets(notes)
    if len(onsets) < 2:
        return Beat(120.0, float(onsets[0]))
    intervals = np.diff(onsets)
    intervals = intervals[intervals > 0.05]
    candidates = set()
    for interval in np.unique(np.round(intervals, 3))[:200]:
        for beats in (0.25, 0.5, 1.0, 1.5, 2.0):
            tempo = 60.0 * beats / interval
            if TEMPO_RANGE[0] <= tempo <= TEMPO_RANGE[1]:
                candidates.add(round(tempo, 1))
    if not candidates:
        return Beat(120.0, float(onsets[0]))
    # Tempi read off single (jittered) intervals are a little off, and over a long piece a small error drifts off
    # the grid: refine the promising candidates by least squares before comparing them.
    rough = sorted(candidates, key=lambda t: _grid_fit(onsets, 60.0 / t)[0], reverse=True)[:16]
    refined = {}
    for tempo in rough:
        beat = refine_beat(onsets, Beat(tempo, float(onsets[0] + _grid_fit(onsets, 60.0 / tempo)[1])))
        if TEMPO_RANGE[0] <= beat.tempo <= TEMPO_RANGE[1]:
            refined[round(beat.tempo, 2)] = _grid_fit(onsets, beat.seconds_per_beat)
    if not refined:
        return Beat(120.0, float(onsets[0]))
    best_fit = max(score for score, _ in refined.values())
    # near-equal fits (a tempo, its doubles and halves): the one nearest 100 BPM
    tempo = min((t for t, (score, _) in refined.items() if score >= best_fit - 0.02), key=lambda t: abs(np.log2(t / 100.0)))
    period = 60.0 / tempo
    phase = _beat_phase(onsets, weights, period, refined[tempo][1])
    return refine_beat(onsets, Beat(tempo, float(onsets[0] + phase)))


def refine_beat(onsets: np.ndarray, beat: Beat, rounds: int = 3) -> Beat:
    """Least-squares fit of tempo and first beat to the onsets' grid positions: exact for a steady tempo, and it
    removes the rounding of the candidate tempi (an error that would otherwise accumulate over a long piece)."""
    for _ in range(rounds):
        positions = np.array([quantize(beat.to_beats(t)) for t in onsets])
        if np.ptp(positions) <= 0:
            return beat
        design = np.stack([np.ones_like(positions), positions], axis=1)
        (offset, seconds_per_beat), *_ = np.linalg.lstsq(design, onsets, rcond=None)
        if seconds_per_beat <= 0:
            return beat
        beat = Beat(60.0 / float(seconds_per_beat), float(offset))
    return beat


TRACK_WINDOW = 6.0  # beats of recent onsets the local tempo is fitted to
TRACK_DECAY = 3.0  # beats over which an onset's weight in that fit falls by a factor e
TEMPO_PRIOR = 0.06  # beats of placement cost one octave away from 100 BPM costs


@dataclass
class BeatMap:
    """A beat that follows a drifting tempo: each chord onset's place in the score (`beats`, on the 16th/triplet grid)
    at its time (`seconds`); times in between are interpolated, times outside extrapolated at the nearest local tempo."""

    seconds: np.ndarray
    beats: np.ndarray
    cost: float = 0.0  # mean placement cost of the onsets when they were placed (see `_place`)

    @property
    def tempo(self) -> float:
        """The median tempo, in quarter notes per minute (for the score's tempo mark)."""
        if len(self.seconds) < 2:
            return 120.0
        rates = np.diff(self.beats) / np.maximum(np.diff(self.seconds), 1e-6)
        return float(np.clip(60.0 * np.median(rates[rates > 0]) if (rates > 0).any() else 120.0, *TEMPO_RANGE))

    def to_beats(self, seconds: float) -> float:
        t, q = self.seconds, self.beats
        if len(t) == 1:
            return float(q[0] + (seconds - t[0]) * self.tempo / 60.0)
        if seconds < t[0]:
            return float(q[0] + (seconds - t[0]) * (q[1] - q[0]) / (t[1] - t[0]))
        if seconds > t[-1]:
            return float(q[-1] + (seconds - t[-1]) * (q[-1] - q[-2]) / (t[-1] - t[-2]))
        return float(np.interp(seconds, t, q))


# What a performed onset must gain in closeness (in beats) to be read as a finer subdivision: a played rhythm is
# heard as the simplest one near it (beats, then 8ths, then 16ths and triplets) when the tempo is not steady.
PLACE_PENALTY = ((1.0, 0.0), (0.5, 0.05), (0.25, 0.1), (1 / 3, 0.12))


def _place(exact: float) -> Tuple[float, float]:
    """(grid point, cost) for an onset at `exact` beats: of the beats, 8ths, 16ths and 8th-note triplets, the point
    nearest after a small penalty for each finer subdivision; the cost is that distance plus penalty, in beats."""
    best, best_cost = exact, np.inf
    for step, penalty in PLACE_PENALTY:
        point = round(exact / step) * step
        cost = abs(point - exact) + penalty
        if cost < best_cost - 1e-9:
            best, best_cost = point, cost
    return float(best), float(best_cost)


def _follow(onsets: np.ndarray, offset: float, period: float) -> Tuple[np.ndarray, float]:
    """(grid positions in beats, mean placement cost in beats: see `_place`) of the chord
    `onsets`, followed from a beat at `offset` seconds with `period` seconds per beat: each onset goes to the grid
    point `_place` picks at the local tempo (never before the previous onset's), and the local tempo is then refitted
    (weighted least squares, recent onsets weigh more) to the placed onsets of the last `TRACK_WINDOW` beats."""
    low, high = 60.0 / TEMPO_RANGE[1], 60.0 / TEMPO_RANGE[0]
    positions = np.zeros(len(onsets))
    costs = 0.0
    first = 0  # the oldest onset still inside the fitting window
    for index, time in enumerate(onsets):
        exact = (time - offset) / period
        position, cost = _place(exact)
        costs += cost
        if index and position <= positions[index - 1]:  # never backwards: the next grid point after the last
            position = positions[index - 1] + min(GRID)
        positions[index] = position
        while positions[first] < position - TRACK_WINDOW:
            first += 1
        beats, seconds = positions[first : index + 1], onsets[first : index + 1]
        if len(beats) >= 2 and beats[-1] - beats[0] >= 1.0:
            weights = np.exp(-(position - beats) / (2 * TRACK_DECAY))
            design = np.stack([np.ones_like(beats), beats], axis=1) * weights[:, None]
            (fit_offset, fit_period), *_ = np.linalg.lstsq(design, seconds * weights, rcond=None)
            if low <= fit_period <= high and 0.8 * period <= fit_period <= 1.25 * period:
                offset, period = float(fit_offset), float(fit_period)
    return positions, costs / max(1, len(onsets))


def track_beat(notes: Sequence[Note], opening: int = 24) -> BeatMap:
    """Follow the beat through tempo changes and place every chord onset on the 16th/triplet grid.

    The starting tempo is chosen on the first `opening` chord onsets: candidates come from their inter-onset intervals
    (each read as 1/4 .. 2 beats); each is followed through the opening (`_follow`, which adapts to a drifting tempo)
    and the one with the lowest mean placement cost, plus `TEMPO_PRIOR` per octave away from 100 BPM, wins; the beat
    falls on the 16th that carries the most note weight. Then the whole piece is followed from there. Accelerandi and
    ritardandi are followed, where a single steady tempo would drift off the grid within a few bars.

    Raises:
        ValueError: `notes` is empty.
    """
    if not notes:
        raise ValueError("track_beat needs at least one note")
    onsets, weights = _chord_onsets(notes)
    if len(onsets) < 2:
        return BeatMap(onsets, np.zeros(len(onsets)))
    head = onsets[:opening]
    intervals = np.diff(head)
    candidates = set()
    for interval in intervals[intervals > 0.05]:
        for beats in (0.25, 0.5, 1.0, 1.5, 2.0):
            tempo = 60.0 * beats / interval
            if TEMPO_RANGE[0] <= tempo <= TEMPO_RANGE[1]:
                candidates.add(round(tempo))
    if not candidates:
        candidates = {120}
    scored = {tempo: _follow(head, float(head[0]), 60.0 / tempo) for tempo in sorted(candidates)}
    # lowest placement cost, with a mild preference for tempi near 100 BPM (between a tempo and its double, the
    # cost alone prefers the one that puts the notes on simple beats without stretching the errors)
    tempo = min(scored, key=lambda t: scored[t][1] + TEMPO_PRIOR * abs(np.log2(t / 100.0)))
    placed = scored[tempo][0]
    # the beat: of the four 16th-shifted readings of the opening, the one whose beats carry the most weight
    head_weights = weights[: len(head)]
    shift = max(range(4), key=lambda k: (float(np.sum(head_weights[np.abs((placed - k / 4) - np.round(placed - k / 4)) < 1e-6])), -k))
    positions, cost = _follow(onsets, float(head[0]) + shift * 15.0 / tempo, 60.0 / tempo)
    return BeatMap(onsets, positions, cost)


def choose_beat(notes: Sequence[Note]):
    """The steady beat (`estimate_beat`) when it places the onsets at least as well as the followed one
    (`track_beat`), else the followed one: a steady performance keeps the exactness of one global fit (which averages
    out timing jitter), a performance with a changing tempo is followed."""
    steady = estimate_beat(notes)
    tracked = track_beat(notes)
    onsets, _ = _chord_onsets(notes)
    steady_cost = float(np.mean([_place(steady.to_beats(t))[1] for t in onsets]))
    return steady if steady_cost <= tracked.cost else tracked


def quantize(value: float) -> float:
    """Nearest point of the 16th / 8th-triplet grid, in quarter notes (16ths win near-ties)."""
    candidates = [round(value / g) * g for g in GRID]
    errors = [abs(c - value) for c in candidates]
    return float(candidates[0] if errors[0] <= errors[1] + 1e-3 else candidates[1])


HAND_SPAN = 14  # semitones one hand comfortably covers (a ninth); wider chords cost more
EMPTY_HAND_COST = 7.0  # semitones: what leaving one hand idle costs, against moving it that far


def split_hands(notes: Sequence[Note]) -> List[bool]:
    """For each note (in the given order), True if the right hand plays it.

    Each chord (notes starting together) is split where it costs least: the distance each hand moves from where it
    last was (its lowest / highest note), plus a cost for a hand spanning more than a ninth and for leaving a hand
    idle. A melody that dips below middle C stays in the treble, a bass line that climbs stays in the bass.
    """
    groups: dict = {}
    for index, note in enumerate(notes):
        groups.setdefault(round(note.onset, 2), []).append(index)
    assignment = [False] * len(notes)
    right_hand, left_hand = 67.0, 48.0  # G4 and C3: where the hands start
    for onset in sorted(groups):
        members = sorted(groups[onset], key=lambda i: notes[i].pitch)
        pitches = [notes[i].pitch for i in members]

        def cost(k: int) -> float:
            left, right = pitches[:k], pitches[k:]
            total = 0.0
            for hand, position, edge in ((left, left_hand, max), (right, right_hand, min)):
                if hand:
                    total += abs(edge(hand) - position) + 2.0 * max(0, hand[-1] - hand[0] - HAND_SPAN)
                else:
                    total += EMPTY_HAND_COST
            return total

        split = min(range(len(pitches) + 1), key=cost)
        for k, index in enumerate(members):
            assignment[index] = k >= split
        if split < len(pitches):
            right_hand = 0.5 * right_hand + 0.5 * pitches[split]
        if split > 0:
            left_hand = 0.5 * left_hand + 0.5 * pitches[split - 1]
    return assignment


def estimate_meter(beat_onsets: Sequence[float], weights: Sequence[float]) -> str:
    """'3/4' or '4/4': the bar length whose downbeats carry more accent, per downbeat, relative to its other beats.

    An onset's accent is its weight (pass velocity x length: loud and long notes fall on strong beats); every beat
    position counts, with the weight of the onsets on it (zero for a beat with none); onsets off the beat are ignored.
    """
    accents: dict = {}
    for position, weight in zip(beat_onsets, weights):
        if abs(position - round(position)) <= 1e-6:
            accents[int(round(position))] = accents.get(int(round(position)), 0.0) + weight
    if not accents:
        return "4/4"
    beats = np.arange(0, max(accents) + 1)
    values = np.array([accents.get(int(b), 0.0) for b in beats])

    def contrast(bar: int) -> float:
        down = values[beats % bar == 0]
        other = values[beats % bar != 0]
        return float(down.mean() / (other.mean() + 1e-9)) if len(other) else 1.0

    return "3/4" if contrast(3) > 1.1 * contrast(4) else "4/4"


def _dynamic(velocity: float) -> str:
    mark = DYNAMICS[0][1]
    for threshold, name in DYNAMICS:
        if velocity >= threshold:
            mark = name
    return mark


def notes_to_score(
    notes: Sequence[Note],
    tempo: Optional[float] = None,
    time_signature: Optional[str] = None,
    key: Optional[str] = None,
    title: Optional[str] = None,
):
    """A quantized two-staff piano `music21.stream.Score` of the notes (see the module docstring). Notes below MIDI 12,
    which MusicXML cannot spell (a piano's lowest key is 21), are left out with a warning rather than misspelled."""
    import music21
    from music21 import chord, clef, dynamics, layout, meter, note, stream, tempo as m21tempo

    unwritable = [n for n in notes if n.pitch < LOWEST_WRITABLE_PITCH]
    if unwritable:
        logger.warning("%d note(s) below MIDI %d (C0) left out of the score: MusicXML cannot spell them (pitches %s)",
                       len(unwritable), LOWEST_WRITABLE_PITCH, sorted({n.pitch for n in unwritable}))
    notes = sort_notes([n for n in notes if n.pitch >= LOWEST_WRITABLE_PITCH])
    if tempo is not None:
        if not 20 <= tempo <= 400:
            raise ValueError(f"tempo must be a positive number of BPM (20-400), got {tempo}")
        beat = Beat(float(tempo), notes[0].onset if notes else 0.0)
    else:
        beat = choose_beat(notes) if notes else Beat(120.0, 0.0)
    placed = []
    for n in notes:
        onset = quantize(beat.to_beats(n.onset))
        end = quantize(beat.to_beats(n.offset))
        placed.append((onset, max(MIN_LENGTH, end - onset), n))
    shift = min((p[0] for p in placed), default=0.0)
    placed = [(onset - shift, length, n) for onset, length, n in placed]
    if time_signature is None:
        time_signature = estimate_meter([p[0] for p in placed], [p[2].velocity * min(p[1], 4.0) for p in placed])
    right = split_hands([p[2] for p in placed])

    def part_for(hand_is_right: bool, name: str):
        part = stream.PartStaff(id=name)
        part.append(clef.TrebleClef() if hand_is_right else clef.BassClef())
        part.append(meter.TimeSignature(time_signature))
        chords: dict = {}
        for (onset, length, n), is_right in zip(placed, right):
            if is_right == hand_is_right:
                chords.setdefault((onset, length), []).append(n)
        for (onset, length), members in sorted(chords.items()):
            pitches = sorted({m.pitch for m in members})
            element = note.Note(pitches[0]) if len(pitches) == 1 else chord.Chord(pitches)
            element.quarterLength = length
            element.volume.velocity = int(np.mean([m.velocity for m in members]))
            part.insert(onset, element)
        return part

    treble, bass = part_for(True, "right hand"), part_for(False, "left hand")
    if not notes:  # nothing was heard: one bar of rest
        for part in (treble, bass):
            part.insert(0, note.Rest(quarterLength=meter.TimeSignature(time_signature).barDuration.quarterLength))
    score = stream.Score()
    score.insert(0, music21.metadata.Metadata(title=title or "Transcription"))
    for part in (treble, bass):
        score.insert(0, part)
    score.insert(0, layout.StaffGroup([treble, bass], name="Piano", abbreviation="Pno.", symbol="brace"))
    analysed = music21.key.Key(key or "C") if key is not None or not notes else score.analyze("key")
    for part in (treble, bass):
        part.insert(0, analysed.asKey() if hasattr(analysed, "asKey") else analysed)
    treble.insert(0, m21tempo.MetronomeMark(number=round(beat.tempo)))
    level = None
    for (onset, _, n), is_right in zip(placed, right):
        mark = _dynamic(n.velocity)
        if mark != level and (level is None or abs(DYNAMICS[[d[1] for d in DYNAMICS].index(mark)][0] - n.velocity) < 12):
            treble.insert(onset, dynamics.Dynamic(mark))
            level = mark
    for part in (treble, bass):
        part.makeNotation(inPlace=True)
    return score


def write_musicxml(notes: Sequence[Note], path: str | os.PathLike, **options) -> Path:
    """Write the score of `notes` as MusicXML, whole or not at all; options as `notes_to_score`."""
    path = Path(path)
    score = notes_to_score(notes, **options)
    tmp = path.with_name(path.name + ".partial.musicxml")
    try:
        written = Path(score.write("musicxml", fp=str(tmp)))
        os.replace(written, path)
    except OSError as err:
        raise ScoreError(f"{path}: cannot write MusicXML ({err.strerror or err})") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def lilypond_tools() -> Tuple[str, str]:
    """(musicxml2ly, lilypond) paths, or a ScoreError saying which package to install."""
    converter, engraver = shutil.which("musicxml2ly"), shutil.which("lilypond")
    if converter is None or engraver is None:
        raise ScoreError(f"PDF and PNG scores need LilyPond: install the Debian package '{LILYPOND_PACKAGE}' (apt-get install {LILYPOND_PACKAGE})")
    return converter, engraver


def render_score(notes: Sequence[Note], path: str | os.PathLike, fmt: str = "pdf", **options) -> Path:
    """Engrave the score of `notes` to PDF or PNG with LilyPond (musicxml2ly, then lilypond)."""
    if fmt not in ("pdf", "png"):
        raise ValueError(f"fmt must be 'pdf' or 'png', got {fmt!r}")
    path = Path(path)
    converter, engraver = lilypond_tools()
    with tempfile.TemporaryDirectory() as tmp:
        xml = write_musicxml(notes, Path(tmp) / "score.musicxml", **options)
        ly = Path(tmp) / "score.ly"
        for command in ([converter, "--output", str(ly), str(xml)],
                        [engraver, f"--{fmt}" if fmt == "pdf" else "--png", "-dno-point-and-click", "-o", str(Path(tmp) / "score"), str(ly)]):
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
            if result.returncode != 0:
                raise ScoreError(f"{path}: {Path(command[0]).name} failed: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}")
        produced = sorted(Path(tmp).glob(f"score*.{fmt}"))
        if not produced:
            raise ScoreError(f"{path}: LilyPond wrote no {fmt.upper()} file")
        shutil.move(str(produced[0]), path)
    return path


__all__ = ["Beat", "ScoreError", "estimate_beat", "estimate_meter", "quantize", "split_hands", "notes_to_score",
           "write_musicxml", "render_score", "lilypond_tools"]
