"""The remote-sensing keyword vocabulary and matcher (tasks/keywords): SQL and Python agree,
whole words, false friends, odd captions, and precision on hand-labelled real web captions."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.keywords import (
    DEFAULT_VOCABULARY,
    Vocabulary,
    VocabularyError,
    compile_form,
    expand_form,
    load_vocabulary,
)

LABELS = Path(__file__).resolve().parent / "data" / "keyword_precision_labels.csv"
PRECISION_FLOOR = 0.95  # measured 79/81 = 0.975 on the labelled keeps (vocabulary 2026.11.29-1)
WEB_RECALL_FLOOR = 0.85  # measured 79/90 = 0.878 on the labelled web positives


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return load_vocabulary()


def sql_eval(vocab: Vocabulary, captions: list[str | None]) -> list[tuple[bool, list[str]]]:
    """(keep, keywords) for each caption through DuckDB, in input order."""
    table = pa.table(
        {"i": pa.array(range(len(captions)), pa.int64()), "c": pa.array(captions, pa.string())}
    )
    with duckdb.connect() as con:
        con.register("t", table)
        rows = con.execute(
            f"SELECT {vocab.sql_keep('c')}, {vocab.sql_matched('c')} FROM t ORDER BY i"
        ).fetchall()
    return [(keep, list(kw)) for keep, kw in rows]


def assert_agree(vocab: Vocabulary, captions: list[str | None]) -> list[list[str]]:
    python = [vocab.match(c) for c in captions]
    sql = sql_eval(vocab, captions)
    bad = [(c, s, p) for c, s, p in zip(captions, sql, python, strict=True) if s != (bool(p), p)]
    assert not bad, f"SQL and Python disagree on {len(bad)} captions, e.g. {bad[:3]}"
    return python


# ---------------------------------------------------------------------------------------------
# real captions


def _web_captions(fixtures: Path) -> list[tuple[str, str]]:
    meta = fixtures / "metadata"
    out = [
        ("test_10000.parquet", t)
        for t in pq.read_table(meta / "test_10000.parquet", columns=["TEXT"])["TEXT"].to_pylist()
    ]
    with open(meta / "Validation_GCC-1.1.0-Validation.tsv", encoding="utf-8") as fh:
        out.extend(
            ("Validation_GCC-1.1.0-Validation.tsv", line.rstrip("\n").split("\t")[0]) for line in fh
        )
    with open(meta / "coyo_readme_examples.csv", encoding="utf-8") as fh:
        out.extend(("coyo_readme_examples.csv", row["text"]) for row in csv.DictReader(fh))
    return out


def _rs_captions(fixtures: Path) -> dict[str, list[str]]:
    rs = fixtures / "rs_captions"
    rsitmd = (rs / "rsitmd_captions" / "test_caps.txt").read_text(encoding="utf-8").splitlines()
    rsicd = json.loads((rs / "rsicd_captions" / "rsicd_captions_test_coco.json").read_text())
    ucm = json.loads((rs / "ucm_sydney_captions" / "dataset_ucm_modified.json").read_text())
    return {
        "rsitmd": [c.strip() for c in rsitmd if c.strip()],
        "rsicd": [a["caption"] for a in rsicd["annotations"]],
        "ucm": [s["raw"] for img in ucm["images"] for s in img["sentences"]],
    }


def _labels() -> list[dict[str, str]]:
    with open(LABELS, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def test_labels_file_is_well_formed():
    rows = _labels()
    assert rows, LABELS
    assert set(rows[0]) == {"source_file", "caption", "label", "note"}
    assert {r["label"] for r in rows} <= {"yes", "no"}


def test_precision_on_labelled_real_captions(vocab, fixtures_dir):
    labels = {(r["source_file"], r["caption"]): r["label"] for r in _labels()}
    kept = {(s, c) for s, c in _web_captions(fixtures_dir) if vocab.match(c)}
    unlabelled = sorted(kept - labels.keys())
    assert not unlabelled, (
        f"captions kept by the vocabulary but not hand-labelled in {LABELS.name} "
        f"(label them after changing the vocabulary): {unlabelled[:5]}"
    )
    true_pos = sum(labels[k] == "yes" for k in kept)
    precision = true_pos / len(kept)
    assert len(kept) >= 60
    assert precision >= PRECISION_FLOOR, f"precision {precision:.3f} ({true_pos}/{len(kept)})"
    positives = [k for k, label in labels.items() if label == "yes"]
    recall = sum(k in kept for k in positives) / len(positives)
    assert recall >= WEB_RECALL_FLOOR, f"recall on labelled web positives {recall:.3f}"


def test_sql_and_python_agree_on_all_fixture_captions(vocab, fixtures_dir):
    captions = [c for _s, c in _web_captions(fixtures_dir)]
    for sentences in _rs_captions(fixtures_dir).values():
        captions.extend(sentences)
    python = assert_agree(vocab, captions)
    assert sum(bool(p) for p in python) >= 60


def test_rs_dataset_captions_rarely_name_the_view(vocab, fixtures_dir):
    """RS-dataset captions describe content ("many buildings near a viaduct"), not the
    sensor or the view: a keyword filter cannot find them (recall ~0 %, reported in the bench
    README). It is web alt-text that says "aerial view of ...", which is what this filters."""
    for name, sentences in _rs_captions(fixtures_dir).items():
        recall = sum(vocab.keeps(c) for c in sentences) / len(sentences)
        assert recall < 0.01, name


# ---------------------------------------------------------------------------------------------
# behaviour

POSITIVES = {
    "Aerial view of Paris at night": ["aerial"],
    "AERIAL DRONE FOOTAGE of the coast": ["aerial", "drone imagery"],
    "Los Angeles Aerials": ["aerial"],
    "bird's-eye view of the old town": ["bird's-eye view"],
    "Birds eye view of a harbour": ["bird's-eye view"],
    "birdseye view": ["bird's-eye view"],
    "Bird\u2019s Eye View of farms": ["bird's-eye view"],
    "Satellite image of the hurricane": ["satellite imagery"],
    "satellite imagery of Lagos": ["satellite imagery"],
    "Satellite photos show the flooded town": ["satellite imagery"],
    "NASA satellite view of the delta": ["satellite view"],
    "Landsat 8 scene over Iceland": ["landsat"],
    "LANDSAT-9": ["landsat"],
    "Copernicus Sentinel-2A true colour": ["sentinel-2"],
    "Sentinel 1 radar image": ["sentinel-1"],
    "WorldView-3 image \u00a9 Maxar Technologies": ["maxar", "worldview"],
    "QuickBird and IKONOS scenes": ["ikonos", "quickbird"],
    "Pleiades-1B acquisition": ["pleiades"],
    "SPOT-6 image of the port": ["spot"],
    "PlanetScope mosaic": ["planetscope"],
    "MODIS true color": ["modis"],
    "Gaofen-2 panchromatic": ["gaofen"],
    "orthophoto of the city centre": ["orthophoto"],
    "Ortho-mosaics from UAV imagery": ["orthophoto", "uav imagery"],
    "orthorectified scene": ["orthophoto"],
    "land-use map of Kenya": ["land use"],
    "Land cover classification": ["land cover"],
    "landcover": ["land cover"],
    "a remote sensing dataset": ["remote sensing"],
    "Earth observation for agriculture": ["earth observation"],
    "multispectral drone photo of crops": ["drone imagery", "multispectral"],
    "Google Earth view of the site": ["google earth"],
    "the city seen from space": ["from space"],
    "synthetic aperture radar": ["synthetic aperture radar"],
}

FALSE_FRIENDS = [
    "satellite dish on the roof of a house",
    "Satellite dishes on an apartment block",
    "Sky satellite TV box",
    "satellite radio receiver for the car",
    "satellite phone for expeditions",
    "satellite navigation system",
    "our satellite office in Leeds",
    "satellite campus of the university",
    "Toshiba Satellite L300D laptop battery",
    "Satellites: Orbits and Energy",
    "artist's concept of a satellite",
    "aerial yoga class",
    "Aerial silks performer at the circus",
    "aerial acrobatics show",
    "aerial dance workshop",
    "person , aerial acrobat - doing the break away from flying airplane .",
    "aerial lift at the ski resort",
    "fire engine with an aerial ladder",
    "aerial tramway to the summit",
    "aerial cable car",
    "orchid with aerial roots",
    "aerial plant in a glass globe",
    "TV aerial installation",
    "digital aerial cable 10m",
    "unmanned aerial vehicle in a hangar",
    "drone selfie at the beach",
    "flat lay of coffee and notebook",
    "top view of food on a wooden table",
    "aerial view of a table with breakfast",
    "overhead shot of a desk",
    "Elemental Fire Sentinel Being (Sentinel Series) Minecraft Skin",
    "Christian worldview lecture",
    "The Pleiades star cluster",
    "Birds Eye frozen peas",
    "bird's eye chili",
    "parking spot 5",
    "Raw Air photos from Vikersund",
    "DJI Mavic drone with 4K camera for aerial photography",
    "Aerial photography drone quadcopter with gimbal",
    "Introduction to Remote Sensing, Fifth Edition",
    "land use planning committee",
]


@pytest.mark.parametrize("caption", sorted(POSITIVES))
def test_positive_captions_match_with_their_keywords(vocab, caption):
    assert vocab.match(caption) == POSITIVES[caption]


@pytest.mark.parametrize("caption", FALSE_FRIENDS)
def test_false_friends_are_rejected(vocab, caption):
    assert vocab.match(caption) == []


def test_sql_agrees_on_the_hand_made_cases(vocab):
    assert_agree(vocab, [*POSITIVES, *FALSE_FRIENDS])
    assert [k for k, _ in sql_eval(vocab, FALSE_FRIENDS)] == [False] * len(FALSE_FRIENDS)


def test_whole_words_only(vocab):
    assert vocab.match("satellites") == []  # bare "satellite" is not a term (see the toml)
    assert vocab.match("satellite images") == ["satellite imagery"]
    assert vocab.match("aerials") == ["aerial"]
    assert vocab.match("aerialist on a trapeze") == []
    assert vocab.match("Landsatx") == []
    assert vocab.match("xLandsat") == []
    assert vocab.match("landsat_8") == []  # "_" is a word character
    assert vocab.match("(Landsat)") == ["landsat"]
    assert vocab.match("aerial.jpg") == ["aerial"]
    assert vocab.match("geoaerial") == []
    assert vocab.match("ortho-photo") == ["orthophoto"]
    assert vocab.match("Orthodontics") == []


def test_exclusion_only_removes_its_own_words(vocab):
    """The rule: exclusion phrases are cut out first; terms elsewhere still count."""
    assert vocab.match("aerial view of a satellite dish farm") == ["aerial"]
    assert vocab.match("aerial yoga studio, aerial photo of the building") == ["aerial"]
    assert vocab.match("satellite TV and satellite imagery") == ["satellite imagery"]
    assert vocab.match("aerial yoga") == []


def test_keywords_are_sorted_distinct_canonical_terms(vocab):
    caption = "Aerial photo, aerial view and LANDSAT-8 / Landsat 9 satellite map; land-use & LULC"
    expected = ["aerial", "land cover", "land use", "landsat", "satellite map"]
    assert vocab.match(caption) == expected
    assert sql_eval(vocab, [caption]) == [(True, expected)]


def test_null_empty_odd_and_non_ascii_captions(vocab):
    captions = [
        None,
        "",
        " ",
        "\n\t",
        "|",
        "vue a\u00e9rienne de Paris",  # accented: not an English term
        "\u7a7a\u62cd aerial view \u822a\u62cd",
        "A\u0301ERIAL",  # combining accent: not the word
        "\u212aOMPSAT-3",  # Kelvin sign: RE2 (?i) would fold it to k, our classes do not
        "\u017fatellite image",  # long s: likewise
        "aerial\u00a0view",
        "\U0001f6f0\ufe0f satellite image \U0001f30d",
        "'; DROP TABLE t; --",
        "aerial\x00view",
    ]
    results = assert_agree(vocab, captions)
    assert results[:6] == [[], [], [], [], [], []]
    assert results[6] == ["aerial"]
    assert results[8:10] == [[], []]
    assert results[11] == ["satellite imagery"]
    assert sql_eval(vocab, [None, ""]) == [(False, []), (False, [])]


def test_ten_megabyte_captions(vocab):
    filler = "the quick brown fox jumps over the lazy dog by a river bank " * 170_000
    big = filler[:10_000_000]
    hit = big + " Aerial view"
    rows = sql_eval(vocab, [big, hit, "x" * 10_000_000])
    assert rows == [(False, []), (True, ["aerial"]), (False, [])]
    assert vocab.match(big) == []  # the cheap token pre-check rejects it
    # Python's re over a 10 MB match takes seconds; 1 MB shows the same logic
    assert vocab.match(big[:1_000_000] + " Aerial view") == ["aerial"]


def test_sql_expressions_run_in_a_copy_over_parquet(vocab, tmp_path):
    src = tmp_path / "in.parquet"
    pq.write_table(
        pa.table({"TEXT": ["aerial view", None, "cat", "satellite dish"], "n": [1, 2, 3, 4]}), src
    )
    out = tmp_path / "out.parquet"
    with duckdb.connect() as con:
        con.execute(
            f"COPY (SELECT n, {vocab.sql_matched('TEXT')} AS keywords FROM read_parquet('{src}') "
            f"WHERE {vocab.sql_keep('TEXT')}) TO '{out}'"
        )
    table = pq.read_table(out)
    assert table.to_pylist() == [{"n": 1, "keywords": ["aerial"]}]
    assert table.schema.field("keywords").type == pa.list_(pa.string())


# ---------------------------------------------------------------------------------------------
# the vocabulary file


def test_bundled_vocabulary_loads(vocab):
    assert vocab.version
    assert load_vocabulary(str(DEFAULT_VOCABULARY)) == vocab
    assert len(vocab.digest) == 64
    assert {"aerial", "landsat", "sentinel-2", "remote sensing"} <= set(vocab.canonical_terms)
    assert any(g == "satellite" for g, _ in vocab.exclusions)


def test_digest_follows_content_not_formatting(tmp_path, vocab):
    text = DEFAULT_VOCABULARY.read_text(encoding="utf-8")
    same = tmp_path / "same.toml"
    same.write_text("# a new comment\n\n" + text, encoding="utf-8")
    assert load_vocabulary(same).digest == vocab.digest

    added = tmp_path / "added.toml"
    added.write_text(text.replace('"ikonos" = ["ikonos"]', '"ikonos" = ["ikonos", "ikonos #"]'))
    assert load_vocabulary(added).digest != vocab.digest

    bumped = tmp_path / "bumped.toml"
    bumped.write_text(text.replace(f'version = "{vocab.version}"', 'version = "other"'))
    assert load_vocabulary(bumped).version == "other"
    assert load_vocabulary(bumped).digest != vocab.digest


def test_bad_toml_error_names_the_file(tmp_path):
    bad = tmp_path / "broken_vocab.toml"
    bad.write_text('version = "1"\n[terms.view\naerial = ["aerial"]\n')
    with pytest.raises(VocabularyError, match=re.escape(str(bad))):
        load_vocabulary(bad)
    with pytest.raises(VocabularyError, match=r"missing_vocab\.toml"):
        load_vocabulary(tmp_path / "missing_vocab.toml")


@pytest.mark.parametrize(
    "body",
    [
        '[terms.view]\naerial = ["aerial"]\n',  # no version
        'version = "1"\n',  # no terms
        'version = "1"\n[terms.view]\naerial = ["aer(ial"]\n',  # unclosed group
        'version = "1"\n[terms.view]\naerial = ["aer*ial"]\n',  # not in the form syntax
        'version = "1"\n[terms.view]\naerial = [1]\n',
        'version = "1"\n[terms.a]\nx = ["aerial"]\n[terms.b]\ny = ["aerial"]\n',  # same spelling
        'version = "1"\n[terms.view]\naerial = ["aerial"]\n[exclusions]\nx = ["(oops"]\n',
    ],
)
def test_invalid_vocabulary_is_refused_naming_the_file(tmp_path, body):
    path = tmp_path / "my_vocab.toml"
    path.write_text(body)
    with pytest.raises(VocabularyError, match=re.escape(str(path))):
        load_vocabulary(path)


def test_custom_vocabulary_file(tmp_path):
    path = tmp_path / "v.toml"
    path.write_text('version = "t"\n[terms.x]\n"sea ice" = ["sea ice"]\n')
    vocab = load_vocabulary(str(path))
    assert vocab.match("Sea-ice extent") == ["sea ice"]
    assert vocab.exclusion_pattern is None
    assert_agree(vocab, ["sea ice", "seaice", "sea  ice", "sea ices", None])


def test_form_syntax():
    assert sorted(expand_form("satellite {image|photo}(s)")) == [
        "satellite image",
        "satellite images",
        "satellite photo",
        "satellite photos",
    ]
    assert len(expand_form("landsat #")) == 10
    assert "[aA]" in compile_form("aerial")
    assert compile_form("aerial", fold=False).startswith("aerial")
