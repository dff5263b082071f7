"""Finding the nltk data CHAIR and AMBER need, with an error that says how to get it."""
from __future__ import annotations

# (resource as nltk.data.find spells it, name for nltk.download)
CHAIR_RESOURCES = (
    ("tokenizers/punkt_tab/english/", "punkt_tab"),
    ("taggers/averaged_perceptron_tagger_eng/", "averaged_perceptron_tagger_eng"),
    ("corpora/wordnet", "wordnet"),
)


class MissingNLTKDataError(LookupError):
    """An nltk resource (tokenizer, tagger, WordNet) is not installed."""


def require_nltk_data(resources=CHAIR_RESOURCES, who: str = "CHAIR") -> None:
    """Raise MissingNLTKDataError naming the first missing resource and how to install it.

    nltk's own LookupError appears only at the first tokenised caption, deep in a loop and with
    a generic text; checking up front names the resource and the command.
    """
    import nltk

    for path, name in resources:
        try:
            nltk.data.find(path)
        except LookupError:
            raise MissingNLTKDataError(
                f"{who} needs the nltk resource {name!r} ({path}), which nltk cannot find in "
                f"{list(nltk.data.path)}. Install it with:\n"
                f"    python -m nltk.downloader {name}\n"
                f"or in Python: import nltk; nltk.download({name!r})\n"
                f"or point the NLTK_DATA environment variable at a folder that holds it."
            ) from None
