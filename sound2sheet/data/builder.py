"""A `datasets` builder over Sound2Sheet manifests, and `load_manifest_dataset`.

datasets 5 no longer runs loading scripts, so the builder is a `GeneratorBasedBuilder` subclass used directly:

    builder = Sound2SheetManifestBuilder(data_dir="DATASET")
    builder.download_and_prepare()
    train = builder.as_dataset(split="train")

Each example is one piece: `id`, `audio_path` (absolute; audio stays a path and is decoded with soundfile when a batch
is built: the `Audio` feature needs torchcodec), `duration`, and its pedal-extended `notes` (onset, offset, pitch and
velocity sequences). The cache is keyed on the manifests' content, so editing a manifest invalidates it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

import datasets

from ..notes import read_midi
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


def manifests_fingerprint(dataset_dir: str | os.PathLike) -> str:
    """A hash of the dataset's manifests (content and location): the builder's cache key."""
    digest = hashlib.sha256(str(Path(dataset_dir).resolve()).encode())
    for split in available_splits(dataset_dir):
        path = manifest_path(dataset_dir, split)
        digest.update(split.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class Sound2SheetManifestBuilder(datasets.GeneratorBasedBuilder):
    """Splits from `DATA_DIR/{train,val,test}/manifest.json` (val -> `validation`); one example per piece."""

    VERSION = datasets.Version("1.0.0")

    def __init__(self, data_dir: str | os.PathLike, cache_dir: Optional[str] = None, **kwargs):
        data_dir = str(Path(data_dir).resolve())
        if not available_splits(data_dir):
            raise ManifestError(f"{data_dir}: no train/val/test manifest.json found")
        kwargs.setdefault("hash", manifests_fingerprint(data_dir))
        kwargs.setdefault("config_name", "manifests")
        super().__init__(data_dir=data_dir, cache_dir=cache_dir, **kwargs)

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(description="Piano audio + MIDI pairs from Sound2Sheet manifests", features=FEATURES)

    def _split_generators(self, dl_manager):
        return [
            datasets.SplitGenerator(name=split, gen_kwargs={"manifest": str(manifest_path(self.config.data_dir, split))})
            for split in available_splits(self.config.data_dir)
        ]

    def _generate_examples(self, manifest: str):
        for entry in read_manifest(manifest):
            notes = read_midi(entry.midi_path)
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
    dataset_dir: str | os.PathLike, split: str = "train", streaming: bool = False, cache_dir: Optional[str] = None
):
    """One split of a manifest dataset: a `Dataset` (prepared once, cached as Arrow) or, with `streaming=True`, an
    `IterableDataset` read straight from the manifest and MIDI files (nothing prepared).

    `split` is "train", "validation" (or "val") or "test".
    """
    split = "validation" if split == "val" else split
    builder = Sound2SheetManifestBuilder(data_dir=dataset_dir, cache_dir=cache_dir)
    if split not in available_splits(builder.config.data_dir):
        raise ManifestError(f"{manifest_path(builder.config.data_dir, split)}: no such manifest (split '{split}')")
    if streaming:
        return builder.as_streaming_dataset(split=split)
    builder.download_and_prepare()
    return builder.as_dataset(split=split)


def notes_of_example(example: dict):
    """The `Note` list of a builder example."""
    from ..notes import Note

    notes = example["notes"]
    return [Note(*values) for values in zip(notes["onset"], notes["offset"], notes["pitch"], notes["velocity"])]


__all__ = ["Sound2SheetManifestBuilder", "load_manifest_dataset", "notes_of_example", "FEATURES"]
