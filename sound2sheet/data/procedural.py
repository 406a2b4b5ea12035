"""Procedurally generated piano music: scales, arpeggios, block chords, random polyphony over all 88 keys, fast
repeated notes and two-hand textures, so that a training corpus covers the whole keyboard and dense textures that
the music21 corpus rarely has.

Every generator takes a numpy `Generator` and returns notes in beats: (onset beat, duration in beats, pitch, velocity).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import numpy as np

LOWEST_KEY, HIGHEST_KEY = 21, 108  # A0 and C8: the 88 keys of a piano
MAJOR = (0, 2, 4, 5, 7, 9, 11)
MINOR = (0, 2, 3, 5, 7, 8, 10)
TRIADS = ((0, 4, 7), (0, 3, 7), (0, 3, 6), (0, 4, 8), (0, 4, 7, 10), (0, 3, 7, 10), (0, 4, 7, 11))

BeatNote = Tuple[float, float, int, int]


def _keys(low: int = LOWEST_KEY, high: int = HIGHEST_KEY) -> Tuple[int, int]:
    return max(LOWEST_KEY, low), min(HIGHEST_KEY, high)


def _scale_pitches(rng: np.random.Generator, low: int, high: int) -> List[int]:
    tonic = int(rng.integers(0, 12))
    mode = MAJOR if rng.random() < 0.6 else MINOR
    return [p for p in range(low, high + 1) if (p - tonic) % 12 in mode]


def scales(rng: np.random.Generator, beats: float) -> List[BeatNote]:
    """Runs up and down a major/minor scale in 8ths or 16ths, often in both hands an octave or two apart."""
    low, high = _keys(int(rng.integers(21, 60)), int(rng.integers(72, 109)))
    pitches = _scale_pitches(rng, low, high)
    step = float(rng.choice([0.25, 0.5]))
    hands = [0, -12] if rng.random() < 0.5 else [0]
    notes, t, index, direction = [], 0.0, int(rng.integers(0, len(pitches))), 1
    while t < beats:
        for offset in hands:
            pitch = pitches[index] + offset
            if LOWEST_KEY <= pitch <= HIGHEST_KEY:
                notes.append((t, step * 0.9, pitch, int(rng.integers(50, 100))))
        index += direction
        if not 0 <= index < len(pitches):
            direction = -direction
            index += 2 * direction
        t += step
    return notes


def arpeggios(rng: np.random.Generator, beats: float) -> List[BeatNote]:
    """Broken chords spanning two or three octaves, with the bass note held."""
    notes, t = [], 0.0
    while t < beats:
        root = int(rng.integers(28, 60))
        chord = TRIADS[int(rng.integers(0, len(TRIADS)))]
        tones = [root + 12 * octave + interval for octave in range(int(rng.integers(2, 4))) for interval in chord]
        tones = [p for p in tones if p <= HIGHEST_KEY]
        step = float(rng.choice([0.25, 1 / 3, 0.5]))
        notes.append((t, step * len(tones), root, int(rng.integers(55, 90))))
        for i, pitch in enumerate(tones[1:] + tones[-2:0:-1]):
            notes.append((t + (i + 1) * step, step * 1.5, pitch, int(rng.integers(45, 95))))
        t += step * (2 * len(tones) - 1)
    return notes


def block_chords(rng: np.random.Generator, beats: float) -> List[BeatNote]:
    """Four- to eight-note chords across both hands, struck together, with varied lengths."""
    notes, t = [], 0.0
    while t < beats:
        root = int(rng.integers(24, 72))
        chord = TRIADS[int(rng.integers(0, len(TRIADS)))]
        length = float(rng.choice([0.5, 1.0, 1.5, 2.0]))
        pitches = {root - 12, root} | {root + 12 * o + i for o in (1, 2) for i in chord if rng.random() < 0.8}
        velocity = int(rng.integers(40, 120))
        for pitch in sorted(p for p in pitches if LOWEST_KEY <= p <= HIGHEST_KEY):
            notes.append((t, length * 0.95, pitch, int(np.clip(velocity + rng.integers(-8, 9), 1, 127))))
        t += length
    return notes


def random_polyphony(rng: np.random.Generator, beats: float) -> List[BeatNote]:
    """Independent random notes over all 88 keys: 1-6 voices, random rhythms and lengths."""
    notes = []
    for _ in range(int(rng.integers(1, 7))):
        t = float(rng.uniform(0, 1))
        while t < beats:
            length = float(rng.choice([0.125, 0.25, 0.5, 1.0, 2.0]))
            notes.append((t, length * rng.uniform(0.5, 1.0), int(rng.integers(LOWEST_KEY, HIGHEST_KEY + 1)), int(rng.integers(20, 127))))
            t += length
    return notes


def repeated_notes(rng: np.random.Generator, beats: float) -> List[BeatNote]:
    """Fast repetitions (up to 16 per second at 120 bpm) of single notes and octaves, the hardest onsets to separate."""
    notes, t = [], 0.0
    while t < beats:
        pitch = int(rng.integers(30, 100))
        step = float(rng.choice([0.125, 0.25]))
        count = int(rng.integers(4, 16))
        octave = rng.random() < 0.3
        for i in range(count):
            velocity = int(rng.integers(40, 110))
            notes.append((t + i * step, step * 0.7, pitch, velocity))
            if octave and pitch + 12 <= HIGHEST_KEY:
                notes.append((t + i * step, step * 0.7, pitch + 12, velocity))
        t += count * step + 0.5
    return notes


def two_hands(rng: np.random.Generator, beats: float) -> List[BeatNote]:
    """A melody in the right hand over an Alberti or stride bass in the left."""
    pitches = _scale_pitches(rng, 60, 96)
    notes, t = [], 0.0
    melody_index = int(rng.integers(0, len(pitches)))
    while t < beats:
        length = float(rng.choice([0.5, 1.0, 1.0, 2.0]))
        melody_index = int(np.clip(melody_index + rng.integers(-2, 3), 0, len(pitches) - 1))
        notes.append((t, length * 0.9, pitches[melody_index], int(rng.integers(60, 105))))
        t += length
    bass_root = int(rng.integers(36, 52))
    chord = TRIADS[int(rng.integers(0, 2))]
    pattern = [0, 2, 1, 2] if rng.random() < 0.5 else [0, 1, 2, 1]
    t = 0.0
    while t < beats:
        for i, degree in enumerate(pattern):
            notes.append((t + i * 0.5, 0.45, bass_root + chord[degree], int(rng.integers(40, 75))))
        t += 2.0
        if rng.random() < 0.3:
            bass_root = int(np.clip(bass_root + rng.choice([-5, -7, 5, 7]), 33, 55))
    return notes


GENERATORS: Dict[str, Callable[[np.random.Generator, float], List[BeatNote]]] = {
    "scales": scales,
    "arpeggios": arpeggios,
    "block_chords": block_chords,
    "random_polyphony": random_polyphony,
    "repeated_notes": repeated_notes,
    "two_hands": two_hands,
}


def generate(kind: str, rng: np.random.Generator, beats: float) -> List[BeatNote]:
    """Notes (in beats) of one procedural piece of the given kind, sorted by onset."""
    if kind not in GENERATORS:
        raise ValueError(f"Unknown procedural kind '{kind}'; choose one of {', '.join(GENERATORS)}.")
    return sorted((n for n in GENERATORS[kind](rng, beats) if n[0] < beats), key=lambda n: (n[0], n[2]))


__all__ = ["GENERATORS", "generate", "LOWEST_KEY", "HIGHEST_KEY"]
