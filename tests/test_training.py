"""run_transcription.py train/evaluate on the HF Trainer: checkpoints, best model, early stopping, history,
resume after SIGKILL, multi-process training, metrics, argument errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sound2sheet import Note
from sound2sheet.metrics import load_note_metric, note_metrics, note_rows
from sound2sheet.training import is_complete_checkpoint, last_complete_checkpoint

from .data_fixtures import make_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--hidden_size", "32", "--num_decoder_layers", "1", "--num_attention_heads", "2", "--intermediate_size", "64",
    "--encoder_hidden_size", "32", "--encoder_layers", "1", "--encoder_attention_heads", "2",
    "--encoder_intermediate_size", "64", "--encoder_time_stride", "8", "--max_target_length", "128", "--dropout", "0.0",
    "--per_device_train_batch_size", "2", "--learning_rate", "3e-3", "--report_to", "none", "--logging_steps", "1",
    "--train_windows_per_piece", "4", "--seed", "1", "--dataloader_num_workers", "0", "--no_augment",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "ds", pieces_per_split=(2, 1, 1))


def train(run_transcription, dataset, output_dir, *extra):
    return run_transcription.main(["train", "--manifest_dir", str(dataset), "--output_dir", str(output_dir), *TINY, *map(str, extra)])


def checkpoints(folder):
    return sorted((p.name for p in Path(folder).glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))


@pytest.mark.slow
def test_training_end_to_end(run_transcription, dataset, tmp_path):
    out = tmp_path / "run"
    code = train(run_transcription, dataset, out, "--num_train_epochs", "4", "--eval_strategy", "epoch", "--save_strategy", "epoch",
                 "--save_total_limit", "2", "--load_best_model_at_end", "--metric_for_best_model", "loss")
    assert code == 0
    # the saved model carries the user-facing decoding limit (max_new_tokens), not the training-time max_length
    saved = json.loads((out / "generation_config.json").read_text())
    assert saved["max_new_tokens"] == json.loads((out / "config.json").read_text())["max_target_positions"] - 1
    assert "max_length" not in saved
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert sum(losses[-4:]) / 4 < 0.92 * sum(losses[:4]) / 4  # the loss falls (seeded run: about 0.86)
    evals = [(entry["step"], entry["eval_loss"]) for entry in state["log_history"] if "eval_loss" in entry and "epoch" in entry][:4]
    best_step = min(evals, key=lambda item: item[1])[0]
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best_step}")
    kept = checkpoints(out)
    assert len(kept) <= 2 + 1 and f"checkpoint-{best_step}" in kept  # the limit, plus the best one kept
    assert len(kept) < 4
    history = json.loads((out / "training_history.json").read_text())
    assert set(history) == {"start_time", "end_time", "total_epochs", "best_epoch", "best_val_loss", "best_metric", "epochs"}
    assert history["total_epochs"] == 4.0 and len(history["epochs"]) == 4
    assert set(history["epochs"][0]) == {"epoch", "step", "train_loss", "val_loss", "val_token_accuracy", "note_f1", "learning_rate", "timestamp"}
    assert history["best_val_loss"] == min(e["val_loss"] for e in history["epochs"])
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "model-index:" in card
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer_config.json", "processor_config.json"):
        assert (out / name).exists(), name
    # evaluate the trained folder on whole pieces
    code = run_transcription.main(["evaluate", "--manifest_dir", str(dataset), "--model_name_or_path", str(out), "--split", "test",
                                   "--output_dir", str(tmp_path / "eval")])
    assert code == 0
    report = json.loads((tmp_path / "eval" / "eval_test.json").read_text())
    assert report["pieces"] == 1 and 0.0 <= report["metrics"]["onset_f1"] <= 1.0
    assert 0.0 <= report["token_accuracy"] <= 1.0 and report["per_piece"][0]["id"] == "test-0"


@pytest.mark.slow
def test_early_stopping_stops(run_transcription, dataset, tmp_path):
    out = tmp_path / "early"
    code = train(run_transcription, dataset, out, "--num_train_epochs", "10", "--eval_strategy", "epoch", "--save_strategy", "epoch",
                 "--load_best_model_at_end", "--metric_for_best_model", "loss", "--patience", "1", "--min-delta", "100")
    assert code == 0
    history = json.loads((out / "training_history.json").read_text())
    assert len(history["epochs"]) == 2  # the first evaluation sets the best; the second does not beat it by 100


def test_training_with_the_frame_loss_trains_and_saves_the_head_and_evaluates_tokens_only(run_transcription, dataset, tmp_path):
    out = tmp_path / "frames"
    code = train(run_transcription, dataset, out, "--max_steps", "3", "--frame_loss_weight", "5.0", "--eval_strategy", "steps",
                 "--eval_steps", "3", "--save_strategy", "no", "--max_eval_windows", "2")
    assert code == 0
    assert json.loads((out / "config.json").read_text())["frame_loss_weight"] == 5.0
    weights = load_file(out / "model.safetensors")
    assert weights["frame_head.weight"].shape == (256, 8 * 32)  # 2 x 128 pitches from 8 frequency rows of 32-wide tokens
    state = json.loads((out / "trainer_state.json").read_text())
    train_losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    (eval_loss,) = [entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry]
    assert len(train_losses) == 3 and min(train_losses) > eval_loss  # 5 x frame BCE (~0.69 at first) on top in training
    # a later stage changes the weight of a checkpoint: the head and its weight come from the command line
    again = tmp_path / "again"
    code = train(run_transcription, dataset, again, "--model_name_or_path", str(out), "--max_steps", "1", "--frame_loss_weight", "0.5")
    assert code == 0 and json.loads((again / "config.json").read_text())["frame_loss_weight"] == 0.5


def test_training_continues_a_checkpoint_with_frame_offsets_added(run_transcription, dataset, tmp_path, capsys):
    out = tmp_path / "frames"
    assert train(run_transcription, dataset, out, "--max_steps", "1", "--frame_loss_weight", "1.0", "--save_strategy", "no") == 0
    assert json.loads((out / "config.json").read_text()).get("frame_offsets", False) is False
    assert load_file(out / "model.safetensors")["frame_head.weight"].shape == (256, 8 * 32)
    # the onset and sounding outputs go on from the checkpoint; the offset outputs are new, and trained on 384-wide labels
    again = tmp_path / "offsets"
    code = train(run_transcription, dataset, again, "--model_name_or_path", str(out), "--max_steps", "2", "--frame_offsets",
                 "--save_strategy", "no")
    assert code == 0 and json.loads((again / "config.json").read_text())["frame_offsets"] is True
    weights = load_file(again / "model.safetensors")
    assert weights["frame_head.weight"].shape == (384, 8 * 32) and weights["frame_head.bias"].shape == (384,)
    losses = [entry["loss"] for entry in json.loads((again / "trainer_state.json").read_text())["log_history"] if "loss" in entry]
    assert len(losses) == 2
    capsys.readouterr()
    # offsets need a frame head, and a checkpoint's cannot be taken away
    assert train(run_transcription, dataset, tmp_path / "no-head", "--max_steps", "1", "--frame_offsets") == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --frame_offsets: offsets are outputs of the frame head; add one with --frame_loss_weight > 0"
    )
    code = train(run_transcription, dataset, tmp_path / "fewer", "--model_name_or_path", str(again), "--max_steps", "1",
                 "--frame_offsets", "false")
    assert code == 2 and capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --frame_offsets false: the checkpoint's frame head predicts offsets; they cannot be taken away"
    )


def run_script(args, env_extra=None, **kwargs):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.Popen([sys.executable, str(REPO_ROOT / "run_transcription.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_resumes_exactly(dataset, tmp_path):
    args = ["train", "--manifest_dir", str(dataset), *TINY, "--max_steps", "12", "--save_strategy", "steps", "--save_steps", "2"]
    reference = run_script([*args, "--output_dir", str(tmp_path / "reference")])
    assert reference.wait(timeout=600) == 0, reference.stderr.read()
    killed_dir = tmp_path / "killed"
    victim = run_script([*args, "--output_dir", str(killed_dir)])
    deadline = time.time() + 600
    while time.time() < deadline and not (killed_dir / "checkpoint-6" / "trainer_state.json").exists():
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    before = checkpoints(killed_dir)
    complete = [name for name in before if is_complete_checkpoint(killed_dir / name)]
    assert complete, before  # checkpoint-6 at least; a later one may have been torn by the kill
    resume_point = str(killed_dir / complete[-1])
    assert last_complete_checkpoint(killed_dir) == resume_point
    # a checkpoint torn mid-write must never be picked up
    torn = killed_dir / "checkpoint-99"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"partial")
    (torn / "trainer_state.json").write_text('{"log_history": [')
    assert not is_complete_checkpoint(torn)
    assert last_complete_checkpoint(killed_dir) == resume_point
    shutil.rmtree(torn)
    resumed = run_script([*args, "--output_dir", str(killed_dir)])
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    assert f"Resuming from {resume_point}" in resumed.stderr.read()
    final_reference = load_file(tmp_path / "reference" / "model.safetensors")
    final_resumed = load_file(killed_dir / "model.safetensors")
    assert final_reference.keys() == final_resumed.keys()
    for name in final_reference:
        assert torch.equal(final_reference[name], final_resumed[name]), name
    for name in ("optimizer.pt", "scheduler.pt"):
        ref_state = torch.load(tmp_path / "reference" / "checkpoint-12" / name, weights_only=True)
        got_state = torch.load(killed_dir / "checkpoint-12" / name, weights_only=True)
        assert repr(ref_state) == repr(got_state), name


KILL_DURING_CHECKPOINT_WRITE = """
import importlib.util, os, signal, sys
import transformers
spec = importlib.util.spec_from_file_location("run_transcription", sys.argv[1])
script = sys.modules["run_transcription"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)
save = transformers.Trainer._save_optimizer_and_scheduler

def save_then_die(self, output_dir):  # the weights of this checkpoint are on disk, the rest is not
    if output_dir.endswith(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
    return save(self, output_dir)

transformers.Trainer._save_optimizer_and_scheduler = save_then_die
sys.exit(script.main(sys.argv[3:]))
"""

RESUME_ARGS = ["--max_steps", "8", "--save_strategy", "steps", "--save_steps", "2"]


@pytest.fixture(scope="module")
def reference_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    process = run_script(["train", "--manifest_dir", str(dataset), *TINY, *RESUME_ARGS, "--output_dir", str(out)])
    assert process.wait(timeout=600) == 0, process.stderr.read()
    return out


def assert_resume_matches_reference(folder: Path, reference: Path, dataset):
    expected = last_complete_checkpoint(folder)
    resumed = run_script(["train", "--manifest_dir", str(dataset), *TINY, *RESUME_ARGS, "--output_dir", str(folder)])
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    if expected:
        assert f"Resuming from {expected}" in resumed.stderr.read()
    want, got = load_file(reference / "model.safetensors"), load_file(folder / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_then_rerun_resumes_exactly(dataset, reference_run, tmp_path):
    out = tmp_path / "run"
    victim = subprocess.run(
        [sys.executable, "-c", KILL_DURING_CHECKPOINT_WRITE, str(REPO_ROOT / "run_transcription.py"), "checkpoint-4",
         "train", "--manifest_dir", str(dataset), *TINY, *RESUME_ARGS, "--output_dir", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert victim.returncode == -signal.SIGKILL
    assert (out / "checkpoint-4" / "model.safetensors").is_file()  # torn: weights written, the rest missing
    assert not is_complete_checkpoint(out / "checkpoint-4")
    assert last_complete_checkpoint(out) == str(out / "checkpoint-2")
    assert_resume_matches_reference(out, reference_run, dataset)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_a_random_moment_then_rerun_resumes_exactly(dataset, reference_run, tmp_path, seed):
    """Killed somewhere between start-up and the end of training (the moment drawn from `seed`)."""
    out = tmp_path / "run"
    victim = run_script(["train", "--manifest_dir", str(dataset), *TINY, *RESUME_ARGS, "--output_dir", str(out)])
    started = time.time()
    while not (out / "checkpoint-2").exists() and victim.poll() is None:  # past start-up: training has begun
        time.sleep(0.02)
    delay = float(np.random.default_rng(seed).uniform(0.0, 1.0)) * max(time.time() - started, 0.5) * 2
    time.sleep(delay)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert_resume_matches_reference(out, reference_run, dataset)


@pytest.mark.slow
def test_two_processes_match_one_on_the_same_global_batch(dataset, tmp_path):
    if shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists():
        pytest.skip("accelerate's launcher is not installed")
    launcher = str(Path(sys.executable).parent / "accelerate")
    common = ["--manifest_dir", str(dataset), *TINY, "--max_steps", "6", "--save_strategy", "no", "--learning_rate", "1e-3"]
    single = run_script(["train", *common, "--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "4"])
    assert single.wait(timeout=900) == 0, single.stderr.read()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    double = subprocess.run(
        [launcher, "launch", "--num_processes", "2", "--cpu", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", str(REPO_ROOT / "run_transcription.py"), "train", *common,
         "--output_dir", str(tmp_path / "two"), "--per_device_train_batch_size", "2"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert double.returncode == 0, double.stderr[-3000:]

    def losses(folder):
        state = json.loads((folder / "trainer_state.json").read_text())
        return [entry["loss"] for entry in state["log_history"] if "loss" in entry]

    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 6
    # the per-process token means are averaged instead of one mean over all tokens: close, not identical
    assert two == pytest.approx(one, rel=0.05)


def test_a_non_finite_loss_stops_training_before_it_touches_the_weights(run_transcription, dataset, tmp_path, capsys, monkeypatch):
    from sound2sheet import Sound2SheetForConditionalGeneration

    forward, calls = Sound2SheetForConditionalGeneration.forward, []

    def nan_from_the_third_step(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        calls.append(1)
        if self.training and len(calls) >= 3:
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(Sound2SheetForConditionalGeneration, "forward", nan_from_the_third_step)
    out = tmp_path / "run"
    assert train(run_transcription, dataset, out, "--max_steps", "5", "--save_strategy", "steps", "--save_steps", "1") == 1
    [err] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err.startswith("error: training loss became nan at step 3; stopped before the optimizer step, so the weights were not changed")
    assert checkpoints(out) == ["checkpoint-1", "checkpoint-2"]
    for name in checkpoints(out):
        weights = load_file(out / name / "model.safetensors")
        assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    assert not (out / "model.safetensors").exists()  # no final model written from a poisoned run


def test_argument_errors_are_one_line_with_exit_code_2(run_transcription, dataset, tmp_path, capsys):
    assert run_transcription.main(["train", "--output_dir", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == "error: --manifest_dir is required (a dataset folder with train/ and val/ manifests)"
    assert run_transcription.main(["train", "--manifest_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --manifest_dir {tmp_path / 'nope'}: no such dataset folder"
    assert run_transcription.main(["train", "--manifest_dir", str(dataset), "--output_dir", str(tmp_path / "x"), "--bogus", "1"]) == 2
    assert capsys.readouterr().err.strip() == "error: unrecognized arguments: --bogus 1"


def test_a_folder_with_someone_elses_files_is_not_overwritten(run_transcription, dataset, tmp_path, capsys):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    assert train(run_transcription, dataset, out, "--max_steps", "1") == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --output_dir {out}: holds files that are not from a Sound2Sheet run (thesis.tex); "
        "choose another folder or pass --overwrite_output_dir"
    )
    assert (out / "thesis.tex").read_text() == "precious"


def test_seed_flags_map_onto_the_hugging_face_ones(run_transcription):
    translate = run_transcription.translate_seed_flags
    assert translate(["--batch-size", "8", "--epochs=3", "--patience", "2", "--resume-from", "ckpt", "--use-amp"]) == [
        "--per_device_train_batch_size", "8", "--num_train_epochs=3", "--early_stopping_patience", "2",
        "--resume_from_checkpoint", "ckpt", "--bf16",
    ]
    assert translate(["--save-every", "50"]) == ["--save_steps", "50", "--save_strategy", "steps"]


# --- metrics ------------------------------------------------------------------------------------------------------

REFERENCE = [Note(0.10, 0.50, 60, 80), Note(0.50, 1.00, 62, 80), Note(1.00, 1.50, 64, 80), Note(1.50, 2.00, 65, 80)]


def test_ground_truth_scores_one_and_empty_prediction_zero():
    perfect = note_metrics(REFERENCE, REFERENCE)
    assert all(value == 1.0 for value in perfect.values())
    empty = note_metrics(REFERENCE, [])
    assert all(value == 0.0 for value in empty.values())
    assert note_metrics([], [])["onset_f1"] == 1.0


def test_hand_counted_matches():
    predicted = [Note(0.12, 0.50, 60, 80), Note(0.53, 1.00, 62, 80), Note(1.08, 1.50, 64, 80)]  # the last is 80 ms late
    scores = note_metrics(REFERENCE, predicted)
    assert scores["onset_precision"] == pytest.approx(2 / 3)
    assert scores["onset_recall"] == pytest.approx(2 / 4)
    # offsets: the second note ends on time; a note that ends 0.3 s early fails the offset criterion
    early_end = [Note(0.10, 0.20, 60, 80), Note(0.50, 1.00, 62, 80)]
    assert note_metrics(REFERENCE, early_end)["onset_offset_precision"] == pytest.approx(1 / 2)
    # velocity: mir_eval fits the predicted loudness linearly to the reference's, so the same dynamic shape at
    # another level passes, and loudness that jumps around where the reference rises steadily fails
    crescendo = [Note(n.onset, n.offset, n.pitch, v) for n, v in zip(REFERENCE, (40, 60, 80, 100))]
    louder = [Note(n.onset, n.offset, n.pitch, v) for n, v in zip(REFERENCE, (60, 80, 100, 120))]
    erratic = [Note(n.onset, n.offset, n.pitch, v) for n, v in zip(REFERENCE, (127, 1, 127, 1))]
    assert note_metrics(crescendo, louder)["onset_offset_velocity_f1"] == 1.0
    wrong = note_metrics(crescendo, erratic)
    assert wrong["onset_offset_f1"] == 1.0 and wrong["onset_offset_velocity_f1"] == 0.0


def test_evaluate_module_loads_offline_and_agrees(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = load_note_metric()
    predicted = [Note(0.12, 0.50, 60, 80), Note(0.53, 1.00, 62, 80)]
    result = metric.compute(predictions=[note_rows(predicted), note_rows(REFERENCE)], references=[note_rows(REFERENCE)] * 2)
    expected = (note_metrics(REFERENCE, predicted)["onset_f1"] + 1.0) / 2
    assert result["onset_f1"] == pytest.approx(expected)


def test_token_accuracy_counts_label_tokens_only():
    from sound2sheet import Sound2SheetTokenizer
    from sound2sheet.training import build_compute_metrics, token_accuracy

    tokenizer = Sound2SheetTokenizer()
    pad, start, eos = tokenizer.pad_token_id, 2, tokenizer.eos_token_id
    labels = np.array([[300, 310, eos, pad, pad, pad], [300, eos, -100, -100, pad, pad]])  # as Seq2SeqTrainer pads them
    generated = np.array([[start, 300, 311, eos, pad, pad, pad], [start, 300, eos, pad, pad, pad, pad]])
    assert token_accuracy(generated, labels, start, pad) == pytest.approx(4 / 5)
    assert token_accuracy(generated, labels, start) == pytest.approx(9 / 10)  # counting the padding rewards padding
    from transformers import EvalPrediction

    metrics = build_compute_metrics(tokenizer, start)(EvalPrediction(predictions=generated, label_ids=labels))
    assert metrics["token_accuracy"] == pytest.approx(4 / 5)
