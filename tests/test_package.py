"""The package's shape: imports run one way, start-up stays cheap, and the README's code is true."""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, Set

import pytest

import mixnet

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "mixnet"
README = ROOT / "README.md"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports() -> Dict[str, Set[str]]:
    """Each mixnet module -> the mixnet modules it imports anywhere in its body (lazy imports included)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # "from pkg import submodule" imports the submodule; "from mod import name" the module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def find_cycle(graph: Dict[str, Set[str]]):
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_walker_sees_real_edges():
    graph = package_imports()
    assert "mixnet.models.network" in graph["mixnet.factory"]
    assert "mixnet.pretrained.download" in graph["mixnet.pretrained.checkpoint"]  # "from . import download"
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_anywhere_in_the_package():
    cycle = find_cycle(package_imports())
    assert cycle is None, " -> ".join(cycle)


def test_layers_import_only_downwards():
    graph = package_imports()
    allowed = {  # each layer and the mixnet modules it may use
        "mixnet.models": ("mixnet.models",),
        "mixnet.data": ("mixnet.data", "mixnet.errors", "mixnet.fileio"),
        "mixnet.pretrained": ("mixnet.pretrained", "mixnet.models", "mixnet.data", "mixnet.errors",
                              "mixnet.fileio"),
    }
    for module, edges in graph.items():
        for layer, ok in allowed.items():
            if module.startswith(layer):
                bad = sorted(e for e in edges if not e.startswith(ok))
                assert not bad, f"{module} imports {bad}"


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_help_and_import_load_neither_torch_nor_the_trainer():
    out = run_python("import sys, contextlib, io\n"
                     "import mixnet\n"
                     "from mixnet.cli import main\n"
                     "with contextlib.redirect_stdout(io.StringIO()):\n"
                     "    try: main(['--help'])\n"
                     "    except SystemExit: pass\n"
                     "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'matplotlib') "
                     "or m.startswith('mixnet.training.loop')))")
    assert out.strip() == "[]"


def test_list_needs_nothing_beyond_torch_and_torchvision():
    out = run_python("import sys, contextlib, io\n"
                     "from mixnet.cli import main\n"
                     "with contextlib.redirect_stdout(io.StringIO()) as f:\n"
                     "    code = main(['list'])\n"
                     "assert code == 0 and 'mixnet_xl' in f.getvalue(), f.getvalue()\n"
                     "heavy = ('matplotlib', 'onnx', 'onnxruntime', 'openvino', 'timm', 'huggingface_hub')\n"
                     "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy "
                     "or m.startswith(('mixnet.training.loop', 'mixnet.deploy.export'))))")
    assert out.strip() == "[]"


def test_every_public_name_resolves():
    for name in mixnet.__all__:
        assert getattr(mixnet, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nonesuch'"):
        mixnet.nonesuch  # noqa: B018


def test_version_comes_from_the_installed_metadata():
    from importlib.metadata import version

    assert mixnet.__version__ == version("mixnet")


def readme_blocks(language: str):
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_python_block_runs_against_the_built_in_model(monkeypatch):
    monkeypatch.chdir(ROOT)
    blocks = readme_blocks("python")
    assert blocks, "the README has no python block"
    for block in blocks:
        # published weights would need the network; everything else runs as written
        code = block.replace('pretrained=True', 'pretrained=False')
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    results = namespace["results"]
    assert results[0].top[0].name == "tench"  # examples/tench.jpg, classified by the built-in model


def readme_commands():
    commands = []
    for block in readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("#", 1)[0].split("&&"):
                words = shlex.split(part)
                if words and words[0] == "mixnet":
                    commands.append(words[1:])
    return commands


def test_every_mixnet_command_in_the_readme_parses():
    from mixnet.cli import build_parser

    commands = readme_commands()
    assert len(commands) >= 8
    parser = build_parser()
    for words in commands:
        try:
            parser.parse_args(words)
        except SystemExit as e:
            pytest.fail(f"README: `mixnet {' '.join(words)}` does not parse (exit {e.code})")


@pytest.mark.parametrize("command,option,value,interval", [
    (["export", "mixnet_s", "-o", "x.ts"], "--tolerance", "nan", "(0, inf)"),
    (["quantize", "m", "--calibration", "c", "-o", "q"], "--min-agreement", "150", "[0, 100]"),
    (["quantize", "m", "--calibration", "c", "-o", "q"], "--min-agreement", "-1", "[0, 100]"),
    (["serve"], "--batch-timeout-ms", "30000", "[0, 30000)"),
    (["serve"], "--max-body-mb", "0", "(0, 1e+06]"),
    (["predict", "x.jpg"], "--crop-pct", "0", "(0, 1]")])
def test_a_number_outside_what_an_option_means_is_a_usage_error_naming_the_range(capsys, command, option, value,
                                                                                  interval):
    from mixnet.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([*command, option, value])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"argument {option}: must be in {interval}, got {value}")

