"""Translation by prompting. Chat models: an instruction in their chat template. Base models (GPT-2
style): a few-shot "English: ... / French: ..." pattern, as in the GPT-2 paper."""

from __future__ import annotations

from typing import Any

from app.tasks.family import Family, base_prompt_ids, chat_prompt_ids

LANGUAGES = {
    "en": "English", "fr": "French", "de": "German", "es": "Spanish", "it": "Italian", "pt": "Portuguese",
    "nl": "Dutch", "pl": "Polish", "ru": "Russian", "uk": "Ukrainian", "cs": "Czech", "sv": "Swedish",
    "da": "Danish", "fi": "Finnish", "ro": "Romanian", "tr": "Turkish", "el": "Greek", "zh": "Chinese",
    "ja": "Japanese", "ko": "Korean", "ar": "Arabic", "hi": "Hindi",
}  # fmt: skip
_BY_NAME = {name.lower(): code for code, name in LANGUAGES.items()}

# Few-shot pairs for base models: short, everyday sentences, shown in the target language asked for.
EXAMPLES = {
    "en": ["The weather is nice today.", "Where is the train station?", "I have lived here for ten years."],
    "fr": ["Il fait beau aujourd'hui.", "Où est la gare ?", "J'habite ici depuis dix ans."],
    "de": ["Das Wetter ist heute schön.", "Wo ist der Bahnhof?", "Ich wohne seit zehn Jahren hier."],
    "es": ["Hoy hace buen tiempo.", "¿Dónde está la estación de tren?", "Vivo aquí desde hace diez años."],
    "it": ["Oggi il tempo è bello.", "Dov'è la stazione?", "Vivo qui da dieci anni."],
}


def resolve(language: str) -> str | None:
    """ISO 639-1 code or English name -> code; None if unsupported."""
    key = language.strip().lower()
    if key in LANGUAGES:
        return key
    return _BY_NAME.get(key)


def supported() -> str:
    return ", ".join(f"{code} ({name})" for code, name in LANGUAGES.items())


def prompt_ids(tokenizer: Any, family: Family, text: str, source: str, target: str) -> list[int]:
    src, tgt = LANGUAGES[source], LANGUAGES[target]
    text = " ".join(text.split())
    if family == "chat":
        user = f"Translate this {src} text into {tgt}. Reply with the {tgt} translation only.\n\n{text}"
        return chat_prompt_ids(tokenizer, user)
    shots = ""
    if source in EXAMPLES and target in EXAMPLES:
        shots = "".join(f"{src}: {a}\n{tgt}: {b}\n\n" for a, b in zip(EXAMPLES[source], EXAMPLES[target], strict=True))
    return base_prompt_ids(tokenizer, f"{shots}{src}: {text}\n{tgt}:")


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
