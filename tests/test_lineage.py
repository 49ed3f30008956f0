"""Lineage: code dependencies derived from what each stage runs, runtimes in the cache keys,
package layering, and the installed package's names."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from haloquant.schemas.params import parse_params
from haloquant.tasks import ALL_STAGES, REPO, expand
from tests.conftest import small_params

LIBRARY = REPO / "haloquant"


def _params(**overrides):
    return parse_params(small_params(sweep={"bits_per_weight": [5.0], "presets": ["Q4_K_M"], "max_chunks": 1},
                                     **overrides), base_dir=REPO)


LOADED = """
import json, sys
from pathlib import Path
import haloquant.tasks.runner as runner  # the CLI's own modules: loaded before the stage runs
from haloquant.tasks import expand, ALL_STAGES
from haloquant.schemas.params import load_params
params = load_params(Path(sys.argv[1]))
stage = next(s for s in expand(ALL_STAGES, params) if s.name == sys.argv[2])
before = set(sys.modules)
stage.run(params, runner.artifacts_root(Path(sys.argv[1])))
new = sorted(m for m in set(sys.modules) - before if m.startswith("haloquant") and getattr(sys.modules[m], "__file__", None))
print(json.dumps({m: sys.modules[m].__file__ for m in new}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["plan_widening", "rotate", "calibrate", "sensitivity", "allocate", "scale_fold",
                                   "quantize", "export_gguf", "validate", "preset@Q4_K_M", "sweep@5.0", "pareto"])
def test_declared_code_covers_every_module_the_stage_runs(stage, pipeline_run, tmp_path):
    """Measured independently of the static import graph: the project modules that running the
    stage really loads (in a fresh process, beyond those the runner itself loads) are all among its
    declared code dependencies."""
    import shutil

    folder, _, _ = pipeline_run
    shutil.copytree(folder / "artifacts", tmp_path / "artifacts")
    params_file = tmp_path / "params.yaml"
    import yaml

    params_file.write_text(yaml.safe_dump(small_params(sweep={"bits_per_weight": [5.0], "presets": ["Q4_K_M"],
                                                              "max_chunks": 1})))
    if stage == "pareto":  # it reads the sweep points and presets: made here, outside the measured process
        from haloquant.schemas.params import load_params
        from haloquant.tasks.runner import artifacts_root

        params = load_params(params_file)
        for s in expand(ALL_STAGES, params):
            if s.name in ("sweep@5.0", "preset@Q4_K_M"):
                s.run(params, artifacts_root(params_file))
    r = subprocess.run([sys.executable, "-c", LOADED, str(params_file), stage], capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    loaded = {str(Path(f).resolve().relative_to(REPO)) for f in json.loads(r.stdout.strip().splitlines()[-1]).values()}
    declared = set(next(s for s in expand(ALL_STAGES, _params()) if s.name == stage).code)
    assert loaded <= declared, sorted(loaded - declared)


def test_a_code_edit_changes_exactly_the_keys_of_the_stages_that_run_it(monkeypatch, tmp_path):
    """The Prefect cache key of a stage hashes the files of the modules it can run: changing
    tasks/quantize.py changes quantize's key and every sweep point's and preset's (they quantize),
    nobody else's; the runner and the CLI are no stage's code. allocate runs the quantizer for
    allocation.refine, and train_policy evaluates with allocate's solvers: both have GPTQ's code."""
    import haloquant.tasks.runner as runner

    params = _params()
    stages = expand(ALL_STAGES, params)
    real = runner.sha256_tree
    keys = lambda: {s.name: runner.fingerprint(s, params, tmp_path) for s in stages}  # noqa: E731
    before = keys()
    for edited, expected in (("tasks/quantize.py", {"quantize", "sweep@5.0", "preset@Q4_K_M"}),
                             ("tasks/allocate.py", {"allocate", "sweep@5.0", "preset@Q4_K_M", "train_policy"}),
                             ("haloquant/gptq.py", {"sensitivity", "allocate", "quantize", "sweep@5.0", "preset@Q4_K_M",
                                                    "train_policy"}),
                             ("tasks/runner.py", set()), ("flows/cli.py", set())):
        monkeypatch.setattr(runner, "sha256_tree", lambda p, e=edited: "edited" if Path(p) == REPO / e else real(p))
        after = keys()
        assert {n for n in before if after[n] != before[n]} == expected, edited
    monkeypatch.setattr(runner, "sha256_tree", real)


def test_a_runtime_change_changes_the_keys_of_the_stages_that_declare_it(monkeypatch, tmp_path):
    """llama.cpp's build decides the k-quant bytes (each block keeps the better of haloquant's fit
    and llama.cpp's) and judges the GGUF: a different build is a different key for exactly the
    stages that run it."""
    import haloquant.environment as env
    import haloquant.tasks.runner as runner

    params = _params()
    stages = expand(ALL_STAGES, params)
    before = {s.name: runner.fingerprint(s, params, tmp_path) for s in stages}
    other = {**env.runtime_versions(("llama.cpp",))["llama.cpp"], "libraries": {"libggml-base.so": "another build"}}
    real = env.runtime_versions
    monkeypatch.setattr(runner, "runtime_versions",
                        lambda names: {**real(names), **({"llama.cpp": other} if "llama.cpp" in names else {})})
    after = {s.name: runner.fingerprint(s, params, tmp_path) for s in stages}
    changed = {n for n in before if after[n] != before[n]}
    assert changed == {s.name for s in stages if "llama.cpp" in s.runtimes}
    assert {"sensitivity", "allocate", "quantize", "validate", "sweep@5.0", "preset@Q4_K_M"} <= changed  # allocate:
    assert "calibrate" not in changed and "train_policy" not in changed  # allocation.refine quantizes


def test_block_tuning_is_quantize_s_param_not_sensitivity_s(tmp_path):
    """Sensitivity measures the quantizer (method, GPTQ settings, importance), not the block tuning
    that follows it: turning tuning on re-runs quantize and what uses it, never sensitivity."""
    import haloquant.tasks.runner as runner

    keys = lambda p: {s.name: runner.fingerprint(s, p, tmp_path) for s in expand(ALL_STAGES, p)}  # noqa: E731
    before, after = keys(_params()), keys(_params(**{"quantize.block_tuning.iters": 50}))
    assert {n for n in before if after[n] != before[n]} == {"quantize", "sweep@5.0"}  # presets: llama.cpp quantizes
    damp = keys(_params(**{"quantize.gptq.damp": 0.05}))
    assert {"sensitivity", "quantize"} <= {n for n in before if damp[n] != before[n]}


def test_without_llama_cpp_an_encode_is_refused_not_changed(monkeypatch):
    import numpy as np

    import haloquant.llamacpp as lc
    from haloquant import HaloquantError
    from haloquant.formats import get_format

    def missing():
        raise HaloquantError("validate.runtimes: llama_cpp requires the llama-cpp-python package (pip install -e .)")

    monkeypatch.setattr(lc, "_llama_cpp", missing)
    lc._ggml_lib.cache_clear()
    try:
        with pytest.raises(HaloquantError, match="llama-cpp-python"):
            get_format("Q4_K").encode(np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32))
    finally:
        lc._ggml_lib.cache_clear()


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return {n for n in names if n.split(".")[0] == "haloquant"}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ("schemas", "tasks", "flows") else "library"


FOLDER_OF = {"library": LIBRARY, "schemas": REPO / "schemas", "tasks": REPO / "tasks", "flows": REPO / "flows"}


def test_layers_import_one_way():
    """schemas ← library ← tasks ← flows. The library (haloquant/) imports
    neither the stages nor the flows; the schemas import no library module (only the package root's
    HaloquantError); and the four packages form no cycle."""
    edges: dict[str, set[str]] = {k: set() for k in FOLDER_OF}
    for layer, folder in FOLDER_OF.items():
        for f in folder.rglob("*.py"):
            for m in _imports(f):
                target = _layer(m)
                if target == layer or (layer == "schemas" and m == "haloquant"):
                    continue
                edges[layer].add(target)
                if layer == "library" and target in ("tasks", "flows"):
                    pytest.fail(f"{f.relative_to(REPO)} (the library) imports {m}")
                if layer == "schemas":
                    pytest.fail(f"{f.relative_to(REPO)} (a schema) imports {m}, a {target} module")
    assert not _has_cycle(edges), edges


def _has_cycle(edges: dict[str, set[str]]) -> bool:
    seen, stack = set(), set()

    def visit(n):
        if n in stack:
            return True
        if n in seen:
            return False
        seen.add(n)
        stack.add(n)
        found = any(visit(m) for m in edges[n])
        stack.discard(n)
        return found

    return any(visit(n) for n in edges)


def test_no_generic_top_level_package_is_installed():
    """schemas/, tasks/, flows/ install as haloquant.schemas, haloquant.tasks, haloquant.flows: no
    package named `schemas`, `tasks` or `flows` of this project is importable, and the editable
    install maps nothing but names under `haloquant`."""
    import site

    for finder in (f for d in site.getsitepackages() for f in Path(d).glob("__editable__*haloquant*finder.py")):
        line = next(ln for ln in finder.read_text().splitlines() if ln.startswith("MAPPING"))
        mapped = ast.literal_eval(line.split("=", 1)[1].strip())
        assert all(n == "haloquant" or n.startswith("haloquant.") for n in mapped), mapped
    probe = "import importlib.util as u; print([n for n in ('schemas', 'tasks', 'flows') if u.find_spec(n)])"
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd="/", check=True)
    assert found.stdout.strip() == "[]", found.stdout  # outside the checkout, none of these names imports
    import haloquant.tasks

    assert Path(haloquant.tasks.__file__).resolve() == REPO / "tasks" / "__init__.py"
