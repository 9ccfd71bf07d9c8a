"""FP8 (e4m3, block-scaled) mixed precision: the model's `fp8=True` path.

What is FP8, following DeepSeek-V3's recipe (MiMo-V2-Flash report, SPEC.md "Pre-training
recipe"): the q/k/v projections and the dense SwiGLU (gate/up/down) run `fp8_project`, whose
forward, dgrad and wgrad GEMMs all take e4m3 operands with power-of-two scales per 1x128 tile of
activations and gradients (along the contraction dimension; 128x1 along the tokens for wgrad) and
per 128x128 block of weights, accumulated in float32 (`matmul.py`). The routed experts get their
tokens, weights and output gradients rounded the same way around the dispatch (`experts.py`,
which lists the expert GEMM operands that stay in the compute dtype). The attention output
projection, embedding and LM head stay in the compute dtype (bf16), the router in float32; master
weights and optimizer moments are float32 as before.

What is emulated: the e4m3 values are real `jnp.float8_e4m3fn` arrays, but each GEMM multiplies
them after an exact dequantisation into the compute dtype (`dot_general` with float32
accumulation). The results are those of a block-scaled FP8 GEMM with float32 accumulation; the
speed of one needs a block-scaled FP8 tensor-core kernel, which JAX does not expose portably.
"""

from mimo_jax.ops.fp8.experts import expert_output, expert_tokens, expert_weights
from mimo_jax.ops.fp8.matmul import fp8_matmul, fp8_project, reference_matmul
from mimo_jax.ops.fp8.quantize import (E4M3, E4M3_MAX, TILE, Quantized, activation_tile, dequantize,
                                       power_of_two_scales, quantize, quantize_dequantize,
                                       weight_tile)

__all__ = [
    "E4M3", "E4M3_MAX", "TILE", "Quantized", "activation_tile", "dequantize", "expert_output",
    "expert_tokens", "expert_weights", "fp8_matmul", "fp8_project", "power_of_two_scales",
    "quantize", "quantize_dequantize", "reference_matmul", "weight_tile",
]
