"""Baselines the task evaluations print beside the model's figures."""

from __future__ import annotations


def lead3(article: str) -> str:
    import nltk

    try:
        sentences = nltk.sent_tokenize(article)
    except LookupError:  # no punkt data offline: a plain split on sentence ends
        import re

        sentences = re.split(r"(?<=[.!?])\s+", article)
    return " ".join(sentences[:3])
