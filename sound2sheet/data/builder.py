"""A `datasets` builder over Sound2Sheet manifests, and `load_manifest_dataset`.

datasets 5 no longer runs loading scripts, so the builder is a `GeneratorBasedBuilder` subclass used directly:

    builder = Sound2SheetManifestBuilder(data_dir="DATASET")
    builder.download_and_prepare()
    train = builder.as_dataset(split="train")                     # or: builder.as_streaming_dataset(split="train")

Each example is one piece: `id`, `audio_path` (absolute; audio stays a path and is decoded with soundfile when a
window is cut, because the `Audio` feature needs torchcodec), `duration`, and its `notes` read with
`sound2sheet.notes.read_midi` (offsets extended through the sustain pedal unless the config says `sustain=False`) as
sequences `onset`, `offset` (seconds), `pitch`, `velocity`. Splits are the manifests present: `train`, `validation`
(the `val` folder) and `test`.

The prepared Arrow cache is keyed on the manifests' content and on the size and modification time of every MIDI file
they name, so editing a manifest or re-rendering a MIDI file prepares the dataset again.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import datasets

from ..notes import Note, read_midi
from .manifest import ManifestError, available_splits, manifest_path, read_manifest

FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "audio_path": datasets.Value("string"),
        "duration": datasets.Value("float64"),
        "notes": {
            "onset": datasets.List(datasets.Value("float64")),
            "offset": datasets.List(datasets.Value("float64")),
            "pitch": datasets.List(datasets.Value("int16")),
            "velocity": datasets.List(datasets.Value("int16")),
        },
    }
)
SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation"}


def manifests_fingerprint(dataset_dir: str | os.PathLike) -> str:
    """A hash of the dataset's manifests (location and content) and of the MIDI files they name (size and
    modification time): the builder's cache key."""
    dataset_dir = Path(dataset_dir).resolve()
    digest = hashlib.sha256(str(dataset_dir).encode())
    for split in available_splits(dataset_dir):
        path = manifest_path(dataset_dir, split)
        digest.update(split.encode())
        digest.update(path.read_bytes())
        try:
            entries = read_manifest(path)
        except ManifestError:
            continue  # the content hash covers it; generating the examples raises the error
        for entry in entries:
            try:
                stat = os.stat(entry.midi_path)
                digest.update(f"{entry.midi_path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{entry.midi_path}\0missing\n".encode())
    return digest.hexdigest()[:16]


@dataclass
class Sound2SheetManifestConfig(datasets.BuilderConfig):
    """Configuration of `Sound2SheetManifestBuilder`.

    Args:
        data_dir (`str`): the dataset folder holding `{train,val,test}/manifest.json`.
        sustain (`bool`, *optional*, defaults to `True`): extend note offsets through the sustain pedal (MAESTRO's
            evaluation convention); `False` keeps the key releases.
    """

    sustain: bool = True


class Sound2SheetManifestBuilder(datasets.GeneratorBasedBuilder):
    """Pieces from `DATA_DIR/{train,val,test}/manifest.json` (`val` -> `validation`), one example per manifest entry.

    Args:
        data_dir: the dataset folder.
        cache_dir: where the prepared Arrow files go (default: the `datasets` cache).
        sustain: see `Sound2SheetManifestConfig`.
        kwargs: passed to `datasets.GeneratorBasedBuilder`.

    Raises:
        ManifestError: no manifest in `data_dir`.
    """

    VERSION = datasets.Version("1.0.0")
    BUILDER_CONFIG_CLASS = Sound2SheetManifestConfig

    def __init__(self, data_dir: str | os.PathLike, cache_dir: Optional[str] = None, sustain: bool = True, **kwargs):
        data_dir = str(Path(data_dir).resolve())
        if not available_splits(data_dir):
            raise ManifestError(data_dir, "no train/val/test manifest.json found")
        kwargs.setdefault("hash", manifests_fingerprint(data_dir))
        kwargs.setdefault("config_name", "manifests")
        kwargs.setdefault("dataset_name", "sound2sheet_manifests")
        super().__init__(data_dir=data_dir, cache_dir=cache_dir, sustain=sustain, **kwargs)

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(description="Piano audio + MIDI pairs from Sound2Sheet manifests", features=FEATURES)

    def _split_generators(self, dl_manager) -> List[datasets.SplitGenerator]:
        return [
            datasets.SplitGenerator(name=split, gen_kwargs={"manifest": str(manifest_path(self.config.data_dir, split))})
            for split in available_splits(self.config.data_dir)
        ]

    def _generate_examples(self, manifest: str):
        for entry in read_manifest(manifest):
            notes = read_midi(entry.midi_path, sustain=self.config.sustain)
            yield datasets.builder.Key(0, entry.index), {
                "id": entry.id,
                "audio_path": entry.audio_path,
                "duration": entry.duration,
                "notes": {
                    "onset": [n.onset for n in notes],
                    "offset": [n.offset for n in notes],
                    "pitch": [n.pitch for n in notes],
                    "velocity": [n.velocity for n in notes],
                },
            }


def load_manifest_dataset(
    dataset_dir: str | os.PathLike,
    split: str = "train",
    streaming: bool = False,
    cache_dir: Optional[str] = None,
    sustain: bool = True,
):
    """One split of a manifest dataset.

    Args:
        dataset_dir: the dataset folder.
        split: "train", "validation" (or "val") or "test".
        streaming: return an `IterableDataset` read straight from the manifest and MIDI files (nothing is prepared
            or written to the cache) instead of a `Dataset` prepared once as Arrow files.
        cache_dir: the `datasets` cache folder for the prepared files.
        sustain: extend note offsets through the sustain pedal.

    Raises:
        ManifestError: no manifest for `split` (the message names the expected file).
    """
    split = SPLIT_ALIASES.get(split, split)
    builder = Sound2SheetManifestBuilder(data_dir=dataset_dir, cache_dir=cache_dir, sustain=sustain)
    if split not in available_splits(builder.config.data_dir):
        raise ManifestError(manifest_path(builder.config.data_dir, split), f"no such manifest (split '{split}')")
    if streaming:
        return builder.as_streaming_dataset(split=split)
    builder.download_and_prepare()
    return builder.as_dataset(split=split)


def notes_of_example(example: dict) -> List[Note]:
    """The `Note` list of a builder example."""
    notes = example["notes"]
    return [Note(*values) for values in zip(notes["onset"], notes["offset"], notes["pitch"], notes["velocity"])]


__all__ = [
    "Sound2SheetManifestBuilder",
    "Sound2SheetManifestConfig",
    "load_manifest_dataset",
    "notes_of_example",
    "manifests_fingerprint",
    "FEATURES",
]
