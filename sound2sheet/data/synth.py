"""Render a synthetic piano corpus: MIDI performances -> FluidSynth -> FLAC, with train/val/test manifests.

    python -m sound2sheet.data.synth --out DATASET --hours 2 --seed 0 --workers 2 [--exclude-soundfont TimGM6mb]

Sources: the music21 corpus (every piece except those reserved for evaluation, all parts merged onto one piano and
folded into the 88 keys, excerpts capped at --max-piece-seconds) and procedurally generated piano music
(`procedural.py`). Each piece is performed with a tempo curve (+-15 %), timing jitter, phrase dynamics and sustain
pedal, rendered at 44.1 kHz with one of the installed General MIDI soundfonts (optionally with reverb), levelled, and
resampled to 16 kHz mono FLAC. The ground-truth MIDI written next to it carries the pedal (CC64), so
`sound2sheet.notes.read_midi` returns the pedal-extended notes that sound.

Pieces go to exactly one split (decided by a hash of the piece id). `--exclude-soundfont NAME` keeps that soundfont
out of train and val: every test piece is rendered with it, to measure generalisation to an unseen piano timbre.
`--programs 0,1,2,3` plays train and val pieces with General MIDI piano programs drawn per piece (more timbres from
each soundfont); test pieces always use program 0, the acoustic grand. `--synths fluidsynth,timidity` renders train
and val pieces with a synthesizer drawn per piece: TiMidity++ plays the same soundfonts with its own envelopes, whose
releases ring on for longer after a key or the pedal lifts, so that the model learns where a note ends from more than
one kind of release; test pieces are always rendered by FluidSynth. `--envelope-spread 1200` moves the volume
envelope's decay and release times of each train and val piece that FluidSynth renders by up to +-1200 timecents (a
factor of two either way), drawn per piece and sent as SoundFont NRPNs at the start of its MIDI file: the same samples
then die away at other rates, under a held key and after it lifts. `--splits test` renders only the test pieces of
the same plan (any of train, val, test), and leaves the other splits' manifests as they are.
Rendering is deterministic for a seed, parallel over --workers processes, and resumable (finished pieces are kept,
unless the plan now gives them another soundfont, program, synthesizer, envelope or seed).
Needs the Debian packages fluidsynth and at least one soundfont package, and timidity for `--synths timidity` (see
`APT_PACKAGES`).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..notes import read_midi
from . import procedural
from .manifest import ManifestEntry, manifest_path, write_manifest

RENDER_RATE = 44100  # the synthesizers render at 44.1 kHz; rendering straight at 16 kHz aliases
OUTPUT_RATE = 16000
APT_PACKAGES = "fluidsynth fluid-soundfont-gm timgm6mb-soundfont musescore-general-soundfont-lossless csound-soundfont timidity"
SYNTHS = ("fluidsynth", "timidity")  # `--synths`: FluidSynth, TiMidity++ (soundfonts in .sf2 form only)
SOUNDFONT_CANDIDATES = {
    "FluidR3_GM": ("/usr/share/sounds/sf2/FluidR3_GM.sf2",),
    "TimGM6mb": ("/usr/share/sounds/sf2/TimGM6mb.sf2",),
    "MuseScore_General": ("/usr/share/sounds/sf2/MuseScore_General_Full.sf2", "/usr/share/sounds/sf3/MuseScore_General.sf3"),
    "sf_GMbank": ("/usr/share/sounds/sf2/sf_GMbank.sf2",),  # Csound's General MIDI bank (csound-soundfont)
}
MUSIC21_SUFFIXES = (".mxl", ".xml", ".musicxml", ".krn")  # single-piece score files (.abc books hold many tunes)
PIANO_PROGRAMS = ("Acoustic Grand Piano", "Bright Acoustic Piano", "Electric Grand Piano", "Honky-tonk Piano",
                  "Electric Piano 1", "Electric Piano 2", "Harpsichord", "Clavinet")  # General MIDI programs 0-7
TEMPO_RANGE = (60.0, 140.0)  # quarter notes per minute of a performance's base tempo
TEMPO_SWING = 0.15  # tempo curves stay within +-15 % of the base tempo
TIMING_JITTER = 0.008  # seconds (standard deviation) of onset/offset jitter
TAIL_SECONDS = 1.0  # audio kept after the last note ends (release and reverb)
ENVELOPE_GENERATORS = (36, 38)  # SoundFont 2.01 generators moved by `--envelope-spread`: decayVolEnv, releaseVolEnv
SPLIT_NAMES = ("train", "validation", "test")


class RendererSetupError(RuntimeError):
    """FluidSynth or the soundfonts are missing; the message says what to install."""


class ReservedPieceError(ValueError):
    """A piece reserved for evaluation was requested for rendering."""


# --- setup checks --------------------------------------------------------------------------------------------------


def fluidsynth_binary() -> str:
    path = shutil.which("fluidsynth")
    if path is None:
        raise RendererSetupError(f"FluidSynth is not installed: apt-get install {APT_PACKAGES}")
    return path


def timidity_binary() -> str:
    path = shutil.which("timidity")
    if path is None:
        raise RendererSetupError(f"TiMidity++ is not installed (needed by --synths timidity): apt-get install {APT_PACKAGES}")
    return path


def timidity_config(soundfont_path: str) -> str:
    """A TiMidity++ configuration that plays General MIDI bank 0's piano programs (0-7) from one .sf2 soundfont, so
    that the system's default mapping (often another soundfont) plays nothing."""
    if not soundfont_path.lower().endswith(".sf2"):
        raise RendererSetupError(f"TiMidity++ reads .sf2 soundfonts only, not {soundfont_path}")
    name = os.path.basename(soundfont_path)
    lines = [f'dir "{os.path.dirname(soundfont_path)}"', "bank 0"]
    lines += [f'{program} %font "{name}" 0 {program}' for program in range(len(PIANO_PROGRAMS))]
    return "\n".join(lines) + "\n"


def available_soundfonts() -> Dict[str, str]:
    """Installed soundfonts by name (see `SOUNDFONT_CANDIDATES`)."""
    found = {}
    for name, candidates in SOUNDFONT_CANDIDATES.items():
        for candidate in candidates:
            if os.path.isfile(candidate):
                found[name] = candidate
                break
    return found


def require_soundfonts(names: Optional[Sequence[str]] = None) -> Dict[str, str]:
    found = available_soundfonts()
    if not found:
        raise RendererSetupError(f"No General MIDI soundfont found: apt-get install {APT_PACKAGES}")
    if names:
        missing = [name for name in names if name not in found]
        if missing:
            raise RendererSetupError(
                f"Soundfont(s) {', '.join(missing)} not installed (installed: {', '.join(found)}); apt-get install {APT_PACKAGES}"
            )
        found = {name: found[name] for name in names}
    return found


# --- the music21 corpus, minus the reserved pieces ------------------------------------------------------------------


def _normalise(corpus_path: str) -> str:
    return corpus_path.strip().replace("\\", "/").lstrip("./").lower()


def reserved_pieces() -> set:
    """Corpus paths reserved for evaluation (shipped with the package from shared/eval_reserved.txt), normalised;
    both with and without their file extension."""
    text = resources.files("sound2sheet.data").joinpath("eval_reserved.txt").read_text()
    reserved = set()
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            reserved.add(_normalise(line))
            reserved.add(_normalise(os.path.splitext(line)[0]))
    return reserved


def is_reserved(corpus_path: str, reserved: Optional[set] = None) -> bool:
    reserved = reserved_pieces() if reserved is None else reserved
    normal = _normalise(corpus_path)
    return normal in reserved or _normalise(os.path.splitext(normal)[0]) in reserved


def check_not_reserved(corpus_path: str):
    if is_reserved(corpus_path):
        raise ReservedPieceError(f"{corpus_path} is reserved for evaluation (eval_reserved.txt) and is never rendered for training")


def music21_pieces() -> List[str]:
    """Corpus-relative paths of the music21 corpus's single-piece scores, reserved pieces excluded, sorted."""
    import music21

    root = Path(music21.__file__).parent / "corpus"
    reserved = reserved_pieces()
    pieces = []
    for path in music21.corpus.getPaths():
        relative = Path(path).relative_to(root).as_posix()
        if relative.endswith(MUSIC21_SUFFIXES) and not is_reserved(relative, reserved):
            pieces.append(relative)
    return sorted(pieces)


def score_beat_notes(corpus_path: str, max_beats: float) -> List[procedural.BeatNote]:
    """(onset beat, beats, pitch, velocity) of every note of a corpus score, all parts merged, ties joined,
    pitches folded into the piano's 88 keys; only the first `max_beats` beats."""
    import music21

    check_not_reserved(corpus_path)
    score = music21.corpus.parse(corpus_path)
    if isinstance(score, music21.stream.Opus):
        score = score.scores[0]
    notes = []
    for element in score.stripTies().flatten().notes:
        onset = float(element.offset)
        if onset >= max_beats:
            break
        length = max(float(element.quarterLength), 0.125)
        pitches = element.pitches if hasattr(element, "pitches") else [element.pitch]
        for pitch in pitches:
            midi = int(pitch.midi)
            while midi < procedural.LOWEST_KEY:
                midi += 12
            while midi > procedural.HIGHEST_KEY:
                midi -= 12
            notes.append((onset, min(length, max_beats - onset), midi, 80))
    return sorted(set(notes), key=lambda n: (n[0], n[2]))


# --- performance --------------------------------------------------------------------------------------------------


def beat_clock(rng: np.random.Generator, beats: float) -> Tuple[np.ndarray, np.ndarray]:
    """(beat grid, seconds at each grid point) of a performance with a smooth tempo curve within +-15 %."""
    base = rng.uniform(*TEMPO_RANGE)
    grid = np.arange(0.0, beats + 8.0, 1 / 48)
    curve = np.zeros_like(grid)
    for _ in range(3):  # a few slow sinusoids: phrase-level accelerando and ritardando
        period = rng.uniform(8, 48)
        curve += rng.uniform(-1, 1) * np.sin(2 * np.pi * grid / period + rng.uniform(0, 2 * np.pi))
    curve = TEMPO_SWING * curve / max(1.0, np.abs(curve).max())
    seconds_per_beat = 60.0 / (base * (1.0 + curve))
    seconds = np.concatenate([[0.0], np.cumsum(seconds_per_beat[:-1] * np.diff(grid))])
    return grid, seconds


def perform(beat_notes: Sequence[procedural.BeatNote], rng: np.random.Generator, max_seconds: float, pedal_probability: float):
    """Timed notes (seconds, key releases) and sustain pedal intervals of one performance of `beat_notes`."""
    if not beat_notes:
        return [], []
    beats = max(onset + length for onset, length, _, _ in beat_notes)
    grid, seconds = beat_clock(rng, beats)
    to_seconds = lambda beat: float(np.interp(beat, grid, seconds))  # noqa: E731
    dynamics_grid = np.arange(0.0, beats + 4.0, 2.0)
    dynamics = np.clip(np.cumsum(rng.normal(0, 0.08, len(dynamics_grid))) + rng.uniform(-0.3, 0.3), -0.6, 0.6)
    performed = []
    for onset_beat, length, pitch, velocity in beat_notes:
        onset = max(0.0, to_seconds(onset_beat) + rng.normal(0, TIMING_JITTER))
        offset = to_seconds(onset_beat + length) + rng.normal(0, TIMING_JITTER)
        if onset >= max_seconds:
            continue
        offset = min(max(offset, onset + 0.03), max_seconds)
        level = float(np.interp(onset_beat, dynamics_grid, dynamics))
        loudness = velocity * (1.0 + level) + rng.normal(0, 6)
        performed.append((onset, offset, pitch, int(np.clip(round(loudness), 1, 127))))
    pedal = []
    if rng.random() < pedal_probability:
        bar = float(rng.choice([2.0, 3.0, 4.0]))
        for start in np.arange(0.0, beats, bar):
            if rng.random() < 0.7:
                down, up = to_seconds(start + 0.08 * bar), to_seconds(start + bar * rng.uniform(0.8, 0.97))
                if down < max_seconds:
                    pedal.append((down, min(up, max_seconds)))
    return performed, pedal


def soundfont_nrpn(generator: int, offset: int, channel: int = 0) -> list:
    """The control changes (mido messages) of a SoundFont 2.01 NRPN that adds `offset` to `generator` on `channel`:
    NRPN MSB 120 selects the SoundFont generators and NRPN LSB the generator; data entry LSB then MSB (FluidSynth
    applies the value on the MSB) carries 8192 plus the offset in the generator's NRPN steps, which for envelope
    times are 2 timecents."""
    import mido

    if not 0 <= generator < 100:
        raise ValueError(f"SoundFont NRPNs here address generators 0-99, got {generator}.")
    data = 8192 + round(offset / 2)
    if not 0 <= data < 2**14:
        raise ValueError(f"An offset of {offset} timecents is beyond a SoundFont NRPN's range (+-16382).")
    return [mido.Message("control_change", channel=channel, control=control, value=value, time=0)
            for control, value in ((99, 120), (98, generator), (38, data & 127), (6, data >> 7))]


def write_performance_midi(performed, pedal, path: Path, program: int = 0, envelope: Tuple[int, int] = (0, 0)):
    """Write key presses and CC64 pedal events to a one-track piano MIDI file played by General MIDI `program`.
    A non-zero `envelope` (timecents added to the volume envelope's decay and release, `ENVELOPE_GENERATORS`) is
    sent as SoundFont NRPNs before the first note."""
    import mido
    import pretty_midi

    midi = pretty_midi.PrettyMIDI(initial_tempo=120.0)
    piano = pretty_midi.Instrument(program=program, name="Piano")
    for onset, offset, pitch, velocity in performed:
        piano.notes.append(pretty_midi.Note(velocity=velocity, pitch=pitch, start=onset, end=offset))
    for down, up in pedal:
        piano.control_changes.append(pretty_midi.ControlChange(64, 127, down))
        piano.control_changes.append(pretty_midi.ControlChange(64, 0, up))
    midi.instruments.append(piano)
    if not any(envelope):
        midi.write(str(path))
        return
    # pretty_midi orders control changes of one tick by controller number, which would break the NRPN sequence, so the
    # messages go in with mido at the head of the piano's track, ahead of any note at time 0 (one file written)
    buffer = io.BytesIO()
    midi.write(buffer)
    buffer.seek(0)
    midi_file = mido.MidiFile(file=buffer)
    track = next(track for track in midi_file.tracks if any(message.type == "note_on" for message in track))
    track[:0] = [message for generator, offset in zip(ENVELOPE_GENERATORS, envelope) if offset
                 for message in soundfont_nrpn(generator, offset)]
    midi_file.save(str(path))


# --- rendering ----------------------------------------------------------------------------------------------------


@dataclass
class RenderJob:
    """One piece to render."""

    piece_id: str
    source: str  # "music21" or "procedural"
    reference: str  # corpus path or procedural kind
    split: str
    soundfont: str
    seed: int
    max_seconds: float
    program: int = 0  # General MIDI program (0-7: the piano family)
    synth: str = "fluidsynth"  # one of SYNTHS
    envelope: Tuple[int, int] = (0, 0)  # timecents added to the volume envelope's decay and release (FluidSynth)


def render_audio(
    midi_path: Path, soundfont_path: str, rng: np.random.Generator, seconds: float, synth: str = "fluidsynth"
) -> np.ndarray:
    """Render with `synth` (FluidSynth or TiMidity++) at 44.1 kHz (reverb on or off), downmixed, levelled, resampled
    to 16 kHz mono."""
    import soundfile
    import soxr

    if synth not in SYNTHS:
        raise ValueError(f"synth must be one of {', '.join(SYNTHS)}, got {synth!r}.")
    reverb = rng.random() < 0.5
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "render.wav"
        if synth == "fluidsynth":
            command = [
                fluidsynth_binary(), "-ni", "-q", "-g", "0.5", "-r", str(RENDER_RATE),
                "-o", f"synth.reverb.active={1 if reverb else 0}", "-o", "synth.chorus.active=0",
                "-F", str(wav), soundfont_path, str(midi_path),
            ]
        else:
            # --preserve-silence: TiMidity++ otherwise drops the silence before the first note, moving every note
            config = Path(tmp) / "timidity.cfg"
            config.write_text(timidity_config(soundfont_path))
            command = [
                timidity_binary(), "-idq", "-Ow", "--preserve-silence", "-s", str(RENDER_RATE), "-c", str(config),
                f"-EFreverb={1 if reverb else 0}", "-EFchorus=0", "-o", str(wav), str(midi_path),
            ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not wav.exists():
            raise RuntimeError(f"{synth} failed on {midi_path}: {result.stderr.strip()[:300]}")
        audio, rate = soundfile.read(wav, dtype="float32", always_2d=True)
    length = int(seconds * rate)
    mono = audio.mean(axis=1)[:length]
    if len(mono) < length:  # TiMidity++ stops once every voice has died away, even under a held pedal
        mono = np.pad(mono, (0, length - len(mono)))
    mono = soxr.resample(mono, rate, OUTPUT_RATE, quality="HQ").astype(np.float32)
    peak = float(np.abs(mono).max()) if len(mono) else 0.0
    if peak > 0:
        mono *= np.float32(10 ** (rng.uniform(-18, -1) / 20) / peak)  # level changes between pieces
    return mono


def render_job(job: RenderJob, out_dir: str) -> Optional[dict]:
    """Render one piece into `out_dir/<split folder>/{audio,midi}/`; returns its manifest entry (JSON form), or None
    when the piece has no notes. A piece already rendered as `job` plans it (same soundfont, seed and piece) is
    returned without rendering again."""
    import soundfile

    split_dir = manifest_path(out_dir, job.split).parent
    audio_path = split_dir / "audio" / f"{job.piece_id}.flac"
    midi_path = split_dir / "midi" / f"{job.piece_id}.mid"
    sidecar = split_dir / "audio" / f"{job.piece_id}.json"
    if sidecar.exists() and audio_path.exists() and midi_path.exists():
        entry = json.loads(sidecar.read_text())
        if _rendered_as_planned(entry, job):
            return entry
    rng = np.random.default_rng(job.seed)
    if job.source == "music21":
        beat_notes = score_beat_notes(job.reference, max_beats=job.max_seconds * TEMPO_RANGE[1] / 60.0)
        pedal_probability = 0.6
    else:
        beat_notes = procedural.generate(job.reference, rng, beats=job.max_seconds * TEMPO_RANGE[1] / 60.0)
        pedal_probability = 0.4
    performed, pedal = perform(beat_notes, rng, job.max_seconds, pedal_probability)
    if not performed:
        return None
    for folder in (audio_path.parent, midi_path.parent):
        folder.mkdir(parents=True, exist_ok=True)
    tmp_midi = midi_path.with_name(midi_path.name + ".partial")
    write_performance_midi(performed, pedal, tmp_midi, job.program, job.envelope)
    sounding = read_midi(tmp_midi)  # the pedal-extended ground truth
    seconds = max(note.offset for note in sounding) + TAIL_SECONDS
    audio = render_audio(tmp_midi, available_soundfonts()[job.soundfont], rng, seconds, job.synth)
    tmp_audio = audio_path.with_name(audio_path.stem + ".partial.flac")
    soundfile.write(tmp_audio, audio, OUTPUT_RATE, subtype="PCM_16")
    os.replace(tmp_audio, audio_path)
    os.replace(tmp_midi, midi_path)
    entry = {
        "id": job.piece_id,
        "audio_path": os.path.relpath(audio_path, split_dir),
        "midi_path": os.path.relpath(midi_path, split_dir),
        "duration": round(len(audio) / OUTPUT_RATE, 4),
        "metadata": {"source": job.source, "piece": job.reference, "soundfont": job.soundfont, "seed": job.seed,
                     "pedal": bool(pedal), "notes": len(sounding)},
    }
    if job.program:  # only when not the grand piano, so corpora rendered before programs existed keep their manifests
        entry["metadata"]["program"] = job.program
    if job.synth != "fluidsynth":  # likewise
        entry["metadata"]["synth"] = job.synth
    if any(job.envelope):  # likewise
        entry["metadata"]["envelope"] = {"decay": job.envelope[0], "release": job.envelope[1]}
    sidecar.write_text(json.dumps(entry))
    return entry


def _rendered_as_planned(entry: dict, job: RenderJob) -> bool:
    """Whether a finished piece's sidecar entry matches its job: a plan made with other soundfonts installed, other
    programs, other synthesizers, another envelope spread or another seed may give the piece another soundfont,
    program, synthesizer or envelope, and then it is rendered again."""
    metadata = entry.get("metadata", {})
    envelope = metadata.get("envelope", {})
    rendered = (metadata.get("soundfont"), metadata.get("seed"), metadata.get("piece"), metadata.get("program", 0),
                metadata.get("synth", "fluidsynth"), (envelope.get("decay", 0), envelope.get("release", 0)))
    return rendered == (job.soundfont, job.seed, job.reference, job.program, job.synth, tuple(job.envelope))


def _unit_hash(*parts) -> float:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _piece_seed(seed: int, piece_id: str) -> int:
    return int(_unit_hash("seed", seed, piece_id) * 2**31)


def assign_split(piece_id: str, val_fraction: float, test_fraction: float) -> str:
    """A piece's split, from a hash of its id alone: the same piece is in the same split whatever the seed or hours."""
    u = _unit_hash("split", piece_id)
    return "test" if u < test_fraction else "validation" if u < test_fraction + val_fraction else "train"


def plan_jobs(
    hours: float,
    seed: int = 0,
    sources: Sequence[str] = ("music21", "procedural"),
    soundfonts: Sequence[str] = ("FluidR3_GM",),
    exclude_soundfont: Optional[str] = None,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    max_piece_seconds: float = 60.0,
    procedural_fraction: float = 0.3,
    pieces: Optional[Sequence[str]] = None,
    programs: Sequence[int] = (0,),
    synths: Sequence[str] = ("fluidsynth",),
    envelope_spread: float = 0.0,
) -> List[RenderJob]:
    """The pieces to render for about `hours` of audio (each piece at most `max_piece_seconds`).

    Train and validation pieces are played by one of `programs` (General MIDI's piano family, 0-7) and rendered by
    one of `synths` (`SYNTHS`), each drawn from a hash of the piece: more timbres from the same soundfonts. Those that
    FluidSynth renders have their volume envelope's decay and release times moved by offsets drawn from a hash of the
    piece within +-`envelope_spread` timecents (1200 timecents double or halve a time). Test pieces are always played
    by program 0, the acoustic grand piano, and rendered by FluidSynth with the soundfont's own envelopes, so the test
    split stays the same whatever `programs`, `synths` and `envelope_spread` are.
    """
    for piece in pieces or ():
        check_not_reserved(piece)
    programs = list(programs)
    if not programs or any(not 0 <= program < len(PIANO_PROGRAMS) for program in programs):
        raise ValueError(f"programs must be General MIDI piano programs (0-{len(PIANO_PROGRAMS) - 1}), got {programs}.")
    synths = list(synths)
    if not synths or any(synth not in SYNTHS for synth in synths):
        raise ValueError(f"synths must be among {', '.join(SYNTHS)}, got {synths}.")
    if not 0 <= envelope_spread <= 4800:
        raise ValueError(f"envelope_spread must be between 0 and 4800 timecents, got {envelope_spread}.")
    training_fonts = [name for name in soundfonts if name != exclude_soundfont]
    if not training_fonts:
        raise ValueError("No soundfont left for train/val after --exclude-soundfont.")
    rng = np.random.default_rng(seed)
    corpus = list(pieces) if pieces is not None else (music21_pieces() if "music21" in sources else [])
    corpus = [corpus[i] for i in rng.permutation(len(corpus))]
    target = hours * 3600.0
    expected = 0.75 * max_piece_seconds  # music21 excerpts and procedural pieces average below the cap
    count = max(1, math.ceil(target / expected))
    use_procedural = "procedural" in sources
    use_music21 = bool(corpus)
    kinds = list(procedural.GENERATORS)
    jobs: List[RenderJob] = []
    planned = set()
    corpus_index = 0
    for index in range(count):
        procedural_turn = use_procedural and (not use_music21 or rng.random() < procedural_fraction or corpus_index >= len(corpus))
        if procedural_turn:
            kind = kinds[index % len(kinds)]
            piece_id, source, reference = f"procedural-{kind}-{seed}-{index:05d}", "procedural", kind
        elif corpus_index < len(corpus):
            reference = corpus[corpus_index]
            corpus_index += 1
            piece_id, source = "music21-" + os.path.splitext(reference)[0].replace("/", "-"), "music21"
            if piece_id in planned:
                # The corpus has some scores in two encodings (movement1.krn and movement1.mxl): the same music, and
                # the same id and files. The first drawn is rendered; skipping the other keeps every other job as it was.
                continue
        else:
            break
        split = assign_split(piece_id, val_fraction, test_fraction)
        if split == "test" and exclude_soundfont:
            font = exclude_soundfont
        else:
            font = training_fonts[int(_unit_hash("font", seed, piece_id) * len(training_fonts))]
        program = 0 if split == "test" else programs[int(_unit_hash("program", seed, piece_id) * len(programs))]
        synth = "fluidsynth" if split == "test" else synths[int(_unit_hash("synth", seed, piece_id) * len(synths))]
        envelope = (0, 0)
        if split != "test" and synth == "fluidsynth" and envelope_spread:
            envelope = tuple(round(envelope_spread * (2 * _unit_hash(name, seed, piece_id) - 1)) for name in ("decay", "release"))
        jobs.append(RenderJob(piece_id, source, reference, split, font, _piece_seed(seed, piece_id), max_piece_seconds,
                              program, synth, envelope))
        planned.add(piece_id)
    return jobs


def render_corpus(
    out_dir: str | os.PathLike,
    jobs: Sequence[RenderJob],
    workers: int = 1,
    progress: bool = True,
    splits: Sequence[str] = SPLIT_NAMES,
) -> Dict[str, List[dict]]:
    """Render the `jobs` of `splits` (in parallel), write those splits' manifests, and return their entries by split.
    The manifests of other splits, and every file already rendered, are left as they are."""
    unknown = [split for split in splits if split not in SPLIT_NAMES]
    if unknown:
        raise ValueError(f"splits must be among {', '.join(SPLIT_NAMES)}, got {', '.join(unknown)}.")
    jobs = [job for job in jobs if job.split in splits]
    fluidsynth_binary()
    fonts = require_soundfonts(sorted({job.soundfont for job in jobs}))
    if any(job.synth == "timidity" for job in jobs):
        timidity_binary()
        for name in sorted({job.soundfont for job in jobs if job.synth == "timidity"}):
            timidity_config(fonts[name])  # a soundfont TiMidity++ cannot read stops the corpus before it starts
    out_dir = str(out_dir)
    results: Dict[str, dict] = {}
    failures = []
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(render_job, job, out_dir): job for job in jobs}
            iterator = as_completed(futures)
            if progress:
                from tqdm.auto import tqdm

                iterator = tqdm(iterator, total=len(futures), desc="rendering", unit="piece")
            for future in iterator:
                job = futures[future]
                try:
                    results[job.piece_id] = future.result()
                except Exception as err:  # one bad score must not stop a corpus: report it and go on
                    failures.append(f"{job.reference}: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}")
    else:
        iterator = jobs
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(jobs, desc="rendering", unit="piece")
        for job in iterator:
            try:
                results[job.piece_id] = render_job(job, out_dir)
            except Exception as err:
                failures.append(f"{job.reference}: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}")
    for failure in failures:
        print(f"warning: skipped {failure}", file=sys.stderr)
    by_split: Dict[str, List[dict]] = {split: [] for split in SPLIT_NAMES if split in splits}
    for job in jobs:  # manifest order follows the plan, not completion order
        entry = results.get(job.piece_id)
        if entry is not None:
            by_split[job.split].append(entry)
    for split, entries in by_split.items():
        path = manifest_path(out_dir, split)
        manifest_entries = [
            ManifestEntry(id=e["id"], audio_path=str((path.parent / e["audio_path"]).resolve()),
                          midi_path=str((path.parent / e["midi_path"]).resolve()), duration=e["duration"],
                          metadata=e["metadata"])
            for e in entries
        ]
        write_manifest(manifest_entries, path)
    return by_split


def parse_splits(text: str) -> List[str]:
    """`--splits` as split names (`val` for `validation`; a ValueError naming the flag otherwise)."""
    splits = [{"val": "validation"}.get(item.strip(), item.strip()) for item in text.split(",") if item.strip()]
    unknown = [split for split in splits if split not in SPLIT_NAMES]
    if not splits or unknown:
        raise ValueError(f"--splits must be comma-separated names among train, val, test, got {text!r}.")
    return splits


def parse_programs(text: str) -> List[int]:
    """`--programs` as a list of integers (a ValueError naming the flag otherwise)."""
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"--programs must be comma-separated integers (General MIDI piano programs 0-7), got {text!r}.") from None


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sound2sheet.data.synth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="dataset folder to write (train/, val/, test/)")
    parser.add_argument("--hours", type=float, required=True, help="about how much audio to render")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--sources", default="music21,procedural", help="comma-separated: music21, procedural")
    parser.add_argument("--soundfonts", default=None, help="comma-separated names (default: all installed)")
    parser.add_argument("--exclude-soundfont", default=None, help="render test pieces only with this soundfont")
    parser.add_argument("--max-piece-seconds", type=float, default=60.0)
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--test-fraction", type=float, default=0.05)
    parser.add_argument("--procedural-fraction", type=float, default=0.3)
    parser.add_argument("--pieces", default=None, help="comma-separated music21 corpus paths (default: the whole corpus)")
    parser.add_argument("--programs", default="0",
                        help="comma-separated General MIDI piano programs (0-7) for train and val pieces, e.g. 0,1,2,3 "
                             "(default: 0, the acoustic grand; test pieces always use 0)")
    parser.add_argument("--synths", default="fluidsynth",
                        help=f"comma-separated synthesizers for train and val pieces, among {', '.join(SYNTHS)} "
                             "(default: fluidsynth; test pieces always use it)")
    parser.add_argument("--splits", default="train,val,test",
                        help="comma-separated splits to render, of the same plan (default: all three); the manifests "
                             "of the others are left as they are")
    parser.add_argument("--envelope-spread", type=float, default=0.0,
                        help="timecents (0-4800) within which the volume envelope's decay and release times of train and "
                             "val pieces rendered by FluidSynth are moved, per piece (default: 0, the soundfonts' own)")
    args = parser.parse_args(argv)
    try:
        splits = parse_splits(args.splits)
        programs = parse_programs(args.programs)
        synths = [name.strip() for name in args.synths.split(",") if name.strip()]
        if "timidity" in synths:
            timidity_binary()
        fonts = require_soundfonts(args.soundfonts.split(",") if args.soundfonts else None)
        if args.exclude_soundfont and args.exclude_soundfont not in fonts:
            raise RendererSetupError(f"--exclude-soundfont {args.exclude_soundfont} is not among {', '.join(fonts)}")
        jobs = plan_jobs(
            args.hours, args.seed, [s.strip() for s in args.sources.split(",")], list(fonts), args.exclude_soundfont,
            args.val_fraction, args.test_fraction, args.max_piece_seconds, args.procedural_fraction,
            args.pieces.split(",") if args.pieces else None, programs, synths, args.envelope_spread,
        )
        by_split = render_corpus(args.out, jobs, workers=args.workers, splits=splits)
    except (RendererSetupError, ReservedPieceError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split, entries in by_split.items():
        print(f"{split}: {len(entries)} pieces, {sum(e['duration'] for e in entries) / 3600:.2f} h")
    return 0


if __name__ == "__main__":
    sys.exit(main())
