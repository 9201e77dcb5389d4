"""One module per transformers era of the LLaMA code; each knows how to recognise its era.

``select`` asks each era, newest first, whether the imported module has what its patch
needs (feature detection, not version strings). A module no era recognises is left
unpatched with one warning that names the transformers version.
"""

from __future__ import annotations

from typing import Optional

from autoflash.patches import attention_classes, attention_interface, attention_route
from autoflash.patches.base import Patch

ERAS = (attention_interface, attention_route, attention_classes)


def select(module) -> Optional[object]:
    for era in ERAS:
        if not era.missing(module):
            return era
    return None


def why_unsupported(module) -> str:
    return "; ".join(f"{era.ERA}: {', '.join(era.missing(module))}" for era in ERAS)


__all__ = ["ERAS", "Patch", "select", "why_unsupported"]
