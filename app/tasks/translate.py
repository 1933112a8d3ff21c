"""Translation by prompting. Chat models: an instruction in their chat template. Base models (GPT-2
style): a few-shot "English: ... / French: ..." pattern, as in the GPT-2 paper.

Each family has a few candidate prompts (TEMPLATES); the one served (CHOSEN) was chosen by 5-fold
cross-validation of chrF on NTREX dev (python -m app.eval.choose --task translate; docs/tasks.md):
gemma-3-270m (base) chrF 31.7 en->fr / 28.5 en->de cross-validated, above copying the source (24.5 / 24.0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from app.tasks.family import Family, base_prompt_ids, chat_prompt_ids

LANGUAGES = {
    "en": "English", "fr": "French", "de": "German", "es": "Spanish", "it": "Italian", "pt": "Portuguese",
    "nl": "Dutch", "pl": "Polish", "ru": "Russian", "uk": "Ukrainian", "cs": "Czech", "sv": "Swedish",
    "da": "Danish", "fi": "Finnish", "ro": "Romanian", "tr": "Turkish", "el": "Greek", "zh": "Chinese",
    "ja": "Japanese", "ko": "Korean", "ar": "Arabic", "hi": "Hindi",
}  # fmt: skip
_BY_NAME = {name.lower(): code for code, name in LANGUAGES.items()}

# Demonstrations, written for this module (not taken from any evaluation set), for the languages that
# have them; other pairs get the zero-shot pattern. Everyday sentences, and news-style ones (the kind of
# text people translate with a server).
EVERYDAY = {
    "en": ["The weather is nice today.", "Where is the train station?", "I have lived here for ten years."],
    "fr": ["Il fait beau aujourd'hui.", "Où est la gare ?", "J'habite ici depuis dix ans."],
    "de": ["Das Wetter ist heute schön.", "Wo ist der Bahnhof?", "Ich wohne seit zehn Jahren hier."],
    "es": ["Hoy hace buen tiempo.", "¿Dónde está la estación de tren?", "Vivo aquí desde hace diez años."],
    "it": ["Oggi il tempo è bello.", "Dov'è la stazione?", "Vivo qui da dieci anni."],
}
NEWS = {
    "en": ["The government announced on Tuesday that it would raise the minimum wage next year.",
           "Police said the two men were arrested after a short chase.",
           "The company expects its sales to grow by five percent this year."],
    "fr": ["Le gouvernement a annoncé mardi qu'il augmenterait le salaire minimum l'année prochaine.",
           "La police a déclaré que les deux hommes avaient été arrêtés après une brève poursuite.",
           "L'entreprise s'attend à ce que ses ventes augmentent de cinq pour cent cette année."],
    "de": ["Die Regierung kündigte am Dienstag an, den Mindestlohn im nächsten Jahr zu erhöhen.",
           "Die Polizei teilte mit, dass die beiden Männer nach einer kurzen Verfolgungsjagd festgenommen wurden.",
           "Das Unternehmen erwartet, dass sein Umsatz in diesem Jahr um fünf Prozent wächst."],
    "es": ["El gobierno anunció el martes que subiría el salario mínimo el próximo año.",
           "La policía dijo que los dos hombres fueron detenidos tras una breve persecución.",
           "La empresa espera que sus ventas crezcan un cinco por ciento este año."],
    "it": ["Il governo ha annunciato martedì che aumenterà il salario minimo l'anno prossimo.",
           "La polizia ha detto che i due uomini sono stati arrestati dopo un breve inseguimento.",
           "L'azienda prevede che le sue vendite cresceranno del cinque per cento quest'anno."],
}  # fmt: skip


def resolve(language: str) -> str | None:
    """ISO 639-1 code or English name -> code; None if unsupported."""
    key = language.strip().lower()
    if key in LANGUAGES:
        return key
    return _BY_NAME.get(key)


def supported() -> str:
    return ", ".join(f"{code} ({name})" for code, name in LANGUAGES.items())


def _pairs(source: str, target: str, *sets: dict[str, list[str]]) -> list[tuple[str, str]]:
    return [pair for demos in sets if source in demos and target in demos
            for pair in zip(demos[source], demos[target], strict=True)]  # fmt: skip


def _pattern(text: str, source: str, target: str, pairs: list[tuple[str, str]]) -> str:
    src, tgt = LANGUAGES[source], LANGUAGES[target]
    shots = "".join(f"{src}: {a}\n{tgt}: {b}\n\n" for a, b in pairs)
    return f"{shots}{src}: {text}\n{tgt}:"


def _instruction(source: str, target: str) -> str:
    src, tgt = LANGUAGES[source], LANGUAGES[target]
    return f"Translate this {src} text into {tgt}. Reply with the {tgt} translation only.\n\n"


Render = Callable[[Any, str, str, str], list[int]]  # (tokenizer, text, source, target) -> prompt ids

TEMPLATES: dict[Family, dict[str, Render]] = {
    "base": {
        "everyday-3": lambda tok, t, s, g: base_prompt_ids(tok, _pattern(t, s, g, _pairs(s, g, EVERYDAY))),
        "news-3": lambda tok, t, s, g: base_prompt_ids(tok, _pattern(t, s, g, _pairs(s, g, NEWS))),
        "everyday-news-6": lambda tok, t, s, g: base_prompt_ids(tok, _pattern(t, s, g, _pairs(s, g, EVERYDAY, NEWS))),
    },
    "chat": {
        "instruction": lambda tok, t, s, g: chat_prompt_ids(tok, _instruction(s, g) + t),
        "instruction-short": lambda tok, t, s, g: chat_prompt_ids(tok, f"Translate to {LANGUAGES[g]}:\n{t}"),
        # the demonstrations as earlier turns of the conversation
        "instruction-news-turns": lambda tok, t, s, g: chat_prompt_ids(
            tok, _instruction(s, g) + t, [(_instruction(s, g) + a, b) for a, b in _pairs(s, g, NEWS)]),
        # the base pattern as plain text: an instruction-tuned model still continues it
        "pattern-news-3": lambda tok, t, s, g: base_prompt_ids(tok, _pattern(t, s, g, _pairs(s, g, NEWS))),
    },
}  # fmt: skip

# The template served per family: chosen by cross-validation (module docstring).
CHOSEN: dict[Family, str] = {"base": "everyday-news-6", "chat": "instruction-short"}


def prompt_ids(tokenizer: Any, family: Family, text: str, source: str, target: str,
               template: str | None = None) -> list[int]:  # fmt: skip
    return TEMPLATES[family][template or CHOSEN[family]](tokenizer, " ".join(text.split()), source, target)


def postprocess(generated: str, target: str) -> str:
    """First line of the answer, without a repeated "French:" label or wrapping quotes."""
    text = generated.strip()
    text = text.split("\n", 1)[0].strip()
    label = f"{LANGUAGES[target]}:"
    if text.lower().startswith(label.lower()):
        text = text[len(label) :].strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'«»":
        text = text[1:-1].strip()
    return text
