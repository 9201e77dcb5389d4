"""The environment switches, read once per process.

A bad value never crashes a user's program: it is reported in one line through the
``autoflash`` logger and the default is used instead.
"""

import functools
import logging
import os
import re
from dataclasses import dataclass

from autoflash.backend_names import AUTO_ORDER, FLASH_KERNELS
from autoflash.switch import DISABLE_VARIABLE, FALSE_WORDS, TRUE_WORDS, disabled_by_env

BACKEND_VARIABLE = "AUTOFLASH_BACKEND"
LOG_VARIABLE = "AUTOFLASH_LOG"
UNPAD_MODEL_VARIABLE = "AUTOFLASH_UNPAD_MODEL"
EXCLUDE_VARIABLE = "AUTOFLASH_EXCLUDE"
EXCLUDE_CHOICES = FLASH_KERNELS
FAMILIES_VARIABLE = "AUTOFLASH_FAMILIES"
ALL_MODELS = "all"
MODEL_TYPE = re.compile(r"[a-z0-9][a-z0-9_.-]*")
BACKEND_CHOICES = ("auto",) + AUTO_ORDER
LOG_CHOICES = {"warning": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}

logger = logging.getLogger("autoflash")
_said = set()  # the keys say_once has logged in this process


def say_once(key: tuple, level: int, message: str, *args) -> bool:
    """Log ``message % args`` at ``level`` the first time ``key`` comes up in this process; whether it did.
    A key begins with its topic (``forget_said`` starts a topic over: tests, ``dispatch.clear_cache``).
    Not for traced code: a log call inside a trace breaks it (callers there are silent; untraced calls say it)."""
    if key in _said:
        return False
    _said.add(key)
    logger.log(level, message, *args)
    return True


def forget_said(*topics: str) -> None:
    """Forget what ``say_once`` said under ``topics`` (every topic where none is named)."""
    for key in [k for k in _said if not topics or k[0] in topics]:
        _said.discard(key)


@dataclass(frozen=True)
class Settings:
    disabled: bool
    backend: str  # one of BACKEND_CHOICES
    log_level: str  # one of LOG_CHOICES
    unpad_model: bool = True  # False: padding is removed inside attention only (autoflash/unpad_model.py)
    exclude: tuple = ()  # backends left out of the choice (EXCLUDE_CHOICES)
    # the model types served: "all" (every family and every decoder autoflash adopts: autoflash.adoption) or
    # the names an admin listed
    families: tuple = (ALL_MODELS,)

    def as_dict(self) -> dict:
        return {DISABLE_VARIABLE: self.disabled, BACKEND_VARIABLE: self.backend, LOG_VARIABLE: self.log_level,
                UNPAD_MODEL_VARIABLE: self.unpad_model, EXCLUDE_VARIABLE: ",".join(self.exclude),
                FAMILIES_VARIABLE: ",".join(self.families)}

    def adopts(self, model_type: str) -> bool:
        """Whether models of ``model_type`` (a family's name is its model type) may be served."""
        return ALL_MODELS in self.families or model_type in self.families


def _choice(variable: str, choices, default: str) -> str:
    raw = os.environ.get(variable)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in choices:
        return value
    logger.warning("%s=%r is not one of %s; using %r", variable, raw, "|".join(choices), default)
    return default


def _names(variable: str, choices) -> tuple:
    """A comma-separated list of names; unknown ones are named in one warning and left out."""
    raw = os.environ.get(variable, "")
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in choices]
    if unknown:
        logger.warning("%s=%r: %s not one of %s; ignored", variable, raw, ", ".join(map(repr, unknown)),
                       "|".join(choices))
    return tuple(dict.fromkeys(n for n in names if n in choices))


def _families() -> tuple:
    """AUTOFLASH_FAMILIES narrows what is served (an admin's choice): ``all`` or model types (``llama``,
    ``mixtral``, ...); unset or empty: all. A model type is any name transformers may give: only its form
    is checked here (transformers is not imported at start-up)."""
    raw = os.environ.get(FAMILIES_VARIABLE, "")
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    if not names:
        return (ALL_MODELS,)
    malformed = [n for n in names if not MODEL_TYPE.fullmatch(n)]
    if malformed:
        logger.warning("%s=%r: %s not a model type (such as llama, qwen2, mixtral) or 'all'; ignored",
                       FAMILIES_VARIABLE, raw, ", ".join(map(repr, malformed)))
    return tuple(dict.fromkeys(n for n in names if n not in malformed))


@functools.lru_cache(maxsize=1)
def settings() -> Settings:
    raw = os.environ.get(DISABLE_VARIABLE, "")
    if raw.strip().lower() not in TRUE_WORDS + FALSE_WORDS:
        logger.warning("%s=%r is not one of %s (disable) or %s (enable); autoflash stays enabled", DISABLE_VARIABLE,
                       raw, "|".join(TRUE_WORDS), "|".join(w for w in FALSE_WORDS if w))
    result = Settings(
        disabled=disabled_by_env(),
        backend=_choice(BACKEND_VARIABLE, BACKEND_CHOICES, "auto"),
        log_level=_choice(LOG_VARIABLE, tuple(LOG_CHOICES), "warning"),
        unpad_model=_choice(UNPAD_MODEL_VARIABLE, ("1", "0"), "1") == "1",
        exclude=_names(EXCLUDE_VARIABLE, EXCLUDE_CHOICES),
        families=_families(),
    )
    _configure_logger(result.log_level)
    return result


class _WhereLoggingIsNotConfigured(logging.StreamHandler):
    """Prints autoflash's records, named, where the application configured no logging (Python would print a
    warning's bare text, or drop an info line asked for with AUTOFLASH_LOG). Where the root logger has a
    handler, the record goes there alone, in the application's own format ("WARNING:autoflash:..." under
    ``logging.basicConfig()``): messages carry no "autoflash:" prefix of their own."""

    def emit(self, record):
        if not logging.getLogger().handlers:
            super().emit(record)

    def format(self, record):
        text = super().format(record)
        tag = "autoflash" if record.levelno >= logging.WARNING else f"autoflash {record.levelname.lower()}"
        return text if text.startswith("autoflash") else f"{tag}: {text}"


def _configure_logger(level_name: str) -> None:
    logger.setLevel(LOG_CHOICES[level_name])
    if not any(isinstance(h, _WhereLoggingIsNotConfigured) for h in logger.handlers):
        logger.addHandler(_WhereLoggingIsNotConfigured())
