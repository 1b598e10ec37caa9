"""Generated text for methods that caption images and rewrite captions with a language model.

* :mod:`.cache`: the content-addressed record of every generation (replay runs offline exactly);
* :mod:`.llm`: OpenAI-compatible endpoints and local transformers language models;
* :mod:`.captioner`: transformers image-to-text models (BLIP-2, ...).

Nothing here imports torch or transformers until a model is built.
"""

from .cache import GENERATION_MODES, IMPORTED, GenerationCache, ReplayMiss, request_key

__all__ = ["GENERATION_MODES", "IMPORTED", "GenerationCache", "ReplayMiss", "request_key"]
