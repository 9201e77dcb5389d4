"""Kernel families, best first. Each module holds one backend object (``capability.Backend``) with the same
small surface:

``name``                         how settings, logs and ``autoflash doctor`` call it
``supports``                     what it serves, as data (``capability.Supports``)
``unavailable_reasons()``        asked once per process: is it installed and usable at all? (no other effect)
``own_reasons(call)``            what only its installed release refuses (a missing argument, say)
``reasons_not_supported(call)``  the three together, record first (cached per call record by dispatch)
``run(q, k, v, layout, call, scale)``  q (batch, heads, q_len, dim), k/v (batch, kv_heads, kv_len, dim)
                                 -> (batch, q_len, heads, dim), zeros on padded queries

Reasons are short lowercase strings in one form, ``what=got (supported: ...)``.
"""

from autoflash import backend_names
from autoflash.backends.flash_attn import FLASH_ATTN
from autoflash.backends.flash_attn_4 import FLASH_ATTN_4
from autoflash.backends.reference import REFERENCE
from autoflash.backends.sdpa import SDPA
from autoflash.backends.torch_builtin import TORCH

BY_NAME = {b.name: b for b in (FLASH_ATTN_4, FLASH_ATTN, TORCH, SDPA, REFERENCE)}
AUTO_ORDER = tuple(BY_NAME[name] for name in backend_names.AUTO_ORDER)
FLASH_KERNELS = backend_names.FLASH_KERNELS
