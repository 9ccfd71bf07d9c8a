"""What the TPU and GPU flash-attention kernels share: the block plan, the tile mask, the tile math.

Legend: B batch, T query/key length, N query heads, K KV heads, G = N // K, H q/k head dim,
U value head dim; bq/bk query/key block lengths; i a query block index, j a key block index.

Everything here is written on values (never on refs), so the same code runs inside a Mosaic (TPU)
kernel, a Triton (GPU) kernel and the Pallas interpreter. Scalar helpers accept Python ints (for the
static grid sizes) as well as traced int32 scalars (inside index maps and kernel bodies).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# lax.dot_general dimension numbers: contract the last dims (a @ b.T) or the usual (a @ b),
# and contract the first dims (a.T @ b).
NT = (((1,), (1,)), ((), ()))
NN = (((1,), (0,)), ((), ()))
TN = (((0,), (0,)), ((), ()))


def _div(a, b: int):
    """Floor division of a non-negative scalar (lax.div: a plain divide on every backend)."""
    return a // b if isinstance(a, int) else jax.lax.div(a, jnp.int32(b))


def _max(a, b):
    return max(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.maximum(a, b)


def _min(a, b):
    return min(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.minimum(a, b)


def _select(condition, if_true, if_false):
    if isinstance(condition, bool):
        return if_true if condition else if_false
    return jnp.where(condition, if_true, if_false)


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """Static tiling of one attention call: which key blocks each query block visits and back.

    A query at position p sees keys p-W+1..p (window W) or 0..p (window None). Query block i covers
    [i*bq, (i+1)*bq), so it needs key blocks kv_range(i); key block j is needed by query blocks
    q_range(j). `kv_steps`/`q_steps` are the widest such ranges: the length of the inner grid axis
    (TPU) or the most loop trips (GPU). With a window the cost is O(T * (bq + W)), not O(T^2).
    """

    seq_len: int  # T, the real length
    padded_len: int  # T rounded up to a multiple of both blocks
    block_q: int
    block_k: int
    window: int | None
    # False: every query sees every key (of its segment): the off-diagonal blocks of a
    # context-parallel causal layer, whose keys all precede its queries.
    causal: bool = True

    @staticmethod
    def make(seq_len: int, block_q: int, block_k: int, window: int | None,
             pad_multiple: int | None = None, causal: bool = True) -> "BlockPlan":
        """Pads T to a multiple of `pad_multiple` (default: the larger block)."""
        if not causal and window is not None:
            raise ValueError("a non-causal plan has no window")
        if window is not None and window >= seq_len:
            window = None  # the window reaches the first key from every query: plain causal
        multiple = pad_multiple or max(block_q, block_k)
        if multiple % block_q or multiple % block_k:
            raise ValueError(f"blocks {block_q} and {block_k} must divide the padding multiple "
                             f"{multiple}")
        padded = -(-seq_len // multiple) * multiple
        return BlockPlan(seq_len, padded, block_q, block_k, window, causal)

    @property
    def num_q_blocks(self) -> int:
        return self.padded_len // self.block_q

    @property
    def num_k_blocks(self) -> int:
        return self.padded_len // self.block_k

    @property
    def padded(self) -> bool:
        return self.padded_len != self.seq_len

    def kv_range(self, i):
        """First and last key block (inclusive) that query block i reaches; empty (last < first)
        for a block of padding queries only. Blocks of padding keys only are never visited."""
        if not self.causal:  # every real key block (padding-only query blocks too: no harm)
            return 0, (self.seq_len - 1) // self.block_k
        first_query = i * self.block_q
        last_query = _min(first_query + self.block_q - 1, self.seq_len - 1)
        lo = 0
        if self.window is not None:
            lo = _div(_max(first_query - self.window + 1, 0), self.block_k)
        hi = _div(_max(last_query, 0), self.block_k)
        return lo, _select(first_query > last_query, lo - 1, hi)

    def q_range(self, j):
        """First and last query block (inclusive) whose windows reach key block j; empty for a
        block of padding keys only. Blocks of padding queries only are never visited."""
        if not self.causal:  # every real query block
            return 0, (self.seq_len - 1) // self.block_q
        first_key = j * self.block_k
        last_key = _min(first_key + self.block_k - 1, self.seq_len - 1)
        lo = _div(first_key, self.block_q)
        last_query = self.seq_len - 1
        if self.window is not None:
            last_query = _min(last_key + self.window - 1, last_query)
        return lo, _select(first_key > last_key, lo - 1, _div(last_query, self.block_q))

    def kv_block(self, i, step):
        """The key block that grid step `step` of query block i fetches: past the end of the range
        it repeats the last block (which Pallas does not fetch again); always a valid index."""
        lo, hi = self.kv_range(i)
        return _min(lo + step, _max(hi, lo))

    def q_block(self, j, step):
        """The query block that step `step` of key block j fetches (as `kv_block`)."""
        lo, hi = self.q_range(j)
        return _min(lo + step, _max(hi, lo))

    @property
    def kv_steps(self) -> int:
        return max(hi - lo + 1 for lo, hi in map(self.kv_range, range(self.num_q_blocks)))

    @property
    def q_steps(self) -> int:
        return max(hi - lo + 1 for lo, hi in map(self.q_range, range(self.num_k_blocks)))

    def visited_pairs(self) -> int:
        """How many (query block, key block) tiles one head computes: the kernels' work."""
        return sum(hi - lo + 1 for lo, hi in map(self.kv_range, range(self.num_q_blocks)))


def tile_mask(q_pos: jax.Array, k_pos: jax.Array, plan: BlockPlan,
              q_seg: jax.Array | None = None, k_seg: jax.Array | None = None) -> jax.Array:
    """Which (query, key) pairs of a tile are visible; all arguments broadcast to the tile.

    Causal (unless the plan is not), inside the window, keys past the real length hidden (they
    are block padding), and with segments: same segment only, and a padding query (segment 0)
    sees nothing.
    """
    mask = k_pos <= q_pos if plan.causal else (k_pos >= 0) & (q_pos >= 0)
    if plan.window is not None:
        mask = mask & (k_pos > q_pos - plan.window)
    if plan.padded and q_seg is None:
        mask = mask & (k_pos < plan.seq_len)
    if q_seg is not None:
        mask = mask & (q_seg == k_seg) & (q_seg != 0)
    return mask


def initial_state(sink: jax.Array, shape: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """Running max and sum before any key: the sink is the first logit seen (m = sink, l = 1).

    A sink of -inf (no sink) starts from m = -inf, l = 0.
    """
    m = jnp.full(shape, sink, jnp.float32)
    # A select on the broadcast tile, not on the scalar: Triton mistypes a scalar select of floats.
    l = jnp.where(m > -jnp.inf, jnp.ones(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
    return m, l


def online_softmax_step(logits: jax.Array, mask: jax.Array, m_prev: jax.Array, l_prev: jax.Array):
    """One key tile of the online softmax.

    logits, mask: [bq, bk]. m_prev, l_prev: [bq, L], every column equal (L = 1, or 128 lanes on
    TPU). Returns (p [bq, bk], alpha [bq, L], m_next, l_next): the caller rescales its
    accumulator by alpha and adds p @ v. Rows that have seen nothing yet (m = -inf) shift by 0,
    so no NaN appears.
    """
    logits = jnp.where(mask, logits, -jnp.inf)
    m_next = jnp.maximum(m_prev, jnp.max(logits, axis=1, keepdims=True))
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    alpha = jnp.exp(m_prev - m_safe)
    p = jnp.exp(logits - m_safe[:, :1])
    l_next = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    return p, alpha, m_next, l_next


# The log-sum-exp of a row that sees nothing (no key, no sink): finite, so that the backward
# pass's exp(logit - lse) stays NaN-free, and low enough that merging blocks of keys by their
# log-sum-exps (context parallelism) gives such a block no weight.
EMPTY_ROW_LSE = -1e30


def finish_rows(m: jax.Array, l: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(1 / l or 0, log-sum-exp) per row; a row with nothing visible and no sink gets 0 and
    `EMPTY_ROW_LSE`."""
    seen = l > 0.0
    safe_l = jnp.where(seen, l, 1.0)
    inv_l = jnp.where(seen, 1.0 / safe_l, 0.0)
    lse = jnp.where(seen, m + jnp.log(safe_l), EMPTY_ROW_LSE)
    return inv_l, lse


def probabilities(logits: jax.Array, mask: jax.Array, lse: jax.Array) -> jax.Array:
    """Backward recomputation of the attention weights p = exp(a - lse) on visible pairs."""
    return jnp.where(mask, jnp.exp(logits - lse), 0.0)


def dot(a: jax.Array, b: jax.Array, dims) -> jax.Array:
    """A tile matmul with f32 accumulation whatever the input dtype."""
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)
