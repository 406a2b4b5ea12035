"""Note-level transcription metrics (mir_eval) as a local `evaluate` module.

    import evaluate
    metric = evaluate.load("path/to/sound2sheet/metrics/note_metrics.py")   # works offline
    metric.compute(predictions=[piece_rows, ...], references=[piece_rows, ...])

Each piece is a list of notes given as rows `[onset_seconds, offset_seconds, midi_pitch, velocity]`. For every piece,
mir_eval scores precision, recall and F1 with the standard tolerances (onset 50 ms; offset 20 % of the note's length
or 50 ms, whichever is longer; velocity 0.1 after mir_eval's rescaling), for onset only, onset+offset and
onset+offset+velocity, plus the mean overlap ratio of onset matches; the result is the mean over pieces (the MAESTRO
convention). A piece with no reference and no predicted notes scores 1; one with either side empty scores 0.

This file is loaded by `evaluate` on its own: it imports nothing from the sound2sheet package.
"""

import datasets
import evaluate
import mir_eval
import numpy as np

ONSET_TOLERANCE = 0.05  # seconds (mir_eval's default, the field's standard)
OFFSET_RATIO = 0.2  # of the reference note's duration
OFFSET_MIN_TOLERANCE = 0.05  # seconds
VELOCITY_TOLERANCE = 0.1  # mir_eval.transcription_velocity's default
METRIC_NAMES = (
    "onset_precision", "onset_recall", "onset_f1",
    "onset_offset_precision", "onset_offset_recall", "onset_offset_f1",
    "onset_offset_velocity_precision", "onset_offset_velocity_recall", "onset_offset_velocity_f1",
    "onset_overlap",
)

_DESCRIPTION = "Note-level precision, recall and F1 of piano transcriptions (onset, onset+offset, onset+offset+velocity), via mir_eval."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of pieces, each a list of [onset, offset, pitch, velocity] rows (seconds, MIDI pitch, MIDI velocity).
    references: list of pieces in the same form.
    return_per_piece: also return the per-piece scores under "per_piece".
Returns:
    dict with the mean over pieces of each of """ + ", ".join(METRIC_NAMES) + """.
"""


def _arrays(rows):
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, 4)
    rows = rows[rows[:, 1] > rows[:, 0]]
    intervals = rows[:, :2]
    pitches_hz = 440.0 * 2.0 ** ((rows[:, 2] - 69.0) / 12.0)
    return intervals, pitches_hz, rows[:, 3]


def score_piece(reference_rows, predicted_rows) -> dict:
    """The metrics of one piece (see the module docstring), from [onset, offset, pitch, velocity] rows."""
    ref_intervals, ref_pitches, ref_velocities = _arrays(reference_rows)
    est_intervals, est_pitches, est_velocities = _arrays(predicted_rows)
    if len(ref_intervals) == 0 or len(est_intervals) == 0:
        value = 1.0 if len(ref_intervals) == len(est_intervals) else 0.0
        return {name: value for name in METRIC_NAMES}
    scores = {}
    p, r, f, overlap = mir_eval.transcription.precision_recall_f1_overlap(
        ref_intervals, ref_pitches, est_intervals, est_pitches, onset_tolerance=ONSET_TOLERANCE, offset_ratio=None
    )
    scores.update(onset_precision=p, onset_recall=r, onset_f1=f, onset_overlap=overlap)
    p, r, f, _ = mir_eval.transcription.precision_recall_f1_overlap(
        ref_intervals, ref_pitches, est_intervals, est_pitches, onset_tolerance=ONSET_TOLERANCE,
        offset_ratio=OFFSET_RATIO, offset_min_tolerance=OFFSET_MIN_TOLERANCE,
    )
    scores.update(onset_offset_precision=p, onset_offset_recall=r, onset_offset_f1=f)
    p, r, f, _ = mir_eval.transcription_velocity.precision_recall_f1_overlap(
        ref_intervals, ref_pitches, ref_velocities, est_intervals, est_pitches, est_velocities,
        onset_tolerance=ONSET_TOLERANCE, offset_ratio=OFFSET_RATIO, offset_min_tolerance=OFFSET_MIN_TOLERANCE,
        velocity_tolerance=VELOCITY_TOLERANCE,
    )
    scores.update(onset_offset_velocity_precision=p, onset_offset_velocity_recall=r, onset_offset_velocity_f1=f)
    return {name: float(scores[name]) for name in METRIC_NAMES}


def mean_scores(per_piece) -> dict:
    return {name: float(np.mean([piece[name] for piece in per_piece])) if per_piece else 0.0 for name in METRIC_NAMES}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class NoteMetrics(evaluate.Metric):
    """mir_eval note metrics for piano transcription, averaged over pieces."""

    def _info(self):
        rows = datasets.List(datasets.List(datasets.Value("float64")))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Raffel et al., mir_eval: A Transparent Implementation of Common MIR Metrics, ISMIR 2014.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": rows, "references": rows}),
        )

    def _compute(self, predictions, references, return_per_piece=False):
        per_piece = [score_piece(reference, prediction) for prediction, reference in zip(predictions, references)]
        result = mean_scores(per_piece)
        if return_per_piece:
            result["per_piece"] = per_piece
        return result
