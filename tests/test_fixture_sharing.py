"""Fixtures shared across test files live in tests/conftest.py: no test module imports a fixture
from another test module (pytest would silently run a second copy of it, and flake8 needs noqa)."""
import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _fixtures(path: Path) -> set[str]:
    """Names of the functions in `path` decorated with pytest.fixture (with or without arguments)."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef):
            for d in node.decorator_list:
                target = d.func if isinstance(d, ast.Call) else d
                if isinstance(target, ast.Attribute) and target.attr == "fixture":
                    out.add(node.name)
    return out


def imported_fixtures(tests_dir: Path = TESTS) -> list[str]:
    found = []
    for path in sorted(tests_dir.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tests.test_"):
                source = tests_dir / (node.module.split(".", 1)[1] + ".py")
                shared = _fixtures(source) & {a.name for a in node.names}
                found += [f"{path.name} imports fixture {name} from {source.name}" for name in sorted(shared)]
    return found


def test_no_fixture_is_imported_from_another_test_module():
    assert not imported_fixtures(), imported_fixtures()


def test_the_check_sees_an_imported_fixture(tmp_path):
    (tmp_path / "test_a.py").write_text("import pytest\n\n@pytest.fixture(scope='module')\ndef store():\n    pass\n")
    (tmp_path / "test_b.py").write_text("from tests.test_a import store  # noqa: F401\n")
    assert imported_fixtures(tmp_path) == ["test_b.py imports fixture store from test_a.py"]
