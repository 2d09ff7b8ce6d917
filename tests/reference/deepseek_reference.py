"""A float64 forward pass of DeepseekV2ForCausalLM and DeepseekV3ForCausalLM in numpy.

Written from the equations of the Hugging Face modelling code the DeepSeek checkpoints ship
(modeling_deepseek.py, V2 and V3), not from moed: attention is computed in the plain
(non-absorbed) form with every head's keys and values rebuilt from the latent, RoPE in the
de-interleave + rotate-half form, and the routers as the remote code's MoEGate.
"""

import json
import math
import struct

import numpy as np


def load_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_len])
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        raw = data[base + begin : base + end]
        dtype = info["dtype"]
        if dtype == "BF16":
            values = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        elif dtype == "F16":
            values = np.frombuffer(raw, dtype="<f2")
        elif dtype == "F32":
            values = np.frombuffer(raw, dtype="<f4")
        else:
            raise ValueError(f"{name}: dtype {dtype} is not read here")
        tensors[name] = values.astype(np.float64).reshape(info["shape"])
    return tensors


def rms_norm(x, weight, eps):
    return weight * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def silu(x):
    return x / (1.0 + np.exp(-x))


def swiglu(x, weights, prefix):
    gate = x @ weights[prefix + "gate_proj.weight"].T
    up = x @ weights[prefix + "up_proj.weight"].T
    return (silu(gate) * up) @ weights[prefix + "down_proj.weight"].T


# ---- YaRN, as DeepseekV2YarnRotaryEmbedding computes it ----------------------------------


def yarn_find_correction_dim(num_rotations, dim, base, max_position):
    return (dim * math.log(max_position / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_find_correction_range(low_rot, high_rot, dim, base, max_position):
    low = math.floor(yarn_find_correction_dim(low_rot, dim, base, max_position))
    high = math.ceil(yarn_find_correction_dim(high_rot, dim, base, max_position))
    return max(low, 0), min(high, dim - 1)


def yarn_get_mscale(scale, mscale):
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_linear_ramp_mask(low, high, dim):
    if low == high:
        high += 0.001
    linear = (np.arange(dim, dtype=np.float64) - low) / (high - low)
    return np.clip(linear, 0, 1)


def rotary_cos_sin(config, positions):
    """cos and sin of shape [len(positions), rope_dim] (the halves repeated), YaRN-scaled."""
    dim = config["qk_rope_head_dim"]
    base = config.get("rope_theta", 10000.0)
    exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
    scaling = config.get("rope_scaling")
    magnitude = 1.0
    if scaling is None:
        inv_freq = 1.0 / (base**exponents)
    else:
        factor = scaling["factor"]
        freq_extra = 1.0 / (base**exponents)
        freq_inter = 1.0 / (factor * base**exponents)
        low, high = yarn_find_correction_range(
            scaling.get("beta_fast", 32),
            scaling.get("beta_slow", 1),
            dim,
            base,
            scaling["original_max_position_embeddings"],
        )
        inv_freq_mask = 1.0 - yarn_linear_ramp_mask(low, high, dim // 2)
        inv_freq = freq_inter * (1 - inv_freq_mask) + freq_extra * inv_freq_mask
        magnitude = yarn_get_mscale(factor, scaling.get("mscale", 1)) / yarn_get_mscale(
            factor, scaling.get("mscale_all_dim", 0)
        )
    freqs = np.outer(np.asarray(positions, dtype=np.float64), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb) * magnitude, np.sin(emb) * magnitude


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x, cos, sin):
    """x: [..., seq, dim] in the checkpoint's interleaved layout, as apply_rotary_pos_emb."""
    shape = x.shape
    deinterleaved = x.reshape(*shape[:-1], shape[-1] // 2, 2).swapaxes(-1, -2).reshape(shape)
    return deinterleaved * cos + rotate_half(deinterleaved) * sin


def softmax(x, axis=-1):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


# ---- the blocks -------------------------------------------------------------------------


def attention(config, weights, prefix, x, cos, sin):
    seq = x.shape[0]
    heads = config["num_attention_heads"]
    nope, rope = config["qk_nope_head_dim"], config["qk_rope_head_dim"]
    value_dim, rank = config["v_head_dim"], config["kv_lora_rank"]
    q_head_dim = nope + rope
    if config.get("q_lora_rank") is None:
        q = x @ weights[prefix + "q_proj.weight"].T
    else:
        q_low = rms_norm(x @ weights[prefix + "q_a_proj.weight"].T,
                         weights[prefix + "q_a_layernorm.weight"], 1e-6)
        q = q_low @ weights[prefix + "q_b_proj.weight"].T
    q = q.reshape(seq, heads, q_head_dim).transpose(1, 0, 2)  # [heads, seq, q_head_dim]
    q_nope, q_pe = q[..., :nope], q[..., nope:]
    compressed = x @ weights[prefix + "kv_a_proj_with_mqa.weight"].T
    latent, k_pe = compressed[:, :rank], compressed[:, rank:]
    kv = rms_norm(latent, weights[prefix + "kv_a_layernorm.weight"], 1e-6)
    kv = (kv @ weights[prefix + "kv_b_proj.weight"].T).reshape(seq, heads, nope + value_dim)
    kv = kv.transpose(1, 0, 2)
    k_nope, values = kv[..., :nope], kv[..., nope:]
    q_pe = apply_rotary(q_pe, cos, sin)
    k_pe = apply_rotary(k_pe[None, :, :], cos, sin)  # one rope key shared by all heads
    queries = np.concatenate([q_nope, q_pe], axis=-1)
    keys = np.concatenate([k_nope, np.broadcast_to(k_pe, (heads, seq, rope))], axis=-1)
    scale = q_head_dim**-0.5
    scaling = config.get("rope_scaling")
    if scaling is not None and scaling.get("mscale_all_dim", 0):
        mscale = yarn_get_mscale(scaling["factor"], scaling["mscale_all_dim"])
        scale = scale * mscale * mscale
    scores = queries @ keys.transpose(0, 2, 1) * scale
    scores = scores + np.triu(np.full((seq, seq), -np.inf), k=1)
    out = softmax(scores) @ values  # [heads, seq, value_dim]
    out = out.transpose(1, 0, 2).reshape(seq, heads * value_dim)
    return out @ weights[prefix + "o_proj.weight"].T


def route(config, weights, prefix, x, ignore_groups=False, ignore_bias=False):
    """Each token's experts and weights, as the V2 or V3 MoEGate chooses them (the flags drop
    the group limit or the correction bias, for tests that show those change the choice)."""
    v3 = config["architectures"][0] == "DeepseekV3ForCausalLM"
    logits = x @ weights[prefix + "gate.weight"].T
    experts = config["n_routed_experts"]
    top_k = config["num_experts_per_tok"]
    n_group = config.get("n_group") or 1
    topk_group = config.get("topk_group") or 1
    scoring = config.get("scoring_func", "sigmoid" if v3 else "softmax")
    method = config.get("topk_method", "noaux_tc" if v3 else "greedy")
    scores = softmax(logits) if scoring == "softmax" else 1.0 / (1.0 + np.exp(-logits))
    if method == "noaux_tc":
        bias = weights[prefix + "gate.e_score_correction_bias"]
        choice = scores + (0 if ignore_bias else bias)
        group_scores = np.sort(choice.reshape(-1, n_group, experts // n_group), axis=-1)
        group_scores = group_scores[..., -2:].sum(axis=-1)
    else:
        choice = scores
        group_scores = choice.reshape(-1, n_group, experts // n_group).max(axis=-1)
    if method in ("noaux_tc", "group_limited_greedy") and not ignore_groups:
        kept_groups = np.argsort(-group_scores, axis=-1, kind="stable")[:, :topk_group]
        mask = np.zeros_like(group_scores, dtype=bool)
        np.put_along_axis(mask, kept_groups, True, axis=-1)
        mask = np.repeat(mask, experts // n_group, axis=-1)
        choice = np.where(mask, choice, -np.inf)
    chosen = np.argsort(-choice, axis=-1, kind="stable")[:, :top_k]
    weight = np.take_along_axis(scores, chosen, axis=-1)
    renormalize = top_k > 1 and config.get("norm_topk_prob", False)
    factor = config.get("routed_scaling_factor", 1.0)
    if renormalize:
        weight = weight / (weight.sum(axis=-1, keepdims=True) + 1e-20)
    if v3 or not renormalize:  # V2 scales only weights it did not renormalise
        weight = weight * factor
    return chosen, weight


def moe(config, weights, layer, x, trace):
    prefix = f"model.layers.{layer}.mlp."
    chosen, weight = route(config, weights, prefix, x)
    if trace is not None:
        trace.append({
            "chosen": chosen,
            "without_groups": route(config, weights, prefix, x, ignore_groups=True)[0],
            "without_bias": route(config, weights, prefix, x, ignore_bias=True)[0],
        })
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for expert, w in zip(chosen[t], weight[t]):
            out[t] += w * swiglu(x[t : t + 1], weights, f"{prefix}experts.{expert}.")[0]
    if config.get("n_shared_experts"):
        out += swiglu(x, weights, prefix + "shared_experts.")
    return out


def forward(config, weights, tokens, trace=None):
    """Logits [len(tokens), vocab] of a causal pass over `tokens` from position 0; each MoE
    layer's choices appended to `trace` when given."""
    eps = config["rms_norm_eps"]
    h = weights["model.embed_tokens.weight"][np.asarray(tokens)]
    cos, sin = rotary_cos_sin(config, range(len(tokens)))
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = h + attention(config, weights, p + "self_attn.",
                          rms_norm(h, weights[p + "input_layernorm.weight"], eps), cos, sin)
        x = rms_norm(h, weights[p + "post_attention_layernorm.weight"], eps)
        is_moe = (layer >= config.get("first_k_dense_replace", 0)
                  and layer % config.get("moe_layer_freq", 1) == 0)
        h = h + (moe(config, weights, layer, x, trace) if is_moe else swiglu(x, weights, p + "mlp."))
    h = rms_norm(h, weights["model.norm.weight"], eps)
    return h @ weights["lm_head.weight"].T


def load(model_dir):
    with open(f"{model_dir}/config.json") as f:
        config = json.load(f)
    return config, load_safetensors(f"{model_dir}/model.safetensors")
