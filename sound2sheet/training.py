"""Pieces of the training loop that the Hugging Face `Trainer` does not have: the seed's training history file,
note-level validation metrics for `compute_metrics`, the model card written at the end of training, and the
averaging of a run's last checkpoints into one model."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
from transformers import Seq2SeqTrainer, TrainerCallback

HISTORY_FILENAME = "training_history.json"
MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "model_cards" / "TEMPLATE.md"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_json_atomically(payload, path: str | os.PathLike):
    """Write JSON to `path` whole or not at all (a crash mid-write leaves the previous file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


class TrainingHistoryCallback(TrainerCallback):
    """Keeps `training_history.json` in the output folder, in the seed trainer's format.

    The file holds `start_time`, `end_time`, `total_epochs`, `best_epoch`, `best_val_loss`, `best_metric` (the value of
    `metric_for_best_model` at the best evaluation) and `epochs`: one entry per evaluation with `epoch`, `step`,
    `train_loss` (mean of the training losses logged since the previous entry), `val_loss`, `val_token_accuracy`,
    `note_f1` (onset F1), `learning_rate` and `timestamp`. A resumed run appends to the file it finds.
    """

    def __init__(self, filename: str = HISTORY_FILENAME):
        self.filename = filename
        self.history: dict = {}
        self._train_losses: list = []
        self._learning_rate: Optional[float] = None

    def _path(self, args) -> Path:
        return Path(args.output_dir) / self.filename

    def on_train_begin(self, args, state, control, **kwargs):
        path = self._path(args)
        if state.global_step > 0 and path.exists():  # resuming: keep what the earlier run recorded
            self.history = json.loads(path.read_text())
            self.history["epochs"] = [e for e in self.history.get("epochs", []) if e["step"] <= state.global_step]
            self.history["end_time"] = None
        else:
            self.history = {"start_time": _now(), "end_time": None, "total_epochs": 0, "best_epoch": None,
                            "best_val_loss": None, "best_metric": None, "epochs": []}
        self._train_losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self._train_losses.append(float(logs["loss"]))
        if "learning_rate" in logs:
            self._learning_rate = float(logs["learning_rate"])

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not self.history or self.history.get("end_time"):  # an evaluate() outside train(), e.g. the final one
            return
        metrics = metrics or {}
        entry = {
            "epoch": round(float(state.epoch or 0.0), 4),
            "step": int(state.global_step),
            "train_loss": float(np.mean(self._train_losses)) if self._train_losses else None,
            "val_loss": metrics.get("eval_loss"),
            "val_token_accuracy": metrics.get("eval_token_accuracy"),
            "note_f1": metrics.get("eval_onset_f1"),
            "learning_rate": self._learning_rate,
            "timestamp": _now(),
        }
        self._train_losses = []
        self.history["epochs"].append(entry)
        self._update_best(args, metrics, entry)
        if state.is_world_process_zero:
            write_json_atomically(self.history, self._path(args))

    def _update_best(self, args, metrics: dict, entry: dict):
        name = args.metric_for_best_model or "loss"
        key = name if name.startswith("eval_") else f"eval_{name}"
        value = metrics.get(key)
        if value is None:
            return
        best = self.history.get("best_metric")
        greater = args.greater_is_better if args.greater_is_better is not None else not name.endswith("loss")
        if best is None or (value > best if greater else value < best):
            self.history.update(best_metric=value, best_epoch=entry["epoch"], best_val_loss=entry["val_loss"])

    def on_train_end(self, args, state, control, **kwargs):
        if not self.history:
            return
        self.history["end_time"] = _now()
        self.history["total_epochs"] = round(float(state.epoch or 0.0), 4)
        if state.is_world_process_zero:
            write_json_atomically(self.history, self._path(args))


CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_REQUIRED_FILES = ("trainer_state.json", "model.safetensors")


def is_complete_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether a `checkpoint-N` folder was written to the end.

    The Trainer writes `trainer_state.json` after the weights, optimizer, scheduler and RNG states, so a folder whose
    state file is missing or does not parse (a process killed mid-write) is incomplete.
    """
    folder = Path(folder)
    if not all((folder / name).is_file() for name in CHECKPOINT_REQUIRED_FILES):
        return False
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(output_dir: str | os.PathLike) -> Optional[str]:
    """The highest-step `checkpoint-N` folder in `output_dir` that was written completely, or None."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    steps = []
    for child in output_dir.iterdir():
        suffix = child.name[len(CHECKPOINT_PREFIX):]
        if child.is_dir() and child.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit():
            steps.append((int(suffix), child))
    for _, folder in sorted(steps, reverse=True):
        if is_complete_checkpoint(folder):
            return str(folder)
    return None


def average_checkpoints(
    checkpoints: Sequence[str | os.PathLike], output_dir: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write to `output_dir` the model whose every weight is the mean of that weight in `checkpoints`, with the first
    checkpoint's configuration, generation config, tokenizer and feature extractor; returns `output_dir`.

    Averaging the last few checkpoints of one run (a few hundred steps apart, late on its learning-rate schedule) is a
    cheap ensemble that often scores a little better than any one of them. The mean is summed in float32 in the order
    given, then stored in each weight's own dtype. The folder is written whole or not at all.

    Args:
        checkpoints: two or more folders that `Sound2SheetForConditionalGeneration.from_pretrained` loads (a run's
            `checkpoint-N` folders, or its final model), all of one configuration.
        output_dir: the folder to write; it must not be one of `checkpoints`.
        overwrite: replace `output_dir` if it already holds files.

    Raises:
        ValueError: fewer than two checkpoints, one named twice, `output_dir` among them, or checkpoints whose
            configuration, weights or processor differ from the first one's (the message names the checkpoint).
        OSError: a checkpoint cannot be loaded (named), or `output_dir` holds files and `overwrite` is False.
    """
    from sound2sheet import Sound2SheetForConditionalGeneration, Sound2SheetProcessor

    folders = [Path(checkpoint) for checkpoint in checkpoints]
    output_dir = Path(output_dir)
    if len(folders) < 2:
        raise ValueError(f"Averaging needs at least two checkpoints, got {len(folders)}.")
    resolved = [folder.resolve() for folder in folders]
    if len(set(resolved)) < len(resolved):
        raise ValueError(f"A checkpoint is named twice: {', '.join(map(str, folders))}.")
    if output_dir.resolve() in resolved:
        raise ValueError(f"output_dir {output_dir} is one of the checkpoints being averaged; choose another folder.")
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"output_dir {output_dir} already holds files; choose another folder or overwrite it.")

    def load(folder: Path):
        if not folder.is_dir():
            raise FileNotFoundError(f"Checkpoint {folder}: no such folder.")
        try:
            return Sound2SheetForConditionalGeneration.from_pretrained(folder), Sound2SheetProcessor.from_pretrained(folder)
        except (OSError, ValueError) as err:
            raise OSError(f"Checkpoint {folder}: cannot load a Sound2Sheet model ({str(err).splitlines()[0]})") from err

    def settings(model, processor) -> dict:
        config = {key: value for key, value in model.config.to_dict().items() if key not in ("_name_or_path", "transformers_version")}
        return {"configuration": config, "feature extractor": processor.feature_extractor.to_dict(),
                "tokenizer vocabulary": processor.tokenizer.get_vocab()}

    model, processor = load(folders[0])
    expected = settings(model, processor)
    state = model.state_dict()
    sums = {name: tensor.float().clone() for name, tensor in state.items() if tensor.is_floating_point()}
    for folder in folders[1:]:
        other_model, other_processor = load(folder)
        found = settings(other_model, other_processor)
        differing = [part for part, value in found.items() if value != expected[part]]
        if differing:
            keys = [key for key in expected["configuration"] if found["configuration"].get(key) != expected["configuration"][key]]
            raise ValueError(
                f"Checkpoint {folder}: differs from {folders[0]} in its {' and '.join(differing)}"
                + (f" ({', '.join(keys)})" if keys else "") + "; only checkpoints of one model can be averaged."
            )
        for name, tensor in other_model.state_dict().items():
            if name in sums:
                sums[name] += tensor.float()
            elif not torch.equal(tensor, state[name]):
                raise ValueError(f"Checkpoint {folder}: its {name} (not floating point, so not averaged) differs from {folders[0]}'s.")
    model.load_state_dict({name: (sums[name] / len(folders)).to(tensor.dtype) if name in sums else tensor
                           for name, tensor in state.items()})
    return save_model_atomically(model, processor, output_dir)


def save_model_atomically(model, processor, output_dir: str | os.PathLike, extra_files: Optional[Dict[str, str]] = None) -> Path:
    """Write `model` and `processor` (and `extra_files`: name -> text) to `output_dir`, whole or not at all: into a
    `.partial` folder beside it, which then replaces `output_dir` (and whatever it held). Returns `output_dir`."""
    output_dir = Path(output_dir)
    partial = output_dir.with_name(output_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    model.save_pretrained(partial)
    processor.save_pretrained(partial)
    for name, text in (extra_files or {}).items():
        (partial / name).write_text(text)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    os.replace(partial, output_dir)
    return output_dir


class NonFiniteLossError(RuntimeError):
    """A training step produced a NaN or infinite loss; training stopped before it could change the weights."""


class Sound2SheetTrainer(Seq2SeqTrainer):
    """`Seq2SeqTrainer` that stops at a non-finite loss before the optimizer step, so the weights (and every
    checkpoint already written) stay as they were instead of being silently poisoned."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss.detach()).all():
            raise NonFiniteLossError(
                f"training loss became {float(loss.detach().float().mean())} at step {self.state.global_step + 1}; stopped before "
                f"the optimizer step, so the weights were not changed by it and the checkpoints in {self.args.output_dir} are "
                "intact (try a lower --learning_rate, --max_grad_norm, or --bf16 instead of --fp16, and check the data)"
            )
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        # The auxiliary frame targets only train the encoder: evaluation scores the tokens (and `generate` would
        # refuse them as unknown model inputs).
        inputs = {key: value for key, value in inputs.items() if key != "frame_labels"}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **gen_kwargs)


class DatasetEpochCallback(TrainerCallback):
    """Tells a dataset with `set_epoch` (the training windows) which epoch starts, so each epoch draws new windows.

    accelerate only forwards the epoch to the dataset when its sampler cannot take it; this makes it explicit.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch is fractional when resuming mid-epoch (e.g. 1.5): the epoch under way is its integer part
        self.dataset.set_epoch(math.floor((state.epoch or 0.0) + 1e-6))


def token_accuracy(predictions: np.ndarray, labels: np.ndarray, decoder_start_token_id: int, pad_token_id: Optional[int] = None) -> float:
    """Share of label tokens that the generated sequence has at the same position.

    Positions where the label is -100 or `pad_token_id` are not counted: `Seq2SeqTrainer` pads the labels of a
    generating evaluation with the pad token up to the generation length, and counting those would reward a model
    for padding its output."""
    predictions = np.asarray(predictions)
    if predictions.shape[1] and (predictions[:, 0] == decoder_start_token_id).all():
        predictions = predictions[:, 1:]
    width = labels.shape[1]
    if predictions.shape[1] < width:
        predictions = np.pad(predictions, ((0, 0), (0, width - predictions.shape[1])), constant_values=-1)
    mask = labels != -100
    if pad_token_id is not None:
        mask &= labels != pad_token_id
    if not mask.any():
        return 1.0
    return float((predictions[:, :width] == labels)[mask].mean())


def build_compute_metrics(tokenizer, decoder_start_token_id: int) -> Callable:
    """`compute_metrics` for `Seq2SeqTrainer(predict_with_generate=True)`: token accuracy and note-level metrics
    (mir_eval, per window, averaged over windows) of the generated tokens against the labels."""
    from .metrics import note_metrics

    def compute_metrics(eval_prediction) -> dict:
        predictions = eval_prediction.predictions
        predictions = predictions[0] if isinstance(predictions, tuple) else predictions
        labels = eval_prediction.label_ids
        result = {"token_accuracy": token_accuracy(predictions, labels, decoder_start_token_id, tokenizer.pad_token_id)}
        scores: dict = {}
        for predicted, label in zip(predictions, labels):
            reference = tokenizer.decode_notes([int(t) for t in label if t != -100 and t != tokenizer.pad_token_id])
            estimate = tokenizer.decode_notes([int(t) for t in predicted if t >= 0])
            for name, value in note_metrics(reference, estimate).items():
                scores.setdefault(name, []).append(value)
        result.update({name: float(np.mean(values)) for name, values in scores.items()})
        return result

    return compute_metrics


def write_model_card(output_dir: str | os.PathLike, *, model_name: str, results: dict, parameters: int, recipe: str,
                     dataset_name: str, dataset_type: str = "sound2sheet-manifest", extra_sections: str = "",
                     training_data: str | None = None) -> Path:
    """Write `README.md` (Hub model card: YAML front matter with a `model-index`, then the template's text).

    `dataset_name` names the data the `results` were measured on; `training_data` describes what the model was
    trained on, when that is other data (default: `dataset_name`)."""
    import yaml

    metric_names = {
        "onset_f1": "Note F1 (onset)",
        "onset_offset_f1": "Note F1 (onset+offset)",
        "onset_offset_velocity_f1": "Note F1 (onset+offset+velocity)",
    }
    metrics = [
        {"type": "f1", "name": label, "value": round(float(results[key]), 4)}
        for key, label in metric_names.items()
        if results.get(key) is not None
    ]
    front = {
        "library_name": "transformers",
        "license": "apache-2.0",
        "tags": ["audio", "music", "piano", "music-transcription", "sound2sheet"],
        "datasets": [dataset_name],
        "metrics": ["f1"],
        "model-index": [{
            "name": model_name,
            "results": [{
                "task": {"type": "automatic-speech-recognition", "name": "Piano transcription"},
                "dataset": {"type": dataset_type, "name": dataset_name},
                "metrics": metrics,
            }],
        }],
    }
    template = MODEL_CARD_TEMPLATE.read_text() if MODEL_CARD_TEMPLATE.exists() else "# {model_name}\n\n{results_table}\n"
    table = "\n".join(["| metric | value |", "| --- | --- |"] + [f"| {m['name']} | {m['value']:.4f} |" for m in metrics])
    body = template.format(model_name=model_name, parameters=f"{parameters / 1e6:.2f} M", recipe=recipe,
                           dataset_name=dataset_name, training_data=training_data or dataset_name, results_table=table,
                           extra_sections=extra_sections)
    path = Path(output_dir) / "README.md"
    path.write_text("---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" + body)
    return path


__all__ = [
    "TrainingHistoryCallback",
    "DatasetEpochCallback",
    "Sound2SheetTrainer",
    "NonFiniteLossError",
    "build_compute_metrics",
    "token_accuracy",
    "write_model_card",
    "last_complete_checkpoint",
    "is_complete_checkpoint",
    "average_checkpoints",
    "HISTORY_FILENAME",
]
