"""Note-level metrics of transcriptions (mir_eval), for `Note` lists and as a local `evaluate` module."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Dict, List, Sequence

from ..notes import Note

NOTE_METRICS_PATH = str(Path(__file__).with_name("note_metrics.py"))
_spec = importlib.util.spec_from_file_location("sound2sheet_note_metrics", NOTE_METRICS_PATH)
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
METRIC_NAMES = _module.METRIC_NAMES


def note_rows(notes: Sequence[Note]) -> List[List[float]]:
    """[onset, offset, pitch, velocity] rows: the form the `evaluate` module takes."""
    return [[n.onset, n.offset, float(n.pitch), float(n.velocity)] for n in notes]


def note_metrics(reference: Sequence[Note], prediction: Sequence[Note]) -> Dict[str, float]:
    """Precision/recall/F1 (onset; onset+offset; onset+offset+velocity) and onset overlap of one piece."""
    return _module.score_piece(note_rows(reference), note_rows(prediction))


def mean_metrics(per_piece: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """The mean over pieces of each metric (MAESTRO's convention)."""
    return _module.mean_scores(list(per_piece))


def load_note_metric():
    """The metrics as an `evaluate` module loaded from this package's file (no Hub access needed)."""
    import evaluate

    return evaluate.load(NOTE_METRICS_PATH)


__all__ = ["note_metrics", "mean_metrics", "note_rows", "load_note_metric", "METRIC_NAMES", "NOTE_METRICS_PATH"]
