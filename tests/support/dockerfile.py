"""A small Dockerfile parser for the deployment tests (no Docker engine runs here or in CI):
instructions, continuation lines, ARG/ENV expansion, shell commands of RUN, pip invocations, and a
`.dockerignore` matcher."""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

KNOWN = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
         "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER"}
JSON_FORM = {"RUN", "CMD", "ENTRYPOINT", "SHELL"}


class DockerfileError(ValueError):
    pass


@dataclass
class Instruction:
    cmd: str
    """Upper-case instruction name."""
    rest: str
    """Everything after the name and the leading --flags, continuation lines joined with a space."""
    line: int
    flags: dict[str, str] = field(default_factory=dict)

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON (exec) form as a list, None for the shell form."""
        body = self.rest
        if self.cmd == "HEALTHCHECK":
            body = body.split(None, 1)[1] if body.upper().startswith("CMD ") else body
        if not body.lstrip().startswith("["):
            return None
        return json.loads(body)


@dataclass
class Dockerfile:
    path: Path
    instructions: list[Instruction]
    image: str
    """The FROM image with build args expanded."""
    env: dict[str, str]
    """ENV of the final image (values expanded as the builder does)."""
    args: dict[str, str]

    def all(self, cmd: str) -> list[Instruction]:
        return [i for i in self.instructions if i.cmd == cmd]

    def one(self, cmd: str) -> Instruction:
        found = self.all(cmd)
        assert len(found) == 1, f"{self.path.name}: expected one {cmd}, found {len(found)}"
        return found[0]

    def index(self, ins: Instruction) -> int:
        return self.instructions.index(ins)


def _expand(s: str, vars: dict[str, str]) -> str:
    """$VAR, ${VAR}, ${VAR:-default}, ${VAR:+alt}: the substitutions Dockerfiles support."""
    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        op, word = m.group(3), m.group(4)
        value = vars.get(name)
        if op == ":-":
            return value if value else _expand(word, vars)
        if op == ":+":
            return _expand(word, vars) if value else ""
        return value if value is not None else ""
    return re.sub(r"\$(?:([A-Za-z_][A-Za-z0-9_]*)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:[-+])([^}]*))?\})", sub, s)


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Join continuation lines (trailing backslash); comment and blank lines inside one are dropped."""
    out, buf, start = [], None, 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # outside an instruction: a comment (or parser directive); inside one: dropped
        if buf is None:
            buf, start = "", n
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1].strip() + " "
            continue
        buf += stripped
        out.append((start, buf))
        buf = None
    if buf is not None:
        raise DockerfileError(f"line {start}: the file ends inside a continuation line")
    return out


def parse_dockerfile(path: Path) -> Dockerfile:
    instructions = []
    for line, text in _logical_lines(path.read_text()):
        name, _, rest = text.partition(" ")
        cmd = name.upper()
        if cmd not in KNOWN:
            raise DockerfileError(f"{path.name}:{line}: unknown instruction {name!r}")
        if "<<" in rest and cmd in ("RUN", "COPY"):
            raise DockerfileError(f"{path.name}:{line}: heredocs are not supported by this parser")
        flags = {}
        rest = rest.strip()
        while cmd in ("COPY", "ADD", "RUN", "HEALTHCHECK", "FROM") and rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            key, _, value = flag[2:].partition("=")
            flags[key] = value
            rest = rest.strip()
        ins = Instruction(cmd, rest, line, flags)
        if cmd in JSON_FORM or cmd == "HEALTHCHECK":
            try:
                form = ins.exec_form
            except json.JSONDecodeError as e:  # Docker would silently run it as a shell string
                raise DockerfileError(f"{path.name}:{line}: {cmd} looks like JSON but is not: {e}") from e
            if form is not None and not all(isinstance(a, str) for a in form):
                raise DockerfileError(f"{path.name}:{line}: {cmd} JSON form must be a list of strings")
        instructions.append(ins)

    global_args: dict[str, str] = {}
    args: dict[str, str] = {}
    env: dict[str, str] = {}
    image = None
    for ins in instructions:
        if ins.cmd == "ARG":
            name, eq, default = ins.rest.partition("=")
            target = args if image else global_args
            if eq:
                target[name] = _expand(default.strip('"'), {**args, **env})
            elif image and name in global_args:
                target[name] = global_args[name]  # re-declared global ARG: its default comes along
            else:
                target.setdefault(name, "")
        elif ins.cmd == "FROM":
            if image is not None:
                raise DockerfileError(f"{path.name}: multi-stage builds are not expected here")
            image = _expand(ins.rest.split()[0], global_args)
        elif ins.cmd == "ENV":
            tokens = shlex.split(ins.rest)
            if tokens and "=" not in tokens[0]:  # legacy `ENV KEY value`
                tokens = [f"{tokens[0]}={' '.join(tokens[1:])}"]
            for tok in tokens:
                key, _, value = tok.partition("=")
                env[key] = _expand(value, {**args, **env})
        elif image is None:
            raise DockerfileError(f"{path.name}:{ins.line}: {ins.cmd} before FROM")
    if image is None:
        raise DockerfileError(f"{path.name}: no FROM")
    return Dockerfile(path, instructions, image, env, args)


def shell_commands(df: Dockerfile) -> list[str]:
    """The simple commands of every shell-form RUN, in order (split on &&, ||, ; and |, outside quotes)."""
    out = []
    for ins in df.all("RUN"):
        assert ins.exec_form is None, f"{df.path.name}:{ins.line}: RUN in exec form is not expected"
        out += [c for c in _split_commands(ins.rest) if c]
    return out


def _split_commands(s: str) -> list[str]:
    parts, cur, quote, i = [], "", None, 0
    while i < len(s):
        c = s[i]
        if quote:
            cur += c
            if c == "\\" and quote == '"' and i + 1 < len(s):
                cur += s[i + 1]
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote, cur = c, cur + c
        elif s.startswith(("&&", "||"), i):
            parts.append(cur.strip())
            cur, i = "", i + 1
        elif c in ";|":
            parts.append(cur.strip())
            cur = ""
        else:
            cur += c
        i += 1
    assert quote is None, f"unbalanced {quote} in {s!r}"
    parts.append(cur.strip())
    return parts


_PIP_VALUE_OPTS = {"-r", "--requirement", "-c", "--constraint", "-i", "--index-url", "--extra-index-url",
                   "-f", "--find-links", "-t", "--target", "--prefix", "--root", "-e", "--editable"}


@dataclass
class Pip:
    action: str
    tokens: list[str]
    reqs: list[str]
    """Positional requirement arguments (not option values)."""


def pip_commands(df: Dockerfile) -> list[Pip]:
    out = []
    for cmd in shell_commands(df):
        tokens = shlex.split(_expand(cmd, {**df.args, **df.env}))
        while tokens and "=" in tokens[0] and not tokens[0].startswith("-"):  # VAR=value prefixes
            tokens = tokens[1:]
        if tokens[:1] == ["export"]:
            continue
        if tokens and tokens[0].startswith("python") and tokens[1:3] == ["-m", "pip"]:
            tokens = ["pip"] + tokens[3:]
        if not tokens or tokens[0] not in ("pip", "pip3") or len(tokens) < 2:
            continue
        reqs, skip = [], False
        for tok in tokens[2:]:
            if skip:
                skip = False
            elif tok in _PIP_VALUE_OPTS:
                skip = True
            elif not tok.startswith("-"):
                reqs.append(tok)
        out.append(Pip(tokens[1], tokens, reqs))
    return out


def _req_name(req: str) -> str:
    return re.split(r"[=<>!~\[; ]", req, maxsplit=1)[0].lower()


def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):
                out, i = out + "(?:/)?", i + 1
            continue
        c = pattern[i]
        out += "[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c)
        i += 1
    return re.compile(out)


def dockerignore_rules(root: Path) -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in (root / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = line[1:] if neg else line
        rules.append((neg, _pattern_regex(os.path.normpath(pat).lstrip("/"))))
    return rules


def _ignored(rel: str, rules) -> bool:
    """Docker's semantics: the last rule matching the path or one of its parent folders decides."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    ignored = False
    for neg, rx in rules:
        if any(rx.fullmatch(p) for p in prefixes):
            ignored = not neg
    return ignored
