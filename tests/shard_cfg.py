"""Tiny configs for the sharding tests: every sharded size divisible by tp=4 and ep=2."""
import dataclasses

# applied to a model's SIZES["debug"] where the field exists
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=4,
            head_dim=16, num_hidden_layers=2, tie_word_embeddings=False, moe_intermediate_size=32, num_experts=8,
            num_experts_per_tok=2, shared_expert_intermediate_size=64, linear_num_key_heads=4,
            linear_num_value_heads=8, linear_key_head_dim=16, linear_value_head_dim=16)

# the first two meshes of each list also check a checkpoint saved on one and restored on the other
MESHES_JAX = {"dense": ["fsdp=8", "fsdp=2,tp=4"], "moe": ["fsdp=8", "fsdp=2,tp=4", "fsdp=2,tp=2,ep=2"],
              "next": ["fsdp=8", "fsdp=2,tp=4", "fsdp=2,tp=2,ep=2"]}
MESHES_TORCH = {"dense": ["fsdp=4", "fsdp=2,tp=2"], "moe": ["fsdp=4", "fsdp=2,tp=2", "fsdp=2,ep=2"],
                "next": ["fsdp=4", "fsdp=2,tp=2", "fsdp=2,ep=2"]}


def tiny_cfg(model):
    base = model.SIZES["debug"]
    fields = {f.name for f in dataclasses.fields(base)}
    cfg = dataclasses.replace(base, **{k: v for k, v in TINY.items() if k in fields})
    if "layer_types" in fields:  # Qwen3-Next: one repeating block (3 linear + 1 full) is enough
        cfg = dataclasses.replace(cfg, num_hidden_layers=4, layer_types=tuple(base.layer_types[:4]))
    return cfg


def kind(model):
    if any(f.name == "layer_types" for f in dataclasses.fields(model.Config)):
        return "next"
    return "moe" if any("experts" in p.axes for p in model.param_table(tiny_cfg(model)).values()) else "dense"
