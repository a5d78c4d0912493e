"""GET /v1/personalities: the trait vocabulary of the served checkpoint."""

from __future__ import annotations

from fastapi import APIRouter

from ..deps import ResourcesDep
from ..schemas import PersonalitiesResponse, Personality
from .captions import NO_TRAITS_MESSAGE

router = APIRouter(prefix="/v1", tags=["captions"])


@router.get("/personalities", response_model=PersonalitiesResponse, summary="The personalities this model knows")
async def list_personalities(resources: ResourcesDep) -> PersonalitiesResponse:
    from transresnet.traits import NONE_ALIASES

    traits = resources.bundle.traits
    items = [Personality(name=name, synonyms=list(traits.synonyms.get(name, []))) for name in traits.names]
    return PersonalitiesResponse(count=len(items), personalities=items, none_aliases=list(NONE_ALIASES),
                                 message=None if items else NO_TRAITS_MESSAGE)
