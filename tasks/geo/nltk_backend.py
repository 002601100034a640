"""The RS5M paper's geo-tagger: NLTK ``ne_chunk(pos_tag(word_tokenize(caption)))``, GPE only.

NLTK's models are data files that ``nltk.download`` fetches; none can be downloaded on the
build machines, so the backend checks for them first and fails with a clear message that
names ``rs5m setup-nltk`` (which runs :func:`setup_nltk` where a network is available).
"""

from __future__ import annotations

import functools

# (nltk.download name, nltk.data.find path)
NLTK_RESOURCES = (
    ("punkt_tab", "tokenizers/punkt_tab/english/"),
    ("averaged_perceptron_tagger_eng", "taggers/averaged_perceptron_tagger_eng/"),
    ("maxent_ne_chunker_tab", "chunkers/maxent_ne_chunker_tab/english_ace_multiclass/"),
    ("words", "corpora/words"),
)


class NltkModelsMissing(RuntimeError):
    """NLTK's tokenizer, tagger, chunker or word list is not installed."""


def missing_nltk_models() -> list[str]:
    """The NLTK resources (download names) that are not installed."""
    import nltk

    missing = []
    for name, path in NLTK_RESOURCES:
        try:
            nltk.data.find(path)
        except LookupError:
            missing.append(name)
    return missing


def nltk_models_available() -> bool:
    """True when every model the ``nltk`` backend needs is installed."""
    return not missing_nltk_models()


def require_nltk_models() -> None:
    missing = missing_nltk_models()
    if missing:
        raise NltkModelsMissing(
            "the nltk geotag backend needs NLTK data that is not installed: "
            + ", ".join(missing)
            + ". Run `rs5m setup-nltk` where a network is available (or set NLTK_DATA to a "
            "folder that holds them), or use the offline default backend: geotag.backend = "
            '"gazetteer".'
        )


def setup_nltk(download_dir: str | None = None) -> None:
    """Download the NLTK models the ``nltk`` backend needs (``rs5m setup-nltk``)."""
    import nltk

    failed = [
        name
        for name, _ in NLTK_RESOURCES
        if not nltk.download(name, download_dir=download_dir, quiet=True, raise_on_error=False)
    ]
    _chunker.cache_clear()
    if failed:
        raise NltkModelsMissing(f"nltk.download failed for: {', '.join(failed)} (no network?)")


@functools.lru_cache(maxsize=1)
def _chunker():
    from nltk.chunk import ne_chunker

    return ne_chunker()  # loading the maxent model once, not once per caption as ne_chunk does


def gpe_mentions(caption: str) -> list[str]:
    """The GPE entities NLTK finds in a caption, in order."""
    from nltk import pos_tag, word_tokenize

    require_nltk_models()
    tree = _chunker().parse(pos_tag(word_tokenize(caption)))
    out = []
    for node in tree:
        if hasattr(node, "label") and node.label() == "GPE":
            out.append(" ".join(word for word, _tag in node.leaves()))
    return out
