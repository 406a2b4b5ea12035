"""Decoding speed with and without the KV cache, and encoder time per window.

    python benchmarks/model_speed.py [--repeats 5] [--lengths 64 256 512] [--threads 2]

Prints, for the default architecture (4-layer, 256-wide decoder; compact AST encoder at the default patching):
greedy tokens/s with and without the cache at each generated length (median of --repeats, measured side by side in
one run) with their ratio, and the encoder forward time for one 2.56 s window in fp32 and bf16 autocast.
The weights are random: speed does not depend on them (decoding is forced to run exactly N steps).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sound2sheet import Sound2SheetConfig, Sound2SheetForConditionalGeneration


def median_seconds(function, repeats: int) -> float:
    function()  # warm-up: allocator, kernels, lazy initialisation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = Sound2SheetConfig(num_decoder_layers=4, hidden_size=256, max_target_positions=max(1024, max(args.lengths) + 1))
    model = Sound2SheetForConditionalGeneration(config).eval()
    frames, mels = config.encoder_config.max_length, config.encoder_config.num_mel_bins
    features = torch.randn(1, frames, mels)
    print(f"model: {model.count_parameters()['total'] / 1e6:.2f} M parameters, decoder {config.num_decoder_layers} layers x "
          f"{config.hidden_size} wide, encoder grid {config.encoder_grid} tokens; threads={args.threads}, "
          f"median of {args.repeats}")

    with torch.inference_mode():
        encoder_outputs = model.get_encoder()(features)

        def decode(length: int, use_cache: bool):
            return lambda: model.generate(
                encoder_outputs=encoder_outputs, decoder_input_ids=torch.full((1, 1), config.decoder_start_token_id),
                max_new_tokens=length, min_new_tokens=length, use_cache=use_cache, do_sample=False,
            )

        print(f"{'tokens':>7} {'cached tok/s':>13} {'uncached tok/s':>15} {'ratio':>7}")
        for length in args.lengths:
            cached = median_seconds(decode(length, True), args.repeats)
            uncached = median_seconds(decode(length, False), args.repeats)
            print(f"{length:>7} {length / cached:>13.1f} {length / uncached:>15.1f} {uncached / cached:>6.1f}x")

        encoder = model.get_encoder()
        fp32 = median_seconds(lambda: encoder(features), args.repeats)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = median_seconds(lambda: encoder(features), args.repeats)
        print(f"encoder forward, one {frames * 0.01:.2f} s window: fp32 {fp32 * 1e3:.1f} ms, bf16 autocast {bf16 * 1e3:.1f} ms "
              f"({fp32 / bf16:.2f}x)")


if __name__ == "__main__":
    main()
