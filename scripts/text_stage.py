"""The text stage as the runtime runs it (GPT-2's passes on the device, CLAP run while T5 runs) against the ways it
ran before, in one process, requests interleaved. A measurement script (docs/benchmarks.md), not a test.

    python scripts/text_stage.py --artifacts DIR [--rounds 30] [--device cuda] --out DIR

Runtimes of the same artefacts, each warmed up (``VARIANTS``):
- ``default``: GPT-2's passes on the device (``lm_loop``, since run AU), CLAP on its worker while T5 runs (since
  run AW);
- ``clap_then_t5``: the same with CLAP run before T5 (the session's ``start`` hidden for this runtime only);
- ``gpt2_on_host``: ``lm_loop=False`` and CLAP before T5 (the text stage before run AU).
Per round, each runtime's text stage (``prepare``: tokenizers, CLAP, T5, projection, GPT-2's 8 passes, initial
latents) — wall time; and GPT-2's passes alone on the same projected sequence (``LmLoop.generate`` against
``generate_lm_states`` over the same session). And whether they all give the same conditioning (bit for bit, and the
largest difference). Writes text_stage.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

PROMPT = "techno music with a strong upbeat tempo and high melodic riffs"
NEGATIVE = "low quality, noisy"
# name → (load options, whether CLAP starts in the background)
VARIANTS = {"default": ({}, True), "clap_then_t5": ({}, False), "gpt2_on_host": ({"lm_loop": False}, False)}


def median_ms(values) -> float:
    return float(np.median(values) * 1e3)


def timed(fn):
    s = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--device", default="cuda", help="cuda | cuda:N (cpu only to check the script)")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from audioldm2_trt.runtime import AudioLDM2Runtime
    from audioldm2_trt.runtime.conditioning import _stack, generate_lm_states
    from audioldm2_trt.runtime.tokenization import tokenize_prompts

    runtimes = {}
    for name, (options, background) in VARIANTS.items():
        # device_loop=True: CUDA's default; on the CPU it binds the sessions, which the device passes need
        rt = runtimes[name] = AudioLDM2Runtime.load(args.artifacts, device=args.device, device_loop=True, **options)
        if not background:
            rt._sessions["clap_text"].start = None  # this instance only: conditioning then runs CLAP, then T5
        rt.warmup()
    request = dict(negative_prompt=NEGATIVE, audio_length_in_s=10.24, seed=0)
    # the projected sequence GPT-2 starts from, as the text stage makes it
    rt = runtimes["default"]
    tokens = tokenize_prompts(rt._clap_tok, rt._t5_tok, [PROMPT], [NEGATIVE])
    clap = _stack(tokens.clap, tokens.clap_negative, rt._clap_tok.pad_token_id)
    t5 = _stack(tokens.t5, tokens.t5_negative, 0)
    s = rt._sessions
    text_embeds = s["clap_text"].run({"input_ids": clap.input_ids, "attention_mask": clap.attention_mask})
    t5_states = s["t5_encoder"].run({"input_ids": t5.input_ids, "attention_mask": t5.attention_mask})
    proj = s["projection"].run({"text_embeds": text_embeds["text_embeds"],
                                "t5_hidden_states": t5_states["last_hidden_state"],
                                "t5_attention_mask": t5.attention_mask})
    x, mask = proj["inputs_embeds"], proj["attention_mask"]
    n, positions = rt.constants["max_new_tokens"], rt.constants["lm_max_positions"]
    stage = {name: [] for name in runtimes}
    gpt2 = {name: [] for name in runtimes}
    conds = {}
    for _ in range(args.rounds):
        for name, r in runtimes.items():
            prepared, wall = timed(lambda: r.prepare(PROMPT, **request))
            stage[name].append(wall)
            conds[name] = prepared.cond
            if r._lm_loop is not None:
                _, wall = timed(lambda: r._lm_loop.generate(x, mask, n))
            else:
                _, wall = timed(lambda: generate_lm_states(r._sessions["gpt2"], x, mask, n, True, positions))
            gpt2[name].append(wall)
    ref = conds["gpt2_on_host"]
    report = {
        "artifacts": args.artifacts, "device": args.device, "rounds": args.rounds,
        "variants": {name: {"load_options": opts, "clap_in_background": bg} for name, (opts, bg) in VARIANTS.items()},
        "sequence": {"rows": int(x.shape[0]), "length": int(x.shape[1])},
        "text_stage_ms": {k: median_ms(v) for k, v in stage.items()},
        "text_stage_ms_all": {k: [round(w * 1e3, 3) for w in v] for k, v in stage.items()},
        "gpt2_passes_ms": {k: median_ms(v) for k, v in gpt2.items()},
        "same_as_gpt2_on_host": {
            k: {"generated_equal": bool(np.array_equal(c.generated, ref.generated)),
                "generated_max_abs_diff": float(np.abs(c.generated - ref.generated).max()),
                "t5_equal": bool(np.array_equal(c.t5, ref.t5)),
                "clap_equal": bool(np.array_equal(c.clap_text, ref.clap_text))} for k, c in conds.items()},
        "health": {k: {h: r.health()[h] for h in ("lm_loop", "lm_queued", "queued_steps")}
                   for k, r in runtimes.items()},
    }
    (out / "text_stage.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "text_stage_ms_all"}, indent=2))
    for r in runtimes.values():
        r._sessions["clap_text"].__dict__.pop("start", None)
        r.close()


if __name__ == "__main__":
    main()
