"""Google Gemini API (generativelanguage.googleapis.com): OpenAI chat in, Gemini out and back.

Sans-IO: ``build_chat`` describes the upstream request, ``parse_chat`` and
``StreamTranslator`` turn Gemini's answers into OpenAI ``chat.completion`` /
``chat.completion.chunk`` bytes, ``map_error`` turns Gemini's error JSON into a
``GatewayError``.

Wire formats follow the Gemini REST reference (v1beta, camelCase JSON:
https://ai.google.dev/api/generate-content) and were checked against the official
``google-genai`` SDK (``google/genai/types.py``: GenerateContentResponse, Candidate,
Content, Part, FunctionCall, FunctionResponse, UsageMetadata, FinishReason;
``google/genai/models.py``: ``_GenerateContentParameters_to_mldev`` for the request
body, ``:generateContent`` and ``:streamGenerateContent?alt=sse`` for the URLs).

Request translation (OpenAI chat -> GenerateContentRequest)
-----------------------------------------------------------
    OpenAI                                Gemini
    ------------------------------------  -------------------------------------------------
    system / developer messages           systemInstruction.parts[{text}] (all of them, in
                                          order, wherever they stand: Gemini has only one)
    user                                  contents[{role: "user"}]
    assistant                             contents[{role: "model"}]
    tool (and legacy function)            functionResponse {name, response: {"result": v}}
                                          in a user turn; v is the content parsed as JSON,
                                          or the string when it is not JSON; name is looked
                                          up from the assistant tool call it answers
    consecutive turns of one role         merged into one Content
    text part                             {text}
    image_url data: URL (base64)          {inlineData {mimeType, data}}
    image_url http(s) URL                 {fileData {mimeType (from the extension, else
                                          image/jpeg), fileUri}}
    input_audio {data, format}            {inlineData {mimeType: audio/<format>, data}}
    file {file_data: data: URL}           {inlineData {mimeType, data}}
    assistant tool_calls / function_call  {functionCall {name, args}} (arguments parsed);
                                          extra_content.google.thought_signature -> the
                                          part's thoughtSignature (Google's own OpenAI
                                          compatibility layer carries it there)
    tools[type=function] / functions      tools[{functionDeclarations[{name, description,
                                          parameters}]}]
    tool_choice / function_call           toolConfig.functionCallingConfig: auto -> AUTO,
                                          none -> NONE, required -> ANY, a named function ->
                                          ANY + allowedFunctionNames; allowed_tools ->
                                          VALIDATED (auto) or ANY (required) + the names
    temperature, top_p, n, seed           generationConfig temperature, topP,
                                          candidateCount, seed
    max_completion_tokens | max_tokens    generationConfig.maxOutputTokens
    stop                                  generationConfig.stopSequences
    presence_penalty, frequency_penalty   generationConfig presencePenalty, frequencyPenalty
    response_format json_object           generationConfig.responseMimeType application/json
    response_format json_schema           + generationConfig.responseSchema (translated)
    stream                                the endpoint, not a body field

JSON Schemas (tool parameters, response_format) are translated to Gemini's Schema, an
OpenAPI 3.0 subset (``types.Schema``): local ``$ref``s are inlined (``$defs`` /
``definitions``), ``type: [T, "null"]`` becomes ``nullable``, ``oneOf`` becomes
``anyOf``, a single-element ``allOf`` is merged, a string ``const`` becomes a one-value
``enum`` (an enum without a type gets type STRING: Gemini's enums are strings),
``format`` is kept only when Gemini knows it (enum, date-time, int32, int64, float,
double; JSON Schema itself makes format an annotation), and objects with several
properties get ``propertyOrdering`` in schema order (Gemini otherwise orders its output
alphabetically; the SDK does the same).  A function whose parameters are an object
without properties is declared without parameters (Gemini refuses an empty OBJECT).  Keys in ``SCHEMA_DROPPED_KEYS`` (annotations, and ``additionalProperties``,
which Gemini's Schema rejects) are dropped; any other key Gemini's Schema lacks (``not``,
``if``, ``patternProperties``, ``uniqueItems``, ``multipleOf``, ``exclusiveMinimum`` ...)
is a 400 naming the field: silently loosening a schema would change the answer.

Everything mapped to a 400 (``InvalidRequest``) before any upstream call:
  - ``UNSUPPORTED_PARAMETERS`` set to a value that would change the answer
    (code ``unsupported_parameter``, ``param`` names the field);
  - a field this adapter does not know (code ``unsupported_parameter``);
  - malformed messages: not a list / empty, unknown role, unknown content part type,
    a non-base64 data URL, an image URL that is neither data: nor http(s), a file part
    without inline data, tool_call arguments that are not a JSON object, a tool
    message whose tool_call_id matches no earlier assistant tool call
    (code ``invalid_request``);
  - a tool that is not a function, a schema that cannot be translated, a json_schema
    response_format without a schema (code ``unsupported_parameter`` / ``invalid_request``).

Response translation
--------------------
Candidates become choices (``index``; proto3 JSON omits a zero index).  Text parts are
joined into ``content``; parts with ``thought: true`` (thought summaries) are left out.
functionCall parts become ``tool_calls`` with id ``call_`` + a hash of (response id,
choice index, call index), so a streamed and a non-streamed answer with the same
responseId name their calls alike.  finishReason: STOP -> ``stop`` (``tool_calls`` when
the candidate called a function), MAX_TOKENS -> ``length``, the ``CONTENT_FILTER_REASONS``
-> ``content_filter``, anything else -> ``stop``.

Usage (``usageMetadata``): prompt_tokens = promptTokenCount + toolUsePromptTokenCount
(the latter only appears with Google's built-in tools, which this adapter never asks
for; it is billed as input), completion_tokens = candidatesTokenCount +
thoughtsTokenCount (Gemini counts thinking apart; OpenAI counts reasoning inside
completion tokens), cached_tokens = cachedContentTokenCount, reasoning_tokens =
thoughtsTokenCount.

A prompt Gemini blocks (``promptFeedback.blockReason``, no candidates) is a 400
``InvalidRequest`` with code ``content_filter``, whole or streamed: it is what Azure
OpenAI answers to a filtered prompt, and it is not retried or served from the cache.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import math
import re
from typing import Any

import orjson

from gwcore.config import Deployment
from gwcore.errors import GatewayError, InvalidRequest, UpstreamError, UpstreamStatus
from gwcore.providers.base import SSEEventLike, UpstreamRequest, reads_upstream, request_json
from gwcore.wire import Usage
from gwnative import encode_event

__all__ = [
    "CONTENT_FILTER_REASONS", "DEFAULT_BASE_URL", "DROPPED_PARAMETERS", "SCHEMA_DROPPED_KEYS",
    "UNSUPPORTED_PARAMETERS", "StreamTranslator", "build_chat", "gemini_schema", "map_error",
    "model_url", "parse_chat", "usage_from_metadata", "usage_json",
]

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
API_VERSION = "v1beta"

# OpenAI fields with no faithful Gemini equivalent: sending them on would silently
# change the answer, so a request that sets one (to a value other than "off") is a 400.
UNSUPPORTED_PARAMETERS = (
    "logprobs", "top_logprobs", "logit_bias", "audio", "modalities", "prediction",
    "reasoning_effort", "verbosity", "web_search_options",
)
# Fields that do not change the answer, or concern only OpenAI's side: dropped.
DROPPED_PARAMETERS = frozenset({
    "stream_options", "store", "metadata", "service_tier", "user", "parallel_tool_calls",
    "safety_identifier", "prompt_cache_key",
})
_TRANSLATED_PARAMETERS = frozenset({
    "model", "messages", "stream", "temperature", "top_p", "n", "seed", "max_tokens",
    "max_completion_tokens", "stop", "presence_penalty", "frequency_penalty",
    "response_format", "tools", "tool_choice", "functions", "function_call",
})

# JSON Schema keys Gemini's Schema (types.Schema; REST reference "Schema") accepts as is.
_SCHEMA_KEPT_KEYS = frozenset({
    "type", "format", "title", "description", "nullable", "enum", "maxItems", "minItems",
    "properties", "required", "minProperties", "maxProperties", "minLength", "maxLength",
    "pattern", "example", "anyOf", "propertyOrdering", "default", "items", "minimum",
    "maximum",
})
# Dropped from schemas: annotations that do not constrain the value, the containers
# of inlined definitions, and additionalProperties (the Gemini API rejects it in a
# Schema with 'Unknown name "additionalProperties"'; it lists what an object may
# hold, which the model follows from ``properties`` anyway).
SCHEMA_DROPPED_KEYS = frozenset({
    "$schema", "$id", "$comment", "$defs", "definitions", "strict", "additionalProperties",
    "examples", "readOnly", "writeOnly", "deprecated", "$anchor",
})
_SCHEMA_FORMATS = frozenset({"enum", "date-time", "int32", "int64", "float", "double"})
_SCHEMA_TYPES = {"string": "STRING", "number": "NUMBER", "integer": "INTEGER",
                 "boolean": "BOOLEAN", "array": "ARRAY", "object": "OBJECT", "null": "NULL"}

# FinishReason values (types.FinishReason) that mean "blocked by a filter".
CONTENT_FILTER_REASONS = frozenset({
    "SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY",
    "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION", "MODEL_ARMOR",
})

# For fileData parts the API needs a MIME type; a fixed table keeps the translation a
# pure function (``mimetypes`` reads the host's /etc/mime.types).
_MIME_BY_EXTENSION = {
    "png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "gif": "image/gif",
    "webp": "image/webp", "heic": "image/heic", "heif": "image/heif", "bmp": "image/bmp",
    "pdf": "application/pdf",
}
_DEFAULT_IMAGE_MIME = "image/jpeg"
_DATA_URL = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<data>.*)", re.S)
# "The input token count (N) exceeds the maximum number of tokens allowed (M)."
_CONTEXT_WINDOW = re.compile(r"input token count.*exceeds the maximum", re.I | re.S)


# -- request ---------------------------------------------------------------------------

def model_url(base: str, model: str, stream: bool) -> str:
    """``{base}/v1beta/models/{model}:generateContent`` (or the streaming method with
    ``alt=sse``), keeping a query string of the base."""
    root, _, query = base.partition("?")
    name = model if model.startswith(("models/", "tunedModels/")) else f"models/{model}"
    method = "streamGenerateContent" if stream else "generateContent"
    params = [p for p in (("alt=sse" if stream else ""), query) if p]
    return f"{root.rstrip('/')}/{API_VERSION}/{name}:{method}" + \
        (f"?{'&'.join(params)}" if params else "")


def build_chat(body: dict[str, Any], dep: Deployment, base_url: str | None,
               api_key: str | None) -> UpstreamRequest:
    """An OpenAI chat request as a Gemini generateContent request (see the module doc)."""
    _check_parameters(body)
    stream = body.get("stream") is True
    contents, system = _contents(body.get("messages"))
    out: dict[str, Any] = {"contents": contents}
    if system:
        out["systemInstruction"] = {"parts": system}
    tools = _tools(body)
    if tools:
        out["tools"] = [{"functionDeclarations": tools}]
        config = _tool_config(body)
        if config is not None:
            out["toolConfig"] = {"functionCallingConfig": config}
    generation = _generation_config(body)
    if generation:
        out["generationConfig"] = generation
    headers = [("content-type", "application/json")]
    if api_key:
        headers.append(("x-goog-api-key", api_key))
    url = model_url(base_url or DEFAULT_BASE_URL, dep.model, stream)
    return UpstreamRequest("POST", url, headers, request_json(out), stream=stream)


def _array(value: Any, param: str) -> list[Any]:
    """An optional array field of the request: [] when absent, a 400 when not an array."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidRequest(f"'{param}' must be an array.", param=param)
    return value


def _object(value: Any) -> dict[str, Any]:
    """An optional object field: {} when absent or not an object (its checks follow)."""
    return value if isinstance(value, dict) else {}


def _unsupported(param: str, why: str = "") -> InvalidRequest:
    return InvalidRequest(f"The parameter '{param}' is not supported by the Google Gemini "
                          f"provider{why}.", code="unsupported_parameter", param=param)


def _check_parameters(body: dict[str, Any]) -> None:
    for name, value in body.items():
        if name in _TRANSLATED_PARAMETERS or name in DROPPED_PARAMETERS:
            continue
        if name in UNSUPPORTED_PARAMETERS:
            # Values that ask for nothing are harmless: logprobs false, modalities ["text"].
            if value is None or value is False or value == {} or value == 0 \
                    or (name == "modalities" and value == ["text"]):
                continue
            raise _unsupported(name)
        raise _unsupported(name, " (unknown parameter)")


def _text_parts(content: Any, param: str, allowed: tuple[str, ...] = ("text",)) -> list[dict]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}]
    if not isinstance(content, list):
        raise InvalidRequest("Message content must be a string or a list of parts.",
                             param=param)
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in allowed:
            raise InvalidRequest(f"Content part type {kind!r} is not allowed here.",
                                 param=f"{param}[{j}].type")
        text = part.get("text") if kind == "text" else part.get("refusal")
        if not isinstance(text, str):
            raise InvalidRequest("A text part needs a string 'text'.", param=f"{param}[{j}]")
        parts.append({"text": text})
    return parts


def _data_url(url: str, param: str) -> dict[str, Any]:
    m = _DATA_URL.fullmatch(url)
    if not m or ";base64" not in m["params"].lower():
        raise InvalidRequest("Only base64 data: URLs are supported.", param=param)
    try:
        base64.b64decode(m["data"], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("The data: URL does not hold valid base64.", param=param) from None
    return {"inlineData": {"mimeType": m["mime"] or "application/octet-stream",
                           "data": m["data"]}}


def _image_part(image: Any, param: str) -> dict[str, Any]:
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise InvalidRequest("image_url needs a 'url' string.", param=param)
    if url.startswith("data:"):
        return _data_url(url, param)
    if url.startswith(("https://", "http://")):
        name = url.split("?", 1)[0].split("#", 1)[0].rsplit("/", 1)[-1]
        ext = name.rpartition(".")[2].lower() if "." in name else ""
        return {"fileData": {"mimeType": _MIME_BY_EXTENSION.get(ext, _DEFAULT_IMAGE_MIME),
                             "fileUri": url}}
    raise InvalidRequest("An image URL must be a data: URL or an http(s) URL.", param=param)


def _user_parts(content: Any, param: str) -> list[dict[str, Any]]:
    if not isinstance(content, list):
        return _text_parts(content, param)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise InvalidRequest("A text part needs a string 'text'.", param=where)
            parts.append({"text": part["text"]})
        elif kind == "image_url":
            parts.append(_image_part(part.get("image_url"), f"{where}.image_url"))
        elif kind == "input_audio":
            audio = _object(part.get("input_audio"))
            fmt, data = audio.get("format"), audio.get("data")
            if not isinstance(fmt, str) or not isinstance(data, str):
                raise InvalidRequest("input_audio needs 'data' and 'format'.", param=where)
            parts.append({"inlineData": {"mimeType": f"audio/{fmt}", "data": data}})
        elif kind == "file":
            data = _object(part.get("file")).get("file_data")
            if not isinstance(data, str):
                raise InvalidRequest("Only files given inline as file_data (a base64 data: "
                                     "URL) are supported.", param=f"{where}.file")
            parts.append(_data_url(data, f"{where}.file.file_data"))
        else:
            raise InvalidRequest(f"Content part type {kind!r} is not supported.",
                                 param=f"{where}.type")
    return parts


def _function_call_part(name: Any, arguments: Any, param: str,
                        signature: Any = None) -> dict[str, Any]:
    if not isinstance(name, str) or not name:
        raise InvalidRequest("A tool call needs a function name.", param=param)
    try:
        args = orjson.loads(arguments) if isinstance(arguments, str) and arguments.strip() else {}
    except orjson.JSONDecodeError:
        raise InvalidRequest("Tool call arguments must be valid JSON.",
                             param=f"{param}.arguments") from None
    if not isinstance(args, dict):
        raise InvalidRequest("Tool call arguments must be a JSON object.",
                             param=f"{param}.arguments")
    part: dict[str, Any] = {"functionCall": {"name": name, "args": args}}
    if isinstance(signature, str) and signature:
        part["thoughtSignature"] = signature
    return part


def _function_response_part(name: str, content: Any, param: str) -> dict[str, Any]:
    text = content if isinstance(content, str) else \
        "".join(p["text"] for p in _text_parts(content, param))
    try:
        result: Any = orjson.loads(text)
    except orjson.JSONDecodeError:
        result = text
    return {"functionResponse": {"name": name, "response": {"result": result}}}


def _contents(messages: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list.", param="messages")
    contents: list[dict[str, Any]] = []
    system: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}

    def add(role: str, parts: list[dict[str, Any]]) -> None:
        if not parts:
            return
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"] += parts
        else:
            contents.append({"role": role, "parts": parts})

    for i, msg in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise InvalidRequest("Each message must be an object.", param=param)
        role, content = msg.get("role"), msg.get("content")
        if role in ("system", "developer"):
            system += _text_parts(content, f"{param}.content")
        elif role == "user":
            add("user", _user_parts(content, f"{param}.content"))
        elif role == "assistant":
            parts = _text_parts(content, f"{param}.content", ("text", "refusal"))
            for k, call in enumerate(_array(msg.get("tool_calls"), f"{param}.tool_calls")):
                where = f"{param}.tool_calls[{k}]"
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or call.get("type", "function") != "function":
                    raise InvalidRequest("Only function tool calls are supported.", param=where)
                extra = call.get("extra_content")
                google = extra.get("google") if isinstance(extra, dict) else None
                signature = google.get("thought_signature") if isinstance(google, dict) else None
                parts.append(_function_call_part(fn.get("name"), fn.get("arguments"),
                                                 f"{where}.function", signature))
                if isinstance(call.get("id"), str):
                    call_names[call["id"]] = fn["name"]
            legacy = msg.get("function_call")
            if isinstance(legacy, dict):
                parts.append(_function_call_part(legacy.get("name"), legacy.get("arguments"),
                                                 f"{param}.function_call"))
            add("model", parts)
        elif role == "tool":
            call_id = msg.get("tool_call_id")
            name = call_names.get(call_id) if isinstance(call_id, str) else None
            if name is None:
                raise InvalidRequest("A tool message must answer a tool call of an earlier "
                                     "assistant message (unknown tool_call_id).",
                                     param=f"{param}.tool_call_id")
            add("user", [_function_response_part(name, content, f"{param}.content")])
        elif role == "function":
            name = msg.get("name")
            if not isinstance(name, str):
                raise InvalidRequest("A function message needs a 'name'.", param=f"{param}.name")
            add("user", [_function_response_part(name, content, f"{param}.content")])
        else:
            raise InvalidRequest(f"Unknown message role {role!r}.", param=f"{param}.role")
    return contents, system


# Bounds on translating one schema: its nesting (each level costs two Python frames of
# the recursion limit's 1000) and its size once $refs are inlined (each $ref is inlined
# anew, so definitions that each refer twice to the next grow as 2**n).  Tool and
# response schemas in use are far inside both.
MAX_SCHEMA_DEPTH = 64
MAX_SCHEMA_NODES = 10_000


class _SchemaWalk:
    """What one ``gemini_schema`` call has translated so far, across its recursion."""
    __slots__ = ("nodes",)

    def __init__(self) -> None:
        self.nodes = 0


def gemini_schema(schema: Any, param: str, defs: dict[str, Any] | None = None,
                  seen: tuple[str, ...] = (), *, _walk: _SchemaWalk | None = None,
                  _depth: int = 0) -> dict[str, Any]:
    """A JSON Schema as Gemini's Schema (OpenAPI 3.0 subset), or a 400 naming ``param``.

    See the module doc for what is kept, rewritten, dropped and refused.
    """
    if not isinstance(schema, dict):
        raise _schema_error(param, "a schema must be an object")
    walk = _walk or _SchemaWalk()
    walk.nodes += 1
    if _depth > MAX_SCHEMA_DEPTH:
        raise _schema_error(param, f"it nests deeper than {MAX_SCHEMA_DEPTH} levels")
    if walk.nodes > MAX_SCHEMA_NODES:
        raise _schema_error(param, f"it holds more than {MAX_SCHEMA_NODES} schemas once its "
                                   "$refs are inlined")

    def sub(value: Any, where: str, refs: tuple[str, ...] = seen) -> dict[str, Any]:
        return gemini_schema(value, where, defs, refs, _walk=walk, _depth=_depth + 1)

    if defs is None:
        defs = {}
        for key in ("definitions", "$defs"):
            table = schema.get(key)
            if table is not None and not isinstance(table, dict):
                raise _schema_error(f"{param}.{key}", "definitions must be an object")
            defs.update(table or {})
    if "$ref" in schema:
        ref = schema["$ref"]
        name = ref.rsplit("/", 1)[-1] if isinstance(ref, str) else None
        if not isinstance(ref, str) or not ref.startswith(("#/$defs/", "#/definitions/")) \
                or name not in defs or not isinstance(defs[name], dict):
            raise _schema_error(param, f"$ref {ref!r} is not a local definition")
        if name in seen:
            raise _schema_error(param, f"$ref {ref!r} is recursive")
        rest = {k: v for k, v in schema.items() if k != "$ref"}
        return sub({**defs[name], **rest}, param, seen + (name,))
    if "allOf" in schema:
        all_of = schema["allOf"]
        if not isinstance(all_of, list) or len(all_of) != 1:
            raise _schema_error(param, "allOf with more than one schema")
        rest = {k: v for k, v in schema.items() if k != "allOf"}
        merged = sub(all_of[0], f"{param}.allOf[0]")
        return {**merged, **sub(rest, param)} if rest else merged
    out: dict[str, Any] = {}
    for key, value in schema.items():
        where = f"{param}.{key}"
        if key in SCHEMA_DROPPED_KEYS:
            continue
        if key == "type":
            types = value if isinstance(value, list) else [value]
            if not all(isinstance(t, str) and t in _SCHEMA_TYPES for t in types):
                raise _schema_error(where, f"unknown type {value!r}")
            real = [t for t in types if t != "null"]
            if not real:
                out["type"] = "NULL"
                continue
            if len(real) < len(types):
                out["nullable"] = True
            if len(real) == 1:
                out["type"] = _SCHEMA_TYPES[real[0]]
            else:
                out["anyOf"] = [{"type": _SCHEMA_TYPES[t]} for t in real]
        elif key == "const":
            if not isinstance(value, str):
                raise _schema_error(where, "only string constants are supported")
            out["enum"] = [value]
        elif key == "enum":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value
                                                      if v is not None):
                raise _schema_error(where, "Gemini supports only string enums")
            if None in value:
                out["nullable"] = True
            out["enum"] = [v for v in value if v is not None]
        elif key == "properties":
            if not isinstance(value, dict):
                raise _schema_error(where, "properties must be an object")
            out["properties"] = {name: sub(prop, f"{where}.{name}")
                                 for name, prop in value.items()}
        elif key == "items":
            out["items"] = sub(value, where)
        elif key in ("anyOf", "oneOf"):
            if not isinstance(value, list) or not value:
                raise _schema_error(where, f"{key} must be a non-empty list")
            subs = [sub(s, f"{where}[{k}]") for k, s in enumerate(value)]
            non_null = [s for s in subs if s != {"type": "NULL"}]
            if len(non_null) < len(subs):
                out["nullable"] = True
            if len(non_null) == 1:
                out.update(non_null[0])
            else:
                out["anyOf"] = non_null
        elif key == "format":
            # JSON Schema treats format as an annotation; Gemini refuses all but these.
            if isinstance(value, str) and value in _SCHEMA_FORMATS:
                out["format"] = value
        elif key in _SCHEMA_KEPT_KEYS:
            out[key] = value
        else:
            raise _schema_error(where, f"the JSON Schema keyword {key!r} has no Gemini "
                                       "equivalent")
    if "enum" in out and "type" not in out and "anyOf" not in out:
        out["type"] = "STRING"  # Gemini's enums are strings, and need their type
    # Gemini orders the fields of its output alphabetically unless told otherwise; keep
    # the schema's order, as OpenAI does (the SDK adds propertyOrdering alike).
    if len(out.get("properties") or ()) > 1 and "propertyOrdering" not in out:
        out["propertyOrdering"] = list(out["properties"])
    return out


def _schema_error(param: str, why: str) -> InvalidRequest:
    return InvalidRequest(f"The schema at '{param}' cannot be translated for Google Gemini: "
                          f"{why}.", code="unsupported_parameter", param=param)


def _tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    declared: list[tuple[str, Any]] = []
    for i, tool in enumerate(_array(body.get("tools"), "tools")):
        if not isinstance(tool, dict) or tool.get("type") != "function" \
                or not isinstance(tool.get("function"), dict):
            raise _unsupported(f"tools[{i}].type", " (only function tools are)")
        declared.append((f"tools[{i}].function", tool["function"]))
    for i, fn in enumerate(_array(body.get("functions"), "functions")):
        declared.append((f"functions[{i}]", fn))
    out = []
    for param, fn in declared:
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            raise InvalidRequest("A function needs a name.", param=f"{param}.name")
        decl: dict[str, Any] = {"name": name}
        if isinstance(fn.get("description"), str):
            decl["description"] = fn["description"]
        params = fn.get("parameters")
        if params is not None:
            schema = gemini_schema(params, f"{param}.parameters")
            # Gemini refuses an OBJECT without properties ("should be non-empty for
            # OBJECT type"); a function without parameters has no parameters at all.
            if schema.get("type") != "OBJECT" or schema.get("properties"):
                decl["parameters"] = schema
        out.append(decl)
    return out


def _tool_config(body: dict[str, Any]) -> dict[str, Any] | None:
    choice = body.get("tool_choice")
    if choice is None:
        legacy = body.get("function_call")
        if isinstance(legacy, dict):
            choice = {"type": "function", "function": legacy}
        else:
            choice = legacy
    if choice is None:
        return None
    if choice == "auto":
        return {"mode": "AUTO"}
    if choice == "none":
        return {"mode": "NONE"}
    if choice == "required":
        return {"mode": "ANY"}
    if isinstance(choice, dict):
        if choice.get("type") == "function" and isinstance(choice.get("function"), dict) \
                and isinstance(choice["function"].get("name"), str):
            return {"mode": "ANY", "allowedFunctionNames": [choice["function"]["name"]]}
        allowed = choice.get("allowed_tools")
        if choice.get("type") == "allowed_tools" and isinstance(allowed, dict) \
                and allowed.get("mode") in ("auto", "required"):
            names = [t["function"]["name"]
                     for t in _array(allowed.get("tools"), "tool_choice.allowed_tools.tools")
                     if isinstance(t, dict) and isinstance(t.get("function"), dict)
                     and isinstance(t["function"].get("name"), str)]
            return {"mode": "ANY" if allowed["mode"] == "required" else "VALIDATED",
                    "allowedFunctionNames": names}
    raise InvalidRequest(f"Unsupported tool_choice {choice!r}.", code="unsupported_parameter",
                         param="tool_choice")


def _generation_config(body: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for src, dst in (("temperature", "temperature"), ("top_p", "topP"), ("n", "candidateCount"),
                     ("seed", "seed"), ("presence_penalty", "presencePenalty"),
                     ("frequency_penalty", "frequencyPenalty")):
        if body.get(src) is not None:
            config[dst] = body[src]
    limit = body.get("max_completion_tokens")
    if limit is None:
        limit = body.get("max_tokens")
    if limit is not None:
        config["maxOutputTokens"] = limit
    stop = body.get("stop")
    if isinstance(stop, str):
        config["stopSequences"] = [stop]
    elif isinstance(stop, list) and stop:
        config["stopSequences"] = stop
    fmt = body.get("response_format")
    if isinstance(fmt, dict):
        kind = fmt.get("type")
        if kind == "json_object":
            config["responseMimeType"] = "application/json"
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise InvalidRequest("response_format json_schema needs a 'schema'.",
                                     param="response_format.json_schema.schema")
            config["responseMimeType"] = "application/json"
            config["responseSchema"] = gemini_schema(schema, "response_format.json_schema.schema")
        elif kind != "text":
            raise _unsupported("response_format", f" (type {kind!r})")
    elif fmt is not None:
        raise InvalidRequest("response_format must be an object.", param="response_format")
    return config


# -- responses -------------------------------------------------------------------------

def usage_from_metadata(meta: Any) -> Usage | None:
    """Gemini ``usageMetadata`` in OpenAI's terms (see the module doc)."""
    if not isinstance(meta, dict):
        return None
    thoughts = _int(meta.get("thoughtsTokenCount"))
    return Usage(
        prompt_tokens=_int(meta.get("promptTokenCount")) + _int(meta.get("toolUsePromptTokenCount")),
        completion_tokens=_int(meta.get("candidatesTokenCount")) + thoughts,
        cached_tokens=_int(meta.get("cachedContentTokenCount")),
        reasoning_tokens=thoughts,
    )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def usage_json(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens}}


def _hash(*parts: Any) -> str:
    h = hashlib.blake2b(digest_size=12)
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def _call_id(response_id: str, choice: int, call: int) -> str:
    return "call_" + _hash(response_id, choice, call)


def _finish_reason(reason: Any, called: bool) -> str:
    if reason == "MAX_TOKENS":
        return "length"
    if isinstance(reason, str) and reason in CONTENT_FILTER_REASONS:
        return "content_filter"
    return "tool_calls" if called else "stop"


def _check_blocked(response: dict[str, Any]) -> None:
    feedback = response.get("promptFeedback")
    if response.get("candidates") or not isinstance(feedback, dict):
        return
    reason = feedback.get("blockReason")
    if reason:
        detail = feedback.get("blockReasonMessage")
        raise InvalidRequest(f"Google Gemini blocked the prompt ({reason})"
                             + (f": {detail}" if isinstance(detail, str) and detail else "."),
                             code="content_filter", param="messages")


def _candidates(response: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    out = []
    for pos, cand in enumerate(response.get("candidates") or []):
        if isinstance(cand, dict):
            index = cand.get("index")
            out.append((index if isinstance(index, int) else pos, cand))
    return out


def _parts(cand: dict[str, Any]) -> list[dict[str, Any]]:
    content = cand.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    return [p for p in parts or [] if isinstance(p, dict)]


def _tool_call(part: dict[str, Any], call_id: str) -> dict[str, Any]:
    fc = part["functionCall"]
    call: dict[str, Any] = {"id": call_id, "type": "function",
                            "function": {"name": fc.get("name") or "",
                                         "arguments": orjson.dumps(fc.get("args") or {}).decode()}}
    if isinstance(part.get("thoughtSignature"), str):
        call["extra_content"] = {"google": {"thought_signature": part["thoughtSignature"]}}
    return call


def _load(body: bytes | str) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise UpstreamError("Google Gemini returned a response that is not JSON.") from None


@reads_upstream("a response")
def parse_chat(body: bytes, model: str, created: int) -> tuple[bytes, Usage | None]:
    """A GenerateContentResponse as an OpenAI ``chat.completion`` (bytes) and its usage."""
    response = _load(body)
    if isinstance(response, dict) and "error" in response:
        raise map_error(_error_status(response), body, [])
    if not isinstance(response, dict):
        raise UpstreamError("Google Gemini returned an unexpected response.")
    _check_blocked(response)
    response_id = response.get("responseId")
    if not isinstance(response_id, str) or not response_id:
        response_id = _hash(body)
    choices = []
    for index, cand in sorted(_candidates(response), key=lambda c: c[0]):
        texts, calls = [], []
        for part in _parts(cand):
            if part.get("thought") is True:
                continue
            if isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part.get("functionCall"), dict):
                calls.append(_tool_call(part, _call_id(response_id, index, len(calls))))
        message: dict[str, Any] = {"role": "assistant",
                                   "content": "".join(texts) if texts or not calls else None,
                                   "refusal": None}
        if calls:
            message["tool_calls"] = calls
        choices.append({"index": index, "message": message, "logprobs": None,
                        "finish_reason": _finish_reason(cand.get("finishReason"), bool(calls))})
    usage = usage_from_metadata(response.get("usageMetadata"))
    out = {"id": f"chatcmpl-{response_id}", "object": "chat.completion", "created": created,
           "model": model, "choices": choices,
           "usage": usage_json(usage) if usage else None, "system_fingerprint": None}
    return orjson.dumps(out), usage


class _Choice:
    __slots__ = ("calls", "finished")

    def __init__(self) -> None:
        self.calls = 0
        self.finished = False


class StreamTranslator:
    """``streamGenerateContent?alt=sse`` events in, OpenAI chunk frames out.

    How this works: every SSE event carries a whole GenerateContentResponse holding the
    next piece of each candidate (text, or whole function calls: Gemini does not stream
    argument fragments), and the last one a finishReason; usageMetadata is complete only
    on the last one, so the latest is kept.  Gemini's stream has no end marker, so the
    end of a complete stream is told by ``close()``, called when the upstream body ends.

        state      input                                 output / next
        ---------  ------------------------------------  -------------------------------
        open       event, first sight of a candidate     role chunk {"role","content":""}
        open       text part (not thought)               content delta
        open       functionCall part                     tool_calls delta (id, name, args)
        open       finishReason on a candidate           finish chunk; done once every
                                                         candidate seen has finished
        open       {"error": ...} event                  raises the mapped GatewayError
        open       promptFeedback.blockReason            raises InvalidRequest content_filter
        done       close()                               usage chunk (include_usage),
                                                         [DONE]; closed
        not done   close()                               raises UpstreamError (truncated)
        closed     close()                               []
    """

    def __init__(self, model: str, include_usage: bool, created: int) -> None:
        self.model = model
        self.include_usage = include_usage
        self.created = created
        self.usage: Usage | None = None
        self.done = False
        self.finish_reason: str | None = None
        self.events = 0
        self._id: str | None = None
        self._response_id = ""
        self._choices: dict[int, _Choice] = {}
        self._closed = False

    def _frame(self, choices: list[dict[str, Any]], usage: Any = None,
               usage_chunk: bool = False) -> bytes:
        chunk: dict[str, Any] = {"id": self._id, "object": "chat.completion.chunk",
                                 "created": self.created, "model": self.model,
                                 "system_fingerprint": None, "choices": choices}
        if self.include_usage:
            chunk["usage"] = usage if usage_chunk else None
        return encode_event(orjson.dumps(chunk))

    def _delta(self, index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return self._frame([{"index": index, "delta": delta, "logprobs": None,
                             "finish_reason": finish}])

    @reads_upstream("a stream event")
    def feed(self, event: SSEEventLike) -> list[bytes]:
        if self._closed or not event.data.strip():
            return []
        self.events += 1
        response = _load(event.data)
        if isinstance(response, dict) and "error" in response:
            raise map_error(_error_status(response), event.data.encode("utf-8"), [])
        if not isinstance(response, dict):
            raise UpstreamError("Google Gemini sent an unexpected stream event.")
        _check_blocked(response)
        if self._id is None:
            rid = response.get("responseId")
            self._response_id = rid if isinstance(rid, str) and rid else \
                _hash(event.data.encode("utf-8"))
            self._id = f"chatcmpl-{self._response_id}"
        usage = usage_from_metadata(response.get("usageMetadata"))
        if usage is not None:
            self.usage = usage
        out: list[bytes] = []
        for index, cand in _candidates(response):
            state = self._choices.get(index)
            if state is None:
                state = self._choices[index] = _Choice()
                out.append(self._delta(index, {"role": "assistant", "content": ""}))
            if state.finished:
                continue
            for part in _parts(cand):
                if part.get("thought") is True:
                    continue
                if isinstance(part.get("text"), str):
                    if part["text"]:
                        out.append(self._delta(index, {"content": part["text"]}))
                elif isinstance(part.get("functionCall"), dict):
                    call = _tool_call(part, _call_id(self._response_id, index, state.calls))
                    out.append(self._delta(index, {"tool_calls": [{"index": state.calls, **call}]}))
                    state.calls += 1
            reason = cand.get("finishReason")
            if reason:
                state.finished = True
                self.finish_reason = _finish_reason(reason, state.calls > 0)
                out.append(self._delta(index, {}, self.finish_reason))
        if self._choices and all(c.finished for c in self._choices.values()):
            self.done = True
        return out

    @reads_upstream("a stream")
    def close(self) -> list[bytes]:
        """The upstream body ended: the closing frames, or UpstreamError if cut short."""
        if self._closed:
            return []
        self._closed = True
        if not self.done:
            raise UpstreamError("The Google Gemini stream ended before it was complete.")
        out = []
        if self.include_usage:
            out.append(self._frame([], usage_json(self.usage) if self.usage else None,
                                   usage_chunk=True))
        out.append(encode_event("[DONE]"))
        return out


# -- errors ----------------------------------------------------------------------------

def _error_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(data, list) and data:  # the non-SSE stream method wraps it in an array
        data = data[0]
    err = data.get("error") if isinstance(data, dict) else None
    return err if isinstance(err, dict) else None


def _error_status(response: dict[str, Any]) -> int:
    err = response.get("error")
    code = err.get("code") if isinstance(err, dict) else None
    return code if isinstance(code, int) and 400 <= code <= 599 else 500


def _details(err: dict[str, Any]) -> list[Any]:
    details = err.get("details")
    return details if isinstance(details, list) else []


def _retry_delay(err: dict[str, Any]) -> str | None:
    """google.rpc.RetryInfo ``retryDelay`` ("3s", "1.5s") as retry-after seconds."""
    for detail in _details(err):
        delay = detail.get("retryDelay") if isinstance(detail, dict) else None
        if isinstance(delay, str) and delay.endswith("s"):
            try:
                return str(math.ceil(float(delay[:-1])))
            except (ValueError, OverflowError):  # "nans", "1e999s"
                return None
    return None


def _reasons(err: dict[str, Any]) -> set[str]:
    return {d["reason"] for d in _details(err)
            if isinstance(d, dict) and isinstance(d.get("reason"), str)}


def map_error(status: int, body: bytes, headers: list[tuple[str, str]]) -> GatewayError:
    """A Gemini error response (``{"error": {"code", "message", "status", "details"}}``)
    as the error the client should see; the policy of ``openai.map_error``.

    Gemini answers a bad API key with 400 INVALID_ARGUMENT (reason API_KEY_INVALID):
    that is the gateway's credential, so it is a 502 like a 401/403.  A 429 keeps its
    retry-after, taken from the header or from RetryInfo.retryDelay.
    """
    err = _error_object(body) or {}
    message = err.get("message") if isinstance(err.get("message"), str) else None
    message = message or body[:200].decode("utf-8", "replace") or f"HTTP {status}"
    google_status = err.get("status") if isinstance(err.get("status"), str) else None
    if status in (401, 403) or "API_KEY_INVALID" in _reasons(err):
        return UpstreamError(f"The upstream rejected the gateway's provider credentials "
                             f"(HTTP {status}).")
    if status in (400, 404, 409, 413, 415, 422):
        code = "context_length_exceeded" if _CONTEXT_WINDOW.search(message) else \
            (google_status.lower() if google_status else "invalid_request")
        return UpstreamStatus(status, message, type_="invalid_request_error", code=code)
    if status == 429:
        retry = [(k, v) for k, v in headers if k.lower() == "retry-after"]
        if not retry and (delay := _retry_delay(err)) is not None:
            retry = [("retry-after", delay)]
        return UpstreamStatus(429, message, type_="rate_limit_error",
                              code="rate_limit_exceeded", headers=retry)
    return UpstreamError(f"The upstream returned HTTP {status}: {message}")
