"""Where long notes end: note F1 with and without holding them down to a lower threshold, side by side.

    python benchmarks/note_endings.py [--model models/sound2sheet-piano-small] [--manifest-dir data/piano-synth]
                                      [--split test] [--held-thresholds 0.4,0.3,0.2] [--held-after 1.0,1.25]
                                      [--bf16 auto|on|encoder|off] [--threads 2]

A note that has sounded for `HELD_AFTER` seconds sounds on while the frame head's sounding probability of its pitch
stays at `HELD_THRESHOLD` or more, instead of `SUSTAIN_THRESHOLD` (`end_notes_on_sustain`). Each piece of the split is
decoded once as `processor.transcribe` decodes it (`processor.decode_notes`: greedy, the windows overlapping, the
frame head's probabilities kept) and its decoded notes are placed on the frame head once per setting, so the settings
are compared on the same windows. The first row is the library without held notes (a held threshold equal to the
sounding threshold); each other row is a held threshold and a time held. Prints the mean over pieces (as `quality.py`)
of onset F1, onset+offset F1 and onset+offset+velocity F1, and each row's onset+offset F1 minus the first row's.
The notes are scored as placed, before a model's offset refiner would move them (`quality.py` scores both).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # quality.py, beside this script
from quality import BF16_CHOICES, pieces_of_split  # noqa: E402

from sound2sheet import Note, Sound2SheetForConditionalGeneration, Sound2SheetProcessor  # noqa: E402
from sound2sheet.metrics import mean_metrics, note_metrics  # noqa: E402
from sound2sheet.processing_sound2sheet import HELD_AFTER, HELD_THRESHOLD, SUSTAIN_THRESHOLD, clip_notes  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHOWN = ("onset_f1", "onset_offset_f1", "onset_offset_velocity_f1")


def floats(text: str) -> List[float]:
    return [float(item) for item in text.split(",") if item.strip()]


def notes_per_setting(
    processor: Sound2SheetProcessor, model, audio_path: str, settings: Sequence[Tuple[float, float]], bf16=None
) -> Dict[Tuple[float, float], List[Note]]:
    """The notes of one recording for each (held threshold, seconds held) setting, as `processor.transcribe` places
    them before any offset refiner moves them (`refine_offsets=False`), the recording decoded once
    (`processor.decode_notes`)."""
    notes, evidence = processor.decode_notes(audio_path, model, bf16=bf16, refine_notes=True)
    duration = processor.duration(audio_path)
    return {
        (held_threshold, held_after): clip_notes(
            evidence.place(notes, held_threshold=held_threshold, held_after=held_after), duration
        )
        for held_threshold, held_after in settings
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "sound2sheet-piano-small"))
    parser.add_argument("--manifest-dir", default=str(REPO / "data" / "piano-synth"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--held-thresholds", type=floats, default=[HELD_THRESHOLD],
                        help="comma-separated sounding probabilities that hold a long note (default: the library's)")
    parser.add_argument("--held-after", type=floats, default=[HELD_AFTER],
                        help="comma-separated seconds after which a note is held (default: the library's)")
    parser.add_argument("--bf16", choices=list(BF16_CHOICES), default="auto")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if any(threshold > SUSTAIN_THRESHOLD for threshold in args.held_thresholds):
        parser.error(f"--held-thresholds must be at most the sounding threshold, {SUSTAIN_THRESHOLD}: {args.held_thresholds}")
    torch.set_num_threads(args.threads)
    model = Sound2SheetForConditionalGeneration.from_pretrained(args.model).eval()
    if not model.has_frame_head:
        raise SystemExit(f"--model {args.model} has no frame head: its notes end where the decoder ends them")
    processor = Sound2SheetProcessor.from_pretrained(args.model)
    settings = [(SUSTAIN_THRESHOLD, 0.0)]  # a held threshold equal to the sounding one holds nothing
    settings += [(threshold, after) for threshold, after in itertools.product(args.held_thresholds, args.held_after)
                 if threshold < SUSTAIN_THRESHOLD]
    pieces = pieces_of_split(args.manifest_dir, args.split)
    print(f"{len(pieces)} pieces from {args.manifest_dir} ({args.split}); model {args.model}, bf16 {args.bf16}; "
          f"a pitch sounds from {SUSTAIN_THRESHOLD}")
    scores = {setting: [] for setting in settings}
    for piece in pieces:
        placed = notes_per_setting(processor, model, piece.audio_path, settings, BF16_CHOICES[args.bf16])
        for setting, notes in placed.items():
            scores[setting].append(note_metrics(piece.reference, notes))
    print(f"{'held':<30}" + "".join(f"{name:>26}" for name in SHOWN) + f"{'onset+offset change':>22}")
    baseline = None
    for held_threshold, held_after in settings:
        mean = mean_metrics(scores[(held_threshold, held_after)])
        baseline = mean["onset_offset_f1"] if baseline is None else baseline
        name = "no" if held_threshold == SUSTAIN_THRESHOLD else f"from {held_threshold} after {held_after} s"
        print(f"{name:<30}" + "".join(f"{mean[key]:>26.3f}" for key in SHOWN)
              + f"{mean['onset_offset_f1'] - baseline:>+22.3f}")


if __name__ == "__main__":
    main()
