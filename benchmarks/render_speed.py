"""Synthetic corpus rendering speed.

    python benchmarks/render_speed.py [--hours 0.05] [--repeats 3]

Renders the same small plan (music21 + procedural pieces, all installed soundfonts) into fresh folders with 1 and 2
worker processes and prints audio hours rendered per wall-clock hour (median of --repeats) for each.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from sound2sheet.data.synth import available_soundfonts, plan_jobs, render_corpus


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-piece-seconds", type=float, default=30.0)
    args = parser.parse_args()
    jobs = plan_jobs(args.hours, seed=0, soundfonts=list(available_soundfonts()), max_piece_seconds=args.max_piece_seconds)
    for workers in (1, 2):
        speeds = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                by_split = render_corpus(tmp, jobs, workers=workers, progress=False)
                elapsed = time.perf_counter() - start
            audio_hours = sum(entry["duration"] for entries in by_split.values() for entry in entries) / 3600
            speeds.append(audio_hours / (elapsed / 3600))
        print(f"{workers} worker(s): {statistics.median(speeds):.0f} audio hours per wall hour "
              f"({len(jobs)} pieces, {audio_hours * 60:.1f} min of audio, median of {args.repeats})")


if __name__ == "__main__":
    main()
