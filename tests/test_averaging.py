"""Checkpoint averaging (`sound2sheet.training.average_checkpoints`, `run_transcription.py average`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from sound2sheet import Sound2SheetForConditionalGeneration, Sound2SheetProcessor
from sound2sheet.training import average_checkpoints

from .conftest import save_tiny_model


def perturbed_copy(source: Path, folder: Path, seed: int) -> Path:
    """The model in `source` with seeded noise added to every weight, saved with its processor to `folder`."""
    model = Sound2SheetForConditionalGeneration.from_pretrained(source)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    model.save_pretrained(folder)
    Sound2SheetProcessor.from_pretrained(source).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("run")
    return [perturbed_copy(tiny_model_dir, root / f"checkpoint-{step}", seed) for seed, step in enumerate((500, 1000, 1500))]


def weights(folder: Path) -> dict:
    return Sound2SheetForConditionalGeneration.from_pretrained(folder).state_dict()


def test_every_weight_is_the_mean_of_the_checkpoints_and_the_processor_comes_along(checkpoints, tmp_path):
    out = average_checkpoints(checkpoints, tmp_path / "average")
    averaged, each = weights(out), [weights(folder) for folder in checkpoints]
    assert set(averaged) == set(each[0])
    assert any(not torch.equal(each[0][name], each[1][name]) for name in averaged)  # the inputs do differ
    for name, tensor in averaged.items():
        assert torch.equal(tensor, (each[0][name] + each[1][name] + each[2][name]) / 3), name
    assert sorted(path.name for path in out.iterdir()) == sorted(path.name for path in checkpoints[0].iterdir())
    processor = Sound2SheetProcessor.from_pretrained(out)
    assert processor.tokenizer.get_vocab() == Sound2SheetProcessor.from_pretrained(checkpoints[0]).tokenizer.get_vocab()
    assert not (tmp_path / "average.partial").exists()


def test_averaging_a_checkpoint_with_its_copy_changes_nothing(checkpoints, tmp_path):
    copy = shutil.copytree(checkpoints[0], tmp_path / "copy")
    out = average_checkpoints([checkpoints[0], copy], tmp_path / "average")
    original = weights(checkpoints[0])
    assert all(torch.equal(tensor, original[name]) for name, tensor in weights(out).items())


def test_wrong_arguments_are_refused_before_anything_is_written(checkpoints, tmp_path):
    out = tmp_path / "average"
    with pytest.raises(ValueError, match="at least two checkpoints, got 1"):
        average_checkpoints(checkpoints[:1], out)
    with pytest.raises(ValueError, match="named twice"):
        average_checkpoints([checkpoints[0], checkpoints[0]], out)
    with pytest.raises(ValueError, match=f"output_dir {checkpoints[1]} is one of the checkpoints"):
        average_checkpoints(checkpoints, checkpoints[1])
    with pytest.raises(FileNotFoundError, match=f"Checkpoint {tmp_path / 'nope'}: no such folder"):
        average_checkpoints([checkpoints[0], tmp_path / "nope"], out)
    assert not out.exists()


def test_checkpoints_of_another_model_are_named_and_refused(checkpoints, tmp_path):
    other = save_tiny_model(tmp_path / "other", num_decoder_layers=1)
    with pytest.raises(ValueError, match=rf"Checkpoint {other}: differs from {checkpoints[0]} in its configuration \(num_decoder_layers\); only"):
        average_checkpoints([checkpoints[0], other], tmp_path / "average")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(OSError, match=f"Checkpoint {broken}: cannot load a Sound2Sheet model"):
        average_checkpoints([checkpoints[0], broken], tmp_path / "average")
    assert not (tmp_path / "average").exists()


def test_a_folder_with_files_is_kept_unless_overwrite(checkpoints, tmp_path):
    out = tmp_path / "average"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="already holds files"):
        average_checkpoints(checkpoints, out)
    assert (out / "notes.txt").read_text() == "precious"
    average_checkpoints(checkpoints, out, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()


def test_the_average_subcommand(run_transcription, checkpoints, tmp_path, capsys):
    out = tmp_path / "average"
    assert run_transcription.main(["average", "--checkpoints", *map(str, checkpoints), "--output_dir", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"averaged 3 checkpoints into {out}"
    assert torch.equal(weights(out)["lm_head.weight"], weights(average_checkpoints(checkpoints, tmp_path / "again"))["lm_head.weight"])
    capsys.readouterr()  # the loading progress bars
    assert run_transcription.main(["average", "--checkpoints", *map(str, checkpoints), "--output_dir", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --output_dir {out}: already holds files; choose another folder or pass --overwrite_output_dir"
    )
    assert run_transcription.main(["average", "--checkpoints", str(checkpoints[0]), "--output_dir", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == "error: Averaging needs at least two checkpoints, got 1."
    assert run_transcription.main(["average", "--output_dir", str(tmp_path / "x")]) == 2
    assert "--checkpoints" in capsys.readouterr().err
