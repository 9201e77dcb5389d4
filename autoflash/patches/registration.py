"""What autoflash adds to transformers once per process, whatever the families: its attention name.

From the release whose masks are made by a registered mask function (``AttentionMaskInterface``,
the attention-interface era), autoflash's attention function and mask function are registered
under ``ATTENTION_NAME``, and configs that name it are pickled naming transformers' ``sdpa``.
Hooked on ``transformers.masking_utils``, which every family module of that era imports before
its own code runs: the name exists before any family's patch chooses it, and is registered once,
so undoing one family's patch never takes it from another.
"""

from __future__ import annotations

import copy

from autoflash.attention import ATTENTION_NAME, attention_forward, mask_function
from autoflash.patches.base import Patch

MODULE = "transformers.masking_utils"


def apply(module) -> Patch:
    patch = Patch(module.__name__, "registration")
    mask_registry = getattr(module, "AttentionMaskInterface", None)
    try:
        from transformers.modeling_utils import AttentionInterface
    except ImportError:
        AttentionInterface = None
    if mask_registry is None or AttentionInterface is None:
        return patch  # a release that routes by name instead (patches/attention_route.py)
    try:
        patch.set_item(AttentionInterface._global_mapping, ATTENTION_NAME, attention_forward)
        patch.set_item(mask_registry._global_mapping, ATTENTION_NAME, mask_function)
        _keep_pickles_portable(patch)
    except BaseException:
        patch.undo()
        raise
    return patch


def registered() -> bool:
    """Whether autoflash's attention name is registered in this process (a family's patch checks first)."""
    try:
        from transformers.masking_utils import AttentionMaskInterface
        from transformers.modeling_utils import AttentionInterface
    except ImportError:
        return False
    return (AttentionInterface._global_mapping.get(ATTENTION_NAME) is attention_forward
            and AttentionMaskInterface._global_mapping.get(ATTENTION_NAME) is mask_function)


def _keep_pickles_portable(patch: Patch) -> None:
    """A config pickled here (``torch.save(model)``, a process pool) names transformers' own ``sdpa``, not
    ``autoattn``: the process that loads it may not run autoflash, and there ``autoattn`` is a KeyError
    on the first forward. Copies made in this process (``copy.copy``, ``copy.deepcopy``, which transformers
    makes of configs) keep the name."""
    from transformers import configuration_utils

    base = getattr(configuration_utils, "PreTrainedConfig", None) or getattr(configuration_utils, "PretrainedConfig",
                                                                             None)
    if base is None or any(name in base.__dict__ for name in ("__getstate__", "__copy__", "__deepcopy__")):
        return  # a release that pickles or copies configs its own way: left alone

    def __getstate__(self):
        state = dict(self.__dict__)
        if state.get("_attn_implementation_internal") == ATTENTION_NAME:
            state["_attn_implementation_internal"] = "sdpa"
        return state

    def __copy__(self):
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    for function in (__getstate__, __copy__, __deepcopy__):
        patch.set_attribute(base, function.__name__, function)
