"""examples/package_model.py: a trained folder becomes a shippable model folder and a model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sound2sheet import Sound2SheetFeatureExtractor, Sound2SheetForConditionalGeneration, Sound2SheetProcessor, Sound2SheetTokenizer

from .model_tester import Sound2SheetModelTester
from .scripts import REPO_ROOT, load_script


def test_packaging_keeps_the_frame_head_and_writes_the_card_with_the_measured_results(tmp_path):
    run = tmp_path / "run"
    model = Sound2SheetModelTester().get_model(
        frame_loss_weight=20.0, encoder_config={"max_length": 256, "num_mel_bins": 128, "frequency_stride": 16, "time_stride": 4}
    )
    model.save_pretrained(run)
    Sound2SheetProcessor(Sound2SheetFeatureExtractor(), Sound2SheetTokenizer()).save_pretrained(run)
    quality = {"summary": {
        "sound2sheet": {"onset_f1": 0.612, "onset_offset_f1": 0.301, "onset_offset_velocity_f1": 0.12, "cpu_seconds_per_audio_second": 0.04},
        "basic-pitch 0.4.0": {"onset_f1": 0.783, "onset_offset_f1": 0.428, "onset_offset_velocity_f1": 0.124, "cpu_seconds_per_audio_second": 0.096},
    }}
    (tmp_path / "quality.json").write_text(json.dumps(quality))
    dest, cards = tmp_path / "models" / "piano-test", tmp_path / "cards"
    package_model = load_script("package_model")
    package_model.main([str(run), str(dest), "--quality", str(tmp_path / "quality.json"),
                        "--training-summary", "Trained for a while.", "--cards-dir", str(cards)])

    weights = load_file(dest / "model.safetensors")
    assert {"frame_head.weight", "frame_head.bias"} <= set(weights)
    shipped = Sound2SheetForConditionalGeneration.from_pretrained(dest).eval()
    assert shipped.has_frame_head
    assert shipped.state_dict().keys() == model.state_dict().keys()
    for name, tensor in shipped.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    Sound2SheetProcessor.from_pretrained(dest)  # tokenizer and feature extractor files are there

    card = (dest / "README.md").read_text()
    assert (cards / "piano-test.md").read_text() == card
    front = yaml.safe_load(card.split("---")[1])
    metrics = {m["name"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}
    assert metrics == {"Note F1 (onset)": 0.612, "Note F1 (onset+offset)": 0.301, "Note F1 (onset+offset+velocity)": 0.12}
    assert "examples/train_piano_small_stage2.json" in card and '"frame_loss_weight": 20.0' in card
    assert "examples/train_piano_small_stage3.json" in card and '"encoder_memory": "columns"' in card
    assert "examples/train_piano_small_stage4.json" in card and '"cross_attention_time_bias": true' in card
    assert "examples/train_piano_small_stage5.json" in card and '"output_dir": "runs/piano-small-stage5"' in card
    assert "placed on the frame head's onsets and offsets" in card
    assert "| basic-pitch 0.4.0 | 0.783 | 0.428 | 0.124 | 0.096 |" in card and "Trained for a while." in card
    # the results are on the test split; the training data section describes the corpora trained on, not that split
    assert front["model-index"][0]["results"][0]["dataset"]["name"].endswith("(data/piano-synth, test split)")
    training_data = card.split("## Training data\n\n")[1].split("\n\n")[0]
    assert training_data == package_model.TRAINING_DATA and "TimGM6mb is kept out of training" in training_data


def test_packaging_refuses_a_model_without_the_frame_head(tmp_path):
    run = tmp_path / "run"
    Sound2SheetModelTester().get_model(
        encoder_config={"max_length": 256, "num_mel_bins": 128, "frequency_stride": 16, "time_stride": 4}
    ).save_pretrained(run)
    Sound2SheetProcessor(Sound2SheetFeatureExtractor(), Sound2SheetTokenizer()).save_pretrained(run)
    (tmp_path / "quality.json").write_text("{}")
    dest = tmp_path / "models" / "piano-test"
    with pytest.raises(SystemExit, match="no frame head"):
        load_script("package_model").main([str(run), str(dest), "--quality", str(tmp_path / "quality.json")])
    assert not dest.exists()


def test_the_recipe_stages_parse_and_each_starts_from_the_previous_stages_run(run_transcription):
    package_model = load_script("package_model")
    recipes = package_model.RECIPES
    assert set(recipes) == set((REPO_ROOT / "examples").glob("train_piano_small*.json"))  # none left out of the card
    previous_output = None
    for path in recipes:
        model_args, data_args, training_args = run_transcription.parse_training_arguments([str(path)], prog="train")
        start = model_args.model_name_or_path
        if previous_output is None:
            assert start is None, path.name  # stage 1 starts from scratch
        elif start in package_model.AVERAGE_COMMANDS:  # the average of the previous stage's checkpoints
            command = package_model.AVERAGE_COMMANDS[start].split()
            checkpoints = command[command.index("--checkpoints") + 1 : command.index("--output_dir")]
            assert command[:3] == ["python", "run_transcription.py", "average"] and command[-1] == start, path.name
            assert len(checkpoints) >= 2 and all(Path(c).parent == previous_output for c in checkpoints), path.name
        else:
            assert Path(start).parent == previous_output, path.name
            assert Path(start).name.startswith("checkpoint-"), path.name
        assert data_args.manifest_dir.startswith("data/piano-synth"), path.name
        previous_output = Path(training_args.output_dir)
