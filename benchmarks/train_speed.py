"""Training throughput of the default architecture on this CPU, fp32 and bf16 autocast.

    python benchmarks/train_speed.py [--batch-size 8] [--steps 5] [--target-tokens 200]

Times full training steps (forward, loss, backward, AdamW step) on random features with label sequences of
--target-tokens tokens (about a dense 2.56 s window of piano), median of --steps after a warm-up step, and prints
windows per second and the time one epoch over 1 hour of audio (1407 windows of 2.56 s) would take.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sound2sheet import Sound2SheetConfig, Sound2SheetForConditionalGeneration

WINDOWS_PER_HOUR = int(3600 / 2.56)


def step_seconds(model, optimizer, batch, bf16: bool, steps: int) -> float:
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--target-tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = Sound2SheetConfig()
    model = Sound2SheetForConditionalGeneration(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = {
        "input_values": torch.randn(args.batch_size, config.encoder_config.max_length, config.encoder_config.num_mel_bins),
        "labels": torch.randint(4, config.vocab_size, (args.batch_size, args.target_tokens)),
    }
    print(f"default architecture: {model.count_parameters()['total'] / 1e6:.2f} M parameters, batch {args.batch_size}, "
          f"{args.target_tokens} target tokens, {args.threads} threads, median of {args.steps} steps")
    for name, bf16 in (("fp32", False), ("bf16", True)):
        seconds = step_seconds(model, optimizer, batch, bf16, args.steps)
        rate = args.batch_size / seconds
        print(f"{name}: {seconds:.2f} s/step = {rate:.2f} windows/s; one epoch over 1 h of audio "
              f"({WINDOWS_PER_HOUR} windows): {WINDOWS_PER_HOUR / rate / 60:.1f} min")


if __name__ == "__main__":
    main()
