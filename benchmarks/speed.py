"""Transcription speed on this CPU: CPU seconds per audio second, realtime factor and peak memory, for each decoding
strategy and thread count, with basic-pitch 0.4.0 on the same files in the same run when it is installed.

    python benchmarks/speed.py [--model models/sound2sheet-piano-small] [--threads 1 2] [--repeats 3]
                               [--strategies greedy beam sample] [--long-seconds 300]
                               [--bf16 auto|on|encoder|off ...]
                               [--encode-ahead auto|on|off] [--no-basic-pitch]

Files: the bundled example (examples/example_piano.flac) and a long piece of `--long-seconds` made by joining the
recordings of a manifest split end to end (default: the test split of data/piano-synth, unseen pieces on the held-out
soundfont); without that corpus, the bundled example repeated. Real piano music matters here: decoding time grows
with the number of notes.

Every (system, file, threads) runs in a fresh process, so its peak resident memory ("peak MB", the largest of its
strategies, usually beam search) is its own. Inside it, one
untimed transcription of the bundled example warms up, then each strategy transcribes the file `--repeats` times;
the medians are printed. With several `--bf16` settings, Sound2Sheet runs once per setting, side by side, and
each setting's greedy CPU time is printed as a ratio of the first's. "CPU s/audio s" is the process's CPU time (all
threads) per second of audio, "x realtime" is audio seconds per wall-clock second. Ratios against basic-pitch and of beam against greedy come from the same run.
basic-pitch runs through its ONNX model with onnxruntime limited to the same thread count
(`pip install --no-deps basic-pitch==0.4.0 librosa resampy scikit-learn onnxruntime`).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile

from sound2sheet.processing_sound2sheet import cpu_has_fast_bf16

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import BF16_CHOICES, basic_pitch_system  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "example_piano.flac"
AHEAD_CHOICES = {"auto": None, "on": True, "off": False}
RATE = 16000  # the long file is written at the model's rate: its resampling is not what is measured


def long_piece(seconds: float, manifest_dir: str, split: str, folder: Path) -> tuple[Path, str]:
    """A mono 16 kHz WAV of `seconds`: the split's recordings joined end to end (or the bundled example repeated)."""
    from sound2sheet.feature_extraction_sound2sheet import load_audio

    sources, origin = [], f"{split} split of {manifest_dir}"
    if (Path(manifest_dir) / split / "manifest.json").is_file():
        from sound2sheet.data import load_manifest_dataset

        sources = [example["audio_path"] for example in load_manifest_dataset(manifest_dir, split=split)]
    if not sources:
        sources, origin = [str(EXAMPLE)], f"{EXAMPLE.name} repeated (no {split} split in {manifest_dir})"
    parts, total, wanted = [], 0, int(seconds * RATE)
    while total < wanted:
        for source in sources:
            samples = load_audio(source, sampling_rate=RATE)
            parts.append(samples[: wanted - total])
            total += len(parts[-1])
            if total >= wanted:
                break
    path = folder / f"long_{int(seconds)}s.wav"
    soundfile.write(path, np.concatenate(parts), RATE, subtype="FLOAT")
    return path, origin


def child(spec: dict) -> dict:
    """Runs in a fresh process: warm up, then time each strategy on one file; returns medians and the peak RSS."""
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["system"] == "basic-pitch":
        transcribe_with = {"basic-pitch": basic_pitch_system(threads=spec["threads"])}
    else:
        from sound2sheet import Sound2SheetForConditionalGeneration, Sound2SheetProcessor
        from sound2sheet.processing_sound2sheet import strategy_generate_kwargs

        model = Sound2SheetForConditionalGeneration.from_pretrained(spec["model"]).eval()
        processor = Sound2SheetProcessor.from_pretrained(spec["model"])

        def make(strategy):
            kwargs = strategy_generate_kwargs(strategy)

            def transcribe(path):
                torch.manual_seed(0)  # the same samples every run
                return processor.transcribe(path, model, batch_size=spec["batch_size"] or None, bf16=spec["bf16"],
                                            encode_ahead=spec["encode_ahead"], **kwargs)

            return transcribe

        transcribe_with = {strategy: make(strategy) for strategy in spec["strategies"]}
    results = {}
    for name, transcribe in transcribe_with.items():
        transcribe(str(EXAMPLE))  # warm-up (lazy initialisation, allocator)
        cpu, wall = [], []
        for _ in range(spec["repeats"]):
            cpu_start, wall_start = time.process_time(), time.perf_counter()
            notes = transcribe(spec["audio"])
            cpu.append(time.process_time() - cpu_start)
            wall.append(time.perf_counter() - wall_start)
        results[name] = {"cpu": statistics.median(cpu), "wall": statistics.median(wall), "notes": len(notes)}
    return {"results": results, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(spec: dict) -> dict:
    process = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if process.returncode != 0:
        raise SystemExit(f"benchmark child failed ({spec['system']}, {spec['audio']}):\n{process.stderr[-2000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "sound2sheet-piano-small"))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--strategies", nargs="+", default=["greedy", "beam", "sample"], choices=["greedy", "beam", "sample"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=0, help="windows decoded together (0: the library's default)")
    parser.add_argument("--long-seconds", type=float, default=300.0, help="length of the long piece (0: skip it)")
    parser.add_argument("--manifest-dir", default=str(REPO / "data" / "piano-synth"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--bf16", nargs="+", choices=sorted(BF16_CHOICES), default=["auto"],
                        help="bfloat16 autocast for Sound2Sheet: on (encoder and decoder), encoder (only), off; auto: as "
                             "transcribe decides (the encoder only, exactly with AMX/AVX512-BF16). Several: side by side")
    parser.add_argument("--encode-ahead", choices=sorted(AHEAD_CHOICES), default="auto",
                        help="encode windows in a background thread while others decode (auto: the library's default)")
    parser.add_argument("--no-basic-pitch", action="store_true", help="skip basic-pitch even when installed")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.bf16 = list(dict.fromkeys(args.bf16))  # each setting once, in the order given
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if not Path(args.model, "config.json").is_file():
        raise SystemExit(f"--model {args.model}: no Sound2Sheet model folder there (train one: see README.md, 'The model')")
    if min(args.threads) < 1 or args.repeats < 1:
        raise SystemExit("--threads and --repeats must be at least 1")
    systems = ["sound2sheet"]
    if not args.no_basic_pitch and basic_pitch_system(threads=1) is not None:
        systems.append("basic-pitch")
    else:
        print("basic-pitch is not installed (or --no-basic-pitch): only Sound2Sheet is measured")

    with tempfile.TemporaryDirectory() as folder:
        files = [(EXAMPLE, f"bundled example ({EXAMPLE.name})")]
        if args.long_seconds > 0:
            path, origin = long_piece(args.long_seconds, args.manifest_dir, args.split, Path(folder))
            files.append((path, f"{args.long_seconds:g} s piece: {origin}"))
        auto = "encoder" if cpu_has_fast_bf16() else "off"
        settings = ", ".join(f"{name} ({auto})" if name == "auto" else name for name in args.bf16)
        print(f"model {args.model}; batch size {args.batch_size or 'default (pool of 16 greedy, 48 sample, 32 beam)'}; bf16 autocast {settings}; "
              f"encode ahead {args.encode_ahead}; "
              f"medians of {args.repeats} runs after a warm-up")
        for path, label in files:
            seconds = soundfile.info(str(path)).duration
            print(f"\n{label}, {seconds:.1f} s")
            print(f"{'system':<24}{'threads':>8}{'CPU s/audio s':>15}{'x realtime':>12}{'notes':>7}{'peak MB':>9}")
            for threads in args.threads:
                rows = {}  # (system, bf16 setting) -> strategy -> result
                runs = [("sound2sheet", bf16) for bf16 in args.bf16] + [(system, None) for system in systems[1:]]
                for system, bf16 in runs:
                    spec = {"system": system, "model": args.model, "audio": str(path), "threads": threads,
                            "strategies": args.strategies, "repeats": args.repeats, "batch_size": args.batch_size,
                            "bf16": BF16_CHOICES[bf16 or "auto"], "encode_ahead": AHEAD_CHOICES[args.encode_ahead]}
                    measured = run_child(spec)
                    rows[system, bf16] = measured["results"]
                    for name, result in measured["results"].items():
                        label_name = name if system == "basic-pitch" else f"sound2sheet {name}"
                        if len(args.bf16) > 1 and bf16 is not None:
                            label_name += f" [{bf16}]"
                        print(f"{label_name:<24}{threads:>8}{result['cpu'] / seconds:>15.4f}{seconds / result['wall']:>12.1f}"
                              f"{result['notes']:>7}{measured['peak_mb']:>9.0f}")
                basic_pitch = rows.get(("basic-pitch", None), {}).get("basic-pitch")
                first = rows["sound2sheet", args.bf16[0]].get("greedy")
                for bf16 in args.bf16:
                    ours, ratios = rows["sound2sheet", bf16], []
                    if "greedy" in ours and "beam" in ours:
                        ratios.append(f"beam(4)/greedy CPU {ours['beam']['cpu'] / ours['greedy']['cpu']:.2f}x")
                    if "greedy" in ours and basic_pitch:
                        ratios.append(f"greedy/basic-pitch CPU {ours['greedy']['cpu'] / basic_pitch['cpu']:.2f}x")
                    if "greedy" in ours and bf16 != args.bf16[0]:
                        ratios.append(f"greedy CPU vs --bf16 {args.bf16[0]} {ours['greedy']['cpu'] / first['cpu']:.2f}x")
                    if ratios:
                        prefix = f"[{bf16}]" if len(args.bf16) > 1 else ""
                        print(f"{prefix:<24}{threads:>8}  " + ", ".join(ratios))


if __name__ == "__main__":
    main()
