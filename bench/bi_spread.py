"""How the base LM's Block Influence spreads over its depth as it pretrains, for candidate tiny LMs (issue 20: a
test bed whose depth is used the way a published LLM's is, chosen before any visual tuning).

For each candidate shape (fields of pipeline.config.ProfileSpec) it trains the tokenizer and a seeded Llama LM from
the profile's own code on a prepared text corpus (a `dvc repro prepare` workspace), pretrains it by next-token loss
(AdamW, the lm_pretrain batch and sequence length, linear warm-up then constant LR: a search tool, not the stage's
schedule), and every `--every` steps measures BI per decoder layer on the held-out text
(pipeline.importance.text_block_influence) with its spread (influence_spread: the median layer's BI over the largest's, the
largest layer's share of the summed BI, and the effective number of layers). The stage `build_base` records the same profile of the LM it built
(metrics/base.json), which is what a params file is judged on.

    .venv/bin/python bench/bi_spread.py --prepared data/prepared --steps 2000 --every 500 \\
        --candidate tiny:{} --candidate wide:'{"lm_hidden": 192, "lm_intermediate": 512}' --json bench/bi_spread.last.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_candidate(name: str, overrides: dict, args) -> dict:
    import datasets
    import torch

    from pipeline import importance, model, training
    from pipeline.config import PROFILES, ProfileSpec

    overrides = dict(overrides)
    lr, weight_decay, steps = (overrides.pop(key, default) for key, default in
                               (("lr", args.lr), ("weight_decay", args.weight_decay), ("steps", args.steps)))
    if "init_std" in overrides:  # the random LM's initializer_range: ProfileSpec.lm_init_std
        overrides["lm_init_std"] = overrides.pop("init_std")
    spec = ProfileSpec(**(PROFILES["tiny"].model_dump() | overrides))
    text = datasets.load_from_disk(str(Path(args.prepared) / "text"))
    train_texts, test_texts = list(text["train"]["text"]), list(text["test"]["text"])[: args.test_chunks]
    tokenizer = model.train_tokenizer(train_texts, spec.vocab_size)
    lm = model.build_language_model(spec, tokenizer, args.seed + 1)  # as build_base builds it
    blocks = torch.tensor(training.text_blocks(train_texts, tokenizer, args.seq_len).with_format(None)["input_ids"][:])
    optimizer = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(args.seed)
    profile, start, step = [], time.perf_counter(), 0

    def measure() -> None:
        bi = importance.text_block_influence(lm, tokenizer, test_texts, batch_size=32, max_length=args.seq_len)
        spread = importance.influence_spread(bi)
        profile.append({"step": step, "bi": [round(b, 4) for b in bi], **spread, "seconds": time.perf_counter() - start})
        print(f"{name} step {step}: median/max {spread['median_to_max']:.3f}, top share {spread['top_share']:.3f}, effective layers "
              f"{spread['effective_layers']:.2f}, BI {[round(b, 3) for b in bi]}", flush=True)

    measure()
    while step < steps:
        order = torch.randperm(len(blocks), generator=generator)
        for i in range(0, len(order) - args.batch_size + 1, args.batch_size):
            lm.train()
            batch = blocks[order[i:i + args.batch_size]]
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / args.warmup)
            loss = lm(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % args.every == 0 or step == steps:
                measure()
            if step >= steps:
                break
    return {"name": name, "spec": overrides, "lr": lr, "weight_decay": weight_decay, "parameters": sum(p.numel() for p in lm.parameters()),
            "final_loss": float(loss), "profile": profile}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", default="data/prepared", help="a prepared data directory (stage prepare)")
    parser.add_argument("--candidate", action="append", default=[],
                        help="NAME:JSON, the ProfileSpec fields that differ from the tiny profile, and optionally "
                             "lr, weight_decay, steps (init_std: an alias of lm_init_std) (repeatable)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--test-chunks", type=int, default=84)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    import torch

    torch.manual_seed(args.seed)
    results = []
    for item in args.candidate or ["tiny:{}"]:
        name, _, spec = item.partition(":")
        results.append(run_candidate(name, json.loads(spec or "{}"), args))
    print("\n| candidate | params | step | median / max BI | top share | effective layers | BI layer 0 | max BI of layers 1.. |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        for p in r["profile"]:
            rest = max((b for b in p["bi"][1:] if not math.isnan(b)), default=math.nan)
            print(f"| {r['name']} | {r['parameters']:,} | {p['step']} | {p['median_to_max']:.3f} | {p['top_share']:.3f} | "
                  f"{p['effective_layers']:.2f} | {p['bi'][0]:.3f} | {rest:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
