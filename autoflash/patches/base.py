"""What every patch keeps: the originals it replaced, so ``disable()`` restores them exactly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Tuple

_MISSING = object()


@dataclass
class Patch:
    module_name: str
    era: str
    _undo: List[Callable[[], None]] = field(default_factory=list)
    replaced: List[Tuple[str, Any]] = field(default_factory=list)  # (where, original) for tests and doctor

    def set_attribute(self, owner, name: str, value) -> None:
        """Set owner.name (in owner's own __dict__), remembering exactly what was there, or that nothing was."""
        original = owner.__dict__.get(name, _MISSING)
        setattr(owner, name, value)
        self.replaced.append((f"{getattr(owner, '__qualname__', owner)}.{name}", original))

        def undo():
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)

        self._undo.append(undo)

    def set_item(self, mapping: dict, key, value) -> None:
        original = mapping.get(key, _MISSING)
        mapping[key] = value
        self.replaced.append((f"[{key!r}]", original))

        def undo():
            if original is _MISSING:
                mapping.pop(key, None)
            else:
                mapping[key] = original

        self._undo.append(undo)

    def add_log_filter(self, logger_name: str, log_filter) -> None:
        """Attach ``log_filter`` to a logger of the patched library until ``undo``."""
        import logging

        logger = logging.getLogger(logger_name)
        logger.addFilter(log_filter)
        self.replaced.append((f"logger {logger_name!r} filter", _MISSING))
        self._undo.append(lambda: logger.removeFilter(log_filter))

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()
