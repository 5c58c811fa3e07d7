"""attnbench's attention variants, reached through one registry (see variants-api.md).

Each module is imported explicitly so that a broken variant fails loudly at import time
instead of silently vanishing from the registry.
"""

from . import (  # noqa: F401  (exact attention, masking family)  # noqa: F401  (approximation family)  # noqa: F401  (library baselines)
    flex,  # noqa: F401  (FlexAttention twins; after the variants they reproduce)
    full,
    linear,
    linformer,
    local,
    reformer,
    relative,
    sdpa,
    sparse,
    xformers_attn,
)
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
