"""Which modules autoflash watches, and what happens when each is imported.

``_startup`` calls ``register_import_hooks`` on the first ``import transformers``; from
then on wrapt calls ``on_import`` right after a family's module (``autoflash.families``)
has executed, however it was reached (``import``, transformers' lazy module,
``AutoModelForCausalLM``). A patch that fails is logged as one warning and undone; the
user's import always succeeds.
"""

from __future__ import annotations

import sys
import threading
from typing import Dict

from autoflash.families import BY_MODULE, FAMILIES, served_from
from autoflash.settings import FAMILIES_VARIABLE, logger, settings

WATCHED_MODULES = tuple(family.module for family in FAMILIES)
# transformers modules that are not a family's: where autoflash's attention name is registered, once
# (autoflash.patches.registration), where other decoders are adopted (autoflash.patches.other_decoders), and
# features that decide by a model's attention name (autoflash.patches.integrations)
INTEGRATION_MODULES = ("transformers.masking_utils", "transformers.modeling_utils",
                       "transformers.generation.continuous_batching.continuous_api", "transformers.trainer")

_lock = threading.RLock()  # re-entrant: a patch may import modules that fire other hooks
_applied: Dict[str, object] = {}  # module name -> autoflash.patches.Patch, in the order applied
_left_alone: Dict[str, str] = {}  # module name -> why it is imported and not patched (by design, not failure)
_state = {"hooks_registered": False, "user_disabled": False, "last_error": None}


def register_import_hooks() -> None:
    """Register wrapt post-import hooks (idempotent). Already-imported modules are patched at once."""
    with _lock:
        if _state["hooks_registered"]:
            return
        import wrapt

        # wrapt calls the hook at once for a module already imported: the attention name before the families
        for name in INTEGRATION_MODULES + WATCHED_MODULES:
            wrapt.register_post_import_hook(on_import, name)
        _state["hooks_registered"] = True


def on_import(module) -> None:
    """The wrapt hook. Runs inside the user's import statement: nothing may escape."""
    try:
        apply(module)
    except BaseException as exc:  # noqa: BLE001
        _state["last_error"] = f"{type(exc).__name__}: {exc}"
        try:
            logger.warning("autoflash could not patch %s (%s); the model runs unpatched. Please report this with "
                           "the output of `autoflash doctor`.", getattr(module, "__name__", module),
                           _state["last_error"])
        except BaseException:  # noqa: BLE001
            pass


def apply(module, family=None) -> bool:
    """Patch one watched module once, as a module of ``family`` (by default the family that watches its
    name). Returns whether it is patched now."""
    with _lock:
        name = module.__name__
        if name in _applied:
            return True
        if settings().disabled or _state["user_disabled"]:
            return False
        if name in INTEGRATION_MODULES and family is None:
            from autoflash.patches import integrations  # imports torch: transformers is loading already

            _applied[name] = integrations.apply(module)
            return True
        family = family or BY_MODULE[name]
        if not settings().adopts(family.name):
            _left_alone[name] = f"left out by {FAMILIES_VARIABLE}"
            return False
        from autoflash import patches  # imports torch: only now that a family's model code is loading

        era = patches.select(module, family)
        if era is None:
            if patches.predates_family(module, family):
                # a release older than the family's eras: transformers' own attention serves it
                version = getattr(sys.modules.get("transformers"), "__version__", "unknown")
                _left_alone[name] = f"{family.name} is patched from {served_from(family)}; this is {version}"
                logger.info("%s", _left_alone[name])
                return False
            _warn_unknown_version(module, family)
            return False
        _applied[name] = era.apply(module, family)
        _left_alone.pop(name, None)
        _state["last_error"] = None
        logger.info("autoflash patched %s (%s era)", name, era.ERA)
        return True


def _warn_unknown_version(module, family) -> None:
    from autoflash import patches

    version = getattr(sys.modules.get("transformers"), "__version__", "unknown")
    why = patches.why_unsupported(module, family)
    _state["last_error"] = f"transformers {version} not recognised: {why}"
    logger.warning("autoflash does not recognise transformers %s (%s); %s runs unpatched. Please report it "
                   "with the output of `autoflash doctor`.", version, why, module.__name__)


def enable() -> bool:
    """Patch now where the watched modules are imported, and on their import otherwise.

    Returns True when autoflash is active: every watched module imported so far is patched
    (the others will be on import). False when disabled by the environment or a patch failed.
    """
    with _lock:
        if settings().disabled:
            logger.info("autoflash.enable() ignored: AUTOFLASH_DISABLE is set")
            return False
        _state["user_disabled"] = False
        register_import_hooks()
        for name in INTEGRATION_MODULES + WATCHED_MODULES:  # the attention name before the families
            module = sys.modules.get(name)
            if module is not None:
                on_import(module)
        return all(name in _applied or name in _left_alone for name in WATCHED_MODULES if name in sys.modules)


def disable() -> None:
    """Undo every patch, restoring the original objects; watched modules imported later stay unpatched."""
    with _lock:
        _state["user_disabled"] = True
        # last applied, first undone: families share registrations (the attention name), and each
        # patch restores what it found
        for name in reversed(list(_applied)):
            _applied.pop(name).undo()


def patched_modules():
    """The family modules patched in this process (the feature modules of INTEGRATION_MODULES are not models)."""
    with _lock:
        return sorted(name for name in _applied if name not in INTEGRATION_MODULES)


def families() -> Dict[str, str]:
    """Each family's state in this process, for doctor: patched (and in which era), left alone (and
    why), or watched (its module not imported yet)."""
    with _lock:
        out = {}
        for family in FAMILIES:
            if settings().disabled:
                out[family.name] = "not watched: autoflash is off (AUTOFLASH_DISABLE)"
            elif family.module in _applied:
                out[family.name] = f"patched ({_applied[family.module].era} era)"
            elif family.module in _left_alone:
                out[family.name] = f"not patched: {_left_alone[family.module]}"
            elif not settings().adopts(family.name):
                out[family.name] = f"not watched: left out by {FAMILIES_VARIABLE}"
            elif family.module in sys.modules:
                out[family.name] = "imported, not patched"
            else:
                out[family.name] = "watched (not imported yet)"
        return out


def state() -> dict:
    with _lock:
        return dict(_state, patched=patched_modules(), integrations=sorted(set(_applied) & set(INTEGRATION_MODULES)),
                    eras={n: p.era for n, p in _applied.items()})
