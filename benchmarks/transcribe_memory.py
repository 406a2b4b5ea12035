"""Peak memory of `Sound2SheetProcessor.transcribe` on short and long audio: it should not grow with the length.

    python benchmarks/transcribe_memory.py [--model models/...] [--seconds 30 600] [--batch-size N] [--encode-ahead auto|on|off]

Each length runs in a fresh process (peak RSS is per process): the script writes a 44.1 kHz stereo FLAC of that
length, loads the model, notes the resident set size, transcribes, and prints the peak resident set size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from feature_speed import synthetic_piano  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
AHEAD = {"auto": None, "on": True, "off": False}
CHILD = """
import json, resource, sys
import torch
from sound2sheet import Sound2SheetForConditionalGeneration, Sound2SheetProcessor
model_dir, audio, batch_size, encode_ahead = sys.argv[1], sys.argv[2], (int(sys.argv[3]) or None), json.loads(sys.argv[4])
torch.set_num_threads(2)
model = Sound2SheetForConditionalGeneration.from_pretrained(model_dir).eval()
processor = Sound2SheetProcessor.from_pretrained(model_dir)
processor.transcribe(audio, model, batch_size=batch_size, encode_ahead=encode_ahead)  # warm-up on the same file would double the time: one pass
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "sound2sheet-piano-small"))
    parser.add_argument("--seconds", type=float, nargs="+", default=[30.0, 600.0])
    parser.add_argument("--batch-size", type=int, default=0, help="windows decoded together (0: the library's default)")
    parser.add_argument("--encode-ahead", choices=sorted(AHEAD), default="auto",
                        help="encode the next batch in a background thread while one decodes (auto: the library's default)")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seconds in args.seconds:
            path = Path(tmp) / f"{seconds:.0f}s.flac"
            with soundfile.SoundFile(path, "w", 44100, 2, subtype="PCM_16") as out:
                for start in np.arange(0, seconds, 60.0):
                    chunk = synthetic_piano(min(60.0, seconds - start), 44100, seed=int(start))
                    out.write(np.stack([chunk, chunk], axis=1))
            run = subprocess.run([sys.executable, "-c", CHILD, args.model, str(path), str(args.batch_size),
                                  json.dumps(AHEAD[args.encode_ahead])], capture_output=True, text=True, check=True)
            results[seconds] = json.loads(run.stdout.strip().splitlines()[-1])["peak_mb"]
            print(f"{seconds:>6.0f} s of audio: peak RSS {results[seconds]:.0f} MB")
    if len(results) >= 2:
        lengths = sorted(results)
        growth = results[lengths[-1]] / results[lengths[0]] - 1
        print(f"peak memory {lengths[-1]:.0f} s vs {lengths[0]:.0f} s: {growth * 100:+.1f} % (model {args.model}, batch {args.batch_size or 'default'}, encode ahead {args.encode_ahead})")


if __name__ == "__main__":
    main()
