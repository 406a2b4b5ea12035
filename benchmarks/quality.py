"""Note-level quality of a Sound2Sheet model on a held-out test split, side by side with basic-pitch.

    python benchmarks/quality.py [--model models/sound2sheet-piano-small] [--manifest-dir data/piano-synth]
                                 [--split test] [--max-pieces N] [--threads 2] [--bf16 auto|on|encoder|off]
                                 [--num-beams N] [--window-overlap SECONDS] [--audio FILE ...]

The test split is any manifest dataset (`DATASET/test/manifest.json`); the project's own one is rendered with

    python -m sound2sheet.data.synth --out data/piano-synth --hours 3 --exclude-soundfont TimGM6mb --seed 0 --soundfonts FluidR3_GM,MuseScore_General,TimGM6mb

whose test pieces are unseen pieces played with the held-out soundfont (TimGM6mb), with pedal and tempo variation
(add `--splits test` to render only them).
A model with an offset refiner (`run_transcription.py fit-offsets`) is also scored without it (`refine_offsets=False`).
With `--unrefined`, the model is also scored on its decoder's own note times (`refine_notes=False`). `--audio` scores
the given recordings instead of a split, each against the MIDI file beside it (same name, `.mid`), e.g. the bundled
example: `--audio examples/example_piano.flac --bf16 off [--num-beams 4]`. `--window-overlap` sets how far the model's
windows overlap when its notes are refined (default: the library's, `WINDOW_OVERLAP`; 0 cuts them end to end).
Prints, per system, the mean over pieces (MAESTRO's convention) of onset F1, onset+offset F1 and
onset+offset+velocity F1 (mir_eval, 50 ms onset tolerance), and the CPU seconds each system spent. basic-pitch runs
when it is installed (`pip install --no-deps basic-pitch==0.4.0 librosa resampy scikit-learn onnxruntime`: its
ONNX model needs no TensorFlow), on the same files in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple

import soundfile
import torch

from sound2sheet import Note, Sound2SheetForConditionalGeneration, Sound2SheetProcessor, read_midi
from sound2sheet.data import load_manifest_dataset, notes_of_example
from sound2sheet.metrics import mean_metrics, note_metrics
from sound2sheet.processing_sound2sheet import BF16_ENCODER

REPO = Path(__file__).resolve().parent.parent
SHOWN = ("onset_f1", "onset_offset_f1", "onset_offset_velocity_f1")
BF16_CHOICES = {"auto": None, "on": True, "encoder": BF16_ENCODER, "off": False}


def sound2sheet_systems(model_path: str, batch_size: int, unrefined: bool, window_overlap: float | None = None,
                        **transcribe_kwargs) -> Dict[str, Callable[[str], List[Note]]]:
    """The model as shipped (notes placed on its frame head when it has one, on windows overlapping by
    `window_overlap` seconds: None, the library's default; their offsets moved by its offset refiner when it has one,
    and then also without it), and with `unrefined` also as the decoder alone wrote them (`refine_notes=False`, windows
    end to end); `transcribe_kwargs` (bf16, num_beams) go to every call."""
    if os.path.sep in model_path and not os.path.isdir(model_path):
        raise SystemExit(f"--model {model_path}: no such model folder (train one: see README.md, 'The model')")
    model = Sound2SheetForConditionalGeneration.from_pretrained(model_path).eval()
    processor = Sound2SheetProcessor.from_pretrained(model_path)
    options = dict(batch_size=batch_size or None, **transcribe_kwargs)
    systems = {"sound2sheet": lambda path: processor.transcribe(path, model, window_overlap=window_overlap, **options)}
    if model.has_offset_refiner:
        systems["sound2sheet, no offset refiner"] = lambda path: processor.transcribe(
            path, model, window_overlap=window_overlap, refine_offsets=False, **options)
    if unrefined:
        if not model.has_frame_head:
            raise SystemExit(f"--unrefined: {model_path} has no frame head, so its notes are the decoder's already")
        systems["sound2sheet, decoder times"] = lambda path: processor.transcribe(path, model, refine_notes=False, **options)
    return systems


def basic_pitch_system(threads: int | None = None) -> Callable[[str], List[Note]] | None:
    """basic-pitch 0.4.0 through its ONNX model (onnxruntime on `threads` threads, default: its own choice), or None
    when it is not installed."""
    try:
        import onnxruntime
        from basic_pitch import FilenameSuffix, build_icassp_2022_model_path
        from basic_pitch.inference import Model, predict
    except ImportError:
        return None
    model_path = build_icassp_2022_model_path(FilenameSuffix.onnx)
    model = Model(model_path)
    if threads is not None:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        model.model = onnxruntime.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])

    def transcribe(path: str) -> List[Note]:
        _, _, events = predict(path, model)
        notes = []
        for start, end, pitch, amplitude, _ in events:
            if end > start:
                notes.append(Note(float(start), float(end), int(pitch), max(1, min(127, int(round(amplitude * 127))))))
        return sorted(notes, key=lambda n: (n.onset, n.pitch))

    return transcribe


class Piece(NamedTuple):
    """A recording to score, with its reference notes."""

    id: str
    audio_path: str
    seconds: float
    reference: List[Note]


def pieces_of_split(manifest_dir: str, split: str) -> List[Piece]:
    """The pieces of a manifest dataset's split, with their reference notes."""
    return [Piece(example["id"], example["audio_path"], float(example["duration"]), notes_of_example(example))
            for example in load_manifest_dataset(manifest_dir, split=split)]


def recordings(paths: List[str]) -> List[Piece]:
    """Recordings given by path, each with the reference MIDI file beside it (`x.flac` -> `x.mid`)."""
    pieces = []
    for path in paths:
        midi = Path(path).with_suffix(".mid")
        if not os.path.isfile(path):
            raise SystemExit(f"--audio {path}: no such file")
        if not midi.is_file():
            raise SystemExit(f"--audio {path}: no reference MIDI file {midi} beside it")
        pieces.append(Piece(Path(path).stem, path, soundfile.info(path).duration, read_midi(midi)))
    return pieces


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "sound2sheet-piano-small"))
    parser.add_argument("--manifest-dir", default=str(REPO / "data" / "piano-synth"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-pieces", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=0, help="windows decoded together (0: the library's default)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-basic-pitch", action="store_true", help="skip basic-pitch even when installed")
    parser.add_argument("--unrefined", action="store_true",
                        help="also score the decoder's own note times (refine_notes=False), to see what the frame head adds")
    parser.add_argument("--report", default=None, help="also write per-piece scores to this JSON file")
    parser.add_argument("--bf16", choices=list(BF16_CHOICES), default="auto",
                        help="bfloat16 autocast for Sound2Sheet (auto: the encoder where the CPU computes it natively)")
    parser.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (1: greedy)")
    parser.add_argument("--window-overlap", type=float, default=None,
                        help="seconds by which the windows overlap when the notes are refined (default: the library's)")
    parser.add_argument("--audio", nargs="+", default=None,
                        help="score these recordings instead of a split, each against the MIDI file beside it (.mid)")
    args = parser.parse_args()
    if args.num_beams < 1:
        parser.error(f"--num-beams must be at least 1, got {args.num_beams}")
    torch.set_num_threads(args.threads)

    pieces = recordings(args.audio) if args.audio else pieces_of_split(args.manifest_dir, args.split)
    pieces = pieces[: args.max_pieces]
    beams = {"num_beams": args.num_beams} if args.num_beams > 1 else {}  # greedy: the library's default search
    systems: Dict[str, Callable[[str], List[Note]]] = sound2sheet_systems(
        args.model, args.batch_size, args.unrefined, args.window_overlap, bf16=BF16_CHOICES[args.bf16], **beams)
    other = None if args.no_basic_pitch else basic_pitch_system(threads=args.threads)
    if other is not None:
        systems["basic-pitch 0.4.0"] = other
    else:
        print("basic-pitch is not installed (or --no-basic-pitch): only Sound2Sheet is measured")
    seconds = sum(piece.seconds for piece in pieces)
    source = "the given recordings" if args.audio else f"{args.manifest_dir} ({args.split})"
    print(f"{len(pieces)} pieces, {seconds / 60:.1f} min of audio from {source}; model {args.model}, bf16 {args.bf16}, "
          f"{args.num_beams} beam(s), window overlap {'default' if args.window_overlap is None else args.window_overlap}")

    scores = {name: [] for name in systems}
    cpu = {name: 0.0 for name in systems}
    for piece in pieces:
        for name, transcribe in systems.items():
            start = time.process_time()
            prediction = transcribe(piece.audio_path)
            cpu[name] += time.process_time() - start
            scores[name].append({"id": piece.id, **note_metrics(piece.reference, prediction)})
    print(f"{'system':<32}" + "".join(f"{name:>26}" for name in SHOWN) + f"{'CPU s / audio s':>18}")
    summary = {}
    for name in systems:
        mean = mean_metrics([{k: v for k, v in piece.items() if k != "id"} for piece in scores[name]])
        summary[name] = {**{k: mean[k] for k in SHOWN}, "cpu_seconds_per_audio_second": cpu[name] / seconds}
        print(f"{name:<32}" + "".join(f"{mean[k]:>26.3f}" for k in SHOWN) + f"{cpu[name] / seconds:>18.3f}")
    if args.report:
        Path(args.report).write_text(json.dumps({"summary": summary, "per_piece": scores}, indent=1))


if __name__ == "__main__":
    main()
