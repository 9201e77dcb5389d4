"""transformers features that decide by the model's attention name, before any attention call.

autoflash answers ``autoattn`` where a model asked for ``sdpa``, ``flash_attention_2`` or nothing. Two
features of transformers read that name and either refuse it or need their own attention:

- **continuous batching** (5.20+: ``generate_batch``, ``init_continuous_batching``, ``transformers serve
  --continuous-batching``): its manager accepts only ``sdpa``, ``paged|eager`` or a flash name
  (``switch_to_cb_friendly_attn``) and then calls attention with a paged cache, which autoflash does
  not serve. The manager is handed the model as transformers alone would have it (and then switches a
  half-precision model to flash-attention where that is installed, as it would without autoflash);
  when it stops, it restores autoflash.
- **the Trainer's context parallelism** (``ParallelismConfig(cp_size=...)``): each rank holds a shard of
  the sequence, and torch's context parallelism serves SDPA calls only; the Trainer refuses any name but
  ``sdpa``. While it is enabled, the model runs the attention transformers would give it.

Both are recorded by ``autoflash.handover`` (``status()["handed_over"]``).
"""

from __future__ import annotations

from autoflash import handover
from autoflash.patches import other_decoders, registration
from autoflash.patches.base import Patch

ERA = "integrations"
CONTINUOUS_BATCHING = "transformers.generation.continuous_batching.continuous_api"
TRAINER = "transformers.trainer"
MODULES = (CONTINUOUS_BATCHING, TRAINER)

CB_WHY = "continuous batching's paged cache (autoflash does not serve paged caches yet)"
CP_WHY = "context parallelism (each rank holds a shard of the sequence; torch's context parallelism serves SDPA)"


def apply(module) -> Patch:
    if module.__name__ == registration.MODULE:
        return registration.apply(module)
    if module.__name__ == other_decoders.MODULE:
        return other_decoders.apply(module)
    patch = Patch(module.__name__, ERA)
    try:
        if module.__name__ == CONTINUOUS_BATCHING:
            _hand_continuous_batching_its_attention(patch, getattr(module, "ContinuousBatchingManager", None))
        elif module.__name__ == TRAINER:
            _hand_context_parallelism_its_attention(patch, getattr(module, "Trainer", None))
    except BaseException:
        patch.undo()
        raise
    return patch


def _hand_continuous_batching_its_attention(patch: Patch, manager) -> None:
    original = getattr(manager, "switch_to_cb_friendly_attn", None) if manager is not None else None
    if original is None:
        return  # a release without continuous batching

    def switch_to_cb_friendly_attn(self, model, *args, **kwargs):
        given = handover.give_back(model, CB_WHY)
        try:
            # the manager may switch a half-precision model to flash_attention_2 (through set_attn_implementation,
            # which autoflash would answer with autoattn): its names reach transformers as given
            with handover.passing_through():
                result = original(self, model, *args, **kwargs)
        except BaseException:
            if given is not None:
                handover.take_back(model)
            raise
        if given is not None and hasattr(self, "_original_attn_impl"):
            # what the manager sets back when it stops: autoflash, not the name it was handed
            self._original_attn_impl = handover.ATTENTION_NAME
        return result

    switch_to_cb_friendly_attn.__wrapped__ = original
    patch.set_attribute(manager, "switch_to_cb_friendly_attn", switch_to_cb_friendly_attn)
    stop = getattr(manager, "stop", None)
    if stop is None:
        return

    def stop_and_take_back(self, *args, **kwargs):
        # the manager restores the name it found through set_attn_implementation, which autoflash would
        # read as a user's request: let it through
        with handover.passing_through():
            return stop(self, *args, **kwargs)

    stop_and_take_back.__wrapped__ = stop
    patch.set_attribute(manager, "stop", stop_and_take_back)


def _hand_context_parallelism_its_attention(patch: Patch, trainer) -> None:
    original = getattr(trainer, "_prepare_context_parallel_inputs", None) if trainer is not None else None
    if original is None:
        return  # a release without the Trainer's context parallelism

    def _prepare_context_parallel_inputs(self, model, inputs, *args, **kwargs):
        parallelism = getattr(getattr(self, "accelerator", None), "parallelism_config", None)
        if parallelism is not None and getattr(parallelism, "cp_enabled", False) \
                and hasattr(model, "set_attn_implementation"):
            handover.give_back(model, CP_WHY)
        return original(self, model, inputs, *args, **kwargs)

    _prepare_context_parallel_inputs.__wrapped__ = original
    patch.set_attribute(trainer, "_prepare_context_parallel_inputs", _prepare_context_parallel_inputs)
