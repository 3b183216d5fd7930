"""The CLI as tools: every command is a module the registry finds, shared flags are declared once, a
command whose module cannot be imported is still listed with the reason, and the worked example of
docs/contributing.md runs as written."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

import kiln.cli
from kiln.cli import main, make_parser
from kiln.cli.base import Precision, Tool, register
from kiln.cli.base.tool import optional_extra

SRC = Path(kiln.cli.__file__).parents[1]
COMMANDS = {"bench", "build", "check", "compare", "demo", "diff", "inspect", "plugins", "run", "serve", "view"}


@pytest.fixture
def listed(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """``listed()`` → each command of `kiln --help` with its help line (unwrapped)."""
    monkeypatch.setenv("COLUMNS", "400")

    def get() -> dict[str, str]:
        with pytest.raises(SystemExit) as stop:
            main(["--help"])
        assert stop.value.code == 0
        out, commands, name = capsys.readouterr().out, {}, None
        for line in out.split("\noptions:")[0].splitlines():
            m = re.match(r"    ([a-z][a-z0-9-]*)(?:\s+(.*))?$", line)
            if m:
                name = m.group(1)
                commands[name] = m.group(2) or ""
            elif name and line.startswith("      "):
                commands[name] += " " + line.strip()
        return {k: v.strip() for k, v in commands.items()}
    return get


def test_help_lists_every_command(listed):
    commands = listed()
    assert COMMANDS <= set(commands), commands
    for name in COMMANDS:
        assert commands[name] and "unavailable" not in commands[name], (name, commands[name])


@pytest.mark.parametrize("flag", ["--plugins", "--shapes", "--min-shapes", "--fp32-layers", "--fallback", "--device",
                                  "--input", "--seed", "--json"])
def test_shared_flags_are_declared_once(flag):
    sources = {p: p.read_text() for p in (SRC / "cli").rglob("*.py")}
    where = [str(p.relative_to(SRC)) for p, text in sources.items() for _ in re.finditer(
        r"add_argument\(\s*['\"]" + re.escape(flag) + r"['\"]", text)]
    assert where == ["cli/base/groups.py"], where


_POSITIONAL = {"build": ["m.onnx", "-o", "m.kiln"], "run": ["m.kiln"], "bench": ["m.kiln"], "check": ["m.onnx"],
               "plugins": [], "compare": ["m.onnx"]}


@pytest.mark.parametrize("command", sorted(_POSITIONAL))
def test_each_command_takes_the_plugin_flag(command):
    args = make_parser().parse_args([command, *_POSITIONAL[command], "--plugins", "a.py", "--plugins", "mod"])
    assert args.plugins == ["a.py", "mod"]


@pytest.mark.parametrize("argv,precision", [(["build", "m.onnx", "-o", "m.kiln", "--tf32"], "tf32"),
                                            (["build", "m.onnx", "-o", "m.kiln"], "fp32"),
                                            (["compare", "m.onnx", "--bf16"], "bf16"), (["demo", "--fp16"], "fp16")])
def test_precision_group(argv, precision):
    assert Precision.of(make_parser().parse_args(argv)) == precision


@pytest.mark.parametrize("argv", [["compare", "m.onnx", "--tf32"], ["build", "m.onnx", "-o", "m.kiln", "--fp16",
                                                                      "--bf16"], ["demo", "--bf16"]])
def test_precision_flags_a_command_does_not_take_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"kiln( build)?: error: .*--(tf32|bf16)", err[0]), err


def test_a_second_command_of_one_name_is_refused():
    make_parser()                                               # registers the built-in commands
    with pytest.raises(TypeError, match="'build' is defined twice"):
        @register
        class Build(Tool):
            name = "build"


# ---- commands added as modules, and modules that fail to import ---------------------------------------------

@pytest.fixture
def extra_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A folder on kiln.cli's module search path: a module written there is found like the built-in ones."""
    folder = tmp_path / "commands"
    folder.mkdir()
    monkeypatch.setattr(kiln.cli, "__path__", [*kiln.cli.__path__, str(folder)])
    yield folder
    for path in folder.glob("*.py"):
        sys.modules.pop(f"kiln.cli.{path.stem}", None)


def test_a_command_whose_dependency_is_missing_is_listed_and_says_why(extra_commands, monkeypatch, capsys, engine,
                                                                     listed):
    (extra_commands / "island.py").write_text(
        "from kiln.cli.base import Tool, register\nimport kiln_test_missing_dependency\n\n\n"
        "@register\nclass Island(Tool):\n    name = 'island'\n")
    monkeypatch.setattr("importlib.metadata.requires", lambda dist: [
        "numpy>=1.24", 'kiln-test-missing-dependency>=1; extra == "test"',
        'kiln_test.missing-dependency>=1; extra == "islands"'] if dist == "kiln" else [])
    commands = listed()
    assert commands["island"] == ("(unavailable: No module named 'kiln_test_missing_dependency'; install it with: "
                                  "pip install 'kiln[islands]')"), commands
    assert COMMANDS <= set(commands)
    assert main(["island", "--port", "8", "model.onnx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kiln: error: The 'island' command is unavailable (kiln.cli.island failed to import): No module "
                   "named 'kiln_test_missing_dependency'; install it with: pip install 'kiln[islands]'."], err
    assert main(["inspect", str(engine)]) == 0                  # the other commands are unaffected
    assert "Layers (" in capsys.readouterr().out


def test_a_command_whose_flags_fail_to_load_is_listed(extra_commands, listed, capsys):
    (extra_commands / "late.py").write_text(
        "from kiln.cli.base import Tool, register\n\n\n@register\nclass Late(Tool):\n    name = 'late'\n\n"
        "    def add_arguments(self, parser):\n        import kiln_test_missing_flags_module\n")
    commands = listed()
    assert commands["late"] == "(unavailable: No module named 'kiln_test_missing_flags_module')", commands
    assert COMMANDS <= set(commands)
    assert main(["late", "x"]) == 2
    assert "kiln.cli.late failed to import" in capsys.readouterr().err


def test_a_module_with_a_bug_is_listed_and_raises_when_run(extra_commands, listed):
    (extra_commands / "broken.py").write_text("def broken(:\n    pass\n")
    (extra_commands / "empty.py").write_text("VALUE = 1\n")
    commands = listed()
    assert commands["broken"].startswith("(unavailable: SyntaxError: "), commands
    assert commands["empty"] == ("(unavailable: LookupError: kiln.cli.empty registers no command; decorate its "
                                 "Tool subclass with @register)"), commands
    with pytest.raises(SyntaxError):                            # a bug: its traceback, not a user error
        main(["broken"])


def test_optional_extra_reads_kiln_metadata(monkeypatch):
    monkeypatch.setattr("importlib.metadata.requires", lambda dist: [
        "onnx>=1.16", 'onnxruntime>=1.18; extra == "test"', 'onnxruntime>=1.18; extra == "fallback"',
        'grpcio>=1.60; extra == "serve"', 'grpcio>=1.60; extra == "ray"', 'Ray[serve]>=2.9; extra == "ray"'])
    assert optional_extra("onnxruntime") == "fallback"         # never the test extra
    assert optional_extra("grpc") == "serve"                   # import name grpc is the grpcio distribution
    assert optional_extra("grpc", command="ray") == "ray"      # the extra named like the command first
    assert optional_extra("ray") == "ray"
    assert optional_extra("onnx") is None                      # a required dependency, not an extra
    assert optional_extra("pytest") is None


def _docs_example() -> str:
    text = (SRC.parents[1] / "docs" / "contributing.md").read_text()
    section = text.split("## Adding a CLI command", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_documented_example_command_runs(extra_commands, models, capsys, tmp_path, listed):
    (extra_commands / "ops.py").write_text(_docs_example())
    assert listed()["ops"] == "count an ONNX model's nodes by op type"
    assert main(["ops", str(models("two"))]) == 0
    assert capsys.readouterr().out.splitlines() == ["Relu 2"]
    assert main(["ops", str(models("two")), "--json"]) == 0
    assert capsys.readouterr().out.split() == ["{", '"Relu":', "2", "}"]
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    assert main(["ops", str(tmp_path / "bad.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a readable ONNX model" in err[0], err
