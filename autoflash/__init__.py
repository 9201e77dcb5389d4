"""autoflash: FlashAttention-class kernels for every LLaMA model in transformers, with zero code changes.

Importing this package costs nothing heavy: torch and transformers are imported only
when transformers itself is. ``import autoflash`` arms the same hook ``autoflash.pth``
does, so it also works where the .pth file was not processed (``python -S``, a source
checkout on PYTHONPATH).
"""

from autoflash import _startup

__version__ = "0.1.0"
__all__ = ["enable", "disable", "status", "replace_llama_attn_with_flash_attn",
           "replace_llama2_attn_with_flash_attn", "__version__"]


def enable() -> bool:
    """Patch LLaMA attention now (if transformers' LLaMA module is imported) and on its import.

    Returns whether autoflash is active; ``autoflash doctor`` says why when it is not.
    """
    from autoflash import hooks

    return hooks.enable()


def disable() -> None:
    """Restore every object autoflash replaced. Models built while enabled keep their attention
    setting; rebuild them, or call ``model.set_attn_implementation("sdpa")``, after disabling."""
    from autoflash import hooks

    hooks.disable()


def status() -> dict:
    """What is active and why, as JSON-serialisable data (``autoflash doctor --json`` prints it)."""
    from autoflash import doctor

    return doctor.status()


def replace_llama_attn_with_flash_attn(*_args, **_kwargs) -> bool:
    """Drop-in for InternVL's monkey patch of the same name: calls ``enable()``."""
    return enable()


replace_llama2_attn_with_flash_attn = replace_llama_attn_with_flash_attn

_startup.install()
