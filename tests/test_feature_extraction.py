"""Sound2SheetFeatureExtractor and the audio readers: rates, channels, windows, streaming, bad input."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from transformers import AutoFeatureExtractor

from sound2sheet import Sound2SheetConfig
from sound2sheet.feature_extraction_sound2sheet import (
    Sound2SheetFeatureExtractor,
    audio_duration,
    iter_audio_windows,
    load_audio,
)

from .conftest import piano_like

EXTRACTOR = Sound2SheetFeatureExtractor()


def test_one_window_is_exactly_256_frames_of_128_mels():
    features = EXTRACTOR(piano_like(2.56, 16000), sampling_rate=16000, return_tensors="pt")
    assert features["input_values"].shape == (1, 256, 128)
    assert features["attention_mask"].tolist() == [[1] * 256]
    assert EXTRACTOR.max_frames == 256
    assert Sound2SheetConfig().encoder_config.max_length == EXTRACTOR.max_frames


def test_padding_truncation_and_mask():
    short, long = piano_like(1.0, 16000), piano_like(4.0, 16000)
    features = EXTRACTOR([short, long], sampling_rate=16000, return_tensors="pt")
    assert features["input_values"].shape == (2, 256, 128)
    assert features["attention_mask"].sum(dim=1).tolist() == [100, 256]
    assert (features["input_values"][0, 100:] == -1.0).all()  # padding value = silence
    longest = EXTRACTOR([short, long], return_tensors="np", padding="longest")
    assert longest["input_values"].shape == (2, 400, 128)
    assert longest["attention_mask"].sum(axis=1).tolist() == [100, 400]


def test_silence_is_the_padding_value_and_loud_audio_is_bounded():
    silent = EXTRACTOR(np.zeros(40960, np.float32), return_tensors="pt")["input_values"]
    assert torch.equal(silent, torch.full((1, 256, 128), -1.0))
    loud = EXTRACTOR(np.clip(piano_like(2.56, 16000) * 5, -1, 1), return_tensors="pt")["input_values"]
    assert -1.0 <= loud.min() and loud.max() < 2.5


def test_a_44k_stereo_flac_and_a_16k_mono_wav_give_the_same_features(tmp_path):
    mono_44k = piano_like(3.0, 44100)
    soundfile.write(tmp_path / "stereo.flac", np.stack([mono_44k, mono_44k], axis=1), 44100, subtype="PCM_24")
    reference = load_audio(mono_44k, 16000, orig_sampling_rate=44100)
    soundfile.write(tmp_path / "mono.wav", reference, 16000, subtype="FLOAT")
    from_flac = EXTRACTOR(str(tmp_path / "stereo.flac"), return_tensors="pt")["input_values"]
    from_wav = EXTRACTOR(str(tmp_path / "mono.wav"), return_tensors="pt")["input_values"]
    # The only difference is the FLAC's 24-bit quantisation (~-144 dBFS): far below the features' -80 dB floor,
    # so the normalised log-mels agree to well within 1e-3 (0.004 dB).
    assert torch.allclose(from_flac, from_wav, atol=1e-3)
    assert from_flac.std() > 0.2  # real content, not silence


def test_files_at_any_rate_and_channel_count(tmp_path):
    soundfile.write(tmp_path / "low.wav", piano_like(1.5, 8000), 8000)
    six = np.stack([piano_like(1.5, 96000) * (c + 1) / 6 for c in range(6)], axis=1)
    soundfile.write(tmp_path / "six.flac", six, 96000, subtype="PCM_24")
    soundfile.write(tmp_path / "ogg.ogg", piano_like(1.5, 22050), 22050, format="OGG", subtype="VORBIS")
    for name in ("low.wav", "six.flac", "ogg.ogg"):
        samples = load_audio(tmp_path / name)
        assert samples.dtype == np.float32 and samples.ndim == 1
        assert abs(len(samples) - 24000) <= 2, name
        assert audio_duration(tmp_path / name) == pytest.approx(1.5, abs=1e-3)


def test_arrays_in_either_layout_are_downmixed():
    mono = piano_like(1.0, 16000)
    stereo = np.stack([mono, -mono * 0 + mono], axis=1)
    assert np.allclose(load_audio(stereo), mono)
    assert np.allclose(load_audio(stereo.T), mono)
    assert len(load_audio(mono, 16000, orig_sampling_rate=48000)) == 16000 // 3


def test_streamed_windows_equal_windows_of_the_whole_file(tmp_path):
    audio = piano_like(7.0, 44100)
    soundfile.write(tmp_path / "a.flac", audio, 44100, subtype="PCM_24")
    whole = load_audio(tmp_path / "a.flac")
    windows = list(iter_audio_windows(tmp_path / "a.flac", 40960, block_seconds=1.3))
    assert len(windows) == 3 and all(len(w) == 40960 for w in windows)
    joined = np.concatenate(windows)[: len(whole)]
    # streaming and one-shot soxr resampling differ only at the resampler's numerical level
    assert np.abs(joined - whole).max() < 1e-3
    assert np.all(np.concatenate(windows)[len(whole) + 50 :] == 0)


def test_streaming_a_long_file_keeps_memory_bounded(tmp_path):
    rate = 8000
    path = tmp_path / "ten_minutes.wav"
    with soundfile.SoundFile(path, "w", rate, 1, subtype="PCM_16") as out:
        for _ in range(60):
            out.write(piano_like(10.0, rate))
    tracemalloc.start()
    count = 0
    for _ in iter_audio_windows(path, 40960, block_seconds=10):
        count += 1
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == int(np.ceil(600 * 16000 / 40960))
    whole_file_bytes = 600 * 16000 * 4
    assert peak < whole_file_bytes / 10, f"peak {peak} bytes"


def written(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.wav", "{path}: no such file"),
        (lambda d: d, "{path}: is a directory, not an audio file"),
        (lambda d: written(d / "empty.wav", b""), "{path}: not a readable audio file"),
        (lambda d: written(d / "text.wav", b"this is not audio\n"), "{path}: not a readable audio file"),
    ],
    ids=["missing", "directory", "empty-file", "text-named-wav"],
)
def test_bad_paths_give_errors_naming_the_file(tmp_path, make, message):
    path = make(tmp_path)
    expected = message.format(path=path)
    for call in (lambda: load_audio(path), lambda: list(iter_audio_windows(path, 40960)), lambda: EXTRACTOR(str(path))):
        with pytest.raises(ValueError) as error:
            call()
        assert str(error.value).startswith(expected)


def test_truncated_flac_is_an_error_naming_the_file(tmp_path):
    soundfile.write(tmp_path / "full.flac", piano_like(5.0, 44100), 44100)
    data = (tmp_path / "full.flac").read_bytes()
    (tmp_path / "cut.flac").write_bytes(data[: len(data) // 3])
    path = tmp_path / "cut.flac"
    try:
        samples = load_audio(path)
    except ValueError as error:
        assert str(error).startswith(f"{path}: not a readable audio file")
    else:  # libsndfile may decode the complete frames before the cut: then we must get only those
        assert 0 < len(samples) < 5.0 * 16000


def test_audio_shorter_than_one_output_sample_is_an_error_not_an_empty_array(tmp_path):
    # found by test_fuzz: a WAV header overwritten to claim a rate of billions of Hz resampled to nothing
    with pytest.raises(ValueError, match="^audio array: 3 samples at 1000000000 Hz last less than one sample at 16000 Hz$"):
        load_audio(np.ones(3, np.float32), 16000, orig_sampling_rate=10**9)
    soundfile.write(tmp_path / "fast.wav", np.ones(3, np.float32), 16000, subtype="PCM_16")
    header = bytearray((tmp_path / "fast.wav").read_bytes())
    header[24:28] = (2**31 - 1).to_bytes(4, "little")  # the sample rate field of a canonical WAV header
    (tmp_path / "fast.wav").write_bytes(bytes(header))
    with pytest.raises(ValueError, match=f"^{tmp_path / 'fast.wav'}: 3 samples at 2147483647 Hz last less than one sample "
                                         "at 16000 Hz \\(is the sample rate in its header right\\?\\)$"):
        load_audio(tmp_path / "fast.wav")


def test_zero_length_and_non_finite_audio(tmp_path):
    soundfile.write(tmp_path / "zero.wav", np.zeros((0, 1), np.float32), 16000)
    with pytest.raises(ValueError, match=f"^{tmp_path / 'zero.wav'}: the audio is empty \\(0 samples\\)$"):
        load_audio(tmp_path / "zero.wav")
    with pytest.raises(ValueError, match=f"^{tmp_path / 'zero.wav'}: the audio is empty \\(0 samples\\)$"):
        list(iter_audio_windows(tmp_path / "zero.wav", 40960))
    bad = piano_like(1.0, 16000)
    bad[100] = np.nan
    soundfile.write(tmp_path / "nan.wav", bad, 16000, subtype="FLOAT")
    with pytest.raises(ValueError, match=f"^{tmp_path / 'nan.wav'}: the audio contains NaN or infinite samples$"):
        load_audio(tmp_path / "nan.wav")
    with pytest.raises(ValueError, match="^audio array: the audio contains NaN or infinite samples$"):
        EXTRACTOR(np.full(1000, np.inf, np.float32))
    with pytest.raises(ValueError, match="^audio array: the audio is empty"):
        load_audio(np.zeros(0, np.float32))


def test_all_zero_audio_is_valid_silence():
    assert EXTRACTOR(np.zeros(16000, np.float32), return_tensors="np")["input_values"][0, :100].max() == -1.0


@pytest.mark.parametrize("n_fft", [2048, 1024])
def test_the_stft_window_is_the_periodic_hann_window_rounded_from_float64(n_fft):
    n = np.arange(n_fft)
    expected = (0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)).astype(np.float32)
    window = Sound2SheetFeatureExtractor(n_fft=n_fft).stft_window
    assert window.dtype == torch.float32 and np.array_equal(window.numpy(), expected)


FEATURES_IN_A_FRESH_PROCESS = """
import hashlib, sys
sys.path.insert(0, sys.argv[1])
from sound2sheet.feature_extraction_sound2sheet import Sound2SheetFeatureExtractor
from tests.conftest import piano_like
features = Sound2SheetFeatureExtractor()(piano_like(2.56, 16000), return_tensors="np")["input_values"]
print(hashlib.sha1(features.tobytes()).hexdigest())
"""


@pytest.mark.slow
def test_every_process_computes_the_same_features():
    """Bit for bit, so that a training run resumed in a new process goes on exactly as the first one would have.
    (A fresh process's first vectorised torch math call on two threads, torch.hann_window's cosine or the features'
    log10, used to come out off in about one process in ten.)"""
    root = str(Path(__file__).resolve().parents[1])
    digests = []
    for _ in range(4):  # two at a time, on two cores
        pair = [subprocess.Popen([sys.executable, "-c", FEATURES_IN_A_FRESH_PROCESS, root], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]
        for process in pair:
            out, err = process.communicate(timeout=300)
            assert process.returncode == 0, err
            digests.append(out.strip())
    in_this_process = EXTRACTOR(piano_like(2.56, 16000), return_tensors="np")["input_values"]
    assert set(digests) == {hashlib.sha1(in_this_process.tobytes()).hexdigest()}


def test_wrong_sampling_rate_is_rejected_like_transformers_extractors():
    with pytest.raises(ValueError, match="The model expects audio at 16000 Hz but sampling_rate=44100 was given"):
        EXTRACTOR(np.zeros(1000, np.float32), sampling_rate=44100)


def test_save_load_round_trip_keeps_derived_arrays_out_of_the_json(tmp_path):
    custom = Sound2SheetFeatureExtractor(n_fft=1024, f_min=40.0)
    custom.save_pretrained(tmp_path)
    text = (tmp_path / "preprocessor_config.json").read_text()
    assert "mel_filters" not in text and "stft_window" not in text
    loaded = Sound2SheetFeatureExtractor.from_pretrained(tmp_path)
    audio = piano_like(2.0, 16000)
    assert torch.equal(loaded(audio, return_tensors="pt")["input_values"], custom(audio, return_tensors="pt")["input_values"])
    Sound2SheetConfig().save_pretrained(tmp_path)
    assert isinstance(AutoFeatureExtractor.from_pretrained(tmp_path), Sound2SheetFeatureExtractor)
