"""Package a trained run as a shippable model folder with its model card.

    python examples/package_model.py runs/sound2sheet-piano-small models/sound2sheet-piano-small \
        --quality quality.json --training-log runs/sound2sheet-piano-small/trainer_state.json

Copies the inference files of RUN (its final model, or --checkpoint) into DEST (weights as safetensors, config,
generation config, tokenizer and feature extractor), and writes the model card `DEST/README.md` (also copied to
`model_cards/<name>.md`) with the recipe (examples/train_piano_small.json), the data, the parameter count, and the
test-split results that `benchmarks/quality.py --report quality.json` measured, in the card's `model-index`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from sound2sheet import Sound2SheetForConditionalGeneration, Sound2SheetProcessor
from sound2sheet.training import write_model_card

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "examples" / "train_piano_small.json"
CORPUS_COMMAND = "python -m sound2sheet.data.synth --out data/piano-synth --hours 3 --exclude-soundfont TimGM6mb --seed 0"
MAX_WEIGHTS_MB = 40


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="training output folder (or a checkpoint folder)")
    parser.add_argument("dest", help="model folder to write")
    parser.add_argument("--quality", required=True, help="JSON report of benchmarks/quality.py --report")
    parser.add_argument("--training-summary", default="", help="free text on how long and how far it was trained")
    args = parser.parse_args()
    source, dest = Path(args.run), Path(args.dest)
    model = Sound2SheetForConditionalGeneration.from_pretrained(source).eval()
    processor = Sound2SheetProcessor.from_pretrained(source)
    if dest.exists():
        shutil.rmtree(dest)
    model.save_pretrained(dest)
    processor.save_pretrained(dest)
    size_mb = (dest / "model.safetensors").stat().st_size / 2**20
    if size_mb > MAX_WEIGHTS_MB:
        raise SystemExit(f"{dest / 'model.safetensors'}: {size_mb:.1f} MB, over the {MAX_WEIGHTS_MB} MB budget")
    quality = json.loads(Path(args.quality).read_text())
    ours = quality["summary"]["sound2sheet"]
    lines = ["| system | onset F1 | onset+offset F1 | onset+offset+velocity F1 | CPU s per audio s |", "| --- | --- | --- | --- | --- |"]
    for name, row in quality["summary"].items():
        lines.append(f"| {name} | {row['onset_f1']:.3f} | {row['onset_offset_f1']:.3f} | {row['onset_offset_velocity_f1']:.3f} "
                     f"| {row['cpu_seconds_per_audio_second']:.3f} |")
    recipe = (
        f"1. Render the corpus: `{CORPUS_COMMAND}` (music21 corpus without the reserved pieces, plus procedural piano "
        "music; FluidR3_GM and MuseScore_General for training and validation, TimGM6mb kept for the test split).\n"
        f"2. Train: `python run_transcription.py train examples/train_piano_small.json` on the CPU, fp32.\n\n"
        f"```json\n{RECIPE.read_text().strip()}\n```\n\n{args.training_summary}"
    )
    extra = ("Whole test pieces (unseen pieces, the held-out TimGM6mb soundfont, pedal and tempo variation), measured "
             "with `python benchmarks/quality.py --report quality.json`, side by side with basic-pitch on the same "
             "files:\n\n" + "\n".join(lines))
    card = write_model_card(dest, model_name=dest.name, results=ours, parameters=model.count_parameters()["total"], recipe=recipe,
                            dataset_name="sound2sheet synthetic piano corpus (data/piano-synth, test split)", extra_sections=extra)
    (REPO / "model_cards").mkdir(exist_ok=True)
    shutil.copyfile(card, REPO / "model_cards" / f"{dest.name}.md")
    print(f"{dest}: {size_mb:.1f} MB of weights, {model.count_parameters()['total'] / 1e6:.2f} M parameters; card {card}")


if __name__ == "__main__":
    main()
