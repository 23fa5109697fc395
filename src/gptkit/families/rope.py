"""Rotary positions' settings as config.json states them, read in one place, and the one
implementation of their frequency scaling (used by the model with torch and by the GGUF
exporter with numpy).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from gptkit.errors import GptkitError

# rope_scaling kinds gptkit computes, with the parameters each needs
SCALING_KEYS = {"linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings")}
ROPE_TYPES = ("default", *SCALING_KEYS)


def parameters(hf: dict[str, Any], layer_type: str = "full_attention") -> dict[str, Any]:
    """transformers 5's rope_parameters (per layer type where a family has several), or the
    older rope_scaling with rope_theta beside it."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if isinstance(params, dict) and layer_type in params and "rope_type" not in params:
        params = params[layer_type] or {}
    return params


def from_hf(hf: dict[str, Any], source: str, layer_type: str = "full_attention",
            default_theta: float = 10000.0) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling or None) of a config.json, or one sentence why gptkit does
    not compute them."""
    params = parameters(hf, layer_type)
    if not isinstance(params, dict):
        raise GptkitError(f"{source} has rope_parameters {params!r}; expected an object.")
    theta = params.get("rope_theta", hf.get("rope_theta", default_theta))
    kind = params.get("rope_type", params.get("type", "default"))
    factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if factor not in (1, 1.0, None):
        raise GptkitError(f"{source} rotates only part of each head (partial_rotary_factor="
                          f"{factor}), which gptkit does not compute; it rotates whole heads.")
    if kind not in ROPE_TYPES:
        raise GptkitError(f"{source} uses rope_type {kind!r}, which gptkit does not compute; "
                          f"it supports rope_type {', '.join(ROPE_TYPES)}.")
    if kind == "default":
        return theta, None
    scaling = {key: params.get(key) for key in SCALING_KEYS[kind]}
    if kind == "llama3" and scaling["original_max_position_embeddings"] is None:
        scaling["original_max_position_embeddings"] = hf.get("max_position_embeddings")
    return theta, check_scaling({"rope_type": kind, **scaling}, source)


def check_scaling(scaling: Any, source: str = "Model config") -> dict[str, Any]:
    """A copy of a valid rope_scaling dict (transformers' rope_parameters without theta)."""
    kind = scaling.get("rope_type") if isinstance(scaling, dict) else None
    if kind not in SCALING_KEYS:
        raise GptkitError(f"{source} rope_scaling {scaling!r} is not supported; expected None "
                          f"or a dict with rope_type {' or '.join(map(repr, SCALING_KEYS))}.")
    values = {key: scaling.get(key) for key in SCALING_KEYS[kind]}
    bad = [key for key, value in values.items()
           if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0]
    if bad:
        raise GptkitError(f"{source} rope_scaling of type '{kind}' needs positive numbers "
                          f"for {', '.join(SCALING_KEYS[kind])}; got {scaling!r}.")
    return {"rope_type": kind, **values}


def scale_frequencies(inv_freq: Any, scaling: dict[str, Any] | None,
                      where: Callable[[Any, Any, Any], Any]) -> Any:
    """The angular frequencies (hs/2,) after `scaling`, computed as transformers does, on
    torch tensors or numpy arrays alike (`where` is torch.where or numpy.where).

    "linear" divides all by `factor`; "llama3" divides only the slow ones (wavelengths
    beyond the original context by `low_freq_factor`), keeps the fast ones and blends
    those in between.
    """
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    old_context = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelength = 2 * math.pi / inv_freq
    scaled = where(wavelength > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= old_context / high) & (wavelength <= old_context / low)
    return where(medium, blended, scaled)
