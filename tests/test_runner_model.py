"""A confined worker holding the embedded tiny GPT-2: the model reaches functions through
``runner.MODEL`` and computes what the same model computes locally."""
import os

import pytest
import torch

import runner
from runner import models


@pytest.fixture(scope="module")
def worker():
    with runner.Worker(model="tiny-gpt2", policy="nnsight-local", device="cpu") as worker:
        yield worker


def next_token_logits(model, token_ids):
    with torch.no_grad():
        return model._module(torch.tensor([token_ids])).logits[0, -1].clone()


def tokenize(model, text):
    return model.tokenizer(text)["input_ids"]


def model_back(model):
    return model


def start_a_process():
    os.system("touch /tmp/sourcebox-escaped")
    return os.path.exists("/tmp/sourcebox-escaped")


def test_the_worker_runs_the_same_model_the_client_opens(worker):
    token_ids = worker.call(tokenize, runner.MODEL, "Hello world")
    assert token_ids and all(isinstance(t, int) for t in token_ids)
    remote = worker.call(next_token_logits, runner.MODEL, token_ids)
    local_model = models.load("tiny-gpt2", "cpu")
    assert torch.allclose(remote, next_token_logits(local_model, token_ids), atol=1e-5)


def test_the_model_comes_back_as_the_placeholder(worker):
    assert worker.call(model_back, runner.MODEL) is runner.MODEL


def test_the_worker_is_confined_after_the_model_loaded(worker):
    status = worker.status()
    assert status["model"] == "tiny-gpt2" and status["device"] == "cpu"
    assert "seccomp" in status["sandbox"] and "landlock" in status["sandbox"]
    if "seccomp       active" in status["sandbox"]:
        try:
            escaped = worker.call(start_a_process)
        except (ImportError, AttributeError, PermissionError):
            escaped = False  # the policy refused it before the kernel had to
        assert not escaped and not os.path.exists("/tmp/sourcebox-escaped")
