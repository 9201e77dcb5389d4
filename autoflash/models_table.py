"""The table of every causal language model in the installed transformers' registry (and of the vision-language
models' language models autoflash was taught) and what autoflash does with each: whole model, per layer (and
why), or not served (and why). For ``autoflash models`` and the README's Models
table (checked by ``tests/test_other_decoders.py``). Imports every modeling module: seconds, not for hot paths.
"""

from __future__ import annotations

import sys

from autoflash import adoption
from autoflash.families import BY_MODULE
from autoflash.patches import other_decoders
from autoflash.settings import FAMILIES_VARIABLE, settings


def registry_table() -> list:
    """(model type, what autoflash does with it) for every causal language model in the installed transformers'
    registry, judged on each type's default config (a checkpoint's config may differ: a window, a chunk size)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_MAPPING)

    language_models = [t for t in adoption.LANGUAGE_MODELS if t in CONFIG_MAPPING]  # (a vision-language model's)
    rows = []
    for model_type in sorted([*MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, *language_models]):
        try:
            config = CONFIG_MAPPING[model_type]()
            registry = MODEL_MAPPING if model_type in adoption.LANGUAGE_MODELS else MODEL_FOR_CAUSAL_LM_MAPPING
            model_class = registry[type(config)]
        except Exception as exc:  # noqa: BLE001 - a type whose defaults do not build (or a missing dependency)
            rows.append((model_type, f"not judged: its default config does not build ({type(exc).__name__})"))
            continue
        family = BY_MODULE.get(model_class.__module__)
        if family is not None:
            served = settings().adopts(family.name)
            rows.append((model_type, f"whole model ({family.name} family)" if served else
                         f"not served: left out by {FAMILIES_VARIABLE}"))
            continue
        why = adoption.judged(model_class, config)
        if why is not None and why.startswith(adoption.SOFTCAP_UNAPPLIED):  # (not this machine's kernels: any's)
            why = f"{adoption.SOFTCAP_UNAPPLIED} ({adoption.SOFTCAP_APPLIED_BY})"
        if why is not None:
            rows.append((model_type, f"not served: {why}"))
            continue
        classes = other_decoders.classes_of(model_type, sys.modules.get(model_class.__module__))
        rows.append((model_type, adoption.path_said(other_decoders.why_not_whole_model(model_type, classes))))
    return rows


def registry_markdown() -> str:
    """``registry_table`` as the Markdown table the README holds."""
    import transformers

    lines = [f"| model type (transformers {transformers.__version__}) | autoflash |", "|---|---|"]
    lines += [f"| {model_type} | {what} |" for model_type, what in registry_table()]
    return "\n".join(lines) + "\n"
