"""The shared spec's stream vectors: every expected_record field, for every vector.

The vectors live in ``shared/spec/stream-vectors.json`` beside the repository (the repo is
cloned at ``X/main`` with ``X/shared`` next to it; CI puts a copy of ``shared/`` beside its
clone). ``DISPATCH_SPEC_DIR`` points at the ``spec`` folder directly. Not found: the test
fails under ``CI=true`` and is skipped elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from dispatch_celery.decode.events import decode_entry, stable_id
from dispatch_celery.decode.filters import EventFilter
from dispatch_celery.decode.records import build_record
from dispatch_celery.settings import Settings
from tests.vendor_servers import vectors_path

VECTORS_FILE = "stream-vectors.json"
ENTRY_ID = "1736937000123-0"
EXPECTED_NAMES = {
    "chat_completion_json_200", "chat_completion_sse_stream_200",
    "audio_speech_binary_non_json_200", "proxy_401_token_not_found", "get_models_skipped",
    "embeddings_post_generic_json_200", "options_preflight_skipped",
}  # fmt: skip
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def find_vectors() -> Path | None:
    return vectors_path(Path(__file__).resolve().parent)


def load_vectors() -> list[dict[str, Any]]:
    path = find_vectors()
    if path is None:
        return []
    vectors: list[dict[str, Any]] = orjson.loads(path.read_bytes())["vectors"]
    return vectors


VECTORS = load_vectors()


def require_vectors() -> None:
    if not VECTORS:
        message = (
            f"{VECTORS_FILE} not found: set DISPATCH_SPEC_DIR or put shared/spec/ beside the repo"
        )
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def test_all_vectors_are_present() -> None:
    require_vectors()
    assert {v["name"] for v in VECTORS} >= EXPECTED_NAMES


def first_choice(output: Any) -> dict[str, Any]:
    assert isinstance(output, dict), output
    choice: dict[str, Any] = output["choices"][0]
    return choice


PARAMS: list[dict[str, Any] | None] = [*VECTORS] or [None]


@pytest.mark.parametrize("vector", PARAMS, ids=[v["name"] for v in VECTORS] or ["vectors-missing"])
def test_vector(vector: dict[str, Any] | None) -> None:
    require_vectors()
    assert vector is not None
    stream_key = vector["stream_key"]
    event = decode_entry(stream_key, ENTRY_ID, vector["xadd_fields"]["data"].encode())
    record = build_record(event, max_body_bytes=1024 * 1024)
    decision = EventFilter.from_settings("lunary", Settings()).decide(event)

    checked: set[str] = set()
    for key, expected in vector["expected_record"].items():
        checked.add(key)
        if key == "id":
            wanted = (
                stable_id(stream_key, ENTRY_ID) if expected.startswith("<derived") else expected
            )
            assert record["id"] == event.event_id == wanted
        elif key in {"request_id", "method", "path", "status", "duration_ms", "model",
                     "streamed", "usage"}:  # fmt: skip
            assert record[key] == expected, key  # type: ignore[literal-required]
        elif key == "delivered":
            assert (decision == "deliver") is expected
        elif key == "reason":
            assert decision == "filtered"  # the reason text is for humans
        elif key == "output_text":
            assert first_choice(record["output"])["message"]["content"] == expected
        elif key == "finish_reason":
            assert first_choice(record["output"])["finish_reason"] == expected
        elif key == "output_is_binary_marker":
            output = record["output"]
            assert (isinstance(output, dict) and output.get("_binary") is True) is expected
        elif key == "error_present":
            assert (record["error"] is not None) is expected
        else:
            pytest.fail(f"vector {vector['name']}: no check for expected_record[{key!r}]")
    assert "id" in checked
