"""
Make everything in data/, from a fixed seed:

  data/arith/{train,val,test}.jsonl   multi-step arithmetic word problems (the Qwen setting)
  data/tiny/{train,val,test}.jsonl    "a+b=" with two-digit numbers (the tiny CPU setting)
  data/tiny/{teacher,student}/        tiny character-level Qwen2 models for that task, trained
                                      here by supervised fine-tuning: the teacher to >= 95% test
                                      accuracy, the student (smaller, on labels 60% of which are
                                      off by one) far below

Run from the repository root:  python data/make_data.py   (about 3 min on 2 CPU cores)
"""
import argparse
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import effopd  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def write_jsonl(path: str, records: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


# ------------------------------------------------------------------------------------------------
# The Qwen setting: multi-step word problems with integer answers

NAMES = ["Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lena"]
ITEMS = ["apples", "stamps", "marbles", "books", "coins", "stickers", "pencils", "cards"]
INSTRUCTION = " Think step by step, then give the final answer as a single number on the last line."


def word_problem(rng: random.Random) -> dict:
    """A start and two or three operations (buy, give, boxes of) on a running total that stays
    positive: a 'give' from a total of 2 or less becomes boxes."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(5, 60)
    text = [f"{name} has {total} {item}."]
    for _ in range(rng.randint(2, 3)):
        op = rng.choice(["buy", "give", "boxes"])
        if op == "buy":
            n = rng.randint(2, 40)
            total += n
            text.append(f"Then {name} buys {n} more.")
        elif op == "give" and total > 2:
            n = rng.randint(1, total - 1)
            total -= n
            text.append(f"Then {name} gives {n} to a friend.")
        else:
            boxes, per_box = rng.randint(2, 5), rng.randint(3, 12)
            total += boxes * per_box
            text.append(f"Then {name} gets {boxes} boxes with {per_box} {item} in each.")
    text.append(f"How many {item} does {name} have now?")
    return {"prompt": " ".join(text) + INSTRUCTION, "answer": total}


def make_arith(rng: random.Random, sizes: dict[str, int]) -> dict[str, list[dict]]:
    seen, splits = set(), {}
    for split, n in sizes.items():
        records = []
        while len(records) < n:
            r = word_problem(rng)
            if r["prompt"] not in seen:  # no prompt in two splits
                seen.add(r["prompt"])
                records.append(r)
        splits[split] = records
    return splits


# ------------------------------------------------------------------------------------------------
# The tiny setting: "a+b=" answered by character-level models

CHARS = "0123456789+="


def make_tiny_data(rng: random.Random, sizes: dict[str, int]) -> dict[str, list[dict]]:
    """All 10,000 pairs (a, b), 0 <= a, b <= 99, shuffled and cut into disjoint splits."""
    pairs = [(a, b) for a in range(100) for b in range(100)]
    rng.shuffle(pairs)
    splits, i = {}, 0
    for split, n in sizes.items():
        splits[split] = [{"prompt": f"{a}+{b}=", "answer": a + b} for a, b in pairs[i:i + n]]
        i += n
    return splits


def make_char_tokenizer():
    """A Hugging Face tokenizer with one id per character: <pad>=0, <eos>=1, then CHARS."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<pad>")  # else transformers adds an unk token


def make_tiny_model(tokenizer, hidden: int, layers: int, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden,
                         intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=32, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None)
    return Qwen2ForCausalLM(config)


def sft(model, tokenizer, records, steps: int, lr: float, batch_size: int, seed: int,
        dev: list[dict], noise: float = 0.0):
    """Supervised fine-tuning on prompt -> answer + EOS (loss on the answer tokens only), with
    probability `noise` of a label being off by one (answer + 1). Prints dev accuracy."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.05)
    eos = tokenizer.eos_token_id
    for step in range(1, steps + 1):
        batch = rng.sample(records, batch_size)
        prompts = [tokenizer(r["prompt"])["input_ids"] for r in batch]
        answers = [tokenizer(str(r["answer"] + (rng.random() < noise)))["input_ids"] + [eos]
                   for r in batch]
        ids, attention_mask = effopd.left_pad([p + a for p, a in zip(prompts, answers)],
                                              tokenizer.pad_token_id, "cpu")
        labels = torch.full_like(ids, -100)  # (B, L): score only the answer tokens
        for i, a in enumerate(answers):
            labels[i, ids.shape[1] - len(a):] = torch.tensor(a)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        loss = model(ids, attention_mask=attention_mask, position_ids=position_ids,
                     labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 250 == 0:
            acc = effopd.accuracy(model, tokenizer, dev, 6, [eos])
            print(f"  sft step {step} | loss {loss.item():.4f} | dev acc {acc:.3f}")
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--seed", type=int, default=0, help="one seed for all of data/")
    parser.add_argument("--skip-models", action="store_true", help="write the JSONL files only")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    for split, records in make_arith(rng, {"train": 2000, "val": 50, "test": 500}).items():
        write_jsonl(os.path.join(HERE, "arith", f"{split}.jsonl"), records)
    tiny = make_tiny_data(rng, {"train": 6000, "val": 50, "test": 500, "dev": 500})
    for split in ("train", "val", "test"):
        write_jsonl(os.path.join(HERE, "tiny", f"{split}.jsonl"), tiny[split])
    print("wrote data/arith and data/tiny JSONL")
    if args.skip_models:
        return
    torch.set_num_threads(min(2, torch.get_num_threads()))  # results do not depend on the machine
    tokenizer = make_char_tokenizer()
    t0 = time.time()
    # SFT data: the training split only; dev is disjoint from val and test.
    teacher = make_tiny_model(tokenizer, hidden=128, layers=3, seed=args.seed)
    sft(teacher, tokenizer, tiny["train"], steps=3000, lr=3e-3, batch_size=128, seed=args.seed,
        dev=tiny["dev"])
    # The student is smaller and learned from labels of which 60% are off by one: it can add, but
    # prefers the wrong last digit, a habit OPD can fix (it could not teach a missing skill in a
    # few dozen steps: a student early-stopped at 30% crawled to 60% in 64 OPD steps).
    student = make_tiny_model(tokenizer, hidden=96, layers=4, seed=args.seed + 1)
    sft(student, tokenizer, tiny["train"], steps=1500, lr=3e-3, batch_size=128, seed=args.seed + 1,
        dev=tiny["dev"], noise=0.6)
    for name, model in (("teacher", teacher), ("student", student)):
        acc = effopd.accuracy(model, tokenizer, tiny["test"], 6, [tokenizer.eos_token_id])
        print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"test accuracy {acc:.3f}")
        effopd.save_checkpoint(model, tokenizer, os.path.join(HERE, "tiny", name))
    print(f"trained the tiny models in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
