"""The Dockerfile's structure and the deploy README's commands and paths."""
import fnmatch
import json
import re

from tests.helpers.deploy import DEPLOY, ROOT


def dockerfile_instructions():
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    lines, current = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue  # comment inside a continuation
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    assert not current, "Dockerfile ends inside a line continuation"
    out = []
    for line in lines:
        instruction, _, rest = line.strip().partition(" ")
        out.append((instruction.upper(), rest.strip()))
    return out


def test_dockerfile_structure():
    instructions = dockerfile_instructions()
    names = [i for i, _ in instructions]
    args = {}
    for inst, rest in instructions:
        if inst == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args.setdefault(key, value.strip('"'))
    (base,) = [rest for inst, rest in instructions if inst == "FROM"]
    base = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], base)
    assert re.match(r"(nvidia/cuda|pytorch/pytorch):\S*(cuda|cudnn|runtime|devel)", base), base

    users = [(k, rest) for k, (inst, rest) in enumerate(instructions) if inst == "USER"]
    entry_at = names.index("ENTRYPOINT")
    assert users and users[-1][0] < entry_at
    assert users[-1][1] not in {"root", "0"} and not users[-1][1].startswith(("root:", "0:"))
    assert json.loads(dict(instructions)["ENTRYPOINT"]) == ["fapool"]
    assert json.loads(dict(instructions)["CMD"])[0] == "serve"
    exposed = {p for inst, rest in instructions if inst == "EXPOSE" for p in rest.split()}
    assert {"8000", "8265"} <= exposed
    health = dict(instructions)["HEALTHCHECK"]
    assert "/health" in health and "python" in health and "curl" not in health
    runs = " ".join(rest for inst, rest in instructions if inst == "RUN")
    assert re.search(r"pip install [^&;]*\"?\.(\$\{EXTRAS|\"|\s|$)", runs)


def test_dockerfile_copies_exist_and_are_not_dockerignored():
    ignore = [p.strip().rstrip("/") for p in (ROOT / ".dockerignore").read_text().splitlines()
              if p.strip() and not p.startswith("#")]
    pyproject = (ROOT / "pyproject.toml").read_text()
    copied = set()
    for inst, rest in dockerfile_instructions():
        if inst != "COPY":
            continue
        sources = [s for s in rest.split()[:-1] if not s.startswith("--")]
        for source in sources:
            copied.add(source)
            if "*" not in source:  # wildcard sources are optional by design
                assert (ROOT / source).exists(), f"COPY {source}: missing"
            for pattern in ignore:
                assert not fnmatch.fnmatch(source, pattern), f"COPY {source} is excluded by .dockerignore {pattern}"
    for package in re.search(r"include = \[([^\]]*)\]", pyproject).group(1).replace('"', "").split(","):
        assert package.strip().rstrip("*") in copied, f"package {package} not copied into the image"


# ---------------------------------------------------------------- README

def test_deploy_readme_commands_and_paths():
    text = (DEPLOY / "README.md").read_text()
    for command in (
        "fapool serve",
        "ray start --head",
        "serve run deploy/serve_config.yaml",
        "serve deploy deploy/serve_config.yaml",
        "ray job submit --working-dir . -- python -m serve.batch --input /shared/prompts.jsonl --output /shared/out",
        "ray job submit --working-dir . -- python -m bench.run --preset tiny",
        "kubectl apply -f deploy/kuberay/rayservice.yaml",
        "ray up deploy/ray-cluster.yaml",
        "docker build -t fapool:latest .",
        "fapool-dashboard.json",
    ):
        assert command in text, command
    for path in set(re.findall(r"\bdeploy/[\w./-]+\.(?:yaml|json)", text)):
        assert (ROOT / path).exists(), path
    from fapool.config import PRESETS
    from serve.batch.lines import BatchRequest, parse_line

    for line in re.findall(r"^\{.*\}$", text, flags=re.M):  # the JSONL examples are valid batch lines
        req = parse_line(1, line)
        assert isinstance(req, BatchRequest), req
        assert all(t < PRESETS["tiny"].vocab_size for t in req.prompt_token_ids or ()), line
