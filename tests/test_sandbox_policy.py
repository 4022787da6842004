"""Policies, profiles, TOML files, environment snapshots, the Python-layer guard, diff and audit.

These run in the test process (the guard confines nothing at the OS level);
the command-line tools run as real subprocesses.
"""

from __future__ import annotations

import builtins
import json
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

import sandbox
from sandbox import Action, Policy, Rule
from sandbox.snapshot import environment_snapshot, snapshot_from_pip_report

REPO = Path(__file__).resolve().parents[1]


def run_user_code(policy: Policy, source: str, **extra) -> dict:
    """Run ``source`` as shipped user code under ``policy``; return its namespace."""
    namespace = {"__builtins__": policy.builtins(**extra), "__name__": "request"}
    exec(compile(textwrap.dedent(source), "<user code>", "exec"), namespace)
    return namespace


def sandbox_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sandbox", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
        timeout=120,
    )


# ------------------------------------------------------------------ matching


def test_bare_name_covers_submodules_but_not_lookalikes():
    policy = Policy("p", [Rule.make("allow", "torch")])
    assert policy.provides("torch")
    assert policy.provides("torch.nn.functional")
    assert not policy.provides("torchvision")


def test_star_pattern_covers_only_submodules():
    policy = Policy("p", [Rule.make("allow", "numpy.*")])
    assert policy.provides("numpy.linalg")
    assert not policy.provides("numpy")


def test_exact_rule_does_not_cover_submodules():
    policy = Policy("p", [Rule.make("allow", "os", submodules=False)])
    assert policy.provides("os")
    assert not policy.provides("os.path")


def test_first_matching_rule_wins_and_default_applies_last():
    policy = Policy(
        "p",
        [Rule.make("deny", "torch.distributed"), Rule.make("allow", "torch")],
        default="log",
    )
    assert policy.decide("torch.distributed.rpc").action is Action.DENY
    assert policy.decide("torch.nn").action is Action.ALLOW
    decision = policy.decide("json")
    assert decision.action is Action.LOG and decision.rule is None


def test_attribute_rules_apply_to_attributes_only():
    policy = Policy("p", [Rule.make("deny", "os", "system"), Rule.make("allow", "os")])
    assert policy.decide("os").action is Action.ALLOW
    assert policy.decide("os", "system").action is Action.DENY
    assert policy.decide("os", "getcwd").action is Action.ALLOW


def test_stdlib_token_follows_the_python_version():
    for version, has_distutils in (("3.11", True), ("3.12", False)):
        policy = Policy("p", [Rule.make("allow", "@stdlib", python_version=version)])
        assert policy.provides("json.decoder")
        assert policy.provides("distutils") is has_distutils
    assert not Policy("p", [Rule.make("allow", "@stdlib", python_version="3.12")]).provides("torch")


@pytest.mark.parametrize(
    "modules, message",
    [("torch..nn", "is not a module name"), ("import", "is not a module name"), ([], "at least one module pattern")],
)
def test_bad_rules_are_refused_clearly(modules, message):
    with pytest.raises(sandbox.PolicyError, match=message):
        Rule.make("allow", modules)


def test_unknown_action_names_the_choices():
    with pytest.raises(sandbox.PolicyError, match="'allow', 'deny', 'log', 'kill'"):
        Rule.make("permit", "torch")


# ------------------------------------------------------------------ profiles


def test_shipped_profiles_are_listed_and_load():
    assert sandbox.profiles() == ["default", "ndif-allowlist", "ndif-env", "nnsight-local"]
    for name in sandbox.profiles():
        assert Policy.load(name).name == name


def test_ndif_allowlist_is_the_published_list():
    policy = Policy.load("ndif-allowlist")
    for module in ("torch.nn", "numpy.linalg", "collections.abc", "einops", "nnsight.intervention.envoy", "_operator"):
        assert policy.provides(module), module
    for module in ("functools", "itertools", "json", "re", "random", "dataclasses", "nnsight", "os"):
        assert not policy.provides(module), module


def test_nnsight_local_is_stdlib_plus_its_server_packages():
    policy = Policy.load("nnsight-local")
    for module in ("functools", "json", "transformers.models", "peft", "diffusers", "nnsight"):
        assert policy.provides(module), module
    for module in ("pandas", "sympy", "nnterp", "scipy"):
        assert not policy.provides(module), module


def test_ndif_env_is_a_python_312_server_install():
    policy = Policy.load("ndif-env")
    data = json.loads((REPO / "sandbox" / "profiles" / "ndif-env.json").read_text())
    assert data["python_version"] == "3.12"
    assert "--dry-run" in data["generated_by"]["command"]
    for module in ("torch", "transformers", "ray", "datasets", "scipy", "PIL", "nnterp", "einops", "zstandard"):
        assert policy.provides(module), module
    assert not policy.provides("distutils"), "removed from the 3.12 standard library"
    assert not policy.provides("matplotlib"), "not part of ndif[ray,ext]"


def test_default_is_ndif_env_with_clear_refusals_in_front():
    default, env = Policy.load("default"), Policy.load("ndif-env")
    assert default.rules[len(default.rules) - len(env.rules):] == env.rules
    for module in ("subprocess", "socket", "multiprocessing"):
        assert env.provides(module) and not default.provides(module)
    assert default.decide("os", "system").action is Action.DENY
    assert default.decide("posix", "fork").action is Action.DENY
    assert default.decide("os", "path").action is Action.ALLOW


def test_unknown_profile_lists_the_shipped_ones():
    with pytest.raises(sandbox.PolicyError, match="ndif-allowlist"):
        Policy.load("ndif-allowlst")


def test_show_prints_the_rules():
    result = sandbox_cli("show", "ndif-allowlist")
    assert result.returncode == 0, result.stderr
    assert "rule 1: allow builtins, torch" in result.stdout
    assert "default: deny" in result.stdout


# ---------------------------------------------------------------- TOML files


def test_toml_policy_with_extends(tmp_path):
    path = tmp_path / "lab.toml"
    path.write_text(
        textwrap.dedent(
            """
            name = "lab"
            extends = "ndif-allowlist"
            [[rules]]
            action = "allow"
            modules = ["functools", "json"]
            reason = "our server has them"
            [[rules]]
            action = "kill"
            modules = "torch.distributed"
            """
        )
    )
    policy = Policy.load(path)
    assert policy.name == "lab"
    assert policy.provides("functools") and policy.provides("torch.nn")
    assert policy.decide("torch.distributed").action is Action.KILL
    assert policy.rules[0].origin == "lab.toml rule 0"
    assert policy.default is Action.DENY


@pytest.mark.parametrize(
    "text, message",
    [
        ('colour = "blue"', "unknown key\\(s\\) colour"),
        ('[[rules]]\naction = "allow"', "rule 0 is missing 'modules'"),
        ('[[rules]]\naction = "allow"\nmodules = "x"\nwhen = 1', "unknown key\\(s\\) when"),
        ('default = "maybe"', "action 'maybe' is not one of"),
        ("name = ", "not valid TOML"),
    ],
)
def test_bad_toml_policies_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(sandbox.PolicyError, match=message):
        Policy.load(path)


def test_extends_cycle_is_reported(tmp_path):
    (tmp_path / "a.toml").write_text('extends = "b.toml"')
    (tmp_path / "b.toml").write_text('extends = "a.toml"')
    with pytest.raises(sandbox.PolicyError, match="cycle"):
        Policy.load(tmp_path / "a.toml")


def test_missing_policy_file(tmp_path):
    with pytest.raises(sandbox.PolicyError, match="does not exist"):
        Policy.load(tmp_path / "nope.toml")


# ------------------------------------------------------------ environments


def test_from_environment_dict_and_file(tmp_path):
    snapshot = {"python_version": "3.12", "packages": ["torch", "PIL", "google.protobuf"], "name": "srv"}
    policy = Policy.from_environment(snapshot)
    assert policy.name == "srv"
    assert policy.provides("PIL.Image") and policy.provides("google.protobuf.message")
    assert not policy.provides("google.cloud") and not policy.provides("distutils")
    path = tmp_path / "server.json"
    path.write_text(json.dumps({"python_version": "3.11", "packages": ["numpy"]}))
    from_file = Policy.load(path)
    assert from_file.name == "server" and from_file.provides("distutils") and from_file.provides("numpy")


@pytest.mark.parametrize(
    "snapshot, message",
    [
        ({"packages": []}, "missing python_version"),
        ({"python_version": "3.12", "packages": "torch"}, "must be a list"),
        ({"python_version": "three", "packages": []}, "not a version"),
        ({"python_version": "3.8", "packages": []}, "no standard-library table"),
    ],
)
def test_bad_snapshots_are_refused(snapshot, message):
    with pytest.raises(sandbox.PolicyError, match=message):
        Policy.from_environment(snapshot)


def test_snapshot_of_this_environment_provides_what_is_installed():
    snapshot = environment_snapshot("here")
    assert {"torch", "numpy", "msgpack", "PIL"} <= set(snapshot["packages"])
    assert Policy.from_environment(snapshot).provides("torch.nn")


def test_snapshot_from_a_pip_report_maps_import_names(tmp_path):
    report = {
        "pip_version": "test",
        "install": [
            {"metadata": {"name": "Pillow", "version": "1"}},
            {"metadata": {"name": "nvidia-cudnn-cu13", "version": "1"}},
            {"metadata": {"name": "protobuf", "version": "1"}},
            {"metadata": {"name": "Some_Unknown.Dist", "version": "1"}},
        ],
    }
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    snapshot = snapshot_from_pip_report(path, python_version="3.12", name="srv", command="pip ...")
    assert snapshot["packages"] == ["PIL", "google.protobuf", "nvidia", "some_unknown_dist"]
    assert snapshot["distributions"]["pillow"]["mapped_by"] == "installed here"
    assert snapshot["distributions"]["some-unknown-dist"]["mapped_by"] == "normalised name"


# ------------------------------------------------------- destination protocol


def test_provides_resolve_and_builtins():
    policy = Policy.load("ndif-allowlist")
    assert policy.name == "ndif-allowlist"
    import torch

    assert policy.resolve("torch.nn.functional", "relu") is torch.nn.functional.relu
    assert policy.resolve("torch", "Tensor.add") is torch.Tensor.add
    module = policy.resolve("torch.nn", "")
    assert isinstance(module, sandbox.ModuleFacade) and module.Linear is torch.nn.Linear
    with pytest.raises(sandbox.PolicyViolation, match="'functools' is refused by the default action of policy 'ndif-allowlist'"):
        policy.resolve("functools", "reduce")
    with pytest.raises(ImportError, match="no attribute path 'no_such_thing'"):
        policy.resolve("torch", "no_such_thing")
    first, second = policy.builtins(), policy.builtins()
    assert first is not second and first["len"] is len
    assert first["__import__"] is not __import__


# ---------------------------------------------------------------- user code


def test_refused_import_message_names_module_rule_policy_and_remedy():
    with pytest.raises(sandbox.PolicyViolation) as caught:
        run_user_code(Policy.load("ndif-allowlist"), "import functools")
    error = caught.value
    assert isinstance(error, ImportError) and isinstance(error, sandbox.Refusal)
    assert error.module == "functools" and error.policy == "ndif-allowlist"
    assert "default action of policy 'ndif-allowlist'" in str(error)
    assert "What to do" in str(error) and "ship the code you need" in str(error)


def test_allowed_code_runs_and_gets_facades():
    namespace = run_user_code(
        Policy.load("ndif-allowlist"),
        """
        import torch
        import torch.nn.functional as F
        from collections import OrderedDict
        result = F.relu(torch.tensor([-1.0, 2.0])).tolist()
        """,
    )
    assert namespace["result"] == [0.0, 2.0]
    assert isinstance(namespace["torch"], sandbox.ModuleFacade)


def test_attribute_rules_hold_on_every_path():
    policy = Policy.load("default")
    with pytest.raises(sandbox.PolicyViolation, match="from os import system"):
        run_user_code(policy, "from os import system")
    with pytest.raises(sandbox.AttributeViolation, match="os.system is refused by rule 0 of policy 'default'"):
        run_user_code(policy, "import os\nos.system('true')")
    namespace = run_user_code(
        policy,
        """
        import os
        from os import *
        has_system = hasattr(os, 'system')
        star_has_system = 'system' in dir()
        joined = path.join('a', 'b')
        """,
    )
    assert namespace["has_system"] is False and namespace["star_has_system"] is False
    assert namespace["joined"] == "a/b"
    with pytest.raises(sandbox.PolicyViolation, match="importlib.import_module\\('socket'\\)"):
        run_user_code(policy, "import importlib\nimportlib.import_module('socket')")
    namespace = run_user_code(policy, "import sys\nseen = 'socket' in sys.modules\ngot = sys.modules.get('socket')")
    assert namespace["seen"] is False and namespace["got"] is None
    with pytest.raises(sandbox.PolicyViolation, match="sys.modules\\['subprocess'\\]"):
        run_user_code(policy, "import sys\nsys.modules['subprocess']")


def test_modules_reached_as_attributes_obey_the_policy():
    policy = Policy.load("ndif-allowlist")
    with pytest.raises(sandbox.AttributeViolation, match="torch.os refused: it is the module 'os'"):
        run_user_code(policy, "import torch\ntorch.os")
    with pytest.raises(KeyError):
        run_user_code(policy, "import torch\nvars(torch)['os']")
    with pytest.raises(sandbox.PolicyViolation):
        run_user_code(policy, "import torch\ntorch.__builtins__['__import__']('os')")


def test_partial_package_is_a_path_only():
    policy = Policy.load("ndif-allowlist")
    namespace = run_user_code(
        policy,
        """
        import nnsight.intervention.envoy
        from nnsight.intervention import envoy
        result = nnsight.intervention.envoy.Envoy is envoy.Envoy
        """,
    )
    assert namespace["result"] is True
    with pytest.raises(sandbox.AttributeViolation, match="only lets user code pass through 'nnsight'"):
        run_user_code(policy, "import nnsight.intervention.envoy\nnnsight.LanguageModel")
    with pytest.raises(sandbox.PolicyViolation):
        run_user_code(policy, "import nnsight")


def test_builtins_rules_deny_log_and_kill():
    with pytest.raises(sandbox.BuiltinViolation, match="the worker has no terminal"):
        run_user_code(Policy.load("nnsight-local"), "input()")
    policy = Policy(
        "p",
        [Rule.make("log", "builtins", "open"), Rule.make("kill", "builtins", "eval"), Rule.make("allow", "*")],
    )
    namespace = run_user_code(policy, f"result = open({str(REPO / 'setup.cfg')!r}).read(10)")
    assert namespace["result"] == "[metadata]"
    assert [(entry.module, entry.attribute) for entry in policy.log] == [("builtins", "open")]
    assert policy.log[0].where == "<user code>:1"
    with pytest.raises(sandbox.PolicyKill):
        run_user_code(policy, "try:\n    eval('1')\nexcept Exception:\n    pass")


def test_kill_on_import_cannot_be_swallowed():
    policy = Policy("p", [Rule.make("kill", "ctypes"), Rule.make("allow", "*")])
    with pytest.raises(sandbox.PolicyKill) as caught:
        run_user_code(policy, "try:\n    import ctypes\nexcept Exception:\n    swallowed = True")
    assert not isinstance(caught.value, Exception)
    assert caught.value.module == "ctypes" and "KILL rule" in str(caught.value)


def test_log_records_imports_with_their_place():
    policy = Policy("audit-ish", default="log")
    run_user_code(policy, "import json\nimport json.decoder\nx = json.dumps")
    logged = [(entry.module, entry.attribute, entry.where) for entry in policy.log]
    assert ("json", None, "<user code>:1") in logged
    assert ("json", "dumps", "<user code>:3") in logged


def test_local_modules_travel_with_the_request():
    shipped = types.ModuleType("mylab.helpers")
    shipped.answer = 42
    namespace = run_user_code(
        Policy.load("ndif-allowlist"),
        "import mylab.helpers\nfrom mylab.helpers import answer\nvia_package = mylab.helpers.answer",
        local_modules={"mylab.helpers": shipped},
    )
    assert namespace["answer"] == 42 and namespace["via_package"] == 42


def test_relative_import_in_shipped_code_is_explained():
    with pytest.raises(ImportError, match="write the import with its absolute name"):
        run_user_code(Policy.load("default"), "from . import sibling")


def test_facades_refuse_monkeypatching_of_provided_modules():
    import torch

    original = torch.nn.functional.gelu
    for code in ("import torch\ntorch.nn.functional.gelu = torch.nn.functional.relu",
                 "import torch\ndel torch.nn.functional.gelu"):
        with pytest.raises(sandbox.AttributeViolation,
                           match=r"cannot set or delete torch\.nn\.functional\.gelu .*shared by every request.*What to do"):
            run_user_code(Policy.load("ndif-allowlist"), code)
    assert torch.nn.functional.gelu is original


# ---------------------------------------------------------------------- diff


def test_diff_between_ndif_allowlist_and_nnsight_local():
    report = sandbox.diff("ndif-allowlist", "nnsight-local")
    only_allowlist = {entry.label for entry in report.only_first}
    only_local = {entry.label for entry in report.only_second}
    assert {"pandas", "sympy", "nnterp", "urllib3"} <= only_allowlist
    assert {"functools", "itertools", "json", "re", "random", "dataclasses", "nnsight", "transformers"} <= only_local
    assert "torch" not in only_allowlist | only_local
    text = str(report)
    assert "provided by ndif-allowlist only" in text and "provided by nnsight-local only" in text


def test_diff_shows_attribute_rules_and_identity():
    report = sandbox.diff("default", "ndif-env")
    assert {"os.system", "subprocess", "socket"} <= {entry.label for entry in report.only_second}
    assert sandbox.diff("ndif-env", "ndif-env").same


def test_diff_cli():
    result = sandbox_cli("diff", "ndif-allowlist", "nnsight-local")
    assert result.returncode == 0, result.stderr
    assert "functools" in result.stdout and "pandas" in result.stdout


# --------------------------------------------------------------------- audit


@pytest.fixture
def library_project(tmp_path):
    """A small project a library author would audit: a package and a script."""
    package = tmp_path / "steerlib"
    package.mkdir()
    (package / "__init__.py").write_text("from .core import steer\n")
    (package / "core.py").write_text(
        textwrap.dedent(
            """
            import functools
            import torch

            @functools.lru_cache()
            def scale():
                import json
                return json.loads("2.0")

            def steer(x):
                return x * scale() + torch.ones(1)
            """
        )
    )
    script = tmp_path / "demo.py"
    script.write_text("import torch\nimport steerlib\nprint(steerlib.steer(torch.ones(2)).tolist())\n")
    return tmp_path


def test_audit_context_manager_lists_refusals_with_places(library_project, monkeypatch):
    monkeypatch.syspath_prepend(str(library_project))
    original_import = builtins.__import__
    with sandbox.audit("ndif-allowlist") as report:
        import steerlib

        assert steerlib.steer(__import__("torch").ones(1)).tolist() == [3.0]
    labels = [finding.label for finding in report.findings]
    assert labels == ["functools", "json"]
    assert report.findings[0].where.endswith("steerlib/core.py:2")
    assert "default action of policy 'ndif-allowlist'" in report.findings[0].rule
    assert report.travels == ["steerlib"]
    assert builtins.__import__ is original_import, "the audit must restore the import system"
    sys.modules.pop("steerlib", None)
    sys.modules.pop("steerlib.core", None)


def test_audit_cli_exit_codes(library_project):
    refused = sandbox_cli("audit", "--profile", "ndif-allowlist", str(library_project / "demo.py"))
    assert refused.returncode == 1, refused.stderr
    assert "[3.0, 3.0]" in refused.stdout
    assert "functools" in refused.stdout and "json" in refused.stdout
    clean = sandbox_cli("audit", "--profile", "nnsight-local", str(library_project / "demo.py"))
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "0 refusal(s)" in clean.stdout


def test_audit_reports_a_crashing_script(tmp_path):
    script = tmp_path / "broken.py"
    script.write_text("import json\nraise RuntimeError('boom')\n")
    result = sandbox_cli("audit", "--profile", "ndif-allowlist", str(script))
    assert result.returncode == 2
    assert "RuntimeError: boom" in result.stdout and "json" in result.stdout
