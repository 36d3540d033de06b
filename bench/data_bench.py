"""Data-scaling benchmark: how the memory and time of the real stage code grow with the size of a LLaVA-format
dataset (a benchmark, not a test: nothing here passes or fails on a threshold).

    .venv/bin/python bench/data_bench.py                        # sizes 2000 and 8000 instruct records
    .venv/bin/python bench/data_bench.py --sizes 40 160         # a quick check (minutes)
    .venv/bin/python bench/data_bench.py --sizes 2000 8000 --prune --keep --workdir /tmp/vr-data-bench

What it does, per run:

1. Source data, generated once for the largest size into <workdir>/source (deterministic by --seed): COCO-like
   640x480 JPEGs (quality 90, shapes over a smooth background with grain: ~40-80 KB each) under coco/train2017/,
   an instruct JSON per size in LLaVA-665K format (10% text-only records without "image" and without <image>,
   ~25% multi-turn with 2-3 human/gpt pairs, <image> only in the first human turn) and a caption JSON per size in
   LLaVA-Pretrain-558K format (single turn, image + caption). With --images separate (default) the captions have
   images of their own under pretrain/ (as LLaVA-Pretrain's LCS-558K images are not LLaVA-665K's COCO, GQA, ...);
   with --images shared they caption the instruct records' images.
2. Per size, a fresh workspace <workdir>/ws-<N>: a copy of pipeline/ and stages/ (taken once, at start, so that code
   edited meanwhile does not mix into a run) and params.yaml (the micro profile of params/micro.yaml with a
   CLIP-ViT-L/14-336-like input, 336 px / 14 px patches = 576 image tokens; no vision or LM pretraining; fixed small
   training steps, so that training time stays about constant and what varies with N is the data handling). Each
   stage runs as `python -m stages.<name>` with cwd=<ws>, VR_PARAMS=<ws>/params.yaml, VR_PREFECT=0,
   MLFLOW_TRACKING_URI=sqlite:///<ws>/mlruns.db, HF_HUB_OFFLINE=1: prepare, build_base, pretrain_projector,
   tune --run all (and prune --run all with --prune).
3. Per stage: wall seconds; peak RSS of the stage's main process (sampled every --poll s) and the kernel's high-water
   mark from wait4 (the largest single process of the tree, DataLoader workers and map() workers included); the peak
   of the sum of RSS, and of PSS (shared pages counted once), over the whole process tree, sampled alike; records/s
   over the records the stage consumes (prepare: instruct + caption records; pretrain_projector: caption records;
   tune, prune: instruct records); and data/prepared bytes against the source image bytes.
4. The training input pipeline alone: samples/s of a torch DataLoader (--workers workers, --batch-size) over
   `pipeline.data.encoding.ConversationDataset(instruct_train, processor, max_length, on_overflow="truncate", ...)`
   with `pipeline.data.encoding.VisualCollator`, processor from `pipeline.model.load_vlm(<ws>/models/base)`, in a
   monitored subprocess of its own. Reported as "not available" while that module does not exist.
5. One markdown table (per stage and size), then per stage the slope of peak RSS in MB per instruct record between
   the smallest and the largest size and the linear extrapolation to --extrapolate (665,000: LLaVA-665K) records,
   peak RSS and hours; written with everything else to --json atomically.

The new params keys (data.num_proc, *.train.dataloader_num_workers, *.train.preprocess) are checked against the
workspace's schema first: with --new-keys auto (default) the ones it refuses are dropped and listed in the output
(`refused_keys` in the JSON); keep: always pass them (a stage then fails on them); drop: never pass them.

A stage whose process tree grows past --rss-limit-gb (default: 85% of the machine's memory) is killed (status
`killed: rss limit`) before the kernel's OOM killer picks a process of someone else; the stages after it are
skipped for that size. The exit code is 1 when a stage failed, after the table and the JSON are written.

Longer than 400 lines on purpose: a benchmark is one script a user runs and reads top to bottom (the source data
generator, the per-stage runs in child processes, the memory probes, the table), not a library.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NEW_KEYS = ("data.num_proc", "pretrain_projector.train.dataloader_num_workers", "tune.train.dataloader_num_workers",
            "pretrain_projector.train.preprocess", "tune.train.preprocess")
MB = 1e6


# --------------------------------------------------------------------------------------------------------------
# Source data (LLaVA-665K / LLaVA-Pretrain-558K formats)
# --------------------------------------------------------------------------------------------------------------
WORDS = (
    "man woman person dog cat horse bus train car bicycle table chair kitchen street building sky tree grass water "
    "boat plate pizza sandwich umbrella bench clock sign window door field beach snow road wall shirt hat bag "
    "red blue green white black yellow brown large small old young wooden metal busy empty sunny cloudy "
    "standing sitting walking holding looking riding eating parked playing near next behind under front top left right"
).split()
QUESTIONS = (
    "What is the man holding?", "How many people are in the picture?", "What color is the bus?",
    "Where is the dog sitting?", "What is on the table?", "Is the street busy?", "What time of day is it?",
    "What is the weather like?", "What are the people doing?", "What is in the background?",
)
VQA_SUFFIX = "\nAnswer the question using a single word or phrase."
DETAIL = ("Describe the image in detail.", "What do you see happening in this image?",
          "Can you elaborate on the elements of the picture provided?", "Explain the visual content of the image.")
CAPTION_PROMPTS = ("Render a clear and concise summary of the photo.", "Give a brief description of the image.",
                   "Write a terse but informative summary of the picture.", "Describe the image concisely.",
                   "Share a concise interpretation of the image provided.")


IMAGE_SETS = ("coco", "pretrain")  # the instruct records' images; the caption records' own (--images separate)


def image_rel(i: int, image_set: str = "coco") -> str:
    return f"coco/train2017/{i:012d}.jpg" if image_set == "coco" else f"pretrain/{i // 10000:05d}/{i:09d}.jpg"


def make_image(seed: int, i: int, image_set: str = "coco") -> bytes:
    """A 640x480 JPEG (quality 90) of ~40-80 KB: shapes over a smooth background, with grain so it compresses like a
    photo rather than like a drawing. Deterministic in (seed, i, image_set)."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, i, IMAGE_SETS.index(image_set)])
    w, h = 640, 480
    img = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(8, 24))):
        x0, y0 = int(rng.integers(-50, w)), int(rng.integers(-50, h))
        x1, y1 = x0 + int(rng.integers(20, 260)), y0 + int(rng.integers(20, 200))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=colour)
    grain = rng.normal(0, rng.uniform(2.0, 6.0), (h // 2, w // 2, 3)).repeat(2, 0).repeat(2, 1)
    pixels = np.clip(np.asarray(img, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_images(job: tuple[str, int, int, int, str]) -> int:
    root, seed, start, stop, image_set = job
    total = 0
    for i in range(start, stop):
        path = Path(root) / image_rel(i, image_set)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = make_image(seed, i, image_set)
        path.write_bytes(data)
        total += len(data)
    return total


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    return " ".join(words).capitalize() + "."


def _answer(rng: random.Random) -> str:
    if rng.random() < 0.6:  # VQA-style short answers dominate LLaVA-665K
        return rng.choice(WORDS)
    return " ".join(_sentence(rng, 8, 20) for _ in range(rng.randint(2, 6)))


def make_records(seed: int, n: int, caption_images: str = "pretrain") -> tuple[list[dict], list[dict]]:
    """(instruct records, caption records). Record i's kind depends on (seed, i) only, so a smaller size is a prefix
    of a larger one; every image record j has image j; the caption set has one record per image record, over the
    image set `caption_images` ("pretrain": images of its own; "coco": the instruct records' images)."""
    instruct, captions = [], []
    image = 0
    for i in range(n):
        rng = random.Random(f"data-bench/{seed}/{i}")
        text_only = rng.random() < 0.10
        pairs = rng.choice((2, 2, 3)) if rng.random() < 0.25 else 1
        conv = []
        for p in range(pairs):
            q = rng.choice(QUESTIONS) + VQA_SUFFIX if rng.random() < 0.6 else rng.choice(DETAIL)
            if text_only:
                q = _sentence(rng, 6, 30).rstrip(".") + "?"
            if p == 0 and not text_only:
                q = "<image>\n" + q
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": _answer(rng)}]
        rec = {"id": f"{i:09d}", "conversations": conv}
        if not text_only:
            rec["image"] = image_rel(image)
            captions.append({"id": f"{image:09d}", "image": image_rel(image, caption_images), "conversations": [
                {"from": "human", "value": "<image>\n" + rng.choice(CAPTION_PROMPTS)},
                {"from": "gpt", "value": _sentence(rng, 6, 16).rstrip(".").lower()},
            ]})
            image += 1
        instruct.append(rec)
    return instruct, captions


def generate_source(root: Path, seed: int, sizes: list[int], procs: int, images: str = "separate") -> dict:
    """Images for the largest size (once; in `procs` processes) and one instruct + caption JSON per size. `images`:
    "separate" gives the caption records images of their own, "shared" the instruct records' images."""
    from concurrent.futures import ProcessPoolExecutor

    sets = ["coco", "pretrain"] if images == "separate" else ["coco"]
    instruct, captions = make_records(seed, max(sizes), caption_images=sets[-1])
    n_images = len(captions)
    t0 = time.perf_counter()
    chunk = max(1, math.ceil(n_images / (procs * 8)))
    jobs = [(str(root), seed, s, min(s + chunk, n_images), image_set)
            for image_set in sets for s in range(0, n_images, chunk)]
    with ProcessPoolExecutor(max_workers=procs) as pool:
        list(pool.map(_write_images, jobs))
    out = {"images": n_images * len(sets), "image_sets": images, "generate_seconds": time.perf_counter() - t0,
           "sizes": {}}
    for n in sizes:
        ins = instruct[:n]
        k = sum("image" in r for r in ins)
        (root / f"instruct_{n}.json").write_text(json.dumps(ins))
        (root / f"pretrain_{n}.json").write_text(json.dumps(captions[:k]))
        out["sizes"][n] = {
            "instruct_records": n, "caption_records": k, "text_only": n - k,
            "multi_turn": sum(len(r["conversations"]) > 2 for r in ins),
            "image_bytes": sum((root / image_rel(j, image_set)).stat().st_size for image_set in sets for j in range(k)),
            "json_bytes": (root / f"instruct_{n}.json").stat().st_size + (root / f"pretrain_{n}.json").stat().st_size,
        }
    return out


# --------------------------------------------------------------------------------------------------------------
# Params
# --------------------------------------------------------------------------------------------------------------
def build_params(args, source: Path, n: int) -> dict:
    import yaml

    p = yaml.safe_load((REPO / "params" / "micro.yaml").read_text())
    spec = dict(p["model"].get("spec", {}))
    # 576 image tokens (CLIP ViT-L/14-336); the micro LM's 128 positions would not hold max_length tokens.
    spec |= {"image_size": args.image_size, "patch_size": args.patch_size,
             "max_position": max(int(spec.get("max_position", 128)), args.max_length)}
    p["model"]["spec"] = spec
    p["data"] |= {
        "num_captions": 4, "num_instruct": 5, "num_vqa_test": 5, "text_qa_repeats": 1, "vision_pairs": 0,
        "pretrain_json": str(source / f"pretrain_{n}.json"), "pretrain_image_dir": str(source),
        "instruct_json": str(source / f"instruct_{n}.json"), "instruct_image_dir": str(source),
        "num_proc": args.num_proc,
    }
    p["vision_pretrain"]["train"]["max_steps"] = 0
    p["lm_pretrain"]["train"]["max_steps"] = 0
    train = {"max_steps": args.max_steps, "batch_size": args.batch_size, "max_length": args.max_length,
             "on_overflow": "truncate", "save_steps": 100_000, "logging_steps": max(1, args.max_steps // 4),
             "dataloader_num_workers": args.workers}
    if args.preprocess != "default":
        train["preprocess"] = args.preprocess
    p["pretrain_projector"]["train"] = dict(train)
    p["tune"]["train"] = dict(train)
    p["tune"]["runs"] = {"all": {"strategy": "all", "language_model": "full"}}
    p["tune"]["importance_runs"] = {}
    p["prune"] |= {"num_layers": 1, "calibration_samples": 8, "batch_size": 4,
                   "curve": {"runs": ["all"], "max_layers": 1, "heal_steps": 0}}
    p["mlflow"] = {"experiment": "visual-region-data-bench"}
    p["registry"]["enabled"] = False
    return p


def drop_key(params: dict, dotted: str) -> None:
    *path, last = dotted.split(".")
    node = params
    for k in path:
        node = node.get(k, {})
    node.pop(last, None)


def refused_new_keys(ws: Path, params: dict, env: dict) -> tuple[list[str], str]:
    """Which of NEW_KEYS the workspace's schema refuses (pipeline.config.validate), and its message."""
    import yaml

    probe = ws / "params.probe.yaml"
    probe.write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.run([sys.executable, "-c", "import sys; from pipeline import config; config.load(sys.argv[1])",
                           str(probe)], cwd=ws, env=env, capture_output=True, text=True)
    probe.unlink()
    if proc.returncode == 0:
        return [], ""
    lines = proc.stderr.strip().splitlines()
    start = next((i for i, line in enumerate(lines) if "ParamsError" in line and "invalid params" in line), None)
    message = lines[start:] if start is not None else lines[-12:]
    refused = [k for k in NEW_KEYS if any(line.strip().startswith(k + ":") for line in message)]
    return refused, "\n".join(message)


# --------------------------------------------------------------------------------------------------------------
# Running and watching a process tree
# --------------------------------------------------------------------------------------------------------------
def _rollup_bytes(pid: int) -> tuple[int, int]:
    """(PSS, anonymous) bytes of a process. Anonymous memory is what a dataset held in the heap costs; RSS and PSS
    also count the pages of memory-mapped Arrow files that were read, which the kernel reclaims as page cache."""
    pss = anon = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
            elif line.startswith("Anonymous:"):
                anon = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return pss, anon


def monitored(cmd: list[str], *, cwd: Path, env: dict, log: Path, poll: float, rss_limit: int,
              timeout: float) -> dict:
    """Run `cmd`, sampling the RSS of its main process and the RSS / PSS sums over its whole tree every `poll`
    seconds; kill the tree past `rss_limit` bytes or `timeout` seconds. Reaps with wait4 for the kernel's
    high-water mark (ru_maxrss: the largest single process of the tree, reaped descendants included)."""
    import psutil

    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    main = psutil.Process(proc.pid)
    try:
        return _watch(proc, main, t0, poll=poll, rss_limit=rss_limit, timeout=timeout)
    except BaseException:  # interrupted: take the stage's tree down with us
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        raise


def _watch(proc, main, t0: float, *, poll: float, rss_limit: int, timeout: float) -> dict:
    import psutil

    peak_main = peak_tree = peak_pss = peak_anon = 0
    max_procs = 1
    killed = None
    status = usage = None
    while True:
        try:
            tree = [main, *main.children(recursive=True)]
        except psutil.Error:
            tree = []
        rss_main = rss_tree = pss_tree = anon_tree = 0
        for p in tree:
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            rss_tree += rss
            pss, anon = _rollup_bytes(p.pid)
            pss_tree, anon_tree = pss_tree + pss, anon_tree + anon
            if p.pid == proc.pid:
                rss_main = rss
        peak_main, peak_tree, peak_pss = max(peak_main, rss_main), max(peak_tree, rss_tree), max(peak_pss, pss_tree)
        peak_anon = max(peak_anon, anon_tree)
        max_procs = max(max_procs, len(tree))
        if killed is None and (rss_tree > rss_limit or time.perf_counter() - t0 > timeout):
            killed = "rss limit" if rss_tree > rss_limit else "timeout"
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the stage's own session: itself and its workers only
            except ProcessLookupError:
                pass
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(poll)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return {
        "rc": proc.returncode, "seconds": seconds, "killed": killed,
        "peak_rss_main_bytes": peak_main, "peak_rss_hwm_bytes": usage.ru_maxrss * 1024,
        "peak_rss_tree_bytes": peak_tree, "peak_pss_tree_bytes": peak_pss, "peak_anon_tree_bytes": peak_anon, "max_processes": max_procs,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
    }


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


# --------------------------------------------------------------------------------------------------------------
# The input pipeline alone (a subprocess: `--input-pipeline-worker`)
# --------------------------------------------------------------------------------------------------------------
def input_pipeline_worker(args) -> int:
    ws = Path(args.input_pipeline_worker).resolve()
    sys.path.insert(0, str(ws))
    os.chdir(ws)
    out = Path(args.worker_out)
    result: dict = {"available": False}
    try:
        from pipeline.data.encoding import ConversationDataset, VisualCollator
    except ImportError as err:
        result["reason"] = f"pipeline.data.encoding: {err}"
        out.write_text(json.dumps(result))
        return 0
    import datasets
    import torch
    from torch.utils.data import DataLoader

    from pipeline.model import load_vlm

    records = datasets.load_from_disk(str(ws / "data/prepared/visual"))["instruct_train"]
    model, processor = load_vlm(ws / "models/base")
    del model
    t0 = time.perf_counter()
    try:
        data = ConversationDataset(records, processor, max_length=args.max_length, on_overflow="truncate",
                                   source="data/prepared/visual, split 'instruct_train'", params_key="tune.train")
        collate = VisualCollator(pad_token_id=processor.tokenizer.pad_token_id)
    except TypeError as err:  # the module exists but its signature differs from the one this bench was written for
        result["reason"] = f"ConversationDataset / VisualCollator: {err}"
        out.write_text(json.dumps(result))
        return 0
    build_s = time.perf_counter() - t0
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, collate_fn=collate,
                        persistent_workers=args.workers > 0, generator=torch.Generator().manual_seed(0))
    # Untimed: worker start-up, the first batch and what the workers prefetched meanwhile (prefetch_factor 2 each);
    # the rate is then the workers' production rate.
    warmup = 1 + 2 * args.workers if args.input_batches > 2 + 2 * args.workers else 1
    t0 = time.perf_counter()
    batches = samples = samples_all = 0
    first_s = pixel_shape = None
    t_timed = t0
    while batches < args.input_batches:
        for batch in loader:
            n_batch = int(batch["input_ids"].shape[0])
            samples_all += n_batch
            if batches == 0:
                first_s = time.perf_counter() - t0
                if "pixel_values" in batch:
                    pixel_shape = list(batch["pixel_values"].shape)
            if batches >= warmup:
                samples += n_batch
            batches += 1
            if batches == warmup:
                t_timed = time.perf_counter()
            if batches >= args.input_batches:
                break
    end = time.perf_counter()
    steady = end - t_timed
    result |= {
        "available": True, "dataset_build_s": build_s, "first_batch_s": first_s, "batches": batches,
        "warmup_batches": warmup, "samples_timed": samples, "seconds_timed": steady,
        "samples_per_s": samples / steady if samples and steady > 0 else None,
        "samples_per_s_with_startup": samples_all / (end - t0),
        "batch_size": args.batch_size, "workers": args.workers, "max_length": args.max_length,
        "pixel_values_shape": pixel_shape, "records": len(records),
    }
    out.write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------
def stage_list(args) -> list[tuple[str, list[str]]]:
    stages = [("prepare", []), ("build_base", []), ("pretrain_projector", []), ("tune", ["--run", "all"])]
    if args.prune:
        stages.append(("prune", ["--run", "all"]))
    return stages


def stage_records(stage: str, counts: dict) -> int | None:
    return {"prepare": counts["instruct_records"] + counts["caption_records"],
            "pretrain_projector": counts["caption_records"], "tune": counts["instruct_records"],
            "prune": counts["instruct_records"]}.get(stage)


def stage_env(ws: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "VR_LAUNCHER", "VR_PIPELINE_RUN_ID")}
    env |= {"VR_PARAMS": str(ws / "params.yaml"), "VR_PREFECT": "0", "MLFLOW_TRACKING_URI": f"sqlite:///{ws / 'mlruns.db'}",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"}
    return env


def run_size(args, n: int, code: Path, source: Path, counts: dict, keys: dict, limit: int) -> dict:
    import yaml

    ws = Path(args.workdir) / f"ws-{n}"
    if ws.exists():
        shutil.rmtree(ws)
    ws.mkdir(parents=True)
    for part in ("pipeline", "stages"):
        shutil.copytree(code / part, ws / part)
    (ws / "logs").mkdir()
    env = stage_env(ws)
    params = build_params(args, source, n)
    if "refused" not in keys:  # first size: ask the schema
        refused, message = refused_new_keys(ws, params, env) if args.new_keys == "auto" else ([], "")
        if args.new_keys == "drop":
            refused = [k for k in NEW_KEYS]
        keys["refused"], keys["message"] = refused, message
    for k in keys["refused"]:
        drop_key(params, k)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    rows, failed = [], None
    for stage, extra in stage_list(args):
        row = {"stage": stage, "size": n, "records": stage_records(stage, counts)}
        if failed:
            rows.append(row | {"status": f"skipped ({failed} failed)"})
            continue
        print(f"[data_bench] N={n}: {stage} ...", file=sys.stderr, flush=True)
        log = ws / "logs" / f"{stage}.log"
        m = monitored([sys.executable, "-m", f"stages.{stage}", *extra], cwd=ws, env=env, log=log, poll=args.poll,
                      rss_limit=limit, timeout=args.stage_timeout)
        row |= m
        row["status"] = "ok" if m["rc"] == 0 else (f"killed: {m['killed']}" if m["killed"] else f"exit {m['rc']}")
        row["records_per_s"] = row["records"] / m["seconds"] if row["records"] and m["rc"] == 0 else None
        if m["rc"] != 0:
            row["log_tail"] = tail(log)
            failed = stage
            print(f"[data_bench] N={n}: {stage} {row['status']}; log {log}:\n{row['log_tail']}", file=sys.stderr)
        print(f"[data_bench] N={n}: {stage} {m['seconds']:.1f} s, peak RSS {m['peak_rss_main_bytes'] / MB:.0f} MB "
              f"(tree {m['peak_rss_tree_bytes'] / MB:.0f} MB)", file=sys.stderr, flush=True)
        rows.append(row)

    prepared = du(ws / "data" / "prepared")
    size = {"size": n, "workspace": str(ws), "prepared_bytes": prepared, **counts,
            "prepared_over_images": prepared / counts["image_bytes"] if prepared and counts["image_bytes"] else None,
            "params": params}
    size["input_pipeline"] = input_pipeline(args, ws, env, limit, failed)
    if not args.keep:
        shutil.rmtree(ws, ignore_errors=True)
    return {"rows": rows, "size": size}


def input_pipeline(args, ws: Path, env: dict, limit: int, failed: str | None) -> dict:
    if not (ws / "pipeline" / "data" / "encoding.py").exists():
        return {"available": False, "reason": "pipeline/data/encoding.py does not exist yet"}
    if failed in ("prepare", "build_base"):
        return {"available": False, "reason": f"needs data/prepared and models/base ({failed} failed)"}
    out = ws / "input_pipeline.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--input-pipeline-worker", str(ws), "--worker-out", str(out),
           "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--max-length", str(args.max_length),
           "--input-batches", str(args.input_batches)]
    print(f"[data_bench] input pipeline on {ws.name} ...", file=sys.stderr, flush=True)
    log = ws / "logs" / "input_pipeline.log"
    m = monitored(cmd, cwd=ws, env=env, log=log, poll=args.poll, rss_limit=limit, timeout=args.stage_timeout)
    try:
        result = json.loads(out.read_text())
    except (OSError, ValueError):
        result = {"available": False, "reason": f"worker exit {m['rc']}", "log_tail": tail(log)}
    if m["rc"] != 0 and result.get("available"):
        result["available"] = False
    if m["rc"] != 0:
        result |= {"reason": result.get("reason") or f"worker exit {m['rc']}", "log_tail": tail(log)}
    return result | {"process": m}


# --------------------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------------------
def fmt(x, digits=1, unit=""):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:,.{digits}f}{unit}"


def scaling(rows: list[dict], sizes: list[int], target: int) -> dict[str, dict]:
    """Per stage: MB per instruct record between the smallest and largest size (main process peak RSS and tree
    peak PSS), and the linear extrapolation of peak RSS and hours to `target` records."""
    lo, hi = min(sizes), max(sizes)
    out = {}
    for stage in dict.fromkeys(r["stage"] for r in rows):
        a = next((r for r in rows if r["stage"] == stage and r["size"] == lo and r.get("rc") == 0), None)
        b = next((r for r in rows if r["stage"] == stage and r["size"] == hi and r.get("rc") == 0), None)
        if a is None or b is None or lo == hi:
            out[stage] = {"available": False}
            continue
        d = hi - lo
        s_rss = (b["peak_rss_main_bytes"] - a["peak_rss_main_bytes"]) / d
        s_tree = (b["peak_pss_tree_bytes"] - a["peak_pss_tree_bytes"]) / d
        s_anon = (b["peak_anon_tree_bytes"] - a["peak_anon_tree_bytes"]) / d
        s_t = (b["seconds"] - a["seconds"]) / d
        out[stage] = {
            "available": True, "from": lo, "to": hi,
            "mb_per_record": s_rss / MB, "tree_pss_mb_per_record": s_tree / MB,
            "tree_anon_mb_per_record": s_anon / MB, "seconds_per_record": s_t,
            "extrapolated_records": target,
            "extrapolated_peak_rss_gb": (b["peak_rss_main_bytes"] + s_rss * (target - hi)) / 1e9,
            "extrapolated_tree_pss_gb": (b["peak_pss_tree_bytes"] + s_tree * (target - hi)) / 1e9,
            "extrapolated_hours": max(0.0, b["seconds"] + s_t * (target - hi)) / 3600,
        }
    return out


def markdown(result: dict) -> str:
    rows, sizes = result["rows"], result["sizes"]
    caption_images = ("images of their own" if result["config"].get("images", "shared") == "separate"
                      else "the instruct records' images")
    lines = [f"Data-scaling bench: {', '.join(str(n) for n in sizes)} instruct records (+ one caption record per "
             f"image, over {caption_images}), images 640x480 JPEG, model input {result['config']['image_size']} px / patch "
             f"{result['config']['patch_size']} ({result['config']['image_tokens']} image tokens), max_steps "
             f"{result['config']['max_steps']}, batch {result['config']['batch_size']}, max_length "
             f"{result['config']['max_length']}, workers {result['config']['workers']}, num_proc "
             f"{result['config']['num_proc']}.", ""]
    table = []
    for r in rows:
        ok = r.get("rc") == 0
        table.append([
            r["stage"], f"{r['size']:,}", r.get("status", "–"), fmt(r.get("seconds")),
            fmt(r.get("records_per_s")) if ok else "–",
            fmt(r["peak_rss_main_bytes"] / MB, 0) if "peak_rss_main_bytes" in r else "–",
            fmt(r["peak_rss_hwm_bytes"] / MB, 0) if "peak_rss_hwm_bytes" in r else "–",
            fmt(r["peak_rss_tree_bytes"] / MB, 0) if "peak_rss_tree_bytes" in r else "–",
            fmt(r["peak_pss_tree_bytes"] / MB, 0) if "peak_pss_tree_bytes" in r else "–",
            r.get("max_processes", "–"),
        ])
    from _llava import md_table

    lines.append(md_table(["stage", "N", "status", "seconds", "records/s", "peak RSS MB (main)",
                           "max RSS MB (wait4)", "peak RSS MB (tree sum)", "peak PSS MB (tree)", "procs"], table))
    target = result["config"]["extrapolate"]
    lines += ["", f"Scaling between N={min(sizes):,} and N={max(sizes):,}, linear extrapolation to {target:,} "
              "instruct records:", ""]
    srows = []
    for stage, s in result["scaling"].items():
        if not s["available"]:
            srows.append([stage, "–", "–", "–", "–", "–", "–"])
            continue
        srows.append([stage, fmt(s["mb_per_record"], 3), fmt(s["tree_pss_mb_per_record"], 3),
                      fmt(s["tree_anon_mb_per_record"], 3),
                      fmt(s["extrapolated_peak_rss_gb"], 1), fmt(s["extrapolated_tree_pss_gb"], 1),
                      fmt(s["extrapolated_hours"], 2)])
    lines.append(md_table(["stage", "MB/record (main RSS)", "MB/record (tree PSS)", "MB/record (tree anon)", f"peak RSS GB @{target:,}",
                           f"tree PSS GB @{target:,}", f"hours @{target:,}"], srows))
    lines += [""]
    drows = []
    for s in result["per_size"]:
        ip = s["input_pipeline"]
        prep = next((r for r in rows if r["stage"] == "prepare" and r["size"] == s["size"]), {})
        drows.append([
            f"{s['size']:,}", f"{s['image_bytes'] / MB:,.1f}", f"{s['prepared_bytes'] / MB:,.1f}",
            fmt(s["prepared_over_images"], 2), fmt(prep.get("records_per_s")),
            fmt(ip.get("samples_per_s")) if ip.get("available") else f"not available ({ip.get('reason', '')})",
            fmt(ip["process"]["peak_pss_tree_bytes"] / MB, 0) if ip.get("available") else "–",
        ])
    lines.append(md_table(["N", "source images MB", "data/prepared MB", "prepared / images", "prepare records/s",
                           f"input pipeline samples/s ({result['config']['workers']} workers)",
                           "input pipeline peak PSS MB (tree)"], drows))
    if result["refused_keys"]:
        lines += ["", f"Params keys refused by the schema and dropped for this run: {', '.join(result['refused_keys'])}."]
    env = result["environment"]
    lines += ["", f"{env.get('cpu', env['device'])}, {env['cpu_count']} CPUs, load average {env['loadavg_1m']:.2f} -> "
              f"{env['loadavg_1m_after']:.2f}; source generation {result['source']['generate_seconds']:.1f} s."]
    return "\n".join(lines)


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000], help="instruct records per run")
    ap.add_argument("--max-steps", type=int, default=20, help="training steps of pretrain_projector and tune")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=640)
    ap.add_argument("--image-size", type=int, default=336)
    ap.add_argument("--patch-size", type=int, default=14)
    ap.add_argument("--workers", type=int, default=2, help="train.dataloader_num_workers, and the input pipeline's")
    ap.add_argument("--num-proc", type=int, default=2, help="data.num_proc")
    ap.add_argument("--preprocess", choices=["auto", "eager", "lazy", "default"], default="auto",
                    help="*.train.preprocess (default: leave the key out, the schema's default)")
    ap.add_argument("--new-keys", choices=["auto", "keep", "drop"], default="auto",
                    help="the params keys being added now: auto = drop the ones the schema refuses")
    ap.add_argument("--prune", action="store_true", help="also run prune --run all")
    ap.add_argument("--images", choices=["separate", "shared"], default="separate",
                    help="the caption records' images: their own (as in LLaVA-Pretrain vs LLaVA-665K) or the "
                         "instruct records' (each split then stores its own copy)")
    ap.add_argument("--input-batches", type=int, default=40, help="batches of the input-pipeline measurement")
    ap.add_argument("--extrapolate", type=int, default=665_000, help="records to extrapolate to (LLaVA-665K)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--poll", type=float, default=0.2, help="seconds between memory samples")
    ap.add_argument("--rss-limit-gb", type=float, default=None, help="kill a stage past this tree RSS (default 85%% of RAM)")
    ap.add_argument("--stage-timeout", type=float, default=4 * 3600)
    ap.add_argument("--workdir", default=None, help="default: a new temp dir, removed at the end unless --keep")
    ap.add_argument("--keep", action="store_true", help="keep the workspaces (data/prepared, models, logs)")
    ap.add_argument("--json", default=str(REPO / "bench" / "data_bench.last.json"))
    ap.add_argument("--input-pipeline-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if any(n < 1 for n in args.sizes):
        ap.error("--sizes must be >= 1")
    args.sizes = sorted(set(args.sizes))
    if args.image_size % args.patch_size:
        ap.error("--image-size must be a multiple of --patch-size")
    if args.max_length <= (args.image_size // args.patch_size) ** 2 + 8:
        ap.error("--max-length leaves no room for text after the image tokens")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.input_pipeline_worker:
        return input_pipeline_worker(args)

    sys.path.insert(0, str(REPO / "bench"))
    import _llava

    env_info = _llava.environment("cpu")
    mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = int(args.rss_limit_gb * 1e9) if args.rss_limit_gb else int(0.85 * mem_total)
    own_workdir = args.workdir is None
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="vr-data-bench-")
    work = Path(args.workdir).resolve()
    args.workdir = str(work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        code = work / "code"  # one snapshot of the code for every size
        shutil.rmtree(code, ignore_errors=True)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for part in ("pipeline", "stages"):
            shutil.copytree(REPO / part, code / part, ignore=ignore)
        source = work / "source"
        print(f"[data_bench] generating {max(args.sizes)} records into {source} ...", file=sys.stderr, flush=True)
        src = generate_source(source, args.seed, args.sizes, procs=max(1, min(2, os.cpu_count() or 1)),
                              images=args.images)
        keys: dict = {}
        rows, per_size = [], []
        for n in args.sizes:
            out = run_size(args, n, code, source, src["sizes"][n], keys, limit)
            rows += out["rows"]
            per_size.append(out["size"])
        if keys.get("refused"):
            print(f"[data_bench] params keys refused by the schema, dropped: {keys['refused']}\n{keys['message']}",
                  file=sys.stderr)
        result = {
            "sizes": args.sizes,
            "config": {k: getattr(args, k) for k in ("max_steps", "batch_size", "max_length", "image_size",
                                                     "patch_size", "workers", "num_proc", "preprocess", "new_keys",
                                                     "prune", "images", "input_batches", "extrapolate", "seed", "poll")}
                      | {"image_tokens": (args.image_size // args.patch_size) ** 2, "rss_limit_bytes": limit},
            "refused_keys": keys.get("refused", []), "schema_message": keys.get("message", ""),
            "source": {k: v for k, v in src.items() if k != "sizes"},
            "rows": rows, "per_size": per_size,
            "scaling": scaling(rows, args.sizes, args.extrapolate),
            "environment": env_info | {"loadavg_1m_after": os.getloadavg()[0], "mem_total_bytes": mem_total},
            "workdir": str(work) if args.keep else None,
        }
        _llava.publish(result, markdown(result), args.json)
        return 0 if all(r.get("rc") == 0 for r in rows) else 1
    finally:
        if not args.keep:
            if own_workdir:
                shutil.rmtree(work, ignore_errors=True)
            else:
                for sub in ("code", "source"):
                    shutil.rmtree(work / sub, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
