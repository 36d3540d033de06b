"""Pruned-inference benchmark: prefill latency, per-token decode latency and tokens/s of the unpruned model and of
the model with 1..n decoder layers removed (`pipeline.pruning.remove_layers`), beside the ideal (L-k)/L.

    .venv/bin/python bench/infer_bench.py                      # CPU default (preset `cpu-infer`, 1 thread)
    .venv/bin/python bench/infer_bench.py --via-export         # time the exported checkpoints, reloaded
    .venv/bin/python bench/infer_bench.py --preset 1b          # on a GPU machine (bf16 weights)

One command, one table (markdown on stdout, JSON in bench/infer_bench.last.json or --json). The layers removed are
chosen as the pipeline does: never inside the visual region (the sparse-uniform 25% selection, protected), deepest
first (`choose_layers_to_prune` on a score that falls with depth), so variant k+1 removes what k removed and one more.
With --via-export every variant (the unpruned one too) goes through `export_pruned` and
`LlavaForConditionalGeneration.from_pretrained`, so the timed models are the exported checkpoints.

Method: greedy decoding (`generate`, do_sample=False, num_beams=1) with the KV cache, on one image + text prompt of
--seq tokens; EOS disabled so every run decodes exactly --new-tokens tokens. A logits processor that only reads the
clock marks when each step's logits arrive: prefill = generate's start -> first logits (vision tower, projector, the
prompt's forward); per-token decode latency = the interval between consecutive logits (one cached forward of one
token plus generate's bookkeeping); tokens/s = batch / that; total = the whole generate. Medians (prefill, total:
over --repeats repeats; decode: over every interval of every repeat) after --warmup, the variants interleaved
(rotating order) within each repeat so that drift on shared cores hits them alike. torch threads are
fixed (--threads, default 1 on CPU). Ratios are to the unpruned model; target (issue 6): ratio <= (L-k)/L + 0.03.
The part of a step that does not scale with the layer count (vision tower, LM head, `generate`'s per-token
bookkeeping) is what keeps a ratio above (L-k)/L.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import _llava  # noqa: E402  (sets sys.path to the repo root)
import torch  # noqa: E402

from pipeline import pruning  # noqa: E402
from pipeline import selection  # noqa: E402

SLACK = 0.03


class _NoProcessor:
    """export_pruned writes the processor beside the weights; the bench model has none."""

    def save_pretrained(self, path) -> None:  # noqa: D401
        pass


def removal_order(num_layers: int, n: int) -> tuple[list[int], list[int]]:
    """(protected visual region, the n layers to remove in order: deepest unprotected first)."""
    protected = selection.select_layers(num_layers, "uniform", 0.25)
    unprotected = num_layers - len(protected)
    if not 1 <= n < unprotected:
        raise SystemExit(f"--max-removed must be in 1..{unprotected - 1} for {num_layers} layers "
                         f"({len(protected)} protected: {protected}); got {n}")
    scores = [float(num_layers - i) for i in range(num_layers)]  # deeper = less important
    chosen = pruning.choose_layers_to_prune(scores, n, protected)
    return protected, sorted(chosen, reverse=True)


def variants(shape: _llava.Shape, args, tmp: Path) -> list[dict]:
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    base = _llava.build_model(shape, device=args.device, dtype=dtype, seed=args.seed).eval()
    protected, order = removal_order(shape.layers, args.max_removed)
    out = []
    for k in range(args.max_removed + 1):
        model = base if k == 0 and not args.via_export else copy.deepcopy(base)
        removed = sorted(order[:k])
        kept = pruning.remove_layers(model, removed, protected=protected) if k else list(range(shape.layers))
        if args.via_export:
            from transformers import LlavaForConditionalGeneration

            path = pruning.export_pruned(model, _NoProcessor(), tmp / f"k{k}", removed=removed, kept=kept,
                                   meta={"bench": "infer"})
            del model
            model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(args.device).eval()
            model.generation_config.pad_token_id = 0
            model.generation_config.eos_token_id = None
        assert len(model.model.language_model.layers) == shape.layers - k
        out.append({"k": k, "removed": removed, "model": model})
    return out


class _Stamps:
    """A logits processor that only records the time at which each generation step's logits arrive."""

    def __init__(self, device: str):
        self.device = device
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __call__(self, input_ids, scores):
        _llava.sync(self.device)
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        return scores


def generate_timed(model, inputs, n: int, device: str) -> dict[str, tuple[float, list[float], float]]:
    """One greedy generate of exactly n new tokens. Per clock: (prefill = start -> first logits, the n-1 per-token
    decode intervals between consecutive logits, total generate time)."""
    from transformers import LogitsProcessorList

    stamps = _Stamps(device)
    _llava.sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        ids = model.generate(**inputs, max_new_tokens=n, do_sample=False, num_beams=1, use_cache=True,
                             logits_processor=LogitsProcessorList([stamps]))
    _llava.sync(device)
    w1, c1 = time.perf_counter(), time.process_time()
    assert ids.shape[1] == inputs["input_ids"].shape[1] + n, (ids.shape, n)
    assert len(stamps.wall) == n, len(stamps.wall)
    out = {}
    for clock, t0, t1, marks in (("wall", w0, w1, stamps.wall), ("cpu", c0, c1, stamps.cpu)):
        out[clock] = (marks[0] - t0, [b - a for a, b in zip(marks, marks[1:])], t1 - t0)
    return out


CLOCKS = ("wall", "cpu")
METRICS = ("prefill", "decode", "total")


def measure(vs: list[dict], inputs, args) -> None:
    """Per variant and clock: prefill and total per repeat, every per-token decode interval of every repeat."""
    for v in vs:
        v["samples"] = {f"{m}_{clock}_s": [] for m in METRICS for clock in CLOCKS}
    for r in range(args.warmup + args.repeats):
        order = vs[r % len(vs):] + vs[: r % len(vs)]
        for v in order:
            timing = generate_timed(v["model"], inputs, args.new_tokens, args.device)
            if r < args.warmup:
                continue
            for clock, (prefill, decode, total) in timing.items():
                v["samples"][f"prefill_{clock}_s"].append(prefill)
                v["samples"][f"decode_{clock}_s"].extend(decode)
                v["samples"][f"total_{clock}_s"].append(total)


def summarize(vs: list[dict], shape: _llava.Shape, args, env: dict) -> dict:
    Lc = shape.layers
    rows = []
    for v in vs:
        row = {"k": v["k"], "layers": Lc - v["k"], "removed": v["removed"], "ideal_ratio": (Lc - v["k"]) / Lc}
        for m in METRICS:
            for clock in CLOCKS:
                row[f"{m}_{clock}_ms"] = 1000 * _llava.median(v["samples"][f"{m}_{clock}_s"])
        # the headline columns use --clock
        row["prefill_ms"] = row[f"prefill_{args.clock}_ms"]
        row["decode_ms_per_token"] = row[f"decode_{args.clock}_ms"]
        row["total_ms"] = row[f"total_{args.clock}_ms"]
        row["decode_tokens_per_s"] = shape.batch * 1000 / row["decode_ms_per_token"]
        row["e2e_tokens_per_s"] = shape.batch * args.new_tokens * 1000 / row["total_ms"]
        row["samples"] = v["samples"]
        rows.append(row)
    ref = rows[0]
    for row in rows:
        row["target"] = row["ideal_ratio"] + SLACK
        for clock in CLOCKS:
            for m in METRICS:
                row[f"{m}_{clock}_ratio"] = row[f"{m}_{clock}_ms"] / ref[f"{m}_{clock}_ms"]
        for m in METRICS:
            row[f"{m}_ratio"] = row[f"{m}_{args.clock}_ratio"]
        row["met"] = {m: row[f"{m}_ratio"] <= row["target"] + 1e-12 for m in METRICS}
    return {
        "benchmark": "infer",
        "command": " ".join(["python bench/infer_bench.py", *sys.argv[1:]]),
        "environment": env | {"loadavg_1m_after": os.getloadavg()[0]},
        "shape": dataclasses.asdict(shape) | {"image_tokens": shape.image_tokens},
        "settings": {k: getattr(args, k) for k in ("device", "precision", "threads", "warmup", "repeats",
                                                   "new_tokens", "max_removed", "via_export", "clock")},
        "rows": rows,
        "targets_met": all(all(r["met"].values()) for r in rows[1:]),
    }


def markdown(result: dict) -> str:
    st = result["settings"]
    other = "cpu" if st["clock"] == "wall" else "wall"
    show_other = st["device"] == "cpu"
    header = ["removed k", "layers", "(L-k)/L", "prefill ms", "prefill ratio", "decode ms/token", "decode ratio",
              "decode tokens/s", f"{st['new_tokens']} tokens ms", "total ratio", "target ≤", "met"]
    if show_other:
        header.append(f"{other} ratios p/d/t")
    rows = []
    for r in result["rows"]:
        met = "–" if r["k"] == 0 else ("yes" if all(r["met"].values()) else
                                        "no: " + ", ".join(m for m, ok in r["met"].items() if not ok))
        row = [
            r["k"], f"{r['layers']}" + (f" (−{','.join(map(str, r['removed']))})" if r["removed"] else ""),
            f"{r['ideal_ratio']:.3f}", f"{r['prefill_ms']:.1f}", f"{r['prefill_ratio']:.3f}",
            f"{r['decode_ms_per_token']:.2f}", f"{r['decode_ratio']:.3f}", f"{r['decode_tokens_per_s']:.1f}",
            f"{r['total_ms']:.0f}", f"{r['total_ratio']:.3f}", "–" if r["k"] == 0 else f"{r['target']:.3f}", met,
        ]
        if show_other:
            row.append("/".join(f"{r[f'{m}_{other}_ratio']:.3f}" for m in METRICS))
        rows.append(row)
    s, env = result["shape"], result["environment"]
    return "\n".join([
        f"Greedy generation with KV cache, LLaVA with a {s['layers']} x {s['hidden']} LLaMA decoder (heads "
        f"{s['heads']}/{s['kv_heads']}, FFN {s['intermediate']}, vocab {s['vocab']}) + CLIP {s['vision_layers']} x "
        f"{s['vision_hidden']}; prompt {s['seq']} tokens ({s['image_tokens']} image), batch {s['batch']}, "
        f"{st['new_tokens']} new tokens; {st['precision']}, {env['device']} ({env.get('gpu') or env.get('cpu')}), "
        f"{env['torch_threads']} thread(s), torch {env['torch']}; {st['clock']}-clock medians of {st['repeats']} "
        f"repeats after {st['warmup']} warm-up{', exported checkpoints reloaded' if st['via_export'] else ''}; "
        f"load average {env['loadavg_1m']:.2f} -> {env['loadavg_1m_after']:.2f}.",
        "",
        _llava.md_table(header, rows),
        f"- all pruned ratios ({st['clock']} clock) <= (L-k)/L + {SLACK}: "
        f"{'met' if result['targets_met'] else 'NOT met'}",
    ])


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    _llava.add_shape_args(p, default_preset="cpu-infer")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="weights dtype (CPU fp32, GPU bf16)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on CPU)")
    p.add_argument("--max-removed", type=int, default=None, help="n: variants remove 1..n layers (default L/4)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--via-export", action="store_true", help="time exported + reloaded checkpoints")
    p.add_argument("--clock", choices=CLOCKS, default="wall",
                   help="clock of the headline columns and targets: wall, or process CPU time (single-threaded CPU "
                        "runs only: robust to other processes sharing the cores); both are in the JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=Path(__file__).with_name("infer_bench.last.json"))
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    if args.preset is None and cuda:
        args.preset = "1b"
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    if args.threads is None:
        args.threads = 0 if cuda else 1
    if args.clock == "cpu" and (cuda or args.threads != 1):
        raise SystemExit("--clock cpu needs a single-threaded CPU run (--device cpu --threads 1)")
    if args.new_tokens < 2 or args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--new-tokens must be >= 2, --repeats >= 1, --warmup >= 0")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    shape = _llava.shape_from_args(args)
    if args.max_removed is None:
        args.max_removed = max(1, shape.layers // 4)
    args.threads = _llava.set_threads(args.threads or None)
    env = _llava.environment(args.device)
    inputs = _llava.batch(shape, device=args.device, seed=args.seed, labels=False)
    if args.precision == "bf16":
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"[infer_bench] building the unpruned model and {args.max_removed} pruned variant(s)", file=sys.stderr,
              flush=True)
        vs = variants(shape, args, Path(tmp))
        print(f"[infer_bench] timing: {args.warmup} + {args.repeats} repeats", file=sys.stderr, flush=True)
        with _llava.no_gc():
            measure(vs, inputs, args)
    result = summarize(vs, shape, args, env)
    return _llava.publish(result, markdown(result), args.json)


if __name__ == "__main__":
    main()
