"""The embedded model: built offline, deterministic, safe to build concurrently, opens with plain nnsight."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner import models

REPO = Path(__file__).resolve().parent.parent

# Builds (or finds) the model in the cache named by SOURCEBOX_CACHE, then prints the
# directory and the digest of every file in it.
_BUILD_AND_DIGEST = """
import hashlib, json, os, sys
from runner import models
directory = models.path(sys.argv[1])
digests = {name: hashlib.sha256(open(os.path.join(directory, name), 'rb').read()).hexdigest()
           for name in sorted(os.listdir(directory))}
print(json.dumps({"path": directory, "digests": digests}))
"""


def _start_build(cache: Path, spec: str = "tiny-gpt2") -> subprocess.Popen:
    environment = {**os.environ, "SOURCEBOX_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", _BUILD_AND_DIGEST, spec],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr
    return json.loads(stdout.strip().splitlines()[-1])


def test_concurrent_first_use_and_separate_machines_give_identical_weights(tmp_path):
    shared_cache, other_cache = tmp_path / "shared", tmp_path / "other"
    racers = [_start_build(shared_cache), _start_build(shared_cache)]
    elsewhere = _start_build(other_cache)
    first, second = (_finish(process) for process in racers)
    separate = _finish(elsewhere)

    assert first["path"] == second["path"]
    assert first["digests"] == second["digests"]
    # A build in another cache stands for another machine: same bytes, file for file.
    assert separate["digests"] == first["digests"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(first["digests"])
    # The losing racer's staging directory is gone; only the finished model remains.
    assert [entry.name for entry in (shared_cache / "models").iterdir()] == [Path(first["path"]).name]


def test_plain_transformers_model_language_model_and_auto_tokenizer_open_the_directory(tiny_model_path):
    import torch
    from nnsight import LanguageModel, TransformersModel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    ids = tokenizer("Hello world, the model reads tokens")["input_ids"]
    assert tokenizer.decode(ids) == "Hello world, the model reads tokens"

    model = TransformersModel(tiny_model_path, task="text-generation")
    with model.trace("Hello world"):
        hidden = model.transformer.h[1].output.save()
        logits = model.lm_head.output.save()
    assert hidden.shape == (1, len(tokenizer("Hello world")["input_ids"]), 64)
    assert logits.shape[-1] == len(tokenizer)
    assert torch.isfinite(logits).all()

    # The deprecated name still opens the same directory, to the same model.
    with pytest.warns(FutureWarning, match="LanguageModel is deprecated"):
        deprecated = LanguageModel(tiny_model_path)
    with deprecated.trace("Hello world"):
        deprecated_logits = deprecated.lm_head.output.save()
    assert torch.equal(deprecated_logits, logits)


# Run in a fresh process: `import runner` alone leaves runner.models (and transformers)
# unimported; the first use of `runner.models` fixes transformers' registry once; after
# that, path() leaves the registry as it finds it; and the plain calls open the directory
# with the hub switched off.
_LAZY_IMPORT_AND_PURE_LOOKUP = """
import sys, warnings
import runner
assert "runner.models" not in sys.modules and "transformers" not in sys.modules, sorted(sys.modules)

from transformers.pipelines import check_task
entry = check_task("text-generation")[1]
registered = entry["impl"]
assert isinstance(registered, str), registered  # what transformers 5 registers

directory = runner.models.path("tiny-gpt2")
assert entry["impl"] is not registered and entry["impl"].__name__ == "TextGenerationPipeline"
resolved = entry["impl"]

entry["impl"] = registered
assert runner.models.path("tiny-gpt2") == directory
assert runner.models.path(directory) == directory
assert entry["impl"] is registered, "path() changed transformers' pipeline registry"
entry["impl"] = resolved

import torch
from nnsight import LanguageModel, TransformersModel
model = TransformersModel(directory, task="text-generation")
with model.generate("Hello", max_new_tokens=3) as tracer:
    tokens = tracer.result.save()
with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    deprecated = LanguageModel(directory)
with deprecated.generate("Hello", max_new_tokens=3) as tracer:
    deprecated_tokens = tracer.result.save()
assert torch.equal(tokens, deprecated_tokens), (tokens, deprecated_tokens)
print("generated", tokens.tolist())
"""


def test_runner_models_is_imported_on_first_use_and_path_is_a_pure_lookup(tiny_model_path):
    environment = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    finished = subprocess.run(
        [sys.executable, "-c", _LAZY_IMPORT_AND_PURE_LOOKUP],
        env=environment, capture_output=True, text=True, timeout=240,
    )
    assert finished.returncode == 0, finished.stderr
    assert "generated [[" in finished.stdout


# Loads a copy of the model with one weight missing: through models.load, then (the
# control) through a plain nnsight call, which shows transformers' progress bar.
_LOAD_WITH_A_MISSING_WEIGHT = """
import os, shutil, sys
from safetensors.torch import load_file, save_file
from transformers.utils import logging
from runner import models

source, copy = models.path("tiny-gpt2"), sys.argv[1]
shutil.copytree(source, copy)
weights = load_file(os.path.join(copy, "model.safetensors"))
del weights["transformer.h.0.mlp.c_fc.bias"]
save_file(weights, os.path.join(copy, "model.safetensors"), metadata={"format": "pt"})

models.load(copy)
assert logging.is_progress_bar_enabled(), "models.load left progress bars switched off"
print("CONTROL", file=sys.stderr, flush=True)
from nnsight import TransformersModel
TransformersModel(copy, task="text-generation", dispatch=True)
"""


def test_load_hides_the_progress_bar_but_not_warnings(tmp_path, tiny_model_path):
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    finished = subprocess.run(
        [sys.executable, "-c", _LOAD_WITH_A_MISSING_WEIGHT, str(tmp_path / "model")],
        env=environment, capture_output=True, text=True, timeout=240,
    )
    assert finished.returncode == 0, finished.stderr
    loaded, control = finished.stderr.split("CONTROL\n")
    assert "Loading weights" not in loaded
    # The warning about the missing weight is still the user's to see.
    assert "transformer.h.0.mlp.c_fc.bias" in loaded and "MISSING" in loaded
    assert "Loading weights" in control and "MISSING" in control


def test_load_gives_the_worker_the_same_model_as_the_client(tiny_model_path):
    import torch
    from nnsight import TransformersModel

    worker_model = models.load("tiny-gpt2", device="cpu")
    client_model = TransformersModel(tiny_model_path, task="text-generation")
    with worker_model.trace("The Eiffel Tower is in"):
        served = worker_model.lm_head.output.save()
    with client_model.trace("The Eiffel Tower is in"):
        local = client_model.lm_head.output.save()
    assert torch.equal(served, local)
    assert next(worker_model._module.parameters()).device.type == "cpu"


def test_layer_count_is_part_of_the_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCEBOX_CACHE", str(tmp_path))
    deep = models.path("tiny-gpt2-12l")
    assert json.loads((Path(deep) / "config.json").read_text())["n_layer"] == 12
    assert Path(deep).name.startswith("tiny-gpt2-12l-")


def test_first_build_shows_no_progress_bar(tmp_path, monkeypatch, capfd):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    monkeypatch.setenv("SOURCEBOX_CACHE", str(tmp_path / "cache"))
    models.path("tiny-gpt2-1l")
    assert "Writing model shards" not in capfd.readouterr().err
    assert logging.is_progress_bar_enabled()
    # The control: transformers' own save shows the bar the build hides.
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16)).save_pretrained(tmp_path / "control")
    assert "Writing model shards" in capfd.readouterr().err


def test_existing_directory_is_returned_as_is(tiny_model_path):
    assert models.path(tiny_model_path) == tiny_model_path
    relative = os.path.relpath(tiny_model_path)
    assert models.path(relative) == tiny_model_path


@pytest.mark.parametrize("spec", ["gpt2-xl", "tiny-gpt2-0l", "./no/such/model"])
def test_unknown_spec_names_the_valid_ones(spec):
    with pytest.raises(models.UnknownModelSpec) as failure:
        models.path(spec)
    message = str(failure.value)
    assert repr(spec) in message
    assert "'tiny-gpt2'" in message and "tiny-gpt2-<N>l" in message and "local Hugging Face model directory" in message


def test_cpu_only_machine_refuses_cuda_clearly():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        models.load("tiny-gpt2", device="cuda")


@pytest.fixture(scope="module")
def tiny_model_path():
    return models.path("tiny-gpt2")
