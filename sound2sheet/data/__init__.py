"""Training data for Sound2Sheet: manifests and their checker, the `datasets` builder, training windows, the collator,
augmentation, the synthetic piano corpus renderer (`sound2sheet.data.synth`) and the MAESTRO importer
(`sound2sheet.data.maestro`).

This package builds examples from notes, the feature extractor and the tokenizer; it never imports the model.
"""

from .augment import Augmentation
from .builder import Sound2SheetManifestBuilder, Sound2SheetManifestConfig, load_manifest_dataset, notes_of_example
from .collator import Sound2SheetDataCollator
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
from .windows import Piece, WindowDataset, pieces_from_dataset, random_window_start, read_segment, validation_window_starts

__all__ = [
    "Sound2SheetManifestBuilder",
    "Sound2SheetManifestConfig",
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
    "Piece",
    "WindowDataset",
    "pieces_from_dataset",
    "random_window_start",
    "read_segment",
    "validation_window_starts",
]
