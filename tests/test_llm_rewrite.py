"""The caption-rewrite-retrieve family (CIReVL, LDRE, SEIZE): prompts and answer parsing against CIReVL's code,
the generation cache and exact offline replay, an OpenAI-compatible endpoint (a fake one on the loopback
address), tiny local transformers captioner and language model, importers of published generations, and the
SEIZE score through the ranking code."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from annotations import ANNOTATIONS, copy_tree, needs_annotations, write_placeholder
from generation_models import free_port, write_tiny_blip2, write_tiny_lm

from cirbench.errors import CirbenchError
from cirbench.evaluate import RunConfig, evaluate
from cirbench.generation import GenerationCache, ReplayMiss
from cirbench.generation.llm import OpenAIChat, build_llm
from cirbench.methods.llm_rewrite.prompts import BUILTIN_USER, load_prompt
from cirbench.testing import ToyDatasetPlugin, registered


@pytest.fixture(scope="module")
def blip2(tmp_path_factory):
    return write_tiny_blip2(tmp_path_factory.mktemp("blip2"))


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return write_tiny_lm(tmp_path_factory.mktemp("lm"))


# -- CIReVL's answer parsing, transcribed from src/utils.py (generate_predictions) ------------------------------
def cirevl_parse(resp: str, instruction: str) -> str:
    resp = resp.split("\n")
    for line in resp:
        if line.strip().startswith("Edited Description:"):
            description = line.split(":")[1].strip()
            return instruction if description == "" else description
    return instruction


@pytest.mark.parametrize("answer", [
    "Edited Description: a red car",
    "Sure!\n  Edited Description: a dog: running\nmore",
    "Edited Description:",
    "Edited Description:   \nEdited Description: second",
    "no marker here",
    "",
    "edited description: lower case is not the marker",
])
def test_answer_parsing_is_cirevls(answer):
    prompt = load_prompt("builtin")
    text, fell = prompt.parse_answer(answer, "make it blue")
    assert text == cirevl_parse(answer, "make it blue")
    assert fell == (text == "make it blue")


def test_stop_option_takes_one_text_or_a_json_list():
    from cirbench.methods.llm_rewrite.pipeline import parse_stops

    assert parse_stops("\\n\\n") == ["\n\n"] and parse_stops("END\\t") == ["END\t"] and parse_stops("") == []
    assert parse_stops('["\\n\\n", "<|endoftext|>", ""]') == ["\n\n", "<|endoftext|>"]
    for bad in ('["\\n\\n", 3]', '["unterminated', "[" * 100_000):  # the last nests past the parser's depth
        with pytest.raises(CirbenchError, match="--stop .* JSON list of texts"):
            parse_stops(bad)


def test_prompt_files(tmp_path):
    base = tmp_path / "cirevl_style.txt"
    base.write_text("I have an image. Rewrite it.")
    p = load_prompt(str(base))
    # CIReVL: base_prompt + '\n' + "Image Content: " + caption + '\n' + 'Instruction: ' + instruction
    assert p.messages("a {dog}", "make it {blue}") == [
        {"role": "user",
         "content": "I have an image. Rewrite it.\nImage Content: a {dog}\nInstruction: make it {blue}"}]
    toml = tmp_path / "ldre.toml"
    toml.write_text('system = "sys"\n'
                    'user = "Image Content: {caption}\\nInstruction: {instruction}\\nEdited Description:"\n'
                    'parse = "raw"\n')
    p2 = load_prompt(str(toml))
    assert p2.messages("c", "i")[0] == {"role": "system", "content": "sys"}
    assert p2.parse_answer("  a blue dog \n", "i") == ("a blue dog", False)
    assert p.identity != p2.identity != load_prompt("builtin").identity and p.identity.startswith("sha256:")
    assert load_prompt("name:cirevl-simple").identity == "name:cirevl-simple"
    with pytest.raises(CirbenchError, match="known only by name"):
        load_prompt("name:x").messages("c", "i")
    bad = tmp_path / "bad.toml"
    bad.write_text('user = "no placeholders"\n')
    with pytest.raises(CirbenchError, match="holding \\{caption\\}"):
        load_prompt(str(bad))
    with pytest.raises(CirbenchError, match="does not exist"):
        load_prompt(str(tmp_path / "nope.txt"))
    assert "{caption}" in BUILTIN_USER and "{instruction}" in BUILTIN_USER


# -- the generation cache -----------------------------------------------------------------------------------------
def test_generation_cache_records_replays_and_survives_a_torn_line(tmp_path):
    cache = GenerationCache(tmp_path)
    request = {"task": "rewrite", "model": "openai:m", "prompt": "sha256:x", "params": {"temperature": 0},
               "caption": "a dog", "instruction": "make it red"}
    assert cache.lookup(request) is None
    cache.put(request, ["Edited Description: a red dog"], "live:test")
    with open(cache.path, "a") as fh:
        fh.write('{"key": "torn')  # a run killed mid-line
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        again = GenerationCache(tmp_path, "replay")
    assert again.lookup(request) == ["Edited Description: a red dog"]
    assert again.lookup({**request, "params": {"temperature": 0.7}}) is None  # the key covers every parameter
    with pytest.raises(ReplayMiss, match="query 7"):
        again.require_live("query 7 (rewrite)")
    # the next record after the torn line starts on a line of its own: it is not lost with the torn one
    other = {**request, "caption": "a cat"}
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        writer = GenerationCache(tmp_path)
    writer.put(other, ["Edited Description: a red cat"], "live:test")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        assert GenerationCache(tmp_path).lookup(other) == ["Edited Description: a red cat"]
    with pytest.warns(UserWarning):
        assert GenerationCache(tmp_path, "refresh").lookup(request) is None
    with pytest.raises(CirbenchError, match="unknown generation mode"):
        GenerationCache(tmp_path, "sometimes")


def test_a_batch_of_generations_is_one_write_and_one_sync(tmp_path, monkeypatch):
    """A captioner's batch is recorded with one fsync (a sync per text costs as much as the text on a network
    file system), after a torn line too, and every entry of it reads back."""
    import os

    from cirbench.generation import cache as cache_module

    syncs, fsync = [], os.fsync
    monkeypatch.setattr(cache_module.os, "fsync", lambda fd: syncs.append(fd) or fsync(fd))
    cache = GenerationCache(tmp_path)
    with open(cache.path.parent / "generations.jsonl", "w") as fh:
        fh.write('{"key": "torn')
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        cache = GenerationCache(tmp_path)
    batch = [({"task": "caption", "image": f"sha{i}"}, [f"a photo {i}", f"another photo {i}"]) for i in range(8)]
    cache.put_many(batch, "live:hf:x")
    cache.put_many([], "live:hf:x")
    assert len(syncs) == 1 and cache.stats["generated"] == 8
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        again = GenerationCache(tmp_path, "replay")
    assert [again.lookup(request) for request, _ in batch] == [outputs for _, outputs in batch]


# -- the OpenAI-compatible client -------------------------------------------------------------------------------
def test_openai_client_sends_cirevls_request_and_cuts_at_the_stop(endpoint, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    llm = OpenAIChat("gpt-test", endpoint.url, temperature=0.0, max_tokens=700, stop=("\n\n",))
    prompt = load_prompt("builtin")
    out = llm.generate([prompt.messages("a photo of a cat", "make it red"), prompt.messages("x", "make it blue")])
    assert out[0] == "Here you go.\nEdited Description: a red picture (from 16 chars)"
    body = endpoint.requests[0]
    assert body["model"] == "gpt-test" and body["temperature"] == 0.0 and body["max_tokens"] == 700
    assert body["stop"] == ["\n\n"] and body["messages"][0]["role"] == "system"
    assert endpoint.headers[0]["Authorization"] == "Bearer sk-test"
    endpoint.fail_next = [503]  # retried
    assert llm.generate([prompt.messages("x", "make it green")])[0].endswith("(from 1 chars)")
    # a rate limit's own wait is honoured (OpenAI's retry-after-ms first), else the backoff doubles
    from cirbench.generation import llm as llm_module

    waits: list[float] = []
    monkeypatch.setattr(llm_module.time, "sleep", waits.append)
    endpoint.fail_next, endpoint.fail_headers = [429, 429, 429], {"Retry-After": "7", "retry-after-ms": "250"}
    assert llm.generate([prompt.messages("x", "make it green")])[0].endswith("(from 1 chars)")
    endpoint.fail_next, endpoint.fail_headers = [429, 503], {"Retry-After": "3"}
    llm.generate([prompt.messages("x", "make it green")])
    endpoint.fail_next, endpoint.fail_headers = [503, 503], {}
    llm.generate([prompt.messages("x", "make it green")])
    endpoint.drop_next = 1  # a dropped connection is retried too
    assert llm.generate([prompt.messages("x", "make it green")])[0].endswith("(from 1 chars)")
    assert waits == [0.25, 0.25, 0.25, 3.0, 3.0, 1.0, 2.0, 1.0]
    endpoint.fail_next = [429] * 7  # more than the retries: one line with the code
    with pytest.raises(CirbenchError, match="HTTP 429"):
        llm.generate([prompt.messages("x", "y")])
    endpoint.fail_headers = {}
    endpoint.fail_next = [401]
    with pytest.raises(CirbenchError, match="HTTP 401.*OPENAI_API_KEY"):
        llm.generate([prompt.messages("x", "y")])


def test_local_llm_requests_one_bos_token_and_plain_temperature_sampling(tmp_path):
    """apply_chat_template writes the BOS token itself; encoding its text with the tokenizer's special tokens
    would put a second one in front (as for Llama 3), which changes what the model answers."""
    lm = build_llm(f"hf:{write_tiny_lm(tmp_path / 'chat-lm', chat=True)}", max_tokens=2)
    bos = lm.tokenizer.bos_token_id
    assert lm.tokenizer("a red dog")["input_ids"][0] == bos  # the tokenizer adds one to plain text
    seen = []
    generate = lm.model.generate

    def recording(**kwargs):
        seen.append((kwargs["input_ids"], kwargs["attention_mask"], kwargs))
        return generate(**kwargs)

    lm.model.generate = recording
    lm.generate([[{"role": "user", "content": "a red dog"}], [{"role": "user", "content": "a green cat on grass"}]])
    ids, mask = seen[0][:2]
    for row, keep in zip(ids.tolist(), mask.bool().tolist(), strict=True):
        tokens = [t for t, k in zip(row, keep, strict=True) if k]  # left padding dropped
        assert tokens[0] == bos and tokens[1] != bos, tokens
    # sampling is plain temperature sampling, whatever the model's generation_config holds
    lm.model.generation_config.top_k, lm.model.generation_config.top_p = 5, 0.5
    lm.temperature = 0.7
    lm.generate([[{"role": "user", "content": "a red dog"}]])
    assert {k: seen[-1][2][k] for k in ("do_sample", "temperature", "top_k", "top_p")} == {
        "do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 1.0}


def test_captioner_decodes_with_lavis_arguments_whatever_the_checkpoint_config(blip2):
    """LAVIS's Blip2*.generate passes beams 5, no repetition or length penalty and, for LDRE's nucleus
    sampling, top-p 0.9 at temperature 1 with transformers' default top-k 50: a checkpoint's generation_config
    must not change any of them."""
    from PIL import Image

    from cirbench.generation.captioner import build_captioner

    image = Image.new("RGB", (32, 32), (200, 30, 30))
    for n, expected in ((1, {"num_beams": 5, "do_sample": False, "repetition_penalty": 1.0, "length_penalty": 1.0}),
                        (3, {"num_beams": 5, "do_sample": True, "top_p": 0.9, "top_k": 50, "temperature": 1.0,
                             "num_return_sequences": 3})):
        cap = build_captioner(f"hf:{blip2}", n=n)
        cap.model.generation_config.top_k, cap.model.generation_config.repetition_penalty = 5, 1.3
        seen = []
        generate = cap.model.generate

        def recording(seen=seen, generate=generate, **kwargs):
            seen.append(kwargs)
            return generate(**kwargs)

        cap.model.generate = recording
        assert len(cap.caption([image])[0]) == n
        assert {k: seen[0][k] for k in expected} == expected


def test_unreachable_endpoint_is_one_line(tmp_path):
    llm = build_llm("openai:gpt-test", url=f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(CirbenchError) as info:
        llm.generate([[{"role": "user", "content": "hi"}]])
    message = str(info.value)
    assert "unreachable" in message and "--llm-url" in message and "\n" not in message
    with pytest.raises(CirbenchError, match="unknown language model"):
        build_llm("gpt-4")


# -- whole runs ---------------------------------------------------------------------------------------------
def _cfg(tmp_path, tiny_config, toy_root, method="cirevl", **options):
    return RunConfig(method=method, dataset="toy", split="val", backbone=str(tiny_config), pretrained="none",
                     data_root=toy_root, output=tmp_path / "results", cache_dir=tmp_path / "cache", workers=0,
                     progress=False, bootstrap=0, method_options={k: str(v) for k, v in options.items()})


@pytest.mark.parametrize("options", [{"llm": "gpt-4"}, {"captioner": "blip2"}])
def test_an_unknown_model_kind_fails_before_any_image_is_read(tmp_path, tiny_config, toy_root, monkeypatch, options):
    """A language model or captioner named without its kind (openai:, hf:) is a one-line error when the method is
    built: not after hours of captioning."""
    from cirbench.methods.llm_rewrite import pipeline

    def no_reading(*args, **kwargs):
        raise AssertionError("images were read")

    monkeypatch.setattr(pipeline, "image_digests", no_reading)
    options = {"captioner": "hf:some/blip2", "llm": "openai:gpt-test", **options}
    with registered(ToyDatasetPlugin(), "toy") as reg, pytest.raises(CirbenchError, match="unknown (language|capt)"):
        evaluate(_cfg(tmp_path, tiny_config, toy_root, **options), reg)


def _predictions(outcome):
    return [json.loads(line) for line in outcome.predictions_path.read_text().splitlines()]


def test_cirevl_runs_live_then_replays_offline_exactly(tmp_path, tiny_config, toy_root, blip2, endpoint, monkeypatch):
    live = dict(captioner=f"hf:{blip2}", llm="openai:gpt-test", llm_url=endpoint.url)
    with registered(ToyDatasetPlugin(), "toy") as reg:
        (first,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, **live), reg)
    rows = _predictions(first)
    texts = {q["id"]: q["text"] for q in json.loads((toy_root / "queries.json").read_text())["queries"]}
    pairs = {(r["method"]["captions"][0], texts[r["query"]]) for r in rows}
    assert len(endpoint.requests) == len(pairs)  # one rewrite per distinct (caption, instruction)
    # what CIReVL's src/openai_api.py sends: temperature 0, max_tokens 700, stop=["\n\n", "<|endoftext|>"]
    sent = endpoint.requests[0]
    assert (sent["temperature"], sent["max_tokens"], sent["stop"]) == (0.0, 700, ["\n\n", "<|endoftext|>"])
    assert rows[0]["method"]["rewrites"][0].startswith("a ") and rows[0]["method"]["fallbacks"] == 0
    summary = first.record["method"]["summary"]
    assert summary["generations"]["generated"] == 12 + len(pairs)  # 12 images captioned, then the rewrites
    # replay: the endpoint is gone and no model may be loaded at all
    endpoint.close()
    from cirbench.generation import captioner

    def no_model(*args, **kwargs):
        raise AssertionError("a replay run loaded a model")

    monkeypatch.setattr(captioner, "build_captioner", no_model)
    offline = dict(captioner=f"hf:{blip2}", llm="openai:gpt-test", llm_url=f"http://127.0.0.1:{free_port()}/v1",
                   generation="replay")
    with registered(ToyDatasetPlugin(), "toy") as reg:
        (second,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, **offline), reg)
    assert [r["top"] for r in _predictions(second)] == [r["top"] for r in rows]
    assert second.record["method"]["summary"]["rewritten_texts_sha256"] == summary["rewritten_texts_sha256"]
    assert second.record["method"]["summary"]["generations"]["generated"] == 0
    # a different prompt has no recorded generations: replay names the query it is missing
    other = tmp_path / "other.txt"
    other.write_text("Rewrite.")
    with registered(ToyDatasetPlugin(), "toy") as reg, pytest.raises(ReplayMiss, match="query 0 .*rewrite"):
        evaluate(_cfg(tmp_path, tiny_config, toy_root, prompt=other, **offline), reg)
    # a generation that cannot be made fails before the gallery is encoded (a fresh feature cache stays empty)
    with registered(ToyDatasetPlugin(), "toy") as reg, pytest.raises(ReplayMiss):
        evaluate(dataclasses.replace(_cfg(tmp_path, tiny_config, toy_root, prompt=other, **offline),
                                     cache_dir=tmp_path / "fresh-cache"), reg)
    assert not list((tmp_path / "fresh-cache").glob("features/*/shard-*.safetensors"))
    # and auto mode with the endpoint gone is one line naming it
    monkeypatch.undo()
    with registered(ToyDatasetPlugin(), "toy") as reg, pytest.raises(CirbenchError, match="unreachable"):
        evaluate(_cfg(tmp_path, tiny_config, toy_root, prompt=other, **{**offline, "generation": "auto"}), reg)


def test_parallel_jobs_pay_for_each_text_once(tmp_path, tiny_config, toy_root, blip2, endpoint, capsys):
    """Two jobs on one cache that need the same captions and rewrites (a job array over CLIP settings): one
    generates, the other waits and reads them; the endpoint is asked once per distinct rewrite, not twice."""
    import threading

    live = dict(captioner=f"hf:{blip2}", llm="openai:gpt-test", llm_url=endpoint.url)
    start, outcomes, errors = threading.Barrier(2), [], []

    def job(i):
        cfg = dataclasses.replace(_cfg(tmp_path, tiny_config, toy_root, **live), output=tmp_path / f"results{i}")
        start.wait()
        try:
            outcomes.extend(evaluate(cfg, reg))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with registered(ToyDatasetPlugin(), "toy") as reg:
        threads = [threading.Thread(target=job, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors and len(outcomes) == 2
    texts = {q["id"]: q["text"] for q in json.loads((toy_root / "queries.json").read_text())["queries"]}
    pairs = {(r["method"]["captions"][0], texts[r["query"]]) for r in _predictions(outcomes[0])}
    assert len(endpoint.requests) == len(pairs)
    generated = sorted(o.record["method"]["summary"]["generations"]["generated"] for o in outcomes)
    assert generated == [0, 12 + len(pairs)]  # the waiting job generated nothing
    rewrites = [{r["query"]: r["method"]["rewrites"] for r in _predictions(o)} for o in outcomes]
    assert rewrites[0] == rewrites[1]  # (the rankings differ: threads share torch's RNG for the random weights)
    assert "waiting for another process that is generating the same captions and rewrites" in capsys.readouterr().err


def test_generation_stopped_midway_keeps_what_it_made(tmp_path, tiny_config, toy_root, blip2, endpoint):
    """Answers are recorded as they arrive: when one request of a batch fails for good, the answers the
    endpoint gave to the others in flight are kept, and a rerun asks only for the rest."""
    endpoint.fail_from = 1  # the endpoint answers one request, then fails every other one of the batch
    live = dict(captioner=f"hf:{blip2}", llm="openai:gpt-test", llm_url=endpoint.url)
    with registered(ToyDatasetPlugin(), "toy") as reg, pytest.raises(CirbenchError) as info:
        evaluate(_cfg(tmp_path, tiny_config, toy_root, **live), reg)
    message = str(info.value)
    assert "HTTP 400" in message and "(1 of the " in message and "running again goes on from there" in message
    assert "\n" not in message
    endpoint.fail_from, endpoint.fail_next = None, []
    with registered(ToyDatasetPlugin(), "toy") as reg:
        (out,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, **live), reg)
    generations = out.record["method"]["summary"]["generations"]
    rewrites = int(message.split("(1 of the ")[1].split()[0])
    assert rewrites >= 2 and generations["generated"] == rewrites - 1  # the 12 captions and the first rewrite kept
    assert generations["cached"] == 12 + 1


def test_ldre_asks_the_endpoint_as_its_official_script(tmp_path, tiny_config, toy_root, blip2, endpoint):
    """LDRE's src/reasoning_and_editing.py sends neither max_tokens nor stop, at the default temperature (1.0),
    --max-tokens and --stop ask otherwise, under their own cache key."""
    live = dict(captioner=f"hf:{blip2}", llm="openai:gpt-test", llm_url=endpoint.url, captions=2)
    with registered(ToyDatasetPlugin(), "toy") as reg:
        (out,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, method="ldre", **live), reg)
        sent = endpoint.requests[0]
        assert "max_tokens" not in sent and "stop" not in sent and sent["temperature"] == 1.0
        assert out.record["method"]["info"]["llm_params"]["max_tokens"] is None
        before = len(endpoint.requests)
        evaluate(_cfg(tmp_path, tiny_config, toy_root, method="ldre", max_tokens=50, stop="\\n", **live), reg)
    asked = endpoint.requests[before]
    assert asked["max_tokens"] == 50 and asked["stop"] == ["\n"]
    assert len(endpoint.requests) - before == before  # other parameters: generated again, nothing replayed


def test_answers_without_a_rewrite_fall_back_to_the_instruction(tmp_path, tiny_config, toy_root, blip2, endpoint):
    data = json.loads((toy_root / "queries.json").read_text())
    data["queries"][0]["text"] = "nomarker please"
    (toy_root / "queries.json").write_text(json.dumps(data))
    with registered(ToyDatasetPlugin(), "toy") as reg:
        (out,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, captioner=f"hf:{blip2}", llm_url=endpoint.url), reg)
    row = _predictions(out)[0]
    assert row["method"]["rewrites"] == ["nomarker please"] and row["method"]["fallbacks"] == 1
    assert out.record["method"]["summary"]["generations"]["fallback_to_instruction"] == 1


def test_ldre_and_seize_with_local_models(tmp_path, tiny_config, toy_root, blip2, tiny_lm):
    local = dict(captioner=f"hf:{blip2}", llm=f"hf:{tiny_lm}", captions=3, max_tokens=8, temperature=0.7)
    with registered(ToyDatasetPlugin(), "toy") as reg:
        (ldre,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, method="ldre", **local), reg)
        (seize,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, method="seize", **local, generation="replay"), reg)
    rows = _predictions(ldre)
    assert all(len(r["method"]["captions"]) == 3 and len(r["method"]["rewrites"]) == 3 for r in rows)
    assert ldre.record["method"]["info"]["caption_decoding"]["sampling"] == {"top_p": 0.9, "top_k": 50, "seed": 0}
    # LAVIS's caption_coco_opt6.7b, which LDRE loads, prompts with "a photo of": the caption is what follows
    assert ldre.record["method"]["info"]["caption_prompt"] == "a photo of"
    assert not any(c.startswith("a photo of") for r in rows for c in r["method"]["captions"])
    assert seize.record["method"]["summary"]["generations"]["generated"] == 0  # SEIZE reuses LDRE's generations
    assert seize.record["method"]["summary"]["rewritten_texts_sha256"] == ldre.record["method"]["summary"][
        "rewritten_texts_sha256"]


def test_generation_models_load_in_the_precision_asked_and_are_dropped_after_use(tmp_path, tiny_config, toy_root,
                                                                                 monkeypatch):
    """transformers 5 would load a checkpoint saved in bf16 as bf16 and transformers 4 as fp32: the precision is
    cirbench's option, recorded with the texts. The captioner is gone before the language model loads, and the
    language model before the gallery is encoded (a BLIP-2 and an LLM together may not fit a GPU)."""
    import gc
    import weakref

    from cirbench import evaluate as evaluate_module
    from cirbench.generation import captioner, llm

    blip2_bf16 = write_tiny_blip2(tmp_path / "blip2-bf16", dtype=torch.bfloat16)
    lm_bf16 = write_tiny_lm(tmp_path / "lm-bf16", dtype=torch.bfloat16)
    built: list[tuple[str, torch.dtype, weakref.ref]] = []
    alive_at: dict[str, list[str]] = {}

    def alive() -> list[str]:
        gc.collect()
        return [name for name, _, ref in built if ref() is not None]

    def recording(name, build):
        def wrapped(*args, **kwargs):
            alive_at[name] = alive()
            model = build(*args, **kwargs)
            built.append((name, model.model.dtype, weakref.ref(model)))
            return model
        return wrapped

    monkeypatch.setattr(captioner, "build_captioner", recording("captioner", captioner.build_captioner))
    monkeypatch.setattr(llm, "build_llm", recording("llm", llm.build_llm))
    encode_features = evaluate_module.encode_images

    def encode_images(*args, **kwargs):
        alive_at.setdefault("encode", alive())
        return encode_features(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "encode_images", encode_images)
    local = dict(captioner=f"hf:{blip2_bf16}", llm=f"hf:{lm_bf16}", captions=2, max_tokens=4, temperature=0.7)
    with registered(ToyDatasetPlugin(), "toy") as reg:
        (fp32,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, method="ldre", **local), reg)
        assert [(name, dtype) for name, dtype, _ in built] == [("captioner", torch.float32), ("llm", torch.float32)]
        assert alive_at == {"captioner": [], "llm": [], "encode": []}
        built.clear()
        (bf16,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, method="ldre", generation_precision="bf16",
                                **local), reg)
    assert [(name, dtype) for name, dtype, _ in built] == [("captioner", torch.bfloat16), ("llm", torch.bfloat16)]
    assert bf16.record["method"]["summary"]["generations"]["cached"] == 0  # fp32 texts are not bf16 texts
    assert fp32.record["method"]["info"]["caption_decoding"]["precision"] == "fp32"
    assert bf16.record["method"]["info"]["llm_params"]["precision"] == "bf16"


def test_ldre_captions_each_query_apart_as_its_official_script(tmp_path, tiny_config, toy_root, blip2, tiny_lm):
    """LDRE's dense_caption_generator.py samples captions in its loop over the queries: two queries of one
    reference image (CIRR has about 1.9 per image) get their own captions. --caption-per image shares them."""
    data = json.loads((toy_root / "queries.json").read_text())
    data["queries"][5]["reference"] = data["queries"][0]["reference"]
    (toy_root / "queries.json").write_text(json.dumps(data))
    local = dict(captioner=f"hf:{blip2}", llm=f"hf:{tiny_lm}", captions=3, max_tokens=4, temperature=0.7)
    with registered(ToyDatasetPlugin(), "toy") as reg:
        (per_query,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, method="ldre", **local), reg)
        (replayed,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, method="ldre", generation="replay", **local), reg)
        (per_image,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, method="ldre", caption_per="image", **local), reg)
    q0, q5 = (data["queries"][i]["id"] for i in (0, 5))
    own = {r["query"]: r["method"]["captions"] for r in _predictions(per_query)}
    shared = {r["query"]: r["method"]["captions"] for r in _predictions(per_image)}
    assert own[q0] != own[q5] and shared[q0] == shared[q5]
    assert per_query.record["method"]["info"]["caption_per"] == "query"
    assert replayed.record["method"]["summary"]["rewritten_texts_sha256"] == per_query.record["method"]["summary"][
        "rewritten_texts_sha256"]
    assert {r["query"]: r["method"]["captions"] for r in _predictions(replayed)} == own
    recorded = [json.loads(line)["request"] for line in
                (tmp_path / "cache" / "generations" / "generations.jsonl").read_text().splitlines()]
    captioned = [r for r in recorded if r["task"] == "caption"]
    n_queries, n_images = len(data["queries"]), len({q["reference"] for q in data["queries"]})
    assert sum("query" in r for r in captioned) == n_queries and n_images == n_queries - 1
    assert sum("query" not in r for r in captioned) == n_images


def test_seize_score_is_the_semantic_editing_increment():
    from cirbench.methods.llm_rewrite.pipeline import SEIZE
    from cirbench.retrieval import rank

    method = SEIZE.__new__(SEIZE)
    method.options = {"pos_factor": 0.13, "neg_factor": 2.1}
    torch.manual_seed(0)
    after, before = (torch.nn.functional.normalize(torch.randn(5, 16), dim=-1) for _ in range(2))
    gallery = torch.nn.functional.normalize(torch.randn(40, 16), dim=-1)
    # SEIZE's code: diff = after - before; similarity = after + neg * diff[diff<0] + pos * diff[diff>0]
    sa, sb = after @ gallery.T, before @ gallery.T
    diff_pos, diff_neg = (sa - sb).clone(), (sa - sb).clone()
    diff_pos[diff_pos < 0] = 0
    diff_neg[diff_neg > 0] = 0
    official = sa + 2.1 * diff_neg + 0.13 * diff_pos
    idx, scores = rank(torch.stack([after, before], 1), gallery, 10, combine=method.combine_scores)
    want = torch.topk(official, 10, dim=1)
    assert torch.equal(idx, want.indices) and torch.allclose(scores, want.values, atol=1e-6)


def test_importers_record_published_generations(tmp_path, tiny_config, toy_root):
    data = json.loads((toy_root / "queries.json").read_text())
    cirevl = {"base_caption": [f"caption {q['reference']}" for q in data["queries"]],
              "instruction": [q["text"] for q in data["queries"]],
              "modified_captions": [q["text"].replace("make it", "a") + " image" for q in data["queries"]]}
    path = tmp_path / "toy_mods.json"
    path.write_text(json.dumps(cirevl))
    nothing = dict(captioner="hf:/nonexistent", llm_url=f"http://127.0.0.1:{free_port()}/v1")
    with registered(ToyDatasetPlugin(), "toy") as reg:
        with pytest.raises(CirbenchError, match="--prompt name:ID"):
            evaluate(_cfg(tmp_path, tiny_config, toy_root, import_generations=path, **nothing), reg)
        (imported,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, import_generations=path, prompt="name:cirevl",
                                    generation="replay", **nothing), reg)
        (replayed,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, prompt="name:cirevl", generation="replay",
                                    **nothing), reg)
    rows = _predictions(imported)
    assert rows[0]["method"]["rewrites"] == [cirevl["modified_captions"][0]]
    assert imported.record["method"]["summary"]["generations"]["imported"] == 12 + 12
    assert [r["top"] for r in _predictions(replayed)] == [r["top"] for r in rows]
    # LDRE/SEIZE records, matched by id, first n of each list
    records = [{"id": int(q["id"]), "relative_caption": q["text"],
                "multi_caption_opt": [f"c{i} {q['reference']}" for i in range(4)],
                "multi_gpt-3.5_opt": [f"r{i} {q['text']}" for i in range(4)]} for q in data["queries"]][::-1]
    ldre_file = tmp_path / "test.json"
    ldre_file.write_text(json.dumps(records))
    with registered(ToyDatasetPlugin(), "toy") as reg:
        (ldre,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, method="ldre", captions=2,
                                import_generations=ldre_file, prompt="name:ldre", generation="replay", **nothing), reg)
    row = _predictions(ldre)[0]
    assert row["method"]["rewrites"] == ["r0 make it green", "r1 make it green"]
    # a file for other queries is refused with the reason
    records[0]["relative_caption"] = "something else"
    ldre_file.write_text(json.dumps(records))
    refused = pytest.raises(CirbenchError, match="no file matches.*is not query")
    with registered(ToyDatasetPlugin(), "toy") as reg, refused:
        evaluate(_cfg(tmp_path, tiny_config, toy_root, method="ldre", captions=2, import_generations=ldre_file,
                      prompt="name:ldre2", **nothing), reg)
    for text in ([1, 2], 7, {"text": "make it green"}):  # no text: one line naming the record
        records[0]["relative_caption"] = text
        ldre_file.write_text(json.dumps(records))
        with registered(ToyDatasetPlugin(), "toy") as reg, pytest.raises(
                CirbenchError, match=r"test.json record 0's modification text is not a text or a list of texts"):
            evaluate(_cfg(tmp_path, tiny_config, toy_root, method="ldre", captions=2, import_generations=ldre_file,
                          prompt="name:ldre2", **nothing), reg)
    # a file with a query short of captions records nothing of itself: an import is whole or not at all
    records[0]["relative_caption"] = data["queries"][-1]["text"]
    records[-1]["multi_caption_opt"] = records[-1]["multi_caption_opt"][:1]
    ldre_file.write_text(json.dumps(records))
    before = (tmp_path / "cache" / "generations" / "generations.jsonl").read_bytes()
    with registered(ToyDatasetPlugin(), "toy") as reg, pytest.raises(CirbenchError, match="has 1 captions"):
        evaluate(_cfg(tmp_path, tiny_config, toy_root, method="ldre", captions=2, import_generations=ldre_file,
                      prompt="name:ldre3", generation="replay", **nothing), reg)
    assert (tmp_path / "cache" / "generations" / "generations.jsonl").read_bytes() == before


def test_uncached_hub_models_fail_at_once_when_the_hub_is_unreachable(monkeypatch, tmp_path):
    import time

    from cirbench import hub
    from cirbench.generation.captioner import build_captioner

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what hub_reachable() answers on a machine without a network
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing cached
    hub.host_reachable.cache_clear()
    start = time.monotonic()
    with pytest.raises(CirbenchError, match="cannot load the captioner 'Salesforce/blip2-opt-2.7b'") as info:
        build_captioner("hf:Salesforce/blip2-opt-2.7b")
    assert "\n" not in str(info.value) and time.monotonic() - start < 20
    with pytest.raises(CirbenchError, match="cannot load the language model"):
        build_llm("hf:Qwen/Qwen2.5-0.5B-Instruct")
    hub.host_reachable.cache_clear()


def _official_ldre_circo(gpt: list[torch.Tensor], blip: list[torch.Tensor], index: torch.Tensor, topk: int,
                         temperature: float, weights_only: bool = False) -> torch.Tensor:
    """LDRE's CIRCO ranking with ``use_adaptive_ensemble``, transcribed from src/divergent_caption_ensemble.py
    (circo_generate_test_dict): per caption slot, normalised rewrite (gpt) and caption (blip) features."""
    neg_diff_val = []
    for i in range(len(gpt)):
        similarity_after = gpt[i] @ index.T
        similarity_before = blip[i] @ index.T
        diff = similarity_after - similarity_before
        diff[diff > 0] = 0
        diff = -diff
        diff = torch.topk(diff, dim=-1, k=topk).values
        neg_diff_val.append(torch.sum(diff).item())
    neg = torch.tensor(neg_diff_val).float()
    weight = torch.softmax(neg / torch.max(neg) / temperature, 0)
    if weights_only:
        return weight
    features = torch.sum(torch.stack(gpt) * weight.unsqueeze(1).unsqueeze(2), dim=0)
    return torch.topk(features @ index.T, dim=-1, k=50).indices


def test_seize_and_ldre_defaults_are_their_official_args():
    """SEIZE's src/args.py (pos_factor 0.13, neg_factor 2.1) and LDRE's (nums_caption 15, adaptive_topk 5,
    adaptive_temperature 0.04, the adaptive ensemble on CIRCO only: its CIRR code averages)."""
    from cirbench.plugins import get_registry

    reg = get_registry()
    seize = {o.name: o for o in reg.method("seize").options}
    ldre = {o.name: o for o in reg.method("ldre").options}
    assert (seize["pos_factor"].default, seize["neg_factor"].default) == (0.13, 2.1)
    assert (ldre["captions"].default, ldre["adaptive_topk"].default, ldre["adaptive_temperature"].default) == \
        (15, 5, 0.04)
    assert ldre["adaptive_ensemble"].default is False and ldre["adaptive_ensemble"].per_dataset == {"circo": True}


def test_ldre_ensemble_is_the_normalised_mean_of_raw_text_features(tiny_config):
    """LDRE's multi-caption ensemble (src/divergent_caption_ensemble.py, multi_caption): each rewrite through
    encode_text, the raw features averaged, then F.normalize; its SEIZE feature the same over the captions."""
    from cirbench.backbones import load_backbone
    from cirbench.methods.llm_rewrite.pipeline import LDRE

    backbone = load_backbone(str(tiny_config), "none", device="cpu", seed=0)
    method = LDRE.__new__(LDRE)
    method.backbone = backbone
    groups = [["a red dog", "a dog that is red", "the dog, now red"], ["two cups of tea"],
              ["a cat asleep", "a sleeping cat"]]
    with torch.no_grad():
        official = [torch.nn.functional.normalize(
            torch.mean(torch.stack([backbone.model.encode_text(backbone.tokenize([c])) for c in group]), dim=0))
            for group in groups]
    torch.testing.assert_close(method._ensemble(groups), torch.cat(official), rtol=1e-5, atol=1e-6)


def test_ldre_adaptive_ensemble_ranks_as_the_official_circo_code():
    from cirbench.methods.llm_rewrite.pipeline import LDRE, adaptive_weights
    from cirbench.retrieval import rank
    from cirbench.types import Query

    torch.manual_seed(0)
    n, n_queries, dim = 6, 40, 24
    norm = torch.nn.functional.normalize
    gallery = norm(torch.randn(700, dim), dim=-1)
    captions = norm(torch.randn(n, n_queries, dim), dim=-1)
    # slots differ in how far their rewrites move from the captions, so the weights are far from equal
    rewrites = norm(captions + torch.linspace(0.2, 3.0, n).view(n, 1, 1) * torch.randn(n, n_queries, dim), dim=-1)
    method = LDRE.__new__(LDRE)
    method.options, method.adaptive, method.weights, method._set = {"adaptive_topk": 5,
                                                                    "adaptive_temperature": 0.04}, True, {}, "val"
    queries = [Query(str(q), "r", ("t",)) for q in range(n_queries)]
    method._slots = {str(q): (rewrites[:, q], captions[:, q]) for q in range(n_queries)}
    finals = method.finalize_queries(queries, torch.zeros(n_queries, dim), gallery)
    idx, _ = rank(finals, gallery, 50)
    official = _official_ldre_circo(list(rewrites), list(captions), gallery, 5, 0.04)
    assert torch.equal(idx, official)
    weights = torch.tensor(method.weights["val"])
    assert abs(float(weights.sum()) - 1) < 1e-5 and float(weights.max()) > 3 * float(weights.min())
    # blocks of queries (any gallery size in bounded memory) give the same weights; no loss at all: equal weights
    small = adaptive_weights(rewrites, captions, gallery, 5, 0.04, block=3 * 700 + 1)
    assert torch.allclose(small, adaptive_weights(rewrites, captions, gallery, 5, 0.04), atol=1e-9)
    assert torch.equal(adaptive_weights(captions, captions, gallery, 5, 0.04), torch.full((n,), 1 / n,
                                                                                           dtype=torch.float64))
    # a gallery of 4 and top 4: every item counts, so only the drops (never the gains) may be summed
    small = gallery[:4]
    want = _official_ldre_circo(list(rewrites), list(captions), small, 4, 0.04, weights_only=True)
    assert torch.allclose(adaptive_weights(rewrites, captions, small, 4, 0.04).float(), want, atol=1e-5)


@needs_annotations
def test_ldre_on_circo_weighs_its_rewrites_by_default(tmp_path, tiny_config):
    """The adaptive ensemble is LDRE's default on CIRCO only; run end to end on the real val annotations with
    published-format generations, it records one weight per caption slot and changes the ranking."""
    root = copy_tree(ANNOTATIONS / "circo", tmp_path / "CIRCO")
    ann = json.loads((root / "annotations" / "val.json").read_text())
    ids = sorted({q["reference_img_id"] for q in ann} | {g for q in ann for g in q["gt_img_ids"]} | set(range(1, 200)))
    for i in ids:
        write_placeholder(root / "COCO2017_unlabeled" / "unlabeled2017" / f"{i:012d}.jpg", i)
    words = ["red", "small", "wooden", "two", "night", "snowy"]
    records = [{"id": q["id"], "relative_caption": q["relative_caption"],
                "multi_caption_opt": [f"a photo of {words[(q['id'] + s) % 6]} thing {s}" for s in range(3)],
                "multi_gpt-3.5_opt": [f"{words[(q['id'] * s) % 6]} {q['shared_concept']} {s}" for s in range(3)]}
               for q in ann]
    gens = tmp_path / "val_ldre.json"
    gens.write_text(json.dumps(records))
    options = {"captions": "3", "import_generations": str(gens), "prompt": "name:ldre", "generation": "replay",
               "captioner": "hf:/nonexistent", "llm_url": f"http://127.0.0.1:{free_port()}/v1"}

    def run(label, **extra):
        cfg = RunConfig(method="ldre", dataset="circo", split="val", backbone=str(tiny_config), pretrained="none",
                        data_root=root, output=tmp_path / "results", cache_dir=tmp_path / "cache", workers=0,
                        progress=False, bootstrap=0, label=label, method_options={**options, **extra})
        (out,) = evaluate(cfg)
        return out

    adaptive, mean = run("adaptive"), run("mean", adaptive_ensemble="false")
    method = adaptive.record["method"]
    assert method["options"]["adaptive_ensemble"] is True and method["info"]["adaptive_ensemble"] == {
        "topk": 5, "temperature": 0.04}
    (weights,) = method["summary"]["adaptive_weights"].values()
    assert len(weights) == 3 and abs(sum(weights) - 1) < 1e-5
    assert "adaptive_weights" not in mean.record["method"]["summary"]
    assert [r["top"] for r in _predictions(adaptive)] != [r["top"] for r in _predictions(mean)]


def test_imported_queries_of_one_image_keep_their_own_captions(tmp_path, tiny_config, toy_root):
    """LDRE/SEIZE files caption every query apart: two queries of one reference image (CIRCO test has two such
    pairs, CIRR many) keep the captions their rewrites were made from, which SEIZE and LDRE's CIRCO ensemble
    compare them with."""
    data = json.loads((toy_root / "queries.json").read_text())
    data["queries"][1]["reference"] = data["queries"][0]["reference"]
    (toy_root / "queries.json").write_text(json.dumps(data))
    records = [{"id": int(q["id"]), "relative_caption": q["text"],
                "multi_caption_opt": [f"c{i} of query {q['id']}" for i in range(2)],
                "multi_gpt-3.5_opt": [f"r{i} of query {q['id']}" for i in range(2)]} for q in data["queries"]]
    path = tmp_path / "test.json"
    path.write_text(json.dumps(records))
    nothing = dict(captioner="hf:/nonexistent", llm_url=f"http://127.0.0.1:{free_port()}/v1")
    for per in ("query", "image"):  # published per-query captions are kept whatever live captioning would do
        with registered(ToyDatasetPlugin(), "toy") as reg:
            (seize,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, method="seize", captions=2,
                                     import_generations=path, prompt="name:seize", generation="replay",
                                     caption_per=per, **nothing), reg)
        rows = {r["query"]: r["method"] for r in _predictions(seize)}
        for qid in ("0", "1"):
            assert rows[qid]["captions"] == [f"c0 of query {qid}", f"c1 of query {qid}"]
            assert rows[qid]["rewrites"] == [f"r0 of query {qid}", f"r1 of query {qid}"]


def test_a_chat_model_captions_for_cirevl_as_osrcirs_cirevl_star(tmp_path, tiny_config, toy_root, endpoint):
    """--captioner openai:MODEL: a multimodal chat model captions each reference (the prompt as the user text,
    the image after it, temperature 0, one request per caption), then the rewrites go as usual."""
    import base64

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from cirbench.generation.images import caption_request
    from cirbench.methods.llm_rewrite import CIREVL_CAPTION_PROMPT

    options = dict(captioner="openai:gpt-4o-2024-08-06", captioner_url=endpoint.url, llm="openai:gpt-test",
                   llm_url=endpoint.url)
    data = json.loads((toy_root / "queries.json").read_text())
    for name in {q["reference"] for q in data["queries"]}:  # files that a decode and re-encode would not give
        meta = PngInfo()
        meta.add_text("Source", "a camera")
        path = toy_root / "images" / name
        Image.open(path).save(path, pnginfo=meta)
    with registered(ToyDatasetPlugin(), "toy") as reg:
        (out,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, **options), reg)
    captioning = [r for r in endpoint.requests if isinstance(r["messages"][-1]["content"], list)]
    assert len(captioning) == len({q["reference"] for q in data["queries"]})  # one per reference image
    sent = captioning[0]
    assert (sent["model"], sent["temperature"], sent["max_tokens"], sent["seed"]) == (
        "gpt-4o-2024-08-06", 0.0, 300, 0) and "stop" not in sent
    text, image = sent["messages"][0]["content"]
    assert text == {"type": "text", "text": CIREVL_CAPTION_PROMPT}
    # the reference file's own bytes, as the official chat-model pipelines send them (not decoded and re-encoded)
    mime, payload = image["image_url"]["url"].split(",", 1)
    references = {(toy_root / "images" / q["reference"]).read_bytes() for q in data["queries"]}
    assert mime == "data:image/png;base64" and base64.b64decode(payload) in references
    for row in _predictions(out):
        reference = next(q["reference"] for q in data["queries"] if q["id"] == row["query"])
        assert row["method"]["captions"] == [f"a {reference.split('_')[1]} picture"]
    # the chat captioner's request says how it was asked, and the precision of weights it does not hold is not
    # recorded; a transformers captioner's request is what it always was (recorded captions still match)
    assert caption_request("openai:m", "", 2, 7, "bf16")["params"] == {"n": 2, "temperature": 1.0,
                                                                       "max_tokens": 300, "seed": 7}
    assert caption_request("openai:m", "", 1, 0, "fp32")["prompt"] != caption_request("openai:m", "x", 1, 0,
                                                                                       "fp32")["prompt"]
    sha_p = "148de9c5a7a44d19e56cd9ae1a554bf67847afb0c58f6e12fa29ac7ddfca9940"  # sha256 of "p"
    assert caption_request("hf:m", "p", 1, 0, "fp32") == {
        "task": "caption", "model": "hf:m", "prompt": sha_p,
        "params": {"n": 1, "num_beams": 5, "max_new_tokens": 30, "sampling": None, "precision": "fp32"}}
