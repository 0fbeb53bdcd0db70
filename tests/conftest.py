"""Shared fixtures: the tiny tokenizer and model are built once per test session, offline."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def task():
    from opsdlab.tasks import build_task

    return build_task("synthetic", {})


@pytest.fixture(scope="session")
def tokenizer(task):
    from opsdlab.models import build_tiny_tokenizer

    return build_tiny_tokenizer(task.tokenizer_corpus())


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tokenizer):
    """A saved random-init tiny model folder (HF format)."""
    from opsdlab.models import build_tiny_model, save_policy

    folder = tmp_path_factory.mktemp("tiny") / "model"
    save_policy(build_tiny_model(tokenizer, seed=0), tokenizer, folder)
    return folder


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
