"""Every link and every command in the README and docs/ (and the help's examples) is checked:

- links to files of the repository exist, and their #anchors are headings there; links to the web are
  only listed (nothing outside reaches these machines);
- `talkfarm` commands compose and pass farm.config.validate as written (as on a cluster, cluster=address:
  a GPU command is checked for its keys and values, not against this machine's kernels);
- `pip install` names extras that pyproject.toml has; `python -m pytest` paths and markers exist;
  Python snippets compile and import what they name; `docker build -f`, `kubectl apply/kustomize -k`
  name files and kustomizations that exist;
- the rest (the model hub, a Kubernetes or Ray cluster, a registry) cannot run here: each such program
  is listed in NOT_RUN_HERE, so a new kind of command fails until it is checked or listed; the command
  that `ray job submit` submits is checked as above.

The demo commands themselves run in tests/test_gpu.py and tests/test_k8s.py (`-m image`), and in CI.
"""

import ast
import importlib
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from farm.config import validate

REPO = Path(__file__).parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "jobs" / "demo" / "README.md"]
# Programs whose commands need what these machines do not have; the reason is in the comment.
NOT_RUN_HERE = {
    "huggingface-cli",  # the model hub
    "kubectl", "kind",  # a Kubernetes cluster (kustomizations and files they name are checked below)
    "docker",  # a container engine and registry (the Dockerfile it names is checked below)
    "ray",  # a Ray cluster with a job server
    "export", "CLUSTER",  # shell variables for the commands around them
}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def blocks(document: Path) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(document.read_text())]


def shell_commands(text: str) -> list[list[str]]:
    """The simple commands of a shell block: continuation lines joined (and lines inside a quote), comments
    dropped, split at &&."""
    commands, pending = [], ""
    for line in text.replace("\\\n", " ").splitlines():
        pending += line
        try:
            words = shlex.split(pending, comments=True)
        except ValueError:  # a quote goes on over the next line
            pending += "\n"
            continue
        pending = ""
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            commands.append(words[:cut])
            words = words[cut + 1:]
    return commands


def all_commands() -> list[tuple[str, list[str]]]:
    found = []
    for document in DOCUMENTS:
        for language, text in blocks(document):
            if language == "bash":
                found += [(document.name, words) for words in shell_commands(text)]
    return found


def help_examples() -> list[list[str]]:
    shown = subprocess.run([sys.executable, "-m", "farm.cli", "--help"], capture_output=True, text=True, cwd=REPO,
                           check=True).stdout
    return [shlex.split(line) for line in shown.splitlines() if line.startswith("  talkfarm ")]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(document: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in document.read_text().splitlines() if line.startswith("#")}


def test_every_link_to_a_file_of_the_repository_and_its_heading_exists():
    checked, web = 0, set()
    for document in DOCUMENTS:
        for target in LINK.findall(document.read_text()):
            if re.match(r"https?://", target):
                web.add(target)
                continue
            path, _, anchor = target.partition("#")
            linked = (document.parent / path).resolve() if path else document
            assert linked.exists(), f"{document.relative_to(REPO)}: link to {target}: no such file"
            if anchor:
                assert anchor in headings(linked), f"{document.relative_to(REPO)}: link to {target}: no such heading"
            checked += 1
    assert checked >= 2 and web  # the scan finds both kinds


def check_talkfarm(words: list[str]) -> None:
    overrides = [w for w in words[1:] if w != "..."]
    assert all(not w.endswith("=...") for w in overrides), words
    with initialize_config_module("conf", version_base=None):
        cfg = compose("config", overrides=overrides)
    if cfg.cluster.mode == "local":  # checked as on a cluster, where this machine's kernels do not matter
        with initialize_config_module("conf", version_base=None):
            cfg = compose("config", overrides=[*overrides, "cluster=address"])
    validate(cfg)


def check_pip(words: list[str]) -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for spec in words[2:]:
        if spec in ("-e", "-q"):
            continue
        if spec.startswith("."):
            wanted = re.fullmatch(r"\.(?:\[([\w,]+)\])?", spec)
            assert wanted, spec
            assert set(filter(None, (wanted.group(1) or "").split(","))) <= set(extras), spec
        else:
            assert spec == "torch==2.13.0", spec  # the CPU build, from the machine's local index


def check_python(words: list[str]) -> None:
    if words[1:3] == ["-m", "pytest"]:
        markers = {m.split(":")[0] for m in tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]}
        args = words[3:]
        for i, arg in enumerate(args):
            if arg.startswith("tests/"):
                assert (REPO / arg.split("::")[0]).is_file(), arg
            if arg == "-m":
                assert set(re.findall(r"\w+", args[i + 1])) - {"not", "and", "or"} <= markers, args[i + 1]
    else:
        assert words[1] == "-c", words
        check_snippet(words[2])


def check_snippet(code: str) -> None:
    """It compiles, and every module and name it imports exists."""
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)
        elif isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module}.{alias.name}"


def check_not_run(words: list[str]) -> None:
    if words[0] == "docker" and "-f" in words:
        assert (REPO / words[words.index("-f") + 1]).is_file(), words
    if words[0] == "kubectl" and "-k" in words:
        assert (REPO / words[words.index("-k") + 1] / "kustomization.yaml").is_file(), words
    if words[:2] == ["kubectl", "kustomize"]:
        assert (REPO / words[2] / "kustomization.yaml").is_file(), words
    if words[:3] == ["ray", "job", "submit"] and "--" in words:  # the entrypoint it submits
        CHECKS[words[words.index("--") + 1]](words[words.index("--") + 1:])


CHECKS = {"talkfarm": check_talkfarm, "pip": check_pip, "python": check_python}


@pytest.mark.parametrize("where, words", [*all_commands(), *(("--help", words) for words in help_examples())],
                         ids=lambda value: value if isinstance(value, str) else " ".join(value)[:60])
def test_every_command_of_the_documents_is_checked(where, words):
    program = words[0].split("=")[0]
    if program in CHECKS:
        CHECKS[program](words)
    else:
        assert program in NOT_RUN_HERE, f"{where}: {' '.join(words)}: a program this test neither checks nor lists"
        check_not_run(words)


def test_the_python_blocks_compile_and_import_what_they_name():
    snippets = [text for document in DOCUMENTS for language, text in blocks(document) if language == "python"]
    assert snippets
    for text in snippets:
        check_snippet(text)
