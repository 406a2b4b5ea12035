#!/usr/bin/env python
"""Train, evaluate and run Sound2Sheet piano transcription.

    python run_transcription.py transcribe examples/example.flac --output-dir outputs
    python run_transcription.py train --manifest_dir DATASET --output_dir runs/my-model [...]   (or: train config.json)
    python run_transcription.py evaluate --model_name_or_path runs/my-model --manifest_dir DATASET --split test
    python run_transcription.py average --checkpoints runs/my-model/checkpoint-{2000,2500} --output_dir runs/my-model-average
    python run_transcription.py fit-offsets --model_name_or_path runs/my-model --manifest_dir DATASET --output_dir runs/my-model-offsets

Each subcommand's options: `python run_transcription.py SUBCOMMAND --help`.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

REPO_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = REPO_DIR / "models" / "sound2sheet-piano-small"
SUBCOMMANDS = ("train", "evaluate", "transcribe", "average", "fit-offsets")
OUTPUT_FORMATS = ("midi", "json", "musicxml", "pdf", "png", "pianoroll")
FORMAT_SUFFIX = {"midi": ".mid", "json": ".json", "musicxml": ".musicxml", "pdf": ".pdf", "png": ".png", "pianoroll": ".pianoroll.png"}

logger = logging.getLogger("run_transcription")


class UsageError(Exception):
    """A wrong argument: reported as one line, exit code 2."""


# ------------------------------------------------------------------------------------------------------------------
# transcribe
# ------------------------------------------------------------------------------------------------------------------


# Options that `transcribe` and `evaluate` share.
REFINE_NOTES_HELP = ("Place the decoded notes' onsets and offsets on the model's frame head, adding the onsets it is sure of or "
                     "hears starting that the decoder missed: true/false (default: when it has one).")
WINDOW_OVERLAP_HELP = ("Seconds by which consecutive windows overlap, each trusted with the stretch it lies furthest inside; over 0 "
                       "only with refined notes (default: 0.32 with refined notes, else 0).")

REFINE_OFFSETS_HELP = ("Move the placed notes' offsets with the model's offset refiner (fitted by fit-offsets): true/false "
                       "(default: when it has one and the notes are refined).")


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
    batch_size: Optional[int] = field(
        default=None,
        metadata={"help": "Windows decoded together; memory grows with it (default: 48 for greedy/sample, 32 for beam)."},
    )
    threads: Optional[int] = field(default=None, metadata={"help": "CPU threads for torch (default: torch's choice)."})
    allow_pickle: bool = field(default=False, metadata={"help": "Accept a model with pickled weights (.bin), loaded with weights_only=True."})
    bf16: Optional[bool] = field(
        default=None,
        metadata={"help": "bfloat16 autocast on CPU for the whole model: true/false (default: for the encoder only, exactly when "
                          "the CPU has AMX or AVX512-BF16; the decoder's small steps are faster in float32)."},
    )
    refine_notes: Optional[bool] = field(
        default=None,
        metadata={"help": REFINE_NOTES_HELP},
    )
    window_overlap: Optional[float] = field(
        default=None,
        metadata={"help": WINDOW_OVERLAP_HELP},
    )
    refine_offsets: Optional[bool] = field(
        default=None,
        metadata={"help": REFINE_OFFSETS_HELP},
    )
    encode_ahead: Optional[bool] = field(
        default=None,
        metadata={"help": "Encode the next batch of windows in a background thread while one decodes, the threads shared "
                          "out between them: true/false (default: on a CPU with 2 or more threads)."},
    )
    tempo: Optional[float] = field(default=None, metadata={"help": "Score tempo in BPM (musicxml/pdf/png; default: estimated)."})
    time_signature: Optional[str] = field(default=None, metadata={"help": "Score time signature, 3/4 or 4/4 (default: estimated)."})


def build_parser(dataclass_types, prog: str):
    """An HfArgumentParser whose errors become one-line `UsageError`s instead of argparse's usage dump.

    Optional booleans that default to None ("decide automatically") also take the flag alone as true, as plain
    booleans do: `--bf16` is `--bf16 true`, `--bf16 false` turns it off, no flag leaves the choice to the program.
    """
    from transformers import HfArgumentParser
    from transformers.hf_argparser import string_to_bool

    parser = HfArgumentParser(dataclass_types, prog=prog)
    for action in parser._actions:
        if action.type is string_to_bool and action.default is None and action.nargs is None:
            action.nargs, action.const = "?", True

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


def load_transcriber(model_path: str, allow_pickle: bool = False, **config_overrides):
    """(model, processor) from a Sound2Sheet folder or Hub id, with a clear error when it cannot be loaded.
    Weights are read from safetensors; pickled weights only with `allow_pickle` (then with weights_only=True).
    `config_overrides` (e.g. `frame_loss_weight=1.0`) change the loaded configuration; weights it adds are new."""
    from sound2sheet import Sound2SheetForConditionalGeneration, Sound2SheetProcessor

    if os.path.sep in model_path and not os.path.isdir(model_path):
        raise UsageError(f"--model {model_path}: no such model folder")
    try:
        model = Sound2SheetForConditionalGeneration.from_pretrained(model_path, allow_pickle=allow_pickle, **config_overrides).eval()
        processor = Sound2SheetProcessor.from_pretrained(model_path)
    except (OSError, ValueError) as err:
        raise UsageError(f"--model {model_path}: cannot load a Sound2Sheet model ({str(err).splitlines()[0]})") from None
    return model, processor


def check_refine_offsets(refine_offsets: Optional[bool], refine_notes: Optional[bool], model, model_path: str):
    """One-line `UsageError`s for `--refine_offsets true` with a model that has no offset refiner or without refined
    notes."""
    if refine_offsets and not model.has_offset_refiner:
        raise UsageError(f"--refine_offsets: model {model_path} has no offset refiner (run_transcription.py fit-offsets fits one)")
    if refine_offsets and refine_notes is False:
        raise UsageError("--refine_offsets true needs refined notes: the refiner moves notes placed on the frame head")


def check_refine_notes(refine_notes: Optional[bool], window_overlap: Optional[float], model, processor, model_path: str):
    """One-line `UsageError`s for `--refine_notes true` with a model that has no frame head, and for a
    `--window_overlap` that the model's window or the refinement setting rules out."""
    from sound2sheet.processing_sound2sheet import resolve_refine_notes, resolve_window_overlap

    try:
        refine = resolve_refine_notes(refine_notes, model)
    except ValueError as err:
        raise UsageError(f"--refine_notes: model {model_path}: {err}") from None
    try:
        resolve_window_overlap(window_overlap, refine, processor.window_seconds)
    except ValueError as err:
        raise UsageError(f"--window_overlap: model {model_path}: {err}") from None


def write_outputs(notes, audio_path: str, stem: str, output_dir: Path, formats: List[str], model_name: str, score_options: dict):
    """Write each requested format for one transcription; returns the written paths."""
    from sound2sheet.notes import pitch_list, write_midi
    from sound2sheet.training import write_json_atomically

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
            write_json_atomically(payload, path)
        elif fmt == "musicxml":
            from sound2sheet.sheet import write_musicxml

            write_musicxml(notes, path, title=stem, **score_options)
        elif fmt == "pianoroll":
            from sound2sheet.pianoroll import plot_pianoroll

            plot_pianoroll(notes, path, title=stem)
        else:
            from sound2sheet.sheet import render_score

            render_score(notes, path, fmt=fmt, title=stem, **score_options)
        written.append(path)
    return written


def run_transcribe(argv: List[str]) -> int:
    parser = build_parser(TranscribeArguments, prog="run_transcription.py transcribe")
    parser.add_argument("audio", nargs="+", help="Audio files (WAV, FLAC, OGG; any sample rate and channel count).")
    args, extra = parse_into_dataclasses(parser, argv)
    audio_paths: List[str] = extra.audio
    formats = parse_formats(args.format)
    if args.time_signature not in (None, "3/4", "4/4"):
        raise UsageError(f"--time-signature must be 3/4 or 4/4, got {args.time_signature}")
    if args.tempo is not None and not 20 <= args.tempo <= 400:
        raise UsageError(f"--tempo must be a number of BPM between 20 and 400, got {args.tempo}")
    if {"pdf", "png"} & set(formats):
        from sound2sheet.sheet import ScoreError, lilypond_tools

        try:
            lilypond_tools()
        except ScoreError as err:
            raise UsageError(str(err)) from None
    score_options = {"tempo": args.tempo, "time_signature": args.time_signature}
    from sound2sheet.processing_sound2sheet import strategy_generate_kwargs

    try:
        generate_kwargs = strategy_generate_kwargs(args.strategy, args.num_beams, args.temperature, args.top_k, args.top_p)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")

    import torch
    from tqdm.auto import tqdm

    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    model, processor = load_transcriber(args.model, args.allow_pickle)
    check_refine_notes(args.refine_notes, args.window_overlap, model, processor, args.model)
    check_refine_offsets(args.refine_offsets, args.refine_notes, model, args.model)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    failures = 0
    for audio_path, stem in tqdm(list(zip(audio_paths, output_stems(audio_paths))), desc="transcribing", unit="file"):
        try:
            notes = processor.transcribe(
                audio_path, model, batch_size=args.batch_size, bf16=args.bf16, progress=True,
                refine_notes=args.refine_notes, encode_ahead=args.encode_ahead, window_overlap=args.window_overlap,
                refine_offsets=args.refine_offsets, **generate_kwargs
            )
            written = write_outputs(notes, audio_path, stem, output_dir, formats, args.model, score_options)
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
    allow_pickle: bool = field(default=False, metadata={"help": "Accept a starting model with pickled weights (.bin), loaded with weights_only=True."})
    max_target_length: int = field(default=1024, metadata={"help": "Longest token sequence per window."})
    encoder_memory: Optional[str] = field(
        default=None,
        metadata={"help": "What the decoder attends to: 'patches' (every AST token) or 'columns' (one token per time "
                  "column); default: the checkpoint's, or 'patches'. Changing a checkpoint's gives it a new projection.",
                  "choices": ["patches", "columns"]},
    )
    cross_attention_time_bias: Optional[bool] = field(
        default=None,
        metadata={"help": "Column memory only: bias cross-attention by each column's distance from the current time "
                  "(default: the checkpoint's, or off); switching it on starts the biases at zero."},
    )
    frame_loss_weight: Optional[float] = field(
        default=None,
        metadata={"help": "Weight of the auxiliary onset/frame loss on the encoder (0: none; default: the checkpoint's, or 0)."},
    )
    frame_offsets: Optional[bool] = field(
        default=None,
        metadata={"help": "The frame head also predicts offsets (needs a frame loss weight > 0; default: the checkpoint's, "
                  "or off); switching it on for a checkpoint keeps its onset and sounding outputs and adds new ones."},
    )


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


def check_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuse to train into a folder holding files that are not a Sound2Sheet run's, unless overwriting is asked for."""
    from sound2sheet.training import CHECKPOINT_PREFIX, HISTORY_FILENAME

    path = Path(output_dir)
    if not path.exists() or overwrite:
        return
    if not path.is_dir():
        raise UsageError(f"--output_dir {output_dir}: exists and is not a folder")
    ours = {HISTORY_FILENAME, "runs", "README.md", "config.json", "generation_config.json", "model.safetensors",
            "processor_config.json", "tokenizer_config.json", "preprocessor_config.json", "all_results.json",
            "train_results.json", "eval_results.json", "trainer_state.json", "training_args.bin"}
    foreign = sorted(p.name for p in path.iterdir() if p.name not in ours and not p.name.startswith(CHECKPOINT_PREFIX))
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise UsageError(
            f"--output_dir {output_dir}: holds files that are not from a Sound2Sheet run ({shown}); "
            "choose another folder or pass --overwrite_output_dir"
        )


def build_model_and_processor(model_args: ModelArguments):
    """(model, processor): from a checkpoint, or new with the seed's sizes (encoder optionally pretrained)."""
    from sound2sheet import (
        Sound2SheetConfig,
        Sound2SheetFeatureExtractor,
        Sound2SheetForConditionalGeneration,
        Sound2SheetProcessor,
        Sound2SheetTokenizer,
    )

    if model_args.model_name_or_path:
        overrides = {} if model_args.frame_loss_weight is None else {"frame_loss_weight": model_args.frame_loss_weight}
        if model_args.encoder_memory is not None:
            # A new memory layout changes the projection's (and frame head's) shape: those start anew, the rest is kept.
            overrides.update(encoder_memory=model_args.encoder_memory, ignore_mismatched_sizes=True)
        if model_args.cross_attention_time_bias is not None:
            overrides["cross_attention_time_bias"] = model_args.cross_attention_time_bias
        if model_args.frame_loss_weight == 0:
            overrides["frame_offsets"] = False  # no frame head, so no offset outputs
        model, processor = load_transcriber(model_args.model_name_or_path, model_args.allow_pickle, **overrides)
        set_frame_offsets(model, model_args.frame_offsets)
        if model_args.freeze_encoder:
            model.freeze_encoder()
        return model.train(), processor
    processor = Sound2SheetProcessor(Sound2SheetFeatureExtractor(), Sound2SheetTokenizer())
    extractor = processor.feature_extractor
    if model_args.frame_offsets and not model_args.frame_loss_weight:
        raise UsageError("--frame_offsets: offsets are outputs of the frame head; add one with --frame_loss_weight > 0")
    config = Sound2SheetConfig(
        vocab_size=len(processor.tokenizer),
        hidden_size=model_args.hidden_size,
        num_decoder_layers=model_args.num_decoder_layers,
        num_attention_heads=model_args.num_attention_heads,
        intermediate_size=model_args.intermediate_size,
        dropout=model_args.dropout,
        max_target_positions=model_args.max_target_length,
        freeze_encoder=model_args.freeze_encoder,
        frame_loss_weight=model_args.frame_loss_weight or 0.0,
        frame_offsets=bool(model_args.frame_offsets),
        encoder_memory=model_args.encoder_memory or "patches",
        cross_attention_time_bias=bool(model_args.cross_attention_time_bias),
        encoder_config={
            "hidden_size": model_args.encoder_hidden_size,
            "num_hidden_layers": model_args.encoder_layers,
            "num_attention_heads": model_args.encoder_attention_heads,
            "intermediate_size": model_args.encoder_intermediate_size,
            "time_stride": model_args.encoder_time_stride,
            "max_length": extractor.max_frames,
            "num_mel_bins": extractor.feature_size,
        },
    )
    if model_args.encoder_pretrained:
        try:
            model = Sound2SheetForConditionalGeneration.from_encoder_pretrained(config, model_args.encoder_pretrained)
        except (OSError, ValueError) as err:
            raise UsageError(str(err).splitlines()[0]) from None
    else:
        model = Sound2SheetForConditionalGeneration(config)
    return model, processor


def set_frame_offsets(model, frame_offsets: Optional[bool]) -> None:
    """Give a loaded model's frame head offset outputs (`add_frame_offsets`) when `frame_offsets` is True; None keeps
    the checkpoint's. One-line `UsageError`s for a model without a frame head, and for taking offsets away."""
    if frame_offsets:
        try:
            model.add_frame_offsets()
        except ValueError as err:
            raise UsageError(f"--frame_offsets: {err}") from None
    elif frame_offsets is False and model.config.frame_offsets:
        raise UsageError("--frame_offsets false: the checkpoint's frame head predicts offsets; they cannot be taken away")


def tensorboard_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def load_split_pieces(manifest_dir: str, split: str, cache_dir: Optional[str] = None):
    """(audio path, duration, notes) of every piece of a split, through the datasets builder."""
    from sound2sheet.data import ManifestError, load_manifest_dataset, pieces_from_dataset

    try:
        return pieces_from_dataset(load_manifest_dataset(manifest_dir, split=split, cache_dir=cache_dir))
    except ManifestError as err:
        raise UsageError(str(err)) from None


def decode_to_max_length(model) -> None:
    """Make the model's generation config decode up to `max_length` (the model's target positions), as the
    trainer's evaluations need: Seq2SeqTrainer fills unset generation options with transformers' defaults
    (max_length=20) in the model's own generation config, and beside a `max_new_tokens` that would warn."""
    model.generation_config.max_new_tokens = None
    model.generation_config.max_length = model.config.max_target_positions


def run_train(argv: List[str]) -> int:
    import torch
    import transformers
    from transformers import EarlyStoppingCallback, set_seed

    from sound2sheet.data import Augmentation, Sound2SheetDataCollator, WindowDataset, check_dataset
    from sound2sheet.training import (
        DatasetEpochCallback,
        NonFiniteLossError,
        Sound2SheetTrainer,
        TrainingHistoryCallback,
        build_compute_metrics,
        last_complete_checkpoint,
        write_model_card,
    )

    # 1. arguments
    model_args, data_args, training_args = parse_training_arguments(argv, "run_transcription.py train")
    if not data_args.manifest_dir:
        raise UsageError("--manifest_dir is required (a dataset folder with train/ and val/ manifests)")
    if not os.path.isdir(data_args.manifest_dir):
        raise UsageError(f"--manifest_dir {data_args.manifest_dir}: no such dataset folder")
    if training_args.resume_from_checkpoint and not os.path.isdir(training_args.resume_from_checkpoint):
        raise UsageError(f"--resume_from_checkpoint {training_args.resume_from_checkpoint}: no such checkpoint folder")

    # 2. logging: progress and metrics from the main process, warnings from all
    level = logging.INFO if training_args.should_log else logging.WARNING
    logger.setLevel(level)
    transformers.utils.logging.set_verbosity(logging.WARNING)

    # 3. the output folder: refuse foreign files, resume from the last complete checkpoint
    check_output_dir(training_args.output_dir, data_args.overwrite_output_dir)
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is None and not data_args.overwrite_output_dir:
        checkpoint = last_complete_checkpoint(training_args.output_dir)
        if checkpoint:
            logger.warning("Resuming from %s (pass --overwrite_output_dir to start over).", checkpoint)

    # 4. seed
    set_seed(training_args.seed)

    # 5. data: check everything before any training starts
    if not data_args.skip_check:
        problems = check_dataset(data_args.manifest_dir)
        if problems:
            for problem in problems:
                print(f"error: {problem}", file=sys.stderr)
            raise UsageError(f"{len(problems)} problem(s) in {data_args.manifest_dir} (see above); fix them or pass --skip_check")

    # 6. model and processor
    model, processor = build_model_and_processor(model_args)
    feature_extractor, tokenizer = processor.feature_extractor, processor.tokenizer
    if len(tokenizer) != model.config.vocab_size:
        raise UsageError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model.config.vocab_size}")
    decode_to_max_length(model)  # during training; the user-facing default is restored before saving

    # 7. windows
    with training_args.main_process_first(desc="reading manifests"):
        train_pieces = load_split_pieces(data_args.manifest_dir, "train")
        val_pieces = load_split_pieces(data_args.manifest_dir, "validation")
    max_target = model.config.max_target_positions
    train_dataset = WindowDataset(
        train_pieces, feature_extractor, tokenizer, train=True, windows_per_piece=data_args.train_windows_per_piece,
        seed=training_args.seed, augment=Augmentation() if data_args.augment else None, max_target_length=max_target,
        frame_grid=model.config.frame_grid if model.config.frame_loss_weight > 0 else None,
        frame_offsets=model.config.frame_offsets,
    )
    eval_dataset = WindowDataset(val_pieces, feature_extractor, tokenizer, train=False, max_target_length=max_target,
                                 max_windows=data_args.max_eval_windows)

    # 8. the trainer
    training_args.predict_with_generate = True  # note-level validation metrics need generated tokens
    training_args.remove_unused_columns = False
    if training_args.metric_for_best_model is None:
        training_args.metric_for_best_model = "onset_f1"
        training_args.greater_is_better = True
    if not torch.cuda.is_available():
        training_args.dataloader_pin_memory = False  # pinning needs an accelerator; on CPU it only warns
    if not any(arg.partition("=")[0] in ("--report_to", "--report-to") for arg in argv) and tensorboard_installed():
        training_args.report_to = ["tensorboard"]  # log to TensorBoard when it is installed, unless told otherwise
    callbacks: List = [TrainingHistoryCallback(), DatasetEpochCallback(train_dataset)]
    if data_args.early_stopping_patience is not None:
        if not training_args.load_best_model_at_end:
            raise UsageError("--early_stopping_patience needs --load_best_model_at_end (with matching eval/save strategies)")
        callbacks.append(EarlyStoppingCallback(data_args.early_stopping_patience, data_args.early_stopping_threshold))
    trainer = Sound2SheetTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=Sound2SheetDataCollator(),
        processing_class=processor,
        compute_metrics=build_compute_metrics(tokenizer, model.config.decoder_start_token_id),
        callbacks=callbacks,
    )

    # 9. train, save
    try:
        result = trainer.train(resume_from_checkpoint=checkpoint)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    model.generation_config.max_length = None
    model.generation_config.max_new_tokens = model.config.max_target_positions - 1
    trainer.save_model()
    metrics = dict(result.metrics, train_windows=len(train_dataset))
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    # 10. evaluate, decoding up to max_length again (beside the saved max_new_tokens, Seq2SeqTrainer would fill in
    # max_length=20 and transformers would warn that both are set)
    decode_to_max_length(model)
    eval_metrics = trainer.evaluate(metric_key_prefix="eval") if len(eval_dataset) else {}
    if eval_metrics:
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)

    # 11. model card
    if trainer.is_world_process_zero():
        write_model_card(
            training_args.output_dir,
            model_name=Path(training_args.output_dir).name,
            results={key[len("eval_"):]: value for key, value in eval_metrics.items()},
            parameters=model.count_parameters()["total"],
            recipe="`python run_transcription.py train " + " ".join(argv) + "`",
            dataset_name=str(data_args.manifest_dir),
            extra_sections="Metrics above are per validation window (2.56 s); `run_transcription.py evaluate` scores whole pieces.",
        )
    return 0


@dataclass
class EvaluateArguments:
    """Options of `run_transcription.py evaluate`: score a model on whole pieces of a manifest split."""

    manifest_dir: str = field(metadata={"help": "Dataset folder with {train,val,test}/manifest.json."})
    model_name_or_path: str = field(default=str(DEFAULT_MODEL), metadata={"help": "Sound2Sheet folder or Hub id."})
    split: str = field(default="test", metadata={"help": "train, val/validation or test."})
    output_dir: Optional[str] = field(default=None, metadata={"help": "Write eval_<split>.json (and plots) here."})
    strategy: str = field(default="greedy", metadata={"help": "greedy, beam or sample."})
    num_beams: Optional[int] = field(default=None, metadata={"help": "Beams for --strategy beam."})
    temperature: Optional[float] = field(default=None, metadata={"help": "Sampling temperature."})
    top_k: Optional[int] = field(default=None, metadata={"help": "Top-k sampling."})
    top_p: Optional[float] = field(default=None, metadata={"help": "Nucleus sampling mass."})
    batch_size: Optional[int] = field(
        default=None, metadata={"help": "Windows decoded together (default: 48 for greedy/sample, 32 for beam; 8 for token accuracy)."}
    )
    bf16: Optional[bool] = field(
        default=None,
        metadata={"help": "bfloat16 autocast on CPU for the whole model: true/false (default: for the encoder only, exactly when "
                          "the CPU has AMX or AVX512-BF16)."},
    )
    refine_notes: Optional[bool] = field(
        default=None,
        metadata={"help": REFINE_NOTES_HELP},
    )
    window_overlap: Optional[float] = field(
        default=None,
        metadata={"help": WINDOW_OVERLAP_HELP},
    )
    refine_offsets: Optional[bool] = field(
        default=None,
        metadata={"help": REFINE_OFFSETS_HELP},
    )
    threads: Optional[int] = field(default=None, metadata={"help": "CPU threads for torch."})
    max_pieces: Optional[int] = field(default=None, metadata={"help": "Only the first N pieces."})
    allow_pickle: bool = field(default=False, metadata={"help": "Accept a model with pickled weights (.bin), loaded with weights_only=True."})
    token_accuracy: bool = field(default=True, metadata={"help": "Also compute teacher-forced loss and token accuracy."})
    plots: bool = field(default=False, metadata={"help": "Write a prediction-over-reference piano roll PNG per piece."})


def teacher_forced_scores(model, dataset, batch_size: int) -> dict:
    """Mean loss and token accuracy of `model` on the windows of `dataset` (labels shifted inside the model)."""
    import torch

    from sound2sheet.data import Sound2SheetDataCollator

    collate = Sound2SheetDataCollator()
    losses, correct, total = [], 0, 0
    with torch.inference_mode():
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            output = model(input_values=batch["input_values"], labels=batch["labels"])
            mask = batch["labels"] != -100
            losses.append(float(output.loss) * int(mask.sum()))
            correct += int((output.logits.argmax(-1) == batch["labels"])[mask].sum())
            total += int(mask.sum())
    return {"loss": sum(losses) / max(total, 1), "token_accuracy": correct / max(total, 1)}


def run_evaluate(argv: List[str]) -> int:
    import torch
    from tqdm.auto import tqdm

    from sound2sheet.data import ManifestError, WindowDataset, load_manifest_dataset, notes_of_example
    from sound2sheet.metrics import mean_metrics, note_metrics
    from sound2sheet.processing_sound2sheet import strategy_generate_kwargs

    args = parse_into_dataclasses(build_parser(EvaluateArguments, prog="run_transcription.py evaluate"), argv)[0]
    if not os.path.isdir(args.manifest_dir):
        raise UsageError(f"--manifest_dir {args.manifest_dir}: no such dataset folder")
    try:
        generate_kwargs = strategy_generate_kwargs(args.strategy, args.num_beams, args.temperature, args.top_k, args.top_p)
        dataset = load_manifest_dataset(args.manifest_dir, split=args.split)
    except (ValueError, ManifestError) as err:
        raise UsageError(str(err)) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load_transcriber(args.model_name_or_path, args.allow_pickle)
    check_refine_notes(args.refine_notes, args.window_overlap, model, processor, args.model_name_or_path)
    check_refine_offsets(args.refine_offsets, args.refine_notes, model, args.model_name_or_path)
    examples = list(dataset)[: args.max_pieces] if args.max_pieces else list(dataset)
    output_dir = Path(args.output_dir) if args.output_dir else None
    if args.plots and not output_dir:
        raise UsageError("--plots needs --output_dir")
    if output_dir:
        output_dir.mkdir(parents=True, exist_ok=True)
    per_piece = []
    for example in tqdm(examples, desc=f"evaluating {args.split}", unit="piece"):
        reference = notes_of_example(example)
        prediction = processor.transcribe(example["audio_path"], model, batch_size=args.batch_size, bf16=args.bf16,
                                          refine_notes=args.refine_notes, window_overlap=args.window_overlap,
                                          refine_offsets=args.refine_offsets,
                                          **generate_kwargs)
        scores = note_metrics(reference, prediction)
        per_piece.append({"id": example["id"], "audio_path": example["audio_path"], "reference_notes": len(reference),
                          "predicted_notes": len(prediction), **scores})
        if output_dir and args.plots:
            from sound2sheet.pianoroll import plot_comparison

            plot_comparison(reference, prediction, output_dir / f"{output_stems([example['id']])[0]}.comparison.png",
                            title=f"{example['id']}: onset F1 {scores['onset_f1']:.3f}")
    report = {"model": args.model_name_or_path, "manifest_dir": os.path.abspath(args.manifest_dir), "split": args.split,
              "pieces": len(per_piece), "decoding": generate_kwargs,
              "metrics": mean_metrics([{k: p[k] for k in p if k not in ("id", "audio_path", "reference_notes", "predicted_notes")} for p in per_piece])}
    if args.token_accuracy:
        windows = WindowDataset([(e["audio_path"], float(e["duration"]), notes_of_example(e)) for e in examples],
                                processor.feature_extractor, processor.tokenizer, train=False,
                                max_target_length=model.config.max_target_positions)
        report.update(teacher_forced_scores(model, windows, args.batch_size or 8))
    report["per_piece"] = per_piece
    for name in ("onset_f1", "onset_offset_f1", "onset_offset_velocity_f1"):
        print(f"{args.split} {name}: {report['metrics'][name]:.4f}")
    if "token_accuracy" in report:
        print(f"{args.split} token_accuracy: {report['token_accuracy']:.4f}  loss: {report['loss']:.4f}")
    if output_dir:
        from sound2sheet.training import write_json_atomically

        write_json_atomically(report, output_dir / f"eval_{args.split}.json")
        print(f"report: {output_dir / f'eval_{args.split}.json'}")
    return 0


# ------------------------------------------------------------------------------------------------------------------
# average
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class AverageArguments:
    """Options of `run_transcription.py average --checkpoints A B [...] --output_dir DIR`: one model whose weights are
    the mean of the checkpoints' (`sound2sheet.training.average_checkpoints`)."""

    checkpoints: List[str] = field(
        metadata={"help": "Two or more checkpoint (or model) folders of one configuration, e.g. a run's last checkpoints."}
    )
    output_dir: str = field(metadata={"help": "Folder for the averaged model (with the first checkpoint's processor files)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace --output_dir if it already holds files."})


def run_average(argv: List[str]) -> int:
    from sound2sheet.training import average_checkpoints

    args = parse_into_dataclasses(build_parser(AverageArguments, prog="run_transcription.py average"), argv)[0]
    try:
        output_dir = average_checkpoints(args.checkpoints, args.output_dir, overwrite=args.overwrite_output_dir)
    except FileExistsError:
        raise UsageError(f"--output_dir {args.output_dir}: already holds files; choose another folder or pass "
                         "--overwrite_output_dir") from None
    except (OSError, ValueError) as err:
        raise UsageError(str(err)) from None
    print(f"averaged {len(args.checkpoints)} checkpoints into {output_dir}")
    return 0


# ------------------------------------------------------------------------------------------------------------------
# fit-offsets
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class FitOffsetsArguments:
    """Options of `run_transcription.py fit-offsets --model_name_or_path MODEL --manifest_dir DATASET --output_dir DIR`:
    the model with an offset refiner fitted on a split's notes (`sound2sheet.offset_refiner.fit_offset_refiner`)."""

    manifest_dir: str = field(metadata={"help": "Dataset folder with <split>/manifest.json (audio and MIDI of the pieces)."})
    output_dir: str = field(metadata={"help": "Folder for the model with its fitted refiner (and the processor files)."})
    model_name_or_path: str = field(default=str(DEFAULT_MODEL), metadata={"help": "Sound2Sheet folder or Hub id (with a frame head)."})
    split: str = field(default="train", metadata={"help": "The split to fit on: train, val/validation or test."})
    eval_manifest_dir: Optional[str] = field(
        default=None, metadata={"help": "Also score --eval_split of this dataset without and with the refiner (default: none)."}
    )
    eval_split: str = field(default="validation", metadata={"help": "The split of --eval_manifest_dir to score."})
    hidden_size: int = field(default=128, metadata={"help": "Width of the refiner's two hidden layers."})
    steps: int = field(default=4000, metadata={"help": "Optimizer steps (batches of 1024 notes)."})
    seed: int = field(default=0, metadata={"help": "Seed of the refiner's initial weights and batches."})
    max_pieces: Optional[int] = field(default=None, metadata={"help": "Only the first N pieces of --split."})
    bf16: Optional[bool] = field(default=None, metadata={"help": "bfloat16 autocast on CPU for the whole model while decoding (default: "
                                                                  "for the encoder only, exactly when the CPU has AMX or AVX512-BF16)."})
    threads: Optional[int] = field(default=None, metadata={"help": "CPU threads for torch."})
    allow_pickle: bool = field(default=False, metadata={"help": "Accept a model with pickled weights (.bin), loaded with weights_only=True."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace --output_dir if it already holds files."})


def run_fit_offsets(argv: List[str]) -> int:
    import json

    import torch

    from sound2sheet.data import ManifestError, load_manifest_dataset
    from sound2sheet.offset_refiner import fit_offset_refiner, score_offset_refiner
    from sound2sheet.training import save_model_atomically

    args = parse_into_dataclasses(build_parser(FitOffsetsArguments, prog="run_transcription.py fit-offsets"), argv)[0]
    output_dir = Path(args.output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not args.overwrite_output_dir:
        raise UsageError(f"--output_dir {output_dir}: already holds files; choose another folder or pass --overwrite_output_dir")
    if args.hidden_size < 1 or args.steps < 1:
        raise UsageError(f"--hidden_size and --steps must be positive, got {args.hidden_size} and {args.steps}")
    datasets = {}
    for flag, folder, split in (("--manifest_dir", args.manifest_dir, args.split),
                                ("--eval_manifest_dir", args.eval_manifest_dir, args.eval_split)):
        if folder is None:
            continue
        if not os.path.isdir(folder):
            raise UsageError(f"{flag} {folder}: no such dataset folder")
        try:
            datasets[flag] = list(load_manifest_dataset(folder, split=split))
        except (ValueError, ManifestError) as err:
            raise UsageError(str(err)) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load_transcriber(args.model_name_or_path, args.allow_pickle)
    if not model.has_frame_head:
        raise UsageError(f"--model_name_or_path {args.model_name_or_path}: the model has no frame head, whose notes the refiner moves")
    examples = datasets["--manifest_dir"]
    examples = examples[: args.max_pieces] if args.max_pieces else examples
    try:
        summary = fit_offset_refiner(model, processor, examples, hidden_size=args.hidden_size, steps=args.steps,
                                     seed=args.seed, progress=True, bf16=args.bf16)
    except ValueError as err:
        raise UsageError(f"--manifest_dir {args.manifest_dir}: {err}") from None
    print(f"fitted on {summary['pieces']} pieces, {summary['matched_notes']} of {summary['notes']} notes matched by onset; "
          f"loss {summary['losses'][0]:.4f} -> {summary['losses'][-1]:.4f}")
    if "--eval_manifest_dir" in datasets:
        scores = score_offset_refiner(model, processor, datasets["--eval_manifest_dir"], progress=True, bf16=args.bf16)
        summary["eval"] = {"manifest_dir": os.path.abspath(args.eval_manifest_dir), "split": args.eval_split, **scores}
        for name in ("onset_f1", "onset_offset_f1", "onset_offset_velocity_f1"):
            print(f"{args.eval_split} {name}: {scores['without'][name]:.4f} without the refiner, {scores['with'][name]:.4f} with it")
    summary["fitted_on"] = {"manifest_dir": os.path.abspath(args.manifest_dir), "split": args.split}
    save_model_atomically(model, processor, output_dir,
                          extra_files={"offset_refiner.json": json.dumps(summary, indent=1) + "\n"})
    print(f"model with its offset refiner: {output_dir}")
    return 0


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
    runners = {"transcribe": run_transcribe, "train": run_train, "evaluate": run_evaluate, "average": run_average,
               "fit-offsets": run_fit_offsets}
    try:
        if command not in runners:
            raise UsageError(f"unknown subcommand {command!r}; choose one of {', '.join(SUBCOMMANDS)}")
        return runners[command](rest)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
