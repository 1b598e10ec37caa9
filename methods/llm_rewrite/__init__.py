"""Built-in plugin: the language-model methods: the caption-rewrite-retrieve family (CIReVL, LDRE, SEIZE) and the
one-stage OSrCIR.

A captioner describes the reference image, a language model rewrites the description with the modification,
and the CLIP text embedding of the rewrite is ranked against the gallery's image embeddings. The captioner
is any transformers image-to-text model (``hf:...``, BLIP-2 by default); the language model any
OpenAI-compatible endpoint (``openai:MODEL`` with ``--llm-url``) or a local transformers model (``hf:...``).

* ``cirevl`` (Karthik et al., ICLR 2024): one caption (BLIP-2 FLAN-T5 XXL, beam search, CIReVL's captioning
  prompt), one rewrite at temperature 0, normalised text feature.
* ``ldre`` (Yang et al., SIGIR 2024): 15 sampled captions (BLIP-2 OPT-6.7b COCO) per query, one rewrite each, the
  normalised mean of their raw text features; on CIRCO, as its official code there, a weighted sum of the
  normalised rewrite features with one weight per caption slot, from how much each slot's rewrites lose
  against its captions over the gallery (``--adaptive-ensemble``, ``--adaptive-topk``,
  ``--adaptive-temperature``).
* ``seize`` (Yang et al., ACM MM 2024): LDRE's rewrites and captions, scored by the semantic editing
  increment (``--pos-factor``, ``--neg-factor``).
* ``osrcir`` (Tang et al., CVPR 2025): one stage, no captioner: a multimodal model (an OpenAI-compatible
  endpoint, or a local transformers vision-language model) sees the reference image with the modification,
  answers with a reflective chain of thought in JSON, and its target description is retrieved by text (see
  :mod:`.onestage`).

Every generation is cached by content under ``<cache>/generations``; ``--generation replay`` reruns without
any model, and ``--import-generations FILE`` reads the texts CIReVL, LDRE or SEIZE published (with
``--prompt name:ID`` naming the prompt that made them). The built-in rewriting prompt is cirbench's own; pass
the authors' prompt as a file (``--prompt prompt.txt``) for their exact wording.
"""

from cirbench.generation.options import captioner_options, generation_options
from cirbench.hookspecs import hookimpl
from cirbench.types import MethodSpec, OptionSpec

CIREVL_CAPTION_PROMPT = ("Describe the image in complete detail. You must especially focus on all the objects in "
                         "the image")  # CIReVL's prompts.blip_prompt
# LDRE loads LAVIS's blip2_opt "caption_coco_opt6.7b", whose config prompts with this; the caption is what follows
LDRE_CAPTION_PROMPT = "a photo of"


def _llm_options(llm: str, llm_help: str, prompt_help: str, temperature: float, max_tokens: int,
                 max_tokens_help: str, stop: str, stop_help: str) -> tuple:
    """The language model, its endpoint, prompt and decoding."""
    return (
        OptionSpec("llm", llm_help, "str", llm),
        OptionSpec("llm_url", "Base URL of the OpenAI-compatible endpoint (default $OPENAI_BASE_URL or the OpenAI "
                   "API); the key is read from $OPENAI_API_KEY.", "str", None),
        OptionSpec("prompt", prompt_help, "str", "builtin"),
        OptionSpec("temperature", "Sampling temperature of the language model.", "float", temperature, minimum=0.0,
                   maximum=2.0),
        OptionSpec("max_tokens", f"Most tokens the language model may answer with{max_tokens_help}.", "int",
                   max_tokens, minimum=0, maximum=32_768),
        OptionSpec("stop", "Text that ends the answer (\\n for a newline), several as a JSON list, '' for none "
                   f"({stop_help}).", "str", stop),
    )


def _options(captioner: str, caption_prompt: str, captions: int, temperature: float, caption_per: str,
             max_tokens: int, stop: str, extra=()) -> tuple:
    return (
        *captioner_options(captioner, caption_prompt),
        OptionSpec("captions", "Captions per reference image (each rewritten; several are sampled).", "int", captions,
                   minimum=1, maximum=64),
        OptionSpec("caption_per", "query: caption each query's reference apart, so that queries of one image get "
                   "their own sampled captions (LDRE's official script); image: caption each reference image once "
                   "for all its queries (cheaper: CIRR has about 1.9 queries per reference; the same result with "
                   "greedy or beam decoding).", "str", caption_per, choices=("query", "image")),
        *_llm_options("openai:gpt-3.5-turbo", "Language model: openai:MODEL (an OpenAI-compatible endpoint) or "
                      "hf:PATH_OR_REPO.", "Rewriting prompt: builtin, a .toml/.txt file, or name:ID (recorded "
                      "generations only).", temperature, max_tokens, "; 0: none sent to an endpoint (LDRE's script "
                      "sends none, CIReVL's 700; a local model then stops at 700)", stop,
                      "CIReVL's code stops at a blank line or <|endoftext|>, LDRE's at none"),
        *generation_options("captioner and language model", "captions and answers"),
        OptionSpec("import_generations", "Published generations to record first (CIReVL mods JSON, LDRE/SEIZE "
                   "annotation JSON); several files separated by commas.", "str", None),
        OptionSpec("import_fields", "Record fields holding captions and rewrites in LDRE/SEIZE files.", "str",
                   "multi_caption_opt,multi_gpt-3.5_opt"),
    ) + tuple(extra)


def _osrcir_options() -> tuple:
    return (
        *_llm_options("openai:gpt-4o-2024-08-06", "Multimodal language model: openai:MODEL, an OpenAI-compatible "
                      "endpoint that takes images (the paper's GPT-4o by default; with --llm-url, vLLM, llama.cpp or "
                      "Ollama serving a local one), or hf:PATH_OR_REPO, a local transformers vision-language model "
                      "with a chat template (e.g. Qwen/Qwen2.5-VL-7B-Instruct).", "Reflective chain-of-thought "
                      "prompt: builtin, a .toml file (system, user with {instruction}), a .txt file (the system "
                      "message, such as OSrCIR's prompts.mllm_structural_predictor_prompt_CoT), or name:ID "
                      "(recorded generations only).", 0.0, 1024, "; 0: none sent (the official demo: 1024)",
                      r'["\n\n", "<|endoftext|>"]', "the official demo stops at a blank line or <|endoftext|>"),
        *generation_options("vision-language model", "answers"),
    )
@hookimpl
def register_methods(register):
    register(MethodSpec(
        name="cirevl",
        description="CIReVL: caption the reference (BLIP-2), rewrite it with an LLM, retrieve by text.",
        factory="cirbench.methods.llm_rewrite.pipeline:CIReVL",
        options=_options("hf:Salesforce/blip2-flan-t5-xxl", CIREVL_CAPTION_PROMPT, 1, 0.0, "image", 700,
                         r'["\n\n", "<|endoftext|>"]'),  # CIReVL's src/openai_api.py
        default_backbone=("ViT-L-14", "openai"),
        default_preprocess="targetpad",
        downloads="cirbench.generation.options:generation_downloads",
    ))
    register(MethodSpec(
        name="osrcir",
        description="OSrCIR: a multimodal LLM sees the reference image and the change, reasons (reflective "
                    "chain-of-thought) and describes the target; retrieve by text.",
        factory="cirbench.methods.llm_rewrite.onestage:OSrCIR",
        options=_osrcir_options(),
        default_backbone=("ViT-L-14", "openai"),
        default_preprocess="targetpad",  # its retrieval is CIReVL's
        downloads="cirbench.generation.options:generation_downloads",
    ))
    register(MethodSpec(
        name="ldre",
        description="LDRE: 15 sampled captions, one LLM rewrite each, mean of their text features (on CIRCO weighted "
                    "per caption slot, as its official code).",
        factory="cirbench.methods.llm_rewrite.pipeline:LDRE",
        options=_options("hf:Salesforce/blip2-opt-6.7b-coco", LDRE_CAPTION_PROMPT, 15, 1.0, "query", 0, "", (
            OptionSpec("adaptive_ensemble", "Weigh the rewrites by caption slot over the whole query set against the "
                       "gallery (LDRE's official CIRCO code) instead of averaging them (its CIRR code).", "bool", False,
                       per_dataset={"circo": True}),
            OptionSpec("adaptive_topk", "Adaptive ensemble: the largest similarity drops counted per query.", "int",
                       5, minimum=1, maximum=1000),
            OptionSpec("adaptive_temperature", "Adaptive ensemble: softmax temperature of the slot weights.",
                       "float", 0.04, minimum=1e-6),
        )),
        default_backbone=("ViT-L-14", "openai"),
        default_preprocess="targetpad",
        downloads="cirbench.generation.options:generation_downloads",
    ))
    register(MethodSpec(
        name="seize",
        description="SEIZE: LDRE's rewrites scored by their semantic editing increment over the captions.",
        factory="cirbench.methods.llm_rewrite.pipeline:SEIZE",
        options=_options("hf:Salesforce/blip2-opt-6.7b-coco", LDRE_CAPTION_PROMPT, 15, 1.0, "query", 0, "", (
            OptionSpec("pos_factor", "Weight of the similarity the rewrite gains over the caption.", "float", 0.13,
                       minimum=0.0, sweepable=True),
            OptionSpec("neg_factor", "Weight of the similarity the rewrite loses against the caption.", "float", 2.1,
                       minimum=0.0, sweepable=True),
        )),
        default_backbone=("ViT-L-14", "openai"),
        default_preprocess="targetpad",
        downloads="cirbench.generation.options:generation_downloads",
    ))
