"""Sound2Sheet: an Audio Spectrogram Transformer encoder and a note-event transformer decoder.

The encoder is transformers' `ASTModel` (Gong et al., "AST: Audio Spectrogram Transformer", 2021) over a log-mel window,
patched finely in time (see `Sound2SheetConfig`). The decoder emits the note-event tokens of `Sound2SheetTokenizer`, in
the spirit of MT3 (Gardner et al., "MT3: Multi-Task Multitrack Music Transcription", 2022; Hawthorne et al., "Sequence-to-
Sequence Piano Transcription with Transformers", 2021): causal self-attention over the tokens so far, cross-attention to
the encoder tokens. Decoding goes through `GenerationMixin` (greedy, beam search, sampling) with an `EncoderDecoderCache`:
self-attention keys/values grow by one token per step and cross-attention keys/values are computed once per window.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import ASTConfig, ASTModel, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPastAndCrossAttentions,
    Seq2SeqLMOutput,
    Seq2SeqModelOutput,
)

from .configuration_sound2sheet import Sound2SheetConfig, encoder_patch_grid

FRAME_PITCHES = 128  # MIDI pitches the auxiliary frame head predicts, as the tokenizer's pitch tokens

AST_SPECIAL_TOKENS = 2  # the CLS and distillation tokens AST puts before its patch tokens
# Column distances from the current time that get their own cross-attention bias (config.cross_attention_time_bias).
TIME_BIAS_BEHIND, TIME_BIAS_AHEAD = 8, 32
# The biases are stored divided by this: Adam moves a parameter by about the learning rate per step whatever its
# gradient, and attention logits need biases of several units to pick columns, which lr 5e-4 alone takes ~10k steps.
TIME_BIAS_SCALE = 8.0
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")  # weight files torch.load would unpickle


def shift_tokens_right(labels: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing: `labels` shifted one step right, starting with `decoder_start_token_id`.

    Positions the loss ignores (-100) become `pad_token_id`.
    """
    shifted = labels.new_full(labels.shape, pad_token_id)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == -100, pad_token_id)


def current_time_steps(decoder_input_ids: torch.LongTensor, config: Sound2SheetConfig) -> torch.LongTensor:
    """(batch, tokens) time step in force at each token of whole decoder sequences: the value of the last time token
    at or before it, 0 (the window start) before the first one."""
    offset = config.time_token_offset
    is_time = (decoder_input_ids >= offset) & (decoder_input_ids < offset + config.num_time_tokens)
    positions = torch.arange(decoder_input_ids.shape[1], device=decoder_input_ids.device).expand_as(decoder_input_ids)
    last = torch.where(is_time, positions, -1).cummax(dim=1).values
    values = decoder_input_ids.gather(1, last.clamp(min=0)) - offset
    return torch.where(last >= 0, values, 0)


def attend(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float,
    is_causal: bool,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention`, computed in float32 for one bfloat16 query per row on the CPU (a decoding
    step): PyTorch's CPU kernel takes 2-3.5x longer there in bfloat16 than casting the keys and values to float32 and
    back (`benchmarks/attention_speed.py`), and is less exact. Other shapes keep the inputs' dtype (for long queries
    the two cost the same)."""
    single_step = query.shape[2] == 1 and query.dtype == torch.bfloat16 and query.device.type == "cpu"
    if not single_step:
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):  # CPU autocast would run it in bfloat16 again
        attended = F.scaled_dot_product_attention(
            query.float(), keys.float(), values.float(), attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal
        )
    return attended.to(query.dtype)


class Sound2SheetAttention(nn.Module):
    """Multi-head attention of the note decoder: causal self-attention, or cross-attention to the encoder tokens.

    With an `EncoderDecoderCache`, self-attention appends this step's keys/values to the cache, and cross-attention
    projects the encoder tokens once (first step) and reuses them on every later step.
    """

    def __init__(self, config: Sound2SheetConfig, layer_idx: int, is_cross_attention: bool = False):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.layer_idx = layer_idx
        self.is_cross_attention = is_cross_attention
        self.dropout = config.dropout
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        # Cross-attention score bias per head and per column distance from the current time (see Sound2SheetConfig).
        self.time_bias = (
            nn.Parameter(torch.zeros(self.num_heads, TIME_BIAS_BEHIND + 1 + TIME_BIAS_AHEAD))
            if is_cross_attention and config.cross_attention_time_bias
            else None
        )

    def _heads(self, states: torch.Tensor) -> torch.Tensor:
        batch, length, _ = states.shape
        return states.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def keys_values(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, heads, length, head_dim) keys and values of `states` (batch, length, hidden): for cross-attention,
        what the cache holds for the encoder tokens."""
        return self._heads(self.k_proj(states)), self._heads(self.v_proj(states))

    def _cached_or_new_keys_values(self, states: torch.Tensor, past_key_values: Optional[EncoderDecoderCache]):
        if past_key_values is None:
            return self.keys_values(states)
        if self.is_cross_attention:
            cache = past_key_values.cross_attention_cache
            if past_key_values.is_updated.get(self.layer_idx):
                layer = cache.layers[self.layer_idx]
                return layer.keys, layer.values
            keys, values = cache.update(*self.keys_values(states), self.layer_idx)
            past_key_values.is_updated[self.layer_idx] = True
            return keys, values
        return past_key_values.self_attention_cache.update(*self.keys_values(states), self.layer_idx)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        past_key_values: Optional[EncoderDecoderCache] = None,
        attention_mask: Optional[torch.Tensor] = None,
        time_buckets: Optional[torch.LongTensor] = None,
    ) -> torch.Tensor:
        """`attention_mask`: a boolean mask broadcastable to (batch, heads, queries, keys), True where attention is
        allowed; `None` with self-attention means plain causal attention over a sequence that starts at position 0.
        `time_buckets` (batch, queries, columns): with a time bias, each query's distance bucket to each column."""
        query = self._heads(self.q_proj(hidden_states))
        source = encoder_hidden_states if self.is_cross_attention else hidden_states
        keys, values = self._cached_or_new_keys_values(source, past_key_values)
        if self.time_bias is not None:
            if time_buckets is None:
                raise ValueError("This cross-attention has a time bias: it needs the decoder's time_buckets.")
            bias = TIME_BIAS_SCALE * self.time_bias[:, time_buckets].transpose(0, 1)  # (batch, heads, queries, columns)
            attention_mask = bias.to(query.dtype)
        is_causal = not self.is_cross_attention and attention_mask is None and query.shape[2] > 1
        attended = attend(query, keys, values, attention_mask, self.dropout if self.training else 0.0, is_causal)
        batch, _, length, _ = attended.shape
        return self.out_proj(attended.transpose(1, 2).reshape(batch, length, -1))


class Sound2SheetDecoderLayer(nn.Module):
    """Pre-norm transformer decoder layer: causal self-attention, cross-attention, feed-forward."""

    def __init__(self, config: Sound2SheetConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Sound2SheetAttention(config, layer_idx, is_cross_attention=False)
        self.self_attn_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.cross_attn = Sound2SheetAttention(config, layer_idx, is_cross_attention=True)
        self.cross_attn_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.activation = ACT2FN[config.activation_function]
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden_states, encoder_hidden_states, past_key_values=None, self_attention_mask=None, time_buckets=None):
        hidden_states = hidden_states + self.dropout(
            self.self_attn(self.self_attn_layer_norm(hidden_states), None, past_key_values, self_attention_mask)
        )
        hidden_states = hidden_states + self.dropout(
            self.cross_attn(self.cross_attn_layer_norm(hidden_states), encoder_hidden_states, past_key_values, time_buckets=time_buckets)
        )
        feed_forward = self.fc2(self.dropout(self.activation(self.fc1(self.final_layer_norm(hidden_states)))))
        return hidden_states + self.dropout(feed_forward)


# The features the offset refiner reads per note (`sound2sheet.offset_refiner.NUM_OFFSET_FEATURES`; defined here too so
# that this file loads as remote code with the configuration file alone).
NUM_OFFSET_FEATURES = 84


class Sound2SheetOffsetRefiner(nn.Module):
    """A small network that moves transcribed notes' offsets: from a note's features (`note_offset_features`:
    standardised by the mean and spread of the notes it was fitted on, stored with the weights), two GELU layers of
    `hidden_size` predict the log of the ratio between the note's true length and its placed length
    (`sound2sheet.offset_refiner`). It starts out predicting 0, which moves no offset."""

    def __init__(self, hidden_size: int, num_features: int = NUM_OFFSET_FEATURES):
        super().__init__()
        self.num_features = num_features
        self.register_buffer("feature_mean", torch.zeros(num_features))
        self.register_buffer("feature_scale", torch.ones(num_features))
        self.layers = nn.Sequential(
            nn.Linear(num_features, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, 1)
        )

    def set_feature_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise features by this mean and spread (a spread under 1e-3 counts as 1e-3)."""
        with torch.no_grad():
            self.feature_mean.copy_(mean)
            self.feature_scale.copy_(std.clamp_min(1e-3))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(notes, num_features) features -> (notes,) log length ratios."""
        return self.layers((features - self.feature_mean) / self.feature_scale).squeeze(-1)


class Sound2SheetPreTrainedModel(PreTrainedModel):
    """Weight initialisation, loading and saving shared by the Sound2Sheet models."""

    config_class = Sound2SheetConfig
    config: Sound2SheetConfig
    base_model_prefix = "model"
    main_input_name = "input_values"
    input_modalities = ("audio",)
    _no_split_modules = ["ASTLayer", "Sound2SheetDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module):
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, Sound2SheetAttention) and module.time_bias is not None:
            nn.init.zeros_(module.time_bias)  # no bias until trained: a model switched to it decodes as before
        if isinstance(module, Sound2SheetOffsetRefiner):  # predicts 0 (moves no offset) until fitted
            nn.init.zeros_(module.layers[-1].weight)
            nn.init.zeros_(module.layers[-1].bias)
            module.feature_mean.zero_()
            module.feature_scale.fill_(1.0)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, allow_pickle: bool = False, **kwargs):
        """Load as `PreTrainedModel.from_pretrained`, from safetensors only unless `allow_pickle=True`.

        Pickled weights (`pytorch_model.bin`, `.pt`) can run arbitrary code when loaded; a checkpoint from elsewhere
        that has only those is refused unless `allow_pickle=True`, and then loaded with `torch.load(weights_only=True)`.
        """
        if not allow_pickle:
            if kwargs.get("use_safetensors") is False:
                raise ValueError("use_safetensors=False loads pickled weights, which can run code: pass allow_pickle=True to accept that.")
            kwargs["use_safetensors"] = True
        kwargs.setdefault("weights_only", True)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except OSError as err:
            folder = Path(os.fspath(pretrained_model_name_or_path))
            pickled = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
            if pickled and not allow_pickle:
                raise OSError(
                    f"{folder}: has only pickled weights ({', '.join(pickled)}), which can run code when loaded; "
                    "pass allow_pickle=True (run_transcription.py: --allow-pickle) to load them with weights_only=True."
                ) from err
            raise

    def save_pretrained(self, save_directory: str | os.PathLike, *args, save_original_format: bool = False, **kwargs):
        """Save as `PreTrainedModel.save_pretrained`, but keep the weight names the model uses.

        transformers would otherwise rename the AST encoder's weights to legacy ViT names on save, and a raw
        `load_state_dict` (what `Trainer` does on resume and load-best-model) would then silently leave the encoder
        at its initial values. Pass `save_original_format=True` to get the renamed layout anyway.
        """
        return super().save_pretrained(save_directory, *args, save_original_format=save_original_format, **kwargs)


class Sound2SheetEncoder(nn.Module):
    """The AST encoder over a log-mel window, projected to the decoder width.

    Input: `input_values` of shape (batch, frames, mel bins) as `Sound2SheetFeatureExtractor` makes them. Output with
    `config.encoder_memory == "patches"`: (batch, 2 + frequency rows x time columns, hidden_size), AST's CLS and
    distillation tokens first; with `"columns"`: (batch, time columns, hidden_size), each the projection of one column's
    frequency rows concatenated, plus a learned position per column.
    """

    main_input_name = "input_values"

    def __init__(self, config: Sound2SheetConfig):
        super().__init__()
        self.ast = ASTModel(config.encoder_config)
        self.by_column = config.encoder_memory == "columns"
        self.grid = config.encoder_grid
        rows, columns = self.grid
        width = config.encoder_config.hidden_size * (rows if self.by_column else 1)
        self.projection = nn.Linear(width, config.hidden_size)
        self.column_positions = nn.Embedding(columns, config.hidden_size) if self.by_column else None
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.expected_shape = (config.encoder_config.max_length, config.encoder_config.num_mel_bins)

    def forward(self, input_values: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs) -> BaseModelOutput:
        """`attention_mask` (frames) is accepted for API compatibility and unused: padded frames hold silence."""
        if input_values.dim() != 3 or tuple(input_values.shape[1:]) != self.expected_shape:
            raise ValueError(
                f"input_values must have shape (batch, {self.expected_shape[0]} frames, {self.expected_shape[1]} mel bins) "
                f"as the feature extractor makes them; got {tuple(input_values.shape)}."
            )
        tokens = self.ast(input_values.to(self.projection.weight.dtype)).last_hidden_state
        if not self.by_column:
            return BaseModelOutput(last_hidden_state=self.layer_norm(self.projection(tokens)))
        columns = self.projection(tokens_by_column(tokens[:, AST_SPECIAL_TOKENS:], *self.grid))
        return BaseModelOutput(last_hidden_state=self.layer_norm(columns + self.column_positions.weight))


def tokens_by_column(patches: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """(batch, rows x columns, hidden) AST patch tokens (frequency-major, as AST orders them) -> (batch, columns,
    rows x hidden): each time column's frequency rows side by side, lowest row first."""
    batch, _, hidden = patches.shape
    return patches.reshape(batch, rows, columns, hidden).transpose(1, 2).reshape(batch, columns, rows * hidden)


class Sound2SheetNoteDecoder(nn.Module):
    """Transformer decoder over note-event tokens, with learned positions and an `EncoderDecoderCache`."""

    def __init__(self, config: Sound2SheetConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.embed_positions = nn.Embedding(config.max_target_positions, config.hidden_size)
        self.layers = nn.ModuleList([Sound2SheetDecoderLayer(config, i) for i in range(config.num_decoder_layers)])
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def time_buckets(self, time_steps: torch.LongTensor) -> torch.LongTensor:
        """(batch, queries) current time steps -> (batch, queries, columns) bias buckets: the column distance from
        the current time, rounded and clamped to [-TIME_BIAS_BEHIND, TIME_BIAS_AHEAD], shifted to start at 0."""
        first, step, columns = self.config.frame_grid
        # Column centres in time steps of the tokenizer (7.5, 11.5, ... for 16-frame patches at stride 4).
        centres = (first + step * torch.arange(columns, device=time_steps.device)) / self.config.time_token_seconds
        distance = (centres - time_steps[..., None]) * (self.config.time_token_seconds / step)
        return torch.round(distance).long().clamp(-TIME_BIAS_BEHIND, TIME_BIAS_AHEAD) + TIME_BIAS_BEHIND

    def cross_attention_keys_values(self, encoder_hidden_states: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the cross-attention keys and values of `encoder_hidden_states` that a cache holds while decoding."""
        return [layer.cross_attn.keys_values(encoder_hidden_states) for layer in self.layers]

    def _self_attention_mask(self, attention_mask, query_length: int, past_length: int, device) -> Optional[torch.Tensor]:
        """None for the common cases SDPA handles by itself (full causal prefix, or one new token); else a bool mask."""
        if attention_mask is None and (past_length == 0 or query_length == 1):
            return None
        total = past_length + query_length
        positions = torch.arange(total, device=device)
        mask = positions[None, :] <= (positions[past_length:, None])  # (queries, keys) causal, offset by the past
        mask = mask[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, -total:].bool()
        return mask

    def forward(
        self,
        input_ids: torch.LongTensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[Cache] = None,
        use_cache: bool = False,
        time_steps: Optional[torch.LongTensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        """`time_steps` (batch, tokens): with `config.cross_attention_time_bias`, the current time step at each input
        token (`current_time_steps`); computed from `input_ids` when they start the sequence (no cache yet).
        `position_ids` (batch, tokens): each token's position in its sequence, for rows at different lengths (default:
        the positions after the cache, the same for every row); `attention_mask` then says which cached keys each
        row may attend to."""
        if use_cache and past_key_values is None:
            past_key_values = EncoderDecoderCache(DynamicCache(), DynamicCache())
        if past_key_values is not None and not isinstance(past_key_values, EncoderDecoderCache):
            raise TypeError(f"Sound2Sheet decodes with an EncoderDecoderCache, got {type(past_key_values).__name__}.")
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        query_length = input_ids.shape[1]
        if past_length + query_length > self.config.max_target_positions:
            raise ValueError(
                f"Decoding position {past_length + query_length} exceeds max_target_positions="
                f"{self.config.max_target_positions}; lower max_length/max_new_tokens."
            )
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + query_length, device=input_ids.device)[None]
        hidden_states = self.dropout(self.embed_tokens(input_ids) + self.embed_positions(position_ids))
        mask = self._self_attention_mask(attention_mask, query_length, past_length, input_ids.device)
        buckets = None
        if self.config.cross_attention_time_bias:
            if time_steps is None:
                if past_length:
                    raise ValueError(
                        "With cross_attention_time_bias, decoding after a cache needs decoder_time_steps (the current "
                        "time at each new token; see current_time_steps); generate() passes them."
                    )
                time_steps = current_time_steps(input_ids, self.config)
            buckets = self.time_buckets(time_steps)
        for layer in self.layers:
            hidden_states = layer(hidden_states, encoder_hidden_states, past_key_values, mask, buckets)
        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=self.layer_norm(hidden_states), past_key_values=past_key_values
        )


class Sound2SheetModel(Sound2SheetPreTrainedModel):
    """The bare encoder-decoder, returning decoder hidden states (no token head)."""

    def __init__(self, config: Sound2SheetConfig):
        super().__init__(config)
        self.encoder = Sound2SheetEncoder(config)
        self.decoder = Sound2SheetNoteDecoder(config)
        self.post_init()
        if config.freeze_encoder:
            self.set_encoder_trainable(False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.decoder.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.decoder.embed_tokens = value

    def get_encoder(self, modality: Optional[str] = None) -> Sound2SheetEncoder:
        return self.encoder

    def set_encoder_trainable(self, trainable: bool):
        """Freeze (`False`) or unfreeze (`True`) the AST encoder; its projection to the decoder stays trainable."""
        for parameter in self.encoder.ast.parameters():
            parameter.requires_grad_(trainable)

    def forward(
        self,
        input_values: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        decoder_input_ids: Optional[torch.LongTensor] = None,
        decoder_attention_mask: Optional[torch.Tensor] = None,
        encoder_outputs: Optional[BaseModelOutput | tuple] = None,
        past_key_values: Optional[Cache] = None,
        use_cache: Optional[bool] = None,
        decoder_time_steps: Optional[torch.LongTensor] = None,
        **kwargs,
    ) -> Seq2SeqModelOutput:
        if encoder_outputs is None:
            if input_values is None:
                raise ValueError("Pass either input_values or encoder_outputs.")
            encoder_outputs = self.encoder(input_values)
        elif isinstance(encoder_outputs, (tuple, list)):
            encoder_outputs = BaseModelOutput(last_hidden_state=encoder_outputs[0])
        if decoder_input_ids is None:
            raise ValueError("decoder_input_ids are required (or pass labels to Sound2SheetForConditionalGeneration).")
        decoder_outputs = self.decoder(
            decoder_input_ids,
            encoder_outputs.last_hidden_state,
            attention_mask=decoder_attention_mask,
            past_key_values=past_key_values,
            use_cache=bool(use_cache),
            time_steps=decoder_time_steps,
        )
        return Seq2SeqModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            past_key_values=decoder_outputs.past_key_values,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
        )


class Sound2SheetForConditionalGeneration(Sound2SheetPreTrainedModel, GenerationMixin):
    """Sound2Sheet with a token head: log-mel window in, note-event tokens out.

    `forward(input_values, labels=...)` trains by teacher forcing (labels are shifted right inside); `generate(input_values)`
    decodes with any `GenerationMixin` strategy. Example:

    ```python
    >>> import torch
    >>> from sound2sheet import Sound2SheetConfig, Sound2SheetForConditionalGeneration
    >>> model = Sound2SheetForConditionalGeneration(Sound2SheetConfig(num_decoder_layers=1, encoder_config={"num_hidden_layers": 1}))
    >>> features = torch.randn(1, 256, 128)
    >>> model.generate(features, max_new_tokens=4).shape[0]
    1
    ```
    """

    _tied_weights_keys = {"lm_head.weight": "model.decoder.embed_tokens.weight"}
    _keys_to_ignore_on_save = ["lm_head.weight"]  # tied: stored once, as the token embedding

    def __init__(self, config: Sound2SheetConfig):
        super().__init__(config)
        self.model = Sound2SheetModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Auxiliary head: one column of encoder output -> onset and sounding (and offset) logits per MIDI pitch. It
        # trains the encoder, and at inference it places the decoded notes' onsets and offsets
        # (`Sound2SheetProcessor.transcribe`).
        column_width = config.hidden_size * (1 if config.encoder_memory == "columns" else config.encoder_grid[0])
        self.frame_head = nn.Linear(column_width, frame_head_outputs(config)) if config.frame_loss_weight > 0 else None
        # Fitted after training (`run_transcription.py fit-offsets`): moves the offsets of the notes placed on the head.
        self.offset_refiner = Sound2SheetOffsetRefiner(config.offset_refiner_size) if config.offset_refiner_size else None
        self.post_init()
        generation = self.generation_config
        if generation is not None and generation.max_length in (None, 20) and generation.max_new_tokens is None:
            # transformers would stop after 20 tokens; a window may fill every decoder position after the start token.
            # (max_new_tokens rather than max_length, so that callers passing max_new_tokens get no conflict warning)
            generation.max_new_tokens = config.max_target_positions - 1

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear):
        self.lm_head = value

    def get_encoder(self, modality: Optional[str] = None) -> Sound2SheetEncoder:
        return self.model.encoder

    def get_decoder(self) -> Sound2SheetNoteDecoder:
        return self.model.decoder

    def freeze_encoder(self):
        """Stop training the AST encoder (the projection to the decoder stays trainable)."""
        self.model.set_encoder_trainable(False)

    def unfreeze_encoder(self):
        """Train the AST encoder again."""
        self.model.set_encoder_trainable(True)

    def count_parameters(self) -> dict[str, int]:
        """{"total", "trainable", "frozen"} parameter counts (shared weights counted once)."""
        total = trainable = 0
        for parameter in self.parameters():
            total += parameter.numel()
            trainable += parameter.numel() if parameter.requires_grad else 0
        return {"total": total, "trainable": trainable, "frozen": total - trainable}

    def forward(
        self,
        input_values: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        decoder_input_ids: Optional[torch.LongTensor] = None,
        decoder_attention_mask: Optional[torch.Tensor] = None,
        encoder_outputs: Optional[BaseModelOutput | tuple] = None,
        past_key_values: Optional[Cache] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        frame_labels: Optional[torch.Tensor] = None,
        decoder_time_steps: Optional[torch.LongTensor] = None,
        **kwargs,
    ) -> Seq2SeqLMOutput:
        r"""
        input_values (`torch.FloatTensor` of shape `(batch, frames, mel_bins)`): log-mel windows.
        labels (`torch.LongTensor` of shape `(batch, target_length)`, *optional*): note-event token ids ending in EOS,
            -100 where the loss should ignore them (padding). Shifted right inside to make `decoder_input_ids`.
        frame_labels (`torch.FloatTensor` of shape `(batch, columns, 256)`, or `(batch, columns, 384)` with
            `config.frame_offsets`, *optional*): per encoder token column, 1 where a MIDI pitch starts (first 128),
            where it sounds (next 128) and where it stops sounding (last 128, with offsets); see `frame_logits`. With
            `config.frame_loss_weight > 0`, their loss times that weight is added to the token loss.
        decoder_time_steps (`torch.LongTensor` of shape `(batch, decoder_length)`, *optional*): with
            `config.cross_attention_time_bias`, the time step in force at each decoder input token
            (`current_time_steps` of the whole sequence); needed only when decoding after a cache.
        """
        if labels is not None and decoder_input_ids is None:
            decoder_input_ids = shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)
        outputs = self.model(
            input_values=input_values,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            past_key_values=past_key_values,
            use_cache=use_cache,
            decoder_time_steps=decoder_time_steps,
        )
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        if frame_labels is not None:
            frame_logits = self.frame_logits(outputs.encoder_last_hidden_state)
            if frame_labels.shape != frame_logits.shape:
                raise ValueError(f"frame_labels must have shape {tuple(frame_logits.shape)}, got {tuple(frame_labels.shape)}.")
            frame_loss = F.binary_cross_entropy_with_logits(frame_logits.float(), frame_labels.float())
            frame_loss = self.config.frame_loss_weight * frame_loss
            loss = frame_loss if loss is None else loss + frame_loss
        return Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
        )

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: Optional[int] = None,
        past_key_values: Optional[Cache] = None,
        **kwargs,
    ):
        """GenerationMixin's inputs, plus the current time at each new token when the model has a time bias (computed
        from the whole sequence so far, so it follows beam reordering).

        When `generate()` continues from a cache it returned (`past_key_values` holding all but the last tokens of
        `decoder_input_ids`), only the tokens the cache has not seen are fed, so the continuation equals one call."""
        if next_sequence_length is None and past_key_values is not None:
            cached = past_key_values.get_seq_length()
            if 0 < cached < input_ids.shape[1]:
                next_sequence_length = input_ids.shape[1] - cached
        inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, past_key_values=past_key_values, **kwargs
        )
        new_tokens = inputs.get("decoder_input_ids")
        if self.config.cross_attention_time_bias and new_tokens is not None:
            inputs["decoder_time_steps"] = current_time_steps(input_ids, self.config)[:, -new_tokens.shape[1] :]
        return inputs

    def _reorder_cache(self, past_key_values: EncoderDecoderCache, beam_idx: torch.LongTensor) -> EncoderDecoderCache:
        """Beam search's per-step reordering (`generate()` calls it when the model defines it): of the self-attention
        cache only. Every beam of a window attends to the same encoder output (repeated per beam), and `beam_idx`
        only moves beams within their window, so reordering the cross-attention cache would copy it unchanged."""
        past_key_values.self_attention_cache.reorder_cache(beam_idx)
        return past_key_values

    def frame_logits(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """(batch, columns, 256) logits of the auxiliary head from the encoder output, (batch, columns, 384) with
        `config.frame_offsets`: for each encoder time column, whether each MIDI pitch starts there (first 128), sounds
        at its centre (next 128) and, with offsets, stops sounding nearest to its centre (last 128). With patch memory
        the head reads the column's frequency rows side by side (CLS/distillation tokens skipped); with column memory,
        the column token. `config.frame_grid` gives the columns' times."""
        if self.frame_head is None:
            raise ValueError("This model has no frame head: build it with frame_loss_weight > 0 to use frame_labels.")
        if self.config.encoder_memory == "columns":
            return self.frame_head(encoder_hidden_states)
        return self.frame_head(tokens_by_column(encoder_hidden_states[:, AST_SPECIAL_TOKENS:], *self.config.encoder_grid))

    @property
    def has_frame_head(self) -> bool:
        """Whether the model has the auxiliary frame head, whose onsets and offsets can place the decoded notes."""
        return self.frame_head is not None

    def frame_probabilities(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """(batch, columns, 256) probabilities of the frame head (`frame_logits`), in float32: that each MIDI pitch
        starts in each encoder time column (first 128), and that it sounds at the column's centre (next 128). With
        `config.frame_offsets`, (batch, columns, 384): then also that it stops sounding nearest the centre (last 128)."""
        return torch.sigmoid(self.frame_logits(encoder_hidden_states).float())

    def add_frame_offsets(self) -> None:
        """Give the frame head offset outputs (`config.frame_offsets`), to go on training a model that has none.

        The head grows from 256 to 384 outputs: the onset and sounding rows of its weight and bias are kept exactly,
        and `config.frame_offsets` becomes True, so the model saves and loads with the larger head. The 128 offset
        rows start as copies of the onset rows: an offset, like an onset, is a rare event at one column, and the onset
        rows predict one at the rate events occur. Rows started at random or at zero would predict about 0.5
        everywhere (the head's biases are near 0; its weights make the events rare), and their loss, many times the
        others', would drive the encoder for the first hundreds of steps. (Loading the checkpoint with
        `frame_offsets=True` instead would fail on the head's shape, or with `ignore_mismatched_sizes` start the whole
        head anew.) A model whose head already has offsets is left as it is.

        Raises:
            ValueError: the model has no frame head (`frame_loss_weight` is 0).
        """
        if self.frame_head is None:
            raise ValueError("This model has no frame head to add offsets to: build it with frame_loss_weight > 0.")
        if self.config.frame_offsets:
            return
        old = self.frame_head
        if old.out_features != 2 * FRAME_PITCHES:
            raise ValueError(f"Expected a frame head of {2 * FRAME_PITCHES} outputs without offsets, found {old.out_features}.")
        head = nn.Linear(old.in_features, 3 * FRAME_PITCHES, device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            head.weight[: old.out_features] = old.weight
            head.bias[: old.out_features] = old.bias
            head.weight[old.out_features :] = old.weight[:FRAME_PITCHES]
            head.bias[old.out_features :] = old.bias[:FRAME_PITCHES]
        head.requires_grad_(old.weight.requires_grad)
        head.train(old.training)
        self.frame_head = head
        self.config.frame_offsets = True

    @property
    def has_offset_refiner(self) -> bool:
        """Whether the model has an offset refiner (`config.offset_refiner_size > 0`), which transcription uses to move
        the offsets of the notes placed on the frame head."""
        return self.offset_refiner is not None

    def add_offset_refiner(self, hidden_size: int = 128) -> Sound2SheetOffsetRefiner:
        """Give the model a new offset refiner of `hidden_size` (replacing any it has), predicting 0 until fitted
        (`sound2sheet.offset_refiner.fit_refiner_weights`); `config.offset_refiner_size` becomes `hidden_size`, so the
        model saves and loads with it. Returns the refiner.

        Raises:
            ValueError: the model has no frame head, or `hidden_size` is under 1.
        """
        if self.frame_head is None:
            raise ValueError("The offset refiner moves notes placed on the frame head; this model has none.")
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive integer, got {hidden_size}.")
        refiner = Sound2SheetOffsetRefiner(hidden_size).to(self.frame_head.weight.device)
        self._init_weights(refiner.layers[0])
        self._init_weights(refiner.layers[2])
        self._init_weights(refiner)
        self.offset_refiner = refiner
        self.config.offset_refiner_size = hidden_size
        return refiner

    def predict_offset_ratios(self, features: np.ndarray) -> np.ndarray:
        """The offset refiner's log length ratios for (notes, `NUM_OFFSET_FEATURES`) `features`
        (`note_offset_features`): one per row, computed in float32 whatever the model's dtype, returned as float64.

        Raises:
            ValueError: the model has no offset refiner.
        """
        if self.offset_refiner is None:
            raise ValueError("This model has no offset refiner: fit one with `run_transcription.py fit-offsets`.")
        refiner = self.offset_refiner
        with torch.no_grad():
            weights = next(refiner.parameters())
            values = torch.as_tensor(np.asarray(features, dtype=np.float32), device=weights.device)
            module = refiner if weights.dtype == torch.float32 else _float32_copy(refiner)
            return module(values).double().cpu().numpy()

    @classmethod
    def from_encoder_pretrained(
        cls, config: Optional[Sound2SheetConfig] = None, encoder_source: Optional[str | os.PathLike] = None, **kwargs
    ) -> "Sound2SheetForConditionalGeneration":
        """A new model whose AST encoder starts from a pretrained `ASTModel` (decoder randomly initialised).

        The encoder takes the checkpoint's size (width, depth, heads) and keeps `config`'s input and patching
        (mel bins, frames, strides); the position embeddings are interpolated from the checkpoint's patch grid to
        the new one. `encoder_source` defaults to `config.encoder_pretrained` (the AudioSet AST); a Hub id resolves
        through the Hugging Face cache, so it also works offline once cached. `kwargs` go to `ASTModel.from_pretrained`.

        Raises:
            OSError: the source cannot be found or reached.
            ValueError: the checkpoint's patch size differs from the configuration's.
        """
        config = Sound2SheetConfig() if config is None else config
        source = os.fspath(encoder_source or config.encoder_pretrained or "")
        if not source:
            raise ValueError("No encoder source: pass encoder_source or set config.encoder_pretrained.")
        try:
            pretrained = ASTModel.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as err:
            raise OSError(
                f"Cannot load pretrained AST encoder weights from '{source}': {str(err).splitlines()[0]} "
                "Pass a local folder written by ASTModel.save_pretrained, or a Hub id that is reachable or already in "
                "the Hugging Face cache."
            ) from err
        config = _config_with_pretrained_encoder_size(config, pretrained.config, source)
        model = cls(config)
        state = pretrained.state_dict()
        key = "embeddings.position_embeddings"
        state[key] = interpolate_position_embeddings(
            state[key], encoder_patch_grid(pretrained.config), encoder_patch_grid(config.encoder_config)
        )
        missing, unexpected = model.model.encoder.ast.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"AST checkpoint '{source}' does not fit the encoder: missing {missing}, unexpected {unexpected}.")
        if config.freeze_encoder:
            model.freeze_encoder()
        return model


def _float32_copy(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module).float()


def frame_head_outputs(config: Sound2SheetConfig) -> int:
    """Outputs of the frame head a model with this configuration builds: `FRAME_PITCHES` each for onsets, sounding
    pitches and, with `config.frame_offsets`, offsets (in that order)."""
    return (3 if config.frame_offsets else 2) * FRAME_PITCHES


def _config_with_pretrained_encoder_size(config: Sound2SheetConfig, source: ASTConfig, name: str) -> Sound2SheetConfig:
    ours = config.encoder_config
    if source.patch_size != ours.patch_size:
        raise ValueError(
            f"AST checkpoint '{name}' uses {source.patch_size}x{source.patch_size} patches but the configuration asks for "
            f"{ours.patch_size}x{ours.patch_size}; set encoder_config.patch_size={source.patch_size}."
        )
    encoder = source.to_dict()
    for field in ("frequency_stride", "time_stride", "max_length", "num_mel_bins", "hidden_dropout_prob", "attention_probs_dropout_prob"):
        encoder[field] = getattr(ours, field)
    for field in ("model_type", "transformers_version", "architectures", "id2label", "label2id"):
        encoder.pop(field, None)
    values = config.to_dict()
    for field in ("model_type", "transformers_version", "architectures"):
        values.pop(field, None)
    values["encoder_config"] = encoder
    values["encoder_pretrained"] = name
    return Sound2SheetConfig(**values)


def interpolate_position_embeddings(
    embeddings: torch.Tensor, source_grid: tuple[int, int], target_grid: tuple[int, int]
) -> torch.Tensor:
    """Resize AST position embeddings (1, 2 + rows x columns, hidden) from one patch grid to another.

    The CLS and distillation embeddings are kept; the patch embeddings are resized bilinearly over the
    (frequency rows, time columns) grid, the layout AST flattens its patches in.
    """
    if tuple(source_grid) == tuple(target_grid):
        return embeddings.clone()
    special, patches = embeddings[:, :AST_SPECIAL_TOKENS], embeddings[:, AST_SPECIAL_TOKENS:]
    rows, cols = source_grid
    if patches.shape[1] != rows * cols:
        raise ValueError(f"Position embeddings hold {patches.shape[1]} patches, not the {rows}x{cols} grid expected.")
    hidden = patches.shape[-1]
    grid = patches.reshape(1, rows, cols, hidden).permute(0, 3, 1, 2)
    resized = F.interpolate(grid.float(), size=tuple(target_grid), mode="bilinear", align_corners=False)
    resized = resized.to(embeddings.dtype).permute(0, 2, 3, 1).reshape(1, target_grid[0] * target_grid[1], hidden)
    return torch.cat([special, resized], dim=1)


__all__ = [
    "Sound2SheetPreTrainedModel",
    "Sound2SheetModel",
    "Sound2SheetForConditionalGeneration",
    "Sound2SheetEncoder",
    "Sound2SheetNoteDecoder",
    "interpolate_position_embeddings",
    "shift_tokens_right",
]
