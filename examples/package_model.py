"""Package a trained run as a shippable model folder with its model card.

    python examples/package_model.py runs/piano-small-stage10 models/sound2sheet-piano-small \
        --quality quality.json --training-summary "..."

Copies the inference files of RUN (a run's final model, a checkpoint folder, or a folder written by
`run_transcription.py fit-offsets`) into DEST (weights as safetensors, config, generation config, tokenizer and feature
extractor), with the frame head that places the notes and any offset refiner, and writes the
model card `DEST/README.md` (also copied to `model_cards/<name>.md`) with the fourteen-stage recipe
(examples/train_piano_small.json, then _stage2.json to _stage14.json, stage 14 starting from the average of stage 13's
last checkpoints, `AVERAGE_COMMANDS`), the data, the parameter count, and the
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
RECIPES = tuple(REPO / "examples" / f"train_piano_small{suffix}.json" for suffix in ("", *(f"_stage{n}" for n in range(2, 15))))


def corpus_command(out: str, hours: int, soundfonts: str, programs: str = "", synths: str = "", envelope_spread: int = 0,
                   seed: int = 0, splits: str = "") -> str:
    """The renderer's command for one of the recipe's corpora. The soundfonts are named: the plan spreads train and
    val pieces over those given (by default, every installed one); so are the General MIDI programs, when not only the
    grand piano, the synthesizers, when not only FluidSynth, the envelope spread, when not 0, and the splits rendered,
    when not all three."""
    return (f"python -m sound2sheet.data.synth --out {out} --hours {hours} --exclude-soundfont TimGM6mb --seed {seed} "
            f"--soundfonts {soundfonts}" + (f" --programs {programs}" if programs else "")
            + (f" --synths {synths}" if synths else "") + (f" --envelope-spread {envelope_spread}" if envelope_spread else "")
            + (f" --splits {splits}" if splits else ""))


CORPUS_COMMAND = corpus_command("data/piano-synth", 3, "FluidR3_GM,MuseScore_General,TimGM6mb")
CORPUS_V2_COMMAND = corpus_command("data/piano-synth-v2", 6, "FluidR3_GM,MuseScore_General,TimGM6mb,sf_GMbank")
CORPUS_V3_COMMAND = corpus_command("data/piano-synth-v3", 12, "FluidR3_GM,MuseScore_General,TimGM6mb,sf_GMbank")
CORPUS_V4_COMMAND = corpus_command("data/piano-synth-v4", 24, "FluidR3_GM,MuseScore_General,TimGM6mb,sf_GMbank", "0,1,2,3")
CORPUS_V5_COMMAND = corpus_command("data/piano-synth-v5", 24, "FluidR3_GM,MuseScore_General,TimGM6mb,sf_GMbank", "0,1,2,3",
                                   "fluidsynth,timidity")
CORPUS_V6_COMMAND = corpus_command("data/piano-synth-v6", 24, "FluidR3_GM,MuseScore_General,TimGM6mb,sf_GMbank", "0,1,2,3",
                                   "fluidsynth,timidity", 1200)
CORPUS_V7_COMMAND = corpus_command("data/piano-synth-v7", 24, "FluidR3_GM,MuseScore_General,TimGM6mb,sf_GMbank", "0,1,2,3",
                                   "fluidsynth,timidity", 2400)
# The offset refiner's corpus: the training pieces of another plan (seed 31), rendered as v7's; and the command that fits
# the refiner on the stage-14 model's notes there.
REFINER_CORPUS_COMMAND = corpus_command("data/refiner-s31", 12, "FluidR3_GM,MuseScore_General,TimGM6mb,sf_GMbank", "0,1,2,3",
                                        "fluidsynth,timidity", 2400, seed=31, splits="train")
FIT_OFFSETS_COMMAND = (
    "python run_transcription.py fit-offsets --model_name_or_path runs/piano-small-stage14/checkpoint-2000 "
    "--manifest_dir data/refiner-s31 --output_dir runs/piano-small-offsets --hidden_size 128 --steps 4000 "
    "--eval_manifest_dir data/piano-synth-v4 --eval_split val"
)
# Stages that start from the average of the previous stage's last checkpoints: the folder, and the command writing it.
AVERAGE_COMMANDS = {
    "runs/piano-small-stage13-average": (
        "python run_transcription.py average --checkpoints runs/piano-small-stage13/checkpoint-2000 "
        "runs/piano-small-stage13/checkpoint-2500 runs/piano-small-stage13/checkpoint-3000 "
        "--output_dir runs/piano-small-stage13-average"
    ),
}
MAX_WEIGHTS_MB = 40
TRAINING_DATA = (
    "Piano audio rendered with FluidSynth (and from v5 also TiMidity++) by `python -m sound2sheet.data.synth` from "
    "MIDI: the music21 corpus without the pieces reserved for evaluation, plus procedural piano music (scales, "
    "arpeggios, block chords, repeated notes, two hands, random polyphony), with pedal and tempo variation. Seven "
    "corpora, each containing the previous one's test pieces: `data/piano-synth` (3.4 hours of training audio; "
    "stages 1-7), `data/piano-synth-v2` (6.9 hours; stage 8), `data/piano-synth-v3` (13.7 hours, 863 training "
    "pieces; stage 9), `data/piano-synth-v4` (27.2 hours, 1724 training pieces; stage 10), `data/piano-synth-v5` "
    "(v4's performances, 903 of its 1724 training pieces and 40 of its 93 validation pieces rendered by TiMidity++ "
    "instead, whose releases ring on for longer; stage 11), `data/piano-synth-v6` (v5 with the other 821 training "
    "and 53 validation pieces rendered by FluidSynth again with their volume envelope's decay and release times moved "
    "by up to a factor of two, drawn per piece; stage 12) and `data/piano-synth-v7` (the same pieces with those times "
    "moved by up to a factor of four; stages 13 and 14). The training and validation pieces are played by "
    "FluidR3_GM, MuseScore_General and (from v2) Csound's sf_GMbank, in v4 with one of the first four General MIDI "
    "pianos each (acoustic grand, bright, electric grand, honky-tonk); TimGM6mb is kept out of training and plays "
    "every test piece on the acoustic grand, so the results below are on an unseen piano timbre as well as unseen "
    "pieces. The offset refiner was fitted on `data/refiner-s31` (13.7 hours, 870 pieces): the training pieces of a "
    "plan with another seed (31), rendered as v7's, i.e. 259 procedural pieces that no stage trained on and 611 "
    "music21 training pieces in other performances, soundfonts and pianos; no validation or test piece, and none of "
    "the pieces reserved for evaluation."
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="training output folder (or a checkpoint folder)")
    parser.add_argument("dest", help="model folder to write")
    parser.add_argument("--quality", required=True, help="JSON report of benchmarks/quality.py --report")
    parser.add_argument("--training-summary", default="", help="free text on how long and how far it was trained")
    parser.add_argument("--cards-dir", default=str(REPO / "model_cards"), help="where the copy of the model card goes")
    args = parser.parse_args(argv)
    source, dest = Path(args.run), Path(args.dest)
    # The frame head is kept: transcription places the decoded notes' onsets and offsets on it (`refine_notes`).
    model = Sound2SheetForConditionalGeneration.from_pretrained(source).eval()
    if not model.has_frame_head:
        raise SystemExit(f"{source}: no frame head (frame_loss_weight is 0); the shipped model places its notes on it")
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
    stages = [recipe.read_text().strip() for recipe in RECIPES]
    recipe = (
        f"1. Render the corpus: `{CORPUS_COMMAND}` (music21 corpus without the reserved pieces, plus procedural piano "
        "music; FluidR3_GM and MuseScore_General for training and validation, TimGM6mb kept for the test split).\n"
        "2. Stage 1, token loss only: `python run_transcription.py train examples/train_piano_small.json` on the CPU, "
        "fp32; stage 2 starts from its `checkpoint-2500` (the run may be stopped once that is written).\n"
        "3. Stage 2, with the auxiliary onset/frame loss on the encoder (weight 20): "
        "`python run_transcription.py train examples/train_piano_small_stage2.json`; stage 3 starts from its "
        "`checkpoint-3000`.\n"
        "4. Stage 3, the decoder reading one token per encoder time column (`encoder_memory: columns`, a new "
        "projection and frame head; the AST encoder and the decoder carry over): "
        "`python run_transcription.py train examples/train_piano_small_stage3.json`; stage 4 starts from its "
        "`checkpoint-1000`.\n"
        "5. Stage 4, cross-attention biased by each column's distance from the current time "
        "(`cross_attention_time_bias`, new biases starting at zero): "
        "`python run_transcription.py train examples/train_piano_small_stage4.json`; stage 5 starts from its "
        "`checkpoint-2000`.\n"
        "6. Stage 5, more steps of the same on a fresh schedule: "
        "`python run_transcription.py train examples/train_piano_small_stage5.json`; stage 6 starts from its "
        "`checkpoint-2000`.\n"
        "7. Stage 6, more steps again, on a fresh schedule with a lower peak rate: "
        "`python run_transcription.py train examples/train_piano_small_stage6.json`; stage 7 starts from its "
        "`checkpoint-3000`.\n"
        "8. Stage 7, more steps on a fresh schedule, in bfloat16 autocast (`bf16` with `use_cpu`) on a CPU that "
        "computes it natively: `python run_transcription.py train examples/train_piano_small_stage7.json` (this run "
        "started from the stage-6 model folder packaged from that checkpoint: the same weights, and a fresh "
        "optimizer either way); stage 8 starts from its `checkpoint-3000` (the last; its best by validation loss, "
        "`checkpoint-2500`, which the run's folder holds at the end, was the model shipped before).\n"
        "9. Stage 8, the same schedule on a corpus twice as large with a fourth soundfont (Csound's General MIDI bank, "
        f"Debian package `csound-soundfont`): render `{CORPUS_V2_COMMAND}` (its test split holds every test piece of "
        "`data/piano-synth` with the same audio, and more), then "
        "`python run_transcription.py train examples/train_piano_small_stage8.json`; stage 9 starts from its "
        "`checkpoint-3000` (the last; also its best by validation loss).\n"
        "10. Stage 9, twice as many steps on a fresh schedule, on a corpus twice as large again with the same four "
        f"soundfonts: render `{CORPUS_V3_COMMAND}` (its test split holds every test piece of `data/piano-synth` with the "
        "same audio, and more), then `python run_transcription.py train examples/train_piano_small_stage9.json`; stage 10 "
        "starts from its `checkpoint-6000` (the last; also its best by validation loss).\n"
        "11. Stage 10, on a corpus twice as large again, each training piece played by one of four General MIDI "
        f"pianos: render `{CORPUS_V4_COMMAND}` (its test split holds every test piece of `data/piano-synth` with the "
        "same audio, and more), then `python run_transcription.py train examples/train_piano_small_stage10.json`; the "
        "stage 11 starts from its best checkpoint by validation loss, `checkpoint-4500`, which the run's folder holds "
        "at the end (the last, `checkpoint-5000`, is a hair behind: 1.484 against 1.480).\n"
        "12. Stage 11, at a lower peak rate, on v4's performances with about half of the training and validation pieces "
        f"rendered by TiMidity++ instead of FluidSynth: render `{CORPUS_V5_COMMAND}` (the pieces rendered by "
        "FluidSynth, and the whole test split, are v4's: copying v4's folder first renders only the others), then "
        "`python run_transcription.py train examples/train_piano_small_stage11.json`; stage 12 starts from its best "
        "checkpoint by validation loss, `checkpoint-2500`, which the run's folder holds at the end (the last, "
        "`checkpoint-3000`, is a hair behind: 1.485 against 1.484).\n"
        "13. Stage 12, the same schedule, with the pieces that FluidSynth renders given other decay and release times: "
        f"render `{CORPUS_V6_COMMAND}` (the pieces rendered by TiMidity++, and the whole test split, are v5's: copying "
        "v5's folder first renders only the others), then "
        "`python run_transcription.py train examples/train_piano_small_stage12.json`; stage 13 starts from its best "
        "checkpoint by validation loss, `checkpoint-2500`, which the run's folder holds at the end (the last, "
        "`checkpoint-3000`, is a hair behind: 1.478 against 1.476).\n"
        "14. Stage 13, the same schedule, with the FluidSynth pieces' decay and release times spread twice as far: "
        f"render `{CORPUS_V7_COMMAND}` (copying v6's folder first renders only those pieces again), then "
        "`python run_transcription.py train examples/train_piano_small_stage13.json`; its run keeps checkpoints "
        "2000 (its best by validation loss, 1.483), 2500 and 3000.\n"
        "15. The average of those three checkpoints, weight by weight: "
        f"`{AVERAGE_COMMANDS['runs/piano-small-stage13-average']}`.\n"
        "16. Stage 14, 2000 steps on a fresh schedule from that average, on the same corpus: "
        "`python run_transcription.py train examples/train_piano_small_stage14.json`; the model is its last and best "
        "checkpoint by validation loss, `checkpoint-2000` (1.478).\n"
        "17. The offset refiner (a network of two 128-wide layers that moves each placed note's offset by a learned "
        "length ratio, `sound2sheet.offset_refiner`), fitted on the stage-14 model's notes of the training pieces of "
        f"another plan, rendered as v7's: `{REFINER_CORPUS_COMMAND}`, then `{FIT_OFFSETS_COMMAND}` (the model's other "
        "weights are left as they are).\n\n"
        "At inference, the decoded notes are placed on the frame head's onsets and offsets, the head's sure "
        "onsets that the decoder missed are added (`refine_notes`, on by default for this model), and the offset "
        "refiner moves the offsets (`refine_offsets`, on by default for a model that has one).\n\n"
        + "".join(f"Stage {number}:\n\n```json\n{text}\n```\n\n" for number, text in enumerate(stages, start=1))
        + args.training_summary
    )
    extra = ("Whole test pieces (unseen pieces, the held-out TimGM6mb soundfont, pedal and tempo variation), measured "
             "with `python benchmarks/quality.py --unrefined --report quality.json`, side by side with basic-pitch on "
             "the same files (`decoder times`: the same model with `refine_notes=False`):\n\n" + "\n".join(lines))
    card = write_model_card(dest, model_name=dest.name, results=ours, parameters=model.count_parameters()["total"], recipe=recipe,
                            dataset_name="sound2sheet synthetic piano corpus (data/piano-synth, test split)", extra_sections=extra,
                            training_data=TRAINING_DATA)
    Path(args.cards_dir).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(card, Path(args.cards_dir) / f"{dest.name}.md")
    print(f"{dest}: {size_mb:.1f} MB of weights, {model.count_parameters()['total'] / 1e6:.2f} M parameters; card {card}")


if __name__ == "__main__":
    main()
