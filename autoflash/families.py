"""The model families autoflash patches: one record each, and nothing else in the package names one.

A family is a transformers module whose attention is LLaMA's (rotary embeddings, causal
softmax attention, grouped K/V heads) up to details attention itself must know about, which
the record states. What a family needs beyond LLaMA reaches the kernels as fields of the
call record (``AttentionCall.window``), never as a keyword a backend might leave unread.

Imported by the start-up path (``hooks``): no torch, no transformers here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

ALL_ERAS = ("attention-interface", "attention-route", "attention-classes")
INTERFACE_ERA = "attention-interface"


@dataclass(frozen=True)
class Family:
    name: str  # how AUTOFLASH_FAMILIES, logs and doctor call it
    module: str  # the transformers module whose import is watched
    prefix: str  # its classes are <prefix>Model, <prefix>ForCausalLM, <prefix>PreTrainedModel, ...
    eras: Tuple[str, ...]  # the patch eras (autoflash/patches/) that serve it
    has_window: bool = False  # whether its attention applies config.sliding_window

    def cls(self, module, suffix: str):
        """The family's class ``<prefix><suffix>`` in ``module`` (None where this release has none)."""
        return getattr(module, self.prefix + suffix, None)

    def window(self, config) -> Optional[int]:
        """The sliding window some layer of a model of this config applies, else None.

        transformers' window: a query at position i sees the keys at positions i - window + 1 .. i.
        Qwen2 and Qwen3 configs hold one only where ``use_sliding_window`` is set, and apply it on
        the layers ``layer_types`` marks; Mistral on every layer.
        """
        window = getattr(config, "sliding_window", None) if self.has_window else None
        if window is None:
            return None
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None and "sliding_attention" not in layer_types:
            return None
        return int(window)


FAMILIES = (
    # the reference: every other family is LLaMA's attention up to the differences noted
    Family("llama", "transformers.models.llama.modeling_llama", "Llama", ALL_ERAS),
    # InternVL 2.5/3's language models. q/k/v biases (nothing for attention to do); a window on the
    # layers from max_window_layers where use_sliding_window is set
    Family("qwen2", "transformers.models.qwen2.modeling_qwen2", "Qwen2", (INTERFACE_ERA,), has_window=True),
    # per-head RMS norm of q and k (before attention: nothing for it to do); windows as Qwen2's
    Family("qwen3", "transformers.models.qwen3.modeling_qwen3", "Qwen3", (INTERFACE_ERA,), has_window=True),
    # a window on every layer where sliding_window is set
    Family("mistral", "transformers.models.mistral.modeling_mistral", "Mistral", (INTERFACE_ERA,), has_window=True),
)
BY_NAME = {f.name: f for f in FAMILIES}
BY_MODULE = {f.module: f for f in FAMILIES}


def served_from(family: Family) -> str:
    """The transformers releases in which autoflash patches ``family``, for messages."""
    return "4.37 on" if "attention-classes" in family.eras else \
        "the releases with transformers' attention-mask interface on (~4.56, 5.x)"
