"""attnbench's attention variants, reached through one registry (see variants-api.md).

Each module is imported explicitly so that a broken variant fails loudly at import time
instead of silently vanishing from the registry.
"""

# Own implementations: full, local, sparse, relative (exact or masked softmax attention) and
# linear, linformer, reformer (approximations). Library baselines: sdpa, xformers_attn, and flex
# (FlexAttention twins of full, local, sparse and relative).
from . import (  # noqa: F401
    flex,
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
