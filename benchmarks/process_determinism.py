"""Whether fresh processes compute the same bits: the first torch math call of a process, and Sound2Sheet's features.

    python benchmarks/process_determinism.py [--processes 30] [--threads 2]

Starts 2 x --processes new Python processes, one after another, each with --threads torch threads, of two kinds:
- the first torch work of the process is `torch.hann_window(2048)` (the window the feature extractor used to compute
  with torch), without importing Sound2Sheet;
- the process imports Sound2Sheet and computes the feature extractor's log-mel features of a fixed 2.56 s clip.
For each kind it prints how many distinct results the processes gave, and how many processes differed from the most
common result. A training run killed and resumed in a new process ends with bit-identical weights only if every
process computes the same features.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
from pathlib import Path

WINDOW_CHILD = """
import hashlib, sys, torch
torch.set_num_threads(int(sys.argv[2]))
print(hashlib.sha1(torch.hann_window(2048).numpy().tobytes()).hexdigest())
"""

FEATURES_CHILD = """
import hashlib, sys
import numpy as np, torch
torch.set_num_threads(int(sys.argv[2]))
sys.path.insert(0, sys.argv[1])
from sound2sheet.feature_extraction_sound2sheet import Sound2SheetFeatureExtractor
t = np.arange(40960) / 16000
clip = (0.2 * np.exp(-3 * t) * np.sin(2 * np.pi * 261.63 * t)).astype(np.float32)
print(hashlib.sha1(Sound2SheetFeatureExtractor()(clip, return_tensors="np")["input_values"].tobytes()).hexdigest())
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    root = str(Path(__file__).resolve().parents[1])
    kinds = {"torch.hann_window(2048), first torch op": WINDOW_CHILD, "Sound2Sheet features of one clip": FEATURES_CHILD}
    results = {name: collections.Counter() for name in kinds}
    for _ in range(args.processes):
        for name, child in kinds.items():  # interleaved, so that both kinds meet the same machine load
            done = subprocess.run([sys.executable, "-c", child, root, str(args.threads)], capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"a child process failed:\n{done.stderr}")
            results[name][done.stdout.strip()] += 1
    print(f"{args.processes} fresh processes of each kind, {args.threads} torch thread(s) each")
    print(f"{'computed in each process':<42} {'distinct results':>16} {'processes off the most common':>30}")
    for name, counts in results.items():
        print(f"{name:<42} {len(counts):>16} {args.processes - counts.most_common(1)[0][1]:>30}")


if __name__ == "__main__":
    main()
