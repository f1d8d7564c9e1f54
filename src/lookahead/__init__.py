"""lookahead: lossless trie-drafted generation for Hugging Face causal LMs."""
from .decoding.sampling import SamplingParams
from .decoding.support import UnsupportedModelError
from .drafting.trie import Budget, TokenTrie, TrieFileError
from .engine import DraftConfig, Engine, GenerationOutput, GenerationStats, TextStream, load
from .tree import DraftTree

__all__ = ["load", "Engine", "DraftConfig", "SamplingParams", "GenerationOutput", "GenerationStats", "TextStream",
           "TokenTrie", "TrieFileError", "Budget", "DraftTree", "UnsupportedModelError"]
__version__ = "0.1.0"
