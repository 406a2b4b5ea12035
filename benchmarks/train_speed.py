"""Training throughput of the default architecture on this CPU, fp32 and bf16 autocast.

    python benchmarks/train_speed.py [--batch-size 8] [--steps 5] [--target-tokens 200] [--variants]

Times full training steps (forward, loss, backward, AdamW step) on random features with label sequences of
--target-tokens tokens (about a dense 2.56 s window of piano), median of --steps after a warm-up step, and prints
windows per second and the time one epoch over 1 hour of audio (1407 windows of 2.56 s) would take.
With --variants, also times (side by side in the same run, fp32, or bf16 autocast with --variants-bf16) the compact
candidates for the default model. bf16 only pays off on CPUs with AMX or AVX512-BF16; elsewhere it is emulated and
much slower than fp32.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sound2sheet import Sound2SheetConfig, Sound2SheetForConditionalGeneration

WINDOWS_PER_HOUR = int(3600 / 2.56)
# Compact candidates for the shipped model: config overrides (encoder sizes go to the nested ASTConfig).
VARIANTS = {
    "default (enc 256x4 t20ms, dec 256x4)": {},
    "enc 256x4 t40ms, dec 256x4": {"encoder": {"time_stride": 4}},
    "enc 192x4 t20ms, dec 256x3": {"encoder": {"hidden_size": 192, "num_attention_heads": 3, "intermediate_size": 768}, "num_decoder_layers": 3},
    "enc 192x4 t40ms, dec 256x3": {"encoder": {"hidden_size": 192, "num_attention_heads": 3, "intermediate_size": 768, "time_stride": 4}, "num_decoder_layers": 3},
    "enc 256x6 t40ms, dec 256x4": {"encoder": {"num_hidden_layers": 6, "time_stride": 4}},
}


def variant_config(overrides: dict) -> Sound2SheetConfig:
    overrides = dict(overrides)
    encoder = {**Sound2SheetConfig().encoder_config.to_dict(), **overrides.pop("encoder", {})}
    return Sound2SheetConfig(encoder_config=encoder, **overrides)


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
    parser.add_argument("--variants", action="store_true", help="also time the compact candidate architectures")
    parser.add_argument("--variants-bf16", action="store_true", help="time the candidates under bf16 autocast")
    parser.add_argument("--skip-default", action="store_true", help="do not time the default architecture first")
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
    for name, bf16 in () if args.skip_default else (("fp32", False), ("bf16", True)):
        seconds = step_seconds(model, optimizer, batch, bf16, args.steps)
        rate = args.batch_size / seconds
        print(f"{name}: {seconds:.2f} s/step = {rate:.2f} windows/s; one epoch over 1 h of audio "
              f"({WINDOWS_PER_HOUR} windows): {WINDOWS_PER_HOUR / rate / 60:.1f} min")
    if not args.variants:
        return
    print(f"candidates, {'bf16' if args.variants_bf16 else 'fp32'}:")
    for name, overrides in VARIANTS.items():
        torch.manual_seed(0)
        candidate = Sound2SheetForConditionalGeneration(variant_config(overrides)).train()
        seconds = step_seconds(candidate, torch.optim.AdamW(candidate.parameters(), lr=1e-4), batch, args.variants_bf16, args.steps)
        print(f"  {name}: {candidate.count_parameters()['total'] / 1e6:.2f} M parameters, "
              f"{args.batch_size / seconds:.2f} windows/s")


if __name__ == "__main__":
    main()
