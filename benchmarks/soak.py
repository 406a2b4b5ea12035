"""Soak test: transcribe the same files over and over and watch memory.

    python benchmarks/soak.py [--model models/...] [--files 100] [--minutes 10] [--seconds-per-file 5]

Writes --files short FLACs (mixed rates and channel counts), then transcribes them in a loop for --minutes in one
process. Prints files per minute, the resident set size after the first full pass (warm-up) and at the end, their
ratio, and the peak.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import soundfile
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from feature_speed import synthetic_piano  # noqa: E402

from sound2sheet import Sound2SheetForConditionalGeneration, Sound2SheetProcessor  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FORMATS = ((16000, 1), (22050, 2), (44100, 2), (48000, 1))


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "sound2sheet-piano-small"))
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seconds-per-file", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = Sound2SheetForConditionalGeneration.from_pretrained(args.model).eval()
    processor = Sound2SheetProcessor.from_pretrained(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for index in range(args.files):
            rate, channels = FORMATS[index % len(FORMATS)]
            mono = synthetic_piano(args.seconds_per_file, rate, seed=index)
            path = Path(tmp) / f"piece{index:03d}.flac"
            soundfile.write(path, np.stack([mono] * channels, axis=1) if channels > 1 else mono, rate)
            paths.append(path)
        start, done, warm_rss, samples = time.perf_counter(), 0, None, []
        deadline = start + args.minutes * 60
        while time.perf_counter() < deadline:
            for path in paths:
                processor.transcribe(path, model)
                done += 1
                samples.append(rss_mb())
                if time.perf_counter() >= deadline:
                    break
            if warm_rss is None:
                warm_rss = rss_mb()
        elapsed = time.perf_counter() - start
    end_rss = rss_mb()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{done} transcriptions of {args.seconds_per_file:.0f} s files in {elapsed / 60:.1f} min: {done / (elapsed / 60):.0f} files/min")
    print(f"RSS after the first pass (warm-up): {warm_rss:.0f} MB; at the end: {end_rss:.0f} MB "
          f"({(end_rss / warm_rss - 1) * 100:+.1f} %); peak {peak:.0f} MB")


if __name__ == "__main__":
    main()
