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
    from opsdlab.modeling.models import build_tiny_tokenizer

    return build_tiny_tokenizer(task.tokenizer_corpus())


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tokenizer):
    """A saved random-init tiny model folder (HF format)."""
    from opsdlab.modeling.models import build_tiny_model, save_policy

    folder = tmp_path_factory.mktemp("tiny") / "model"
    save_policy(build_tiny_model(tokenizer, seed=0), tokenizer, folder)
    return folder


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def bos_folder(tmp_path_factory, task):
    """A tiny model whose tokenizer adds a BOS token to every encoded text (as Llama 3's does)."""
    from tokenizers.processors import TemplateProcessing

    from opsdlab.modeling.models import build_tiny_model, build_tiny_tokenizer, save_policy

    tokenizer = build_tiny_tokenizer(task.tokenizer_corpus())
    tokenizer.add_special_tokens({"bos_token": "<bos>"})
    bos_id = tokenizer.convert_tokens_to_ids("<bos>")
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos_id)])
    folder = tmp_path_factory.mktemp("bos") / "model"
    save_policy(build_tiny_model(tokenizer, seed=0), tokenizer, folder)
    return folder


@pytest.fixture
def loaded_dtypes(monkeypatch):
    """`spy(module)` wraps `module.load_for_eval` and returns the list that receives the dtype of each
    model it loads."""

    def spy(module) -> list:
        loaded, real = [], module.load_for_eval

        def load_for_eval(*args, **kwargs):
            model, tokenizer = real(*args, **kwargs)
            loaded.append(next(model.parameters()).dtype)
            return model, tokenizer

        monkeypatch.setattr(module, "load_for_eval", load_for_eval)
        return loaded

    return spy
