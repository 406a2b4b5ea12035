#!/usr/bin/env python
"""Train, evaluate and run Sound2Sheet piano transcription.

    python run_transcription.py transcribe examples/example.flac --output-dir outputs
    python run_transcription.py train --manifest_dir DATASET --output_dir runs/my-model [...]   (or: train config.json)
    python run_transcription.py evaluate --model_name_or_path runs/my-model --manifest_dir DATASET --split test

Each subcommand's options: `python run_transcription.py SUBCOMMAND --help`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

REPO_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = REPO_DIR / "models" / "sound2sheet-tiny-random"  # until the trained default model ships
SUBCOMMANDS = ("train", "evaluate", "transcribe")
OUTPUT_FORMATS = ("midi", "json", "musicxml", "pdf", "png", "pianoroll")
FORMAT_SUFFIX = {"midi": ".mid", "json": ".json", "musicxml": ".musicxml", "pdf": ".pdf", "png": ".png", "pianoroll": ".pianoroll.png"}

logger = logging.getLogger("run_transcription")


class UsageError(Exception):
    """A wrong argument: reported as one line, exit code 2."""


# ------------------------------------------------------------------------------------------------------------------
# transcribe
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class TranscribeArguments:
    """Options of `run_transcription.py transcribe AUDIO [AUDIO ...] --output-dir DIR`."""

    output_dir: str = field(metadata={"help": "Folder for the outputs: <audio stem>.mid, .json, ... (created if missing)."})
    model: str = field(
        default=str(DEFAULT_MODEL), metadata={"help": "A Sound2Sheet folder or Hub id (default: the model shipped in models/)."}
    )
    strategy: str = field(default="greedy", metadata={"help": "Decoding strategy: greedy, beam or sample."})
    num_beams: Optional[int] = field(default=None, metadata={"help": "Beams for --strategy beam (default 4)."})
    temperature: Optional[float] = field(default=None, metadata={"help": "Sampling temperature (--strategy sample)."})
    top_k: Optional[int] = field(default=None, metadata={"help": "Top-k sampling (--strategy sample)."})
    top_p: Optional[float] = field(default=None, metadata={"help": "Nucleus sampling mass (--strategy sample)."})
    format: str = field(default="midi,json", metadata={"help": f"Comma-separated outputs among {', '.join(OUTPUT_FORMATS)}."})
    batch_size: int = field(default=8, metadata={"help": "Windows decoded together (memory grows with it)."})
    threads: Optional[int] = field(default=None, metadata={"help": "CPU threads for torch (default: torch's choice)."})
    bf16: bool = field(default=False, metadata={"help": "Run the model under bfloat16 autocast on CPU."})
    tempo: Optional[float] = field(default=None, metadata={"help": "Score tempo in BPM (musicxml/pdf/png; default: estimated)."})
    time_signature: Optional[str] = field(default=None, metadata={"help": "Score time signature, e.g. 3/4 (default: estimated)."})


def build_parser(dataclass_types, prog: str):
    """An HfArgumentParser whose errors become one-line `UsageError`s instead of argparse's usage dump."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass_types, prog=prog)

    def error(message: str):
        raise UsageError(message)

    parser.error = error
    return parser


def parse_into_dataclasses(parser, argv: List[str]):
    """Dataclasses (+ a namespace of extra positional arguments); unknown flags and invalid values are UsageErrors."""
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except (ValueError, TypeError) as err:  # raised by the dataclasses' own validation
        raise UsageError(str(err).strip().splitlines()[0]) from None
    if remaining:
        raise UsageError(f"unrecognized arguments: {' '.join(remaining)}")
    return parsed


def parse_formats(text: str) -> List[str]:
    formats = [item.strip().lower() for item in text.split(",") if item.strip()]
    unknown = [item for item in formats if item not in OUTPUT_FORMATS]
    if unknown or not formats:
        raise UsageError(f"unknown --format {','.join(unknown) or text!r}; choose from {', '.join(OUTPUT_FORMATS)}")
    return list(dict.fromkeys(formats))


def output_stems(audio_paths: List[str]) -> List[str]:
    """A file name stem per input, inside the output folder whatever the input path holds (`../x.wav` -> `x`);
    inputs that share a stem get `-2`, `-3`, ... so no output overwrites another."""
    stems, seen = [], {}
    for path in audio_paths:
        stem = Path(os.path.basename(os.path.normpath(path))).stem or "audio"
        stem = stem.lstrip(".") or "audio"
        count = seen.get(stem, 0) + 1
        seen[stem] = count
        stems.append(stem if count == 1 else f"{stem}-{count}")
    return stems


def load_transcriber(model_path: str):
    """(model, processor) from a Sound2Sheet folder or Hub id, with a clear error when it cannot be loaded."""
    from sound2sheet import Sound2SheetForConditionalGeneration, Sound2SheetProcessor

    if os.path.sep in model_path and not os.path.isdir(model_path):
        raise UsageError(f"--model {model_path}: no such model folder")
    try:
        model = Sound2SheetForConditionalGeneration.from_pretrained(model_path, use_safetensors=True).eval()
        processor = Sound2SheetProcessor.from_pretrained(model_path)
    except (OSError, ValueError) as err:
        raise UsageError(f"--model {model_path}: cannot load a Sound2Sheet model ({str(err).splitlines()[0]})") from None
    return model, processor


def write_outputs(notes, audio_path: str, stem: str, output_dir: Path, formats: List[str], args: TranscribeArguments, model_name: str):
    """Write each requested format for one transcription; returns the written paths."""
    from sound2sheet.notes import pitch_list, write_midi

    written = []
    for fmt in formats:
        path = output_dir / f"{stem}{FORMAT_SUFFIX[fmt]}"
        if fmt == "midi":
            write_midi(notes, path)
        elif fmt == "json":
            payload = {
                "audio": os.path.abspath(audio_path),
                "model": model_name,
                "notes": [note.to_dict() for note in notes],
                "pitches": pitch_list(notes),
            }
            tmp = path.with_name(path.name + ".partial")
            tmp.write_text(json.dumps(payload, indent=1))
            os.replace(tmp, path)
        elif fmt == "musicxml":
            from sound2sheet.sheet import write_musicxml

            write_musicxml(notes, path, tempo=args.tempo, time_signature=args.time_signature)
        elif fmt in ("pdf", "png"):
            from sound2sheet.sheet import render_score

            render_score(notes, path, fmt=fmt, tempo=args.tempo, time_signature=args.time_signature)
        elif fmt == "pianoroll":
            from sound2sheet.pianoroll import plot_pianoroll

            plot_pianoroll(notes, path)
        written.append(path)
    return written


def run_transcribe(argv: List[str]) -> int:
    parser = build_parser(TranscribeArguments, prog="run_transcription.py transcribe")
    parser.add_argument("audio", nargs="+", help="Audio files (WAV, FLAC, OGG; any sample rate and channel count).")
    args, extra = parse_into_dataclasses(parser, argv)
    audio_paths: List[str] = extra.audio
    formats = parse_formats(args.format)
    from sound2sheet.processing_sound2sheet import strategy_generate_kwargs

    try:
        generate_kwargs = strategy_generate_kwargs(args.strategy, args.num_beams, args.temperature, args.top_k, args.top_p)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")

    import torch
    from tqdm.auto import tqdm

    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    model, processor = load_transcriber(args.model)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    failures = 0
    for audio_path, stem in tqdm(list(zip(audio_paths, output_stems(audio_paths))), desc="transcribing", unit="file"):
        try:
            notes = processor.transcribe(
                audio_path, model, batch_size=args.batch_size, bf16=args.bf16, progress=True, **generate_kwargs
            )
            written = write_outputs(notes, audio_path, stem, output_dir, formats, args, args.model)
        except (ValueError, OSError, RuntimeError) as err:
            failures += 1
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if audio_path not in message:
                message = f"{audio_path}: {message}"
            tqdm.write(f"error: {message}", file=sys.stderr)
            continue
        tqdm.write(f"{audio_path}: {len(notes)} notes -> {', '.join(str(p) for p in written)}")
    if failures:
        print(f"error: {failures} of {len(audio_paths)} files failed", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------------------------------
# train / evaluate
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    """Which model to train: a checkpoint to continue from, or a new one of the seed's sizes."""

    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "A Sound2Sheet folder or Hub id to start from (default: a new model)."}
    )
    hidden_size: int = field(default=256, metadata={"help": "New model: decoder width."})
    num_decoder_layers: int = field(default=4, metadata={"help": "New model: decoder layers."})
    num_attention_heads: int = field(default=4, metadata={"help": "New model: decoder attention heads."})
    intermediate_size: int = field(default=1024, metadata={"help": "New model: decoder feed-forward width."})
    dropout: float = field(default=0.1, metadata={"help": "New model: decoder dropout."})
    encoder_hidden_size: int = field(default=256, metadata={"help": "New model: AST encoder width."})
    encoder_layers: int = field(default=4, metadata={"help": "New model: AST encoder layers."})
    encoder_attention_heads: int = field(default=4, metadata={"help": "New model: AST encoder attention heads."})
    encoder_intermediate_size: int = field(default=1024, metadata={"help": "New model: AST encoder feed-forward width."})
    encoder_time_stride: int = field(default=2, metadata={"help": "New model: AST patch stride in time (frames of 10 ms)."})
    encoder_pretrained: Optional[str] = field(
        default=None,
        metadata={"help": "New model: start the encoder from this AST checkpoint (Hub id or folder), e.g. "
                  "MIT/ast-finetuned-audioset-10-10-0.4593; its width/depth replace the encoder_* sizes."},
    )
    freeze_encoder: bool = field(default=False, metadata={"help": "Do not train the AST encoder."})
    max_target_length: int = field(default=1024, metadata={"help": "Longest token sequence per window."})


@dataclass
class DataArguments:
    """Where the training data is and how windows are cut from it."""

    manifest_dir: Optional[str] = field(
        default=None, metadata={"help": "Dataset folder holding train/, val/ (and test/) manifest.json files."}
    )
    train_windows_per_piece: int = field(
        default=4, metadata={"help": "Random training windows drawn from each piece per epoch."}
    )
    max_eval_windows: Optional[int] = field(default=None, metadata={"help": "Cap on validation windows (first N)."})
    augment: bool = field(default=True, metadata={"help": "Gain, noise and reverb augmentation of training windows."})
    skip_check: bool = field(default=False, metadata={"help": "Skip validating the manifests before training."})
    early_stopping_patience: Optional[int] = field(
        default=None, metadata={"help": "Stop after this many evaluations without improvement (seed: patience)."}
    )
    early_stopping_threshold: float = field(
        default=0.0, metadata={"help": "Smallest improvement that counts (seed: min_delta)."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Train into an output folder that holds files other than this run's."}
    )


# The seed trainer's flags, mapped onto the Hugging Face ones (documented in README.md).
SEED_ALIASES = {
    "--batch-size": "--per_device_train_batch_size",
    "--epochs": "--num_train_epochs",
    "--patience": "--early_stopping_patience",
    "--min-delta": "--early_stopping_threshold",
    "--save-every": "--save_steps",
    "--keep-last": "--save_total_limit",
    "--resume-from": "--resume_from_checkpoint",
    "--use-amp": "--bf16",
    "--accumulation-steps": "--gradient_accumulation_steps",
}


def translate_seed_flags(argv: List[str]) -> List[str]:
    """Rewrite the seed's flag names (`--batch-size 8`, `--epochs=3`) into the Hugging Face ones."""
    translated = []
    for item in argv:
        name, sep, value = item.partition("=")
        translated.append(SEED_ALIASES.get(name, name) + (sep + value if sep else "") if name.startswith("--") else item)
    if "--save_steps" in (a.partition("=")[0] for a in translated) and not any(
        a.partition("=")[0] in ("--save_strategy", "--save-strategy") for a in translated
    ):
        translated += ["--save_strategy", "steps"]
    return translated


def parse_training_arguments(argv: List[str], prog: str):
    from transformers import Seq2SeqTrainingArguments

    parser = build_parser((ModelArguments, DataArguments, Seq2SeqTrainingArguments), prog=prog)
    if len(argv) == 1 and argv[0].endswith(".json"):
        if not os.path.isfile(argv[0]):
            raise UsageError(f"{argv[0]}: no such config file")
        try:
            return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
        except (ValueError, TypeError) as err:
            raise UsageError(f"{argv[0]}: {str(err).strip().splitlines()[0]}") from None
    return parse_into_dataclasses(parser, translate_seed_flags(argv))


# ------------------------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    runners = {"transcribe": run_transcribe}
    try:
        if command not in runners:
            raise UsageError(f"unknown subcommand {command!r}; choose one of {', '.join(SUBCOMMANDS)}")
        return runners[command](rest)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
