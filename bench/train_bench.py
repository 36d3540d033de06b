"""Training-step benchmark: what selective tuning saves, measured on the real training path, beside the FLOP-model
limit.

    .venv/bin/python bench/train_bench.py                       # CPU default (preset `cpu`, 1 thread)
    .venv/bin/python bench/train_bench.py --preset 1b           # on a GPU machine: 1B-class LLaVA, bf16 autocast

One command, one table (markdown on stdout, JSON in bench/train_bench.last.json or --json). Rows, on a LLaMA-shaped
LLaVA built from configs (bench/_llava.py; every size is a flag):

    all_full           every decoder layer + projector, full-parameter (the reference: ratios are against it)
    uniform25_full     the paper's sparse-uniform 25% of the layers + projector, full-parameter
    all_lora           LoRA on every layer + projector
    uniform25_lora     LoRA on the uniform 25% + projector
    projector_only     projector only (LLaVA stage 1)
    top25_full_projector_frozen   top 25% of the layers, projector frozen: backward stops inside the lowest
                                  trainable layer (`tuning.install_backward_stop`)

Each row builds the model, applies `pipeline.tuning.apply_trainability` + `install_backward_stop`, the optimizer from
`build_optimizer` (fused AdamW over trainable parameters only) and, with --gradient-checkpointing,
`enable_gradient_checkpointing`; one step is what the transformers Trainer does: forward (bf16 autocast on GPU with
--precision autocast-bf16, as `bf16: true` does), backward, clip_grad_norm_(1.0) over the trainable parameters, AdamW
step, zero_grad(set_to_none=True). Columns: median step time after warm-up (wall clock; CPU time beside it on CPU,
which shared cores inflate less), its ratio to all_full, the FLOP-model limit of that ratio and measured / limit,
trainable parameters, AdamW state bytes, (trainable parameter + optimizer state bytes) / all_full's, peak memory
(CPU: peak RSS of a fresh process running that row, and its rise over the RSS before the first step; GPU:
torch.cuda.max_memory_allocated), achieved model GFLOP/s and, on GPU, MFU.

FLOP model (per step; T = batch * seq tokens, B = batch, S = seq, h = hidden, V = vocab; vision tokens Tv):
  - every linear map in -> out of a decoder layer (q, k, v, o, gate, up, down) costs F = 2*T*in*out forward, F more
    for its input gradient if anything *before* it in the forward pass trains, and F more for its weight gradient
    if it trains (full-parameter). A frozen layer on the gradient path therefore costs 2F instead of 3F, and a layer
    below the lowest trainable point (projector and embeddings frozen: backward stop) costs F.
  - LoRA rank r on in -> out adds 2*T*r*(in+out) forward, and backward 2*T*r*out (B's weight gradient) + 2*T*r*out
    (gradient into A's output) + 2*T*in*r (A's weight gradient) + 2*T*in*r if the input gradient is needed.
  - attention scores (QK^T and AV, causal mask not discounted): A = 4*B*S^2*h forward, 2A backward when gradient
    passes through them.
  - vision tower (always frozen; its input is detached): forward only, every layer (HF runs the whole tower though
    features come from the second-to-last layer), patch embedding included.
  - projector (hv -> h -> h): forward; when it trains, both weight gradients + the inner input gradient.
  - LM head: 2*T*h*V forward, 2*T*h*V for its input gradient (always: something below it trains).
  - gradient checkpointing: one more forward of every decoder layer that backward passes through (counted in the
    limit, not in the model FLOPs of MFU).
  limit(row) = FLOPs(row) / FLOPs(all_full). For uniform25_full with negligible head/vision/attention this is
  (0.25*3 + 0.75*2)/3 = 0.75. Elementwise work, the optimizer and clipping are not in the model (the optimizer and
  clipping scale with the trainable parameters, so they push selective rows *below* the limit).
  MFU (GPU) = (forward + backward model FLOPs) / step time / peak FLOP/s (--peak-flops, default H100 SXM dense bf16
  989e12).

Targets (issue 6, checked in the table, not asserted): uniform25_full step / all_full <= 0.78; uniform25_full
(trainable params + optimizer state) / all_full's <= 0.27.

Longer than 400 lines on purpose: a benchmark is one script a user runs and reads top to bottom (presets, the
rows, the FLOP model, the table), not a library.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _llava  # noqa: E402  (sets sys.path to the repo root)
import torch  # noqa: E402

import pipeline.model  # noqa: E402
from pipeline import selection  # noqa: E402
from pipeline import tuning  # noqa: E402

MODES: dict[str, dict] = {
    "all_full": dict(strategy="all", language_model="full", projector="full"),
    "uniform25_full": dict(strategy="uniform", language_model="full", projector="full"),
    "all_lora": dict(strategy="all", language_model="lora", projector="full"),
    "uniform25_lora": dict(strategy="uniform", language_model="lora", projector="full"),
    "projector_only": dict(strategy=None, language_model="frozen", projector="full"),
    "top25_full_projector_frozen": dict(strategy="top", language_model="full", projector="frozen"),
}
REFERENCE = "all_full"
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
TARGET_STEP_RATIO = 0.78
TARGET_STATE_RATIO = 0.27


# --------------------------------------------------------------------------------------------------------------
# Setup and one step (the Trainer's step)
# --------------------------------------------------------------------------------------------------------------
def trainability(mode: str, shape: _llava.Shape, args) -> tuning.Trainability:
    m = MODES[mode]
    layers = () if m["strategy"] is None else tuple(selection.select_layers(shape.layers, m["strategy"], args.budget))
    r = args.lora_r or max(4, shape.hidden // 32)  # LLaVA-1.5: r 128 at hidden 4096, alpha 2r
    lora = tuning.LoraSpec(r=r, alpha=2 * r, dropout=args.lora_dropout)
    return tuning.Trainability(projector=m["projector"], language_model=m["language_model"], layers=layers, lora=lora)


def setup(mode: str, shape: _llava.Shape, args):
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model = _llava.build_model(shape, device=args.device, dtype=dtype, seed=args.seed)
    torch.manual_seed(args.seed)
    model = tuning.apply_trainability(model, trainability(mode, shape, args))
    tuning.install_backward_stop(model)
    if args.gradient_checkpointing:
        tuning.enable_gradient_checkpointing(model)
    optimizer = tuning.build_optimizer(model, projector_lr=1e-4, lm_lr=2e-5)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, optimizer, params


def make_step(model, optimizer, params, inputs, args):
    autocast = args.precision == "autocast-bf16"

    def step():
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=autocast):
            loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(step, device: str) -> tuple[float, float]:
    _llava.sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    step()
    _llava.sync(device)
    return time.perf_counter() - w0, time.process_time() - c0


# --------------------------------------------------------------------------------------------------------------
# FLOP model (see the module docstring)
# --------------------------------------------------------------------------------------------------------------
def _trains(module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _linear(layer, name):
    mod = layer.get_submodule(name)
    base = getattr(mod, "base_layer", mod)
    r = 0
    for a in getattr(mod, "lora_A", {}).values():
        if any(p.requires_grad for p in a.parameters()):
            r += a.out_features
    out_f, in_f = base.weight.shape
    return in_f, out_f, bool(base.weight.requires_grad), r


def _linear_flops(T_: int, in_f: int, out_f: int, full: bool, r: int, need_in: bool) -> tuple[int, int]:
    f = 2 * T_ * in_f * out_f
    fwd = f + (2 * T_ * r * (in_f + out_f) if r else 0)
    if not (need_in or full or r):
        return fwd, 0  # no gradient reaches this linear at all
    bwd = (f if need_in else 0) + (f if full else 0)
    if r:
        bwd += 2 * T_ * r * out_f * 2 + 2 * T_ * in_f * r + (2 * T_ * in_f * r if need_in else 0)
    return fwd, bwd


def flop_model(model, shape: _llava.Shape, gradient_checkpointing: bool) -> dict:
    base = pipeline.model._unwrap(model)
    B, Sq, h, V = shape.batch, shape.seq, shape.hidden, shape.vocab
    T_ = B * Sq
    out = {"vision_fwd": 0, "projector_fwd": 0, "projector_bwd": 0, "layers_fwd": 0, "layers_bwd": 0,
           "layers_recompute": 0, "head_fwd": 0, "head_bwd": 0}
    # vision tower: patch embedding + every layer, forward only
    P, hv, iv = shape.image_tokens, shape.vision_hidden, shape.vision_intermediate
    Tv = B * (P + 1)
    out["vision_fwd"] = 2 * B * P * 3 * shape.patch**2 * hv + shape.vision_layers * (
        2 * Tv * (4 * hv * hv + 2 * hv * iv) + 4 * B * (P + 1) ** 2 * hv)
    # projector hv -> h -> h on the image tokens
    proj = pipeline.model.projector(base)
    p1 = 2 * B * P * hv * h
    p2 = 2 * B * P * h * h
    out["projector_fwd"] = p1 + p2
    upstream = _trains(proj) or _trains(pipeline.model.language_model(base).get_input_embeddings())
    if _trains(proj):
        out["projector_bwd"] = p1 + 2 * p2  # weight grads of both + input grad of the second
    attn = 4 * B * Sq * Sq * h
    trained_layer_flops = 0
    for layer in pipeline.model.decoder_layers(base):
        lin = {n: _linear(layer, n) for n in LINEARS}
        need = {}
        flowing = upstream
        need["self_attn.q_proj"] = need["self_attn.k_proj"] = need["self_attn.v_proj"] = flowing
        qkv_train = any(lin[n][2] or lin[n][3] for n in LINEARS[:3])
        flowing = flowing or qkv_train
        attn_bwd = 2 * attn if flowing else 0
        need["self_attn.o_proj"] = flowing
        flowing = flowing or lin["self_attn.o_proj"][2] or lin["self_attn.o_proj"][3]
        need["mlp.gate_proj"] = need["mlp.up_proj"] = flowing
        flowing = flowing or any(lin[n][2] or lin[n][3] for n in ("mlp.gate_proj", "mlp.up_proj"))
        need["mlp.down_proj"] = flowing
        flowing = flowing or lin["mlp.down_proj"][2] or lin["mlp.down_proj"][3]
        fwd, bwd = attn, attn_bwd
        for n, (i, o, full, r) in lin.items():
            f, b = _linear_flops(T_, i, o, full, r, need[n])
            fwd, bwd = fwd + f, bwd + b
            if full or r:
                trained_layer_flops += 2 * T_ * i * o
        out["layers_fwd"] += fwd
        out["layers_bwd"] += bwd
        if gradient_checkpointing and bwd:
            out["layers_recompute"] += fwd
        upstream = flowing
    out["head_fwd"] = 2 * T_ * h * V
    head = base.get_output_embeddings()
    out["head_bwd"] = (2 * T_ * h * V if upstream else 0) + (2 * T_ * h * V if _trains(head) else 0)
    out["model_flops"] = sum(v for k, v in out.items() if k != "layers_recompute")
    out["executed_flops"] = out["model_flops"] + out["layers_recompute"]
    all_linear = sum(2 * T_ * _linear(layer, n)[0] * _linear(layer, n)[1]
                     for layer in pipeline.model.decoder_layers(base) for n in LINEARS)
    out["trained_layer_fraction"] = trained_layer_flops / all_linear  # of the layers' linear forward FLOPs
    return out


# --------------------------------------------------------------------------------------------------------------
# One row in a fresh process: memory, parameters, optimizer state (and timing when --timing isolated)
# --------------------------------------------------------------------------------------------------------------
def worker(mode: str, shape: _llava.Shape, args) -> dict:
    model, optimizer, params = setup(mode, shape, args)
    inputs = _llava.batch(shape, device=args.device, seed=args.seed)
    step = make_step(model, optimizer, params, inputs, args)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base_mem = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base_mem = _llava.rss_bytes()
        _llava.reset_peak_rss()
    times = []
    isolated = args.timing == "isolated"
    n_steps = args.warmup + args.steps if isolated else args.mem_steps
    with _llava.no_gc():
        for i in range(n_steps):
            t = timed(step, args.device)
            if isolated and i >= args.warmup:
                times.append(t)
    peak = torch.cuda.max_memory_allocated() if cuda else _llava.peak_rss_bytes()
    report = tuning.trainability_report(model)
    row = {
        "mode": mode,
        "layers": report["trained_layers"],
        "trainable_params": report["trainable"],
        "total_params": report["total"],
        "trainable_param_bytes": sum(p.numel() * p.element_size() for p in params),
        "optimizer_state_bytes": tuning.optimizer_state_bytes(optimizer),
        "peak_memory_bytes": int(peak),
        "memory_before_step_bytes": int(base_mem),
        "step_memory_bytes": int(peak - base_mem),
        "flops": flop_model(model, shape, args.gradient_checkpointing),
        "fused_adamw": bool(optimizer.defaults.get("fused")),
    }
    if times:
        row["wall_s"] = [w for w, _ in times]
        row["cpu_s"] = [c for _, c in times]
    return row


def run_worker(mode: str, shape: _llava.Shape, args, out: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", mode, "--_out", str(out), *passthrough(args),
           *_llava.shape_argv(shape)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"worker {mode} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def passthrough(args) -> list[str]:
    out = ["--device", args.device, "--precision", args.precision, "--threads", str(args.threads),
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--mem-steps", str(args.mem_steps),
           "--timing", args.timing, "--budget", str(args.budget), "--lora-dropout", str(args.lora_dropout),
           "--seed", str(args.seed)]
    if args.lora_r:
        out += ["--lora-r", str(args.lora_r)]
    if args.gradient_checkpointing:
        out.append("--gradient-checkpointing")
    return out


# --------------------------------------------------------------------------------------------------------------
# Interleaved timing: every row's model in this process, one step of each per round (shared cores drift slowly,
# so interleaving keeps the ratios fair)
# --------------------------------------------------------------------------------------------------------------
def interleaved_times(modes: list[str], shape: _llava.Shape, args) -> dict[str, dict[str, list[float]]]:
    inputs = _llava.batch(shape, device=args.device, seed=args.seed)
    steps = {}
    for mode in modes:
        model, optimizer, params = setup(mode, shape, args)
        steps[mode] = make_step(model, optimizer, params, inputs, args)
    times = {m: {"wall_s": [], "cpu_s": []} for m in modes}
    with _llava.no_gc():
        for r in range(args.warmup + args.steps):
            order = modes[r % len(modes):] + modes[: r % len(modes)]  # rotate: no row always runs first
            for mode in order:
                w, c = timed(steps[mode], args.device)
                if r >= args.warmup:
                    times[mode]["wall_s"].append(w)
                    times[mode]["cpu_s"].append(c)
    return times


# --------------------------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------------------------
def summarize(rows: list[dict], shape: _llava.Shape, args, env: dict) -> dict:
    ref = next(r for r in rows if r["mode"] == REFERENCE)
    ref_wall, ref_cpu = _llava.median(ref["wall_s"]), _llava.median(ref["cpu_s"])
    ref_state = ref["trainable_param_bytes"] + ref["optimizer_state_bytes"]
    for r in rows:
        r["step_s"] = _llava.median(r["wall_s"])
        r["step_cpu_s"] = _llava.median(r["cpu_s"])
        r["step_ratio"] = r["step_s"] / ref_wall
        r["step_cpu_ratio"] = r["step_cpu_s"] / ref_cpu
        r["flop_limit"] = r["flops"]["executed_flops"] / ref["flops"]["executed_flops"]
        r["measured_over_limit"] = r["step_ratio"] / r["flop_limit"]
        r["cpu_measured_over_limit"] = r["step_cpu_ratio"] / r["flop_limit"]
        r["state_ratio"] = (r["trainable_param_bytes"] + r["optimizer_state_bytes"]) / ref_state
        r["model_gflops_per_s"] = r["flops"]["model_flops"] / r["step_s"] / 1e9
        if args.device == "cuda":
            r["mfu"] = r["flops"]["model_flops"] / r["step_s"] / args.peak_flops
    sel = next((r for r in rows if r["mode"] == "uniform25_full"), None)
    targets = {}
    if sel:
        targets = {
            "uniform25_full_step_ratio": {"value": sel["step_ratio"], "target": TARGET_STEP_RATIO,
                                          "met": sel["step_ratio"] <= TARGET_STEP_RATIO},
            "uniform25_full_state_ratio": {"value": sel["state_ratio"], "target": TARGET_STATE_RATIO,
                                           "met": sel["state_ratio"] <= TARGET_STATE_RATIO},
        }
    return {
        "benchmark": "train",
        "command": " ".join(["python bench/train_bench.py", *sys.argv[1:]]),
        "environment": env | {"loadavg_1m_after": os.getloadavg()[0]},
        "shape": dataclasses.asdict(shape) | {"image_tokens": shape.image_tokens},
        "settings": {k: getattr(args, k) for k in ("device", "precision", "threads", "warmup", "steps", "timing",
                                                   "gradient_checkpointing", "budget", "lora_r", "lora_dropout")},
        "rows": rows,
        "targets": targets,
    }


def markdown(result: dict) -> str:
    cuda = result["settings"]["device"] == "cuda"
    mb = 2**20
    header = ["row", "layers", "step ms", "ratio", "FLOP limit", "measured ÷ limit"]
    header += [] if cuda else ["CPU ms", "CPU ratio"]
    header += ["trainable params", "AdamW state MB", "params+state ratio", "peak mem MB", "step mem MB", "GFLOP/s"]
    header += ["MFU"] if cuda else []
    rows = []
    for r in result["rows"]:
        layers = r["layers"]
        n = result["shape"]["layers"]
        lay = "none" if not layers else (f"all {n}" if len(layers) == n else f"{len(layers)}/{n}: " + ",".join(map(str, layers)))
        row = [r["mode"], lay, f"{1000 * r['step_s']:.1f}", f"{r['step_ratio']:.3f}", f"{r['flop_limit']:.3f}",
               f"{r['measured_over_limit']:.3f}"]
        if not cuda:
            row += [f"{1000 * r['step_cpu_s']:.1f}", f"{r['step_cpu_ratio']:.3f}"]
        row += [f"{r['trainable_params']:,}", f"{r['optimizer_state_bytes'] / mb:.1f}", f"{r['state_ratio']:.3f}",
                f"{r['peak_memory_bytes'] / mb:.0f}", f"{r['step_memory_bytes'] / mb:.0f}",
                f"{r['model_gflops_per_s']:.1f}"]
        if cuda:
            row.append(f"{100 * r['mfu']:.1f}%")
        rows.append(row)
    s, env = result["shape"], result["environment"]
    lines = [
        f"Training step, LLaVA with a {s['layers']} x {s['hidden']} LLaMA decoder (heads {s['heads']}/{s['kv_heads']}, "
        f"FFN {s['intermediate']}, vocab {s['vocab']}) + CLIP {s['vision_layers']} x {s['vision_hidden']} "
        f"({s['image_tokens']} image tokens); batch {s['batch']} x seq {s['seq']}; "
        f"{result['settings']['precision']}, {env['device']} ({env.get('gpu') or env.get('cpu')}), "
        f"{env['torch_threads']} thread(s), torch {env['torch']}; median of {result['settings']['steps']} steps after "
        f"{result['settings']['warmup']} warm-up ({result['settings']['timing']} timing); "
        f"load average {env['loadavg_1m']:.2f} -> {env['loadavg_1m_after']:.2f}.",
        "",
        _llava.md_table(header, rows),
    ]
    for name, t in result["targets"].items():
        lines.append(f"- {name}: {t['value']:.3f} (target <= {t['target']}): {'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    _llava.add_shape_args(p)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "autocast-bf16", "bf16"], default=None,
                   help="fp32 (CPU default); autocast-bf16: fp32 weights + bf16 autocast, the Trainer's bf16 path "
                        "(GPU default); bf16: bf16 weights and optimizer state")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1 on CPU: stable under shared cores; all cores on GPU runs)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (median reported)")
    p.add_argument("--mem-steps", type=int, default=2, help="steps run in each row's memory-measuring process")
    p.add_argument("--timing", choices=["interleaved", "isolated"], default=None,
                   help="interleaved (CPU default): all rows in one process, one step each per round; isolated (GPU "
                        "default): each row timed in its own process")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated rows ({REFERENCE} is always added)")
    p.add_argument("--budget", type=float, default=0.25, help="layer budget of the selective rows")
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default hidden/32, LLaVA's 128 at 4096)")
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--peak-flops", type=float, default=989e12, help="GPU peak FLOP/s for MFU (H100 SXM bf16 dense)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=Path(__file__).with_name("train_bench.last.json"))
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    if args.preset is None and cuda:
        args.preset = "1b"
    args.precision = args.precision or ("autocast-bf16" if cuda else "fp32")
    args.timing = args.timing or ("isolated" if cuda else "interleaved")
    if args.threads is None:
        args.threads = 0 if cuda else 1
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> dict | None:
    args = parse(argv)
    shape = _llava.shape_from_args(args)
    args.threads = _llava.set_threads(args.threads or None)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as the Trainer's tf32=True
        torch.backends.cudnn.allow_tf32 = True
    if args._worker:
        args._out.write_text(json.dumps(worker(args._worker, shape, args)))
        return None
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; expected some of {list(MODES)}")
    modes = [REFERENCE] + [m for m in modes if m != REFERENCE]
    env = _llava.environment(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            print(f"[train_bench] {mode}: memory{' and timing' if args.timing == 'isolated' else ''} in a fresh process",
                  file=sys.stderr, flush=True)
            rows.append(run_worker(mode, shape, args, Path(tmp) / f"{mode}.json"))
    if args.timing == "interleaved":
        print(f"[train_bench] interleaved timing of {len(modes)} rows: {args.warmup} + {args.steps} rounds",
              file=sys.stderr, flush=True)
        times = interleaved_times(modes, shape, args)
        for r in rows:
            r.update(times[r["mode"]])
    result = summarize(rows, shape, args, env)
    return _llava.publish(result, markdown(result), args.json)


if __name__ == "__main__":
    main()
