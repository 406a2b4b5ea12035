"""The data collator: a list of window examples -> one batch of torch tensors for the model (and the HF Trainer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

FEATURE_PADDING_VALUE = -1.0  # the feature extractor's value for silent/padded frames (its `padding_value`)
LABEL_PAD = -100  # PyTorch cross-entropy's default ignore_index: padded label positions add nothing to the loss


@dataclass
class Sound2SheetDataCollator:
    """Pads and stacks window examples (`input_values`, optional `attention_mask`, `labels`, `frame_labels`).

    `input_values` (frames, mel bins) are padded along frames to the longest in the batch with
    `feature_padding_value` (windows from `WindowDataset` all have 256 frames, so this only matters for hand-made
    examples); `attention_mask` is padded with 0, or made from the frame counts when some examples lack it.
    `labels` (token ids ending in EOS) are padded with `label_pad`; any `pad_token_id` already inside a label sequence
    (e.g. labels pre-padded by the tokenizer) becomes `label_pad` too, so padding never counts in the loss. The model
    shifts the labels itself to make `decoder_input_ids`. `frame_labels` (the auxiliary frame head's targets) are
    stacked as they are.

    Args:
        pad_token_id (`int`, *optional*, defaults to 0): the tokenizer's padding id.
        label_pad (`int`, *optional*, defaults to -100): value of padded label positions (ignored by the loss).
        feature_padding_value (`float`, *optional*, defaults to -1.0): value of padded feature frames.
        pad_to_multiple_of (`int`, *optional*): round the label length up to a multiple of this.
    """

    pad_token_id: int = 0
    label_pad: int = LABEL_PAD
    feature_padding_value: float = FEATURE_PADDING_VALUE
    pad_to_multiple_of: Optional[int] = None

    def __call__(self, features: List[Dict]) -> Dict[str, torch.Tensor]:
        if not features:
            raise ValueError("Sound2SheetDataCollator: got an empty list of examples.")
        values = [torch.as_tensor(f["input_values"], dtype=torch.float32) for f in features]
        for index, value in enumerate(values):
            if value.dim() != 2 or value.shape[1] != values[0].shape[1]:
                raise ValueError(
                    f"Sound2SheetDataCollator: example {index} has input_values of shape {tuple(value.shape)}; "
                    f"expected (frames, {values[0].shape[1]})."
                )
        frames = max(value.shape[0] for value in values)
        input_values = torch.full((len(values), frames, values[0].shape[1]), float(self.feature_padding_value))
        attention_mask = torch.zeros(len(values), frames, dtype=torch.long)
        for row, (feature, value) in enumerate(zip(features, values)):
            input_values[row, : value.shape[0]] = value
            if feature.get("attention_mask") is not None:
                mask = torch.as_tensor(feature["attention_mask"], dtype=torch.long)
                attention_mask[row, : mask.shape[0]] = mask
            else:
                attention_mask[row, : value.shape[0]] = 1
        batch = {"input_values": input_values, "attention_mask": attention_mask}
        if all("labels" in f and f["labels"] is not None for f in features):
            batch["labels"] = self.pad_labels([f["labels"] for f in features])
        elif any("labels" in f and f["labels"] is not None for f in features):
            raise ValueError("Sound2SheetDataCollator: some examples have labels and some do not.")
        if any(f.get("frame_labels") is not None for f in features):
            if not all(f.get("frame_labels") is not None for f in features):
                raise ValueError("Sound2SheetDataCollator: some examples have frame_labels and some do not.")
            batch["frame_labels"] = torch.stack([torch.as_tensor(f["frame_labels"], dtype=torch.float32) for f in features])
        return batch

    def pad_labels(self, labels: List) -> torch.Tensor:
        """(batch, longest) long tensor of the label sequences, padded (and pad ids replaced) with `label_pad`."""
        sequences = [torch.as_tensor(list(label) if not torch.is_tensor(label) else label, dtype=torch.long).reshape(-1) for label in labels]
        longest = max(len(sequence) for sequence in sequences)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        padded = torch.full((len(sequences), longest), self.label_pad, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            padded[row, : len(sequence)] = sequence
        return padded.masked_fill(padded == self.pad_token_id, self.label_pad)


__all__ = ["Sound2SheetDataCollator"]
