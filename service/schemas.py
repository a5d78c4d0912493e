"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from .settings import MAX_K


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


Personalities = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=200)]],
    BeforeValidator(_as_list),
    Field(min_length=1, description="Trait names (case-insensitive, synonyms accepted); 'none' = no personality. "
                                    "A single string is accepted too."),
]
EXAMPLE_IMAGE_BASE64 = ("iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFUlEQVR42mM8UaHBgA0wMeAAg1MCAB4nAXgl"
                        "lso1AAAAAElFTkSuQmCC")
"""An 8x8 orange PNG (78 bytes): the OpenAPI example is a request the server really answers."""
K = Annotated[int, Field(ge=1, le=MAX_K, description="Captions to return per personality")]
Mode = Literal["retrieve", "generate", "hybrid"]
MODE_DESCRIPTION = ("retrieve: rank the index's captions (the default); generate: write new captions by beam "
                    "search with the served caption generator; hybrid: both, re-ranked together by the retrieval "
                    "model's score, each marked with its source. generate and hybrid need a server started with "
                    "a generator (GET /readyz: generator)")
BeamSize = Annotated[int, Field(ge=1, le=64, description="Beam width for generate and hybrid (at most the "
                                                          "server's max_beam_size; default: the generator's)")]
CONSENSUS_DESCRIPTION = ("generate and hybrid: rank the candidates by their agreement (CIDEr-D x 100) with the "
                         "photo's nearest index captions under the retrieval model (the server's consensus_k of "
                         "them), instead of by beam score (generate) or retrieval score (hybrid). It picks "
                         "captions closer to what people wrote about similar photos (docs/results.md, Flickr8k val: "
                         "hybrid CIDEr-D 50 with it, 29 without; beam search alone 39-42)")
MaxLength = Annotated[int, Field(ge=1, le=100, description="Most words of a generated caption (at most the "
                                                            "server's max_generate_length; default: the "
                                                            "generator's)")]


class CaptionsQuery(BaseModel):
    """The non-image fields of a caption request (the form fields, validated)."""

    model_config = ConfigDict(extra="forbid")

    personality: Personalities | None = Field(
        None, description="Required when the model has personalities; a model without any ranks for the photo "
                          "alone ('none')")
    k: K = 5
    mode: Mode = Field("retrieve", description=MODE_DESCRIPTION)
    beam_size: BeamSize | None = None
    max_length: MaxLength | None = None
    consensus: bool = Field(False, description=CONSENSUS_DESCRIPTION)


class CaptionsJSONRequest(CaptionsQuery):
    """The JSON form of a caption request: the image as base64 (a data: URL works too)."""

    image_base64: str = Field(min_length=1, description="The image file's bytes, base64-encoded")

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"image_base64": EXAMPLE_IMAGE_BASE64, "personality": ["Sarcastic", "Sweet"], "k": 5}]})


class CaptionHit(BaseModel):
    id: str = Field(description="The caption's id in the index's caption source; generated-N for the N-th "
                                "generated beam")
    caption: str
    score: float = Field(description="Higher ranks first. retrieve and hybrid: the retrieval model's dot-product "
                                     "score; generate: the beam's log-probability under the length penalty",
                         allow_inf_nan=False)
    source: Literal["retrieved", "generated", "both"] = Field(
        "retrieved", description="Where the caption came from: the index, the generator, or both (hybrid)")
    generation_score: float | None = Field(None, description="The beam score of a generated caption",
                                           allow_inf_nan=False)
    metadata: dict[str, Any] = Field(default_factory=dict)


class PersonalityRanking(BaseModel):
    requested: str = Field(description="The personality as sent")
    personality: str = Field(description="The canonical trait name ('none' for no personality)")
    captions: list[CaptionHit]


class ModelInfo(BaseModel):
    name: str
    version: str = Field(description="Short hash of the checkpoint weights")
    fingerprint: str = Field(description="Text-side fingerprint the index was built with")
    description: str = Field("", description="What the model is, in words: its image encoder, what it was "
                                             "trained on and how many personalities it knows")
    personalities: int = Field(0, description="Personalities the model knows (0: it ranks for the photo alone)")


class GeneratorInfo(BaseModel):
    name: str
    family: str = Field(description="showtell, showatttell or updown")
    cell: str = Field(description="The recurrent cell: rnn, gru or lstm")
    version: str = Field(description="Short hash of the generator's weights")
    description: str = Field("", description="What the generator is, in words")
    personalities: int = Field(0, description="Personalities it is conditioned on (0: none)")
    beam_size: int = Field(description="Default beam width")
    max_length: int = Field(description="Default most words per caption")


class IndexPlacement(BaseModel):
    kind: Literal["cpu", "gpu", "sharded", "replicated"] = Field(
        description="Where the index is searched: CPU, one GPU, split over several, or a copy on each")
    gpus: int = Field(description="GPUs holding the index (0 on CPU)")
    reason: str = Field(description="Why there (GPU count, index type, memory, settings)")


class IndexInfo(BaseModel):
    version: str
    size: int = Field(description="Captions in the index")
    type: str | None = None
    placement: IndexPlacement | None = Field(None, description="Where the index is searched, and why")


class Timings(BaseModel):
    """Per-stage times; a stage the request's mode skips is null."""

    decode_ms: float
    encode_queue_ms: float | None = None
    encode_ms: float | None = None
    search_queue_ms: float | None = None
    search_ms: float | None = None
    generate_queue_ms: float | None = None
    generate_ms: float | None = None
    rescore_queue_ms: float | None = None
    rescore_ms: float | None = None
    consensus_ms: float | None = None
    total_ms: float
    encode_batch_size: int | None = Field(None, description="Requests encoded together with this one")
    search_batch_size: int | None = None
    generate_batch_size: int | None = None
    decode_steps: int | None = Field(None, description="Beam-search steps of the decode holding this request")


class CaptionsResponse(BaseModel):
    results: list[PersonalityRanking] = Field(description="One ranked list per requested personality, in order")
    k: int
    mode: Mode = "retrieve"
    model: ModelInfo
    index: IndexInfo
    generator: GeneratorInfo | None = Field(None, description="The caption generator (generate and hybrid)")
    consensus_k: int | None = Field(None, description="With consensus re-ranking: the nearest index captions "
                                                      "each candidate was compared with")
    timings: Timings


class Personality(BaseModel):
    name: str
    synonyms: list[str] = Field(default_factory=list)


class PersonalitiesResponse(BaseModel):
    count: int
    personalities: list[Personality]
    none_aliases: list[str] = Field(description="Names that ask for no personality")
    message: str | None = Field(None, description="Said when the model has no personalities at all")


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class IndexFallback(BaseModel):
    wanted: str | None = Field(description="The version CURRENT names (null: no CURRENT file)")
    serving: str = Field(description="The newest version that verifies, served instead")
    reason: str = Field(description="Why the wanted version failed verification")


class ReadyResponse(BaseModel):
    ready: bool
    model: ModelInfo | None = None
    index: IndexInfo | None = None
    generator: GeneratorInfo | None = Field(None, description="The caption generator served beside retrieval "
                                                               "(null: modes generate and hybrid are off)")
    index_fallback: IndexFallback | None = Field(
        None, description="Set when CURRENT named a version that failed verification at start-up and an older "
                          "verified one is served; fix with `transresnet index rollback ROOT` and reload")


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: str | None = Field(None, description="A new checkpoint directory on the server; omit to keep "
                                                     "the current one")


class ReloadResponse(BaseModel):
    model: ModelInfo
    index: IndexInfo
    previous_model: ModelInfo
    previous_index: IndexInfo
    seconds: float


class FieldProblem(BaseModel):
    field: str
    message: str


class ErrorResponse(BaseModel):
    error: str = Field(description="Machine-readable error code")
    message: str = Field(description="What went wrong and how to fix the request")
    suggestions: list[str] | None = Field(None, description="Closest traits, for an unknown personality")
    problems: list[FieldProblem] | None = None
