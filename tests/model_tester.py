"""Tiny Sound2Sheet configurations and inputs for tests (transformers' test mixins are not in its pip package)."""

from __future__ import annotations

import torch

from sound2sheet import Sound2SheetConfig, Sound2SheetForConditionalGeneration

TINY_FRAMES = 64
TINY_MELS = 32


class Sound2SheetModelTester:
    """Builds tiny configurations (hidden 32, 2 layers) and matching random inputs, deterministically."""

    def __init__(self, batch_size: int = 2, vocab_size: int = 423, seed: int = 0):
        self.batch_size = batch_size
        self.vocab_size = vocab_size
        self.seed = seed

    def get_config(self, **overrides) -> Sound2SheetConfig:
        encoder = {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "max_length": TINY_FRAMES,
            "num_mel_bins": TINY_MELS,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        }
        encoder.update(overrides.pop("encoder_config", {}))
        values = dict(
            vocab_size=self.vocab_size,
            hidden_size=32,
            num_decoder_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            dropout=0.0,
            max_target_positions=64,
            encoder_config=encoder,
        )
        values.update(overrides)
        return Sound2SheetConfig(**values)

    def get_model(self, **overrides) -> Sound2SheetForConditionalGeneration:
        torch.manual_seed(self.seed)
        model = Sound2SheetForConditionalGeneration(self.get_config(**overrides))
        # Random init gives near-uniform logits; sharper ones make decoding paths (and their differences) visible.
        with torch.no_grad():
            model.lm_head.weight.mul_(8.0)
        return model.eval()

    def get_inputs(self, batch_size: int | None = None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + 1)
        return torch.randn(batch_size or self.batch_size, TINY_FRAMES, TINY_MELS, generator=generator)

    def get_labels(self, length: int = 12) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + 2)
        labels = torch.randint(4, self.vocab_size, (self.batch_size, length), generator=generator)
        labels[:, -1] = 1  # EOS
        labels[-1, length // 2 :] = -100  # a shorter target, padded for the loss
        return labels
