"""Shared fixtures: tiny models saved to disk, synthetic piano-like audio files."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from sound2sheet import Sound2SheetFeatureExtractor, Sound2SheetProcessor, Sound2SheetTokenizer

from .model_tester import Sound2SheetModelTester

REPO_ROOT = Path(__file__).resolve().parents[1]


def piano_like(seconds: float, rate: int, pitches=(48, 60, 67, 76)) -> np.ndarray:
    """Decaying harmonic tones struck one after another: a stand-in for piano audio."""
    t = np.arange(int(seconds * rate)) / rate
    signal = np.zeros_like(t)
    for index, pitch in enumerate(pitches):
        f0 = 440.0 * 2 ** ((pitch - 69) / 12)
        onset = index * seconds / len(pitches)
        envelope = np.where(t >= onset, np.exp(-(t - onset) * 3.0), 0.0)
        for harmonic in range(1, 6):
            if f0 * harmonic < rate / 2:
                signal += envelope * np.sin(2 * np.pi * f0 * harmonic * t) / harmonic
    return (0.2 * signal).astype(np.float32)


def save_tiny_model(folder: Path, **overrides) -> Path:
    """Save a tiny random Sound2Sheet model (config `overrides` applied) with a full-size feature extractor and
    tokenizer to `folder`, like a release."""
    model = Sound2SheetModelTester().get_model(
        max_target_positions=128,
        encoder_config={"max_length": 256, "num_mel_bins": 128, "frequency_stride": 16, "time_stride": 4},
        **overrides,
    )
    model.generation_config.max_new_tokens = 24
    model.save_pretrained(folder)
    Sound2SheetProcessor(Sound2SheetFeatureExtractor(), Sound2SheetTokenizer()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Sound2Sheet model with a full-size feature extractor and tokenizer, saved like a release."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def audio_files(tmp_path_factory) -> dict:
    """Short piano-like files: 6 s at 44.1 kHz stereo FLAC, and the same as 16 kHz mono WAV."""
    folder = tmp_path_factory.mktemp("audio")
    stereo = piano_like(6.0, 44100)
    soundfile.write(folder / "piece.flac", np.stack([stereo, stereo], axis=1), 44100, subtype="PCM_24")
    soundfile.write(folder / "short.wav", piano_like(1.0, 16000), 16000)
    return {"flac": folder / "piece.flac", "wav": folder / "short.wav", "dir": folder}


@pytest.fixture(scope="session")
def run_transcription():
    """The run_transcription.py script as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("run_transcription", REPO_ROOT / "run_transcription.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_transcription"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield
