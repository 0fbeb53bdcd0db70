import json

import pytest
import torch

from opsdlab.tasks.data import Example
from opsdlab.modeling.models import (ModelFolderError, build_tiny_model, load_model, load_policy, load_tokenizer,
                            save_policy, thinking_token_count)
from opsdlab.tasks.prompts import render_prompt


def test_tokenizer_round_trips_traces_exactly(task, tokenizer):
    text = task.response(task.examples("test", 1)[0], "none", True, __import__("random").Random(0))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_numbers_are_single_tokens(tokenizer):
    ids = tokenizer(" 34", add_special_tokens=False)["input_ids"]
    assert len(ids) == 1


def test_chat_template_thinking_switch(tokenizer):
    example = Example("x", "What is 1 + 2?", "1 + 2 = 3", "3")
    on = render_prompt(tokenizer, example, thinking=True)
    off = render_prompt(tokenizer, example, thinking=False)
    assert on.endswith("<|im_start|>assistant\n")
    assert off == on + "<think>\n\n</think>\n\n"


def test_offline_sizes_order_by_parameters_and_share_the_tokenizer(tokenizer):
    models = {size: build_tiny_model(tokenizer, size) for size in ("micro", "shallow", "tiny", "small")}
    params = {size: sum(p.numel() for p in model.parameters()) for size, model in models.items()}
    assert params["micro"] < params["shallow"] < params["tiny"] < params["small"]
    assert 0.3e6 < params["micro"] < 0.4e6
    assert models["shallow"].config.num_hidden_layers == models["tiny"].config.num_hidden_layers - 1
    ids = tokenizer("What is 1 + 2?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert models["micro"](ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_save_and_reload_gives_same_ids_and_logits(tmp_path, tokenizer):
    model = build_tiny_model(tokenizer)
    save_policy(model, tokenizer, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists()
    model2, tokenizer2 = load_policy(tmp_path / "m")
    text = render_prompt(tokenizer, Example("x", "What is 1 + 2?", "", "3"))
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, tokenizer2(text, return_tensors="pt")["input_ids"])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, model2(ids).logits, atol=1e-6)


def test_folder_without_chat_template_is_a_clear_error(tmp_path, tokenizer):
    save_policy(build_tiny_model(tokenizer), tokenizer, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in (tmp_path / "m").glob("chat_template*"):
        extra.unlink()
    with pytest.raises(ModelFolderError, match="no chat template"):
        load_tokenizer(tmp_path / "m")


def test_folder_without_tokenizer_files_is_a_clear_error(tmp_path, tokenizer, capsys):
    """config.json + model.safetensors only: AutoTokenizer would build an empty Qwen2 tokenizer from config.json."""
    build_tiny_model(tokenizer).save_pretrained(tmp_path / "m")
    for extra in (tmp_path / "m").iterdir():
        if extra.name not in ("config.json", "model.safetensors"):
            extra.unlink()
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(ModelFolderError, match="has no tokenizer files") as error:
        load_tokenizer(tmp_path / "m")
    assert "tokenizer.save_pretrained" in str(error.value)
    with pytest.raises(ModelFolderError, match="has no tokenizer files"):
        load_policy(tmp_path / "m")
    from opsdlab.cli import main

    assert main(["eval", "--model", str(tmp_path / "m"), "--data", "synthetic"]) == 2
    assert "has no tokenizer files" in capsys.readouterr().err
    # A tokenizer_config.json alone (no vocabulary) loads as an empty tokenizer: also an error.
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "Qwen2Tokenizer", "chat_template": "{{ messages[0]['content'] }}"}))
    with pytest.raises(ModelFolderError, match="empty tokenizer"):
        load_tokenizer(tmp_path / "m")


def test_missing_folder_and_missing_config_are_clear_errors(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFolderError, match="config.json"):
        load_model(tmp_path / "empty")


def test_thinking_token_count(tokenizer):
    ids = tokenizer("<think>\n1 + 2 = 3\n</think>\n\nThe answer is \\boxed{3}.", add_special_tokens=False)["input_ids"]
    inner = tokenizer("\n1 + 2 = 3\n", add_special_tokens=False)["input_ids"]
    assert thinking_token_count(ids, tokenizer) == len(inner)
    assert thinking_token_count(tokenizer("3", add_special_tokens=False)["input_ids"], tokenizer) == 0


def _turn_end_model(tokenizer, turn_end: int):
    """A tiny model whose greedy response is `turn_end` at every step, listed as an end of response in
    its generation config but not the tokenizer's EOS (as Gemma's instruct models end a turn with
    `<end_of_turn>` while their tokenizer's EOS is `<eos>`)."""
    from opsdlab.modeling.models import build_tiny_model

    model = build_tiny_model(tokenizer, seed=0)
    with torch.no_grad():
        model.model.norm.weight.zero_()  # every logit 0 ...
    model.generation_config.suppress_tokens = [i for i in range(len(tokenizer)) if i != turn_end]  # ... but one
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, turn_end]
    return model


def test_generation_and_grading_end_responses_at_the_generation_config_eos(tokenizer, task):
    from opsdlab.config.sections import SamplingConfig
    from opsdlab.evaluation.evaluate import evaluate
    from opsdlab.config.stages import RLVRStageConfig
    from opsdlab.stages.rlvr import reward_functions
    from opsdlab.tasks.verifier import VerifierConfig

    turn_end = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert turn_end not in {tokenizer.eos_token_id, tokenizer.pad_token_id}
    model = _turn_end_model(tokenizer, turn_end)
    sampling = SamplingConfig(k=1, temperature=0.0, max_new_tokens=12)
    samples, summary = evaluate(model, tokenizer, task.examples("test", 2), VerifierConfig(), sampling)
    assert [(s.response_tokens, s.truncated) for s in samples] == [(0, False), (0, False)]
    assert summary["truncation_rate"] == 0.0
    # the RL reward reads the same ids as the end of a rollout (TRL's generation stops there too)
    reward = reward_functions(VerifierConfig(), tokenizer, RLVRStageConfig(), model)[0]
    reward(prompts=["", ""], completions=["", ""], completion_ids=[[7, turn_end], [7, 7]], answer=["1", "1"])
    assert reward.last_truncated == [False, True]


def _bf16_head_reference(hidden, weight, grad_out):
    """Logits and gradients of the LM head computed by hand: bf16-rounded operands multiplied in float64,
    the incoming gradient rounded to bf16 (as under autocast)."""
    h, w = hidden.bfloat16().double(), weight.bfloat16().double()
    g = grad_out.bfloat16().double()
    return h @ w.t(), g @ w, g.t() @ h


def test_output_head_in_bf16_gives_float32_logits_of_bf16_operands(tokenizer):
    """bf16 compute (bf16 weights, or float32 weights under bf16 mixed precision): logits are the exact
    products of bf16 values in float32 (not rounded to bf16), and the gradients are those products'."""
    from opsdlab.modeling.models import output_head

    torch.manual_seed(0)
    for weights_dtype, compute in ((torch.bfloat16, None), (torch.float32, torch.bfloat16)):
        model = build_tiny_model(tokenizer, seed=0).to(weights_dtype)
        weight = model.get_output_embeddings().weight
        hidden = torch.randn(5, model.config.hidden_size, requires_grad=True)
        logits = output_head(model, compute)(hidden)
        assert logits.dtype == torch.float32
        grad_out = torch.randn_like(logits)
        logits.backward(grad_out)
        expected, grad_hidden, grad_weight = _bf16_head_reference(hidden.detach(), weight.detach().float(), grad_out)
        assert torch.allclose(logits.double(), expected, rtol=1e-6, atol=1e-5)
        assert not torch.equal(logits, logits.bfloat16().float())  # not rounded to bf16
        assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == weights_dtype
        assert torch.allclose(hidden.grad.double(), grad_hidden, rtol=1e-5, atol=1e-5)
        assert torch.allclose(weight.grad.double(), grad_weight.to(weights_dtype).double(), rtol=1e-2, atol=1e-4)
    # float32 weights without mixed precision: the plain float32 head, bit for bit
    model = build_tiny_model(tokenizer, seed=0)
    hidden = torch.randn(5, model.config.hidden_size)
    assert torch.equal(output_head(model)(hidden), model.get_output_embeddings()(hidden))


def test_output_head_on_cuda_takes_one_bf16_product_with_float32_output(tokenizer, monkeypatch):
    """The CUDA branch (`torch.mm(..., out_dtype=torch.float32)` on bf16 operands, forward and both
    gradient products), run on the meta device, which has that product: bf16 operands, float32 out."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import opsdlab.modeling.models as models

    monkeypatch.setattr(models, "_FLOAT32_OUT_MM_DEVICES", ("meta",))
    model = build_tiny_model(tokenizer, seed=0).to("meta")
    hidden = torch.empty(5, model.config.hidden_size, device="meta", requires_grad=True)
    products = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.mm.default, torch.ops.aten.mm.dtype):
                products.append((func, args[0].dtype, args[1].dtype, out.dtype))
            return out

    with Record():
        logits = models.output_head(model, torch.bfloat16)(hidden)
        logits.sum().backward()
    assert logits.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    assert products == [(torch.ops.aten.mm.dtype, torch.bfloat16, torch.bfloat16, torch.float32)] * 3


def test_output_head_on_cpu_casts_its_weight_to_float32_once_until_the_weight_changes(tokenizer):
    """On CPU a bf16 head multiplies in float32: the head keeps one float32 copy of its weight for all
    its calls and gradients (not one per call), makes a new one after an in-place update (an optimizer
    step), and its logits and gradients are those of a fresh head."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from opsdlab.modeling.models import output_head

    model = build_tiny_model(tokenizer, seed=0).to(torch.bfloat16)
    weight = model.get_output_embeddings().weight
    casts = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if (func.overloadpacket.__name__ in ("_to_copy", "copy_") and out.dtype == torch.float32
                    and tuple(out.shape) in (tuple(weight.shape), tuple(weight.shape[::-1]))):
                casts.append(func)
            return out

    torch.manual_seed(0)
    hidden = torch.randn(3, 5, model.config.hidden_size, requires_grad=True)
    head = output_head(model)
    with Record():
        for _ in range(3):
            head(hidden).sum().backward()
    assert len(casts) == 1
    with torch.no_grad():
        weight.mul_(-1.0)  # in place, as an optimizer step
    hidden.grad = weight.grad = None
    with Record():
        logits = head(hidden)
        logits.square().sum().backward()
    assert len(casts) == 2
    fresh_hidden = hidden.detach().clone().requires_grad_(True)
    fresh_weight_grad, weight.grad = weight.grad, None
    expected = output_head(model)(fresh_hidden)
    expected.square().sum().backward()
    assert torch.equal(logits, expected)
    assert torch.equal(hidden.grad, fresh_hidden.grad) and torch.equal(fresh_weight_grad, weight.grad)
