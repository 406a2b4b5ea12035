"""Write a tiny, randomly initialised Sound2Sheet model: a stand-in default until a trained model is shipped.

    python examples/make_tiny_random_model.py [OUTPUT_DIR]    # default: models/sound2sheet-tiny-random

Its transcriptions are meaningless; it exists so that the full transcription path runs end to end.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from sound2sheet import (
    Sound2SheetConfig,
    Sound2SheetFeatureExtractor,
    Sound2SheetForConditionalGeneration,
    Sound2SheetProcessor,
    Sound2SheetTokenizer,
)

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "models" / "sound2sheet-tiny-random"


def main():
    output = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUTPUT
    torch.manual_seed(0)
    config = Sound2SheetConfig(
        hidden_size=64, num_decoder_layers=2, num_attention_heads=4, intermediate_size=128, max_target_positions=256,
        encoder_config={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128},
    )
    model = Sound2SheetForConditionalGeneration(config)
    model.generation_config.max_new_tokens = 64  # random weights rarely emit EOS: keep decoding short
    processor = Sound2SheetProcessor(Sound2SheetFeatureExtractor(), Sound2SheetTokenizer())
    model.save_pretrained(output)
    processor.save_pretrained(output)
    (output / "README.md").write_text(
        "---\nlibrary_name: transformers\nlicense: apache-2.0\ntags: [sound2sheet, random-weights]\n---\n\n"
        "# sound2sheet-tiny-random\n\nA tiny Sound2Sheet model with random weights, written by "
        "`examples/make_tiny_random_model.py`. It runs the transcription path end to end; its notes are meaningless.\n"
    )
    print(f"wrote {output} ({model.count_parameters()['total']} parameters)")


if __name__ == "__main__":
    main()
