"""The off switch, read by the start-up line and by ``settings``: a leaf (the standard ``os`` only).

Kept apart from ``_startup`` so that ``settings`` (imported by the hooks ``_startup`` arms) need
not import the start-up module back.
"""

import os

DISABLE_VARIABLE = "AUTOFLASH_DISABLE"
TRUE_WORDS = ("1", "true", "yes", "on")  # autoflash.pth spells these out again: it imports nothing
FALSE_WORDS = ("", "0", "false", "no", "off")


def disabled_by_env() -> bool:
    return os.environ.get(DISABLE_VARIABLE, "").strip().lower() in TRUE_WORDS
