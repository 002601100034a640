"""The remote-sensing keyword vocabulary and its matcher, in DuckDB SQL and in Python.

The vocabulary is a versioned TOML file (``rs_vocabulary.toml`` next to this module) of
canonical *terms*, each with a few *forms*, and of *exclusion* phrases (false friends such as
"satellite dish" or "aerial yoga"). The form syntax is documented at the top of that file.

Matching rule (identical in :meth:`Vocabulary.sql_keep`, :meth:`Vocabulary.sql_matched` and
:meth:`Vocabulary.match`):

1. A null or empty caption matches nothing.
2. Every exclusion phrase found in the caption (whole words, case-insensitive, leftmost and
   non-overlapping) is replaced by ``|``; what is left is searched for term forms.
   So "satellite dish on the roof" is dropped, while "aerial view of a satellite dish farm"
   is kept (its "aerial" lies outside the exclusion).
3. A caption is kept when at least one term form occurs in it as a whole word (ASCII word
   boundaries: the neighbours of a match are not ``[0-9A-Za-z_]``), case-insensitively.
   "Aerials" and "LANDSAT-8" match; "aerialist" and "landsatx" do not.
4. Its keywords are the sorted, distinct canonical terms of all non-overlapping matches,
   scanning left to right and, at each position, preferring longer forms.

Case-insensitivity is compiled into explicit ``[aA]`` classes rather than a flag, so that
RE2 (DuckDB) and Python's ``re`` accept exactly the same strings (RE2's ``(?i)`` also folds
e.g. the Kelvin sign into "k"; Python's ASCII mode does not).

Speed: the SQL first runs the term pattern alone on the raw caption (one RE2 DFA pass, no
allocation). Only captions that pass it (about 1 % of web alt-text) pay for the exclusion
rewrite and the keyword extraction, inside ``CASE WHEN`` so DuckDB evaluates them lazily.
The pre-check is exact, not a heuristic: removing an exclusion (which starts and ends on a
word character at a word boundary) can never create a term match that was not in the raw text.
The pre-check (an RE2 DFA pass, ~3.5 ns per caption byte here) is the filter's main cost.

When ``sql_matched`` runs right after a ``WHERE sql_keep`` pushed into a parquet scan, each
vector holds only the ~1 % of rows that passed, and per-vector costs of the keyword lambda
dominate; compacting the hits first (``... WHERE keep ORDER BY file_row_number`` in a
subquery, which also fixes the output order) makes the keywords ~3x cheaper. See
``bench/keyword_filter.py`` and ``bench/README_keyword.md``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import tomllib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

__all__ = [
    "DEFAULT_VOCABULARY",
    "Vocabulary",
    "VocabularyError",
    "compile_form",
    "expand_form",
    "load_vocabulary",
]

DEFAULT_VOCABULARY = Path(__file__).resolve().parent / "rs_vocabulary.toml"

# A space in a form: any run of these (or none). A hyphen: one optional hyphen.
_SEP_CLASS = "[ \\t\\n\\r\\f\\v\u00a0\u2010\u2011\u2012\u2013\u2014-]"
_HYPHEN_CLASS = "[\u2010\u2011\u2012\u2013\u2014-]"
_APOS_CLASS = "['\u2019\u2018`\u00b4]"
_ALLOWED = re.compile(r"[a-z0-9 #'\-(){}|]+")


class VocabularyError(ValueError):
    """The vocabulary file is missing, is not valid TOML, or has an invalid entry."""


# ---------------------------------------------------------------------------------------------
# Form syntax: a tiny pattern language, compiled to a regex accepted identically by RE2 and re.


def _parse(form: str) -> list:
    """Parse a form into nodes: ("lit", ch) | ("opt", seq) | ("alt", [seq, ...])."""
    pos = 0

    def seq(stops: str) -> list:
        nonlocal pos
        out: list = []
        while pos < len(form) and form[pos] not in stops:
            ch = form[pos]
            pos += 1
            if ch == "(":
                inner = seq(")")
                if pos >= len(form):
                    raise ValueError("unclosed '('")
                pos += 1
                out.append(("opt", inner))
            elif ch == "{":
                options = [seq("|}")]
                while pos < len(form) and form[pos] == "|":
                    pos += 1
                    options.append(seq("|}"))
                if pos >= len(form):
                    raise ValueError("unclosed '{'")
                pos += 1
                out.append(("alt", options))
            elif ch in ")}|":
                raise ValueError(f"unexpected {ch!r}")
            else:
                out.append(("lit", ch))
        return out

    nodes = seq("")
    if pos != len(form):
        raise ValueError(f"unexpected {form[pos]!r}")
    return nodes


def _check_form(form: str) -> str:
    if not isinstance(form, str) or not form.strip():
        raise ValueError("a form must be a non-empty string")
    form = " ".join(form.lower().split())
    if not _ALLOWED.fullmatch(form):
        bad = sorted(set(re.sub(r"[a-z0-9 #'\-(){}|]", "", form)))
        raise ValueError(f"characters not allowed in a form: {bad}")
    if not re.match(r"[a-z0-9#{]", form) or not re.search(r"[a-z0-9#)}]$", form):
        raise ValueError("a form must start and end with a letter or digit")
    return form


def _regex(nodes: list, fold: bool = True) -> str:
    out = []
    for kind, value in nodes:
        if kind == "opt":
            out.append(f"(?:{_regex(value, fold)})?")
        elif kind == "alt":
            out.append("(?:" + "|".join(_regex(v, fold) for v in value) + ")")
        elif value == " ":
            out.append(f"{_SEP_CLASS}*")
        elif value == "-":
            out.append(f"{_HYPHEN_CLASS}?")
        elif value == "'":
            out.append(f"{_APOS_CLASS}?")
        elif value == "#":
            out.append("[0-9]")
        elif value.isalpha() and fold:
            out.append(f"[{value}{value.upper()}]")
        else:
            out.append(value)
    return "".join(out)


def _expand(nodes: list) -> list[str]:
    parts: list[list[str]] = []
    for kind, value in nodes:
        if kind == "opt":
            parts.append(["", *_expand(value)])
        elif kind == "alt":
            parts.append([s for v in value for s in _expand(v)])
        elif value == "#":
            parts.append(list("0123456789"))
        else:
            parts.append([value])
    return ["".join(p) for p in itertools.product(*parts)]


def compile_form(form: str, *, fold: bool = True) -> str:
    """The regex (RE2 and Python ``re`` syntax, no boundaries) of one vocabulary form.

    ``fold=True``: letters become ``[xX]`` classes (case-insensitive); ``fold=False``: plain
    lower-case letters, for text whose ASCII letters were lower-cased first (same matches).
    """
    return _regex(_parse(_check_form(form)), fold)


def expand_form(form: str) -> list[str]:
    """Every concrete spelling a form stands for, in its plain written variant."""
    return _expand(_parse(_check_form(form)))


_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def _ascii_lower(text: str) -> str:
    """Lower-case ASCII letters only (length- and position-preserving, unlike str.lower)."""
    return text.lower() if text.isascii() else text.translate(_ASCII_LOWER)


def _normalize(text: str) -> str:
    """The lookup key of a matched span: lower-case ASCII letters and digits only."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


# ---------------------------------------------------------------------------------------------


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@dataclass(frozen=True)
class Vocabulary:
    """Canonical terms with their forms, and exclusion phrases.

    ``terms`` holds ``(group, canonical, (form, ...))`` triples; ``exclusions`` holds
    ``(group, form)`` pairs. Build it with :func:`load_vocabulary`.
    """

    version: str
    terms: tuple[tuple[str, str, tuple[str, ...]], ...]
    exclusions: tuple[tuple[str, str], ...]
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.terms:
            raise ValueError("the vocabulary has no terms")
        seen: dict[str, str] = {}
        for _group, canonical, forms in self.terms:
            if not canonical or any(ch in canonical for ch in "|=\n"):
                raise ValueError(
                    f"term {canonical!r}: a canonical term is a non-empty name without | or ="
                )
            if not forms:
                raise ValueError(f"term {canonical!r} has no forms")
            for form in forms:
                try:
                    spellings = expand_form(form)
                except ValueError as exc:
                    raise ValueError(f"term {canonical!r}, form {form!r}: {exc}") from None
                for spelling in spellings:
                    key = _normalize(spelling)
                    if seen.setdefault(key, canonical) != canonical:
                        raise ValueError(
                            f"form {form!r} of {canonical!r} also spells {seen[key]!r} ({key})"
                        )
        for _group, form in self.exclusions:
            try:
                compile_form(form)
            except ValueError as exc:
                raise ValueError(f"exclusion {form!r}: {exc}") from None

    # -- identity ---------------------------------------------------------------------------

    @property
    def canonical_terms(self) -> tuple[str, ...]:
        return tuple(canonical for _g, canonical, _f in self.terms)

    @cached_property
    def digest(self) -> str:
        """sha256 of the canonical content (version, terms, exclusions): formatting, comments
        and key order in the file do not change it; any word does."""
        content = {
            "version": self.version,
            "terms": sorted([g, c, sorted(f)] for g, c, f in self.terms),
            "exclusions": sorted([g, f] for g, f in self.exclusions),
        }
        blob = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    # -- compiled patterns ------------------------------------------------------------------

    def _term_alternation(self, fold: bool) -> str:
        forms = {f for _g, _c, fs in self.terms for f in fs}
        ordered = sorted(forms, key=lambda f: (-max(len(s) for s in expand_form(f)), f))
        return r"\b(?:" + "|".join(compile_form(f, fold=fold) for f in ordered) + r")\b"

    def _exclusion_alternation(self, fold: bool) -> str | None:
        forms = sorted({f for _g, f in self.exclusions}, key=lambda f: (-len(f), f))
        if not forms:
            return None
        return r"\b(?:" + "|".join(compile_form(f, fold=fold) for f in forms) + r")\b"

    @cached_property
    def term_pattern(self) -> str:
        """One whole-word alternation of every term form, longer forms first (the regex the
        SQL uses; case-insensitive through ``[xX]`` classes)."""
        return self._term_alternation(fold=True)

    @cached_property
    def exclusion_pattern(self) -> str | None:
        return self._exclusion_alternation(fold=True)

    @cached_property
    def _lookup(self) -> dict[str, str]:
        return {
            _normalize(s): canonical
            for _g, canonical, forms in self.terms
            for f in forms
            for s in expand_form(f)
        }

    @cached_property
    def _tokens(self) -> tuple[str, ...]:
        """Lower-case substrings, one of which every term match contains: the longest word of
        each spelling, minus those containing another (a cheap exact pre-check for Python)."""
        longest = {
            max(re.split(r"[^a-z0-9]+", s), key=len)
            for _g, _c, forms in self.terms
            for f in forms
            for s in expand_form(f)
        }
        return tuple(sorted(t for t in longest if not any(o != t and o in t for o in longest)))

    @cached_property
    def _term_re(self) -> re.Pattern[str]:
        return re.compile(self._term_alternation(fold=False), re.ASCII)

    @cached_property
    def _exclusion_re(self) -> re.Pattern[str] | None:
        pattern = self._exclusion_alternation(fold=False)
        return None if pattern is None else re.compile(pattern, re.ASCII)

    # -- Python -----------------------------------------------------------------------------

    def match(self, caption: str | None) -> list[str]:
        """The canonical terms ``caption`` matches (sorted, distinct); [] when it is dropped.

        Same result as the SQL, computed on the ASCII-lower-cased caption with lower-case
        patterns (Python's ``re`` is ~5x faster on literals than on ``[xX]`` classes).
        """
        if not caption:
            return []
        text = _ascii_lower(caption)
        if not any(token in text for token in self._tokens):
            return []
        if self._exclusion_re is not None:
            text = self._exclusion_re.sub("|", text)
        return sorted({self._lookup[_normalize(m.group(0))] for m in self._term_re.finditer(text)})

    def keeps(self, caption: str | None) -> bool:
        return bool(self.match(caption))

    # -- SQL (DuckDB) -----------------------------------------------------------------------

    def _sql_stripped(self, col: str) -> str:
        if self.exclusion_pattern is None:
            return f"({col})"
        return f"regexp_replace({col}, {_sql_str(self.exclusion_pattern)}, '|', 'g')"

    def sql_prefilter(self, col: str) -> str:
        """A cheap necessary condition: the term pattern on the raw caption (NULL for NULL)."""
        return f"regexp_matches({col}, {_sql_str(self.term_pattern)})"

    def sql_keep(self, col: str) -> str:
        """A DuckDB boolean expression over the caption expression ``col``: true when the
        caption is kept (never NULL; false for NULL and empty captions)."""
        exact = f"regexp_matches({self._sql_stripped(col)}, {_sql_str(self.term_pattern)})"
        return f"(CASE WHEN {self.sql_prefilter(col)} THEN {exact} ELSE false END)"

    def sql_matched(self, col: str) -> str:
        """A DuckDB ``VARCHAR[]`` expression: the sorted distinct canonical terms matched
        (an empty list for dropped, NULL or empty captions)."""
        # Span -> canonical term through one constant string "|key=canonical|...|" searched
        # with instr() (a MAP literal inside the lambda costs ~4x more). Keys are in vocabulary
        # order, so the common "aerial" is found at once.
        table = _sql_str("|" + "".join(f"{k}={c}|" for k, c in self._lookup.items()))
        spans = f"regexp_extract_all({self._sql_stripped(col)}, {_sql_str(self.term_pattern)})"
        norm = "regexp_replace(lower(kw_s), '[^a-z0-9]', '', 'g')"
        keys = f"list_transform({spans}, lambda kw_s: {norm})"
        width = max(len(c) for c in self.canonical_terms) + 1
        canonical = (
            f"split_part(substr({table}, instr({table}, '|' || kw_k || '=') + length(kw_k) + 2, "
            f"{width}), '|', 1)"
        )
        found = f"list_sort(list_distinct(list_transform({keys}, lambda kw_k: {canonical})))"
        return f"(CASE WHEN {self.sql_prefilter(col)} THEN {found} ELSE []::VARCHAR[] END)"


def _read_toml(path: Path) -> dict:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise VocabularyError(f"vocabulary file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise VocabularyError(f"invalid TOML in vocabulary file {path}: {exc}") from None


def load_vocabulary(path: str | Path | None = None) -> Vocabulary:
    """Load a vocabulary TOML file (default: the bundled ``rs_vocabulary.toml``).

    Raises :class:`VocabularyError` naming the file when it is missing, not TOML, or invalid.
    """
    file = Path(path) if path is not None else DEFAULT_VOCABULARY
    data = _read_toml(file)
    try:
        version = data["version"]
        if not isinstance(version, str) or not version:
            raise ValueError("'version' must be a non-empty string")
        groups = data.get("terms")
        if not isinstance(groups, dict) or not groups:
            raise ValueError("no [terms.<group>] tables")
        terms: list[tuple[str, str, tuple[str, ...]]] = []
        for group, entries in groups.items():
            if not isinstance(entries, dict):
                raise ValueError(f"[terms.{group}] must be a table of term = [forms]")
            for canonical, forms in entries.items():
                if isinstance(forms, str):
                    forms = [forms]
                if not isinstance(forms, list) or not all(isinstance(f, str) for f in forms):
                    raise ValueError(f"term {canonical!r}: forms must be a list of strings")
                terms.append((group, canonical, tuple(forms)))
        exclusions: list[tuple[str, str]] = []
        excl = data.get("exclusions", {})
        if not isinstance(excl, dict):
            raise ValueError("[exclusions] must be a table of group = [phrases]")
        for group, forms in excl.items():
            if isinstance(forms, str):
                forms = [forms]
            if not isinstance(forms, list) or not all(isinstance(f, str) for f in forms):
                raise ValueError(f"exclusions {group!r}: must be a list of strings")
            exclusions.extend((group, f) for f in forms)
        return Vocabulary(version, tuple(terms), tuple(exclusions), source=str(file))
    except (KeyError, ValueError) as exc:
        message = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        raise VocabularyError(f"invalid vocabulary file {file}: {message}") from None
