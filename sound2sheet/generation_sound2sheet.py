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

import itertools
from typing import Any, Iterable, Iterator, Optional, TypeVar

import torch
import torch.nn.functional as F
from transformers import Cache, DynamicCache, EncoderDecoderCache, GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import BaseModelOutput

from .modeling_sound2sheet import current_time_steps

T = TypeVar("T")

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


def eos_ids_and_limit(config, max_new_tokens: Optional[int]) -> tuple[torch.Tensor, int]:
    """A generation config's EOS ids (1-D), and the longest sequence (decoder start included) that `max_new_tokens`
    (default: the config's; without one, its `max_length`) allows."""
    eos = config.eos_token_id
    max_new_tokens = max_new_tokens or config.max_new_tokens
    limit = 1 + max_new_tokens if max_new_tokens is not None else config.max_length
    return torch.tensor([eos] if isinstance(eos, int) else list(eos)), limit


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
    kwargs = dict(generate_kwargs)
    eos_ids, limit = eos_ids_and_limit(config, kwargs.pop("max_new_tokens", None))
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
    return padded_after_eos(rows, eos_ids, config.pad_token_id, hidden.device)


def padded_after_eos(rows: list, eos_ids: torch.Tensor, pad_token_id: int, device) -> torch.LongTensor:
    """(len(rows), width) ids from 1-D rows (decoder start first): each row up to its first EOS (the whole row if it has
    none), then `pad_token_id`; as wide as the longest of them, as `generate()` returns a batch."""
    ends = []
    for row in rows:
        eos_at = torch.isin(row[1:].cpu(), eos_ids.cpu()).nonzero()
        ends.append(int(eos_at[0, 0]) + 2 if len(eos_at) else len(row))
    padded = torch.full((len(rows), max(ends)), pad_token_id, dtype=torch.long, device=device)
    for index, (row, end) in enumerate(zip(rows, ends)):
        padded[index, :end] = row[:end]
    return padded


#: `generate()` options that `beam_search_dropping_finished` takes (the others fall back to one `generate()` call).
BEAM_DROP_SAFE_OPTIONS = frozenset({"do_sample", "num_beams", "max_new_tokens", "logits_processor", "length_penalty", "early_stopping"})
#: Columns by which `beam_search_dropping_finished` grows its sequence tensors.
STATE_COLUMNS = 64
#: Generation-config fields with which `generate()`'s beam search adds logits processors or stopping criteria that
#: `beam_search_dropping_finished` does not, and the value (besides None or empty) with which they add none: it runs
#: only where every one of them has such a value.
BEAM_DROP_NEUTRAL_FIELDS = {
    **dict.fromkeys(("repetition_penalty", "encoder_repetition_penalty"), 1.0),
    **dict.fromkeys(("no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "min_length", "diversity_penalty"), 0),
    **dict.fromkeys(("remove_invalid_values", "renormalize_logits", "low_memory"), False),
    "num_beam_groups": 1,
    **dict.fromkeys((
        "bad_words_ids", "begin_suppress_tokens", "constraints", "exponential_decay_length_penalty", "force_words_ids",
        "forced_bos_token_id", "forced_eos_token_id", "guidance_scale", "max_time", "min_new_tokens", "sequence_bias",
        "stop_strings", "suppress_tokens", "watermarking_config",
    )),
}


def adds_no_processors(generation_config) -> bool:
    """Whether a generation config's `BEAM_DROP_NEUTRAL_FIELDS` all add nothing to what `generate()` applies."""
    if generation_config is None:
        return False
    values = ((getattr(generation_config, name, None), neutral) for name, neutral in BEAM_DROP_NEUTRAL_FIELDS.items())
    return all(value is None or value == neutral or value in ([], {}) for value, neutral in values)


def beam_search_drops_finished(generate_kwargs: dict[str, Any], generation_config) -> bool:
    """Whether `beam_search_dropping_finished` can run this decoding: beam search (`num_beams` >= 2, no sampling) with
    only `BEAM_DROP_SAFE_OPTIONS`, under a generation config whose `BEAM_DROP_NEUTRAL_FIELDS` all add nothing."""
    beams = generate_kwargs.get("num_beams") or getattr(generation_config, "num_beams", 1) or 1
    sampling = generate_kwargs.get("do_sample", getattr(generation_config, "do_sample", False))
    if beams < 2 or sampling or not set(generate_kwargs) <= BEAM_DROP_SAFE_OPTIONS:
        return False
    return adds_no_processors(generation_config)


def beam_search_dropping_finished(
    model,
    encoder_outputs: BaseModelOutput,
    num_beams: Optional[int] = None,
    logits_processor: Optional[LogitsProcessorList] = None,
    max_new_tokens: Optional[int] = None,
    length_penalty: Optional[float] = None,
    early_stopping: Optional[bool | str] = None,
    do_sample: bool = False,
) -> torch.LongTensor:
    """`model.generate(encoder_outputs=..., num_beams=...)` for a batch of windows, with each window set aside as soon
    as its result is settled. `generate()` runs beam search for all the windows of a batch until the last one is done;
    here the decoder runs on fewer rows as the windows finish, so a batch costs what its windows need, not what its
    longest window needs times the batch size (with 4 beams, the rows are 4 per window: the waste is 4 times that of
    greedy search, which `generate_in_rounds` avoids).

    Each step is `generate()`'s beam search step, made of `GenerationMixin`'s own beam search helpers
    (`_get_top_k_continuations`, `_get_running_beams_for_next_iteration`, `_update_finished_beams`,
    `_check_early_stop_heuristic`); those treat every window apart, except that the loop runs until all windows are
    done. A window whose early-stop check has failed (or, with `early_stopping=True`, whose beams are all finished)
    can no longer change its finished hypotheses, so dropping it gives the ids `generate()` returns for it.
    Where `generate()` fills a row after its EOS with EOS, this pads it with `pad_token_id`, like `generate_in_rounds`.

    Args:
        num_beams, max_new_tokens, length_penalty, early_stopping: as for `generate()` (default: the model's
            generation config).
        logits_processor: applied to the log-probabilities at each step, as `generate()` does for beam search.
        do_sample: must be False (beam sampling is left to `generate()`).

    Returns:
        (batch, length) ids: decoder start first, then the best beam of each window up to its EOS, then padding.
    """
    config = model.generation_config
    defaults = GenerationConfig._get_default_generation_params()  # what generate() uses where the config has None

    def setting(value, name):
        for candidate in (value, getattr(config, name, None), defaults.get(name)):
            if candidate is not None:
                return candidate

    num_beams = setting(num_beams, "num_beams")
    if num_beams < 2 or do_sample:
        raise ValueError(f"beam_search_dropping_finished needs num_beams >= 2 and do_sample=False, got {num_beams} and {do_sample}.")
    length_penalty = setting(length_penalty, "length_penalty")
    early_stopping = setting(early_stopping, "early_stopping")
    max_new_tokens = max_new_tokens or config.max_new_tokens
    max_length = 1 + max_new_tokens if max_new_tokens is not None else setting(None, "max_length")  # start included
    eos = config.eos_token_id
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos))
    hidden = encoder_outputs.last_hidden_state
    device, windows = hidden.device, hidden.shape[0]
    if not windows:
        raise ValueError("beam_search_dropping_finished needs at least one window.")
    logits_processor = logits_processor or LogitsProcessorList()
    stopping_criteria = StoppingCriteriaList([MaxLengthCriteria(max_length), EosTokenCriteria(eos_ids.to(device))])
    beams_to_keep = max(2, 1 + len(eos_ids)) * num_beams
    top_num_beam_mask = torch.arange(beams_to_keep, device=device) < num_beams

    # generate()'s beam search state, one entry per running window (`window` maps them to the input's rows). The
    # sequence tensors are grown `STATE_COLUMNS` columns at a time instead of made `max_length` wide at once: the
    # helpers copy them whole at every step, and most windows end long before `max_length`.
    fill = config.pad_token_id if config.pad_token_id else eos_ids[0].item()  # generate()'s fill value
    running_sequences = torch.full((windows, num_beams, 1), config.decoder_start_token_id, dtype=torch.long, device=device)
    sequences = running_sequences.clone()
    running_beam_indices = torch.full((windows, num_beams, 0), -1, dtype=torch.int32, device=device)
    beam_indices = running_beam_indices.clone()
    running_beam_scores = torch.zeros((windows, num_beams), device=device)
    running_beam_scores[:, 1:] = -1e9
    beam_scores = torch.full((windows, num_beams), -1e9, device=device)
    is_sent_finished = torch.zeros((windows, num_beams), dtype=torch.bool, device=device)
    improvable = torch.ones((windows, 1), dtype=torch.bool, device=device)
    window = torch.arange(windows, device=device)
    memory = BaseModelOutput(last_hidden_state=hidden.repeat_interleave(num_beams, dim=0))
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    best: list = [None] * windows
    reorder = getattr(model, "_reorder_cache", None)  # generate() prefers the model's own, as here
    cur_len = 1
    while True:
        batch = len(window)
        if running_sequences.shape[2] <= cur_len:  # room for the token chosen at this step
            more = min(STATE_COLUMNS, max_length - running_sequences.shape[2])
            running_sequences, sequences = (F.pad(state, (0, more), value=fill) for state in (running_sequences, sequences))
            running_beam_indices, beam_indices = (F.pad(state, (0, more), value=-1) for state in (running_beam_indices, beam_indices))
        flat = running_sequences[:, :, :cur_len].reshape(batch * num_beams, cur_len)
        inputs = model.prepare_inputs_for_generation(
            flat, next_sequence_length=1 if cur_len > 1 else None, past_key_values=cache, encoder_outputs=memory,
            use_cache=True,
        )
        outputs = model(**inputs, return_dict=True)
        cache = outputs.past_key_values
        log_probs = F.log_softmax(outputs.logits[:, -1, :].float(), dim=-1)
        del outputs
        log_probs = logits_processor(flat, log_probs)
        log_probs = (log_probs.view(batch, num_beams, -1) + running_beam_scores[:, :, None]).view(batch, -1)
        topk_log_probs, topk_running_sequences, topk_running_beam_indices = model._get_top_k_continuations(
            accumulated_log_probs=log_probs, running_sequences=running_sequences,
            running_beam_indices=running_beam_indices, cur_len=cur_len, decoder_prompt_len=1, do_sample=False,
            beams_to_keep=beams_to_keep, num_beams=num_beams, batch_size=batch,
        )
        hits = stopping_criteria(topk_running_sequences[:, :, : cur_len + 1].reshape(batch * beams_to_keep, -1), None)
        hits = hits.view(batch, beams_to_keep)
        running_sequences, running_beam_scores, running_beam_indices = model._get_running_beams_for_next_iteration(
            topk_log_probs=topk_log_probs, topk_running_sequences=topk_running_sequences,
            topk_running_beam_indices=topk_running_beam_indices, next_token_hits_stopping_criteria=hits,
            num_beams=num_beams,
        )
        sequences, beam_scores, beam_indices, is_sent_finished = model._update_finished_beams(
            sequences=sequences, topk_running_sequences=topk_running_sequences, beam_scores=beam_scores,
            topk_log_probs=topk_log_probs, beam_indices=beam_indices, topk_running_beam_indices=topk_running_beam_indices,
            is_early_stop_heuristic_unsatisfied=improvable, is_sent_finished=is_sent_finished,
            next_token_hits_stopping_criteria=hits, top_num_beam_mask=top_num_beam_mask, num_beams=num_beams,
            cur_len=cur_len, decoder_prompt_len=1, length_penalty=length_penalty, early_stopping=early_stopping,
        )
        beam_idx = running_beam_indices[..., cur_len - 1].reshape(-1)
        cur_len += 1
        improvable = model._check_early_stop_heuristic(
            is_early_stop_heuristic_unsatisfied=improvable, running_beam_scores=running_beam_scores,
            beam_scores=beam_scores, is_sent_finished=is_sent_finished, cur_len=cur_len, max_length=max_length,
            decoder_prompt_len=1, early_stopping=early_stopping, length_penalty=length_penalty,
        )
        # generate()'s stop for the whole batch, per window: a window is settled once its finished hypotheses can no
        # longer improve, or (early_stopping=True) it has no open beam, or every continuation hit a stopping criterion.
        # From then on its `sequences` stay as they are, so it may be set aside at any later step.
        settled = ~improvable[:, 0] | (is_sent_finished.all(dim=1) & (early_stopping is True)) | hits.all(dim=1)
        count = int(settled.sum())
        # Each drop copies the cache: drop once an eighth of the windows have settled (or the last one has).
        drop = count >= max(1, batch // 8)
        if drop:
            for row in settled.nonzero()[:, 0].tolist():
                best[window[row]] = sequences[row, 0]
            if count == batch:
                break
        if reorder is not None:
            cache = reorder(cache, beam_idx)
        else:
            cache.reorder_cache(beam_idx)
        if drop:  # set the settled windows aside: out of the cache and the state
            keep = (~settled).nonzero()[:, 0]
            rows = (keep[:, None] * num_beams + torch.arange(num_beams, device=device)).reshape(-1)
            cache.batch_select_indices(rows)
            memory = BaseModelOutput(last_hidden_state=memory.last_hidden_state[rows])
            running_sequences, running_beam_scores = running_sequences[keep], running_beam_scores[keep]
            running_beam_indices, sequences, beam_scores = running_beam_indices[keep], sequences[keep], beam_scores[keep]
            beam_indices, is_sent_finished, improvable = beam_indices[keep], is_sent_finished[keep], improvable[keep]
            window = window[keep]
    # Each window's best beam up to its first EOS (generate() fills the rest with EOS), padded like generate_in_rounds.
    return padded_after_eos(best, eos_ids, config.pad_token_id, device)


#: `generate()` options that `generate_continuously` takes: greedy search with the model's generation config.
CONTINUOUS_SAFE_OPTIONS = frozenset({"do_sample", "num_beams", "max_new_tokens", "logits_processor"})
#: Key positions by which `generate_continuously` grows (and shrinks) its self-attention cache.
POOL_COLUMNS = 16


def decodes_continuously(generate_kwargs: dict[str, Any], generation_config) -> bool:
    """Whether `generate_continuously` can run this decoding: greedy search (one beam, no sampling) with only
    `CONTINUOUS_SAFE_OPTIONS`, under a generation config that adds no logits processors (`adds_no_processors`)."""
    beams = generate_kwargs.get("num_beams") or getattr(generation_config, "num_beams", 1) or 1
    sampling = generate_kwargs.get("do_sample", getattr(generation_config, "do_sample", False))
    if beams != 1 or sampling or not set(generate_kwargs) <= CONTINUOUS_SAFE_OPTIONS:
        return False
    return adds_no_processors(generation_config)


class PoolLayer(DynamicLayer):
    """One decoder layer's self-attention keys and values for the rows of a `PoolCache`, each row at its own length:
    (rows, heads, `pool.width`, head_dim) buffers. `update` writes each row's new key and value at that row's position
    (`pool.positions`) and returns the whole buffers; what a row has not written is masked by the caller."""

    def __init__(self, pool: "PoolCache"):
        super().__init__()
        self.pool = pool

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        rows, heads, _, size = key_states.shape
        # Zeros, not empty memory: masked scores are still computed, and garbage could hold NaN.
        self.keys = key_states.new_zeros((rows, heads, self.pool.width, size))
        self.values = value_states.new_zeros((rows, heads, self.pool.width, size))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        width = self.pool.width
        if self.keys.shape[2] != width:  # grown with zeros, or shrunk to a compact copy
            more = max(0, width - self.keys.shape[2])
            self.keys = F.pad(self.keys[:, :, :width], (0, 0, 0, more)).contiguous()
            self.values = F.pad(self.values[:, :, :width], (0, 0, 0, more)).contiguous()
        rows = torch.arange(len(self.keys), device=self.keys.device)  # indexing, not scatter_: 30x faster in bfloat16
        self.keys[rows, :, self.pool.positions] = key_states[:, :, 0]
        self.values[rows, :, self.pool.positions] = value_states[:, :, 0]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.pool.width - 1

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys, self.values = self.keys[indices], self.values[indices]


class PoolCache(Cache):
    """Self-attention cache of `generate_continuously`: one `PoolLayer` per decoder layer, rows at different lengths.

    Before each decoder step the caller sets `positions` (each row's position of the token it feeds) and `width`
    (key positions kept, more than the largest position); the decoder then sees `width - 1` cached positions, and its
    `attention_mask` (rows, width) must allow each row the keys up to its position."""

    def __init__(self, num_layers: int):
        super().__init__(layers=[PoolLayer(self) for _ in range(num_layers)])
        self.width = POOL_COLUMNS
        self.positions = torch.zeros(0, dtype=torch.long)


def pool_rows(live: int, rows: int) -> int:
    """Rows `generate_continuously` keeps for `live` windows in a pool of `rows`: halved while the live windows fit
    (16 -> 8 -> 4 -> 2 -> 1 for the default pool), so that a pool running out of windows passes through few batch
    sizes. Under bfloat16 autocast, each new batch size makes oneDNN build kernels for every matrix product of the
    decoder and keep them in its primitive cache: shrinking one row at a time would build them for every size from
    the pool's down."""
    while rows > 1 and live <= rows // 2:
        rows //= 2
    return rows


def generate_continuously(
    model,
    windows: Iterable[tuple[torch.Tensor, T]],
    pool_size: int,
    logits_processor: Optional[LogitsProcessorList] = None,
    max_new_tokens: Optional[int] = None,
    bf16: bool = False,
    num_beams: Optional[int] = None,
    do_sample: Optional[bool] = None,
) -> Iterator[tuple[torch.LongTensor, T]]:
    """Greedy search over a stream of encoded windows with continuous batching: the decoder runs on a pool of up to
    `pool_size` windows, each at its own length, and a window that reaches EOS hands its row to the next window at
    once. Every step then decodes a full pool, where a batch decoded to its end (`generate_in_rounds`) thins out as its
    windows finish; the memory is that of the pool, whatever the number of windows. Once no window is left, a
    row whose window ends idles (feeding the decoder start, its output unused) until the live windows fit in half
    the rows (`pool_rows`), so the pool passes through few batch sizes on its way out.

    Each window gets the ids greedy `generate(encoder_outputs=...)` gives it alone, up to floating-point rounding:
    its keys sit among other rows' and padding in the cache, masked. The logits processors see each row's ids
    right-aligned, left-padded with `pad_token_id`, the decoder start before the first generated token.

    Args:
        windows: (encoder output (columns, hidden), payload) per window; the payload comes back with its ids.
        pool_size: windows decoded together.
        logits_processor, max_new_tokens: as for `generate()` (default: the model's generation config).
        bf16: run each step under bfloat16 autocast on the model's device.
        num_beams, do_sample: only 1 and False (greedy search); see `decodes_continuously`.

    Yields:
        (ids, payload) per window, in the order of `windows`: the ids are 1-D, decoder start first, up to and with
        EOS (or until `max_new_tokens`).
    """
    if pool_size < 1:
        raise ValueError(f"pool_size must be >= 1, got {pool_size}.")
    if (num_beams or 1) != 1 or do_sample:
        raise ValueError(f"generate_continuously is greedy search: num_beams=1, do_sample=False; got {num_beams} and {do_sample}.")
    config = model.generation_config
    eos_ids, limit = eos_ids_and_limit(config, max_new_tokens)
    start, pad = config.decoder_start_token_id, config.pad_token_id if config.pad_token_id is not None else 0
    logits_processor = logits_processor or LogitsProcessorList()
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    device = model.device
    source = iter(windows)
    done: dict[int, torch.Tensor] = {}
    payloads: dict[int, Any] = {}
    taken = emitted = 0

    def take(count: int) -> list[torch.Tensor]:
        nonlocal taken
        hidden = []
        for hidden_states, payload in itertools.islice(source, count):
            hidden.append(hidden_states)
            payloads[taken] = payload
            taken += 1
        return hidden

    def steps():  # inference mode and autocast entered per step: the caller's code runs between the yields
        return torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    first = take(pool_size)
    if not first:
        return
    inference, autocast = steps()
    with inference, autocast:
        cross = DynamicCache()
        for index, (keys, values) in enumerate(decoder.cross_attention_keys_values(torch.stack(first).to(device))):
            cross.update(keys, values, index)
        pool = PoolCache(len(decoder.layers))
        cache = EncoderDecoderCache(pool, cross)
        window = torch.arange(len(first))  # the window each row decodes
        fed = torch.zeros(len(first), dtype=torch.long, device=device)  # tokens in the cache per row
        last = torch.full_like(fed, start)  # the token each row feeds next
        ids = last[:, None].clone()  # tokens so far per row, right-aligned (left of them: padding)
    del first
    while bool((window >= 0).any()):
        inference, autocast = steps()
        with inference, autocast:
            pool.positions = fed
            needed = int(fed.max()) + 1
            if needed > pool.width or needed <= pool.width - 4 * POOL_COLUMNS:
                pool.width = min(-(-needed // POOL_COLUMNS) * POOL_COLUMNS, limit)
            mask = torch.arange(pool.width, device=device)[None] <= fed[:, None]
            hidden = decoder(
                last[:, None], None, attention_mask=mask, past_key_values=cache, use_cache=True,
                time_steps=current_time_steps(ids, model.config)[:, -1:], position_ids=fed[:, None],
            ).last_hidden_state
            scores = head(hidden[:, -1]).float()
            ids = ids[:, -needed:]
            chosen = logits_processor(ids, scores).argmax(dim=-1)
            ids = torch.cat([ids, chosen[:, None]], dim=1)
            fed, last = fed + 1, chosen
            ended = (torch.isin(chosen, eos_ids.to(device)) | (fed + 1 >= limit)).cpu() & (window >= 0)
            for row in ended.nonzero()[:, 0].tolist():
                done[int(window[row])] = ids[row, -(int(fed[row]) + 1) :].clone()
                new = take(1)
                window[row] = taken - 1 if new else -1  # -1: no window left, the row idles until the pool shrinks
                if new:  # its cross-attention keys and values, one window at a time: the same shapes every time
                    for layer, (keys, values) in zip(cross.layers, decoder.cross_attention_keys_values(new[0][None].to(device))):
                        layer.keys[row], layer.values[row] = keys[0], values[0]
            restart = ended | (window < 0)  # new windows, and idle rows, which keep feeding the decoder start
            if bool(restart.any()):
                on_device = restart.to(device)
                fed, last = fed.masked_fill(on_device, 0), last.masked_fill(on_device, start)
                ids[on_device] = pad
                ids[on_device, -1] = start
                rows = pool_rows(int((window >= 0).sum()), len(window))
                if rows < len(window):  # the live rows, and idle ones up to `rows`, in their order
                    keep = torch.argsort((window < 0).to(torch.int8), stable=True)[:rows].sort().values
                    for layer in (*pool.layers, *cross.layers):
                        layer.batch_select_indices(keep.to(device))
                    on_device = keep.to(device)
                    window, fed, last, ids = window[keep], fed[on_device], last[on_device], ids[on_device]
        while emitted in done:
            yield done.pop(emitted), payloads.pop(emitted)
            emitted += 1


__all__ = [
    "NoteEventGrammarLogitsProcessor",
    "beam_search_drops_finished",
    "PoolCache",
    "beam_search_dropping_finished",
    "decodes_continuously",
    "decodes_in_rounds",
    "generate_continuously",
    "generate_in_rounds",
    "with_note_grammar",
]
