"""NoteEventGrammarLogitsProcessor: it accepts every sequence the tokenizer writes, refuses what breaks the grammar,
and the processor and pipeline decode with it."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LogitsProcessorList, MinLengthLogitsProcessor, pipeline

from sound2sheet import Sound2SheetForConditionalGeneration, Sound2SheetProcessor, Sound2SheetTokenizer
from sound2sheet.generation_sound2sheet import NoteEventGrammarLogitsProcessor, with_note_grammar
from sound2sheet.notes import Note

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
