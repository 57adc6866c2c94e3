"""Istio's string matching for principals and namespaces: exact, `abc*`, `*abc`, and `*`."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from agent.model.fields import FieldPath, fail


class MatchKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    PRESENCE = "presence"


@dataclass(frozen=True)
class StringMatch:
    kind: MatchKind
    value: str  # the fixed part (without the `*`); empty for PRESENCE

    @classmethod
    def parse(cls, text: str, path: FieldPath = ()) -> StringMatch:
        if not text:
            fail(path, "must not be empty")
        if text == "*":
            return cls(MatchKind.PRESENCE, "")
        inner = text[1:-1] if len(text) > 1 else text
        if "*" in inner or (text.startswith("*") and text.endswith("*")):
            fail(path, f"{text!r}: '*' is allowed only alone, as a prefix ('*abc') or as a "
                       "suffix ('abc*')")
        if text.endswith("*"):
            return cls(MatchKind.PREFIX, text[:-1])
        if text.startswith("*"):
            return cls(MatchKind.SUFFIX, text[1:])
        return cls(MatchKind.EXACT, text)

    def matches(self, value: str | None) -> bool:
        """Match an attribute; None (e.g. no peer identity) and "" match nothing."""
        if not value:
            return False
        if self.kind is MatchKind.EXACT:
            return value == self.value
        if self.kind is MatchKind.PREFIX:
            return value.startswith(self.value)
        if self.kind is MatchKind.SUFFIX:
            return value.endswith(self.value)
        return True

    def __str__(self) -> str:
        if self.kind is MatchKind.PREFIX:
            return f"{self.value}*"
        if self.kind is MatchKind.SUFFIX:
            return f"*{self.value}"
        return "*" if self.kind is MatchKind.PRESENCE else self.value
