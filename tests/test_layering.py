"""The layering of `loralib`, checked on its source (ast; nothing is imported or run).

The layers, bottom up: the layer files (LoRA layers and their variants, the layer configuration and
the initialisations), the models (which build those layers), the training loop and run skeleton
(`loralib/train`), and the task families (`loralib/tasks`). The paper folders and the demo sit
outside the package and call into it, never the other way round. The rules:

(a) nothing under `loralib/models` imports `loralib.train` or `loralib.tasks`;
(b) a layer module (`LAYER_MODULES`) imports neither `loralib.models`, `loralib.train` nor `loralib.tasks`;
(c) nothing in `loralib` imports a paper folder or the demo (a top-level package named in
    `PAPER_FOLDERS`), nor loads a file from one by its path;
(d) nothing in `loralib/tasks` imports a paper folder (rule (c) for the task families, named apart).

What counts as an import: `import X`, `from X import y` (also `from . import y`, which imports the
submodule y), relative imports resolved against the importing module (`from ..train import loop` in
`loralib/models/gpt2.py` is `loralib.train.loop`), wherever they stand (inside functions too), and
`importlib.import_module` / `__import__` / `runpy.run_module` with a constant name (an f-string counts
by its constant prefix). A module X is "under" P when X == P or X starts with "P.". So the core's own
`loralib/lora2.py` (`from .lora2 import ...`, `loralib.lora2`) is not the top-level `lora2/` folder.

What counts as loading by path (rule (c)), precisely:
- a call of a by-path loader: `importlib.util.spec_from_file_location`, `importlib.machinery`'s
  `SourceFileLoader` / `SourcelessFileLoader`, `runpy.run_path`, `imp.load_source`: the core loads no
  code by file path, so these have no legitimate use in it;
- a change of `sys.path` (`sys.path.insert/append/extend`, or assigning it): the way to make a paper
  folder importable;
- a path to a source file inside a paper folder (matching `SCRIPT_PATH`: "lora2/run_glue.py",
  "./data/make_wordnet_glue.py", "scripts/x.sh") spelled by a string constant, a `/` chain
  (`root / "examples" / "NLU" / "run_glue.py"`) or an `os.path.join(...)`, read from their constant
  pieces: how a loader or a subprocess names an entry point. Not counted: docstrings, texts shown to
  a user (the `help=`, `prog=`, `usage=`, `description=`, `epilog=` of a call, a parameter default named
  `prog`), and strings with whitespace (messages): naming a script is not loading it.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Top-level folders of the repository that are not the core: one per paper, the per-row scripts, the data
# preparation scripts, and the demo.
PAPER_FOLDERS = ("examples", "lora2", "loraplus", "lorapro", "scripts", "data", "demo")
# The modules that define layers and how they are configured and initialised (rule (b)).
LAYER_MODULES = ("loralib.layers", "loralib.adalora", "loralib.lora2", "loralib.dora", "loralib.config",
                 "loralib.init_methods", "loralib.svd_form", "loralib.inject")
SCRIPT_PATH = re.compile(r"^(\./)?(" + "|".join(PAPER_FOLDERS) + r")/\S*\.(py|sh)$")
_PATH_LOADERS = ("spec_from_file_location", "SourceFileLoader", "SourcelessFileLoader", "run_path", "load_source")
_BY_NAME_IMPORTERS = ("import_module", "__import__", "run_module")
_USER_TEXT_KEYWORDS = ("help", "prog", "usage", "description", "epilog")


@dataclass(frozen=True)
class Violation:
    path: str  # relative to the repository root, e.g. "loralib/models/gpt2.py"
    line: int
    rule: str  # "a", "b", "c" or "d" (module docstring)
    detail: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: rule ({self.rule}): {self.detail}"


def module_name(path: str) -> Tuple[str, bool]:
    """("loralib.models.gpt2", False) for "loralib/models/gpt2.py"; ("loralib.models", True) for its __init__."""
    parts = list(Path(path).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _dotted(node: ast.AST) -> str:
    """"importlib.util.spec_from_file_location" for that attribute chain; "" when it is not one."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _constant_prefix(node: ast.AST) -> Optional[str]:
    """The text of a str constant, or the constant start of an f-string; None otherwise."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        text = ""
        for piece in node.values:
            if not (isinstance(piece, ast.Constant) and isinstance(piece.value, str)):
                return text
            text += piece.value
        return text
    return None


def imported_names(node: ast.AST, module: str, is_package: bool) -> List[str]:
    """The absolute module names an import statement or a by-name import call brings in."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            package = module.split(".") if is_package else module.split(".")[:-1]
            base = package[:len(package) - (node.level - 1)]
        else:
            base = []
        source = ".".join(base + (node.module.split(".") if node.module else []))
        return [source] + [f"{source}.{alias.name}" for alias in node.names if alias.name != "*"]
    if isinstance(node, ast.Call) and node.args and _dotted(node.func).split(".")[-1] in _BY_NAME_IMPORTERS:
        text = _constant_prefix(node.args[0])
        if text and not text.startswith("."):
            complete = isinstance(node.args[0], ast.Constant)
            name = text if complete else text.rpartition(".")[0]  # only the dotted part the f-string fixes
            return [name] if name else []
    return []


def _docstrings(tree: ast.Module) -> set:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def _user_texts(tree: ast.Module) -> set:
    """ids of the nodes that are texts shown to a user: help=/prog=/... keywords, a `prog` parameter's default."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg in _USER_TEXT_KEYWORDS:
            found.add(id(node.value))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = args.posonlyargs + args.args
            for arg, default in zip(positional[len(positional) - len(args.defaults):], args.defaults):
                if arg.arg == "prog":
                    found.add(id(default))
            for arg, default in zip(args.kwonlyargs, args.kw_defaults):
                if arg.arg == "prog" and default is not None:
                    found.add(id(default))
    return found


def _path_pieces(node: ast.AST) -> Optional[List[str]]:
    """The constant pieces of a `/` chain (a / "b" / "c", Path("b") / "c") or an os.path.join call, from the
    first constant on; None when the node is neither or has no constant piece."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        pieces = []
        for side in (node.left, node.right):
            inner = _path_pieces(side)
            if inner is not None:
                pieces += inner
            elif isinstance(side, ast.Constant) and isinstance(side.value, str):
                pieces.append(side.value)
            elif pieces:
                return pieces  # a variable after a constant piece ends what is known
        return pieces or None
    if isinstance(node, ast.Call) and _dotted(node.func).split(".")[-1] in ("join", "Path", "PurePath", "joinpath"):
        pieces = []
        for arg in node.args:
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                pieces.append(arg.value)
            elif pieces:
                break
        return pieces or None
    return None


def _loads_by_path(node: ast.AST, skip: set) -> Optional[str]:
    """Why this node loads (or names for loading) a file of a paper folder by its path; None if it does not."""
    if isinstance(node, ast.Call):
        called = _dotted(node.func)
        if called.split(".")[-1] in _PATH_LOADERS:
            return f"calls {called}() (the core loads no code by file path)"
        if called in ("sys.path.insert", "sys.path.append", "sys.path.extend"):
            return f"changes sys.path ({called})"
    if isinstance(node, (ast.Assign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if any(_dotted(t) == "sys.path" for t in targets):
            return "assigns sys.path"
    if id(node) in skip:
        return None
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and SCRIPT_PATH.match(node.value):
        return f"names the script {node.value!r}"
    pieces = _path_pieces(node)
    if pieces and SCRIPT_PATH.match("/".join(p.strip("/") for p in pieces)):
        return f"builds the path {'/'.join(pieces)!r}"
    return None


def check_module(path: str, source: str) -> List[Violation]:
    """Every layering violation of one module of loralib. `path` is its path from the repository root
    ("loralib/models/gpt2.py"); it decides which rules apply and how relative imports resolve."""
    module, is_package = module_name(path)
    tree = ast.parse(source, filename=path)
    skip = _docstrings(tree) | _user_texts(tree)
    in_models, in_tasks = _under(module, "loralib.models"), _under(module, "loralib.tasks")
    is_layer = module in LAYER_MODULES
    found = {}  # (line, rule) -> the first violation found there
    for node in ast.walk(tree):
        for name in imported_names(node, module, is_package):
            if in_models and any(_under(name, p) for p in ("loralib.train", "loralib.tasks")):
                found.setdefault((node.lineno, "a"), f"a model module imports {name}")
            if is_layer and any(_under(name, p) for p in ("loralib.models", "loralib.train", "loralib.tasks")):
                found.setdefault((node.lineno, "b"), f"a layer module imports {name}")
            if name.split(".")[0] in PAPER_FOLDERS:
                found.setdefault((node.lineno, "d" if in_tasks else "c"), f"imports the paper folder module {name}")
        why = _loads_by_path(node, skip)
        if why:
            found.setdefault((node.lineno, "c"), why)
    return [Violation(path, line, rule, detail) for (line, rule), detail in sorted(found.items())]


def loralib_modules() -> Iterator[Tuple[str, str]]:
    for file in sorted((ROOT / "loralib").rglob("*.py")):
        yield file.relative_to(ROOT).as_posix(), file.read_text(encoding="utf-8")


def check_loralib() -> List[Violation]:
    return [v for path, source in loralib_modules() for v in check_module(path, source)]


# -- the package as it is ------------------------------------------------------------------------------

def test_loralib_keeps_its_layering():
    checked = [path for path, _ in loralib_modules()]
    # the walk really covers the package: the models, the layers, the loop and the task families
    for expected in ("loralib/models/gpt2.py", "loralib/adalora.py", "loralib/train/loop.py", "loralib/tasks/__init__.py"):
        assert expected in checked
    violations = check_loralib()
    assert not violations, "layering violations:\n" + "\n".join(map(str, violations))


def test_layer_modules_exist():
    """A renamed layer module must be renamed here too, or rule (b) would silently stop applying to it."""
    for name in LAYER_MODULES:
        assert (ROOT / (name.replace(".", "/") + ".py")).is_file(), name


# -- the checker catches violations ---------------------------------------------------------------------

def _rules(path: str, source: str) -> List[str]:
    return [v.rule for v in check_module(path, source)]


@pytest.mark.parametrize("source", [
    "from ..train import loop",
    "from ..train.loop import train",
    "from .. import tasks",
    "import loralib.train.loop as loop",
    "from loralib import train",
    "from loralib.tasks.glue import run",
    "def build():\n    from ..tasks.nlg import data\n    return data",
    "import importlib\nrun = importlib.import_module('loralib.tasks.glue.run')",
    "import importlib\nrun = importlib.import_module(f'loralib.train.{name}')",
])
def test_a_model_importing_train_or_tasks_is_caught(source):
    assert _rules("loralib/models/x.py", source) == ["a"]


def test_relative_imports_resolve_from_the_importing_module():
    assert _rules("loralib/models/__init__.py", "from ..train import loop") == ["a"]
    assert _rules("loralib/models/x.py", "from . import train") == []  # loralib.models.train, not loralib.train
    assert _rules("loralib/models/x.py", "from ..config import LoRAConfig\nfrom .lm_head import causal_lm_loss") == []
    assert _rules("loralib/tasks/glue/run.py", "from ...train import loop") == []  # tasks may use the loop


@pytest.mark.parametrize("path, source", [
    ("loralib/adalora.py", "from .models import gpt2"),
    ("loralib/layers.py", "from . import models"),
    ("loralib/lora2.py", "def f():\n    from loralib.models.llama import LlamaConfig"),
    ("loralib/config.py", "from .train.loop import train"),
    ("loralib/svd_form.py", "import loralib.tasks"),
])
def test_a_layer_importing_models_train_or_tasks_is_caught(path, source):
    assert _rules(path, source) == ["b"]


def test_the_core_lora2_module_is_not_the_lora2_folder():
    assert _rules("loralib/adalora.py", "from .lora2 import LoRA2Linear") == []
    assert _rules("loralib/methods.py", "from loralib.lora2 import LoRA2Linear\nfrom . import lora2") == []
    assert _rules("loralib/hf.py", "method = 'lora2'\nfolder = root / method") == []


@pytest.mark.parametrize("source", [
    "import examples.NLU.run_glue",
    "from lora2 import run_glue",
    "from loraplus.run_glue import main",
    "import lorapro.train as entry",
    "import scripts",
    "from data.make_wordnet_glue import main",
    "def demo():\n    import demo.glue",
    "import importlib\nentry = importlib.import_module('lora2.run_glue')",
])
def test_importing_a_paper_folder_is_caught(source):
    assert _rules("loralib/x.py", source) == ["c"]


def test_a_task_family_importing_a_paper_folder_is_caught_as_rule_d():
    assert _rules("loralib/tasks/instruct/run.py", "from lorapro.train import build_parser") == ["d"]
    assert _rules("loralib/tasks/glue/run.py", "def f():\n    import examples.NLU.run_glue") == ["d"]


@pytest.mark.parametrize("source", [
    "import importlib.util\nspec = importlib.util.spec_from_file_location('m', path)",
    "from importlib.util import spec_from_file_location\nspec = spec_from_file_location('m', p)",
    "import runpy\nrunpy.run_path(str(root / 'x.py'))",
    "from importlib.machinery import SourceFileLoader\nSourceFileLoader('m', p).load_module()",
    "import sys\nsys.path.insert(0, str(ROOT / 'examples' / 'NLU'))",
    "import sys\nsys.path = [folder] + sys.path",
    "import subprocess, sys\nsubprocess.run([sys.executable, 'loraplus/run_glue.py', '--smoke'])",
    "ENTRY_POINTS = {'nlu': 'examples/NLU/run_glue.py'}",
    "builder = load(REPO_ROOT / 'data/make_wordnet_glue.py')",
    "script = REPO_ROOT / 'lora2' / 'run_glue.py'",
    "script = Path('lorapro') / 'train.py'",
    "import os\nscript = os.path.join(ROOT, 'scripts', 'glue.sh')",
    "script = f'./examples/NLG/src/gpt2_ft.py'",
])
def test_loading_a_paper_folder_by_path_is_caught(source):
    assert "c" in _rules("loralib/x.py", source)


@pytest.mark.parametrize("source", [
    '"""Run examples/NLU/run_glue.py with the flags of the paper."""',
    '"""examples/NLU/run_glue.py"""',
    "class Entry:\n    'lora2/run_glue.py'",
    "def f():\n    '''Like lora2/run_glue.py.'''",
    "parser.add_argument('--data_dir', default='data/', help='see data/README.md and data/prep.py')",
    "def main(argv=None, prog='lorapro/train.py'):\n    pass",
    "raise FileNotFoundError('data/make_wordnet_glue.py could not build the tasks')",
    "folder = Path(args.data_dir) / 'glue' / 'train.tsv'",
    "method = 'lora2'\nname = 'loraplus'",
])
def test_texts_naming_a_paper_folder_are_not_violations(source):
    assert _rules("loralib/x.py", source) == []


def test_violations_name_file_line_and_rule():
    (v,) = check_module("loralib/models/x.py", "import torch\n\nfrom ..train import loop\n")
    assert (v.path, v.line, v.rule) == ("loralib/models/x.py", 3, "a")
    assert str(v) == "loralib/models/x.py:3: rule (a): a model module imports loralib.train"
