"""grokstack: run xAI's open Grok-1 and Grok-2 weights faithfully."""

from .config import ModelConfig
from .errors import GrokstackError
from .generate import Completion, Event
from .lm import LM, load
from .sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["LM", "Completion", "Event", "GrokstackError", "ModelConfig", "SamplingParams", "__version__", "load"]
