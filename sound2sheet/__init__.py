"""Sound2Sheet: piano transcription for the Hugging Face ecosystem.

Importing the package registers its classes with the transformers Auto* factories, so that `AutoConfig`,
`AutoModel`, `AutoModelForSpeechSeq2Seq`, `AutoTokenizer`, `AutoFeatureExtractor` and `AutoProcessor` load a saved
Sound2Sheet folder.
"""

from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForSpeechSeq2Seq,
    AutoProcessor,
    AutoTokenizer,
)

from .configuration_sound2sheet import Sound2SheetConfig
from .feature_extraction_sound2sheet import Sound2SheetFeatureExtractor, load_audio
from .generation_sound2sheet import NoteEventGrammarLogitsProcessor
from .modeling_sound2sheet import Sound2SheetForConditionalGeneration, Sound2SheetModel, Sound2SheetPreTrainedModel
from .notes import MidiFileError, Note, pitch_list, read_midi, write_midi
from .pipelines import Sound2SheetPipeline, register_pipeline
from .processing_sound2sheet import Sound2SheetProcessor
from .tokenization_sound2sheet import Sound2SheetTokenizer

__version__ = "0.1.0"

AutoConfig.register(Sound2SheetConfig.model_type, Sound2SheetConfig, exist_ok=True)
AutoModel.register(Sound2SheetConfig, Sound2SheetModel, exist_ok=True)
AutoModelForSpeechSeq2Seq.register(Sound2SheetConfig, Sound2SheetForConditionalGeneration, exist_ok=True)
AutoTokenizer.register(Sound2SheetConfig, tokenizer_class=Sound2SheetTokenizer, exist_ok=True)
AutoFeatureExtractor.register(Sound2SheetConfig, Sound2SheetFeatureExtractor, exist_ok=True)
AutoProcessor.register(Sound2SheetConfig, Sound2SheetProcessor, exist_ok=True)
register_pipeline()

__all__ = [
    "Sound2SheetConfig",
    "Sound2SheetModel",
    "Sound2SheetPreTrainedModel",
    "Sound2SheetForConditionalGeneration",
    "Sound2SheetTokenizer",
    "Sound2SheetFeatureExtractor",
    "Sound2SheetProcessor",
    "Sound2SheetPipeline",
    "NoteEventGrammarLogitsProcessor",
    "load_audio",
    "Note",
    "MidiFileError",
    "read_midi",
    "write_midi",
    "pitch_list",
]
