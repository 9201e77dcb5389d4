"""The attention backends by name, best first: read at start-up by ``settings`` (which must not import
torch) and by ``backends``, which holds the objects. The one place the list is written."""

AUTO_ORDER = ("flash_attn_4", "flash_attn", "torch", "sdpa")  # tried in this order; sdpa serves every call
FLASH_KERNELS = AUTO_ORDER[:-1]  # serving a call with one of these is no fallback; each may be excluded
REFERENCE = "reference"  # the executable specification (backends/reference.py): only ever forced, by tests
