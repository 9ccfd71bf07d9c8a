"""Which Hugging Face tensor each parameter comes from, and how its layout changes.

torch `Linear` weights are [out, in]; ours are [in..., out...] with heads split out, e.g.
`q_proj.weight` [N*H, D] <-> `q_proj` [D, N, H] and `o_proj.weight` [D, N*U] <-> `o_proj` [N, U, D].
Experts load from either per-expert tensors (`mlp.experts.{e}.{gate,up,down}_proj.weight`, the
released layout and what `save_pretrained` writes) or transformers' fused parameters
(`mlp.experts.gate_up_proj` [E, 2F, D] with gate first, `mlp.experts.down_proj` [E, D, F]); they
are written per expert. MTP heads follow the released names under `model.mtp.layers.{k}.` (as
SGLang's and vLLM's MTP loaders read them): `enorm`, `hnorm`, `eh_proj`, the block's own names with
`pre_mlp_layernorm` for the post-attention norm, and `final_layernorm`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator, Union

import numpy as np

from mimo_jax.config import DENSE, ModelConfig
from mimo_jax.convert.weights import WeightReader

Path = tuple[str, ...]
# One tensor to write: (name, shape, producer of its values).
Export = tuple[str, tuple[int, ...], Callable[[], np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Same:
    """A tensor stored in our layout (norm scales, sinks, biases, the embedding table)."""

    names: tuple[str, ...]  # the name written, then alternatives accepted on load
    float32: bool = False  # stored in float32 whatever the export dtype (router state)

    def load(self, weights: WeightReader, shape: tuple[int, ...], dtype) -> np.ndarray:
        name = weights.first_present(self.names)
        return np.array(weights.get(name, shape), dtype=dtype)

    def export(self, shape: tuple[int, ...], get: Callable[[], np.ndarray]) -> list[Export]:
        return [(self.names[0], shape, get)]


@dataclasses.dataclass(frozen=True)
class Linear:
    """A torch [out, in] weight; our array has `in_axes` leading input axes, then output axes."""

    names: tuple[str, ...]
    in_axes: int = 1
    float32: bool = False

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return (math.prod(shape[self.in_axes:]), math.prod(shape[:self.in_axes]))

    def load(self, weights: WeightReader, shape: tuple[int, ...], dtype) -> np.ndarray:
        name = weights.first_present(self.names)
        return weights.get(name, self.hf_shape(shape)).T.reshape(shape).astype(dtype)

    def export(self, shape: tuple[int, ...], get: Callable[[], np.ndarray]) -> list[Export]:
        rows, cols = self.hf_shape(shape)
        return [(self.names[0], (rows, cols), lambda: get().reshape(cols, rows).T)]


@dataclasses.dataclass(frozen=True)
class Experts:
    """One projection ("gate", "up" or "down") of all experts: ours [E, D, F] (down: [E, F, D])."""

    prefix: str  # e.g. "model.layers.3.mlp.experts."
    proj: str

    def _per_expert(self, e: int) -> str:
        return f"{self.prefix}{e}.{self.proj}_proj.weight"

    def fused_name(self) -> str:
        return self.prefix + ("down_proj" if self.proj == "down" else "gate_up_proj")

    def pieces(self, weights: WeightReader, shape: tuple[int, ...],
               dtype) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
        """((e,), expert e's [D, F] weight) per expert of a checkpoint that stores them one by
        one; ((), all of them) from a fused [E, ...] tensor."""
        num_experts, d_in, d_out = shape
        fused = self.fused_name()
        if fused in weights:
            if self.proj == "down":
                yield (), weights.get(fused, (num_experts, d_out, d_in)).transpose(
                    0, 2, 1).astype(dtype)
                return
            both = weights.get(fused, (num_experts, 2 * d_out, d_in))
            half = both[:, :d_out] if self.proj == "gate" else both[:, d_out:]
            yield (), half.transpose(0, 2, 1).astype(dtype)
            return
        for e in range(num_experts):
            yield (e,), weights.get(self._per_expert(e), (d_out, d_in)).T.astype(dtype)

    def load(self, weights: WeightReader, shape: tuple[int, ...], dtype) -> np.ndarray:
        out = None
        for index, block in self.pieces(weights, shape, dtype):
            if not index:
                return block
            if out is None:
                out = np.empty(shape, dtype)
            out[index] = block
        return out

    def export(self, shape: tuple[int, ...], get: Callable[[], np.ndarray]) -> list[Export]:
        num_experts, d_in, d_out = shape
        return [(self._per_expert(e), (d_out, d_in), lambda e=e: get()[e].T)
                for e in range(num_experts)]


Source = Union[Same, Linear, Experts]


def _attention(prefix: str, sink: bool) -> dict[Path, Source]:
    attn = prefix + "self_attn."
    out: dict[Path, Source] = {
        ("attention", "q_proj"): Linear((attn + "q_proj.weight",)),
        ("attention", "k_proj"): Linear((attn + "k_proj.weight",)),
        ("attention", "v_proj"): Linear((attn + "v_proj.weight",)),
        ("attention", "o_proj"): Linear((attn + "o_proj.weight",), in_axes=2),
    }
    if sink:
        # The release calls it attention_sink_bias; transformers' own parameter is `sinks`.
        out[("attention", "sinks")] = Same((attn + "attention_sink_bias", attn + "sinks"))
    return out


def _dense_mlp(prefix: str) -> dict[Path, Source]:
    return {("mlp", proj): Linear((f"{prefix}mlp.{proj}_proj.weight",))
            for proj in ("gate", "up", "down")}


def layer_sources(config: ModelConfig, layer: int) -> dict[Path, Source]:
    """The sources of decoder layer `layer`'s parameters, keyed by path inside the layer."""
    prefix = f"model.layers.{layer}."
    layer_type, mlp_type = config.layer_types[layer], config.mlp_types[layer]
    out: dict[Path, Source] = {
        ("input_norm", "scale"): Same((prefix + "input_layernorm.weight",)),
        ("post_attention_norm", "scale"): Same((prefix + "post_attention_layernorm.weight",)),
    }
    out.update(_attention(prefix, config.attention(layer_type).attention_sink))
    if mlp_type == DENSE:
        out.update(_dense_mlp(prefix))
    else:
        out[("moe", "router")] = Linear((prefix + "mlp.gate.weight",), float32=True)
        out[("moe", "e_score_correction_bias")] = Same(
            (prefix + "mlp.gate.e_score_correction_bias",), float32=True)
        for proj in ("gate", "up", "down"):
            out[("moe", proj)] = Experts(prefix + "mlp.experts.", proj)
    return out


def mtp_sources(config: ModelConfig, head: int) -> dict[Path, Source]:
    """The sources of MTP head `head` (0-based), keyed by path inside `mtp_{head}`."""
    prefix = f"model.mtp.layers.{head}."
    out: dict[Path, Source] = {
        ("token_norm", "scale"): Same((prefix + "enorm.weight",)),
        ("hidden_norm", "scale"): Same((prefix + "hnorm.weight",)),
        ("eh_proj",): Linear((prefix + "eh_proj.weight",)),
        ("input_norm", "scale"): Same((prefix + "input_layernorm.weight",)),
        ("post_attention_norm", "scale"): Same((prefix + "pre_mlp_layernorm.weight",
                                                prefix + "post_attention_layernorm.weight")),
        ("final_norm", "scale"): Same((prefix + "final_layernorm.weight",)),
    }
    out.update(_attention(prefix, config.sliding.attention_sink))
    out.update(_dense_mlp(prefix))
    return out


def top_sources() -> dict[Path, Source]:
    """Embedding, final norm and LM head, keyed by their full parameter path."""
    return {
        ("embed", "embedding"): Same(("model.embed_tokens.weight",)),
        ("final_norm", "scale"): Same(("model.norm.weight",)),
        ("lm_head", "kernel"): Linear(("lm_head.weight",)),
    }


def stored_in_fp8(name: str) -> bool:
    """Whether the released FP8 checkpoint stores tensor `name` in FP8: the projections of the
    attention, MLPs, experts and MTP heads, except `o_proj`. Embeddings, the LM head, norms,
    sinks and the router stay in higher precision."""
    return name.endswith("proj.weight") and not name.endswith("o_proj.weight")


IGNORED_PREFIXES = ("model.rotary_emb.",)
MTP_PREFIX = "model.mtp.layers."


def count_mtp_heads(names: list[str]) -> int:
    """1 + the largest k of the `model.mtp.layers.{k}.*` tensor names (0 when there are none)."""
    heads = [n[len(MTP_PREFIX):].split(".", 1)[0] for n in names if n.startswith(MTP_PREFIX)]
    return max((int(k) + 1 for k in heads if k.isdigit()), default=0)
