"""Training data for Sound2Sheet: manifests and their checker, the `datasets` builder, training windows and the
collator, the synthetic piano corpus renderer (`sound2sheet.data.synth`) and the MAESTRO importer
(`sound2sheet.data.maestro`).

This package builds examples from notes, the feature extractor and the tokenizer; it never imports the model.
"""

from .builder import Sound2SheetManifestBuilder, load_manifest_dataset, notes_of_example
from .manifest import (
    ManifestEntry,
    ManifestError,
    Problem,
    available_splits,
    check_dataset,
    manifest_path,
    read_manifest,
    write_manifest,
)
from .windows import Augmentation, Sound2SheetDataCollator, WindowDataset, pieces_from_dataset, read_segment

__all__ = [
    "Sound2SheetManifestBuilder",
    "load_manifest_dataset",
    "notes_of_example",
    "ManifestEntry",
    "ManifestError",
    "Problem",
    "available_splits",
    "check_dataset",
    "manifest_path",
    "read_manifest",
    "write_manifest",
    "Augmentation",
    "Sound2SheetDataCollator",
    "WindowDataset",
    "pieces_from_dataset",
    "read_segment",
]
