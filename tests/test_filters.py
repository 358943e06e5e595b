"""EventFilter: methods, path prefixes, statuses, deterministic sampling, config errors."""

from __future__ import annotations

import uuid

import pytest

from dispatch_celery.cli.sample import event_json
from dispatch_celery.decode.events import Event, decode_entry
from dispatch_celery.decode.filters import EventFilter, in_sample
from dispatch_celery.errors import ConfigError
from dispatch_celery.settings import Settings


def settings(**env: str) -> Settings:
    return Settings(env={f"DISPATCH_{k}": v for k, v in env.items()})


def event(method: str = "POST", path: str = "/v1/chat/completions", status: int = 200,
          request_id: str = "rid") -> Event:  # fmt: skip
    data = event_json(request_id=request_id, method=method, path=path, status=status)
    return decode_entry("llm-proxy-events", "1736937000123-0", data)


def test_default_delivers_post_only() -> None:
    f = EventFilter.from_settings("helicone", settings())
    assert f.decide(event("POST")) == "deliver"
    assert f.decide(event("GET", "/v1/models")) == "filtered"
    assert f.decide(event("OPTIONS", status=204, request_id="")) == "filtered"
    assert f.decide(event("POST", status=500)) == "deliver"
    assert EventFilter().decide(event("PUT")) == "filtered"


def test_methods_star_and_lists() -> None:
    every = EventFilter.from_settings("file", settings(FILE_METHODS="*"))
    assert every.decide(event("OPTIONS")) == "deliver"
    some = EventFilter.from_settings("file", settings(FILE_METHODS=" post , Get "))
    assert some.decide(event("GET")) == "deliver"
    assert some.decide(event("DELETE")) == "filtered"


def test_service_setting_overrides_the_global_one() -> None:
    env = settings(METHODS="GET", LUNARY_METHODS="PUT")
    assert EventFilter.from_settings("lunary", env).decide(event("PUT")) == "deliver"
    assert EventFilter.from_settings("lunary", env).decide(event("GET")) == "filtered"
    # Another service falls back to the global value.
    assert EventFilter.from_settings("helicone", env).decide(event("GET")) == "deliver"
    assert EventFilter.from_settings("helicone", env).decide(event("POST")) == "filtered"


def test_service_names_with_dashes_map_to_underscores() -> None:
    f = EventFilter.from_settings("my-file", settings(MY_FILE_METHODS="GET"))
    assert f.decide(event("GET")) == "deliver"


def test_path_prefixes() -> None:
    f = EventFilter.from_settings("file", settings(FILE_PATH_PREFIXES="/v1/chat,/v1/embeddings"))
    assert f.decide(event(path="/v1/chat/completions")) == "deliver"
    assert f.decide(event(path="/v1/embeddings")) == "deliver"
    assert f.decide(event(path="/v1/audio/speech")) == "filtered"


def test_statuses() -> None:
    f = EventFilter.from_settings("file", settings(FILE_STATUSES="200-299, 401,5xx"))
    assert f.statuses == ((200, 299), (401, 401), (500, 599))
    decisions = {s: f.decide(event(status=s)) for s in (200, 204, 299, 300, 401, 404, 500, 599)}
    assert decisions == {
        200: "deliver", 204: "deliver", 299: "deliver", 300: "filtered",
        401: "deliver", 404: "filtered", 500: "deliver", 599: "deliver",
    }  # fmt: skip


def test_overlapping_status_ranges_are_merged() -> None:
    f = EventFilter.from_settings("file", settings(STATUSES="4xx,400-410,200,201-202"))
    assert f.statuses == ((200, 202), (400, 499))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FILE_METHODS", "PO ST"),
        ("FILE_METHODS", ","),
        ("FILE_PATH_PREFIXES", "v1/chat"),
        ("FILE_STATUSES", "abc"),
        ("FILE_STATUSES", "600"),
        ("FILE_STATUSES", "299-200"),
        ("FILE_STATUSES", "6xx"),
        ("FILE_STATUSES", "20x"),
        ("FILE_SAMPLE_RATE", "1.5"),
        ("FILE_SAMPLE_RATE", "-0.1"),
        ("FILE_SAMPLE_RATE", "nan"),
        ("FILE_SAMPLE_RATE", "30%"),
        ("SAMPLE_RATE", "half"),
    ],
)
def test_invalid_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        EventFilter.from_settings("file", settings(**{name: value}))
    assert f"DISPATCH_{name}" in str(info.value)


def test_sampling_is_deterministic_per_event_id() -> None:
    ids = [str(uuid.UUID(int=i * 7919 + 1)) for i in range(4000)]
    first = EventFilter.from_settings("file", settings(FILE_SAMPLE_RATE="0.25"))
    again = EventFilter.from_settings("file", settings(FILE_SAMPLE_RATE="0.25"))
    decisions = [first.decide(event(request_id=i)) for i in ids]
    assert decisions == [again.decide(event(request_id=i)) for i in ids]
    assert set(decisions) == {"deliver", "sampled"}
    kept = decisions.count("deliver") / len(ids)
    assert 0.21 < kept < 0.29


def test_sampling_is_nested_across_rates() -> None:
    # An event kept at 10% is also kept at 50%: raising the rate only adds events.
    ids = [f"req-{i}" for i in range(2000)]
    low = {i for i in ids if in_sample(i, 0.1)}
    high = {i for i in ids if in_sample(i, 0.5)}
    assert low and low < high


def test_sample_rate_edges() -> None:
    none = EventFilter.from_settings("file", settings(SAMPLE_RATE="0"))
    assert {none.decide(event(request_id=f"r{i}")) for i in range(50)} == {"sampled"}
    every = EventFilter.from_settings("file", settings(SAMPLE_RATE="1"))
    assert {every.decide(event(request_id=f"r{i}")) for i in range(50)} == {"deliver"}


def test_filtered_wins_over_sampled() -> None:
    f = EventFilter.from_settings("file", settings(SAMPLE_RATE="0"))
    assert f.decide(event("GET")) == "filtered"
