"""attnbench's attention variants, reached through one registry (see variants-api.md).

Each module is imported explicitly so that a broken variant fails loudly at import time
instead of silently vanishing from the registry.
"""

from . import full, local, relative, sparse  # noqa: F401  (exact attention, masking family)
from . import linear, linformer, reformer  # noqa: F401  (approximation family)
from . import sdpa, xformers_attn  # noqa: F401  (library baselines)
from . import flex  # noqa: F401  (FlexAttention twins; after the variants they reproduce)
from .registry import (
    Attention,
    Common,
    Unsupported,
    available,
    build,
    config_class,
    option_names,
    register,
)

__all__ = [
    "Attention",
    "Common",
    "Unsupported",
    "available",
    "build",
    "config_class",
    "option_names",
    "register",
]
