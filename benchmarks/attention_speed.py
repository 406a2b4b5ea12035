"""Attention of one decoding step on the CPU: bfloat16 against float32, and the cache write of a continuous-batching step.

    python benchmarks/attention_speed.py [--rows 24] [--repeats 5] [--threads 1]

For the decoder's shapes (`--rows` windows, 4 heads of 64, one query each) it times
`F.scaled_dot_product_attention` on bfloat16 inputs, as CPU autocast runs it, against casting the inputs to float32
and back (`sound2sheet.modeling_sound2sheet.attend`), over self-attention caches of 64 to 512 keys and the 61-column
cross-attention memory of the shipped model; and the write of each row's new key at its own position into a pool
cache (`PoolLayer.update`) by `scatter_` against indexing. It also prints each variant's largest error against a
float64 reference. Medians of --repeats timings of 200 calls each, after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sound2sheet.modeling_sound2sheet import attend


def per_call_ms(fn, repeats: int, calls: int = 200) -> float:
    for _ in range(10):
        fn()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        timings.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(timings)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    heads, size = 4, 64
    print(f"{args.rows} rows x {heads} heads x 1 query, head size {size}, {args.threads} thread(s); ms per call (median of {args.repeats})")
    print(f"{'keys':>12}  {'bf16 sdpa':>10}  {'attend':>8}  {'speed-up':>8}  {'bf16 err':>9}  {'attend err':>10}")
    with torch.inference_mode():
        for keys_count, label in ((64, "64"), (128, "128"), (256, "256"), (512, "512"), (61, "61 (cross)")):
            query, keys, values = (
                torch.randn(args.rows, heads, length, size, generator=generator).bfloat16()
                for length in (1, keys_count, keys_count)
            )
            mask = torch.rand(args.rows, 1, 1, keys_count, generator=generator) > 0.2
            mask[..., 0] = True
            plain = per_call_ms(lambda: F.scaled_dot_product_attention(query, keys, values, attn_mask=mask), args.repeats)
            ours = per_call_ms(lambda: attend(query, keys, values, mask, 0.0, False), args.repeats)
            reference = F.scaled_dot_product_attention(query.double(), keys.double(), values.double(), attn_mask=mask)
            plain_error = (F.scaled_dot_product_attention(query, keys, values, attn_mask=mask).double() - reference).abs().max()
            our_error = (attend(query, keys, values, mask, 0.0, False).double() - reference).abs().max()
            print(f"{label:>12}  {plain:>10.3f}  {ours:>8.3f}  {plain / ours:>7.2f}x  {plain_error:>9.2e}  {our_error:>10.2e}")
        print("\ncache write of one key per row at its own position (keys 256 wide), ms per call")
        for dtype in (torch.float32, torch.bfloat16):
            cache = torch.zeros(args.rows, heads, 256, size, dtype=dtype)
            new = torch.randn(args.rows, heads, 1, size, generator=generator).to(dtype)
            positions = torch.randint(0, 256, (args.rows,), generator=generator)
            index = positions[:, None, None, None].expand(-1, heads, 1, size)
            rows = torch.arange(args.rows)
            scatter = per_call_ms(lambda: cache.scatter_(2, index, new), args.repeats)
            indexing = per_call_ms(lambda: cache.__setitem__((rows, slice(None), positions), new[:, :, 0]), args.repeats)
            print(f"{str(dtype).split('.')[-1]:>12}  scatter_ {scatter:.3f}  indexing {indexing:.3f}  ({scatter / indexing:.1f}x)")


if __name__ == "__main__":
    main()
