"""One module per transformers era of the family modules' code; each knows how to recognise its era.

``select`` asks each era that serves the family (``autoflash.families``), newest first,
whether the imported module has what its patch needs (feature detection, not version
strings). A module no era recognises is left unpatched with one warning that names the
transformers version.
"""

from __future__ import annotations

from typing import Optional

from autoflash.patches import attention_classes, attention_interface, attention_route
from autoflash.patches.base import Patch

ERAS = (attention_interface, attention_route, attention_classes)


def select(module, family) -> Optional[object]:
    """The era whose patch fits ``module``, among those that serve ``family``."""
    for era in ERAS:
        if era.ERA in family.eras and not era.missing(module, family):
            return era
    return None


def predates_family(module, family) -> bool:
    """Whether ``module`` comes from a release older than every era that serves ``family`` (a release
    autoflash leaves alone for that family, rather than one it does not recognise)."""
    return all(era.predates(module) for era in ERAS if era.ERA in family.eras)


def why_unsupported(module, family) -> str:
    return "; ".join(f"{era.ERA}: {', '.join(era.missing(module, family))}" for era in ERAS
                     if era.ERA in family.eras)


__all__ = ["ERAS", "Patch", "select", "why_unsupported"]
