"""What a credential looks like, and a cheap test for "could there be one here".

Helpers of ``redact``. Two kinds of regular expressions are built from the same rules:

* the *apply* pattern replaces credentials in decoded strings. It is one alternation,
  which Python's ``re`` runs slowly (every alternative is tried at every position), so it
  only runs where the detector found something;
* the *detector* answers "could the apply pattern or a sensitive key match anywhere in
  this text?". It must be a superset of them and cheap on the common answer "no". It runs
  on lower-cased text (serialized JSON included: every alternative avoids the characters
  JSON escapes) as a few passes, one per *anchor* character: each rule is written to
  start with its rarest character (``authorization`` becomes ``zation(?<=authorization)``), so
  each pass is a single-literal-prefix search, which ``re`` does at memchr speed. Measured
  on ~1.3 KB records: ~4 us for all seven default passes, where one alternation took ~90 us.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

REDACTED = "[REDACTED]"
DEFAULT_HEADERS = frozenset({
    "authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key",
    "x-auth-token", "x-goog-api-key",
})  # fmt: skip
DEFAULT_KEYS = frozenset({
    "api_key", "apikey", "api-key", "x-api-key", "authorization", "password", "passwd",
    "client_secret", "secret_key", "private_key", "access_token", "refresh_token",
})  # fmt: skip

# Credential shapes: OpenAI / Anthropic (sk-, sk-proj-, sk-ant-), JWTs, AWS access key
# ids, Google API keys, GitHub and Slack tokens.
_TOKENS = (
    r"(?<![A-Za-z0-9_-])sk-[A-Za-z0-9_-]{16,}",
    r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*",
    r"(?<![A-Za-z0-9])AKIA[0-9A-Z]{16}(?![A-Za-z0-9])",
    r"AIza[0-9A-Za-z_-]{35}",
    r"gh[pousr]_[A-Za-z0-9]{36,}",
    r"github_pat_[A-Za-z0-9_]{22,}",
    r"xox[abprs]-[A-Za-z0-9-]{10,}",
)
# The detector's (anchor, rest) for each token above and for "bearer", on lower-cased text.
# Each rest starts with a literal where it can: ``re`` skips such an alternative after one
# character comparison, so an anchor character that is common (the "k" of "tokens") stays
# cheap; the lookbehind that confirms the whole word runs only after the rest matched.
_TOKEN_ANCHORS = (
    ("k", r"-(?<=sk-)[a-z0-9_-]{16}"),
    ("j", r"(?<=eyj)"),
    ("k", r"ia(?<=akia)[0-9a-z]{16}"),
    ("z", r"a(?<=aiza)"),
    ("_", r"(?<=gh[pousr]_)"),
    ("b", r"_pat_(?<=github_pat_)"),
    ("x", r"ox[abprs]-"),
    ("b", r"earer"),
)
# Characters from rarest to most common in English text and in JSON records.
_RARITY = "jqzxwkvbyfgpmucldhrsniaote0123456789-._"

# "Bearer <token>": the token must have a digit, so prose ("bearer instruments") survives.
_BEARER = r"(?P<keep_bearer>\b(?i:bearer)\s+)(?=[A-Za-z0-9._~+/-]*[0-9])[A-Za-z0-9._~+/-]{16,}=*"
# "<name>: <value>", "<name>=<value>", JSON '"<name>":"<value>"' and '"<Name>":["<value>"'.
_ASSIGN = (
    r"(?P<keep_assign>(?<![A-Za-z0-9_-])(?i:{names})[\"']?\s*[:=]\s*\[?\s*[\"']?)"
    r"(?:(?i:bearer|basic|token|digest)\s+)?[^\s\"'\\,;\[\]{{}}]+"
)
# Cookies: the whole rest of the line (``a=1; b=2``), not just the first pair.
_COOKIE = (
    r"(?P<keep_cookie>(?<![A-Za-z0-9_-])(?i:set-cookie|cookie)[\"']?\s*[:=]\s*\[?\s*[\"']?)"
    r"[^\r\n\"'\\\]]+"
)
_KEEP_GROUPS = ("keep_cookie", "keep_assign", "keep_bearer")
# The shortest text a token rule can match (``xox?-`` and ten characters).
_SHORTEST_TOKEN = 15


def shortest_match(names: Iterable[str]) -> int:
    """The length of the shortest text ``apply_pattern(names)`` can match (``name=v``)."""
    return min(_SHORTEST_TOKEN, *(len(name) + 2 for name in names))


def apply_pattern(names: Iterable[str]) -> re.Pattern[str]:
    """The pattern that finds credentials and ``<name>: <value>`` assignments.

    ASCII mode, so that case-insensitive matching is exactly what the lower-casing
    detector sees.
    """
    alternation = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    rules = [_COOKIE, _ASSIGN.format(names=alternation), _BEARER, *_TOKENS]
    return re.compile("|".join(f"(?:{rule})" for rule in rules), re.ASCII)


def replacement(match: re.Match[str]) -> str:
    """``[REDACTED]``, after the part of the match that only names the secret."""
    for name in _KEEP_GROUPS:
        prefix = match.group(name)
        if prefix is not None:
            return prefix + REDACTED
    return REDACTED


class Detector:
    """Cheap superset test of ``apply_pattern(names)`` and of the names as JSON keys."""

    def __init__(self, names: Iterable[str]) -> None:
        rules: dict[str, list[str]] = {}
        for anchor, rest in _TOKEN_ANCHORS:
            rules.setdefault(anchor, []).append(rest)
        for name in sorted({n.lower() for n in names}):
            anchor, rest = _anchored(name, rules)
            rules.setdefault(anchor, []).append(rest)
        sources = [
            re.escape(anchor) + (f"(?:{'|'.join(rest)})" if len(rest) > 1 else rest[0])
            for anchor, rest in rules.items()
        ]
        self._bytes = tuple(re.compile(source.encode("ascii")) for source in sources)
        self._text = tuple(re.compile(source) for source in sources)

    def in_bytes(self, data: bytes) -> bool:
        """Whether ``data`` (UTF-8, e.g. serialized JSON) may hold a credential."""
        lowered = data.lower()
        for pattern in self._bytes:  # noqa: SIM110 - a plain loop beats any() + generator
            if pattern.search(lowered) is not None:
                return True
        return False

    def in_text(self, text: str) -> bool:
        """Whether ``text`` may hold a credential."""
        lowered = text.lower()
        for pattern in self._text:  # noqa: SIM110 - a plain loop beats any() + generator
            if pattern.search(lowered) is not None:
                return True
        return False


def _anchored(name: str, rules: dict[str, list[str]]) -> tuple[str, str]:
    """``name`` as (anchor character, rest of the rule), reusing an existing pass if it can.

    ``authorization`` becomes ``("z", "ation(?<=authorization)")``.
    """

    def cost(index: int) -> tuple[int, int]:
        char = name[index]
        rank = _RARITY.find(char)
        return (0 if char in rules else 1, rank if rank >= 0 else len(_RARITY))

    index = min(range(len(name)), key=cost)
    behind = f"(?<={re.escape(name)})" if index > 0 else ""
    return name[index], re.escape(name[index + 1 :]) + behind
