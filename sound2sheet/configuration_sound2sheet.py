"""Sound2Sheet model configuration."""

from __future__ import annotations

from transformers import ASTConfig, PretrainedConfig

# The AudioSet-finetuned Audio Spectrogram Transformer (Gong et al. 2021): the default source of encoder weights.
AUDIOSET_AST_CHECKPOINT = "MIT/ast-finetuned-audioset-10-10-0.4593"

# Default encoder: a compact AST over 128 mel bins x 256 frames (2.56 s at a 10 ms hop). Square 16x16 patches,
# frequency stride 16 (8 non-overlapping frequency rows) and time stride 2 (one column every 20 ms) give
# 8 x 121 = 968 patch tokens: fine enough in time for the decoder to place onsets on the 10 ms grid, four
# times fewer tokens than a time stride of 1 would need. benchmarks/model_speed.py measures the cost.
DEFAULT_ENCODER_CONFIG = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 1024,
    "patch_size": 16,
    "frequency_stride": 16,
    "time_stride": 2,
    "max_length": 256,
    "num_mel_bins": 128,
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
}

# What the decoder can cross-attend to: every AST token, or one token per time column (see Sound2SheetConfig).
ENCODER_MEMORY_LAYOUTS = ("patches", "columns")

# The default tokenizer's vocabulary: 4 specials + 257 times (2.56 s / 10 ms + 1) + 128 pitches + 33 velocities + <tie>.
DEFAULT_VOCAB_SIZE = 423


class Sound2SheetConfig(PretrainedConfig):
    r"""
    Configuration of a [`Sound2SheetForConditionalGeneration`]: an Audio Spectrogram Transformer encoder over log-mel
    windows and a transformer decoder emitting note-event tokens.

    Generation settings (strategy, beams, sampling) do not belong here: they live in the model's `generation_config`.

    Args:
        encoder_config (`ASTConfig` or `dict`, *optional*):
            Configuration of the AST encoder. Its `patch_size`, `frequency_stride` and `time_stride` set the time
            resolution of the encoder tokens; `max_length` (frames) and `num_mel_bins` must match the feature extractor.
            Defaults to a compact 4-layer, 256-wide AST with 16x16 patches and strides 16 (frequency) x 2 (time).
        encoder_pretrained (`str`, *optional*, defaults to `"MIT/ast-finetuned-audioset-10-10-0.4593"`):
            Hub id or local folder of an `ASTModel` checkpoint whose weights
            [`Sound2SheetForConditionalGeneration.from_encoder_pretrained`] loads into the encoder (position embeddings
            are interpolated to this configuration's patching). Weights are never fetched implicitly.
        vocab_size (`int`, *optional*, defaults to 423):
            Size of the note-event vocabulary; must equal `len(tokenizer)`.
        hidden_size (`int`, *optional*, defaults to 256):
            Width of the decoder; the encoder output is projected to it.
        num_decoder_layers (`int`, *optional*, defaults to 4):
            Number of decoder layers (causal self-attention, cross-attention, feed-forward).
        num_attention_heads (`int`, *optional*, defaults to 4):
            Number of attention heads in each decoder attention layer.
        intermediate_size (`int`, *optional*, defaults to 1024):
            Width of the decoder feed-forward layers.
        dropout (`float`, *optional*, defaults to 0.1):
            Dropout probability in the decoder (embeddings, attention outputs, feed-forward).
        activation_function (`str`, *optional*, defaults to `"gelu"`):
            Activation of the decoder feed-forward layers.
        max_target_positions (`int`, *optional*, defaults to 1024):
            Longest token sequence the decoder handles for one window (learned position embeddings).
        frame_loss_weight (`float`, *optional*, defaults to 0.0):
            Weight of an auxiliary training loss on the encoder: a linear head reads each column of encoder tokens
            and predicts which pitches start and which sound at that column's centre (binary cross-entropy against
            `frame_labels`, see `WindowDataset(frame_grid=...)`). Dense targets for every 40 ms of audio teach the
            encoder pitch and onset features sooner than the token loss alone. 0 builds no head; the head is unused
            by `generate`.
        frame_offsets (`bool`, *optional*, defaults to `False`):
            With a frame head (`frame_loss_weight > 0`): give it 3 x 128 outputs instead of 2 x 128, the onsets and
            sounding pitches, then offsets: that a note of each pitch stops sounding nearest the column's centre. At
            inference a note then ends on a peak of its pitch's offset probability where there is one near the end the
            sounding probabilities give (`end_notes_on_sustain`). A trained model without them gets them from
            `Sound2SheetForConditionalGeneration.add_frame_offsets` (`run_transcription.py train --frame_offsets`).
        offset_refiner_size (`int`, *optional*, defaults to 0):
            Width of the hidden layers of a small network that moves each transcribed note's offset
            (`Sound2SheetOffsetRefiner`, fitted after training by `run_transcription.py fit-offsets`); 0 builds none.
            It reads features of the notes placed on the frame head, so it needs one (`frame_loss_weight > 0`).
        encoder_memory (`str`, *optional*, defaults to `"patches"`):
            What the decoder cross-attends to. `"patches"`: every AST token (CLS and distillation tokens, then the
            frequency rows x time columns of patches), each projected to `hidden_size`. `"columns"`: one token per time
            column, the projection of all its frequency rows concatenated plus a learned column position, so each
            decoder query finds a whole spectrum slice at one place in time (as MT3's one token per frame); the
            decoder then attends over `columns` tokens instead of `2 + rows x columns`.
        cross_attention_time_bias (`bool`, *optional*, defaults to `False`):
            With column memory: add to every cross-attention score a learned bias per head and per distance, in
            encoder columns, between the key's column and the decoder's current time (its last time token; the
            window start before the first). Distances run from -8 to +32 columns, further ones share the edge values.
            Attention can then look "just after the current time" without learning where each time token lies in the
            memory. The biases start at zero, so switching it on leaves a trained model's outputs unchanged.
        time_token_offset (`int`, *optional*, defaults to 4):
            Id of the first time token (`<t_0>`); with `num_time_tokens` and `time_token_seconds` it tells the model
            which tokens are times and what they mean (the default tokenizer's layout).
        num_time_tokens (`int`, *optional*, defaults to 257):
            Number of time tokens.
        time_token_seconds (`float`, *optional*, defaults to 0.01):
            Seconds per time step.
        freeze_encoder (`bool`, *optional*, defaults to `False`):
            Build the model with the AST encoder's parameters frozen (`requires_grad=False`); the projection to the
            decoder stays trainable. Toggle later with `model.freeze_encoder()` / `model.unfreeze_encoder()`.
        layer_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of the decoder layer norms.
        init_std (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of decoder weights.
        tie_word_embeddings (`bool`, *optional*, defaults to `True`):
            Share the decoder's token embedding matrix with the output projection.
        pad_token_id (`int`, *optional*, defaults to 0):
            Padding token id.
        eos_token_id (`int`, *optional*, defaults to 1):
            End-of-sequence token id.
        bos_token_id (`int`, *optional*, defaults to 2):
            Beginning-of-sequence token id.
        decoder_start_token_id (`int`, *optional*, defaults to 2):
            Token the decoder starts from (labels are shifted right with it).

    Example:

    ```python
    >>> from sound2sheet import Sound2SheetConfig, Sound2SheetForConditionalGeneration

    >>> config = Sound2SheetConfig(num_decoder_layers=2, encoder_config={"num_hidden_layers": 2})
    >>> model = Sound2SheetForConditionalGeneration(config)
    >>> model.count_parameters()["total"] > 0
    True
    ```
    """

    model_type = "sound2sheet"
    sub_configs_defaults = {"encoder_config": ASTConfig}
    # generate() sizes its cache from `num_hidden_layers`: for Sound2Sheet that is the decoder's depth.
    attribute_map = {"num_hidden_layers": "num_decoder_layers"}

    encoder_config: ASTConfig | dict | None = None
    encoder_pretrained: str | None = AUDIOSET_AST_CHECKPOINT
    vocab_size: int = DEFAULT_VOCAB_SIZE
    hidden_size: int = 256
    num_decoder_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 1024
    dropout: float = 0.1
    activation_function: str = "gelu"
    max_target_positions: int = 1024
    frame_loss_weight: float = 0.0
    frame_offsets: bool = False
    offset_refiner_size: int = 0
    encoder_memory: str = "patches"
    cross_attention_time_bias: bool = False
    time_token_offset: int = 4
    num_time_tokens: int = 257
    time_token_seconds: float = 0.01
    freeze_encoder: bool = False
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    eos_token_id: int | None = 1
    bos_token_id: int | None = 2
    decoder_start_token_id: int | None = 2
    is_encoder_decoder: bool = True

    def __post_init__(self, **kwargs):
        if self.encoder_config is None:
            self.encoder_config = dict(DEFAULT_ENCODER_CONFIG)
        elif isinstance(self.encoder_config, dict):
            # Keys not given fall back to Sound2Sheet's compact defaults, not to AudioSet AST's 768-wide ones.
            self.encoder_config = {**DEFAULT_ENCODER_CONFIG, **self.encoder_config}
        super().__post_init__(**kwargs)
        self._validate_sizes()

    def _validate_sizes(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})."
            )
        for name in ("vocab_size", "num_decoder_layers", "max_target_positions", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        if self.encoder_memory not in ENCODER_MEMORY_LAYOUTS:
            raise ValueError(f"encoder_memory must be one of {ENCODER_MEMORY_LAYOUTS}, got {self.encoder_memory!r}.")
        if self.cross_attention_time_bias:
            if self.encoder_memory != "columns":
                raise ValueError("cross_attention_time_bias needs encoder_memory='columns' (one memory token per time column).")
            if not 0 <= self.time_token_offset <= self.vocab_size - self.num_time_tokens or self.time_token_seconds <= 0:
                raise ValueError(
                    f"time tokens {self.time_token_offset}..{self.time_token_offset + self.num_time_tokens - 1} of "
                    f"{self.time_token_seconds} s must lie inside the vocabulary (vocab_size={self.vocab_size})."
                )
        if self.frame_loss_weight < 0:
            raise ValueError(f"frame_loss_weight must be >= 0, got {self.frame_loss_weight}.")
        if self.frame_offsets and not self.frame_loss_weight > 0:
            raise ValueError("frame_offsets are outputs of the frame head: set frame_loss_weight > 0 to build one.")
        if self.offset_refiner_size < 0:
            raise ValueError(f"offset_refiner_size must be >= 0, got {self.offset_refiner_size}.")
        if self.offset_refiner_size and not self.frame_loss_weight > 0:
            raise ValueError("offset_refiner_size > 0 needs a frame head (frame_loss_weight > 0): the refiner reads its notes.")
        for name in ("pad_token_id", "eos_token_id", "bos_token_id", "decoder_start_token_id"):
            token_id = getattr(self, name)
            if token_id is not None and not 0 <= token_id < self.vocab_size:
                raise ValueError(f"{name}={token_id} is outside the vocabulary (vocab_size={self.vocab_size}).")

    @property
    def encoder_grid(self) -> tuple[int, int]:
        """(frequency rows, time columns) of the encoder's patch tokens."""
        return encoder_patch_grid(self.encoder_config)

    @property
    def encoder_seconds_per_column(self) -> float:
        """Time between neighbouring encoder token columns, for 10 ms feature frames."""
        return self.encoder_config.time_stride * 0.01

    @property
    def frame_grid(self) -> tuple[float, float, int]:
        """(centre of the first encoder token column in seconds, seconds between columns, number of columns): the time
        grid of `frame_labels`. Feature frame `f` is centred at `f` x 10 ms, so a patch over frames `[0, patch)` is
        centred at `(patch - 1) / 2` x 10 ms."""
        patch = self.encoder_config.patch_size
        patch_t = patch if isinstance(patch, int) else tuple(patch)[1]
        return (patch_t - 1) * 0.01 / 2, self.encoder_seconds_per_column, self.encoder_grid[1]


def encoder_patch_grid(encoder_config: ASTConfig) -> tuple[int, int]:
    """(frequency rows, time columns) of the patch tokens an AST with this configuration produces."""
    patch = encoder_config.patch_size
    patch_f, patch_t = (patch, patch) if isinstance(patch, int) else tuple(patch)
    rows = (encoder_config.num_mel_bins - patch_f) // encoder_config.frequency_stride + 1
    cols = (encoder_config.max_length - patch_t) // encoder_config.time_stride + 1
    return rows, cols


__all__ = ["Sound2SheetConfig", "encoder_patch_grid", "AUDIOSET_AST_CHECKPOINT"]
