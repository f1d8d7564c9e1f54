"""lookahead: lossless trie-drafted generation for Hugging Face causal LMs."""
from .decoding.sampling import SamplingParams
from .decoding.support import UnsupportedModelError
from .drafting.fusion import Budget
from .drafting.state import DraftState, StateFileError
from .drafting.trie import TokenTrie
from .engine import DraftConfig, Engine, TextStream, load
from .request import GenerationOutput, GenerationStats, Request
from .tree import DraftTree

__all__ = ["load", "Engine", "DraftConfig", "SamplingParams", "Request", "GenerationOutput", "GenerationStats",
           "TextStream", "DraftState", "StateFileError", "TokenTrie", "Budget", "DraftTree", "UnsupportedModelError"]
__version__ = "0.1.0"
