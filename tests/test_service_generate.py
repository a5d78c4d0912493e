"""POST /v1/captions in modes generate and hybrid: a caption generator served beside retrieval.

The generator is a tiny UpDown taught the service captions in their voices (tests/helpers.py), so a trait
must come back in its own voice; every answer is checked against the core's beam search and the retrieval
model's own scores, and bad requests get their 4xx.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from tests.helpers import free_port, image_bytes, stop_server_process
from transresnet.checkpoint import Checkpoint
from transresnet.generation.checkpoint import GeneratorCheckpoint, load_generator
from transresnet.images import ImagePreprocessor

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def generator_path(tiny_generator_path: Path) -> Path:
    return tiny_generator_path


@pytest.fixture(scope="module")
def generator(generator_path: Path) -> GeneratorCheckpoint:
    return load_generator(generator_path)


@pytest.fixture(scope="module")
def client(service_settings, generator_path: Path) -> Iterator:
    from fastapi.testclient import TestClient
    from transresnet.service.main import create_app

    settings = service_settings.model_copy(update={"generator": generator_path, "max_beam_size": 4})
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def post(client, data: bytes, traits: list[str], **fields: object):
    return client.post("/v1/captions", files={"image": ("photo.jpg", data, "image/jpeg")},
                       data={"personality": traits, **{k: str(v) for k, v in fields.items()}})


def reference_beams(generator: GeneratorCheckpoint, data: bytes, trait: str, beam_size: int, n_best: int):
    """The core's beam search on the same photo: (caption, score) best first."""
    from transresnet.generation.decoding import beam_search

    model = generator.model
    pixels = ImagePreprocessor(generator.config.model.image).load(data).unsqueeze(0)
    options = generator.config.model.decoder.decoding.model_copy(update={"method": "beam", "beam_size": beam_size})
    (hyps,) = beam_search(model.decoder, model.grid(pixels), torch.tensor(model.trait_slots([trait])), options,
                          n_best=n_best)
    return [(model.vocab.decode(h.tokens), h.score) for h in hyps]


def retrieval_scores(checkpoint: Checkpoint, data: bytes, trait: str, captions: list[str]) -> np.ndarray:
    """The retrieval model's dot products of the photo's query with the captions, float32."""
    from transresnet.encode import encode_captions, encode_queries

    pixels = ImagePreprocessor(checkpoint.config.model.image).load(data).unsqueeze(0)
    query = encode_queries(checkpoint.model, [checkpoint.traits.lookup(trait)], images=pixels)[0]
    return encode_captions(checkpoint.model, captions, precision="float32", progress=False) @ query


def test_generate_answers_the_generators_beams_in_each_voice(client, generator) -> None:
    data = image_bytes(seed=3)
    response = post(client, data, ["Sweet", "sarcastic"], k=3, mode="generate")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["mode"] == "generate" and body["generator"]["family"] == "updown"
    sweet, sarcastic = body["results"]
    assert [c["caption"] for c in sweet["captions"]][0].startswith("aww look at")
    assert [c["caption"] for c in sarcastic["captions"]][0].startswith("oh great")
    for result, trait in ((sweet, "Sweet"), (sarcastic, "Sarcastic")):
        expected = reference_beams(generator, data, trait, beam_size=3, n_best=3)
        got = [(c["caption"], c["score"]) for c in result["captions"]]
        assert [c for c, _ in got] == [c for c, _ in expected]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], rtol=1e-5, atol=1e-5)
        assert all(c["source"] == "generated" and c["id"] == f"generated-{i}"
                   for i, c in enumerate(result["captions"], start=1))
    timings = body["timings"]
    assert timings["generate_ms"] > 0 and timings["decode_steps"] >= 3 and "encode_ms" not in timings


def test_generate_takes_the_beam_size_and_length_asked(client, generator) -> None:
    data = image_bytes(seed=4)
    body = post(client, data, ["Angry"], k=5, mode="generate", beam_size=4, max_length=3).json()
    captions = body["results"][0]["captions"]
    assert len(captions) == 4  # k=5, but a beam of 4 finishes at most 4
    assert all(len(c["caption"].split()) <= 3 for c in captions)
    as_json = client.post("/v1/captions", json={"image_base64": base64.b64encode(data).decode(),
                                                "personality": ["Angry"], "k": 5, "mode": "generate",
                                                "beam_size": 4, "max_length": 3})
    assert as_json.status_code == 200 and as_json.json()["results"] == body["results"]


def test_hybrid_reranks_retrieved_and_generated_by_the_retrieval_score(client, generator, tiny_checkpoint) -> None:
    data = image_bytes(seed=5)
    k = 6
    retrieved = post(client, data, ["Cheerful"], k=k).json()["results"][0]["captions"]
    generated = post(client, data, ["Cheerful"], k=3, mode="generate").json()["results"][0]["captions"]
    body = post(client, data, ["Cheerful"], k=k, mode="hybrid").json()
    assert body["mode"] == "hybrid"
    hybrid = body["results"][0]["captions"]
    pool = {c["caption"]: "retrieved" for c in retrieved}
    for c in generated:
        pool[c["caption"]] = "both" if c["caption"] in pool else "generated"
    texts = list(pool)
    scores = retrieval_scores(tiny_checkpoint, data, "Cheerful", texts)
    expected = sorted(zip(texts, scores.tolist(), strict=True), key=lambda pair: pair[1], reverse=True)[:k]
    assert [c["caption"] for c in hybrid] == [t for t, _ in expected]
    np.testing.assert_allclose([c["score"] for c in hybrid], [s for _, s in expected], rtol=1e-4, atol=1e-4)
    assert [c["source"] for c in hybrid] == [pool[t] for t, _ in expected]
    for c in hybrid:
        assert ("generation_score" in c) == (c["source"] != "retrieved")
    assert body["timings"]["rescore_ms"] > 0 and body["timings"]["search_ms"] > 0


def test_hybrid_with_k_over_the_index_size_returns_every_candidate(client) -> None:
    """k may exceed a small index (40 captions here): hybrid then ranks the whole index and the beams."""
    body = post(client, image_bytes(seed=13), ["Sweet"], k=100, mode="hybrid").json()
    captions = body["results"][0]["captions"]
    assert 40 <= len(captions) <= 43 and len({c["caption"] for c in captions}) == len(captions)
    assert {c["source"] for c in captions} >= {"retrieved"} and any(c["source"] != "retrieved" for c in captions)
    scores = [c["score"] for c in captions]
    assert scores == sorted(scores, reverse=True)


def consensus_reference(client, data: bytes, trait: str, k: int, *, hybrid: bool):
    """What consensus re-ranking must answer, from the service's own retrieve and generate answers: the
    candidates scored by CIDEr-D against the top consensus_k retrieved captions, on the index's document
    frequencies (transresnet.generation.consensus, as the evaluator uses it)."""
    from transresnet.generation.consensus import ConsensusRanker

    resources = client.app.state.resources
    neighbours_k = resources.settings.consensus_k
    beam = resources.generator.default_decoding.beam_size
    retrieved = post(client, data, [trait], k=max(k, neighbours_k)).json()["results"][0]["captions"]
    beams = post(client, data, [trait], k=beam, mode="generate").json()["results"][0]["captions"]
    neighbours = [c["caption"] for c in retrieved[:neighbours_k]]
    pool: dict[str, str] = {c["caption"]: "retrieved" for c in retrieved} if hybrid else {}
    for c in beams:
        pool[c["caption"]] = "both" if c["caption"] in pool else "generated"
    texts = list(pool)
    ranker = ConsensusRanker(resources.bundle.index.caption_texts())
    scores = ranker.scores(texts, neighbours)
    ranked = sorted(zip(texts, scores, strict=True), key=lambda pair: pair[1], reverse=True)[:k]
    return [(text, score, pool[text]) for text, score in ranked]


@pytest.mark.parametrize("mode", ["hybrid", "generate"])
def test_consensus_ranks_candidates_by_agreement_with_the_photos_nearest_captions(client, mode: str) -> None:
    data = image_bytes(seed=14)
    k = 4
    body = post(client, data, ["Sweet"], k=k, mode=mode, consensus="true").json()
    assert body["mode"] == mode and body["consensus_k"] == client.app.state.resources.settings.consensus_k
    got = body["results"][0]["captions"]
    expected = consensus_reference(client, data, "Sweet", k, hybrid=mode == "hybrid")
    assert [(c["caption"], c["source"]) for c in got] == [(t, source) for t, _, source in expected]
    np.testing.assert_allclose([c["score"] for c in got], [s for _, s, _ in expected], rtol=1e-5, atol=1e-4)
    assert got[0]["score"] > 0  # the voiced captions share words with their neighbours
    timings = body["timings"]
    assert timings["consensus_ms"] > 0 and timings["search_ms"] > 0 and "rescore_ms" not in timings
    if mode == "generate":
        assert {c["source"] for c in got} == {"generated"}
    without = post(client, data, ["Sweet"], k=k, mode=mode).json()
    assert "consensus_k" not in without and "consensus_ms" not in without["timings"]


def test_consensus_is_refused_in_retrieve_mode_and_said_why(client) -> None:
    assert "consensus" in vars(client.app.state.resources.bundle)  # built at load, before any request asked
    response = post(client, image_bytes(seed=15), ["Sweet"], k=2, consensus="true")
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["problems"][0]["field"] == "consensus" and "'generate' or 'hybrid'" in body["message"]
    as_json = client.post("/v1/captions", json={"image_base64": base64.b64encode(image_bytes(seed=15)).decode(),
                                                "personality": ["Sweet"], "k": 2, "mode": "hybrid",
                                                "consensus": True})
    assert as_json.status_code == 200 and as_json.json()["consensus_k"] >= 1


def test_batched_generation_equals_one_by_one(generator_path: Path) -> None:
    from transresnet.service.generating import GenerateJob, generate_jobs, load_generator_bundle

    served = load_generator_bundle(generator_path, device="cpu")
    options = served.decoding(3, 10)
    pixels = [served.preprocessor.load(image_bytes(seed=s)) for s in range(3)]
    jobs = [GenerateJob(served, pixels[0], (1, 2), options, 3), GenerateJob(served, pixels[1], (3,), options, 3),
            GenerateJob(served, pixels[2], (4, 1, 2), options, 2)]
    together = generate_jobs(jobs)
    for job, batched in zip(jobs, together, strict=True):
        (alone,) = generate_jobs([job])
        assert [[b.caption for b in beams] for beams in batched.beams] == \
               [[b.caption for b in beams] for beams in alone.beams]
        np.testing.assert_allclose([b.score for beams in batched.beams for b in beams],
                                   [b.score for beams in alone.beams for b in beams], rtol=1e-5, atol=1e-5)


def test_readiness_and_metrics_show_the_generator(client) -> None:
    ready = client.get("/readyz").json()
    assert ready["generator"]["family"] == "updown" and ready["generator"]["personalities"] == 4
    assert "tiny-generator" in ready["generator"]["description"]
    post(client, image_bytes(seed=6), ["Sweet"], k=2, mode="generate")
    metrics = client.get("/metrics").text
    count = next(line for line in metrics.splitlines() if line.startswith("transresnet_generate_decode_steps_count"))
    assert float(count.split()[-1]) >= 1
    assert 'transresnet_stage_seconds_count{stage="generate"}' in metrics
    assert 'transresnet_generator_info{family="updown"' in metrics


@pytest.mark.parametrize(("fields", "error", "field"), [
    ({"mode": "generate", "beam_size": 5}, "invalid_request", "beam_size"),  # over this server's max_beam_size 4
    ({"mode": "generate", "beam_size": 0}, "invalid_request", "beam_size"),
    ({"mode": "hybrid", "max_length": 31}, "invalid_request", "max_length"),  # over max_generate_length 30
    ({"mode": "write"}, "invalid_request", "mode"),
])
def test_bad_generation_requests_are_refused(client, fields: dict, error: str, field: str) -> None:
    response = post(client, image_bytes(seed=7), ["Sweet"], k=2, **fields)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == error and body["problems"][0]["field"] == field


def test_unknown_trait_in_generate_mode_is_refused(client) -> None:
    response = post(client, image_bytes(seed=8), ["Sweeet"], mode="generate")
    assert response.status_code == 422 and response.json()["error"] == "unknown_personality"
    assert "Sweet" in response.json()["suggestions"]


def test_a_server_without_a_generator_refuses_the_generative_modes(service_client) -> None:
    assert service_client.get("/readyz").json()["generator"] is None
    for mode in ("generate", "hybrid"):
        response = post(service_client, image_bytes(seed=9), ["Sweet"], mode=mode)
        assert response.status_code == 422
        body = response.json()
        assert body["error"] == "generator_unavailable" and "--generator" in body["message"]
    assert post(service_client, image_bytes(seed=9), ["Sweet"], mode="retrieve").status_code == 200


def test_consensus_off_keeps_no_document_frequencies_and_says_so(service_settings, generator_path: Path) -> None:
    from fastapi.testclient import TestClient
    from transresnet.service.main import create_app

    settings = service_settings.model_copy(update={"generator": generator_path, "consensus_k": 0})
    with TestClient(create_app(settings), raise_server_exceptions=False) as off:
        response = post(off, image_bytes(seed=16), ["Sweet"], k=2, mode="hybrid", consensus="true")
        assert response.status_code == 422 and "TRANSRESNET_CONSENSUS_K=0" in response.json()["message"]
        assert post(off, image_bytes(seed=16), ["Sweet"], k=2, mode="hybrid").status_code == 200
        assert "consensus" not in vars(off.app.state.resources.bundle)  # the cached ranker was never built


def test_a_generator_without_personality_input_writes_one_caption_for_every_trait(
        service_settings, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient
    from transresnet.service.main import create_app

    from tests.helpers import generator_tree
    from transresnet.config import build_config
    from transresnet.generation.checkpoint import CaptionModel, save_generator
    from transresnet.generation.vocab import Vocabulary
    from transresnet.traits import TraitVocab

    torch.manual_seed(0)
    config = build_config(generator_tree(personality={"enabled": False}))
    model = CaptionModel(config, Vocabulary.build(["a dog runs", "a cat sits"]), TraitVocab([]),
                         load_backbone_weights=False)
    path = save_generator(model, tmp_path / "plain")
    settings = service_settings.model_copy(update={"generator": path})
    with TestClient(create_app(settings), raise_server_exceptions=False) as plain:
        assert plain.get("/readyz").json()["generator"]["personalities"] == 0
        body = post(plain, image_bytes(seed=10), ["Sweet", "Angry"], k=2, mode="generate").json()
        sweet, angry = body["results"]
        assert sweet["captions"] == angry["captions"] and sweet["personality"] == "Sweet"
        assert post(plain, image_bytes(seed=10), ["Sweeet"], mode="generate").status_code == 422


def test_serve_refuses_a_retrieval_checkpoint_as_generator(tiny_checkpoint) -> None:
    from transresnet.cli.serve import check_generator

    with pytest.raises(ValueError, match="not a caption-generator checkpoint"):
        check_generator(tiny_checkpoint.path)
    with pytest.raises(FileNotFoundError, match="transresnet train"):
        check_generator(tiny_checkpoint.path.parent / "missing")


def test_real_server_serves_all_three_modes(tiny_checkpoint, service_index_root, generator_path: Path,
                                            generator, tmp_path: Path) -> None:
    from transresnet.service.readiness import wait_until_ready

    port = free_port()
    env = {**os.environ, "TRANSRESNET_MAX_WAIT_MS": "2",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "transresnet", "serve", "--checkpoint", str(tiny_checkpoint.path),
               "--index", str(service_index_root), "--generator", str(generator_path), "--port", str(port),
               "--threads", "1", "--device", "cpu"]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base, process)
        data = image_bytes(seed=12)
        with httpx.Client(base_url=base, timeout=60) as http:
            answers = {mode: http.post("/v1/captions", files={"image": ("a.jpg", data, "image/jpeg")},
                                       data={"personality": ["Sweet"], "k": "3", "mode": mode})
                       for mode in ("retrieve", "generate", "hybrid")}
        assert all(r.status_code == 200 for r in answers.values()), {m: r.text for m, r in answers.items()}
        expected = reference_beams(generator, data, "Sweet", beam_size=3, n_best=3)
        assert [c["caption"] for c in answers["generate"].json()["results"][0]["captions"]] == \
               [c for c, _ in expected]
        assert {c["source"] for c in answers["retrieve"].json()["results"][0]["captions"]} == {"retrieved"}
        assert len(answers["hybrid"].json()["results"][0]["captions"]) == 3
    finally:
        stop_server_process(process)


def test_side_by_side_stages_cancel_each_other_on_failure() -> None:
    """Hybrid runs retrieval and beam search side by side: when one fails, the other is cancelled (no
    orphaned work holding a batch slot) and the caller sees the original error, not an exception group."""
    import asyncio

    from transresnet.service.errors import StageTimeout
    from transresnet.service.ranking import both

    async def scenario() -> tuple[bool, str]:
        cancelled = asyncio.Event()

        async def slow() -> int:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return 1

        async def failing() -> int:
            await asyncio.sleep(0.01)
            raise StageTimeout("the generate stage took too long")

        try:
            await both(slow(), failing())
        except StageTimeout as err:
            await asyncio.wait_for(cancelled.wait(), 1)
            return cancelled.is_set(), str(err)
        return False, ""

    was_cancelled, message = asyncio.run(scenario())
    assert was_cancelled and message == "the generate stage took too long"

    async def fine() -> tuple[int, str]:
        async def value(v, delay):
            await asyncio.sleep(delay)
            return v
        return await both(value(1, 0.02), value("b", 0.0))

    assert asyncio.run(fine()) == (1, "b")
