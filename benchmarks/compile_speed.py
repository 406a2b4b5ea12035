"""Does `torch.compile` pay off for transcription on this CPU? Greedy transcription of the bundled example, eager
against compiled, side by side in one process.

    python benchmarks/compile_speed.py [--model models/sound2sheet-piano-small] [--threads 2] [--repeats 5]

Variants: "eager"; "encoder compiled" (`torch.compile` of the encoder, whose input shape is fixed per batch size);
"decoder compiled" (`torch.compile(dynamic=True)` of the note decoder, whose sequence and cache lengths change every
step). Each variant is warmed up on the example (compilation happens there, and its time is printed), then timed
`--repeats` times, in turn with the others so drifts of this shared machine hit them alike; medians are printed with
the ratio to eager. The notes must be the same as eager's: a variant that changes them is reported as such.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from sound2sheet import Sound2SheetForConditionalGeneration, Sound2SheetProcessor

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "example_piano.flac"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "sound2sheet-piano-small"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    processor = Sound2SheetProcessor.from_pretrained(args.model)

    def load():
        return Sound2SheetForConditionalGeneration.from_pretrained(args.model).eval()

    variants = {"eager": load()}
    compiled_encoder = load()
    compiled_encoder.model.encoder = torch.compile(compiled_encoder.model.encoder)
    variants["encoder compiled"] = compiled_encoder
    compiled_decoder = load()
    compiled_decoder.model.decoder = torch.compile(compiled_decoder.model.decoder, dynamic=True)
    variants["decoder compiled"] = compiled_decoder

    def transcribe(model):
        return processor.transcribe(str(EXAMPLE), model, batch_size=args.batch_size, bf16=False)

    reference, warm_up, failed = None, {}, {}
    for name, model in list(variants.items()):
        start = time.perf_counter()
        try:
            notes = transcribe(model)
        except Exception as err:  # a backend that cannot compile this model on this machine
            failed[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
            del variants[name]
            continue
        warm_up[name] = time.perf_counter() - start
        if reference is None:
            reference = notes
        elif notes != reference:
            failed[name] = "notes differ from eager's"
    seconds = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, model in variants.items():
            start = time.perf_counter()
            transcribe(model)
            seconds[name].append(time.perf_counter() - start)
    eager = statistics.median(seconds["eager"])
    print(f"{EXAMPLE.name}, greedy, batch {args.batch_size}, {args.threads} threads, median of {args.repeats} (wall s)")
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"  {name:<18} {median:7.3f} s   {eager / median:5.2f}x eager   first run (compiling) {warm_up[name]:6.1f} s")
    for name, why in failed.items():
        print(f"  {name:<18} not usable: {why}")


if __name__ == "__main__":
    main()
