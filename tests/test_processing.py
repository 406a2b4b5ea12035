"""Sound2SheetProcessor: model inputs, long-audio transcription with stitching, the pipeline."""

from __future__ import annotations

import itertools
import math
import re
import threading
import time

import numpy as np
import pytest
import soundfile
import torch
from transformers import AutoProcessor, LogitsProcessorList, pipeline

from sound2sheet import (
    Note,
    Sound2SheetFeatureExtractor,
    Sound2SheetForConditionalGeneration,
    Sound2SheetPipeline,
    Sound2SheetProcessor,
    Sound2SheetTokenizer,
    read_midi,
)
from sound2sheet.feature_extraction_sound2sheet import load_audio
from sound2sheet.generation_sound2sheet import NoteEventGrammarLogitsProcessor
from sound2sheet.processing_sound2sheet import (
    BATCH_SIZE,
    BEAM_BATCH_SIZE,
    CONTINUOUS_POOL_SIZE,
    ONE_CALL_BATCH_SIZE,
    default_batch_size,
    add_missed_onsets,
    clip_notes,
    in_background,
    resolve_encode_ahead,
    cpu_has_fast_bf16,
    end_notes_on_sustain,
    onset_peaks,
    place_notes_on_onsets,
    refine_notes_with_frames,
    decode_owned_notes,
    FrameEvidence,
    WINDOW_OVERLAP,
    window_ownership,
    resolve_refine_notes,
    strategy_generate_kwargs,
)

from .conftest import piano_like, save_tiny_model

PROCESSOR = Sound2SheetProcessor(Sound2SheetFeatureExtractor(), Sound2SheetTokenizer())


class ScriptedModel:
    """A model stand-in whose generate() answers window k with the tokens of `notes` for that window."""

    device = torch.device("cpu")

    def __init__(self, tokenizer, notes, window_seconds=2.56):
        self.tokenizer, self.notes, self.window_seconds = tokenizer, notes, window_seconds
        self.calls, self.next_window = [], 0

    def generate(self, input_values, **kwargs):
        self.calls.append((tuple(input_values.shape), kwargs))
        rows = []
        for _ in range(input_values.shape[0]):
            start = self.next_window * self.window_seconds
            rows.append([self.tokenizer.bos_token_id] + self.tokenizer.encode_notes(self.notes, window_start=start))
            self.next_window += 1
        width = max(map(len, rows))
        return torch.tensor([row + [self.tokenizer.pad_token_id] * (width - len(row)) for row in rows])


def test_call_makes_inputs_and_padded_labels():
    notes = [Note(0.5, 1.0, 60, 90)]
    batch = PROCESSOR(audio=[piano_like(2.56, 16000), piano_like(1.0, 16000)], notes=[notes, []], sampling_rate=16000)
    assert batch["input_values"].shape == (2, 256, 128)
    expected = PROCESSOR.tokenizer.encode_notes(notes)
    assert batch["labels"][0].tolist() == expected
    assert batch["labels"][1].tolist() == [PROCESSOR.tokenizer.tie_token_id, 1] + [-100] * (len(expected) - 2)
    with pytest.raises(ValueError, match="Pass audio, notes, or both"):
        PROCESSOR()


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_transcribe_stitches_a_note_held_across_three_windows(tmp_path, batch_size):
    notes = [Note(1.0, 6.5, 60, 90), Note(0.2, 0.4, 72, 50), Note(2.5, 2.7, 64, 100), Note(6.0, 7.5, 40, 30)]
    model = ScriptedModel(PROCESSOR.tokenizer, notes)
    audio = piano_like(7.5, 16000)
    result = PROCESSOR.transcribe(audio, model, sampling_rate=16000, batch_size=batch_size, midi_path=tmp_path / "out.mid")
    velocity = PROCESSOR.tokenizer.bin_to_velocity
    tok = PROCESSOR.tokenizer
    assert result == [
        Note(0.2, 0.4, 72, velocity(tok.velocity_to_bin(50))),
        Note(1.0, 6.5, 60, velocity(tok.velocity_to_bin(90))),
        Note(2.5, 2.7, 64, velocity(tok.velocity_to_bin(100))),
        Note(6.0, 7.5, 40, velocity(tok.velocity_to_bin(30))),
    ]
    assert sum(shape[0] for shape, _ in model.calls) == 3  # 7.5 s -> three 2.56 s windows
    assert all(shape[0] <= batch_size for shape, _ in model.calls)
    from_midi = read_midi(tmp_path / "out.mid")  # MIDI ticks round times at the microsecond level
    assert [(n.pitch, n.velocity) for n in from_midi] == [(n.pitch, n.velocity) for n in result]
    times = [t for n in from_midi for t in (n.onset, n.offset)]
    assert times == pytest.approx([t for n in result for t in (n.onset, n.offset)], abs=1e-3)


def test_transcribe_passes_generation_options_and_reads_files(audio_files):
    model = ScriptedModel(PROCESSOR.tokenizer, [Note(0.5, 5.0, 50, 64)])
    notes = PROCESSOR.transcribe(audio_files["flac"], model, num_beams=3, do_sample=False)
    assert notes == [Note(0.5, 5.0, 50, 67)]  # velocity 64 -> bin 17 -> 67
    assert model.calls[0][1]["num_beams"] == 3
    assert PROCESSOR.transcribe_pitches(audio_files["flac"], ScriptedModel(PROCESSOR.tokenizer, [Note(0.5, 5.0, 50, 64)])) == [50]


def test_notes_are_cut_at_the_end_of_the_audio():
    model = ScriptedModel(PROCESSOR.tokenizer, [Note(0.5, 2.5, 50, 64), Note(1.9, 2.2, 52, 64)])
    assert PROCESSOR.transcribe(piano_like(1.0, 16000), model, sampling_rate=16000) == [Note(0.5, 1.0, 50, 67)]


def test_transcribe_with_a_real_model_is_batch_size_invariant(tiny_model_dir, audio_files):
    model = Sound2SheetForConditionalGeneration.from_pretrained(tiny_model_dir)
    processor = Sound2SheetProcessor.from_pretrained(tiny_model_dir)
    one = processor.transcribe(audio_files["flac"], model, batch_size=1)
    three = processor.transcribe(audio_files["flac"], model, batch_size=3)
    assert one == three
    array = load_audio(audio_files["flac"])
    assert processor.transcribe(array, model, sampling_rate=16000) == one


def test_the_default_batch_follows_the_decoding_strategy(tiny_model_dir, monkeypatch):
    """Decoding that sets finished windows aside takes large batches (beam search: 4 rows per window, a bit smaller);
    one generate() call per batch takes small ones."""
    model = Sound2SheetForConditionalGeneration.from_pretrained(tiny_model_dir)
    assert default_batch_size({}, model) == CONTINUOUS_POOL_SIZE == 16  # greedy search: a pool, always full
    assert default_batch_size({"do_sample": True, "top_k": 5}, model) == BATCH_SIZE
    assert default_batch_size({"num_beams": 4}, model) == BEAM_BATCH_SIZE == 32
    assert default_batch_size({"num_beams": 4, "do_sample": True}, model) == ONE_CALL_BATCH_SIZE == 4
    assert default_batch_size({"min_new_tokens": 2}, model) == ONE_CALL_BATCH_SIZE
    # transcribe() batches windows by it when no batch_size is given
    monkeypatch.setattr("sound2sheet.processing_sound2sheet.BATCH_SIZE", 2)
    model = ScriptedModel(PROCESSOR.tokenizer, [Note(0.5, 6.0, 50, 64)])
    PROCESSOR.transcribe(piano_like(7.5, 16000), model, sampling_rate=16000)
    assert [shape[0] for shape, _ in model.calls] == [2, 1]
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        PROCESSOR.transcribe(piano_like(1.0, 16000), model, sampling_rate=16000, batch_size=0)


@pytest.fixture
def two_torch_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_encoding_ahead_gives_the_same_notes_in_two_threads_of_one_torch_thread(
    frame_model_dir, audio_files, monkeypatch, two_torch_threads
):
    """With 2 torch threads, the next batch is encoded in a background thread while the current one decodes, each
    with 1 torch thread; the notes are those of encoding in turn, and torch's thread count comes back. (Beam search:
    decoded batch by batch; greedy search's continuous batching is the next test.)"""
    import sound2sheet.processing_sound2sheet as processing

    model = Sound2SheetForConditionalGeneration.from_pretrained(frame_model_dir).eval()
    processor = Sound2SheetProcessor.from_pretrained(frame_model_dir)
    seen = []

    def spy(function, stage):
        def wrapped(*args, **kwargs):
            seen.append((stage, threading.current_thread() is threading.main_thread(), torch.get_num_threads()))
            return function(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(processing, "encode_windows", spy(processing.encode_windows, "encode"))
    monkeypatch.setattr(processing, "generate_from_encoder_outputs", spy(processing.generate_from_encoder_outputs, "decode"))
    in_turn = processor.transcribe(audio_files["flac"], model, batch_size=1, encode_ahead=False, num_beams=2)
    assert seen == [("encode", True, 2), ("decode", True, 2)] * 3  # 3 windows, one at a time, in the caller's thread
    assert in_turn and torch.get_num_threads() == 2
    seen.clear()
    assert resolve_encode_ahead(None, model)
    assert processor.transcribe(audio_files["flac"], model, batch_size=1, num_beams=2) == in_turn
    # Every window is encoded in the background (1 thread), the first too (the caller waits for it), each next one
    # while the one before decodes in the caller's thread (1 thread).
    assert seen[0] == ("encode", False, 1)
    assert sorted(seen) == [("decode", True, 1)] * 3 + [("encode", False, 1)] * 3
    assert seen[1:3] in ([("encode", False, 1), ("decode", True, 1)], [("decode", True, 1), ("encode", False, 1)])
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)  # one torch thread: nothing to share out, windows are encoded in turn
    assert not resolve_encode_ahead(None, model) and resolve_encode_ahead(True, model)


def test_continuous_batching_encodes_ahead_in_one_thread_while_the_pool_decodes_in_the_other(
    frame_model_dir, audio_files, monkeypatch, two_torch_threads
):
    """Greedy search: all windows are encoded in the background with 1 thread, the pool's first ones too, while the
    pool decodes with the other; the notes are those of encoding in turn."""
    import sound2sheet.processing_sound2sheet as processing

    model = Sound2SheetForConditionalGeneration.from_pretrained(frame_model_dir).eval()
    processor = Sound2SheetProcessor.from_pretrained(frame_model_dir)
    seen = []

    def spy(function, stage):
        def wrapped(*args, **kwargs):
            entry = (stage, threading.current_thread() is threading.main_thread(), torch.get_num_threads())
            if not seen or seen[-1] != entry:  # a decoding step after another: one entry
                seen.append(entry)
            return function(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(processing, "encode_windows", spy(processing.encode_windows, "encode"))
    decoder = model.get_decoder()
    monkeypatch.setattr(decoder, "forward", spy(decoder.forward, "decode"))
    in_turn = processor.transcribe(audio_files["flac"], model, batch_size=1, encode_ahead=False)
    # 3 windows, encoded 2 at a time (ENCODER_BATCH_SIZE), decoded one after the other in a pool of 1.
    assert seen == [("encode", True, 2), ("decode", True, 2), ("encode", True, 2), ("decode", True, 2)]
    seen.clear()
    assert processor.transcribe(audio_files["flac"], model, batch_size=1) == in_turn
    assert seen[0] == ("encode", False, 1)
    assert set(seen) == {("decode", True, 1), ("encode", False, 1)}
    assert torch.get_num_threads() == 2


def test_an_error_while_encoding_ahead_comes_out_and_torch_threads_are_restored(frame_model_dir, two_torch_threads):
    model = Sound2SheetForConditionalGeneration.from_pretrained(frame_model_dir).eval()
    processor = Sound2SheetProcessor.from_pretrained(frame_model_dir)

    def windows():
        yield piano_like(2.56, 16000)
        raise ValueError("broken.flac: not a sound file")

    outputs = processor.generate_windows(windows(), model, batch_size=1, encode_ahead=True, num_beams=2)
    assert len(next(outputs)) > 0
    assert torch.get_num_threads() == 1  # shared out while the generator runs
    with pytest.raises(ValueError, match="broken.flac: not a sound file"):
        next(outputs)
    assert torch.get_num_threads() == 2
    # Greedy search reads 2 windows per encoder pass to fill its pool: the error comes out at once.
    with pytest.raises(ValueError, match="broken.flac: not a sound file"):
        list(processor.generate_windows(windows(), model, batch_size=1, encode_ahead=True))
    assert torch.get_num_threads() == 2
    two = [piano_like(2.56, 16000)] * 2
    outputs = processor.generate_windows(itertools.chain(two, windows()), model, batch_size=1, encode_ahead=True)
    assert len(next(outputs)) > 0 and torch.get_num_threads() == 1
    with pytest.raises(ValueError, match="broken.flac: not a sound file"):
        list(outputs)
    assert torch.get_num_threads() == 2


def test_in_background_keeps_order_stays_one_item_ahead_and_raises_where_the_item_would():
    events = []

    def items(count, fail_at=None):
        for index in range(count):
            events.append(("make", index))
            if index == fail_at:
                raise RuntimeError(f"item {index} failed")
            yield index

    for item in in_background(items(5)):
        time.sleep(0.02)  # time for the background thread to run ahead, if it would
        events.append(("use", item))
    assert [item for kind, item in events if kind == "use"] == list(range(5))
    for position, (kind, index) in enumerate(events):
        if kind == "make" and index >= 2:  # item k is made once item k - 2 is used, not before
            assert ("use", index - 2) in events[:position]
    events.clear()
    got = []
    with pytest.raises(RuntimeError, match="item 2 failed"):
        for item in in_background(items(5, fail_at=2)):
            got.append(item)
    assert got == [0, 1]
    stopped = in_background(items(5))
    assert next(stopped) == 0
    stopped.close()  # leaving early waits for the item being made, then stops
    assert events[-1] == ("make", 1)


@pytest.mark.parametrize(
    "args, expected",
    [
        (("greedy",), {"do_sample": False, "num_beams": 1}),
        (("beam",), {"do_sample": False, "num_beams": 4}),
        (("beam", 6), {"do_sample": False, "num_beams": 6}),
        (("sample", None, 0.8, 10, 0.9), {"do_sample": True, "num_beams": 1, "temperature": 0.8, "top_k": 10, "top_p": 0.9}),
    ],
)
def test_strategy_generate_kwargs(args, expected):
    assert strategy_generate_kwargs(*args) == expected


@pytest.mark.parametrize(
    "args, message",
    [
        (("nucleus",), "Unknown decoding strategy 'nucleus'; choose one of greedy, beam, sample."),
        (("greedy", None, 0.5), "temperature only apply to --strategy sample, not 'greedy'."),
        (("greedy", 3), "num_beams only applies to --strategy beam, not 'greedy'."),
        (("beam", 1), "Beam search needs num_beams >= 2, got 1."),
        (("sample", None, 0.0), "temperature must be > 0, got 0.0."),
        (("sample", None, None, None, 1.5), "top_p must be in (0, 1], got 1.5."),
    ],
)
def test_strategy_generate_kwargs_rejects_options_that_do_not_apply(args, message):
    with pytest.raises(ValueError) as error:
        strategy_generate_kwargs(*args)
    assert str(error.value) == message


def test_processor_save_load_and_auto_processor(tmp_path, tiny_model_dir):
    loaded = AutoProcessor.from_pretrained(tiny_model_dir)
    assert isinstance(loaded, Sound2SheetProcessor)
    assert isinstance(loaded.tokenizer, Sound2SheetTokenizer)
    assert loaded.feature_extractor.to_dict() == PROCESSOR.feature_extractor.to_dict()


# --- pipeline ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transcriber(tiny_model_dir):
    return pipeline("automatic-speech-recognition", model=str(tiny_model_dir))


def test_the_asr_task_builds_the_sound2sheet_pipeline(transcriber):
    assert isinstance(transcriber, Sound2SheetPipeline)
    assert transcriber.type == "sound2sheet"


def test_pipeline_on_a_path_an_array_and_a_dict_agrees_with_the_processor(transcriber, tiny_model_dir, audio_files):
    model = Sound2SheetForConditionalGeneration.from_pretrained(tiny_model_dir)
    expected = Sound2SheetProcessor.from_pretrained(tiny_model_dir).transcribe(audio_files["flac"], model)
    from_path = transcriber(str(audio_files["flac"]))
    assert set(from_path) == {"text", "notes"}
    assert from_path["notes"] == expected
    assert from_path["text"].count(" | ") == 2  # three windows of readable tokens
    samples_44k, rate = soundfile.read(audio_files["flac"], dtype="float32")
    from_dict = transcriber({"raw": samples_44k.mean(axis=1), "sampling_rate": rate})
    from_array = transcriber(load_audio(audio_files["flac"]))
    assert from_dict["notes"] == expected
    assert from_array["notes"] == expected


def test_pipeline_batches_several_inputs(transcriber, audio_files):
    inputs = [str(audio_files["flac"]), str(audio_files["wav"]), str(audio_files["flac"])]
    one_by_one = [transcriber(item)["notes"] for item in inputs]
    batched = transcriber(inputs, batch_size=2)
    assert [result["notes"] for result in batched] == one_by_one


def test_pipeline_rejects_chunking_options(transcriber, audio_files):
    with pytest.raises(ValueError, match="do not pass chunk_length_s or stride_length_s"):
        transcriber(str(audio_files["wav"]), chunk_length_s=10)


def test_pipeline_errors_name_the_file(transcriber, tmp_path):
    with pytest.raises(ValueError, match=f"^{tmp_path / 'missing.wav'}: no such file$"):
        transcriber(str(tmp_path / "missing.wav"))


# --- bfloat16 on CPUs that have it ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, expected",
    [("fpu sse avx2 fma", False), ("fpu avx512f avx512_bf16 avx2", True), ("fpu amx_bf16 amx_tile avx512f", True)],
)
def test_cpu_bf16_is_read_from_the_cpu_flags(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert cpu_has_fast_bf16(cpuinfo) is expected
    assert cpu_has_fast_bf16(tmp_path / "missing") is False


@pytest.mark.parametrize(
    "bf16, native, encoder, decoder",
    [(None, False, torch.float32, torch.float32), (None, True, torch.bfloat16, torch.float32),
     (True, False, torch.bfloat16, torch.bfloat16), (False, True, torch.float32, torch.float32),
     ("encoder", False, torch.bfloat16, torch.float32)],
)
@pytest.mark.parametrize("num_beams", [1, 2])  # continuous batching, and generate() in batches
def test_transcribe_uses_bf16_where_asked_or_for_the_encoder_where_the_cpu_has_it(
    tiny_model_dir, audio_files, monkeypatch, bf16, native, encoder, decoder, num_beams
):
    model = Sound2SheetForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    processor = Sound2SheetProcessor.from_pretrained(tiny_model_dir)
    monkeypatch.setattr("sound2sheet.processing_sound2sheet.cpu_has_fast_bf16", lambda: native)
    seen = {"encoder": set(), "decoder": set()}
    model.get_encoder().projection.register_forward_hook(lambda module, args, output: seen["encoder"].add(output.dtype))
    model.lm_head.register_forward_hook(lambda module, args, output: seen["decoder"].add(output.dtype))
    processor.transcribe(str(audio_files["wav"]), model, bf16=bf16, max_new_tokens=2, num_beams=num_beams)
    assert seen == {"encoder": {encoder}, "decoder": {decoder}}


@pytest.mark.parametrize("bf16", ["decoder", "true", 1.0])
def test_transcribe_rejects_an_unknown_bf16_setting(tiny_model_dir, audio_files, bf16):
    model = Sound2SheetForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    processor = Sound2SheetProcessor.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match=r"bf16 must be True, False, None or 'encoder'; got " + re.escape(repr(bf16))):
        processor.transcribe(str(audio_files["wav"]), model, bf16=bf16, max_new_tokens=2)


def test_cli_bf16_flag_alone_means_true_and_absent_means_automatic(run_transcription):
    parser = run_transcription.build_parser((run_transcription.TranscribeArguments,), prog="transcribe")
    parse = lambda *argv: parser.parse_args_into_dataclasses(["--output-dir", "out", *argv], return_remaining_strings=True)[0].bf16  # noqa: E731
    assert (parse(), parse("--bf16"), parse("--bf16", "false"), parse("--bf16", "true")) == (None, True, False, True)


# --- notes placed on the frame head --------------------------------------------------------------------------------


def test_onset_peaks_are_columns_over_the_threshold_that_peak_along_time():
    grid = (0.075, 0.04, 5)  # column centres 0.075, 0.115, 0.155, 0.195, 0.235 s into a window
    first = np.zeros((5, 128), dtype=np.float32)
    first[:, 60] = [0.1, 0.9, 0.3, 0.5, 0.2]  # peaks at columns 1 and 3
    first[:, 61] = [0.05, 0.05, 0.05, 0.05, 0.05]  # never over the threshold
    first[:, 62] = [0.0, 0.4, 0.4, 0.0, 0.7]  # a plateau counts once (its last column); the last column can peak
    second = np.zeros((5, 128), dtype=np.float32)
    second[0, 60] = 0.3  # the first column can peak
    peaks = onset_peaks([first, second], [0.0, 2.56], grid, threshold=0.06)
    assert set(peaks) == {60, 62}
    assert peaks[60].tolist() == [0.115, 0.195, 2.635]
    assert peaks[62].tolist() == [0.155, 0.235]
    high = onset_peaks([first], [0.0], grid, threshold=0.75)
    assert list(high) == [60] and high[60].tolist() == [0.115]


def test_place_notes_on_onsets_moves_drops_and_merges():
    peaks = {60: np.array([0.115, 1.0]), 64: np.array([0.5])}
    notes = [
        Note(0.09, 0.6, 60, 80),  # -> the peak at 0.115
        Note(0.14, 0.3, 60, 70),  # the same peak again: the decoder wrote one onset twice -> dropped
        Note(0.9, 0.95, 60, 90),  # -> 1.0, and its offset follows to one step after the new onset
        Note(0.2, 0.4, 62, 60),  # no peak of its pitch -> dropped
        Note(0.1, 0.8, 64, 50),  # the nearest peak is 0.4 s away, out of reach -> dropped
        Note(0.45, 0.8, 64, 50),  # -> 0.5
    ]
    placed = place_notes_on_onsets(notes, peaks, reach=0.25)
    assert placed == [Note(0.115, 0.6, 60, 80), Note(0.5, 0.8, 64, 50), Note(1.0, 1.01, 60, 90)]
    assert place_notes_on_onsets(notes, peaks, reach=0.5)[:2] == [Note(0.115, 0.6, 60, 80), Note(0.5, 0.8, 64, 50)]
    assert place_notes_on_onsets(notes, {}) == []


def test_add_missed_onsets_adds_the_sure_peaks_no_note_took():
    placed = [Note(0.115, 0.6, 60, 80)]  # on the peak at 0.115
    peaks = {
        60: (np.array([0.115, 1.0]), np.array([0.9, 0.5])),  # 0.115 is taken; 1.0 is added
        62: (np.array([0.3, 0.7]), np.array([0.2, 0.36])),  # 0.3 is too weak; 0.7 is added
        64: (np.array([2.0]), np.array([0.34])),  # too weak
    }
    decoded = [Note(0.09, 0.6, 60, 80), Note(0.8, 0.9, 70, 30)]  # the velocities come from the nearest in time
    assert add_missed_onsets(placed, peaks, decoded, threshold=0.35) == [
        Note(0.115, 0.6, 60, 80), Note(0.7, 0.71, 62, 30), Note(1.0, 1.01, 60, 30),
    ]
    assert add_missed_onsets(placed, peaks, decoded, threshold=0.5) == [Note(0.115, 0.6, 60, 80), Note(1.0, 1.01, 60, 30)]
    # peaks the head hears starting their pitch are added whatever their probability
    started = {pitch: (times, probabilities, np.array([time == 0.3 for time in times])) for pitch, (times, probabilities) in peaks.items()}
    assert add_missed_onsets(placed, started, decoded, threshold=0.5) == [
        Note(0.115, 0.6, 60, 80), Note(0.3, 0.31, 62, 80), Note(1.0, 1.01, 60, 30),
    ]
    assert add_missed_onsets([], peaks, [], threshold=0.5) == [Note(0.115, 0.125, 60, 64), Note(1.0, 1.01, 60, 64)]


def test_refine_notes_with_frames_adds_the_onsets_the_decoder_missed():
    grid = (0.075, 0.04, 5)  # column centres 0.075, 0.115, 0.155, 0.195, 0.235 s
    probabilities = np.zeros((5, 256), dtype=np.float32)
    probabilities[:, 60] = [0.1, 0.9, 0.3, 0.5, 0.2]  # onset peaks at 0.115 and 0.195
    probabilities[:, 128 + 60] = 0.9  # sounds to the end of the window
    decoded = [Note(0.1, 0.2, 60, 80)]
    # the notes end OFFSET_LEAD (0.03 s) before the head stops hearing them
    assert refine_notes_with_frames(decoded, [probabilities], [0.0], grid, added_onset_threshold=0.45) == [
        Note(0.115, 0.165, 60, 80),  # placed, and ended before the pitch starts again
        Note(0.195, 0.225, 60, 80),  # added, ended before half a column after the last one
    ]
    # by default (0.6) the peak at 0.195 s is not sure enough, and the pitch already sounds: it starts nothing new
    assert refine_notes_with_frames(decoded, [probabilities], [0.0], grid) == [Note(0.115, 0.225, 60, 80)]
    assert refine_notes_with_frames(decoded, [probabilities], [0.0], grid, added_onset_threshold=None) == [Note(0.115, 0.225, 60, 80)]


def test_a_weak_onset_peak_that_starts_its_pitch_sounding_becomes_a_note():
    grid = (0.075, 0.04, 6)  # column centres 0.075 ... 0.275 s
    probabilities = np.zeros((6, 256), dtype=np.float32)
    probabilities[:, 60] = [0, 0, 0.2, 0, 0, 0]  # a weak peak at 0.155 s
    probabilities[:, 128 + 60] = [0, 0.4, 0.3, 0.6, 0.8, 0]  # silent before it, heard after it (0.8 two columns on)
    probabilities[:, 62] = [0, 0, 0.2, 0, 0, 0]
    probabilities[:, 128 + 62] = [0, 0.6, 0.3, 0.6, 0.8, 0]  # already sounding before it: a repeated strike? not added
    probabilities[:, 64] = [0, 0, 0.2, 0, 0, 0]
    probabilities[:, 128 + 64] = [0, 0, 0.3, 0.6, 0.6, 0.9]  # heard, but not strongly enough in the next two columns
    evidence = FrameEvidence(grid)
    evidence.add(probabilities, 0.0)
    notes = evidence.place([Note(0.5, 0.6, 70, 90)])  # velocities come from the nearest decoded note
    assert evidence.peaks == {60: [(0.155, pytest.approx(0.2), True)], 62: [(0.155, pytest.approx(0.2), False)],
                              64: [(0.155, pytest.approx(0.2), False)]}
    assert notes == [Note(0.155, 0.225, 60, 90)]  # sounds from 0.195 s until 0.8 -> 0 falls through 0.4 at 0.255 s


def test_end_notes_on_sustain_ends_where_the_pitch_stops_sounding():  # (sounding: probability >= 0.5 here)
    grid = (0.075, 0.04, 5)  # centres 0.075 ... 0.235 s, then 0.335 ... 0.495 s in the second window (start 0.26)
    first, second = np.zeros((5, 128), dtype=np.float32), np.zeros((5, 128), dtype=np.float32)
    first[:, 60] = [0.9, 0.9, 0.9, 0.1, 0.9]  # stops after column 2: 0.9 -> 0.1 falls through 0.5 halfway, 0.175 s
    first[:, 62] = [0.9, 0.9, 0.9, 0.9, 0.9]
    # sounds across the window boundary; 0.7 -> 0.1 falls through 0.5 a third of the way from 0.375 to 0.415 s
    second[:, 62] = [0.9, 0.7, 0.1, 0.0, 0.0]
    first[:, 64], second[:, 64] = 0.9, 0.9  # sounds to the end
    first[:, 65] = [0.9, 0.0, 0.0, 0.0, 0.0]  # silent from the next column: ends halfway to it, 0.095 s
    notes = [
        Note(0.075, 1.0, 60, 80),
        Note(0.075, 0.1, 62, 70),
        Note(0.075, 0.3, 64, 60),
        Note(0.2, 0.3, 64, 60),  # the same pitch again: the first one ends where it starts
        Note(0.075, 0.2, 65, 50),
        Note(0.075, 0.2, 66, 40),  # never heard: the same
    ]
    ended = end_notes_on_sustain(notes, [first, second], [0.0, 0.26], grid, gap=0.0, lead=0.0, threshold=0.5)
    assert ended == [
        Note(0.075, 0.175, 60, 80),
        Note(0.075, 0.388, 62, 70),  # to the millisecond
        Note(0.075, 0.2, 64, 60),
        Note(0.075, 0.095, 65, 50),
        Note(0.075, 0.095, 66, 40),
        Note(0.2, 0.515, 64, 60),
    ]
    assert end_notes_on_sustain([], [first], [0.0], grid) == []
    # float16 probabilities (as FrameEvidence keeps them) end the notes alike; by default a pitch sounds from 0.4
    assert end_notes_on_sustain(notes, [first.astype(np.float16), second.astype(np.float16)], [0.0, 0.26], grid, gap=0.0,
                                lead=0.0, threshold=0.5) == ended
    assert end_notes_on_sustain(notes[:1], [first, second], [0.0, 0.26], grid, gap=0.0, lead=0.0) == [Note(0.075, 0.18, 60, 80)]


def test_end_notes_on_sustain_ends_notes_on_offset_peaks_near_where_they_stop_sounding():
    grid = (0.075, 0.04, 20)  # column centres 0.075 + 0.04 k s
    sounding = np.full((20, 128), 0.1, dtype=np.float32)
    offsets = np.zeros((20, 128), dtype=np.float32)
    for pitch in (60, 62, 64, 69):
        sounding[:6, pitch] = 0.7  # heard in columns 0-5 (0.075 ... 0.275 s): stops halfway to column 6, at 0.295 s
    offsets[6:9, 60] = [0.375, 0.75, 0.625]  # a peak at 0.355 s; the parabola through it peaks a quarter column later
    offsets[13, 62] = 0.9  # a peak at 0.595 s, 0.3 s from where the pitch stops sounding
    offsets[7, 64] = 0.15  # a peak under the threshold
    offsets[[4, 9], 69] = [0.5, 0.875]  # two peaks in reach, at 0.235 and 0.435 s
    sounding[:9, 65] = 0.7  # heard up to column 8 (0.395 s), but the pitch starts again at 0.3 s
    offsets[6:9, 65] = [0.375, 0.75, 0.625]  # a peak past that next onset: the next note's
    sounding[4:7, 67] = 0.7  # heard in columns 4-6: stops at 0.335 s
    offsets[3, 67] = 0.9  # a peak at 0.195 s, before one column after the note's onset at 0.2 s
    notes = [Note(0.03, 0.1, pitch, 80) for pitch in (60, 62, 64, 65, 69)] + [Note(0.3, 0.4, 65, 70), Note(0.2, 0.3, 67, 60)]
    ended = lambda **options: end_notes_on_sustain(notes, [sounding], [0.0], grid, gap=0.0, **options)  # noqa: E731
    # without offsets: OFFSET_LEAD (0.03 s) before the pitch stops sounding, or before it starts again
    assert ended() == [
        Note(0.03, 0.265, 60, 80), Note(0.03, 0.265, 62, 80), Note(0.03, 0.265, 64, 80), Note(0.03, 0.27, 65, 80),
        Note(0.03, 0.265, 69, 80), Note(0.2, 0.305, 67, 60), Note(0.3, 0.385, 65, 70),
    ]
    assert ended(offsets=[np.zeros_like(offsets)]) == ended()  # no peaks: as without offsets
    assert ended(offsets=[offsets]) == [
        Note(0.03, 0.345, 60, 80),  # OFFSET_PEAK_LEAD (0.02 s) before the vertex: 0.355 + 0.25 x 0.04 s
        Note(0.03, 0.265, 62, 80),  # the peak is out of reach
        Note(0.03, 0.265, 64, 80),  # the peak is too weak
        Note(0.03, 0.27, 65, 80),  # the peak lies past the pitch's next onset
        Note(0.03, 0.415, 69, 80),  # the more probable peak
        Note(0.2, 0.305, 67, 60),  # the peak lies too early
        Note(0.3, 0.345, 65, 70),  # the peak after its onset is its own
    ]
    assert ended(offsets=[offsets.astype(np.float16)]) == ended(offsets=[offsets])  # as FrameEvidence keeps them
    widened = ended(offsets=[offsets], offset_reach=0.35, offset_threshold=0.1, offset_lead=0.01)
    assert [note.offset for note in widened] == [0.355, 0.585, 0.345, 0.27, 0.425, 0.305, 0.355]
    # windows cut end to end (centres 0.075 ... 0.235 s, then 0.335 ... 0.495 s): a peak at the last column of the
    # first window is not interpolated towards the next window's first column, 0.1 s later
    first, second = np.zeros((5, 128), dtype=np.float32), np.zeros((5, 128), dtype=np.float32)
    first[:, 70] = [0.7, 0.7, 0.7, 0.7, 0.1]  # stops at 0.215 s
    first_offsets, second_offsets = np.zeros((5, 128), dtype=np.float32), np.zeros((5, 128), dtype=np.float32)
    first_offsets[3:, 70], second_offsets[0, 70] = [0.375, 0.75], 0.625
    two = end_notes_on_sustain([Note(0.03, 0.1, 70, 80)], [first, second], [0.0, 0.26], (0.075, 0.04, 5),
                               offsets=[first_offsets, second_offsets])
    assert two == [Note(0.03, 0.215, 70, 80)]  # OFFSET_PEAK_LEAD (0.02 s) before that column, 0.235 s
    with pytest.raises(ValueError, match="offsets hold 5 columns, but the sounding probabilities 10: align them"):
        end_notes_on_sustain([Note(0.03, 0.1, 70, 80)], [first, second], [0.0, 0.26], (0.075, 0.04, 5), offsets=[first_offsets])


def test_frame_evidence_with_offsets_keeps_the_owned_columns_and_ends_notes_on_their_peaks():
    # as in the test above without offsets: the first window owns 0.02 ... 0.30 s, the second from 0.34 s
    grid = (0.02, 0.04, 10)
    first, second = np.zeros((10, 384), dtype=np.float32), np.zeros((10, 384), dtype=np.float32)
    first[:, 66] = [0.9, 0, 0, 0, 0, 0, 0, 0, 0, 0]  # starts at 0.02 s
    first[:, 128 + 66] = 0.9
    second[:, 128 + 66] = [0.9, 0.9, 0.7, 0.1, 0, 0, 0, 0, 0, 0]  # stops sounding at 0.36 s
    # peaks at 0.38 and 0.30 s in columns their windows do not own; the second window's own at 0.38 s
    first[:, 256 + 66] = [0, 0, 0, 0, 0, 0, 0, 0, 0.5, 0.95]
    second[:, 256 + 66] = [0.5, 0.95, 0.25, 0.75, 0.5, 0, 0, 0, 0, 0]
    generator = np.random.default_rng(0)
    first[:, 256:260], second[:, 256:260] = generator.random((10, 4)), generator.random((10, 4))
    evidence = FrameEvidence(grid, overlap=0.16)
    evidence.add(first, 0.0)
    evidence.add(second, 0.24)
    notes = evidence.place([Note(0.02, 0.1, 66, 50)], added_onset_threshold=None)
    assert evidence.first_columns == [0, 2] and [rows.dtype for rows in evidence.offsets] == [np.float16] * 2
    assert np.array_equal(evidence.offsets[0], first[:8, 256:].astype(np.float16))
    assert np.array_equal(evidence.offsets[1], second[2:, 256:].astype(np.float16))
    assert [rows.shape for rows in evidence.sounding] == [(8, 128), (8, 128)]
    # OFFSET_PEAK_LEAD (0.02 s) before the owned peak's vertex: 0.38 + 0.04 x 0.5 x (0.25 - 0.5) / (0.25 - 1.5 + 0.5) = 0.38667 s
    assert notes == [Note(0.02, 0.367, 66, 50)]
    # the same windows without their offsets: OFFSET_LEAD (0.03 s) before the pitch stops sounding
    plain = FrameEvidence(grid, overlap=0.16)
    plain.add(first[:, :256], 0.0)
    plain.add(second[:, :256], 0.24)
    assert plain.place([Note(0.02, 0.1, 66, 50)], added_onset_threshold=None) == [Note(0.02, 0.33, 66, 50)]
    assert plain.offsets == []
    assert refine_notes_with_frames([Note(0.02, 0.1, 66, 50)], [first, second], [0.0, 0.24], grid, None, 0.16) == notes
    with pytest.raises(ValueError, match="frame probabilities of 256 per column after windows of another width"):
        evidence.add(second[:, :256], 0.48)
    with pytest.raises(ValueError, match="must have 256 .* or 384 .* per column, got 200"):
        FrameEvidence(grid).add(first[:, :200], 0.0)


@pytest.fixture(scope="module")
def frame_model_dir(tmp_path_factory):
    """A tiny random model with the frame head, which places the decoded notes."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-frame-model"), frame_loss_weight=1.0)


def rebuilt_refined_notes(model, processor, audio, overlap, **options):
    """What `transcribe` should return with refined notes on windows overlapping by `overlap` seconds, rebuilt from the
    public pieces: tokens from generate() on the input values, probabilities from the encoder."""
    windows = list(processor.iter_windows(audio, overlap=overlap))
    inputs = processor.feature_extractor(windows, sampling_rate=16000, return_tensors="pt")["input_values"]
    with torch.inference_mode():
        grammar = LogitsProcessorList([NoteEventGrammarLogitsProcessor.from_tokenizer(processor.tokenizer)])
        tokens = [row[1:] for row in model.generate(input_values=inputs, logits_processor=grammar, **options).tolist()]
        hidden = model.get_encoder()(inputs).last_hidden_state
        probabilities = model.frame_probabilities(hidden)
    assert probabilities.shape == (len(windows), 61, model.frame_head.out_features) and probabilities.dtype == torch.float32
    assert torch.equal(probabilities, torch.sigmoid(model.frame_logits(hidden)))
    starts = [index * processor.window_hop(overlap) for index in range(len(windows))]  # as `transcribe`
    decoded = decode_owned_notes(processor.tokenizer, tokens, starts, 2.56, overlap)
    grid = model.config.frame_grid
    refined = refine_notes_with_frames(decoded, probabilities.numpy(), starts, grid, window_overlap=overlap)
    return clip_notes(refined, 6.0), clip_notes(decoded, 6.0)


@pytest.mark.parametrize("options", [{"do_sample": False}, {"do_sample": False, "num_beams": 2}], ids=["greedy", "beam"])
def test_transcribe_places_the_decoded_notes_on_the_frame_head(frame_model_dir, audio_files, options):
    model = Sound2SheetForConditionalGeneration.from_pretrained(frame_model_dir).eval()
    processor = Sound2SheetProcessor.from_pretrained(frame_model_dir)
    assert model.has_frame_head and resolve_refine_notes(None, model)
    audio = audio_files["flac"]  # 6 s: windows at 0, 2.56 and 5.12 s end to end; at 0, 2.24 and 4.48 s overlapping
    assert processor.count_windows(audio, overlap=0.0) == processor.count_windows(audio, overlap=WINDOW_OVERLAP) == 3
    expected, _ = rebuilt_refined_notes(model, processor, audio, WINDOW_OVERLAP, **options)
    end_to_end, unrefined = rebuilt_refined_notes(model, processor, audio, 0.0, **options)
    assert expected and end_to_end and expected != end_to_end and end_to_end != unrefined
    # float32 like the expected notes, also where the default would be bfloat16 (`cpu_has_fast_bf16`)
    assert processor.transcribe(audio, model, batch_size=2, bf16=False, **options) == expected
    assert processor.transcribe(audio, model, bf16=False, window_overlap=0, **options) == end_to_end
    assert processor.transcribe(audio, model, refine_notes=False, bf16=False, **options) == unrefined
    transcriber = pipeline("automatic-speech-recognition", model=str(frame_model_dir))
    assert transcriber(str(audio), **options)["notes"] == expected
    assert transcriber(str(audio), window_overlap=0.0, **options)["notes"] == end_to_end
    assert transcriber(str(audio), batch_size=2, refine_notes=False, **options)["notes"] == unrefined


@pytest.fixture(scope="module")
def offsets_model_dir(tmp_path_factory):
    """A tiny random model whose frame head also predicts offsets."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-offsets-model"), frame_loss_weight=1.0, frame_offsets=True)


def test_transcribe_ends_notes_on_the_offset_outputs_of_the_frame_head(offsets_model_dir, audio_files):
    model = Sound2SheetForConditionalGeneration.from_pretrained(offsets_model_dir).eval()
    processor = Sound2SheetProcessor.from_pretrained(offsets_model_dir)
    audio = audio_files["flac"]
    expected, _ = rebuilt_refined_notes(model, processor, audio, WINDOW_OVERLAP, do_sample=False)  # 384 wide
    assert expected
    assert processor.transcribe(audio, model, bf16=False, do_sample=False) == expected
    transcriber = pipeline("automatic-speech-recognition", model=str(offsets_model_dir))
    assert transcriber(str(audio), do_sample=False)["notes"] == expected
    # the same model without its offset outputs ends some notes elsewhere
    with torch.no_grad():
        model.frame_head.weight[256:] = 0.0
        model.frame_head.bias[256:] = -20.0  # offset probabilities ~2e-9: no peaks
    without, _ = rebuilt_refined_notes(model, processor, audio, WINDOW_OVERLAP, do_sample=False)
    assert [note.onset for note in without] == [note.onset for note in expected] and without != expected


def test_end_notes_on_sustain_sounds_through_short_silences():
    grid = (0.075, 0.04, 20)  # column centres 0.075 + 0.04 k s
    heard = np.zeros((20, 128), dtype=bool)
    heard[:, 60] = [1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0]  # silences of 3, then 4 columns
    heard[:, 62] = [1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]  # to the end after 3 silent columns
    heard[:, 64] = [0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]  # first heard 2 columns after it starts
    sounding = np.where(heard, 0.7, 0.1)  # from 0.7 to 0.1, the probability falls through 0.4 halfway between columns
    notes = [Note(0.03, 0.1, 60, 80), Note(0.03, 0.1, 62, 80), Note(0.03, 0.1, 64, 80)]
    ended = lambda gap: end_notes_on_sustain(notes, [sounding], [0.0], grid, gap=gap, lead=0.0)  # noqa: E731
    # from column 0 (one column after the onset); a note ends halfway between its last sounding column and the next
    assert ended(0.0) == [Note(0.03, 0.135, 60, 80), Note(0.03, 0.135, 62, 80), Note(0.03, 0.055, 64, 80)]
    assert ended(0.12) == [Note(0.03, 0.335, 60, 80), Note(0.03, 0.855, 62, 80), Note(0.03, 0.255, 64, 80)]
    assert ended(0.16) == [Note(0.03, 0.575, 60, 80), Note(0.03, 0.855, 62, 80), Note(0.03, 0.255, 64, 80)]
    assert ended(0.11) == ended(0.12)  # rounded to whole columns
    later = Note(0.3, 0.4, 60, 70)  # the pitch starting again ends the note sounding through silence
    assert end_notes_on_sustain([notes[0], later], [sounding], [0.0], grid, gap=0.16, lead=0.0)[0] == Note(0.03, 0.3, 60, 80)
    # ended `lead` seconds earlier, one time step after the onset at the earliest
    led = end_notes_on_sustain([*notes, later], [sounding], [0.0], grid, gap=0.16, lead=0.03)
    assert led == [Note(0.03, 0.27, 60, 80), Note(0.03, 0.825, 62, 80), Note(0.03, 0.225, 64, 80), Note(0.3, 0.545, 60, 70)]
    assert end_notes_on_sustain(notes, [sounding], [0.0], grid, gap=0.0, lead=0.1)[2] == Note(0.03, 0.04, 64, 80)


def test_end_notes_on_sustain_sounds_through_a_silence_that_spans_the_next_onset():
    grid = (0.075, 0.04, 40)  # column k at 0.075 + 0.04 k s; each pitch starts again at 0.2 s, before column 4 (0.235 s)
    sounding = np.full((40, 128), 0.1, dtype=np.float32)
    sounding[[0, 1, 2, 7, 8], 60] = 0.7  # silent for 4 columns from 0.195 s, heard again at 0.355 s, after the restart
    sounding[[0, 1, 2, 8, 9], 62] = 0.7  # silent for 5 columns
    notes = [Note(0.03, 0.1, 60, 80), Note(0.2, 0.3, 60, 80), Note(0.03, 0.1, 62, 80), Note(0.2, 0.3, 62, 80)]
    ended = end_notes_on_sustain(notes, [sounding], [0.0], grid, gap=0.16, lead=0.0)
    # 60 sounds through its silence up to where it starts again; 62 ends where 0.7 -> 0.1 falls through 0.4, 0.175 s
    assert ended[:2] == [Note(0.03, 0.2, 60, 80), Note(0.03, 0.175, 62, 80)]
    # the notes at 0.2 s look from column 5 (0.275 s) on: heard after a short silence, each ends halfway from its last
    # sounding column (0.395 and 0.435 s) to the next
    assert ended[2:] == [Note(0.2, 0.415, 60, 80), Note(0.2, 0.455, 62, 80)]


def test_end_notes_on_sustain_holds_long_notes_down_to_a_lower_threshold():
    grid = (0.075, 0.04, 60)  # column k at 0.075 + 0.04 k s
    sounding = np.full((60, 128), 0.1, dtype=np.float32)
    sounding[:29, 60], sounding[29:39, 60] = 0.9, 0.3  # dies away to 0.3 at column 29 (1.235 s), silent from 39
    sounding[:19, 62], sounding[19:39, 62] = 0.9, 0.3  # the same, from column 19 (0.835 s): before it is held 1 s
    notes = [Note(0.03, 0.1, 60, 80), Note(0.03, 0.1, 62, 80)]
    ended = lambda **options: end_notes_on_sustain(notes, [sounding], [0.0], grid, gap=0.0, lead=0.0, **options)  # noqa: E731
    # held from 1.03 s on: 60 sounds on at 0.3 until 0.3 -> 0.1 falls through 0.2 halfway from 1.595 to 1.635 s; 62
    # falls under 0.4 before then, 0.9 -> 0.3 through 0.4 five sixths of the way from 0.795 to 0.835 s
    assert ended(held_threshold=0.2, held_after=1.0) == [Note(0.03, 1.615, 60, 80), Note(0.03, 0.828, 62, 80)]
    assert ended() == ended(held_threshold=0.2, held_after=1.0)  # the defaults (HELD_THRESHOLD, HELD_AFTER)
    # held only from 2 s, or with the threshold unchanged: both fall through 0.4 where they die away
    unheld = [Note(0.03, 1.228, 60, 80), Note(0.03, 0.828, 62, 80)]
    assert ended(held_threshold=0.2, held_after=2.0) == unheld == ended(held_threshold=0.4)
    assert ended(held_threshold=0.2, held_after=0.5) == [Note(0.03, 1.615, 60, 80), Note(0.03, 1.615, 62, 80)]
    with pytest.raises(ValueError, match=r"held_threshold \(0.5\) must not be over threshold \(0.4\)"):
        ended(held_threshold=0.5)
    # FrameEvidence.place passes the settings on: decoded notes on onset peaks at column 0 (0.075 s), held from 1.075 s
    table = np.zeros((60, 256), dtype=np.float32)
    table[0, [60, 62]], table[:, 128:] = 0.9, sounding
    evidence = FrameEvidence(grid)
    evidence.add(table, 0.0)
    decoded = [Note(0.08, 0.5, 60, 80), Note(0.08, 0.5, 62, 70)]
    assert evidence.place(decoded, gap=0.0, lead=0.0) == [Note(0.075, 1.615, 60, 80), Note(0.075, 0.828, 62, 70)]
    unheld = [Note(0.075, 1.228, 60, 80), Note(0.075, 0.828, 62, 70)]
    assert evidence.place(decoded, gap=0.0, lead=0.0, held_threshold=0.4) == unheld


def test_window_ownership_gives_each_moment_to_the_window_it_lies_furthest_inside():
    assert window_ownership([0.0, 2.24, 4.48], 0.32) == [(-math.inf, 2.4), (2.4, 4.64), (4.64, math.inf)]
    assert window_ownership([0.0, 2.56], 0.0) == [(-math.inf, 2.56), (2.56, math.inf)]
    assert window_ownership([1.0], 0.32) == [(-math.inf, math.inf)]


def test_iter_windows_overlap_by_the_given_seconds(audio_files):
    samples = load_audio(audio_files["flac"], 16000)  # 6 s
    for overlap, starts in [(0.0, [0, 40960, 81920]), (0.32, [0, 35840, 71680]), (1.28, [0, 20480, 40960, 61440])]:
        assert PROCESSOR.count_windows(audio_files["flac"], overlap=overlap) == len(starts)
        assert PROCESSOR.window_hop(overlap) == (40960 - round(overlap * 16000)) / 16000
        expected = [np.pad(samples[start : start + 40960], (0, max(0, start + 40960 - len(samples)))) for start in starts]
        from_file = list(PROCESSOR.iter_windows(audio_files["flac"], overlap=overlap))
        from_array = list(PROCESSOR.iter_windows(samples, overlap=overlap))
        assert len(from_file) == len(from_array) == len(starts)
        for window, array_window, reference in zip(from_file, from_array, expected):
            assert window.shape == array_window.shape == (40960,)
            np.testing.assert_array_equal(array_window, reference)
            np.testing.assert_allclose(window, reference, atol=1e-6)
    with pytest.raises(ValueError, match=re.escape("overlap must be in [0, 2.56) seconds, got 2.56.")):
        next(PROCESSOR.iter_windows(samples, overlap=2.56))
    # 2.5 s: one window end to end; overlapping, the audio past the first window's 2.24 s still fits in it
    assert PROCESSOR.count_windows(samples[:40000], overlap=0.32) == 1
    assert PROCESSOR.count_windows(samples[:41000], overlap=0.32) == 2


def test_decode_owned_notes_keeps_each_windows_own_onsets():
    tokenizer = PROCESSOR.tokenizer
    heard = [Note(0.5, 1.0, 60, 83), Note(2.0, 3.0, 67, 83), Note(2.3, 2.5, 62, 83), Note(2.45, 2.5, 64, 83), Note(3.0, 4.0, 65, 83)]
    starts = [0.0, 2.24]  # overlapping by 0.32 s: the first window owns up to 2.4 s, the second from there
    # the second window hears every note softer, to tell which window a note came from
    softer = [Note(note.onset, note.offset, note.pitch, 43) for note in heard]
    windows = [tokenizer.encode_notes(heard, window_start=0.0), tokenizer.encode_notes(softer, window_start=2.24)]
    assert decode_owned_notes(tokenizer, windows, starts, 2.56, 0.32) == [
        Note(0.5, 1.0, 60, 83),
        Note(2.0, 2.56, 67, 83),  # held past the end of its window: ends there (the frame head gives the offsets)
        Note(2.3, 2.5, 62, 83),  # heard by both windows; the first one's
        Note(2.45, 2.5, 64, 43),  # heard by both windows; the second one's
        Note(3.0, 4.0, 65, 43),
    ]
    # alone, a window's tie section starts its held notes at its start
    assert decode_owned_notes(tokenizer, windows[1:], [2.24], 2.56, 0.32)[0] == Note(2.24, 3.0, 67, 80)
    end_to_end = [tokenizer.encode_notes(heard, window_start=start) for start in (0.0, 2.56)]
    assert decode_owned_notes(tokenizer, end_to_end, [0.0, 2.56], 2.56, 0.0) == tokenizer.decode_windows(end_to_end, [0.0, 2.56])


def test_frame_evidence_of_overlapping_windows_takes_each_stretch_from_its_owner():
    # 0.4 s windows at 0 and 0.24 s, overlapping by 0.16 s: column centres 0.02 ... 0.38 s, then 0.26 ... 0.62 s.
    # The first window owns its columns before 0.32 s (0.02 ... 0.30), the second its columns from there (0.34 ...).
    grid = (0.02, 0.04, 10)
    first, second = np.zeros((10, 256), dtype=np.float32), np.zeros((10, 256), dtype=np.float32)
    first[:, 60] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0.9]  # a peak at 0.38 s, which the second window owns: dropped
    first[:, 62] = [0, 0, 0, 0, 0, 0, 0.3, 0.8, 0.2, 0]  # a peak at 0.30 s, the first window's last own column
    second[:, 62] = [0.1, 0.9, 0.3, 0, 0, 0, 0, 0, 0, 0]  # the same onset, in columns the second window does not own
    # rising in the first window's view, falling in the second's: a peak at 0.30 s along the owned columns only
    first[:, 64] = [0, 0, 0, 0, 0, 0, 0, 0.5, 0.9, 0]
    second[:, 64] = [0, 0.2, 0.4, 0.1, 0, 0, 0, 0, 0, 0]
    second[:, 65] = [0, 0, 0, 0, 0.7, 0, 0, 0, 0, 0]  # a peak at 0.42 s
    first[:, 66] = [0.9, 0, 0, 0, 0, 0, 0, 0, 0, 0]  # starts at 0.02 s and sounds up to 0.34 s
    first[:, 128 + 66] = 0.9
    second[:, 128 + 66] = [0.9, 0.9, 0.7, 0.1, 0, 0, 0, 0, 0, 0]  # falls through 0.4 halfway from 0.34 s to 0.38 s
    evidence = FrameEvidence(grid, overlap=0.16)
    evidence.add(first, 0.0)
    evidence.add(second, 0.24)
    decoded = [Note(0.02, 0.1, 66, 50), Note(0.31, 0.33, 62, 80)]
    notes = evidence.place(decoded, added_onset_threshold=0.45)
    assert evidence.first_columns == [0, 2] and [len(rows) for rows in evidence.sounding] == [8, 8]
    assert {pitch: [peak[0] for peak in found] for pitch, found in evidence.peaks.items()} == {
        62: [0.3], 64: [0.3], 65: [0.42], 66: [0.02]
    }
    # 64 and 65 added (velocity of the nearest decoded onset); the held 66 ends OFFSET_LEAD (0.03 s) before halfway
    # from 0.34 s to 0.38 s; the others, never heard sounding, one time step after their onsets
    assert notes == [
        Note(0.02, 0.33, 66, 50), Note(0.3, 0.31, 62, 80), Note(0.3, 0.31, 64, 80), Note(0.42, 0.43, 65, 80)
    ]
    end_to_end = FrameEvidence(grid)  # without overlap, each window keeps all its columns and its own peaks
    end_to_end.add(first, 0.0)
    end_to_end.add(second, 0.4)
    end_to_end.place([])
    assert end_to_end.first_columns == [0, 0] and [len(rows) for rows in end_to_end.sounding] == [10, 10]
    assert {pitch: [peak[0] for peak in found] for pitch, found in end_to_end.peaks.items()} == {
        60: [0.38], 62: [0.3, 0.46], 64: [0.34, 0.5], 65: [0.58], 66: [0.02]
    }


def test_window_overlap_needs_refined_notes_and_less_than_a_window(
    tiny_model_dir, frame_model_dir, audio_files, run_transcription, tmp_path, capsys
):
    model = Sound2SheetForConditionalGeneration.from_pretrained(tiny_model_dir)  # no frame head
    processor = Sound2SheetProcessor.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="window_overlap > 0 needs refine_notes"):
        processor.transcribe(audio_files["wav"], model, window_overlap=0.32)
    framed = Sound2SheetForConditionalGeneration.from_pretrained(frame_model_dir)
    for overlap in (2.56, -0.1):
        with pytest.raises(ValueError, match=re.escape(f"window_overlap must be in [0, 2.56) seconds, got {overlap}")):
            processor.transcribe(audio_files["wav"], framed, window_overlap=overlap)
    transcriber = pipeline("automatic-speech-recognition", model=str(frame_model_dir))
    with pytest.raises(ValueError, match="window_overlap > 0 needs refine_notes"):
        transcriber(str(audio_files["wav"]), refine_notes=False, window_overlap=0.32)
    argv = ["transcribe", str(audio_files["wav"]), "--output-dir", str(tmp_path), "--model", str(frame_model_dir)]
    assert run_transcription.main([*argv, "--window_overlap", "3"]) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line == f"error: --window_overlap: model {frame_model_dir}: window_overlap must be in [0, 2.56) seconds, got 3.0."
    assert run_transcription.main([*argv, "--window_overlap", "0.5", "--refine_notes", "false"]) == 2
    assert "--window_overlap: model" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not any(tmp_path.iterdir())


def test_refine_notes_needs_a_frame_head(tiny_model_dir, audio_files, run_transcription, tmp_path, capsys):
    model = Sound2SheetForConditionalGeneration.from_pretrained(tiny_model_dir)
    assert not model.has_frame_head and not resolve_refine_notes(None, model)
    with pytest.raises(ValueError, match="refine_notes=True needs a model with a frame head"):
        Sound2SheetProcessor.from_pretrained(tiny_model_dir).transcribe(audio_files["wav"], model, refine_notes=True)
    argv = ["transcribe", str(audio_files["wav"]), "--output-dir", str(tmp_path), "--model", str(tiny_model_dir), "--refine_notes"]
    assert run_transcription.main(argv) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # after the weight-loading progress bar
    assert last_line.startswith(f"error: --refine_notes: model {tiny_model_dir}: refine_notes=True needs a model")
    assert not any(tmp_path.iterdir())
