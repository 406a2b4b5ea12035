"""NoteEventGrammarLogitsProcessor: it accepts every sequence the tokenizer writes, refuses what breaks the grammar,
and the processor and pipeline decode with it."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessorList, MinLengthLogitsProcessor, pipeline
from transformers.modeling_outputs import BaseModelOutput

import sound2sheet.generation_sound2sheet as generation
from sound2sheet import Sound2SheetForConditionalGeneration, Sound2SheetProcessor, Sound2SheetTokenizer
from sound2sheet.generation_sound2sheet import (
    NoteEventGrammarLogitsProcessor,
    beam_search_dropping_finished,
    beam_search_drops_finished,
    decodes_continuously,
    decodes_in_rounds,
    generate_continuously,
    generate_in_rounds,
    pool_rows,
    with_note_grammar,
)
from sound2sheet.notes import Note

from .model_tester import Sound2SheetModelTester

TOKENIZER = Sound2SheetTokenizer()
GRAMMAR = NoteEventGrammarLogitsProcessor.from_tokenizer(TOKENIZER)
VOCAB = len(TOKENIZER)
START = TOKENIZER.bos_token_id  # the decoder start token `generate` puts first


def ids(*tokens: str) -> list[int]:
    return TOKENIZER.convert_tokens_to_ids(list(tokens))


def allowed_after(*tokens: str) -> set[str]:
    mask = GRAMMAR.allowed_tokens(torch.tensor([ids(*tokens)], dtype=torch.long).reshape(1, -1), VOCAB)[0]
    return set(TOKENIZER.convert_ids_to_tokens(torch.nonzero(mask)[:, 0].tolist()))


def first_violation(sequence: list[int]) -> int | None:
    """Index of the first token of `sequence` (decoder start first) the grammar refuses, or None."""
    row = torch.tensor([sequence])
    for index in range(1, len(sequence)):
        if sequence[index] == TOKENIZER.pad_token_id:  # padding after EOS in a batch
            break
        if not GRAMMAR.allowed_tokens(row[:, 1:index], VOCAB)[0, sequence[index]]:
            return index
        if sequence[index] == TOKENIZER.eos_token_id:
            break
    return None


TIMES = {f"<t_{step}>" for step in range(257)}
PITCHES = {f"<p_{pitch}>" for pitch in range(128)}
VELOCITIES = {f"<v_{bin}>" for bin in range(33)}


def test_sequences_open_with_the_tie_section():
    assert allowed_after() == PITCHES | {"<tie>"}
    assert allowed_after("<p_60>") == {f"<p_{pitch}>" for pitch in range(61, 128)} | {"<tie>"}
    assert allowed_after("<tie>") == TIMES | {"</s>"}


def test_times_only_move_forward_and_velocity_comes_before_the_first_pitch():
    assert allowed_after("<tie>", "<t_10>") == VELOCITIES  # no velocity yet: a pitch cannot come first
    after_note = allowed_after("<tie>", "<t_10>", "<v_20>", "<p_60>")
    assert after_note == (
        {f"<t_{step}>" for step in range(11, 257)}
        | {f"<p_{pitch}>" for pitch in range(61, 128)}
        | {f"<v_{bin}>" for bin in range(1, 33) if bin != 20}  # no note-off once note-ons started at this step
        | {"</s>"}
    )
    assert "<t_10>" not in after_note and "<p_60>" not in after_note and "<p_59>" not in after_note


def test_a_new_step_restarts_the_pitch_order_and_note_offs_come_first():
    after_step = allowed_after("<tie>", "<t_10>", "<v_20>", "<p_60>", "<t_30>")
    assert after_step == PITCHES | (VELOCITIES - {"<v_20>"})
    offs = allowed_after("<tie>", "<t_10>", "<v_20>", "<p_60>", "<t_30>", "<v_0>", "<p_60>")
    assert "<p_60>" not in offs and "<p_61>" in offs and "<v_0>" not in offs and "<v_5>" in offs
    # Note-ons after the offs of the same step start their own ascending group.
    ons = allowed_after("<tie>", "<t_10>", "<v_20>", "<p_60>", "<t_30>", "<v_0>", "<p_60>", "<v_7>")
    assert ons == PITCHES
    # A pitch starts twice at one step only with a higher velocity between.
    twice = allowed_after("<tie>", "<t_10>", "<v_20>", "<p_60>", "<v_25>")
    assert "<p_60>" in twice and "<p_59>" not in twice
    assert "<p_60>" not in allowed_after("<tie>", "<t_10>", "<v_20>", "<p_60>", "<v_15>")


def test_no_state_is_a_dead_end():
    """A velocity after note-on pitch 127 must be able to take a pitch: only a higher velocity (127 again) is let
    through, so a sampler never meets a row with every token refused."""
    after_top = allowed_after("<tie>", "<t_10>", "<v_27>", "<p_127>")
    assert {f"<v_{bin}>" for bin in range(1, 33)} & after_top == {f"<v_{bin}>" for bin in range(28, 33)}
    assert allowed_after("<tie>", "<t_10>", "<v_27>", "<p_127>", "<v_30>") == {"<p_127>"}
    assert "<v_5>" in allowed_after("<tie>", "<t_10>", "<v_0>", "<p_127>")  # note-ons after note-off 127 start afresh
    rng = random.Random(7)
    for _ in range(300):  # random walks through the grammar never run out of tokens
        sequence = []
        while len(sequence) < 120:
            choices = sorted(allowed_after(*sequence))
            assert choices, sequence
            sequence.append(rng.choice(choices))
            if sequence[-1] == "</s>":
                break


def test_the_window_end_allows_no_later_time():
    after_end = allowed_after("<tie>", "<t_256>", "<v_0>", "<p_40>")
    assert not after_end & TIMES
    assert "</s>" in after_end


@pytest.mark.parametrize("seed", range(5))
def test_every_sequence_the_tokenizer_writes_is_allowed(seed):
    rng = random.Random(seed)
    for _ in range(60):
        notes = []
        for _ in range(rng.randint(0, 40)):
            onset = rng.uniform(-1.0, 2.7)
            notes.append(Note(onset=onset, offset=onset + rng.uniform(0.005, 2.0), pitch=rng.randint(21, 108), velocity=rng.randint(1, 127)))
        if notes and rng.random() < 0.3:  # the same pitch started twice at one step, with two velocities
            first = notes[0]
            notes.append(Note(onset=first.onset, offset=first.offset + 0.3, pitch=first.pitch, velocity=max(1, 128 - first.velocity)))
        sequence = [START] + TOKENIZER.encode_notes(notes, window_start=0.0)
        assert first_violation(sequence) is None, TOKENIZER.convert_ids_to_tokens(sequence)


def test_a_row_that_has_ended_is_left_alone():
    """generate() keeps scoring ended rows (then pads them): they must not get all -inf scores, or sampling fails."""
    ended = torch.tensor([[START] + ids("<tie>", "</s>", "<pad>")])
    assert GRAMMAR.allowed_tokens(ended[:, 1:], VOCAB).all()
    scores = torch.randn(1, VOCAB)
    assert torch.equal(GRAMMAR(ended, scores), scores)


def test_batched_rows_are_constrained_independently():
    rows = [[START] + ids("<p_50>", "<p_52>", "<p_55>", "<p_60>"), [START] + ids("<tie>", "<t_5>", "<v_3>", "<p_70>")]
    scores = torch.zeros(2, VOCAB)
    out = GRAMMAR(torch.tensor(rows), scores)
    assert out[0, ids("<tie>")[0]] == 0 and out[0, ids("<p_61>")[0]] == 0
    assert torch.isinf(out[0, ids("<t_5>")[0]]) and torch.isinf(out[0, ids("<p_60>")[0]])
    assert out[1, ids("<t_6>")[0]] == 0 and torch.isinf(out[1, ids("<tie>")[0]])
    assert torch.isinf(out[1, ids("<t_5>")[0]]) and torch.isinf(out[1, ids("<p_70>")[0]])


def test_with_note_grammar_adds_to_the_callers_processors_once():
    own = MinLengthLogitsProcessor(3, eos_token_id=1)
    kwargs = with_note_grammar({"num_beams": 2, "logits_processor": LogitsProcessorList([own])}, TOKENIZER)
    assert kwargs["num_beams"] == 2
    assert [type(p) for p in kwargs["logits_processor"]] == [MinLengthLogitsProcessor, NoteEventGrammarLogitsProcessor]
    assert len(with_note_grammar(kwargs, TOKENIZER)["logits_processor"]) == 2
    assert "logits_processor" not in with_note_grammar({"grammar": False}, TOKENIZER)


def test_transcription_decodes_within_the_grammar_and_unconstrained_decoding_does_not(tiny_model_dir, audio_files):
    """The tiny random model writes ungrammatical tokens by itself; the processor and the pipeline keep it in line."""
    model = Sound2SheetForConditionalGeneration.from_pretrained(tiny_model_dir)
    processor = Sound2SheetProcessor.from_pretrained(tiny_model_dir)
    windows = list(processor.iter_windows(str(audio_files["flac"])))
    free = list(processor.generate_windows(windows, model, grammar=False))
    assert any(first_violation([START] + row) is not None for row in free)
    for strategy in ({}, {"num_beams": 3}, {"do_sample": True, "top_k": 20}, {"do_sample": True, "top_p": 0.9, "temperature": 0.7}):
        constrained = list(processor.generate_windows(windows, model, **strategy))
        assert len(constrained) == len(windows)
        for row in constrained:
            assert first_violation([START] + row) is None, TOKENIZER.convert_ids_to_tokens(row)
    transcriber = pipeline("automatic-speech-recognition", model=str(tiny_model_dir))
    text = transcriber(str(audio_files["flac"]))["text"]
    for window in text.split(" | "):
        assert first_violation([START] + TOKENIZER.convert_tokens_to_ids(window.split())) is None, window


@pytest.fixture(scope="module")
def rows_of_several_lengths():
    """A tiny model, six encoded inputs, and the grammar: greedy rows end at 28, 31 and 39 tokens (two each)."""
    tester = Sound2SheetModelTester(batch_size=6)
    model = tester.get_model(max_target_positions=64)
    with torch.inference_mode():
        encoder_outputs = model.get_encoder()(tester.get_inputs())
    return model, encoder_outputs, LogitsProcessorList([GRAMMAR])


@pytest.mark.parametrize("round_tokens", [1, 3, 64])
def test_decoding_in_rounds_gives_the_ids_of_one_generate_call(rows_of_several_lengths, round_tokens, monkeypatch):
    model, encoder_outputs, grammar = rows_of_several_lengths
    with torch.inference_mode():
        one_call = model.generate(encoder_outputs=encoder_outputs, logits_processor=grammar, max_new_tokens=40)
        lengths = (one_call != TOKENIZER.pad_token_id).sum(dim=1).tolist()
        assert lengths == [29, 29, 32, 32, 40, 40]  # rows end at different steps (decoder start, ..., EOS)
        assert (one_call == TOKENIZER.eos_token_id).sum(dim=1).tolist() == [1, 1, 1, 1, 1, 1]
        batches = []
        generate = model.generate

        def spy(*args, **kwargs):
            batches.append(kwargs["encoder_outputs"].last_hidden_state.shape[0])
            return generate(*args, **kwargs)

        monkeypatch.setattr(model, "generate", spy)
        in_rounds = generate_in_rounds(model, encoder_outputs, round_tokens, logits_processor=grammar, max_new_tokens=40)
    assert torch.equal(in_rounds, one_call)
    # Finished rows are set aside: later rounds decode only the rows still running.
    expected = {1: [6] * 28 + [4] * 3 + [2] * 8, 3: [6] * 10 + [4] + [2] * 2, 64: [6]}[round_tokens]
    assert batches == expected


def test_decoding_in_rounds_keeps_to_max_new_tokens(rows_of_several_lengths):
    model, encoder_outputs, grammar = rows_of_several_lengths
    with torch.inference_mode():
        one_call = model.generate(encoder_outputs=encoder_outputs, logits_processor=grammar, max_new_tokens=7)
        in_rounds = generate_in_rounds(model, encoder_outputs, 3, logits_processor=grammar, max_new_tokens=7)
        by_config = generate_in_rounds(model, BaseModelOutput(last_hidden_state=encoder_outputs.last_hidden_state[:2]), 5)
    assert one_call.shape == (6, 8) and torch.equal(in_rounds, one_call)
    assert by_config.shape[1] <= 1 + model.generation_config.max_new_tokens
    with pytest.raises(ValueError, match="round_tokens must be >= 1, got 0"):
        generate_in_rounds(model, encoder_outputs, 0)


def test_only_greedy_search_and_sampling_decode_in_rounds(rows_of_several_lengths):
    config = rows_of_several_lengths[0].generation_config
    assert decodes_in_rounds({}, config) and decodes_in_rounds({"do_sample": True, "top_k": 5, "max_new_tokens": 9}, config)
    assert not decodes_in_rounds({"num_beams": 4}, config)
    assert not decodes_in_rounds({"min_new_tokens": 3}, config)  # counted from the start of every call
    assert not decodes_in_rounds({"stopping_criteria": []}, config)


def up_to_eos(row: torch.Tensor) -> torch.Tensor:
    return row[row != TOKENIZER.pad_token_id]


@pytest.mark.parametrize("pool_columns", [4, 16])
@pytest.mark.parametrize("pool_size, expected_rows", [
    (1, [1] * (28 * 2 + 31 * 2 + 39 * 2)),  # one window after the other
    (2, [2] * (28 + 31 + 39)),  # windows 0-1 end together, 2-3 take their rows, then 4-5
    (4, [4] * 31 + [2] * (28 + 39 - 31)),  # 4-5 take 0-1's rows at step 28; 2-3 end at 31 and leave the pool
    (8, [6] * 31 + [3] * 8),  # all six at once; 0-1 end at 28 and idle, the pool halves when only 2-3 are left
])
def test_continuous_batching_gives_each_window_the_ids_of_generate(
    rows_of_several_lengths, pool_size, expected_rows, pool_columns, monkeypatch
):
    model, encoder_outputs, grammar = rows_of_several_lengths
    monkeypatch.setattr(generation, "POOL_COLUMNS", pool_columns)  # 4: the cache grows and shrinks many times
    hidden = encoder_outputs.last_hidden_state
    with torch.inference_mode():
        one_call = model.generate(encoder_outputs=encoder_outputs, logits_processor=grammar, max_new_tokens=40)
    rows = []
    decoder = model.get_decoder()
    forward = decoder.forward

    def spy(input_ids, *args, **kwargs):
        rows.append(input_ids.shape[0])
        return forward(input_ids, *args, **kwargs)

    monkeypatch.setattr(decoder, "forward", spy)
    windows = ((hidden[index], f"window {index}") for index in range(len(hidden)))
    out = list(generate_continuously(model, windows, pool_size, logits_processor=grammar, max_new_tokens=40))
    assert [payload for _, payload in out] == [f"window {index}" for index in range(6)]  # in the input's order
    for (ids, _), expected in zip(out, one_call):
        assert torch.equal(ids, up_to_eos(expected))
    assert rows == expected_rows  # every step decodes a full pool while windows are left, then halves


def test_a_pool_running_out_of_windows_halves_while_its_live_windows_fit():
    assert [pool_rows(live, 24) for live in (24, 13, 12, 7, 6, 4, 3, 2, 1)] == [24, 24, 12, 12, 6, 6, 3, 3, 1]
    assert [pool_rows(live, 3) for live in (3, 2, 1)] == [3, 3, 1] and pool_rows(1, 1) == 1
    # One live window left in a pool of 24 passes through 24, 12, 6, 3, 1 rows, not through every size from 23 down.
    sizes, rows = [], 24
    for live in range(24, 0, -1):
        rows = pool_rows(live, rows)
        sizes.append(rows)
    assert sorted(set(sizes), reverse=True) == [24, 12, 6, 3, 1]


def test_continuous_batching_keeps_to_max_new_tokens_and_checks_its_arguments(rows_of_several_lengths):
    model, encoder_outputs, grammar = rows_of_several_lengths
    hidden = encoder_outputs.last_hidden_state
    with torch.inference_mode():
        one_call = model.generate(encoder_outputs=encoder_outputs, logits_processor=grammar, max_new_tokens=7)
    out = list(generate_continuously(model, ((row, None) for row in hidden), 4, logits_processor=grammar, max_new_tokens=7))
    assert torch.equal(torch.stack([ids for ids, _ in out]), one_call)
    assert list(generate_continuously(model, iter(()), 4)) == []
    with pytest.raises(ValueError, match="pool_size must be >= 1, got 0"):
        list(generate_continuously(model, ((row, None) for row in hidden), 0))
    with pytest.raises(ValueError, match="greedy search: num_beams=1, do_sample=False; got 2 and None"):
        list(generate_continuously(model, ((row, None) for row in hidden), 4, num_beams=2))


def test_only_plain_greedy_search_decodes_continuously(rows_of_several_lengths):
    config = rows_of_several_lengths[0].generation_config
    assert decodes_continuously({}, config) and decodes_continuously({"max_new_tokens": 9, "logits_processor": []}, config)
    assert not decodes_continuously({"do_sample": True}, config)
    assert not decodes_continuously({"num_beams": 4}, config)
    assert not decodes_continuously({"min_new_tokens": 3}, config)
    assert not decodes_continuously({}, GenerationConfig(**{**config.to_dict(), "repetition_penalty": 1.2}))


def test_transcription_decodes_greedy_search_continuously_with_the_ids_of_generate(tiny_model_dir, audio_files):
    model = Sound2SheetForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    processor = Sound2SheetProcessor.from_pretrained(tiny_model_dir)
    windows = list(processor.iter_windows(str(audio_files["flac"])))
    inputs = processor.feature_extractor(windows, sampling_rate=processor.feature_extractor.sampling_rate, return_tensors="pt")
    with torch.inference_mode():
        expected = model.generate(inputs["input_values"], **with_note_grammar({}, TOKENIZER))
    for ahead in (False, True):
        rows = list(processor.generate_windows(windows, model, batch_size=2, bf16=False, encode_ahead=ahead))
        assert rows == [up_to_eos(row)[1:].tolist() for row in expected]


def test_generate_continues_from_the_cache_it_returned(rows_of_several_lengths):
    """`prepare_inputs_for_generation` feeds only the tokens the cache has not seen."""
    model, encoder_outputs, grammar = rows_of_several_lengths
    with torch.inference_mode():
        one_call = model.generate(encoder_outputs=encoder_outputs, logits_processor=grammar, max_new_tokens=12)
        first = model.generate(
            encoder_outputs=encoder_outputs, logits_processor=grammar, max_new_tokens=5, return_dict_in_generate=True
        )
        assert first.past_key_values.get_seq_length() == 5  # the last token is not fed yet
        second = model.generate(
            encoder_outputs=encoder_outputs,
            decoder_input_ids=first.sequences,
            past_key_values=first.past_key_values,
            logits_processor=grammar,
            max_new_tokens=None,
            max_length=13,
        )
    assert torch.equal(second, one_call)


def best_beams(sequences: torch.Tensor) -> list[list[int]]:
    """Each row up to its first EOS (after it, generate() fills beam search rows with EOS, the rounds with padding)."""
    rows = []
    for row in sequences.tolist():
        end = row.index(TOKENIZER.eos_token_id, 1) + 1 if TOKENIZER.eos_token_id in row[1:] else len(row)
        rows.append(row[:end])
    return rows


@pytest.mark.parametrize(
    "options, decoder_rows",
    [
        ({"num_beams": 4}, [24] * 40),  # no window is settled before max_new_tokens
        ({"num_beams": 2}, [12] * 29 + [8] * 2 + [4] * 9),  # two windows settle after 29 steps, two after 31
        ({"num_beams": 2, "early_stopping": True}, [12] * 29 + [8] * 2 + [4] * 9),
        ({"num_beams": 4, "length_penalty": -2.0}, [24] * 40),
        ({"num_beams": 3, "length_penalty": -1.0, "max_new_tokens": 9}, [18] * 9),
    ],
    ids=["4-beams", "2-beams", "early-stopping", "length-penalty", "max-new-tokens"],
)
def test_beam_search_dropping_finished_gives_the_ids_of_generate(rows_of_several_lengths, options, decoder_rows):
    model, encoder_outputs, grammar = rows_of_several_lengths
    hidden = encoder_outputs.last_hidden_state
    options = {"max_new_tokens": 40, **options}
    rows = []
    hook = model.get_decoder().register_forward_hook(lambda module, args, output: rows.append(output.last_hidden_state.shape[0]))
    try:
        with torch.inference_mode():  # generate() expands the encoder output it is given in place: one each
            one_call = model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), logits_processor=grammar, **options)
            steps_of_generate, rows[:] = len(rows), []
            dropping = beam_search_dropping_finished(model, BaseModelOutput(last_hidden_state=hidden), logits_processor=grammar, **options)
    finally:
        hook.remove()
    assert best_beams(dropping) == best_beams(one_call)
    ends = (dropping == TOKENIZER.eos_token_id).cumsum(dim=1) > 0
    assert (dropping[ends.roll(1, dims=1) & ends] == TOKENIZER.pad_token_id).all()  # padding after each row's EOS
    assert rows == decoder_rows and len(rows) == steps_of_generate


def test_beam_search_drops_finished_windows_only_where_it_equals_generate(rows_of_several_lengths):
    model = rows_of_several_lengths[0]
    config = model.generation_config
    assert beam_search_drops_finished({"num_beams": 4}, config)
    assert beam_search_drops_finished({"num_beams": 2, "do_sample": False, "logits_processor": [], "early_stopping": True}, config)
    # a saved generation config spells out the values that add no logits processor
    assert beam_search_drops_finished({"num_beams": 4}, GenerationConfig(repetition_penalty=1.0, no_repeat_ngram_size=0, min_length=0))
    assert not beam_search_drops_finished({}, config)  # greedy search: decoded in rounds instead
    assert not beam_search_drops_finished({"num_beams": 4, "do_sample": True}, config)
    assert not beam_search_drops_finished({"num_beams": 4, "min_new_tokens": 2}, config)
    assert not beam_search_drops_finished({"num_beams": 4}, GenerationConfig(repetition_penalty=1.3))
    assert not beam_search_drops_finished({"num_beams": 4}, GenerationConfig(num_beams=4, bad_words_ids=[[7]]))
    with pytest.raises(ValueError, match="needs num_beams >= 2 and do_sample=False, got 1 and False"):
        beam_search_dropping_finished(model, rows_of_several_lengths[1], num_beams=1)
