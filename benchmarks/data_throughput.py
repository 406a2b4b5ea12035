"""Training-example throughput of the data pipeline, next to what a training step consumes.

    python benchmarks/data_throughput.py [--dataset DATASET] [--batch-size 8] [--batches 30] [--repeats 3]

Without --dataset it renders a small synthetic dataset first (needs FluidSynth). Prints windows per second delivered
by a torch DataLoader over `WindowDataset` (random windows, augmentation on) with 0 and 2 workers (median of --repeats),
and the windows per second one bf16 training step of the default architecture consumes, with their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from sound2sheet import Sound2SheetConfig, Sound2SheetFeatureExtractor, Sound2SheetForConditionalGeneration, Sound2SheetTokenizer
from sound2sheet.data import Augmentation, Sound2SheetDataCollator, WindowDataset, load_manifest_dataset, pieces_from_dataset


def loader_rate(dataset, batch_size: int, batches: int, workers: int) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         collate_fn=Sound2SheetDataCollator(), persistent_workers=False)
    start, seen = time.perf_counter(), 0
    for index, batch in enumerate(loader):
        seen += batch["input_values"].shape[0]
        if index + 1 >= batches:
            break
    return seen / (time.perf_counter() - start)


def step_rate(dataset, batch_size: int, steps: int = 5) -> float:
    model = Sound2SheetForConditionalGeneration(Sound2SheetConfig()).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = Sound2SheetDataCollator()([dataset[i % len(dataset)] for i in range(batch_size)])
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dataset_dir = args.dataset
        if dataset_dir is None:
            from sound2sheet.data.synth import available_soundfonts, plan_jobs, render_corpus

            dataset_dir = f"{tmp}/data"
            render_corpus(dataset_dir, plan_jobs(0.1, seed=0, soundfonts=list(available_soundfonts()), max_piece_seconds=30,
                                                 val_fraction=0.1, test_fraction=0.0), workers=2, progress=False)
        pieces = pieces_from_dataset(load_manifest_dataset(dataset_dir, "train", cache_dir=f"{tmp}/cache"))
        windows = WindowDataset(pieces, Sound2SheetFeatureExtractor(), Sound2SheetTokenizer(), train=True,
                                windows_per_piece=16, augment=Augmentation())
        rates = {}
        for workers in (0, 2):
            rates[workers] = statistics.median(loader_rate(windows, args.batch_size, args.batches, workers) for _ in range(args.repeats))
            print(f"data pipeline, {workers} workers: {rates[workers]:.1f} windows/s")
        consumed = step_rate(windows, args.batch_size)
        print(f"one bf16 training step of the default model (batch {args.batch_size}, 2 threads): {consumed:.1f} windows/s")
        print(f"ratio, data / training: {rates[0] / consumed:.1f}x with 0 workers, {rates[2] / consumed:.1f}x with 2 workers")


if __name__ == "__main__":
    main()
