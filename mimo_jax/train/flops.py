"""Model FLOPs per token, counted from the config, for throughput and MFU reports.

Counted: every matmul a token's forward pass needs (projections, the k experts it is routed to,
the router, the dense FFN, the LM head of the main model and of each MTP head, the MTP
projection) and the attention core (QK^T and PV) over the keys a query actually attends to: a
sliding-window layer sees min(W, t + 1) keys at position t, a global layer t + 1. Not counted:
norms, RoPE, softmax and other elementwise work (a few percent at this size, less at full size),
and work an implementation does beyond the model (experts computed for tokens not routed to them
by a dense dispatch, masked-out attention blocks, rematerialisation). Training = 3 x forward.
Legend: D model dim, N query heads, K KV heads, H q/k head dim, U value head dim, T row length,
W window, E experts, F ffn dim.
"""

from __future__ import annotations

import dataclasses

from mimo_jax.config import DENSE, AttentionConfig, ModelConfig


def mean_keys(seq_len: int, window: int | None) -> float:
    """Average keys attended per query over a row of `seq_len` tokens (causal, with window)."""
    w = seq_len if window is None else min(window, seq_len)
    total = w * (w + 1) / 2 + (seq_len - w) * w
    return total / seq_len


@dataclasses.dataclass(frozen=True)
class FlopsPerToken:
    """Forward FLOPs per token by part."""

    attention_projections: float
    attention_core_sliding: float
    attention_core_global: float
    dense_ffn: float
    routed_experts: float
    router: float
    lm_heads: float
    mtp_other: float

    @property
    def forward(self) -> float:
        return sum(dataclasses.astuple(self))

    @property
    def train(self) -> float:
        """Forward + backward (twice the forward)."""
        return 3.0 * self.forward


def _attention(cfg: AttentionConfig, d: int, seq_len: int) -> tuple[float, float]:
    """(projection FLOPs, core FLOPs) per token of one attention layer."""
    n, k, h, v = cfg.num_heads, cfg.num_kv_heads, cfg.qk_head_dim, cfg.v_head_dim
    projections = 2 * d * (n * h + k * h + k * v) + 2 * n * v * d
    core = 2 * n * (h + v) * mean_keys(seq_len, cfg.sliding_window)
    return projections, core


def flops_per_token(config: ModelConfig, seq_len: int, with_mtp: bool = True) -> FlopsPerToken:
    """Forward FLOPs per token of `config` on rows of `seq_len` tokens (one document per row)."""
    d = config.hidden_size
    parts = {f.name: 0.0 for f in dataclasses.fields(FlopsPerToken)}
    for layer_type, mlp_type in zip(config.layer_types, config.mlp_types):
        attn = config.attention(layer_type)
        projections, core = _attention(attn, d, seq_len)
        parts["attention_projections"] += projections
        key = "attention_core_sliding" if attn.sliding_window is not None else (
            "attention_core_global")
        parts[key] += core
        if mlp_type == DENSE:
            parts["dense_ffn"] += 3 * 2 * d * config.dense_intermediate_size
        else:
            parts["router"] += 2 * d * config.num_experts
            parts["routed_experts"] += (config.num_experts_per_token * 3 * 2 * d
                                        * config.moe_intermediate_size)
    parts["lm_heads"] += 2 * d * config.vocab_size
    if with_mtp:
        for _ in range(config.num_mtp_heads):
            projections, core = _attention(config.sliding, d, seq_len)
            parts["attention_projections"] += projections
            parts["attention_core_sliding"] += core
            parts["dense_ffn"] += 3 * 2 * d * config.dense_intermediate_size
            parts["mtp_other"] += 2 * (2 * d) * d  # eh_proj
            parts["lm_heads"] += 2 * d * config.vocab_size
    return FlopsPerToken(**parts)
