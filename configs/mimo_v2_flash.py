"""The full MiMo-V2-Flash: 309B parameters, 15B active per token (SPEC.md)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Every architecture number of the report; training numbers of the 32k pre-training stage."""
    config = ml_collections.ConfigDict()
    config.model = model = ml_collections.ConfigDict()
    model.vocab_size = 152_576
    model.hidden_size = 4096
    model.num_layers = 48
    # Layer 0 and every 6th layer after it are global (0, 5, 11, ..., 47); the rest slide.
    model.global_period = 6
    model.layer_types = ""  # explicit comma-separated override, e.g. "global,sliding,..."
    model.num_dense_layers = 1
    model.mlp_types = ""
    model.sliding = ml_collections.ConfigDict(dict(
        num_heads=64, num_kv_heads=8, qk_head_dim=192, v_head_dim=128, rope_dim=64,
        rope_theta=10_000.0,
        # Keys a query sees, itself included: the query and the 128 tokens before it.
        sliding_window=129,
        attention_sink=True))
    model.full = ml_collections.ConfigDict(dict(
        num_heads=64, num_kv_heads=4, qk_head_dim=192, v_head_dim=128, rope_dim=64,
        rope_theta=640_000.0,  # 5_000_000.0 after the 256k context extension
        sliding_window=ml_collections.FieldReference(None, field_type=int),
        attention_sink=False))
    model.value_scale = 0.707
    model.dense_intermediate_size = 16_384
    model.moe_intermediate_size = 2048
    model.num_experts = 256
    model.num_experts_per_token = 8
    model.routed_scaling_factor = 1.0
    model.norm_eps = 1e-5
    model.init_std = 0.006
    model.num_mtp_heads = 1  # 3 for post-training and speculative decoding
    model.param_dtype = "float32"
    model.scan_layers = True
    # FP8 (e4m3, block-scaled) GEMMs in q/k/v, the dense FFN and the experts, as the report
    # pre-trains (mimo_jax/ops/fp8); o_proj, embedding and LM head stay bf16, the router float32.
    model.fp8 = True
    # How the model is computed (mimo_jax.config.RuntimeConfig): may change between runs of one
    # checkpoint, e.g. --config.model.runtime.moe_impl=ragged.
    model.runtime = runtime = ml_collections.ConfigDict()
    runtime.dtype = "bfloat16"
    runtime.attention_impl = "auto"
    runtime.attention_chunk_size = 128
    runtime.moe_impl = "expert_parallel"  # the one-device dispatch when experts are not split
    runtime.remat_policy = "full"
    runtime.expert_capacity_factor = 1.25  # receive buffer vs balanced load; 0 = dropless
    runtime.expert_transport = "auto"  # ragged_all_to_all on TPU/GPU

    # Input pipeline and optimisation of the 32k pre-training stage (SPEC.md). A real run points
    # data.train_sources at its corpus (e.g. array_record:/data/shards written by
    # `python -m mimo_jax.data.to_array_record`); the stdlib corpus only keeps the config runnable.
    config.data = data = ml_collections.ConfigDict()
    data.train_sources = "stdlib"
    data.eval_sources = ""  # "" = the held-out split of the train sources that have one
    data.seq_len = 32_768
    data.batch_size = 2048  # global, all processes together (the report's final batch)
    data.eval_batches = 16
    data.eval_percent = 5.0
    data.tokenizer = ""  # a tokenizer.json; "" = train a byte-level BPE of model.vocab_size
    data.tokenizer_train_bytes = 64_000_000
    data.add_eos = True
    data.text_document = "file"
    data.max_document_bytes = 0  # 0 = whole files; > 0 cuts them into pieces of whole lines
    data.jsonl_field = "text"
    data.seqio_split = "train"
    data.seqio_eval_split = "validation"
    data.seqio_feature = "targets"
    data.shuffle = True
    data.seed = 0
    data.num_workers = 8
    data.worker_buffer_size = 16

    config.train = train = ml_collections.ConfigDict()
    # 26T tokens at 2048 x 32k tokens per step.
    train.steps = 387_000
    train.learning_rate = 3.2e-4
    train.end_learning_rate = 1e-4
    train.warmup_fraction = 0.0019  # 50B of 26T tokens
    # SPEC.md does not give where the constant phase ends; 70% of the stage is assumed.
    train.decay_start_fraction = 0.7
    train.adam_b1 = 0.9
    train.adam_b2 = 0.95
    train.adam_eps = 1e-8
    train.weight_decay = 0.1
    train.clip_norm = 1.0
    train.grad_accum_steps = 16  # 2048 x 32k tokens a step, in 16 micro-batches
    train.mtp_loss_weight = 0.3
    train.balance_loss_weight = 1e-5
    train.bias_update_rate = 1e-3
    train.compute_dtype = ""  # "" = model.runtime.dtype
    train.seed = 0
    train.log_every = 10
    train.eval_every = 2000
    train.checkpoint_every = 1000
    train.keep_last = 3
    train.keep_every = 10_000
    train.async_checkpoint = True
    train.max_nan_steps = 5
    train.export_params = True
    train.progress = "auto"  # a bar on a terminal, log lines otherwise
    train.tensorboard = True
    train.plot = True
    train.num_devices = 0  # 0 = every device

    # Device mesh and sharding (mimo_jax/parallel): FSDP + expert + context parallelism within a
    # slice, data parallelism across slices. `python -m mimo_jax.plan --config ... --mesh v5p-512`
    # prints the bytes per device this needs; README "Choosing a mesh" explains the choices.
    config.mesh = mesh = ml_collections.ConfigDict()
    mesh.ici = "fsdp=-1,expert=16,context=2"  # within a slice; -1 fills the rest
    mesh.dcn = "data=-1"  # across slices (1 on a single slice)
    mesh.rules = "fsdp_ep_cp"  # a preset of mimo_jax.parallel.rules.PRESETS

    # A fresh run's first parameters: another run's workdir or params export (the previous
    # pretraining stage; configs/stages/); "" = a random initialisation.
    config.init_from = ""
    # Also carry init_from's AdamW moments (a training workdir's newest checkpoint), as a stage
    # continuing the previous one's optimisation may; False starts the optimizer fresh.
    config.init_from_optimizer = False
    return config
