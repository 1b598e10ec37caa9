"""Caption the reference, rewrite the caption with the modification, retrieve with the CLIP text embedding.

For each query set, :meth:`CaptionRewrite.prepare`:

1. captions every distinct reference image ``captions`` times (one request per image, keyed by the image's
   sha256, the captioner, its prompt and decoding);
2. asks the language model to rewrite each caption with the query's instruction (one request per caption,
   keyed by the caption and instruction, the model, the prompt's hash and the sampling parameters);
3. parses each answer (the instruction stands in when the answer has no rewritten text, as in CIReVL).

Every generation goes through the :class:`~cirbench.generation.GenerationCache`: a second run, or a run with
``--generation replay`` on a machine without the models, uses exactly the same texts. Models are loaded only
when something is missing. Published generations are imported with ``--import-generations``.

:meth:`compose` encodes the rewritten texts. CIReVL: the normalised text feature of its one rewrite. LDRE:
the normalised mean of the raw text features of its rewrites (its divergent-caption ensemble with equal
weights, as its official CIRR code); with ``--adaptive-ensemble`` (the default on CIRCO, as its official CIRCO
code) the ensemble is weighted instead, once per query set, by :func:`adaptive_weights` (see
:meth:`LDRE.finalize_queries`). SEIZE: two vectors per query, the LDRE feature and the same ensemble over the
captions themselves; :meth:`combine_scores` then scores ``a + neg * min(a - b, 0) + pos * max(a - b, 0)``
with ``a``/``b`` the cosine similarities of the two (the semantic editing increment).

:class:`LanguageModelMethod` holds what every language-model method shares, OSrCIR's one stage
(:mod:`.onestage`) included: the request and its cache key, the prompt, generating once, asking for what the
cache lacks, and retrieval by the answers' text features.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cirbench.errors import CirbenchError
from cirbench.generation import IMPORTED, GenerationCache, ReplayMiss
from cirbench.generation.hf import free_memory
from cirbench.generation.images import caption_missing, generate_once, image_digests, resumable, say
from cirbench.generation.llm import check_llm
from cirbench.generation.options import caption_request_of, captioner_of, generation_precision
from cirbench.method import Method, QuerySet
from cirbench.types import Query
from cirbench.util import default_cache_dir, json_loads, keyed_texts_sha256

from .importers import import_generations
from .prompts import Prompt, instruction_of, load_prompt

ENSEMBLES = ("single", "mean", "increment")
LOCAL_MAX_TOKENS = 700  # a local model's answer length when --max-tokens 0 leaves it open


class LanguageModelMethod(Method):
    """What the methods that ask a language model for the target's description share: the model and its
    request (``task``: what it is asked, part of every answer's cache key), the prompt of ``prompt_kind``,
    generating once per cache (:meth:`prepare`), asking for what the cache lacks (:meth:`_ask`), and retrieval
    by the CLIP text features of the answers (``self.texts[query id]["rewrites"]``)."""

    task = "rewrite"
    prompt_kind = "rewrite"
    generates = "texts"  # what a job waiting for another's generation is told it waits for
    vision = False  # whether the prompts hold images (a local model is then a vision-language one)
    ensemble = "single"
    rewrite_batch = 32  # requests at once (an endpoint answers them in parallel)

    def __init__(self, backbone, options, dataset=None):
        super().__init__(backbone, options, dataset)
        o = self.options
        self.prompt: Prompt = load_prompt(str(o.get("prompt") or "builtin"), self.prompt_kind)
        self.mode = str(o.get("generation") or "auto")
        self.rewrite_request: dict[str, Any] = {"task": self.task, "model": check_llm(str(o["llm"])),
                                                "prompt": self.prompt.identity, "params": self._llm_params()}
        self.texts: dict[str, dict[str, Any]] = {}  # query id -> its generated texts, and what they gave
        self.stats = {"cached": 0, "generated": 0, "imported": 0, "fallback_to_instruction": 0}

    # -- identity -------------------------------------------------------------------------------------
    def _precision(self) -> str:
        return generation_precision(self.options)

    def _llm_params(self) -> dict[str, Any]:
        """What the language model is asked with (every value is part of the answers' cache key)."""
        o = self.options
        seed = o.get("sampling_seed")
        local = str(o["llm"]).startswith("hf:")
        stop = parse_stops(str(o.get("stop") or ""))
        params: dict[str, Any] = {"temperature": float(o.get("temperature") or 0.0),
                  # 0: none sent to an endpoint; a local model must stop somewhere
                  "max_tokens": int(o.get("max_tokens") or 0) or (LOCAL_MAX_TOKENS if local else None),
                  "stop": stop, "seed": int(seed) if seed is not None else None}
        if local:  # an endpoint's precision is the server's, not ours to record
            params["precision"] = self._precision()
        return params

    def gallery_feature_kind(self) -> dict:
        return {"kind": "image-global"}  # the plain CLIP image feature, shared with every other method

    def reference_feature_kind(self) -> None:
        return None  # references are read from their files in prepare

    def info(self) -> dict:
        return {"llm": self.rewrite_request["model"], "prompt": self.prompt.identity, "prompt_parse": self.prompt.parse,
                "llm_params": self.rewrite_request["params"], "ensemble": self.ensemble}

    def summary(self) -> dict:
        digest = keyed_texts_sha256((qid, self.texts[qid]["rewrites"]) for qid in sorted(self.texts))
        return {"generations": dict(self.stats), "rewritten_texts_sha256": digest,
                "queries": len(self.texts)}

    def query_details(self, query: Query) -> dict[str, Any] | None:
        return self.texts.get(query.id)

    # -- generation -------------------------------------------------------------------------------------
    @staticmethod
    def _cache_folder(qs: QuerySet) -> Path:
        return (qs.cache_dir or default_cache_dir()) / "generations"

    def _generation_identity(self) -> dict[str, Any]:
        """Everything besides the queries that determines the generated texts."""
        return {"llm": self.rewrite_request}

    def prepare(self, query_set: QuerySet) -> None:
        """Generate what is missing, once: the first of the jobs (or torchrun ranks) that would make the same
        texts makes them, the others wait and read them (see :func:`generate_once`)."""
        qs = query_set
        same = {**self._generation_identity(), "set": [qs.dataset, qs.split, qs.name],
                "queries": [(q.id, q.reference) for q in qs.queries]}
        generate_once(self._cache_folder(qs), self.mode, same,
                      f"{qs.name}: waiting for another process that is generating the same {self.generates}; its "
                      "texts will be used",
                      lambda cache: self._prepare_texts(qs, cache))

    def _prepare_texts(self, qs: QuerySet, cache: GenerationCache) -> None:
        self._prepare(qs, cache)
        for key in ("cached", "generated", "imported"):
            self.stats[key] += cache.stats.get(key, 0)

    def _prepare(self, qs: QuerySet, cache: GenerationCache) -> None:
        """Fill ``self.texts`` for every query of ``qs`` from ``cache``, generating what it lacks."""
        raise NotImplementedError

    def _answers(self, qs: QuerySet, cache: GenerationCache,
                 requests: Iterable[tuple[Any, dict[str, Any], Query, Callable[[], Any]]], what: str,
                 first: Callable[[Query], str]) -> dict[Any, str]:
        """The model's answer to each distinct ``(name, cache key, query, messages maker)`` of ``requests``: the
        recorded one, else asked for (:meth:`_ask`; ``first(query)`` names the first missing one)."""
        answers: dict[Any, str] = {}
        todo: dict[Any, tuple[Any, dict[str, Any], Callable[[], Any]]] = {}
        asking: Query | None = None
        for name, key, query, messages in requests:
            if name in answers or name in todo:
                continue
            hit = cache.lookup(key)
            if hit:
                answers[name] = hit[0]
            else:
                todo[name] = (name, key, messages)
                asking = asking or query
        if asking is not None:
            answers.update(self._ask(qs, cache, list(todo.values()), what, first(asking)))
        return answers

    def _ask(self, qs: QuerySet, cache: GenerationCache,
             todo: Sequence[tuple[Any, dict[str, Any], Callable[[], Any]]], what: str, first: str) -> dict[Any, str]:
        """Ask the language model each ``(name, cache key, messages maker)`` of ``todo`` (none of them cached);
        record every answer as it arrives, so that none is lost to a later failure; return ``{name: answer}``.
        The messages are made batch by batch (an image in each would otherwise all be held at once). A replay
        run fails at once, with ``first`` naming what is missing."""
        answers: dict[Any, str] = {}
        if not todo:
            return answers
        cache.require_live(f"{first}; {len(todo)} {what} in all")
        model = self.rewrite_request["model"]
        if model.startswith("hf:"):
            say(qs.name, qs.progress,
                f"loading the language model {model} ({self._precision()}) for {len(todo)} {what}")
        llm = self._build_llm()
        source, batch = llm.source(), self.rewrite_batch
        with resumable(cache, len(todo), what) as made:
            for start in tqdm(range(0, len(todo), batch), desc=f"{qs.name}: asking {model}", unit="batch",
                              disable=not qs.progress, leave=False):
                chunk = todo[start : start + batch]

                def keep(k: int, text: str, chunk=chunk) -> None:  # as each answer arrives: none is lost
                    name, key, _ = chunk[k]
                    cache.put(key, [text], source)
                    answers[name] = text
                    made[0] += 1

                llm.generate([messages() for _, _, messages in chunk], on_result=keep)
        del llm
        free_memory()  # before the gallery is encoded
        return answers

    def _build_llm(self):
        """The language model, loaded for one evaluation set's missing answers and dropped after them."""
        from cirbench.generation.llm import build_llm

        p = self.rewrite_request["params"]
        return build_llm(self.rewrite_request["model"], url=self.options.get("llm_url"), temperature=p["temperature"],
                         max_tokens=p["max_tokens"], stop=tuple(p["stop"]), seed=p["seed"],
                         device=str(self.backbone.device), precision=self._precision(), vision=self.vision)

    # -- retrieval ----------------------------------------------------------------------------------------
    def _raw_text(self, texts: list[str]) -> torch.Tensor:
        """Raw text features, in batches, not memoised (rewrites are met once)."""
        return self.backbone.encode_text(texts, memoize=False, normalize=False)

    def _ensemble(self, groups: list[list[str]]) -> torch.Tensor:
        """Normalised mean of the raw text features of each group."""
        flat = [t for g in groups for t in g]
        feats = self._raw_text(flat)
        sizes = torch.tensor([len(g) for g in groups], device=feats.device)
        owner = torch.repeat_interleave(torch.arange(len(groups), device=feats.device), sizes)
        sums = torch.zeros(len(groups), feats.shape[1], device=feats.device).index_add_(0, owner, feats)
        return torch.nn.functional.normalize(sums / sizes.unsqueeze(1), dim=-1)

    def _rows(self, queries: list[Query]) -> list[dict[str, Any]]:
        try:
            return [self.texts[q.id] for q in queries]
        except KeyError as exc:
            raise CirbenchError(f"query {exc.args[0]} was not prepared (compose called before prepare)") from None

    def compose(self, references: torch.Tensor, queries: list[Query]) -> torch.Tensor:
        return self._ensemble([r["rewrites"] for r in self._rows(queries)])


class CaptionRewrite(LanguageModelMethod):
    """The caption-rewrite-retrieve family (see the module docstring); ``ensemble`` picks the member."""

    generates = "captions and rewrites"

    def __init__(self, backbone, options, dataset=None):
        super().__init__(backbone, options, dataset)
        o = self.options
        self.n = int(o.get("captions") or 1)
        if self.ensemble == "single" and self.n != 1:
            raise CirbenchError(f"{type(self).__name__.lower()} rewrites one caption per query (--captions 1)")
        self.caption_per = str(o.get("caption_per") or "image")
        self.caption_request = caption_request_of(o, self.n)

    def info(self) -> dict:
        return {"captioner": self.caption_request["model"], "caption_prompt": self.options.get("caption_prompt") or "",
                "captions": self.n, "caption_per": self.caption_per, "caption_decoding": self.caption_request["params"],
                **super().info()}

    def _generation_identity(self) -> dict[str, Any]:
        return {"caption": self.caption_request, "rewrite": self.rewrite_request, "per": self.caption_per}

    def _prepare(self, qs: QuerySet, cache: GenerationCache) -> None:
        image_sha = dict(zip(qs.references, image_digests(list(qs.references.values()), qs.name, qs.progress),
                             strict=True))
        imports = [p for p in str(self.options.get("import_generations") or "").split(",") if p.strip()]
        if imports:
            if self.prompt.user is not None:
                raise CirbenchError("--import-generations records texts another prompt made: name that prompt with "
                                    "--prompt name:ID (e.g. name:cirevl-simple) so the records say so")
            import_generations([Path(p.strip()).expanduser() for p in imports], qs, image_sha, self, cache)
        self._rewrites(qs, cache, self._captions(qs, cache, image_sha))

    def caption_key(self, sha: str) -> dict[str, Any]:
        return {**self.caption_request, "image": sha}

    def query_caption_key(self, sha: str, query: Query) -> dict[str, Any]:
        """The captions of one query's reference image made for that query alone (``--caption-per query``, and
        every imported LDRE/SEIZE file: their script captions each query apart, so two queries of one image may
        differ, and each query's rewrites were made from its own captions)."""
        return {**self.caption_key(sha), "query": query.id, "instruction": instruction_of(query)}

    def rewrite_key(self, caption: str, instruction: str) -> dict[str, Any]:
        return {**self.rewrite_request, "caption": caption, "instruction": instruction}

    def _captions(self, qs: QuerySet, cache: GenerationCache, image_sha: dict[str, str]) -> dict[str, list[str]]:
        """Each query's captions (query id -> list): its own where recorded (:meth:`query_caption_key`; with
        ``--caption-per image`` only published ones, which its rewrites were made from), else its reference
        image's; what is missing is generated, per query or per image."""
        per_query = self.caption_per == "query"
        unit_name = "queries" if per_query else "images"
        out: dict[str, list[str]] = {}
        units: dict[str, tuple[str, dict[str, Any], list[str]]] = {}  # unit -> (reference id, cache key, query ids)
        for q in qs.queries:
            sha = image_sha[q.reference]
            own_key = self.query_caption_key(sha, q)
            own = cache.lookup(own_key, "" if per_query else IMPORTED)
            if own is not None and len(own) == self.n:
                out[q.id] = own
                continue
            unit, key = (q.id, own_key) if per_query else (q.reference, self.caption_key(sha))
            units.setdefault(unit, (q.reference, key, []))[2].append(q.id)
        todo = []
        for unit, (rid, key, qids) in units.items():
            hit = None if per_query else cache.lookup(key)  # a query's own key was looked up above
            if hit is not None and len(hit) == self.n:
                out.update(dict.fromkeys(qids, hit))
            else:
                todo.append((unit, rid, key, qids))
        made = caption_missing([(unit, qs.references[rid], key) for unit, rid, key, _ in todo], cache,
                               self._build_captioner, model=self.caption_request["model"], precision=self._precision(),
                               name=qs.name, progress=qs.progress, unit_name=unit_name,
                               first=f"query {todo[0][3][0]}" if todo else "", role="reference image")
        for unit, _, _, qids in todo:
            out.update(dict.fromkeys(qids, made[unit]))
        return out

    def _rewrites(self, qs: QuerySet, cache: GenerationCache, captions: dict[str, list[str]]) -> None:
        """Rewrite every query's captions (``captions``: query id -> list) with its instruction."""
        def requests():
            for q in qs.queries:
                instruction = instruction_of(q)
                for caption in captions[q.id]:
                    pair = (caption, instruction)
                    yield pair, self.rewrite_key(*pair), q, lambda pair=pair: self.prompt.messages(*pair)

        model, prompt = self.rewrite_request["model"], self.prompt.identity[:19]
        answers = self._answers(qs, cache, requests(), "rewrites",
                                lambda q: f"query {q.id} (rewrite of its caption by {model} with prompt {prompt})")
        for q in qs.queries:
            instruction = instruction_of(q)
            caps = captions[q.id]
            raw = [answers[(c, instruction)] for c in caps]
            parsed = [self.prompt.parse_answer(a, instruction) for a in raw]
            fallbacks = sum(1 for _, fell in parsed if fell)
            self.stats["fallback_to_instruction"] += fallbacks
            self.texts[q.id] = {"captions": caps, "rewrites": [t for t, _ in parsed], "fallbacks": fallbacks}

    def _build_captioner(self):
        """The captioner, loaded for one evaluation set's missing captions and dropped after them."""
        return captioner_of(self.options, self.n, str(self.backbone.device))

    def compose(self, references: torch.Tensor, queries: list[Query]) -> torch.Tensor:
        after = super().compose(references, queries)
        if self.ensemble != "increment":
            return after
        return torch.stack([after, self._ensemble([r["captions"] for r in self._rows(queries)])], dim=1)

    def combine_scores(self, sims: torch.Tensor) -> torch.Tensor:
        after, before = sims[..., 0, :], sims[..., 1, :]
        diff = after - before
        pos, neg = float(self.options.get("pos_factor", 0.13)), float(self.options.get("neg_factor", 2.1))
        return after + neg * diff.clamp(max=0) + pos * diff.clamp(min=0)


class CIReVL(CaptionRewrite):
    ensemble = "single"


class LDRE(CaptionRewrite):
    """LDRE; with ``adaptive_ensemble`` its official CIRCO protocol (``src/divergent_caption_ensemble.py``,
    ``use_adaptive_ensemble``): the rewrites are weighted by caption slot rather than averaged."""

    ensemble = "mean"

    def __init__(self, backbone, options, dataset=None):
        super().__init__(backbone, options, dataset)
        self.adaptive = bool(self.options.get("adaptive_ensemble"))
        self._slots: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # query id -> (rewrites, captions) [n, D]
        self.weights: dict[str, list[float]] = {}  # query set -> slot weights
        self._set = ""

    def info(self) -> dict:
        out = super().info()
        if self.adaptive:
            out["adaptive_ensemble"] = {"topk": int(self.options.get("adaptive_topk") or 5),
                                        "temperature": float(self.options.get("adaptive_temperature") or 0.04)}
        return out

    def summary(self) -> dict:
        return {**super().summary(), **({"adaptive_weights": self.weights} if self.adaptive else {})}

    def prepare(self, query_set: QuerySet) -> None:
        super().prepare(query_set)
        self._set = query_set.name

    def compose(self, references: torch.Tensor, queries: list[Query]) -> torch.Tensor:
        if not self.adaptive:
            return super().compose(references, queries)
        rows = self._rows(queries)
        for q, row in zip(queries, rows, strict=True):
            if len(row["rewrites"]) != self.n or len(row["captions"]) != self.n:
                raise CirbenchError(f"query {q.id} has {len(row['captions'])} captions and {len(row['rewrites'])} "
                                    f"rewrites; the adaptive ensemble pairs {self.n} of each (--captions)")
        raw = self._raw_text([t for r in rows for t in r["rewrites"]]).view(len(rows), self.n, -1)
        captions = self._raw_text([t for r in rows for t in r["captions"]]).view(len(rows), self.n, -1)
        rewrites, captions = (torch.nn.functional.normalize(x, dim=-1) for x in (raw, captions))
        for i, q in enumerate(queries):  # each slot's rewrite and caption, for finalize_queries
            self._slots[q.id] = (rewrites[i], captions[i])
        return torch.nn.functional.normalize(raw.mean(dim=1), dim=-1)  # the equal-weight ensemble until then

    def finalize_queries(self, queries: list[Query], features: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        if not self.adaptive:
            return features
        rewrites = torch.stack([self._slots[q.id][0] for q in queries], dim=1)  # [n, Q, D]
        captions = torch.stack([self._slots[q.id][1] for q in queries], dim=1)
        weights = adaptive_weights(rewrites, captions, gallery, int(self.options.get("adaptive_topk") or 5),
                                   float(self.options.get("adaptive_temperature") or 0.04))
        self.weights[self._set] = [round(float(w), 6) for w in weights]
        self._slots.clear()
        ensemble = (weights.to(rewrites.dtype).view(-1, 1, 1) * rewrites).sum(dim=0)
        return torch.nn.functional.normalize(ensemble, dim=-1).to(features.device)


def adaptive_weights(rewrites: torch.Tensor, captions: torch.Tensor, gallery: torch.Tensor, topk: int,
                     temperature: float, block: int = 1 << 25) -> torch.Tensor:
    """LDRE's weight of each caption slot ``i`` over a whole query set (official CIRCO code): the similarity
    the slot's rewrites lose against its captions, ``s_i = sum over queries of the topk largest
    max(caption_i . g - rewrite_i . g, 0)`` over gallery items ``g``, then ``softmax(s / max(s) / temperature)``.
    ``rewrites``/``captions``: normalised ``[n, Q, D]``; ``gallery``: ``[G, D]``. Where no rewrite loses
    anything (``max(s) = 0``, a division by zero in the official code) the weights are equal."""
    n, n_queries = rewrites.shape[0], rewrites.shape[1]
    k = min(topk, gallery.shape[0])
    rows = max(1, block // max(1, gallery.shape[0]))  # queries per block: bounded memory for any gallery
    lost = torch.zeros(n, dtype=torch.float64, device=gallery.device)  # summed where computed: one sync at the end
    for i in range(n):
        for start in range(0, n_queries, rows):
            after = rewrites[i, start : start + rows].to(gallery.dtype) @ gallery.T
            before = captions[i, start : start + rows].to(gallery.dtype) @ gallery.T
            drop = (before.float() - after.float()).clamp_(min=0)
            lost[i] += torch.topk(drop, k, dim=1).values.double().sum()
    lost = lost.cpu()
    top = float(lost.max()) if n else 0.0
    if top <= 0:
        return torch.full((n,), 1.0 / max(n, 1), dtype=torch.float64)
    return torch.softmax(lost / top / temperature, dim=0)


class SEIZE(CaptionRewrite):
    ensemble = "increment"
    query_vectors = 2


def parse_stops(text: str) -> list[str]:
    """``--stop`` as typed on a command line: one text, where ``\\n`` and ``\\t`` stand for a newline and a
    tab, or several as a JSON list (``["\\n\\n", "<|endoftext|>"]``, CIReVL's two); '' for none."""
    if text.lstrip().startswith("["):
        try:
            stops = json_loads(text)
        except json.JSONDecodeError as exc:
            raise CirbenchError(f"--stop {text!r} is not a JSON list of texts: {exc.msg}") from None
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise CirbenchError(f"--stop {text!r} is not a JSON list of texts")
        return [s for s in stops if s]
    text = re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)
    return [text] if text else []


__all__ = ["CIReVL", "LDRE", "SEIZE", "CaptionRewrite", "adaptive_weights", "instruction_of", "ReplayMiss"]
