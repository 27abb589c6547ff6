"""grokstack: run xAI's open Grok-1 and Grok-2 weights faithfully."""

from .config import ModelConfig
from .errors import GrokstackError

__version__ = "0.1.0"
__all__ = ["GrokstackError", "ModelConfig", "__version__"]
