"""Sound2SheetConfig and Sound2SheetForConditionalGeneration: decoding, caching, saving, loading, encoder import."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import ASTConfig, ASTModel, AutoConfig, AutoModel, AutoModelForSpeechSeq2Seq, LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import DynamicCache

from sound2sheet import Sound2SheetConfig, Sound2SheetForConditionalGeneration, Sound2SheetModel
from sound2sheet.modeling_sound2sheet import TIME_BIAS_BEHIND, attend, current_time_steps, interpolate_position_embeddings, shift_tokens_right

from .model_tester import TINY_FRAMES, TINY_MELS, Sound2SheetModelTester

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tester():
    return Sound2SheetModelTester()


@pytest.fixture(scope="module")
def model(tester):
    return tester.get_model()


def assert_same_tensors(first: dict, second: dict):
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


# --- configuration -----------------------------------------------------------------------------------------------


def test_config_defaults_and_nested_encoder():
    config = Sound2SheetConfig()
    assert config.model_type == "sound2sheet"
    assert isinstance(config.encoder_config, ASTConfig)
    assert (config.encoder_config.hidden_size, config.encoder_config.time_stride) == (256, 2)
    assert config.encoder_grid == (8, 121)
    assert config.encoder_seconds_per_column == pytest.approx(0.02)
    assert config.encoder_pretrained == "MIT/ast-finetuned-audioset-10-10-0.4593"
    assert (config.pad_token_id, config.eos_token_id, config.bos_token_id, config.decoder_start_token_id) == (0, 1, 2, 2)
    assert config.is_encoder_decoder is True
    assert config.num_hidden_layers == config.num_decoder_layers


def test_config_partial_encoder_dict_keeps_compact_defaults():
    config = Sound2SheetConfig(encoder_config={"num_hidden_layers": 1, "time_stride": 4})
    assert config.encoder_config.hidden_size == 256
    assert config.encoder_config.num_hidden_layers == 1
    assert config.encoder_grid == (8, 61)


def test_config_round_trip(tmp_path):
    config = Sound2SheetConfig(num_decoder_layers=3, encoder_config={"time_stride": 1})
    config.save_pretrained(tmp_path)
    loaded = Sound2SheetConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.encoder_config.time_stride == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"hidden_size": 30, "num_attention_heads": 4}, "hidden_size (30) must be divisible by num_attention_heads (4)"),
        ({"vocab_size": 10, "eos_token_id": 12}, "eos_token_id=12 is outside the vocabulary (vocab_size=10)"),
        ({"num_decoder_layers": 0}, "num_decoder_layers must be a positive integer, got 0"),
    ],
)
def test_config_rejects_inconsistent_sizes(kwargs, message):
    with pytest.raises(ValueError) as error:
        Sound2SheetConfig(**kwargs)
    assert message in str(error.value)


# --- forward -----------------------------------------------------------------------------------------------------


def test_shift_tokens_right():
    labels = torch.tensor([[5, 6, 1], [7, -100, -100]])
    assert shift_tokens_right(labels, 0, 2).tolist() == [[2, 5, 6], [2, 7, 0]]


def test_forward_loss_ignores_padding(tester, model):
    inputs, labels = tester.get_inputs(), tester.get_labels()
    output = model(inputs, labels=labels)
    assert output.logits.shape == (2, labels.shape[1], tester.vocab_size)
    decoder_input_ids = shift_tokens_right(labels, 0, 2)
    logits = model(inputs, decoder_input_ids=decoder_input_ids).logits
    mask = labels != -100
    expected = torch.nn.functional.cross_entropy(logits[mask], labels[mask])
    assert torch.allclose(output.loss, expected, atol=1e-6)
    # what the padded positions hold must not matter
    changed = labels.clone()
    changed[changed == -100] = -100
    assert torch.equal(model(inputs, labels=changed).loss, output.loss)


def test_forward_rejects_wrong_feature_shape(model):
    with pytest.raises(ValueError, match=r"input_values must have shape \(batch, 64 frames, 32 mel bins\).*got \(1, 50, 32\)"):
        model(torch.zeros(1, 50, 32), decoder_input_ids=torch.tensor([[2]]))


def test_loss_falls_when_training_on_one_batch(tester):
    model = tester.get_model().train()
    inputs, labels = tester.get_inputs(), tester.get_labels()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_frame_loss_adds_weighted_binary_cross_entropy_to_the_token_loss(tester):
    model = tester.get_model(frame_loss_weight=2.5)
    rows, columns = model.config.encoder_grid
    inputs, labels = tester.get_inputs(), tester.get_labels()
    frame_labels = (torch.rand(2, columns, 256, generator=torch.Generator().manual_seed(3)) < 0.1).float()
    output = model(inputs, labels=labels, frame_labels=frame_labels)
    token_loss = model(inputs, labels=labels).loss
    frame_logits = model.frame_logits(model.get_encoder()(inputs).last_hidden_state)
    expected = token_loss + 2.5 * torch.nn.functional.binary_cross_entropy_with_logits(frame_logits, frame_labels)
    assert frame_logits.shape == (2, columns, 256)
    assert torch.allclose(output.loss, expected, atol=1e-6)
    assert not torch.allclose(output.loss, token_loss)


def test_frame_head_reads_one_column_of_encoder_tokens(tester):
    model = tester.get_model(frame_loss_weight=1.0)
    rows, columns = model.config.encoder_grid
    hidden = torch.zeros(1, 2 + rows * columns, model.config.hidden_size)
    hidden[0, 0:2] = 5.0  # the CLS and distillation tokens are not read
    for row in range(rows):
        hidden[0, 2 + row * columns + 3] = 1.0  # AST's tokens run row by row: column 3 of every frequency row
    logits = model.frame_logits(hidden)
    bias = model.frame_head.bias.detach()
    moved = [column for column in range(columns) if not torch.allclose(logits[0, column], bias)]
    assert moved == [3]
    assert torch.allclose(logits[0, 3], model.frame_head(torch.ones(rows * model.config.hidden_size)), atol=1e-6)


def test_frame_labels_need_a_frame_head_of_the_right_shape(tester, model):
    inputs = tester.get_inputs()
    with pytest.raises(ValueError, match="no frame head: build it with frame_loss_weight > 0"):
        model(inputs, labels=tester.get_labels(), frame_labels=torch.zeros(2, 3, 256))
    with_head = tester.get_model(frame_loss_weight=1.0)
    columns = with_head.config.encoder_grid[1]
    with pytest.raises(ValueError, match=rf"frame_labels must have shape \(2, {columns}, 256\), got \(2, 3, 256\)"):
        with_head(inputs, labels=tester.get_labels(), frame_labels=torch.zeros(2, 3, 256))
    with pytest.raises(ValueError, match="frame_loss_weight must be >= 0"):
        tester.get_config(frame_loss_weight=-1.0)


def test_frame_grid_gives_the_centres_of_the_encoder_columns(tester):
    config = tester.get_config(encoder_config={"patch_size": 16, "time_stride": 4, "max_length": 256, "num_mel_bins": 128, "frequency_stride": 16})
    assert config.frame_grid == (0.075, 0.04, 61)  # patch over frames 0-15 is centred at 7.5 frames


def test_a_frame_head_added_to_a_checkpoint_is_new_and_the_rest_is_kept(tester, model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = Sound2SheetForConditionalGeneration.from_pretrained(tmp_path, frame_loss_weight=1.0)
    assert loaded.config.frame_loss_weight == 1.0 and loaded.frame_head is not None
    inputs = tester.get_inputs()
    assert torch.equal(loaded.generate(inputs, max_new_tokens=8), model.generate(inputs, max_new_tokens=8))


def test_frame_offsets_give_the_head_a_third_set_of_outputs(tester):
    assert tester.get_config().frame_offsets is False
    assert tester.get_model(frame_loss_weight=1.0).frame_head.out_features == 256
    model = tester.get_model(frame_loss_weight=2.5, frame_offsets=True)
    rows, columns = model.config.encoder_grid
    assert (model.frame_head.out_features, model.frame_head.in_features) == (384, rows * model.config.hidden_size)
    inputs, labels = tester.get_inputs(), tester.get_labels()
    hidden = model.get_encoder()(inputs).last_hidden_state
    assert model.frame_logits(hidden).shape == model.frame_probabilities(hidden).shape == (2, columns, 384)
    # the frame loss takes 384-wide labels, and tells the shape it needs
    frame_labels = (torch.rand(2, columns, 384, generator=torch.Generator().manual_seed(3)) < 0.1).float()
    token_loss = model(inputs, labels=labels).loss
    expected = token_loss + 2.5 * torch.nn.functional.binary_cross_entropy_with_logits(model.frame_logits(hidden), frame_labels)
    assert torch.allclose(model(inputs, labels=labels, frame_labels=frame_labels).loss, expected, atol=1e-6)
    with pytest.raises(ValueError, match=rf"frame_labels must have shape \(2, {columns}, 384\), got \(2, {columns}, 256\)"):
        model(inputs, labels=labels, frame_labels=frame_labels[..., :256])
    with pytest.raises(ValueError, match="frame_offsets are outputs of the frame head: set frame_loss_weight > 0"):
        tester.get_config(frame_offsets=True)


def test_a_config_saved_before_frame_offsets_loads_without_them(tester, tmp_path):
    tester.get_config(frame_loss_weight=1.0).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved.pop("frame_offsets", None)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert Sound2SheetConfig.from_pretrained(tmp_path).frame_offsets is False


def test_add_frame_offsets_keeps_the_onset_and_sounding_outputs_and_round_trips(tester, tmp_path):
    model = tester.get_model(frame_loss_weight=1.0)
    hidden = model.get_encoder()(tester.get_inputs()).last_hidden_state
    before = model.frame_probabilities(hidden)
    old_weight, old_bias = model.frame_head.weight.detach().clone(), model.frame_head.bias.detach().clone()
    model.add_frame_offsets()
    assert model.config.frame_offsets is True and model.frame_head.out_features == 384
    assert torch.equal(model.frame_head.weight[:256], old_weight) and torch.equal(model.frame_head.bias[:256], old_bias)
    after = model.frame_probabilities(hidden)
    assert after.shape == (*before.shape[:2], 384) and torch.equal(after[..., :256], before)
    # the offset rows start as copies of the onset rows: offsets predicted where and as rarely as onsets are
    assert torch.equal(model.frame_head.weight[256:], old_weight[:128]) and torch.equal(model.frame_head.bias[256:], old_bias[:128])
    assert torch.equal(after[..., 256:], before[..., :128])
    assert model.frame_head.weight.requires_grad
    head = model.frame_head
    model.add_frame_offsets()  # already there: nothing changes
    assert model.frame_head is head
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["frame_offsets"] is True
    assert load_file(tmp_path / "model.safetensors")["frame_head.weight"].shape == (384, head.in_features)
    loaded = Sound2SheetForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.frame_offsets and loaded.frame_head.out_features == 384
    assert_same_tensors(model.state_dict(), loaded.state_dict())
    assert torch.equal(loaded.frame_probabilities(hidden), after)
    with pytest.raises(ValueError, match="no frame head to add offsets to: build it with frame_loss_weight > 0"):
        tester.get_model().add_frame_offsets()


def test_column_memory_is_one_projected_token_per_time_column(tester):
    model = tester.get_model(encoder_memory="columns")
    rows, columns = model.config.encoder_grid
    encoder = model.get_encoder()
    inputs = tester.get_inputs()
    memory = encoder(inputs).last_hidden_state
    assert memory.shape == (2, columns, model.config.hidden_size)
    # By hand: AST's patch tokens run row by row; column c is rows 0..R-1 of column c side by side.
    patches = encoder.ast(inputs).last_hidden_state[:, 2:]
    width = patches.shape[-1]
    column_3 = torch.cat([patches[:, row * columns + 3] for row in range(rows)], dim=-1)
    assert column_3.shape == (2, rows * width)
    expected = encoder.layer_norm(encoder.projection(column_3) + encoder.column_positions.weight[3])
    assert torch.allclose(memory[:, 3], expected, atol=1e-5)
    # The frame head reads the column token itself.
    with_head = tester.get_model(encoder_memory="columns", frame_loss_weight=1.0)
    assert with_head.frame_head.in_features == with_head.config.hidden_size
    hidden = torch.randn(1, columns, with_head.config.hidden_size)
    assert torch.allclose(with_head.frame_logits(hidden), with_head.frame_head(hidden))


def test_column_memory_decodes_the_same_cached_and_uncached(tester):
    model = tester.get_model(encoder_memory="columns")
    inputs = tester.get_inputs()
    for kwargs in ({}, {"num_beams": 3}):
        cached = model.generate(inputs, max_new_tokens=30, use_cache=True, **kwargs)
        uncached = model.generate(inputs, max_new_tokens=30, use_cache=False, **kwargs)
        assert cached.shape[1] > 10
        assert torch.equal(cached, uncached)


def test_unknown_encoder_memory_is_a_clear_error(tester):
    with pytest.raises(ValueError, match=r"encoder_memory must be one of \('patches', 'columns'\), got 'rows'"):
        tester.get_config(encoder_memory="rows")


def test_a_checkpoint_switched_to_column_memory_keeps_its_encoder_and_decoder(tester, model, tmp_path):
    model.save_pretrained(tmp_path)
    switched = Sound2SheetForConditionalGeneration.from_pretrained(tmp_path, encoder_memory="columns", ignore_mismatched_sizes=True)
    assert switched.config.encoder_memory == "columns"
    rows, _ = switched.config.encoder_grid
    assert switched.get_encoder().projection.in_features == rows * switched.config.encoder_config.hidden_size
    before, after = model.state_dict(), switched.state_dict()
    kept = [name for name in before if name.startswith(("model.encoder.ast.", "model.decoder.")) or name == "lm_head.weight"]
    assert len(kept) > 20
    for name in kept:
        assert torch.equal(before[name], after[name]), name


class _FavourTimeTokens(LogitsProcessor):
    """Pushes every third step towards a time token, so that random tiny models move their decoding time."""

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] % 3 == 1:
            scores = scores.clone()
            scores[:, 4:261] += 50.0
        return scores


@pytest.fixture(scope="module")
def time_biased_model(tester):
    model = tester.get_model(encoder_memory="columns", cross_attention_time_bias=True)
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            layer.cross_attn.time_bias.normal_(0.0, 0.4, generator=torch.Generator().manual_seed(5))
    return model


def test_current_time_steps_follow_the_last_time_token(tester):
    config = tester.get_config()
    ids = torch.tensor([[2, 300, 422, 14, 380, 270, 30, 300, 4], [2, 422, 260, 300, 0, 0, 0, 0, 0]])
    assert current_time_steps(ids, config).tolist() == [[0, 0, 0, 10, 10, 10, 26, 26, 0], [0, 0, 256, 256, 256, 256, 256, 256, 256]]


def test_time_bias_buckets_are_column_distances_from_the_current_time(tester):
    model = tester.get_model(encoder_memory="columns", cross_attention_time_bias=True)
    first, step, columns = model.config.frame_grid
    assert (first, step, columns) == (0.075, 0.02, 25)  # tiny model: a column every 2 steps, the first at 7.5 steps
    buckets = model.model.decoder.time_buckets(torch.tensor([[0, 40]]))
    assert buckets.shape == (1, 2, columns)
    # Column c is centred at 7.5 + 2c steps: (7.5 + 2c - 40) / 2 = c - 16.25 columns from step 40.
    assert [buckets[0, 1, c].item() - TIME_BIAS_BEHIND for c in (15, 16, 17, 24)] == [-1, 0, 1, 8]
    assert buckets[0, 1, 0].item() == 0  # 16 columns behind: clamped to the last bucket behind
    assert buckets[0, 0, 24].item() - TIME_BIAS_BEHIND == 28  # (7.5 + 48) / 2 = 27.75 columns ahead of step 0


def test_time_bias_starts_at_zero_and_needs_column_memory(tester):
    plain = tester.get_model(encoder_memory="columns")
    biased = tester.get_model(encoder_memory="columns", cross_attention_time_bias=True)
    inputs = tester.get_inputs()
    tokens = torch.tensor([[2, 422, 14, 380, 270, 30]] * 2)
    assert torch.allclose(plain(inputs, decoder_input_ids=tokens).logits, biased(inputs, decoder_input_ids=tokens).logits, atol=1e-6)
    with pytest.raises(ValueError, match="cross_attention_time_bias needs encoder_memory='columns'"):
        tester.get_config(cross_attention_time_bias=True)


def test_a_column_checkpoint_switched_to_the_time_bias_decodes_as_before(tester, tmp_path):
    plain = tester.get_model(encoder_memory="columns")
    plain.save_pretrained(tmp_path)
    switched = Sound2SheetForConditionalGeneration.from_pretrained(tmp_path, cross_attention_time_bias=True).eval()
    for layer in switched.model.decoder.layers:
        assert torch.equal(layer.cross_attn.time_bias, torch.zeros_like(layer.cross_attn.time_bias))
    inputs = tester.get_inputs()
    favour = LogitsProcessorList([_FavourTimeTokens()])
    assert torch.equal(switched.generate(inputs, max_new_tokens=20, logits_processor=favour),
                       plain.generate(inputs, max_new_tokens=20, logits_processor=favour))


def test_time_bias_changes_attention_and_cached_decoding_equals_uncached(tester, time_biased_model):
    model, inputs = time_biased_model, tester.get_inputs()
    tokens = torch.tensor([[2, 422, 14, 380, 270, 30, 300, 60]] * 2)
    full = model(inputs, decoder_input_ids=tokens).logits
    unbiased = tester.get_model(encoder_memory="columns", cross_attention_time_bias=True)
    assert not torch.allclose(full, unbiased(inputs, decoder_input_ids=tokens).logits, atol=1e-3)
    # Step by step with a cache, given the current times, gives the teacher-forced logits.
    encoder_outputs, past, steps = model.get_encoder()(inputs), None, []
    times = current_time_steps(tokens, model.config)
    for i in range(tokens.shape[1]):
        out = model(encoder_outputs=encoder_outputs, decoder_input_ids=tokens[:, i : i + 1], past_key_values=past,
                    use_cache=True, decoder_time_steps=times[:, i : i + 1])
        past = out.past_key_values
        steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    with pytest.raises(ValueError, match="needs decoder_time_steps"):
        model(encoder_outputs=encoder_outputs, decoder_input_ids=tokens[:, -1:], past_key_values=past, use_cache=True)
    # generate() passes the times itself, for greedy and beam search.
    favour = LogitsProcessorList([_FavourTimeTokens()])
    for kwargs in ({}, {"num_beams": 3}):
        cached = model.generate(inputs, max_new_tokens=30, use_cache=True, logits_processor=favour, **kwargs)
        uncached = model.generate(inputs, max_new_tokens=30, use_cache=False, logits_processor=favour, **kwargs)
        assert ((cached >= 4) & (cached < 261)).sum() >= 10  # time tokens were decoded
        assert torch.equal(cached, uncached)


# --- generation --------------------------------------------------------------------------------------------------


def test_cached_and_uncached_greedy_give_identical_tokens(tester, model):
    inputs = tester.get_inputs()
    cached = model.generate(inputs, max_new_tokens=40, use_cache=True)
    uncached = model.generate(inputs, max_new_tokens=40, use_cache=False)
    assert cached.shape[1] > 10
    assert torch.equal(cached, uncached)


def test_cached_and_uncached_beam_search_give_identical_tokens(tester, model):
    inputs = tester.get_inputs()
    kwargs = dict(max_new_tokens=30, num_beams=3, num_return_sequences=2, length_penalty=0.8)
    cached = model.generate(inputs, use_cache=True, **kwargs)
    uncached = model.generate(inputs, use_cache=False, **kwargs)
    assert cached.shape[0] == 4
    assert torch.equal(cached, uncached)


def test_cached_step_logits_equal_uncached_logits(tester, model):
    """The cache path itself: feeding one token at a time gives the logits of the full teacher-forced pass."""
    inputs = tester.get_inputs()
    tokens = torch.tensor([[2, 10, 300, 45, 7, 99]] * inputs.shape[0])
    full = model(inputs, decoder_input_ids=tokens).logits
    encoder_outputs = model.get_encoder()(inputs)
    past, steps = None, []
    for i in range(tokens.shape[1]):
        out = model(encoder_outputs=encoder_outputs, decoder_input_ids=tokens[:, i : i + 1], past_key_values=past, use_cache=True)
        past = out.past_key_values
        steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    # a multi-token step after a cached prefix (offset causal mask)
    prefix = model(encoder_outputs=encoder_outputs, decoder_input_ids=tokens[:, :2], use_cache=True)
    rest = model(encoder_outputs=encoder_outputs, decoder_input_ids=tokens[:, 2:], past_key_values=prefix.past_key_values, use_cache=True)
    assert torch.allclose(rest.logits, full[:, 2:], atol=1e-5)


def test_cross_attention_keys_are_computed_once_per_window(tester, model, monkeypatch):
    inputs = tester.get_inputs(batch_size=1)
    calls = []
    k_proj = model.model.decoder.layers[0].cross_attn.k_proj
    original = k_proj.forward
    monkeypatch.setattr(k_proj, "forward", lambda x: calls.append(x.shape) or original(x))
    generated = model.generate(inputs, max_new_tokens=12, min_new_tokens=12, use_cache=True)
    assert generated.shape[1] == 13
    assert len(calls) == 1


def test_teacher_forced_argmax_equals_greedy(tester, model):
    inputs = tester.get_inputs()
    greedy = model.generate(inputs, max_new_tokens=25)
    logits = model(inputs, decoder_input_ids=greedy[:, :-1]).logits
    predicted = logits.argmax(-1)
    for row in range(greedy.shape[0]):
        generated = greedy[row, 1:]
        eos_positions = (generated == model.config.eos_token_id).nonzero()
        length = int(eos_positions[0]) + 1 if len(eos_positions) else generated.shape[0]
        assert torch.equal(predicted[row, :length], generated[:length])


@pytest.mark.parametrize(
    "strategy",
    [
        dict(),
        dict(num_beams=4, length_penalty=1.5),
        dict(num_beams=4, num_return_sequences=3),
        dict(do_sample=True, temperature=0.7),
        dict(do_sample=True, top_k=5),
        dict(do_sample=True, top_p=0.8, num_return_sequences=2),
    ],
    ids=["greedy", "beam", "beam-return-3", "sample-temperature", "sample-top-k", "sample-top-p"],
)
def test_every_strategy_respects_max_new_tokens(tester, model, strategy):
    torch.manual_seed(0)
    inputs = tester.get_inputs()
    out = model.generate(inputs, max_new_tokens=7, **strategy)
    assert out.shape == (inputs.shape[0] * strategy.get("num_return_sequences", 1), 8)
    assert (out[:, 0] == model.config.decoder_start_token_id).all()


@pytest.fixture(scope="module")
def memorizing_model(tester):
    """A tiny model trained to answer every input with the tokens 5 6 7 EOS."""
    model = tester.get_model().train()
    inputs = tester.get_inputs()
    labels = torch.tensor([[5, 6, 7, 1]] * inputs.shape[0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        model(inputs, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize(
    "strategy",
    [dict(), dict(num_beams=3), dict(num_beams=3, num_return_sequences=2), dict(do_sample=True, top_k=1)],
    ids=["greedy", "beam", "beam-return-2", "sample"],
)
def test_every_strategy_stops_at_eos(tester, memorizing_model, strategy):
    inputs = tester.get_inputs()
    out = memorizing_model.generate(inputs, max_new_tokens=30, **strategy)
    rows = out.tolist()
    assert rows[0][: rows[0].index(1) + 1] == [2, 5, 6, 7, 1]
    assert out.shape[1] < 10  # stopped at EOS, well before max_new_tokens
    for row in rows:
        assert 1 in row
        assert all(token in (0, 1) for token in row[row.index(1) + 1 :])  # only padding after EOS


def test_generation_defaults_come_from_generation_config(model, tmp_path):
    assert model.generation_config.max_new_tokens == model.config.max_target_positions - 1
    assert model.generation_config.decoder_start_token_id == 2
    model.generation_config.num_beams = 3
    model.save_pretrained(tmp_path)
    try:
        saved = json.loads((tmp_path / "generation_config.json").read_text())
        assert saved["num_beams"] == 3
        assert Sound2SheetForConditionalGeneration.from_pretrained(tmp_path).generation_config.num_beams == 3
    finally:
        model.generation_config.num_beams = 1


def test_decoding_past_max_target_positions_is_a_clear_error(tester, model):
    with pytest.raises(ValueError, match="exceeds max_target_positions=64"):
        model(tester.get_inputs(), decoder_input_ids=torch.full((2, 65), 5))


# --- parameters --------------------------------------------------------------------------------------------------


def test_freeze_and_unfreeze_change_parameter_counts(tester):
    model = tester.get_model()
    counts = model.count_parameters()
    ast_params = sum(p.numel() for p in model.model.encoder.ast.parameters())
    assert counts == {"total": counts["total"], "trainable": counts["total"], "frozen": 0}
    model.freeze_encoder()
    assert model.count_parameters() == {"total": counts["total"], "trainable": counts["total"] - ast_params, "frozen": ast_params}
    model.unfreeze_encoder()
    assert model.count_parameters() == counts
    frozen_at_start = tester.get_model(freeze_encoder=True)
    assert frozen_at_start.count_parameters()["frozen"] == ast_params


def test_lm_head_is_tied_and_counted_once(model):
    assert model.lm_head.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    names = {name for name, _ in model.named_parameters()}
    assert "lm_head.weight" not in names
    assert model.count_parameters()["total"] == sum(p.numel() for p in model.parameters())


# --- saving and loading ------------------------------------------------------------------------------------------


def save_pickled(model, folder: Path) -> Path:
    """A checkpoint as older tools write it: config.json and a pickled pytorch_model.bin, no safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "the pickle ran code"))


def test_pickled_weights_are_refused_unless_allowed(model, tmp_path):
    folder = save_pickled(model, tmp_path / "old")
    with pytest.raises(OSError) as refused:
        Sound2SheetForConditionalGeneration.from_pretrained(folder)
    assert str(refused.value).startswith(f"{folder}: has only pickled weights (pytorch_model.bin), which can run code when loaded; ")
    assert "allow_pickle=True" in str(refused.value)
    with pytest.raises(ValueError, match="use_safetensors=False loads pickled weights"):
        Sound2SheetForConditionalGeneration.from_pretrained(folder, use_safetensors=False)
    loaded = Sound2SheetForConditionalGeneration.from_pretrained(folder, allow_pickle=True)
    assert_same_tensors(model.state_dict(), loaded.state_dict())


def test_allowed_pickles_still_cannot_run_code(model, tmp_path):
    folder = save_pickled(model, tmp_path / "evil")
    marker = tmp_path / "pwned.txt"
    state = dict(model.state_dict())
    state["payload"] = _RunsCodeWhenUnpickled(marker)
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        Sound2SheetForConditionalGeneration.from_pretrained(folder, allow_pickle=True)
    assert not marker.exists()


def test_cli_refuses_pickled_weights_with_one_line(run_transcription, model, tmp_path, audio_files, capsys):
    folder = save_pickled(model, tmp_path / "old")
    code = run_transcription.main(["transcribe", str(audio_files["wav"]), "--model", str(folder), "--output_dir", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --model {folder}: cannot load a Sound2Sheet model ({folder}: has only pickled weights")
    assert "\n" not in err


def test_save_and_load_restore_every_tensor(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = Sound2SheetForConditionalGeneration.from_pretrained(tmp_path)
    assert_same_tensors(model.state_dict(), loaded.state_dict())


def test_trainer_style_state_dict_load_restores_every_tensor(tester, model, tmp_path):
    """Trainer resume/load-best does a raw load_state_dict of the saved file: the AST weights must keep their names."""
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert any(name.startswith("model.encoder.ast.layers.") for name in saved)
    fresh = Sound2SheetForConditionalGeneration(model.config)
    result = fresh.load_state_dict(saved, strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys == ["lm_head.weight"]  # tied to the token embedding, stored once
    assert_same_tensors(model.state_dict(), fresh.state_dict())


def test_auto_classes_load_a_saved_folder(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), Sound2SheetConfig)
    seq2seq = AutoModelForSpeechSeq2Seq.from_pretrained(tmp_path)
    assert isinstance(seq2seq, Sound2SheetForConditionalGeneration)
    assert_same_tensors(model.state_dict(), seq2seq.state_dict())
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, Sound2SheetModel)
    assert_same_tensors(model.model.state_dict(), base.state_dict())


def fill_hub_cache(cache_dir: Path, repo_id: str, folder: Path, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """Lay out `folder` in a Hugging Face cache the way huggingface_hub writes a downloaded snapshot."""
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    blobs = repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for index, file in enumerate(sorted(folder.iterdir())):
        blob = blobs / f"{index:040x}"
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def run_python(code: str, env_extra: dict, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.mark.slow
def test_hub_id_loads_from_an_offline_cache(model, tmp_path):
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    cache = tmp_path / "hub"
    fill_hub_cache(cache, "sound2sheet-test/tiny-piano", folder)
    expected = float(sum(t.double().sum() for t in model.state_dict().values()))
    result = run_python(
        """
        import sound2sheet
        from transformers import AutoModelForSpeechSeq2Seq
        model = AutoModelForSpeechSeq2Seq.from_pretrained("sound2sheet-test/tiny-piano")
        print(type(model).__name__, repr(float(sum(t.double().sum() for t in model.state_dict().values()))))
        try:
            AutoModelForSpeechSeq2Seq.from_pretrained("sound2sheet-test/not-cached")
        except OSError as err:
            print("missing:", type(err).__name__)
        """,
        {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)},
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == f"Sound2SheetForConditionalGeneration {expected!r}"
    assert lines[1] == "missing: OSError"


@pytest.mark.slow
def test_remote_code_folder_loads_without_the_package(tester, tmp_path):
    model = tester.get_model()
    model.config.register_for_auto_class()
    model.register_for_auto_class("AutoModelForSpeechSeq2Seq")
    folder = tmp_path / "remote"
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSpeechSeq2Seq"] == "modeling_sound2sheet.Sound2SheetForConditionalGeneration"
    assert (folder / "modeling_sound2sheet.py").exists() and (folder / "configuration_sound2sheet.py").exists()
    expected = model.generate(tester.get_inputs(), max_new_tokens=10).tolist()
    torch.save(tester.get_inputs(), tmp_path / "inputs.pt")
    result = run_python(
        f"""
        import importlib.abc, sys, torch
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "sound2sheet" or name.startswith("sound2sheet."):
                    raise ImportError("sound2sheet is not installed here")
        sys.meta_path.insert(0, Block())
        from transformers import AutoModelForSpeechSeq2Seq
        model = AutoModelForSpeechSeq2Seq.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert "sound2sheet" not in sys.modules
        inputs = torch.load({str(tmp_path / 'inputs.pt')!r})
        print(model.generate(inputs, max_new_tokens=10).tolist())
        """,
        {"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"},
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(expected)


# --- pretrained encoder ------------------------------------------------------------------------------------------


def test_position_embedding_interpolation_keeps_special_tokens_and_smooth_grids():
    rows, cols, hidden = 3, 5, 4
    grid = torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols)
    patches = grid.reshape(1, rows * cols, 1).expand(1, rows * cols, hidden)
    special = torch.randn(1, 2, hidden)
    embeddings = torch.cat([special, patches], dim=1)
    resized = interpolate_position_embeddings(embeddings, (rows, cols), (6, 10))
    assert resized.shape == (1, 2 + 60, hidden)
    assert torch.equal(resized[:, :2], special)
    values = resized[0, 2:, 0].reshape(6, 10)
    assert values.min() >= grid.min() and values.max() <= grid.max()
    assert (values.diff(dim=1) >= 0).all() and (values.diff(dim=0) >= 0).all()  # a ramp stays a ramp
    assert torch.equal(interpolate_position_embeddings(embeddings, (rows, cols), (rows, cols)), embeddings)


def test_encoder_weights_import_from_a_local_ast_with_other_patching(tester, tmp_path):
    source_config = ASTConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        patch_size=16, frequency_stride=10, time_stride=10, max_length=128, num_mel_bins=TINY_MELS,
    )
    torch.manual_seed(3)
    source = ASTModel(source_config)
    with torch.no_grad():
        source.embeddings.position_embeddings.normal_()
    source.save_pretrained(tmp_path / "ast")
    config = tester.get_config()
    model = Sound2SheetForConditionalGeneration.from_encoder_pretrained(config, encoder_source=tmp_path / "ast")
    encoder = model.model.encoder.ast
    assert model.config.encoder_config.hidden_size == 48  # the checkpoint's size...
    assert (model.config.encoder_config.time_stride, model.config.encoder_config.max_length) == (2, TINY_FRAMES)  # ...our patching
    assert model.config.encoder_pretrained == str(tmp_path / "ast")
    source_state, imported = source.state_dict(), encoder.state_dict()
    for name, tensor in source_state.items():
        if name != "embeddings.position_embeddings":
            assert torch.equal(imported[name], tensor), name
    assert source_config.num_mel_bins == TINY_MELS
    assert source_state["embeddings.position_embeddings"].shape == (1, 2 + 2 * 12, 48)
    assert imported["embeddings.position_embeddings"].shape == (1, 2 + 2 * 25, 48)
    expected = interpolate_position_embeddings(source_state["embeddings.position_embeddings"], (2, 12), (2, 25))
    assert torch.equal(imported["embeddings.position_embeddings"], expected)
    out = model.generate(tester.get_inputs(), max_new_tokens=3)
    assert out.shape == (2, 4)


def test_encoder_import_rejects_other_patch_size(tester, tmp_path):
    ASTModel(ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, patch_size=8,
                       max_length=64, num_mel_bins=TINY_MELS)).save_pretrained(tmp_path / "ast8")
    with pytest.raises(ValueError, match="uses 8x8 patches but the configuration asks for 16x16"):
        Sound2SheetForConditionalGeneration.from_encoder_pretrained(tester.get_config(), encoder_source=tmp_path / "ast8")


def test_missing_encoder_source_is_a_clear_error(tester, tmp_path, monkeypatch):
    missing = tmp_path / "no-such-ast"
    with pytest.raises(OSError, match=f"Cannot load pretrained AST encoder weights from '{missing}'"):
        Sound2SheetForConditionalGeneration.from_encoder_pretrained(tester.get_config(), encoder_source=missing)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="Cannot load pretrained AST encoder weights from 'MIT/ast-finetuned-audioset-10-10-0.4593'"):
        Sound2SheetForConditionalGeneration.from_encoder_pretrained(tester.get_config(), cache_dir=str(tmp_path / "empty-cache"))


def test_beam_search_reorders_only_the_self_attention_cache(tester, model, monkeypatch):
    """Beams never move between windows and share their window's encoder output: the cross-attention cache stays."""
    reordered = []
    original = DynamicCache.reorder_cache

    def spy(cache, beam_idx):
        reordered.append(cache)
        return original(cache, beam_idx)

    monkeypatch.setattr(DynamicCache, "reorder_cache", spy)
    out = model.generate(tester.get_inputs(), max_new_tokens=12, num_beams=3, return_dict_in_generate=True)
    cache = out.past_key_values
    assert reordered and all(seen is cache.self_attention_cache for seen in reordered)
    rows = cache.cross_attention_cache.layers[0].keys
    assert rows.shape[0] == 2 * 3 and all(torch.equal(rows[3 * w], rows[3 * w + b]) for w in range(2) for b in range(3))


def test_a_bfloat16_decoding_step_attends_in_float32_on_the_cpu():
    generator = torch.Generator().manual_seed(0)
    query, keys, values = (torch.randn(3, 2, length, 8, generator=generator).bfloat16() for length in (1, 5, 5))
    bias = torch.randn(3, 2, 1, 5, generator=generator).bfloat16()
    mask = torch.tensor([[True] * 5, [True, True, False, False, False], [True, False, True, False, True]])[:, None, None]
    for attention_mask in (bias, mask, None):
        float_mask = attention_mask.float() if attention_mask is not None and attention_mask.is_floating_point() else attention_mask
        expected = torch.nn.functional.scaled_dot_product_attention(query.float(), keys.float(), values.float(), attn_mask=float_mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as transcription runs it: autocast must not lower it again
            attended = attend(query, keys, values, attention_mask, 0.0, False)
        assert attended.dtype == torch.bfloat16 and torch.equal(attended, expected.bfloat16())
    # Several queries (training, prompts) and float32 keep the stock kernel in the inputs' dtype.
    queries = torch.randn(3, 2, 4, 8, generator=generator).bfloat16()
    stock = torch.nn.functional.scaled_dot_product_attention(queries, keys, values, is_causal=False)
    assert torch.equal(attend(queries, keys, values, None, 0.0, False), stock)
    assert torch.equal(
        attend(query.float(), keys.float(), values.float(), mask, 0.0, False),
        torch.nn.functional.scaled_dot_product_attention(query.float(), keys.float(), values.float(), attn_mask=mask),
    )
