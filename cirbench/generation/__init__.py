"""Generated text for methods that caption images, rewrite captions or reason over images with a language model.

* :mod:`.cache`: the content-addressed record of every generation (replay runs offline exactly);
* :mod:`.llm`: OpenAI-compatible endpoints and local transformers language models;
* :mod:`.captioner`: transformers image-to-text models (BLIP-2, ...);
* :mod:`.images`: captioning images through the cache, images as data URLs for multimodal models, and
  generating once across torchrun ranks and parallel jobs;
* :mod:`.options`: the options that methods generating text declare alike.

Nothing here imports torch or transformers until a model is built.
"""

from .cache import GENERATION_MODES, IMPORTED, GenerationCache, ReplayMiss, request_key

__all__ = ["GENERATION_MODES", "IMPORTED", "GenerationCache", "ReplayMiss", "request_key"]
