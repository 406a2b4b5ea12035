"""Render the bundled example recording: the first seconds of a Bach chorale (music21 corpus, not reserved for
evaluation) on a General MIDI piano with FluidSynth.

    python examples/make_example.py    # writes examples/example_piano.flac and examples/example_piano.mid

Needs the Debian packages fluidsynth and fluid-soundfont-gm (apt-get install fluidsynth fluid-soundfont-gm).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile

from sound2sheet.notes import Note, read_midi, write_midi

PIECE = "bach/bwv66.6"  # not in shared/eval_reserved.txt
SECONDS = 8.0
SOUNDFONT = "/usr/share/sounds/sf2/FluidR3_GM.sf2"
RENDER_RATE = 44100  # render at 44.1 kHz: FluidSynth aliases when rendering directly at 16 kHz
HERE = Path(__file__).resolve().parent


def main():
    import music21

    if shutil.which("fluidsynth") is None or not Path(SOUNDFONT).exists():
        raise SystemExit("needs FluidSynth and a GM soundfont: apt-get install fluidsynth fluid-soundfont-gm")
    with tempfile.TemporaryDirectory() as tmp:
        score_midi = Path(tmp) / "score.mid"
        music21.corpus.parse(PIECE).write("midi", fp=str(score_midi))
        notes = [
            Note(n.onset, min(n.offset, SECONDS), n.pitch, 72 + (n.pitch % 5) * 6)  # a little dynamic variety
            for n in read_midi(score_midi)
            if n.onset < SECONDS - 0.05
        ]
        piano_midi = HERE / "example_piano.mid"
        write_midi(notes, piano_midi)
        wav = Path(tmp) / "render.wav"
        subprocess.run(
            ["fluidsynth", "-ni", "-g", "0.7", "-r", str(RENDER_RATE), "-F", str(wav), SOUNDFONT, str(piano_midi)],
            check=True, capture_output=True,
        )
        audio, rate = soundfile.read(wav, dtype="float32")
        audio = audio[: int((SECONDS + 0.5) * rate)]
        audio *= 0.9 / max(1e-6, float(np.abs(audio).max()))
        soundfile.write(HERE / "example_piano.flac", audio, rate, subtype="PCM_16")
    print(f"wrote {HERE / 'example_piano.flac'} ({len(audio) / rate:.1f} s, {rate} Hz, {audio.shape[1]} channels) "
          f"and {piano_midi} ({len(notes)} notes)")


if __name__ == "__main__":
    main()
