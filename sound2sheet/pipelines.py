"""The `automatic-speech-recognition` pipeline, taught to transcribe piano with a Sound2Sheet model.

transformers' own ASR pipeline cannot serve Sound2Sheet as it is: it only treats models whose class it lists itself
as sequence-to-sequence (registering with `AutoModelForSpeechSeq2Seq` is not enough, it falls back to CTC), it reads
files with ffmpeg and resamples with torchaudio, and its `chunk_length_s` concatenates chunk outputs instead of
stitching held notes. `Sound2SheetPipeline` subclasses it: for a Sound2Sheet model it loads audio with the project's
own reader (soundfile + soxr), cuts it into the model's windows (overlapping as in `Sound2SheetProcessor.transcribe`
when the notes are placed on the frame head), decodes each window with `generate()` (windows of all inputs batched
with `batch_size`) and joins the notes; for any other model it is the stock pipeline, unchanged.

Importing `sound2sheet` registers it for the `automatic-speech-recognition` task, so that

    pipeline("automatic-speech-recognition", model="path/to/sound2sheet-folder")

works; `pipeline(..., pipeline_class=Sound2SheetPipeline)` selects it explicitly.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from transformers.pipelines import PIPELINE_REGISTRY, AutomaticSpeechRecognitionPipeline

from .feature_extraction_sound2sheet import load_audio
from .modeling_sound2sheet import Sound2SheetForConditionalGeneration
from .generation_sound2sheet import with_note_grammar
from .processing_sound2sheet import (
    FrameEvidence,
    Sound2SheetProcessor,
    clip_notes,
    decode_owned_notes,
    generate_with_frames,
    resolve_refine_notes,
    resolve_refine_offsets,
    resolve_window_overlap,
)

ASR_TASK = "automatic-speech-recognition"


class Sound2SheetPipeline(AutomaticSpeechRecognitionPipeline):
    """Automatic-speech-recognition pipeline that transcribes piano audio with a Sound2Sheet model.

    Inputs (one, or a list): a file path (WAV/FLAC/OGG, any rate and channel count), a 1-D numpy array at the
    feature extractor's rate, or a dict `{"raw": array, "sampling_rate": int}` (`"array"` also accepted) at any rate.
    Each result is `{"text": readable event tokens, "notes": [Note, ...]}` with note times in seconds from the start of
    the input. Generation options (`num_beams`, `do_sample`, `max_new_tokens`, ... or `generate_kwargs={...}`) are
    passed to `model.generate()`, which keeps to the note-event grammar unless `grammar=False`; `batch_size` batches
    windows. Notes are placed on the model's frame head as in `Sound2SheetProcessor.transcribe` unless
    `refine_notes=False`, on windows that overlap by `window_overlap` seconds (default as in `transcribe`), and their
    offsets moved by the model's offset refiner when it has one, unless `refine_offsets=False`.
    """

    def __init__(self, model, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        if self.is_sound2sheet:
            self.type = "sound2sheet"
            # The stock defaults (5 beams, 256 new tokens) are Whisper's; Sound2Sheet decodes with its generation_config.
            self._generation_defaults = {"pad_token_id": self.tokenizer.pad_token_id}

    @property
    def is_sound2sheet(self) -> bool:
        return isinstance(self.model, Sound2SheetForConditionalGeneration)

    @property
    def _windowing(self) -> Sound2SheetProcessor:
        """The pipeline's feature extractor and tokenizer as the processor that cuts audio into windows (the base
        pipeline's own `processor` attribute is left as transformers sets it)."""
        return Sound2SheetProcessor(self.feature_extractor, self.tokenizer)

    def _sanitize_parameters(self, chunk_length_s=None, stride_length_s=None, **kwargs):
        if not self.is_sound2sheet:
            return super()._sanitize_parameters(chunk_length_s=chunk_length_s, stride_length_s=stride_length_s, **kwargs)
        if chunk_length_s is not None or stride_length_s is not None:
            raise ValueError(
                "Sound2Sheet cuts audio into its model's windows and stitches held notes itself: "
                "do not pass chunk_length_s or stride_length_s."
            )
        for option in ("return_timestamps", "return_language", "decoder_kwargs"):
            if kwargs.pop(option, None):
                raise ValueError(f"{option} is not supported by Sound2Sheet: notes already carry their times.")
        kwargs.pop("ignore_warning", None)
        forward_params = dict(kwargs.pop("generate_kwargs", None) or {})
        forward_params.update(kwargs)
        refine = resolve_refine_notes(forward_params.pop("refine_notes", None), self.model)
        overlap = resolve_window_overlap(
            forward_params.pop("window_overlap", None), refine, self.feature_extractor.window_seconds
        )
        refine_offsets = resolve_refine_offsets(forward_params.pop("refine_offsets", None), refine, self.model)
        forward_params["refine_notes"] = refine
        return {"window_overlap": overlap}, forward_params, {"window_overlap": overlap, "refine_offsets": refine_offsets}

    def _load(self, inputs) -> np.ndarray:
        rate = self.feature_extractor.sampling_rate
        if isinstance(inputs, (str, os.PathLike)):
            return load_audio(inputs, sampling_rate=rate)
        if isinstance(inputs, dict):
            array = inputs.get("raw", inputs.get("array"))
            if array is None or "sampling_rate" not in inputs:
                raise ValueError('A dict input needs "raw" (or "array") audio samples and their "sampling_rate".')
            return load_audio(np.asarray(array), sampling_rate=rate, orig_sampling_rate=int(inputs["sampling_rate"]))
        if isinstance(inputs, torch.Tensor):
            inputs = inputs.cpu().numpy()
        if isinstance(inputs, np.ndarray):
            return load_audio(inputs, sampling_rate=rate, orig_sampling_rate=rate)
        raise TypeError(f"Expected a file path, a numpy array or a {{'raw', 'sampling_rate'}} dict, got {type(inputs).__name__}.")

    def preprocess(self, inputs, window_overlap: float = 0.0, **kwargs):
        if not self.is_sound2sheet:
            yield from super().preprocess(inputs, **kwargs)
            return
        samples = self._load(inputs)
        rate = self.feature_extractor.sampling_rate
        processor = self._windowing
        count, hop = processor.count_windows(samples, rate, window_overlap), processor.window_hop(window_overlap)
        for index, window in enumerate(processor.iter_windows(samples, rate, window_overlap)):  # as `transcribe`'s
            features = self.feature_extractor(window, sampling_rate=rate, return_tensors="pt")
            yield {
                "is_last": index == count - 1,
                "input_values": features["input_values"],
                "window_start": torch.tensor([index * hop], dtype=torch.float64),
                "audio_seconds": torch.tensor([len(samples) / rate], dtype=torch.float64),
            }

    def _forward(self, model_inputs, **generate_kwargs):
        if not self.is_sound2sheet:
            return super()._forward(model_inputs, **generate_kwargs)
        input_values = model_inputs["input_values"].to(self.model.device)
        refine = generate_kwargs.pop("refine_notes")
        generate_kwargs = with_note_grammar(self._prepare_generate_kwargs(generate_kwargs), self.tokenizer)
        tokens, frames = generate_with_frames(self.model, input_values, refine, **generate_kwargs)
        outputs = {
            "is_last": model_inputs["is_last"],
            "tokens": tokens,
            "window_start": model_inputs["window_start"],
            "audio_seconds": model_inputs["audio_seconds"],
        }
        if frames is not None:
            outputs["frames"] = frames
        return outputs

    def postprocess(self, model_outputs, window_overlap: float = 0.0, refine_offsets: bool = False, **kwargs) -> dict[str, Any]:
        if not self.is_sound2sheet:
            return super().postprocess(model_outputs, **kwargs)
        windows, starts = [], []
        for output in model_outputs:
            tokens = output["tokens"].reshape(-1).tolist()
            windows.append(tokens[1:])  # drop the decoder start token
            starts.append(float(output["window_start"].reshape(-1)[0]))
        notes = decode_owned_notes(self.tokenizer, windows, starts, self.feature_extractor.window_seconds, window_overlap)
        seconds = float(model_outputs[0]["audio_seconds"].reshape(-1)[0])
        if "frames" in model_outputs[0]:  # placed on the frame head as `transcribe` places them
            evidence = FrameEvidence(self.model.config.frame_grid, window_overlap)
            for output, start in zip(model_outputs, starts):
                evidence.add(output["frames"].reshape(output["frames"].shape[-2:]).cpu().numpy(), start)
            notes = evidence.placed(notes, seconds, self.model.predict_offset_ratios if refine_offsets else None)
        else:
            notes = clip_notes(notes, seconds)
        text = " | ".join(self.tokenizer.decode(window, skip_special_tokens=True) for window in windows)
        return {"text": text, "notes": notes}


def register_pipeline():
    """Make the `automatic-speech-recognition` task build a `Sound2SheetPipeline` (stock behaviour for other models).

    Only the task's implementation class changes: its model classes and default checkpoint stay transformers' own.
    """
    entry = dict(PIPELINE_REGISTRY.supported_tasks[ASR_TASK])
    entry["impl"] = Sound2SheetPipeline
    PIPELINE_REGISTRY.supported_tasks[ASR_TASK] = entry


__all__ = ["Sound2SheetPipeline", "register_pipeline"]
