"""Does an exported ONNX encoder pay off on this CPU? The encoder on a batch of windows in PyTorch (float32, and
bfloat16 autocast as `transcribe` runs it where the CPU computes bfloat16 natively) against onnxruntime (float32).

    python benchmarks/onnx_speed.py [--model models/sound2sheet-piano-small] [--threads 1] [--windows 2] [--repeats 15]

Needs `pip install onnx onnxscript` (for `torch.onnx.export(dynamo=True)`) and onnxruntime. The encoder is exported
once with a dynamic batch size, checked against PyTorch's float32 output (largest difference printed), then each
variant runs `--repeats` times, in turn with the others so drifts of this shared machine hit them alike; medians are
printed with the ratio to PyTorch float32. The encoder is where the matrix work of transcription is; the decoder's
steps are small and read a cache that grows every step, which an exported graph would have to take as inputs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sound2sheet import Sound2SheetForConditionalGeneration

REPO = Path(__file__).resolve().parent.parent


class EncoderOutput(torch.nn.Module):
    """The encoder's last hidden state as a plain tensor, for export."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_values).last_hidden_state


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "sound2sheet-piano-small"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--windows", type=int, default=2, help="windows per encoder call (transcribe uses 2)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise SystemExit(f"{err.name} is not installed: pip install onnx onnxscript onnxruntime") from None
    torch.set_num_threads(args.threads)
    model = Sound2SheetForConditionalGeneration.from_pretrained(args.model).eval()
    encoder = EncoderOutput(model.get_encoder()).eval()
    frames, mel_bins = model.get_encoder().expected_shape
    inputs = torch.randn(args.windows, frames, mel_bins, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "encoder.onnx"
        start = time.perf_counter()
        torch.onnx.export(encoder, (inputs,), str(path), dynamo=True,
                          dynamic_shapes={"input_values": {0: torch.export.Dim("batch", min=1, max=64)}})
        export_seconds = time.perf_counter() - start
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    feed = {name: inputs.numpy()}

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return encoder(inputs)

    variants = {"pytorch float32": lambda: encoder(inputs), "pytorch bfloat16 autocast": bf16,
                "onnxruntime float32": lambda: session.run(None, feed)}
    timings = {label: [] for label in variants}
    with torch.inference_mode():
        reference = encoder(inputs)
        difference = (torch.from_numpy(session.run(None, feed)[0]) - reference).abs().max().item()
        for run in variants.values():  # warm-up
            run()
        for _ in range(args.repeats):
            for label, run in variants.items():
                start = time.perf_counter()
                run()
                timings[label].append(time.perf_counter() - start)
    print(f"model {args.model}; encoder on {args.windows} window(s), {args.threads} thread(s); exported in "
          f"{export_seconds:.1f} s; onnxruntime {onnxruntime.__version__} vs PyTorch float32: largest difference {difference:.1e}")
    base = statistics.median(timings["pytorch float32"])
    for label, values in timings.items():
        median = statistics.median(values)
        print(f"{label:<28}{median * 1e3:>9.1f} ms  {base / median:>5.2f}x pytorch float32's speed")


if __name__ == "__main__":
    main()
