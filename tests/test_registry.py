"""The registry contract (variants-api.md), checked for every registered variant."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import variants
from variants.registry import Attention, Common

CONF = Path(__file__).resolve().parents[1] / "conf" / "variant"
COMMON = {"seq_len", "num_heads", "head_dim", "seed"}


def small(name: str, seq_len: int = 40, num_heads: int = 2, head_dim: int = 8, **extra):
    """Build a variant for a quick CPU call (flex twins run eagerly: compiling takes ~30 s)."""
    opts = dict(seq_len=seq_len, num_heads=num_heads, head_dim=head_dim, **extra)
    if "compile" in variants.option_names(name):
        opts["compile"] = False
    return variants.build(name, **opts)


def test_available_is_sorted_and_complete():
    names = variants.available()
    assert names == sorted(names)
    for name in ["full", "sdpa", "sdpa_math", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn"]:
        assert name in names
    assert {"xformers", "flex_full"} <= set(names)


def test_unknown_variant_lists_the_available_ones():
    with pytest.raises(ValueError) as e:
        variants.build("fulll")
    assert "fulll" in str(e.value)
    assert all(name in str(e.value) for name in variants.available())


def test_unknown_option_is_named():
    with pytest.raises(TypeError, match="windw"):
        variants.build("full", windw=3)


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):

        @variants.register("full")
        class Again(Attention):
            pass


def test_register_requires_a_config_dataclass():
    with pytest.raises(TypeError):
        variants.register("x_bad_config", config=dict)


@pytest.mark.parametrize("name", variants.available())
def test_every_variant_has_its_config_file(name):
    path = CONF / f"{name}.yaml"
    assert path.exists(), f"conf/variant/{name}.yaml is missing"
    options = yaml.safe_load(path.read_text()) or {}
    assert set(options) <= set(variants.option_names(name)) - COMMON, (
        f"{path} names options that {name} does not have"
    )
    variants.build(name, seq_len=64, **options)  # the values are accepted too


def test_every_config_file_has_its_variant():
    names = {p.stem for p in CONF.glob("*.yaml")}
    assert names == set(variants.available())


@pytest.mark.parametrize("name", variants.available())
def test_config_is_typed_with_common_options(name):
    cfg = variants.config_class(name)
    assert issubclass(cfg, Common)
    assert COMMON <= set(variants.option_names(name))


@pytest.mark.parametrize("name", variants.available())
def test_call_shape_dtype_and_gradients(name):
    """Every variant that runs on this CPU keeps the shape and dtype and passes gradients."""
    attn = small(name)
    reasons = attn.unsupported(device="cpu", dtype=torch.float32, causal=False, seq_len=40)
    assert isinstance(reasons, list)
    q, k, v = (torch.randn(2, 2, 40, 8, requires_grad=True) for _ in range(3))
    if reasons:
        with pytest.raises(variants.Unsupported):
            attn(q, k, v)
        return
    if attn.backward_unsupported(device="cpu"):
        with pytest.raises(variants.Unsupported, match="backward"):
            attn(q, k, v)
        q, k, v = (t.detach() for t in (q, k, v))
        assert attn(q, k, v).shape == q.shape
        return
    out = attn(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    assert v.grad is not None and v.grad.abs().sum() > 0


@pytest.mark.parametrize("name", variants.available())
@pytest.mark.parametrize("causal", [False, True])
def test_unsupported_is_consistent_with_the_call(name, causal):
    """unsupported() says in advance exactly what a call would refuse."""
    attn = small(name)
    q = torch.randn(1, 2, 40, 8)
    reasons = attn.unsupported(device="cpu", dtype=torch.float32, causal=causal, seq_len=40)
    if reasons:
        assert all(isinstance(r, str) and len(r) > 10 for r in reasons)
        with pytest.raises(variants.Unsupported) as e:
            attn(q, q, q, causal=causal)
        assert reasons[0] in str(e.value)
    else:
        assert attn(q, q, q, causal=causal).shape == q.shape


@pytest.mark.parametrize("name", variants.available())
def test_flops_are_positive_and_backward_costs_more(name):
    attn = small(name, seq_len=256)
    shape = dict(batch=1, heads=2, seq_len=256, head_dim=8)
    fwd = attn.flops(**shape)
    assert fwd > 0
    assert attn.flops(**shape, backward=True) > fwd
