"""Note offsets moved by a small learned network (`Sound2SheetOffsetRefiner`), and how to fit it.

Transcription ends each note where the frame head stops hearing its pitch (`end_notes_on_sustain`). Where the key
was released is not heard directly: a release rings on for a while, a held note dies away, and under the sustain pedal
a note sounds until the pedal lifts whether or not it can still be heard. The refiner reads, for each placed note, the
sounding probabilities of its pitch (and of its octaves) around that end, how sure the head was of the note, how long
it lasted, and what the other notes do there (how many end at the same moment, as they do when the pedal lifts; how
many sound on; when the next notes start), and predicts the log of the ratio between the note's true length and its
placed length. The note's offset moves by that ratio, never past the next onset of its pitch.

`note_offset_features` computes those features, `offset_targets` the ratios for the notes that match a reference
note by onset (as mir_eval matches them), and `fit_offset_refiner` trains the network on a manifest split decoded by
the model (`run_transcription.py fit-offsets`).
"""

from __future__ import annotations

import bisect
import math
from typing import Callable, Iterable, List, Sequence

import numpy as np

from .notes import Note

# Columns (40 ms apart with the shipped model) around the one at or after a note's placed end, at which the features
# read its pitch's sounding probability and those of the pitches an octave above and below; and, every second column
# from 4 before to 8 after, the sum of all pitches' probabilities.
PITCH_CONTEXT = tuple(range(-8, 13))
SUM_CONTEXT = tuple(range(-4, 9, 2))
SCALAR_FEATURES = (
    "length",  # seconds from onset to placed offset
    "log_length",  # its log (at least 10 ms)
    "pitch",
    "velocity",
    "peak",  # the highest sounding probability of the pitch from the onset to the end column
    "mean",  # and its mean there
    "to_restart",  # seconds from the placed offset to the pitch's next onset (at most 10)
    "ending_together",  # other notes ending within 0.06 s of the offset
    "ending_near",  # and within 0.15 s
    "to_next_onset",  # seconds from the offset to the next onset of any pitch (at most 10)
    "sounding_on",  # notes that sound across the offset
    "column_sum",  # the sum of all pitches' sounding probabilities in the end column
    "to_column",  # seconds from the end column's centre to the offset
    "onsets_near",  # onsets within 0.1 s of the offset
)
NUM_OFFSET_FEATURES = len(SCALAR_FEATURES) + 3 * len(PITCH_CONTEXT) + len(SUM_CONTEXT)
CAPPED_SECONDS = 10.0
TOGETHER_SECONDS = (0.06, 0.15)
ONSETS_NEAR_SECONDS = 0.1
MIN_LENGTH = 0.01  # seconds: the shortest length whose log the features and targets take
MAX_LOG_RATIO = 10.0  # a predicted log ratio is clipped to this either way before it is exponentiated


def next_onsets(notes: Sequence[Note]) -> List[float]:
    """For each note, the next onset of its pitch after its own (infinity for the last)."""
    by_pitch: dict = {}
    for note in notes:
        by_pitch.setdefault(note.pitch, []).append(note.onset)
    for onsets in by_pitch.values():
        onsets.sort()
    found = []
    for note in notes:
        onsets = by_pitch[note.pitch]
        later = bisect.bisect_right(onsets, note.onset)
        found.append(onsets[later] if later < len(onsets) else math.inf)
    return found


def note_offset_features(notes: Sequence[Note], times: np.ndarray, sounding: np.ndarray) -> np.ndarray:
    """(notes, `NUM_OFFSET_FEATURES`) float32 features of placed notes for the offset refiner.

    Args:
        notes: the notes as placed on the frame head (`FrameEvidence.place`), cut at the audio's end.
        times: the centres, in seconds and increasing, of the frame head's columns over the whole piece
            (`FrameEvidence.sounding_table`).
        sounding: (columns, 128) sounding probabilities at those columns.

    Raises:
        ValueError: `times` and `sounding` do not have one row per column of 128 pitches.
    """
    times = np.asarray(times, dtype=np.float64)
    sounding = np.asarray(sounding, dtype=np.float32)
    if sounding.ndim != 2 or sounding.shape[1] != 128 or len(times) != len(sounding):
        raise ValueError(f"sounding must be (columns, 128) with one time per column, got {sounding.shape} for {len(times)} times.")
    notes = list(notes)
    if not notes or not len(times):
        return np.zeros((len(notes), NUM_OFFSET_FEATURES), dtype=np.float32)
    onsets = np.array([note.onset for note in notes])
    offsets = np.array([note.offset for note in notes])
    ends_sorted, onsets_sorted = np.sort(offsets), np.sort(onsets)
    restarts = next_onsets(notes)
    column_sums = sounding.sum(axis=1)
    last = len(times) - 1
    pitch_context, sum_context = np.array(PITCH_CONTEXT), np.array(SUM_CONTEXT)
    rows = np.zeros((len(notes), NUM_OFFSET_FEATURES), dtype=np.float32)
    for row, (note, restart) in enumerate(zip(notes, restarts)):
        onset, offset, pitch = note.onset, note.offset, note.pitch
        column = min(int(np.searchsorted(times, offset)), last)
        begin = int(np.searchsorted(times, onset))
        inside = sounding[begin : max(column, begin + 1), pitch]
        around = np.clip(column + pitch_context, 0, last)
        ending = [
            np.searchsorted(ends_sorted, offset + reach) - np.searchsorted(ends_sorted, offset - reach) - 1
            for reach in TOGETHER_SECONDS
        ]
        following = int(np.searchsorted(onsets_sorted, offset, side="right"))
        to_next = onsets_sorted[following] - offset if following < len(onsets_sorted) else CAPPED_SECONDS
        onsets_near = np.searchsorted(onsets_sorted, offset + ONSETS_NEAR_SECONDS) - np.searchsorted(
            onsets_sorted, offset - ONSETS_NEAR_SECONDS
        )
        scalars = [
            offset - onset,
            math.log(max(offset - onset, MIN_LENGTH)),
            pitch,
            note.velocity,
            inside.max() if len(inside) else 0.0,
            inside.mean() if len(inside) else 0.0,
            min(restart - offset, CAPPED_SECONDS),
            ending[0],
            ending[1],
            min(to_next, CAPPED_SECONDS),
            int(((onsets < offset) & (offsets > offset)).sum()),
            column_sums[column],
            offset - times[column],
            onsets_near,
        ]
        rows[row] = np.concatenate(
            [
                scalars,
                sounding[around, pitch],
                column_sums[np.clip(column + sum_context, 0, last)],
                sounding[around, min(pitch + 12, 127)],
                sounding[around, max(pitch - 12, 0)],
            ]
        )
    return rows


def offset_targets(notes: Sequence[Note], reference: Sequence[Note]) -> np.ndarray:
    """For each of `notes`, log(reference length / placed length) where it matches a reference note by onset and
    pitch (mir_eval's matching, offsets ignored; lengths from the placed onset, at least `MIN_LENGTH`), NaN where it
    matches none: the value the refiner learns to predict."""
    import mir_eval

    targets = np.full(len(notes), np.nan)
    if not len(notes) or not len(reference):
        return targets

    def intervals_and_hz(items):
        intervals = np.array([[note.onset, note.offset] for note in items], dtype=np.float64)
        return intervals, mir_eval.util.midi_to_hz(np.array([note.pitch for note in items], dtype=np.float64))

    ref_intervals, ref_hz = intervals_and_hz(reference)
    est_intervals, est_hz = intervals_and_hz(notes)
    for ref, est in mir_eval.transcription.match_notes(ref_intervals, ref_hz, est_intervals, est_hz, offset_ratio=None):
        onset = est_intervals[est, 0]
        true_length = max(ref_intervals[ref, 1] - onset, MIN_LENGTH)
        placed_length = max(est_intervals[est, 1] - onset, MIN_LENGTH)
        targets[est] = math.log(true_length / placed_length)
    return targets


def apply_offset_ratios(notes: Sequence[Note], log_ratios: Sequence[float], decimals: int = 3) -> List[Note]:
    """`notes` with each length multiplied by exp(its log ratio, within +-`MAX_LOG_RATIO`): the offset rounded to
    `decimals`, never past the next onset of the note's pitch and at least 10 ms after its onset.

    Raises:
        ValueError: a ratio is not finite (the message names the note).
    """
    restarts = next_onsets(notes)
    moved = []
    for note, ratio, restart in zip(notes, log_ratios, restarts):
        if not math.isfinite(float(ratio)):
            raise ValueError(f"The offset refiner predicted a non-finite length ratio ({ratio}) for {note}.")
        ratio = min(max(float(ratio), -MAX_LOG_RATIO), MAX_LOG_RATIO)
        offset = note.onset + (note.offset - note.onset) * math.exp(ratio)
        offset = max(round(min(offset, restart), decimals), note.onset + MIN_LENGTH)
        moved.append(Note(note.onset, round(offset, 6), note.pitch, note.velocity))
    return moved


def refine_offsets(
    notes: Sequence[Note], times: np.ndarray, sounding: np.ndarray, predict: Callable[[np.ndarray], np.ndarray]
) -> List[Note]:
    """`notes` with offsets moved by the log length ratios that `predict` (e.g. a model's `predict_offset_ratios`)
    gives for their `note_offset_features`."""
    notes = list(notes)
    if not notes:
        return []
    return apply_offset_ratios(notes, predict(note_offset_features(notes, times, sounding)))


def fit_refiner_weights(
    refiner,
    features: np.ndarray,
    targets: np.ndarray,
    steps: int = 4000,
    batch_size: int = 1024,
    learning_rate: float = 3e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    progress: bool = False,
) -> List[float]:
    """Train a `Sound2SheetOffsetRefiner` in place on (features, targets) rows (NaN targets are skipped): its feature
    mean and spread are set from `features`, then `steps` AdamW steps on random batches minimise the mean absolute
    error of the log ratio (the median: a note's offset counts when it lies within a fifth of its length, a ratio),
    with a one-cycle learning-rate schedule, on one CPU thread (torch's count is restored after). Returns the loss of
    every 100th step and of the last.

    Raises:
        ValueError: no row has a target, or the features do not have the refiner's width.
    """
    import torch

    features = np.asarray(features, dtype=np.float32)
    targets = np.asarray(targets, dtype=np.float32)
    kept = ~np.isnan(targets)
    if not kept.any():
        raise ValueError("No note matched a reference note by onset: nothing to fit the offset refiner on.")
    if features.ndim != 2 or features.shape[1] != refiner.num_features:
        raise ValueError(f"Expected features of width {refiner.num_features}, got shape {features.shape}.")
    generator = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(features[kept])
    y = torch.from_numpy(targets[kept])
    refiner.set_feature_statistics(x.mean(0), x.std(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a network this small trains fastest on one thread (more only wait for each other)
    try:
        losses = _train(refiner, x, y, steps, batch_size, learning_rate, weight_decay, generator, progress)
    finally:
        torch.set_num_threads(threads)
    return losses


def _train(refiner, x, y, steps, batch_size, learning_rate, weight_decay, generator, progress) -> List[float]:
    import torch

    refiner.train()
    optimizer = torch.optim.AdamW(refiner.parameters(), lr=learning_rate, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps)
    losses = []
    iterator: Iterable[int] = range(steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="fitting offset refiner", unit="step")
    for step in iterator:
        batch = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=generator)
        loss = (refiner(x[batch]) - y[batch]).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            losses.append(float(loss.detach()))
    refiner.eval()
    return losses


def decoded_pieces(processor, model, examples: Sequence[dict], progress: bool = False, desc: str = "decoding", **transcribe_kwargs):
    """For each manifest example (`load_manifest_dataset`), decode it as `processor.transcribe` does; yields (example,
    its reference notes, the decoded notes, their `FrameEvidence`, the audio's duration in seconds). The evidence's
    `placed(notes, duration[, predict])` gives the notes that transcription returns without (with) the refiner.

    Raises:
        ValueError: the model has no frame head to place the notes on.
    """
    from .data import notes_of_example

    iterator = examples
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(examples, desc=desc, unit="piece")
    for example in iterator:
        notes, evidence = processor.decode_notes(example["audio_path"], model, **transcribe_kwargs)
        if evidence is None:
            raise ValueError("The offset refiner works on notes placed on a frame head; this model has none.")
        yield example, notes_of_example(example), notes, evidence, processor.duration(example["audio_path"])


def fit_offset_refiner(
    model,
    processor,
    examples: Sequence[dict],
    hidden_size: int = 128,
    steps: int = 4000,
    seed: int = 0,
    progress: bool = False,
    **transcribe_kwargs,
) -> dict:
    """Give `model` an offset refiner (`add_offset_refiner(hidden_size)`) fitted on `examples` (manifest examples,
    e.g. a training split that the model was not selected on): each piece is decoded and its notes placed as
    `processor.transcribe` places them (`transcribe_kwargs` as for it), and the refiner learns, for the notes that
    match a reference note by onset, the log ratio of the reference's length to the placed one
    (`fit_refiner_weights`). Returns a summary: pieces, notes, notes matched, and the training loss along the way.

    Raises:
        ValueError: no example, a model without a frame head, or no placed note matching a reference note.
    """
    import torch

    if not len(examples):
        raise ValueError("No pieces to fit the offset refiner on.")
    if not getattr(model, "has_frame_head", False):
        raise ValueError("The offset refiner moves notes placed on the frame head; this model has none.")
    transcribe_kwargs = {**transcribe_kwargs, "refine_notes": True}
    features, targets, notes_total = [], [], 0
    with torch.inference_mode():
        for _, reference, decoded, evidence, duration in decoded_pieces(
            processor, model, examples, progress=progress, desc="decoding pieces", **transcribe_kwargs
        ):
            notes = evidence.placed(decoded, duration)
            features.append(note_offset_features(notes, *evidence.sounding_table()))
            targets.append(offset_targets(notes, reference))
            notes_total += len(notes)
    features, targets = np.concatenate(features), np.concatenate(targets)
    torch.manual_seed(seed)
    refiner = model.add_offset_refiner(hidden_size)
    losses = fit_refiner_weights(refiner, features, targets, steps=steps, seed=seed, progress=progress)
    return {"pieces": len(examples), "notes": notes_total, "matched_notes": int((~np.isnan(targets)).sum()),
            "hidden_size": hidden_size, "steps": steps, "seed": seed, "losses": losses}


def score_offset_refiner(model, processor, examples: Sequence[dict], progress: bool = False, **transcribe_kwargs) -> dict:
    """Mean note metrics of `examples` transcribed as `processor.transcribe` does, without and with the model's
    offset refiner, each piece decoded once: {"without": metrics, "with": metrics}.

    Raises:
        ValueError: the model has no offset refiner.
    """
    import torch

    from .metrics import mean_metrics, note_metrics

    if not getattr(model, "has_offset_refiner", False):
        raise ValueError("This model has no offset refiner to score.")
    transcribe_kwargs = {**transcribe_kwargs, "refine_notes": True}
    without, with_refiner = [], []
    with torch.inference_mode():
        for _, reference, decoded, evidence, duration in decoded_pieces(
            processor, model, examples, progress=progress, desc="scoring pieces", **transcribe_kwargs
        ):
            without.append(note_metrics(reference, evidence.placed(decoded, duration)))
            with_refiner.append(note_metrics(reference, evidence.placed(decoded, duration, model.predict_offset_ratios)))
    return {"without": mean_metrics(without), "with": mean_metrics(with_refiner)}
