"""Decoding constraints for Sound2Sheet's note-event tokens.

`Sound2SheetTokenizer.encode_notes` writes every window in one grammar:

    [tie pitches, ascending] <tie> { <t_step> [<v_bin>] <p_pitch> ... } EOS

with time steps strictly increasing, a velocity token only where the velocity changes, and at each time step the
note-offs (velocity 0) first, then the note-ons, each group in ascending pitch order (a pitch that starts twice at
one step does so with a higher velocity the second time). `NoteEventGrammarLogitsProcessor` lets `generate()` pick only tokens
that continue a sequence of that grammar. A model that has not converged can otherwise loop (times that go back,
the same pitch over and over) until `max_new_tokens`, which costs time and yields notes no reference could hold;
under the grammar a window's sequence is finite by construction.
"""

from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutput

#: `generate()` options under which `generate_in_rounds` equals a single `generate()` call (the others, such as
#: `min_new_tokens` or `stopping_criteria`, count from the start of each call, or keep state across steps).
ROUND_SAFE_OPTIONS = frozenset(
    {"do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "num_beams", "max_new_tokens", "logits_processor"}
)


class NoteEventGrammarLogitsProcessor(LogitsProcessor):
    r"""
    [`LogitsProcessor`] that sets the score of every token that would break the note-event grammar to `-inf`.

    The state is recomputed from the whole `input_ids` at each step with tensor operations (no Python loop over rows
    or positions), so it works unchanged for greedy search, beam search and sampling, and for any batch size.

    Args:
        time_offset (`int`): id of `<t_0>`.
        num_time_steps (`int`): the last time step (`<t_{num_time_steps}>` is the window end).
        pitch_offset (`int`): id of `<p_0>`; pitches 0-127 follow it.
        velocity_offset (`int`): id of `<v_0>` (note-off); velocity bins 1..`num_velocity_bins` follow it.
        num_velocity_bins (`int`): number of note-on velocity bins.
        tie_token_id (`int`): id of `<tie>`.
        eos_token_id (`int`): id of EOS.

    Build it from a tokenizer with [`NoteEventGrammarLogitsProcessor.from_tokenizer`]:

    ```python
    >>> from transformers import LogitsProcessorList
    >>> from sound2sheet import Sound2SheetTokenizer
    >>> from sound2sheet.generation_sound2sheet import NoteEventGrammarLogitsProcessor
    >>> grammar = NoteEventGrammarLogitsProcessor.from_tokenizer(Sound2SheetTokenizer())
    >>> processors = LogitsProcessorList([grammar])  # model.generate(..., logits_processor=processors)
    ```
    """

    def __init__(
        self,
        time_offset: int,
        num_time_steps: int,
        pitch_offset: int,
        velocity_offset: int,
        num_velocity_bins: int,
        tie_token_id: int,
        eos_token_id: int,
    ):
        self.time_offset = time_offset
        self.num_time_steps = num_time_steps
        self.pitch_offset = pitch_offset
        self.num_pitches = velocity_offset - pitch_offset
        self.velocity_offset = velocity_offset
        self.num_velocity_bins = num_velocity_bins
        self.tie_token_id = tie_token_id
        self.eos_token_id = eos_token_id

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "NoteEventGrammarLogitsProcessor":
        """The grammar of a [`Sound2SheetTokenizer`]'s vocabulary."""
        return cls(
            time_offset=tokenizer.time_offset,
            num_time_steps=tokenizer.num_time_steps,
            pitch_offset=tokenizer.pitch_offset,
            velocity_offset=tokenizer.velocity_offset,
            num_velocity_bins=tokenizer.num_velocity_bins,
            tie_token_id=tokenizer.tie_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )

    def allowed_tokens(self, input_ids: torch.LongTensor, vocab_size: int) -> torch.BoolTensor:
        """(batch, vocab_size) mask of the tokens that may follow each row of `input_ids` (decoder start included)."""
        batch, length = input_ids.shape
        device = input_ids.device
        if length == 0:  # the tie section opens every sequence
            allowed = torch.zeros(batch, vocab_size, dtype=torch.bool, device=device)
            allowed[:, self.pitch_offset : self.pitch_offset + self.num_pitches] = True
            allowed[:, self.tie_token_id] = True
            return allowed
        positions = torch.arange(length, device=device).expand(batch, length)
        none = torch.full((batch,), -1, device=device, dtype=torch.long)

        def last_position(mask):  # (batch,) position of the last True, -1 if none
            return torch.where(mask, positions, -1).amax(dim=1)

        def value_at(index, offset):  # token id at `index` minus `offset` (-1 where index is -1)
            picked = input_ids.gather(1, index.clamp(min=0)[:, None])[:, 0] - offset
            return torch.where(index >= 0, picked, -1)

        is_time = (input_ids >= self.time_offset) & (input_ids <= self.time_offset + self.num_time_steps)
        is_pitch = (input_ids >= self.pitch_offset) & (input_ids < self.pitch_offset + self.num_pitches)
        is_velocity = (input_ids >= self.velocity_offset) & (input_ids <= self.velocity_offset + self.num_velocity_bins)

        tie_position = last_position(input_ids == self.tie_token_id)
        in_ties = tie_position < 0
        last_time_position = last_position(is_time)
        last_time = value_at(last_time_position, self.time_offset)
        last_velocity_position = last_position(is_velocity)
        velocity = value_at(last_velocity_position, self.velocity_offset)  # -1: none yet
        # The velocity in force at each position (-1 before the first velocity token), to tell note-offs from note-ons.
        velocity_index = torch.where(is_velocity, positions, -1).cummax(dim=1).values
        state = input_ids.gather(1, velocity_index.clamp(min=0)) - self.velocity_offset
        is_off_pitch = is_pitch & (velocity_index >= 0) & (state == 0)
        # The current group of pitches: since the start (tie section) or the last time token, and once the velocity
        # is a note-on one, since this time step's last note-off.
        group_start = torch.where(in_ties, none, last_time_position)
        ons_start = torch.where(velocity > 0, last_position(is_off_pitch), none)
        group_start = torch.maximum(group_start, ons_start)
        in_group = is_pitch & (positions > group_start[:, None])
        last_pitch_position = last_position(in_group)
        # Ascending; one pitch starts twice at a step only with a higher velocity token between (the tokenizer sorts
        # note-ons by pitch, then velocity), so every sequence is finite.
        last_pitch = value_at(last_pitch_position, self.pitch_offset)
        last_pitch_velocity = state.gather(1, last_pitch_position.clamp(min=0)[:, None])[:, 0]
        repeat_ok = ~in_ties & (last_velocity_position > last_pitch_position) & (velocity > last_pitch_velocity) & (last_pitch_velocity > 0)
        lowest_pitch = torch.where(repeat_ok, last_pitch, last_pitch + 1)
        ons_started = (velocity > 0) & (last_pitch_position > last_time_position)

        last_is_time, last_is_velocity, last_is_pitch = is_time[:, -1], is_velocity[:, -1], is_pitch[:, -1]
        last_is_tie = input_ids[:, -1] == self.tie_token_id

        allowed = torch.zeros(batch, vocab_size, dtype=torch.bool, device=device)
        pitches = torch.arange(self.num_pitches, device=device)
        pitch_ok = pitches[None] >= lowest_pitch[:, None]
        # A pitch: in the tie section (ascending), after a time token (needs a velocity so far), after a velocity,
        # or after a pitch of the current group.
        may_pitch = in_ties | last_is_velocity | last_is_pitch | (last_is_time & (velocity >= 0))
        allowed[:, self.pitch_offset : self.pitch_offset + self.num_pitches] = pitch_ok & may_pitch[:, None]
        # <tie>: only to close the tie section.
        allowed[:, self.tie_token_id] = in_ties
        events = ~in_ties
        # A time step later than the last one: after <tie> or after a pitch.
        steps = torch.arange(self.num_time_steps + 1, device=device)
        may_time = events & (last_is_tie | last_is_pitch)
        allowed[:, self.time_offset : self.time_offset + self.num_time_steps + 1] = (steps[None] > last_time[:, None]) & may_time[:, None]
        # A velocity different from the current one, after a time token or a pitch; note-off only before this
        # step's note-ons.
        bins = torch.arange(self.num_velocity_bins + 1, device=device)
        may_velocity = events & (last_is_time | last_is_pitch)
        velocity_ok = (bins[None] != velocity[:, None]) & ((bins[None] > 0) | ~ons_started[:, None])
        # After note-on pitch 127, only a higher velocity can be followed by a pitch (127 again): no dead end.
        top_reached = (velocity > 0) & (last_pitch == self.num_pitches - 1)
        velocity_ok &= ~top_reached[:, None] | (bins[None] > last_pitch_velocity[:, None])
        allowed[:, self.velocity_offset : self.velocity_offset + self.num_velocity_bins + 1] = velocity_ok & may_velocity[:, None]
        # EOS: after <tie> or after a pitch.
        allowed[:, self.eos_token_id] = events & (last_is_tie | last_is_pitch)
        # A row that has ended (generate() pads it until the batch ends) is left alone: an all -inf row of scores
        # would make sampling fail.
        ended = (input_ids == self.eos_token_id).any(dim=1)
        allowed[ended] = True
        return allowed

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        allowed = self.allowed_tokens(input_ids[:, 1:], scores.shape[-1])  # drop the decoder start token
        return scores.masked_fill(~allowed, float("-inf"))


def with_note_grammar(generate_kwargs: dict[str, Any], tokenizer) -> dict[str, Any]:
    """`generate()` keyword arguments with a [`NoteEventGrammarLogitsProcessor`] for `tokenizer` added to the caller's
    `logits_processor` list (which is not modified). `grammar=False` in `generate_kwargs` leaves it out."""
    kwargs = dict(generate_kwargs)
    if not kwargs.pop("grammar", True):
        return kwargs
    processors = LogitsProcessorList(kwargs.get("logits_processor") or [])
    if not any(isinstance(processor, NoteEventGrammarLogitsProcessor) for processor in processors):
        processors.append(NoteEventGrammarLogitsProcessor.from_tokenizer(tokenizer))
    kwargs["logits_processor"] = processors
    return kwargs


def decodes_in_rounds(generate_kwargs: dict[str, Any], generation_config) -> bool:
    """Whether `generate_in_rounds` can run this decoding: one sequence per row (no beams) and only
    `ROUND_SAFE_OPTIONS`."""
    beams = generate_kwargs.get("num_beams") or getattr(generation_config, "num_beams", 1) or 1
    return beams == 1 and set(generate_kwargs) <= ROUND_SAFE_OPTIONS


def generate_in_rounds(
    model, encoder_outputs: BaseModelOutput, round_tokens: int = 16, **generate_kwargs
) -> torch.LongTensor:
    """`model.generate(encoder_outputs=..., **generate_kwargs)` for greedy search or sampling, with finished rows set
    aside: `generate()` runs `round_tokens` steps at a time, and each round continues from the last one's cache with
    only the rows that have not reached EOS. A batch of windows then costs what its rows need, not what its longest row
    needs times the batch size: note windows differ a lot in length, and the decoder's step cost grows with its rows.

    Greedy search gives the same ids as one `generate()` call; sampling draws from the same distributions. Options
    must be among `ROUND_SAFE_OPTIONS` (`decodes_in_rounds`). Returns (batch, length) ids like `generate()`: decoder
    start first, rows that end early padded with `pad_token_id` after their EOS.
    """
    if round_tokens < 1:
        raise ValueError(f"round_tokens must be >= 1, got {round_tokens}.")
    config = model.generation_config
    eos = config.eos_token_id
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos))
    kwargs = dict(generate_kwargs)
    max_new_tokens = kwargs.pop("max_new_tokens", None) or config.max_new_tokens
    limit = 1 + max_new_tokens if max_new_tokens is not None else config.max_length  # decoder start included
    hidden = encoder_outputs.last_hidden_state
    rows: list = [None] * hidden.shape[0]
    running = torch.arange(hidden.shape[0])
    ids = cache = None
    while len(running):
        length = 1 if ids is None else ids.shape[1]
        output = model.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden[running.to(hidden.device)]),
            decoder_input_ids=ids,
            past_key_values=cache,
            max_new_tokens=None,  # the round's end is `max_length`; with both set, generate() warns every round
            max_length=min(length + round_tokens, limit),
            return_dict_in_generate=True,
            use_cache=True,
            **kwargs,
        )
        ids, cache = output.sequences, output.past_key_values
        ended = torch.isin(ids[:, length:].cpu(), eos_ids).any(dim=1) | (ids.shape[1] >= limit)
        for row in ended.nonzero()[:, 0].tolist():
            rows[running[row]] = ids[row]
        if ended.all():
            break
        if ended.any():
            keep = (~ended).nonzero()[:, 0]
            cache.batch_select_indices(keep.to(ids.device))
            ids, running = ids[keep.to(ids.device)], running[keep]
    width = max(len(row) for row in rows)
    padded = torch.full((len(rows), width), config.pad_token_id, dtype=torch.long, device=hidden.device)
    for index, row in enumerate(rows):
        eos_at = torch.isin(row.cpu(), eos_ids).nonzero()
        end = int(eos_at[0, 0]) + 1 if len(eos_at) else len(row)
        padded[index, :end] = row[:end]
    return padded


__all__ = ["NoteEventGrammarLogitsProcessor", "decodes_in_rounds", "generate_in_rounds", "with_note_grammar"]
