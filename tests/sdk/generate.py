"""Conformance fixtures from the providers' official SDKs.

Builds usage objects through each SDK's own types (pinned in requirements.txt), dumps them as
the JSON the provider's API returns, and walks every numeric field of each SDK usage type.
The Rust tests in src/ingest/codec/sdk_conformance.rs read what this writes:

  fixtures/<name>.json  {"sdk": ..., "type": ..., "shape": <UsageEvent oneof>, "usage": {...}}
  fields.json           {"<sdk type>": ["prompt_tokens", "prompt_tokens_details.cached_tokens", ...]}

    python tests/sdk/generate.py          # rewrite the files
    python tests/sdk/generate.py --check  # fail if the files differ from what the SDKs give

deploy/local/test.sh runs --check, so a new SDK pin that changes a fixture or adds a token
field fails the suite until the Rust expectations (and the normalizer) follow it.
"""

from __future__ import annotations

import json
import sys
import types
import typing
from importlib.metadata import version
from pathlib import Path

import pydantic

HERE = Path(__file__).resolve().parent
SDKS = ("openai", "anthropic", "google-genai", "dashscope")


# ---------------------------------------------------------------------------------------------
# Fixtures: one usage object per case, built with the SDK's classes.
# ---------------------------------------------------------------------------------------------


def openai_fixtures() -> dict:
    from openai.types import CompletionUsage
    from openai.types.completion_usage import CompletionTokensDetails, PromptTokensDetails
    from openai.types.responses import ResponseUsage
    from openai.types.responses.response_usage import (
        InputTokensDetails,
        InputTokensDetailsCacheWriteTokensDetails,
        OutputTokensDetails,
    )

    def dump(model) -> dict:
        # What the API sent: the SDK leaves out fields the response did not carry.
        return model.model_dump(mode="json", exclude_none=True)

    chat = CompletionUsage(
        prompt_tokens=5000,
        completion_tokens=900,
        total_tokens=5900,
        prompt_tokens_details=PromptTokensDetails(
            cached_tokens=3000,
            cache_write_tokens=1500,
            audio_tokens=100,
            image_tokens=200,
            text_tokens=4700,
        ),
        completion_tokens_details=CompletionTokensDetails(
            reasoning_tokens=600,
            audio_tokens=50,
            text_tokens=250,
            accepted_prediction_tokens=10,
            rejected_prediction_tokens=5,
        ),
    )
    responses = ResponseUsage(
        input_tokens=5000,
        output_tokens=900,
        total_tokens=5900,
        input_tokens_details=InputTokensDetails(
            cached_tokens=3000,
            cache_write_tokens=1500,
            cache_write_tokens_details=InputTokensDetailsCacheWriteTokensDetails(
                ttl_30m_tokens=1000, ttl_12h_tokens=500
            ),
        ),
        output_tokens_details=OutputTokensDetails(reasoning_tokens=600),
    )
    responses_without_ttl = ResponseUsage.model_validate(
        {
            "input_tokens": 2006,
            "output_tokens": 300,
            "total_tokens": 2306,
            "input_tokens_details": {"cached_tokens": 1024, "cache_write_tokens": 900},
            "output_tokens_details": {"reasoning_tokens": 192},
        }
    )
    # Qwen's OpenAI-compatible mode, parsed by the openai SDK as an application using it does:
    # its cache-write fields arrive as extras of PromptTokensDetails.
    qwen_compatible = CompletionUsage.model_validate(
        {
            "prompt_tokens": 29719,
            "completion_tokens": 435,
            "total_tokens": 30154,
            "completion_tokens_details": {"reasoning_tokens": 382, "text_tokens": 435},
            "prompt_tokens_details": {
                "text_tokens": 29719,
                "cached_tokens": 0,
                "cache_creation_input_tokens": 29713,
                "cache_creation": {"ephemeral_5m_input_tokens": 29713},
                "cache_type": "ephemeral",
            },
        }
    )
    return {
        "openai_chat": ("CompletionUsage", "openai_chat", dump(chat)),
        "openai_responses": ("ResponseUsage", "openai_responses", dump(responses)),
        "openai_responses_without_ttl": (
            "ResponseUsage",
            "openai_responses",
            dump(responses_without_ttl),
        ),
        "qwen_openai_compatible": ("CompletionUsage", "openai_chat", dump(qwen_compatible)),
    }


def anthropic_fixtures() -> dict:
    from anthropic.types import CacheCreation, ServerToolUsage, Usage
    from anthropic.types.output_tokens_details import OutputTokensDetails

    def dump(model) -> dict:
        return model.model_dump(mode="json", exclude_none=True)

    usage = Usage(
        input_tokens=1200,
        output_tokens=800,
        cache_read_input_tokens=3000,
        cache_creation_input_tokens=1500,
        cache_creation=CacheCreation(ephemeral_5m_input_tokens=1000, ephemeral_1h_input_tokens=500),
        output_tokens_details=OutputTokensDetails(thinking_tokens=600),
        server_tool_use=ServerToolUsage(web_search_requests=2, web_fetch_requests=1),
        service_tier="standard",
        inference_geo="us",
        speed="standard",
    )
    without_split = Usage.model_validate(
        {
            "input_tokens": 12,
            "output_tokens": 503,
            "cache_creation_input_tokens": 2560,
            "cache_read_input_tokens": 1536,
        }
    )
    return {
        "anthropic": ("Usage", "anthropic", dump(usage)),
        "anthropic_without_ttl": ("Usage", "anthropic", dump(without_split)),
    }


def gemini_fixtures() -> dict:
    from google.genai import types as gt

    modality = gt.MediaModality
    usage = gt.GenerateContentResponseUsageMetadata(
        prompt_token_count=5000,
        cached_content_token_count=3000,
        candidates_token_count=300,
        thoughts_token_count=600,
        tool_use_prompt_token_count=400,
        total_token_count=6300,
        prompt_tokens_details=[
            gt.ModalityTokenCount(modality=modality.TEXT, token_count=4000),
            gt.ModalityTokenCount(modality=modality.IMAGE, token_count=700),
            gt.ModalityTokenCount(modality=modality.AUDIO, token_count=300),
        ],
        cache_tokens_details=[
            gt.ModalityTokenCount(modality=modality.TEXT, token_count=2800),
            gt.ModalityTokenCount(modality=modality.IMAGE, token_count=200),
        ],
        candidates_tokens_details=[
            gt.ModalityTokenCount(modality=modality.TEXT, token_count=250),
            gt.ModalityTokenCount(modality=modality.AUDIO, token_count=50),
        ],
        tool_use_prompt_tokens_details=[
            gt.ModalityTokenCount(modality=modality.TEXT, token_count=400)
        ],
        traffic_type=gt.TrafficType.ON_DEMAND,
    )
    # The REST wire format: camelCase, as the API returns `usageMetadata`.
    wire = usage.model_dump(mode="json", exclude_none=True, by_alias=True)
    return {"gemini": ("GenerateContentResponseUsageMetadata", "gemini", wire)}


def dashscope_fixtures() -> dict:
    from dashscope.api_entities.dashscope_response import (
        GenerationUsage,
        MultiModalConversationUsage,
    )

    # The SDK's usage classes are dicts over the API's keys; json.dumps gives the wire JSON.
    text = GenerationUsage(
        **{
            "input_tokens": 29719,
            "output_tokens": 435,
            "total_tokens": 30154,
            "prompt_tokens_details": {
                "cached_tokens": 0,
                "cache_creation_input_tokens": 29713,
                "cache_creation": {"ephemeral_5m_input_tokens": 29713},
                "cache_type": "ephemeral",
            },
            "output_tokens_details": {"reasoning_tokens": 382},
        }
    )
    vision = MultiModalConversationUsage(
        **{
            "input_tokens": 1292,
            "output_tokens": 87,
            "total_tokens": 1379,
            "input_tokens_details": {"text_tokens": 43, "image_tokens": 1249},
            "output_tokens_details": {"text_tokens": 87},
            "image_tokens": 1249,
            "cached_tokens": 1152,
        }
    )
    return {
        "dashscope_text": ("GenerationUsage", "dashscope", json.loads(json.dumps(text))),
        "dashscope_vision": (
            "MultiModalConversationUsage",
            "dashscope",
            json.loads(json.dumps(vision)),
        ),
    }


# ---------------------------------------------------------------------------------------------
# Field walk: every numeric field path of each SDK usage type tokenmeter accepts.
# ---------------------------------------------------------------------------------------------


def usage_types() -> dict:
    from anthropic.types import Usage as AnthropicUsage
    from dashscope.api_entities.dashscope_response import (
        GenerationUsage,
        MultiModalConversationUsage,
    )
    from google.genai.types import GenerateContentResponseUsageMetadata
    from openai.types import CompletionUsage
    from openai.types.responses import ResponseUsage

    return {
        "openai.CompletionUsage": CompletionUsage,
        "openai.ResponseUsage": ResponseUsage,
        "anthropic.Usage": AnthropicUsage,
        "google-genai.GenerateContentResponseUsageMetadata": GenerateContentResponseUsageMetadata,
        "dashscope.GenerationUsage": GenerationUsage,
        "dashscope.MultiModalConversationUsage": MultiModalConversationUsage,
    }


def declared_fields(cls) -> list:
    """(name, annotation) of a pydantic model, or of dashscope's annotated dict classes."""
    if isinstance(cls, type) and issubclass(cls, pydantic.BaseModel):
        return [(name, field.annotation) for name, field in cls.model_fields.items()]
    hints: dict = {}
    for klass in reversed(cls.__mro__):
        hints.update(getattr(klass, "__annotations__", {}) or {})
    return list(hints.items())


def numeric_paths(cls, prefix: str = "") -> list:
    paths = []
    for name, annotation in declared_fields(cls):
        paths.extend(paths_of(annotation, f"{prefix}{name}"))
    return paths


def paths_of(annotation, path: str) -> list:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return paths_of(args[0], path)
    if origin in (typing.Union, types.UnionType):
        found = []
        for arg in args:
            if arg is not type(None):
                found.extend(p for p in paths_of(arg, path) if p not in found)
        return found
    if origin in (list, typing.List):
        return paths_of(args[0], f"{path}[]") if args else []
    if annotation in (int, float):
        return [path]
    if isinstance(annotation, type) and (
        issubclass(annotation, pydantic.BaseModel) or issubclass(annotation, dict)
    ):
        return numeric_paths(annotation, f"{path}.")
    return []


# ---------------------------------------------------------------------------------------------


def outputs() -> dict:
    """Every file this script owns, by path relative to this folder, as text."""
    versions = {sdk: version(sdk) for sdk in SDKS}
    files = {}
    fixtures = {}
    for sdk, build in [
        ("openai", openai_fixtures),
        ("anthropic", anthropic_fixtures),
        ("google-genai", gemini_fixtures),
        ("dashscope", dashscope_fixtures),
    ]:
        for name, (sdk_type, shape, usage) in build().items():
            fixtures[name] = {
                "sdk": f"{sdk} {versions[sdk]}",
                "type": sdk_type,
                "shape": shape,
                "usage": usage,
            }
    for name, fixture in sorted(fixtures.items()):
        files[f"fixtures/{name}.json"] = json.dumps(fixture, indent=2, sort_keys=True) + "\n"
    fields = {
        "versions": versions,
        "types": {name: sorted(numeric_paths(cls)) for name, cls in usage_types().items()},
    }
    files["fields.json"] = json.dumps(fields, indent=2, sort_keys=True) + "\n"
    return files


def main() -> int:
    check = "--check" in sys.argv[1:]
    wanted = outputs()
    stale = []
    for relative, text in wanted.items():
        path = HERE / relative
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(relative)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    owned = {p.relative_to(HERE).as_posix() for p in (HERE / "fixtures").glob("*.json")}
    extra = sorted(owned - set(wanted))
    if check and (stale or extra):
        for relative in stale:
            print(f"sdk fixtures: {relative} differs from what the pinned SDKs give", file=sys.stderr)
        for relative in extra:
            print(f"sdk fixtures: {relative} is no longer generated", file=sys.stderr)
        print("sdk fixtures: run `python tests/sdk/generate.py`, then update the Rust "
              "expectations in src/ingest/codec/sdk_conformance.rs", file=sys.stderr)
        return 1
    if not check:
        for relative in extra:
            (HERE / relative).unlink()
    print(f"sdk fixtures: {len(wanted)} files {'match' if check else 'written'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
