"""Candidate edits of a class phrasing: keyboard typos, swapped and deleted letters (character
level) and substitutions from the shipped medical synonym list (word level)."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mcaudit import InputError

LEVELS = ("char", "word")

# Neighbouring keys on a QWERTY keyboard: the typos a hurried typist makes.
KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def keyboard_neighbours() -> dict[str, str]:
    where = {ch: (r, c) for r, row in enumerate(KEYBOARD_ROWS) for c, ch in enumerate(row)}
    out = {}
    for ch, (r, c) in where.items():
        near = []
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                rr, cc = r + dr, c + dc
                if (dr or dc) and 0 <= rr < len(KEYBOARD_ROWS) and 0 <= cc < len(KEYBOARD_ROWS[rr]):
                    near.append(KEYBOARD_ROWS[rr][cc])
        out[ch] = "".join(near)
    return out


NEIGHBOURS = keyboard_neighbours()


def load_synonym_groups(path: str | Path | None = None) -> list[list[str]]:
    """The shipped synonym groups, plus those of ``path`` when given."""
    shipped = resources.files("mcaudit.plugins.checks") / "medical_synonyms.toml"
    groups = _read_groups(shipped.read_text(encoding="utf-8"), "medical_synonyms.toml")
    if path:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise InputError(f"prompt_robustness.synonyms: cannot read {p} ({exc.strerror or exc})") from exc
        groups += _read_groups(text, str(p))
    return groups


def readable_synonyms(path: str) -> None:
    """Param validation: a synonym file that cannot be read or parsed stops the run before the model loads."""
    if path:
        load_synonym_groups(path)


def _read_groups(text: str, source: str) -> list[list[str]]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"prompt_robustness.synonyms: {source} is not valid TOML ({exc})") from exc
    groups = data.get("groups")
    if not isinstance(groups, list) or not all(
        isinstance(g, list) and len(g) >= 2 and all(isinstance(t, str) and t.strip() for t in g) for g in groups
    ):
        raise InputError(f"prompt_robustness.synonyms: {source} needs groups = [[\"term\", \"synonym\", ...], ...]")
    return [[" ".join(t.lower().split()) for t in g] for g in groups]


def synonym_map(groups: list[list[str]]) -> dict[str, list[str]]:
    """term -> the other terms of every group it belongs to, in a stable order."""
    out: dict[str, dict[str, None]] = {}
    for group in groups:
        for term in group:
            alts = out.setdefault(term, {})
            for other in group:
                if other != term:
                    alts[other] = None
    return {t: list(a) for t, a in out.items()}


@dataclass(frozen=True)
class Edit:
    phrasing: int  # which of the class's phrasings is edited
    text: str  # the phrasing after the edit
    what: str  # for the report, e.g. "swap 'ac' -> 'ca'"


def char_edits(text: str, index: int) -> list[Edit]:
    """Every deletion, adjacent swap and keyboard typo of a letter."""
    out: list[Edit] = []
    for i, ch in enumerate(text):
        if not ch.isalpha():
            continue
        if len(text.strip()) > 1:
            out.append(Edit(index, text[:i] + text[i + 1 :], f"delete '{ch}'"))
        nxt = text[i + 1] if i + 1 < len(text) else ""
        if nxt.isalpha() and nxt.lower() != ch.lower():
            out.append(Edit(index, text[:i] + nxt + ch + text[i + 2 :], f"swap '{ch}{nxt}' -> '{nxt}{ch}'"))
        for typo in NEIGHBOURS.get(ch.lower(), ""):
            typo = typo.upper() if ch.isupper() else typo
            out.append(Edit(index, text[:i] + typo + text[i + 1 :], f"typo '{ch}' -> '{typo}'"))
    return out


def word_edits(text: str, index: int, synonyms: dict[str, list[str]]) -> list[Edit]:
    """Every replacement of a listed term (whole words, any case) by one of its synonyms."""
    out: list[Edit] = []
    lower = text.lower()
    for term, alternatives in synonyms.items():
        for match in re.finditer(r"(?<![\w-])" + re.escape(term) + r"(?![\w-])", lower):
            a, b = match.span()
            for alt in alternatives:
                out.append(Edit(index, text[:a] + alt + text[b:], f"'{text[a:b]}' -> '{alt}'"))
    return out
