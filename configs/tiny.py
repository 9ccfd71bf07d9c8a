"""MiMo-V2-Flash's architecture at CPU size: every mechanism of the full model, small numbers."""

import ml_collections

from configs import mimo_v2_flash


def get_config() -> ml_collections.ConfigDict:
    """8 layers (global at 0 and 5, the rest sliding), 16 experts top-4, 2 MTP heads."""
    config = mimo_v2_flash.get_config()
    model = config.model
    model.vocab_size = 4096
    model.hidden_size = 128
    model.num_layers = 8
    model.sliding.update(num_heads=4, num_kv_heads=2, qk_head_dim=48, v_head_dim=32, rope_dim=16,
                         sliding_window=33)
    model.full.update(num_heads=4, num_kv_heads=1, qk_head_dim=48, v_head_dim=32, rope_dim=16)
    model.dense_intermediate_size = 512
    model.moe_intermediate_size = 64
    model.num_experts = 16
    model.num_experts_per_token = 4
    model.init_std = 0.02
    model.num_mtp_heads = 2
    # Plain GEMMs at CPU size: on CPU FP8 is an emulation (slower, no memory saved), and the
    # tests and demos derived from this config compare against these numbers. See
    # benchmarks/fp8_vs_bf16.py for the tiny model trained with --config.model.fp8=true.
    model.fp8 = False
    model.runtime.update(dtype="float32", attention_chunk_size=32, moe_impl="auto",
                         remat_policy="none", expert_capacity_factor=0.0)

    # A few minutes on 2 CPU cores: the embedded stdlib corpus in pieces of at most 2 KB (so every
    # batch mixes many files), short rows, warm-up then cosine, ~150k tokens in all.
    data = config.data
    data.seq_len = 128
    data.batch_size = 8
    data.eval_batches = 4
    data.max_document_bytes = 2048
    data.tokenizer_train_bytes = 4_000_000
    data.num_workers = 0  # tokenising in-process is fast enough for this batch
    train = config.train
    train.steps = 150
    train.grad_accum_steps = 1
    train.learning_rate = 3e-3
    train.end_learning_rate = 3e-4
    train.warmup_fraction = 0.05
    train.decay_start_fraction = 0.3
    # A short run needs a faster router-bias rule than pre-training's 1e-3 to balance its experts.
    train.bias_update_rate = 1e-2
    train.log_every = 10
    train.eval_every = 50
    train.checkpoint_every = 50
    train.keep_every = 0
    # Pure FSDP over whatever devices there are (one CPU device: no split).
    config.mesh.update(ici="fsdp=-1", dcn="", rules="fsdp")
    return config
