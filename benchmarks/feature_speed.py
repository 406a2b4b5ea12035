"""Feature extraction speed on one CPU thread.

    python benchmarks/feature_speed.py [--seconds 60] [--repeats 5]

Prints how many times faster than real time the extractor turns a 44.1 kHz stereo FLAC of --seconds into log-mel
windows (reading, downmixing and resampling included), and the same for the log-mel step alone on 16 kHz windows.
Median of --repeats runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch

from sound2sheet.feature_extraction_sound2sheet import Sound2SheetFeatureExtractor, iter_audio_windows


def synthetic_piano(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    """Random decaying harmonic notes: spectrally like piano audio, good enough for timing."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    audio = np.zeros_like(t)
    for onset in np.arange(0, seconds, 0.25):
        f0 = 440 * 2 ** ((rng.integers(21, 109) - 69) / 12)
        envelope = np.where(t >= onset, np.exp(-(t - onset) * 4), 0)
        audio += envelope * np.sin(2 * np.pi * f0 * t)
    return (0.1 * audio / max(1e-9, np.abs(audio).max())).astype(np.float32)


def median_time(function, repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="windows per extractor call (as transcribe batches them)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    extractor = Sound2SheetFeatureExtractor()
    window = int(extractor.window_seconds * extractor.sampling_rate)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "piano.flac"
        mono = synthetic_piano(args.seconds, 44100)
        soundfile.write(path, np.stack([mono, mono], axis=1), 44100, subtype="PCM_16")

        def from_file():
            windows = list(iter_audio_windows(path, window))
            for start in range(0, len(windows), args.batch):
                extractor(windows[start : start + args.batch], return_tensors="pt")

        windows = list(iter_audio_windows(path, window))

        def features_only():
            for start in range(0, len(windows), args.batch):
                extractor(windows[start : start + args.batch], return_tensors="pt")

        end_to_end = median_time(from_file, args.repeats)
        log_mel = median_time(features_only, args.repeats)
    print(f"{args.seconds:.0f} s of 44.1 kHz stereo FLAC, 1 thread, median of {args.repeats}:")
    print(f"  read + downmix + resample + log-mel: {end_to_end:.3f} s = {args.seconds / end_to_end:.0f}x realtime")
    print(f"  log-mel only (16 kHz windows):       {log_mel:.3f} s = {args.seconds / log_mel:.0f}x realtime")


if __name__ == "__main__":
    main()
