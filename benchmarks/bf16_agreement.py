"""How closely bfloat16 autocast transcribes like float32: the notes of one are scored against the other's.

    python benchmarks/bf16_agreement.py [--model models/sound2sheet-piano-small] [--audio FILE ...] [--threads 2]

For each file (default: the bundled example), transcribes greedily in float32 and under bfloat16 autocast, for the
encoder only (`bf16="encoder"`, the default where the CPU computes bfloat16 natively) and for the whole model
(`bf16=True`), with the notes placed on the frame head (the default) and with the decoder's own times
(`refine_notes=False`), and prints the onset F1 and onset+offset F1 (mir_eval) of the bf16 notes against the fp32
ones, with both note counts. 1.0 means the same notes. On a CPU without AMX or AVX512-BF16, PyTorch emulates
bfloat16: the figures hold, the speed does not.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sound2sheet import Sound2SheetForConditionalGeneration, Sound2SheetProcessor
from sound2sheet.metrics import note_metrics
from sound2sheet.processing_sound2sheet import BF16_ENCODER

REPO = Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "sound2sheet-piano-small"))
    parser.add_argument("--audio", nargs="+", default=[str(REPO / "examples" / "example_piano.flac")])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = Sound2SheetForConditionalGeneration.from_pretrained(args.model).eval()
    processor = Sound2SheetProcessor.from_pretrained(args.model)
    placements = {"frame head": None, "decoder times": False} if model.has_frame_head else {"decoder times": False}
    print(f"model {args.model}; greedy; bf16 notes scored against fp32 notes")
    print(f"{'file':<28}{'note times':<16}{'bf16 for':<10}{'fp32 notes':>12}{'bf16 notes':>12}{'onset F1':>10}"
          f"{'onset+offset F1':>17}")
    for path in args.audio:
        for name, refine in placements.items():
            fp32 = processor.transcribe(path, model, bf16=False, refine_notes=refine)
            for part, bf16 in (("encoder", BF16_ENCODER), ("all", True)):
                notes = processor.transcribe(path, model, bf16=bf16, refine_notes=refine)
                scores = note_metrics(fp32, notes)
                print(f"{Path(path).name:<28}{name:<16}{part:<10}{len(fp32):>12}{len(notes):>12}{scores['onset_f1']:>10.3f}"
                      f"{scores['onset_offset_f1']:>17.3f}")


if __name__ == "__main__":
    main()
