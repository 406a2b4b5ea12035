"""Piano-roll pictures: size, content, and the hit/miss/false-alarm colours of the comparison."""

from __future__ import annotations

import numpy as np
from matplotlib import image

from sound2sheet import Note
from sound2sheet.pianoroll import FALSE_ALARM, HIT, MISS, match_notes, plot_comparison, plot_pianoroll


def rgb(hex_colour: str) -> np.ndarray:
    return np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)]) / 255.0


def has_colour(picture: np.ndarray, colour: str, tolerance: float = 0.02) -> bool:
    return bool(np.any(np.all(np.abs(picture[..., :3] - rgb(colour)) < tolerance, axis=-1)))


def test_pianoroll_png_has_the_asked_size_and_content(tmp_path):
    notes = [Note(0.1 * i, 0.1 * i + 0.5, 40 + 3 * i, 127) for i in range(12)]
    path = plot_pianoroll(notes, tmp_path / "roll.png", width=800, height=400)
    picture = image.imread(path)
    assert picture.shape[:2] == (400, 800)
    assert (picture[..., :3] < 0.95).mean() > 0.02  # not a blank canvas
    assert has_colour(picture, HIT)


def test_matching_counts_hits_misses_and_false_alarms():
    reference = [Note(0.0, 0.5, 60, 80), Note(1.0, 1.5, 64, 80), Note(2.0, 2.5, 67, 80)]
    prediction = [Note(0.02, 0.5, 60, 80), Note(1.2, 1.5, 64, 80), Note(2.0, 2.5, 72, 80)]
    matches = match_notes(reference, prediction)
    assert matches["hits"] == [0] and matches["misses"] == [1, 2] and matches["false_alarms"] == [1, 2]


def test_comparison_draws_each_kind_in_its_own_colour(tmp_path):
    reference = [Note(0.0, 2.0, 50, 80), Note(3.0, 5.0, 70, 80)]
    prediction = [Note(0.01, 2.0, 50, 80), Note(6.0, 8.0, 90, 80)]
    picture = image.imread(plot_comparison(reference, prediction, tmp_path / "cmp.png", width=1000, height=500))
    assert picture.shape[:2] == (500, 1000)
    for colour in (HIT, MISS, FALSE_ALARM):
        assert has_colour(picture, colour), colour
    only_hits = image.imread(plot_comparison(reference[:1], prediction[:1], tmp_path / "hits.png"))
    assert has_colour(only_hits, HIT) and not has_colour(only_hits, FALSE_ALARM, tolerance=0.01)
