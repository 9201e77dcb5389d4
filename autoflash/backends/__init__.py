"""Kernel families, best first. Each module holds one backend object with the same small surface:

``name``                         how settings, logs and ``autoflash doctor`` call it
``unavailable_reasons()``        asked once per process: is it installed and usable at all?
``reasons_not_supported(call)``  asked per call (cached on the call record): does it fit this call?
``run(q, k, v, layout, call, scale)``  q (batch, heads, q_len, dim), k/v (batch, kv_heads, kv_len, dim)
                                 -> (batch, q_len, heads, dim), zeros on padded queries

Reasons are short lowercase strings in one form, ``what=got (supported: ...)``.
"""

from autoflash.backends.flash_attn import FLASH_ATTN
from autoflash.backends.flash_attn_4 import FLASH_ATTN_4
from autoflash.backends.reference import REFERENCE
from autoflash.backends.sdpa import SDPA
from autoflash.backends.torch_builtin import TORCH

AUTO_ORDER = (FLASH_ATTN_4, FLASH_ATTN, TORCH, SDPA)
BY_NAME = {b.name: b for b in (FLASH_ATTN_4, FLASH_ATTN, TORCH, SDPA, REFERENCE)}
FLASH_KERNELS = ("flash_attn_4", "flash_attn", "torch")  # serving a call with one of these is no fallback
