"""What ``autoflash.pth`` (and ``autoflash.start`` on Python 3.15+) runs at interpreter start.

This runs in every Python process on the machine, so it must stay cheap and must never
raise. It imports nothing beyond the standard modules ``site`` already loaded: not torch,
not transformers, and not even wrapt, whose import costs tens of milliseconds (wrapt 2.x
pulls in asyncio and importlib.metadata). Instead it puts a tiny finder on
``sys.meta_path`` that does nothing but wait for the first ``import transformers``; only
then is wrapt imported and the real post-import hook for the LLaMA module registered
(``autoflash.hooks``). A process that never imports transformers pays one string
comparison per import.
"""

import sys

from autoflash.switch import DISABLE_VARIABLE, disabled_by_env

_TRIGGER_MODULE = "transformers"


class _ArmOnTransformersImport:
    """A meta-path finder that never finds anything; it arms the hooks when transformers is imported."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == _TRIGGER_MODULE:
            _remove_trigger()
            _arm()
        return None

    def __repr__(self):
        return "<autoflash: waiting for 'import transformers'>"


_trigger = _ArmOnTransformersImport()
arm_error = None  # why the import hook could not be registered, for doctor and status()


def _remove_trigger():
    try:
        sys.meta_path.remove(_trigger)
    except ValueError:
        pass


def _arm():
    global arm_error
    try:
        from autoflash import hooks

        hooks.register_import_hooks()
    except BaseException as exc:  # noqa: BLE001 - this runs inside the user's import statement
        arm_error = f"the import hook could not be registered ({type(exc).__name__}: {exc})"
        _warn_once(f"autoflash could not register its import hook ({type(exc).__name__}: {exc}); "
                   "transformers runs unpatched. Run `autoflash doctor` to see why, "
                   f"or set {DISABLE_VARIABLE}=1 to silence this.")


_warned = False


def _warn_once(message):
    # logging is not configured this early and may never be; stderr is what a user sees.
    global _warned
    if not _warned:
        _warned = True
        try:
            sys.stderr.write(f"autoflash: {message}\n")
        except BaseException:  # noqa: BLE001 - a closed stderr must not break start-up
            pass


def install() -> None:
    """Entry point of autoflash.pth / autoflash.start. Never raises."""
    try:
        if disabled_by_env():
            return
        if _TRIGGER_MODULE in sys.modules:
            # transformers came in before site-packages were processed (an embedding
            # host, a sitecustomize): arm right away.
            _arm()
        elif _trigger not in sys.meta_path:
            sys.meta_path.insert(0, _trigger)
    except BaseException:  # noqa: BLE001
        pass
