"""Sound2SheetTokenizer: timed notes <-> note-event tokens, in the spirit of MT3.

One window of audio is described by one token sequence (Hawthorne et al. 2021, "Sequence-to-Sequence Piano Transcription
with Transformers"; Gardner et al. 2022, "MT3"):

    [tie section]   <p_60> <p_64> <tie>            pitches already sounding when the window starts, then <tie>
    [events]        <t_12> <v_20> <p_67>           time within the window (10 ms steps), velocity, pitch = note-on
                    <t_50> <v_0> <p_60> <p_67>     velocity 0 means note-off; a time or velocity is only repeated on change
    </s>

The vocabulary, in id order: `<pad>` `</s>` `<s>` `<unk>`, the time tokens `<t_0>`...`<t_N>` (N = window / time step),
128 pitch tokens `<p_0>`...`<p_127>`, velocity tokens `<v_0>`...`<v_B>` (B bins, 0 = note-off), and `<tie>`.
Notes held across windows are stitched back together by `decode_windows` through the tie sections.

This module imports only `sound2sheet.notes` from the package.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from transformers import PreTrainedTokenizer

from .notes import Note, sort_notes

PAD, EOS, BOS, UNK = "<pad>", "</s>", "<s>", "<unk>"
TIE = "<tie>"
NUM_PITCHES = 128  # the MIDI pitch range
MAX_VELOCITY = 127  # the MIDI velocity range is 1..127
DEFAULT_WINDOW_SECONDS = 2.56  # 256 feature frames at a 10 ms hop
DEFAULT_TIME_STEP = 0.01  # 10 ms: the resolution of onset evaluation (mir_eval tolerance is 50 ms)
DEFAULT_VELOCITY_BINS = 32  # 4 MIDI velocity steps per bin; finer than mir_eval's velocity tolerance
UNBINNED_VELOCITY = 80  # velocity of a note-on decoded before any velocity token (malformed input)


class Sound2SheetTokenizer(PreTrainedTokenizer):
    r"""
    Turns the notes of one audio window into event tokens and back.

    Args:
        window_seconds (`float`, *optional*, defaults to 2.56):
            Longest window the tokens can describe (time tokens run from 0 to `window_seconds`).
        time_step (`float`, *optional*, defaults to 0.01):
            Resolution of the time tokens, in seconds.
        num_velocity_bins (`int`, *optional*, defaults to 32):
            Number of velocity bins. MIDI velocity `v` (1-127) goes to bin `ceil(v * bins / 127)` and a bin `b` decodes to
            the representative velocity `floor(b * 127 / bins)` (which falls back into bin `b`).

    Example:

    ```python
    >>> from sound2sheet import Note, Sound2SheetTokenizer
    >>> tokenizer = Sound2SheetTokenizer()
    >>> ids = tokenizer.encode_notes([Note(0.10, 0.50, 60, 100)])
    >>> tokenizer.decode(ids)
    '<tie> <t_10> <v_26> <p_60> <t_50> <v_0> <p_60> </s>'
    >>> tokenizer.decode_notes(ids)
    [Note(onset=0.1, offset=0.5, pitch=60, velocity=103)]
    ```
    """

    vocab_files_names: Dict[str, str] = {}
    model_input_names = ["labels"]

    def __init__(
        self,
        window_seconds: float = DEFAULT_WINDOW_SECONDS,
        time_step: float = DEFAULT_TIME_STEP,
        num_velocity_bins: int = DEFAULT_VELOCITY_BINS,
        **kwargs,
    ):
        if time_step <= 0 or window_seconds <= 0:
            raise ValueError(f"window_seconds and time_step must be > 0, got {window_seconds} and {time_step}.")
        if not 1 <= num_velocity_bins <= MAX_VELOCITY:
            raise ValueError(f"num_velocity_bins must be in 1-{MAX_VELOCITY}, got {num_velocity_bins}.")
        self.window_seconds = float(window_seconds)
        self.time_step = float(time_step)
        self.num_velocity_bins = int(num_velocity_bins)
        self.num_time_steps = int(round(self.window_seconds / self.time_step))
        specials = [PAD, EOS, BOS, UNK]
        tokens = (
            specials
            + [f"<t_{i}>" for i in range(self.num_time_steps + 1)]
            + [f"<p_{i}>" for i in range(NUM_PITCHES)]
            + [f"<v_{i}>" for i in range(self.num_velocity_bins + 1)]
            + [TIE]
        )
        self._id_to_token: List[str] = tokens
        self._token_to_id: Dict[str, int] = {token: index for index, token in enumerate(tokens)}
        self.time_offset = len(specials)
        self.pitch_offset = self.time_offset + self.num_time_steps + 1
        self.velocity_offset = self.pitch_offset + NUM_PITCHES
        self.tie_token_id = self.velocity_offset + self.num_velocity_bins + 1
        for name, value in (("pad_token", PAD), ("eos_token", EOS), ("bos_token", BOS), ("unk_token", UNK)):
            kwargs.setdefault(name, value)
        super().__init__(
            window_seconds=self.window_seconds, time_step=self.time_step, num_velocity_bins=self.num_velocity_bins, **kwargs
        )

    # --- the vocabulary (PreTrainedTokenizer interface) -----------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    def get_vocab(self) -> Dict[str, int]:
        return dict(self._token_to_id)

    def _tokenize(self, text: str, **kwargs) -> List[str]:
        return text.split()

    def _convert_token_to_id(self, token: str) -> int:
        return self._token_to_id.get(token, self._token_to_id[UNK])

    def _convert_id_to_token(self, index: int) -> str:
        return self._id_to_token[index] if 0 <= index < len(self._id_to_token) else UNK

    def convert_tokens_to_string(self, tokens: List[str]) -> str:
        return " ".join(tokens)

    def build_inputs_with_special_tokens(self, token_ids_0: List[int], token_ids_1: Optional[List[int]] = None) -> List[int]:
        return list(token_ids_0) + (list(token_ids_1) if token_ids_1 else [])

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None) -> Tuple[str, ...]:
        return ()  # the vocabulary follows from the settings saved in tokenizer_config.json

    # --- token ids of the event types --------------------------------------------------------------------------

    def time_token_id(self, step: int) -> int:
        if not 0 <= step <= self.num_time_steps:
            raise ValueError(f"time step {step} is outside the window (0-{self.num_time_steps}).")
        return self.time_offset + step

    def pitch_token_id(self, pitch: int) -> int:
        if not 0 <= pitch < NUM_PITCHES:
            raise ValueError(f"pitch {pitch} is outside the MIDI range 0-127.")
        return self.pitch_offset + pitch

    def velocity_token_id(self, velocity_bin: int) -> int:
        if not 0 <= velocity_bin <= self.num_velocity_bins:
            raise ValueError(f"velocity bin {velocity_bin} is outside 0-{self.num_velocity_bins}.")
        return self.velocity_offset + velocity_bin

    def velocity_to_bin(self, velocity: int) -> int:
        """MIDI velocity 1-127 -> bin 1..num_velocity_bins (bin 0 is note-off)."""
        return max(1, math.ceil(int(velocity) * self.num_velocity_bins / MAX_VELOCITY))

    def bin_to_velocity(self, velocity_bin: int) -> int:
        """The representative MIDI velocity of a bin (it maps back to the same bin)."""
        return max(1, (velocity_bin * MAX_VELOCITY) // self.num_velocity_bins)

    def _classify(self, token_id: int) -> Tuple[str, int]:
        """(kind, value) of an id: kind is "time", "pitch", "velocity", "tie", "eos" or "skip"."""
        if token_id == self.eos_token_id:
            return "eos", 0
        if token_id == self.tie_token_id:
            return "tie", 0
        if self.time_offset <= token_id < self.pitch_offset:
            return "time", token_id - self.time_offset
        if self.pitch_offset <= token_id < self.velocity_offset:
            return "pitch", token_id - self.pitch_offset
        if self.velocity_offset <= token_id < self.tie_token_id:
            return "velocity", token_id - self.velocity_offset
        return "skip", 0

    # --- notes -> tokens -----------------------------------------------------------------------------------------

    def _step(self, seconds: float) -> int:
        return int(round(seconds / self.time_step))

    def encode_notes(self, notes: Iterable[Note], window_start: float = 0.0, window_length: Optional[float] = None) -> List[int]:
        """Token ids describing the notes that sound in `[window_start, window_start + window_length)`, EOS-terminated.

        Notes may come from any time range: those overlapping the window are clipped into it. Times are rounded to the
        time step; a note whose onset and offset round to the same step lasts one step. A note sounding at the window
        start goes to the tie section; an onset at exactly the window end belongs to the next window; a note still
        sounding at the window end gets no note-off.

        Raises:
            ValueError: `window_length` is longer than the tokenizer's `window_seconds`, or not positive.
        """
        length = self.window_seconds if window_length is None else float(window_length)
        if length <= 0 or length > self.window_seconds + 1e-9:
            raise ValueError(f"window_length must be in (0, {self.window_seconds}] seconds, got {window_length}.")
        last_step = self._step(length)
        ties, events = set(), set()
        for note in notes:
            onset = self._step(note.onset - window_start)
            offset = max(self._step(note.offset - window_start), onset + 1)
            if onset >= last_step or offset <= 0:
                continue
            if onset < 0:
                ties.add(note.pitch)
            else:
                events.add((onset, 1, note.pitch, self.velocity_to_bin(note.velocity)))
            if offset <= last_step:
                events.add((offset, 0, note.pitch, 0))
        ids = [self.pitch_token_id(pitch) for pitch in sorted(ties)] + [self.tie_token_id]
        time, velocity = None, None
        for step, _, pitch, velocity_bin in sorted(events):  # note-offs (kind 0) before note-ons at the same step
            if step != time:
                ids.append(self.time_token_id(step))
                time = step
            if velocity_bin != velocity:
                ids.append(self.velocity_token_id(velocity_bin))
                velocity = velocity_bin
            ids.append(self.pitch_token_id(pitch))
        ids.append(self.eos_token_id)
        return ids

    # --- tokens -> notes -----------------------------------------------------------------------------------------

    def _split_tie_section(self, ids: Sequence[int]) -> Tuple[List[int], int]:
        """(pitches of the tie section, index where the events start). A sequence that does not open with
        pitches followed by `<tie>` has no tie section."""
        pitches = []
        for index, token_id in enumerate(ids):
            kind, value = self._classify(token_id)
            if kind == "tie":
                return pitches, index + 1
            if kind == "pitch":
                pitches.append(value)
            elif kind != "skip":
                return [], 0
        return [], 0

    def decode_windows(
        self,
        windows: Sequence[Sequence[int]],
        window_starts: Sequence[float],
        window_length: Optional[float] = None,
    ) -> List[Note]:
        """Notes of consecutive windows, stitched: the function the processor uses for audio of any length.

        A note still sounding at the end of window k continues into window k+1 when that window's tie section lists its
        pitch (one note, original onset), and ends at the boundary otherwise. A tie for a pitch that was not sounding is
        dropped, except in the first window, where it starts at the window start. Notes still sounding after the last
        window end with it.

        Decoding never raises: ids outside the vocabulary and PAD/BOS/UNK are skipped; everything after EOS is ignored;
        a time going backwards is clamped to the current time; a note-off for a pitch that is not sounding, and a stray
        `<tie>` after the tie section, are ignored; a pitch before any time token happens at the window start; a note-on
        before any velocity token gets velocity 80; a note-on for a pitch already sounding ends it and starts it again;
        notes that would last less than one time step are dropped.
        """
        length = self.window_seconds if window_length is None else float(window_length)
        if len(windows) != len(window_starts):
            raise ValueError(f"Got {len(windows)} token windows but {len(window_starts)} window starts.")
        notes: List[Note] = []
        active: Dict[int, Tuple[float, int]] = {}

        def close(pitch: int, end: float):
            onset, velocity = active.pop(pitch)
            if end - onset >= self.time_step / 2:
                notes.append(Note(onset, end, pitch, velocity))

        for index, (ids, start) in enumerate(zip(windows, window_starts)):
            ids = [int(i) for i in ids]
            start = float(start)
            ties, position = self._split_tie_section(ids)
            for pitch in list(active):
                if pitch not in ties:
                    close(pitch, start)
            if index == 0:
                for pitch in ties:
                    active.setdefault(pitch, (start, UNBINNED_VELOCITY))
            step, velocity_bin = 0, None
            for token_id in ids[position:]:
                kind, value = self._classify(token_id)
                if kind == "eos":
                    break
                if kind == "time":
                    step = max(step, value)
                elif kind == "velocity":
                    velocity_bin = value
                elif kind == "pitch":
                    time = round(start + step * self.time_step, 6)
                    if velocity_bin == 0:
                        if value in active:
                            close(value, time)
                    else:
                        if value in active:
                            close(value, time)
                        velocity = UNBINNED_VELOCITY if velocity_bin is None else self.bin_to_velocity(velocity_bin)
                        active[value] = (time, velocity)
            last_end = round(start + length, 6)
        if windows:
            for pitch in list(active):
                close(pitch, last_end)
        return sort_notes(notes)

    def decode_notes(self, ids: Sequence[int], window_start: float = 0.0, window_length: Optional[float] = None) -> List[Note]:
        """Notes of one window: tied notes start at `window_start`, notes still sounding end at the window end."""
        return self.decode_windows([ids], [window_start], window_length)


__all__ = ["Sound2SheetTokenizer"]
