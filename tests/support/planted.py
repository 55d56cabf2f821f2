"""A tiny Llama with one hand-made induction head and one hand-made echo head.

The profiler's job is to find retrieval heads in a trained model, where nobody knows the right answer.
This module builds a model where the answer is known by construction, so a test can demand that the
profiler selects exactly the planted heads.

Construction (everything is positional, so token ids do not matter):

* Every token embedding is the same vector and o_proj / the MLP are zero, so the residual stream never
  changes: every position of every layer sees the same normalised hidden state x. Then q = W_q x and
  k = W_k x are the same pre-RoPE vectors at every position, and only RoPE makes them differ.
* head_dim 16 gives 8 RoPE pairs. With linear RoPE scaling (rope_theta 256, factor
  2500 / (2*pi*128)) the pair frequencies are omega_p = 2*pi*k_p / N with k_p = 128, 64, ..., 1 and
  N = PERIOD = 2500, the profiler's default copy length. Every frequency is a whole number of turns per
  N positions, so attention logits repeat exactly with period N.
* With every pair of q set to (a, 0) and the matching pair of k of the same norm, the post-RoPE logit of
  query i and key j is scale * a^2 * sum_p cos(omega_p * (j - i - delta)), where delta is the angle
  offset built into k. It is maximal exactly where j - i - delta is a multiple of N; the runner-up
  (|j - i - delta| = 1 mod N) is lower by scale * a^2 * 0.069, which SHARPNESS makes ~28 logits, so
  the softmax puts essentially all mass on the peaks.
    - echo head:      k = q per pair (delta = 0): peaks at j = i - m*N (and at j = i itself);
    - induction head: k = q rotated by -omega_p per pair (delta = 1): peaks at j = i + 1 - m*N.
* All other query heads have q = 0, i.e. uniform attention, whose scores are ~1/position.

GQA layout (4 query heads, 2 KV heads, so query head h uses KV head h // 2):

* layer 0, query head 2 -> KV head 1: echo head;
* layer 1, query head 0 -> KV head 0: induction head.
"""

from __future__ import annotations

import math

import torch

PERIOD = 2500
"""Copy length n of the calibration input the planted heads are tuned to (the profiler's default)."""

HIDDEN = 64
HEAD_DIM = 16
NUM_HEADS = 4
NUM_KV_HEADS = 2
NUM_LAYERS = 2
VOCAB = 64
BOS = 1

ECHO_HEAD = (0, 2)
"""(layer, query head) of the planted echo head; its KV head is 2 // 2 = 1."""
INDUCTION_HEAD = (1, 0)
"""(layer, query head) of the planted induction head; its KV head is 0 // 2 = 0."""

SHARPNESS = 400.0
"""scale * a^2: the per-pair logit amplitude. The runner-up position is 0.069 * SHARPNESS ~ 28 logits
below a peak, far more than log(10,001 keys) ~ 9.2."""

RING_WAVENUMBERS = [128 >> p for p in range(HEAD_DIM // 2)]
"""k_p of the 8 RoPE pairs: omega_p = 2*pi*k_p / PERIOD."""


def planted_config():
    """LlamaConfig whose RoPE frequencies are exactly 2*pi*k/PERIOD for k = 128, 64, ..., 1.

    transformers 5.x computes linear-scaled RoPE as inv_freq_p = theta^(-2p/head_dim) / factor. With
    theta = 256 and head_dim 16 that is 2^-p / factor, and factor = PERIOD / (2*pi*128) turns it into
    2*pi*(128 / 2^p) / PERIOD. `expected_inv_freq` states this; tests compare it with the model's buffer.
    """
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS, num_key_value_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
        max_position_embeddings=4 * PERIOD + 64, bos_token_id=BOS, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "linear", "factor": PERIOD / (2 * math.pi * 128), "rope_theta": 256.0},
    )


def expected_inv_freq() -> torch.Tensor:
    """[8] float64: the RoPE frequencies the construction relies on."""
    return torch.tensor([2 * math.pi * k / PERIOD for k in RING_WAVENUMBERS], dtype=torch.float64)


def _pair_vector(angles: torch.Tensor, amplitude: float) -> torch.Tensor:
    """[HEAD_DIM] vector whose RoPE pair p (components p and p + 8, Llama's rotate_half layout) is
    amplitude * (cos angle_p, sin angle_p)."""
    return torch.cat([amplitude * torch.cos(angles), amplitude * torch.sin(angles)])


def build_planted_model():
    """The planted model, fp32 and sdpa, in eval mode. See the module docstring for the construction."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(planted_config()).to(torch.float32).eval()
    omega = expected_inv_freq()
    scale = HEAD_DIM ** -0.5
    amplitude = math.sqrt(SHARPNESS / scale)
    query = _pair_vector(torch.zeros(HEAD_DIM // 2, dtype=torch.float64), amplitude)
    echo_key = query  # delta = 0
    induction_key = _pair_vector(-omega, amplitude)  # pre-rotated by RoPE of position -1: delta = 1

    with torch.no_grad():
        # Constant input: all embeddings equal; RMSNorm maps ones(HIDDEN) to ones / sqrt(1 + eps).
        model.model.embed_tokens.weight.fill_(1.0)
        for layer_idx, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                        mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                lin.weight.zero_()
            # Only input column 0 is used: q = W_q[:, 0] * x_0 with x_0 = 1 / sqrt(1 + eps) for both
            # q and k, so the tiny eps factor scales the logits by (1 + eps)^-1 and moves no peak.
            for (planted_layer, q_head), key in ((ECHO_HEAD, echo_key), (INDUCTION_HEAD, induction_key)):
                if planted_layer != layer_idx:
                    continue
                kv_head = q_head // (NUM_HEADS // NUM_KV_HEADS)
                attn.q_proj.weight[q_head * HEAD_DIM:(q_head + 1) * HEAD_DIM, 0] = query.float()
                attn.k_proj.weight[kv_head * HEAD_DIM:(kv_head + 1) * HEAD_DIM, 0] = key.float()
    model.set_attn_implementation("sdpa")
    return model


def planted_profile_options(**overrides):
    """ProfileOptions for the planted model: the real n and repeats, ids inside its tiny vocabulary,
    and ratios that select exactly one of the 4 KV heads each (ceil(0.25 * 4) = 1)."""
    from razor_vllm.profile.profiler import ProfileOptions

    kw = dict(num_random_tokens=PERIOD, repeats=4, id_low=3, id_high=VOCAB, dtype="float32",
              induction_ratio=0.25, echo_ratio=0.25, progress=False)
    kw.update(overrides)
    return ProfileOptions(**kw)
