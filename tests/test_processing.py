"""Sound2SheetProcessor: model inputs, long-audio transcription with stitching, the pipeline."""

from __future__ import annotations

import pytest
import soundfile
import torch
from transformers import AutoProcessor, pipeline

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
from sound2sheet.processing_sound2sheet import cpu_has_fast_bf16, strategy_generate_kwargs

from .conftest import piano_like

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


@pytest.mark.parametrize("bf16, native, expected", [(None, False, torch.float32), (None, True, torch.bfloat16),
                                                    (True, False, torch.bfloat16), (False, True, torch.float32)])
def test_transcribe_uses_bf16_when_asked_or_when_the_cpu_has_it(tiny_model_dir, audio_files, monkeypatch, bf16, native, expected):
    model = Sound2SheetForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    processor = Sound2SheetProcessor.from_pretrained(tiny_model_dir)
    monkeypatch.setattr("sound2sheet.processing_sound2sheet.cpu_has_fast_bf16", lambda: native)
    seen = []
    model.lm_head.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    processor.transcribe(str(audio_files["wav"]), model, bf16=bf16, max_new_tokens=2)
    assert seen and set(seen) == {expected}


def test_cli_bf16_flag_alone_means_true_and_absent_means_automatic(run_transcription):
    parser = run_transcription.build_parser((run_transcription.TranscribeArguments,), prog="transcribe")
    parse = lambda *argv: parser.parse_args_into_dataclasses(["--output-dir", "out", *argv], return_remaining_strings=True)[0].bf16  # noqa: E731
    assert (parse(), parse("--bf16"), parse("--bf16", "false"), parse("--bf16", "true")) == (None, True, False, True)
