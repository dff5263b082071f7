"""REVERSE's resampling loop over many questions: the original's way (transformers `generate`, one
question at a time) vs jaxvlm's `reverse_answers` (the loops of `--batch-size` questions share each
engine call), same model, same questions.

The model is bench_decode's ~100M LLaVA shape (fp32). A random model writes no span tags, so every
question ends after one attempt (threshold 1); what is measured is the loop's generate calls, which is
also what each further attempt costs. Greedy (the Qwen setting T0 = 0), `--new-tokens` per attempt (no
EOS), prompts of 1 + 64 image + 40-63 text tokens. Reports questions/s per side and the ratio, and
whether both sides wrote the same tokens. Each side runs in its own process (bench/timing.py says why).

    python bench/bench_reverse.py [--questions 16] [--batch-sizes 1 8] [--new-tokens 64] [--layers 4]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import build  # noqa: E402
from timing import alternate, emit, median_ratio  # noqa: E402


class StandInTokenizer:
    """What the loop needs of a tokenizer when no tag is written: tag ids the random model does not
    produce in practice (the top of the vocabulary), an EOS, and a decode."""
    unk_token_id, eos_token_id = None, 2

    def convert_tokens_to_ids(self, t):
        return {"<SPAN>": 31996, "</CN>": 31997, "</UN>": 31998, ".": 13}[t]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)


def questions(n: int):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        ids = rng.integers(3, 31000, size=1 + 64 + int(rng.integers(40, 64)))
        ids[0], ids[1:65] = 1, 31999
        out.append((ids, rng.standard_normal((3, 112, 112)).astype(np.float32)))
    return out


def measure(args) -> None:
    import jax
    import torch

    from jaxvlm.conversion.api import llava_from_torch
    from jaxvlm.generate import Engine, Hooks, SamplerConfig
    from jaxvlm.methods import reverse

    hf = build(args)
    qs = questions(args.questions)
    tok = StandInTokenizer()
    kw = dict(threshold=1.0, temperature=0.0)
    per = {}
    if args.side == "torch":
        def hf_generate(ids, pix):
            def generate(prefix, temperature):
                with torch.no_grad():
                    o = hf.generate(input_ids=torch.tensor(prefix[None]), pixel_values=torch.tensor(pix[None]),
                                    do_sample=False, max_new_tokens=args.new_tokens, pad_token_id=0,
                                    return_dict_in_generate=True, output_logits=True)
                p_un = torch.softmax(torch.stack(o.logits, 1)[0], -1)[:, 31998].numpy()
                return o.sequences[0, len(prefix):].numpy(), p_un
            return generate
        reverse.reverse_answer(hf_generate(*qs[0]), qs[0][0], tok, **kw)        # warm-up
        t = time.perf_counter()
        answers = [reverse.reverse_answer(hf_generate(ids, pix), ids, tok, **kw).text for ids, pix in qs]
        per["1"] = dict(seconds=time.perf_counter() - t, answers=answers)
    else:
        cfg, model, params = llava_from_torch(hf)
        del hf
        params = jax.device_put(params)
        longest = max(len(i) for i, _ in qs)
        for b in args.batch_sizes:
            engine = Engine(model, batch_size=b, max_len=-(-(longest + args.new_tokens) // 64) * 64,
                            sampler=SamplerConfig(eos_token_ids=(2,)), hooks=Hooks(track_token_ids=(31998,)))

            def batch_of_rows(reqs):
                t = max(len(r.prefix) for r in reqs)
                return dict(input_ids=np.stack([np.pad(r.prefix, (t - len(r.prefix), 0)) for r in reqs]),
                            attention_mask=np.stack([np.pad(np.ones(len(r.prefix), np.int32), (t - len(r.prefix), 0))
                                                     for r in reqs]),
                            pixel_values=np.stack([qs[r.index][1] for r in reqs]))

            rows = reverse.engine_rows_generator(engine, params, tok, batch_of_rows, max_new_tokens=args.new_tokens)
            prompts = [ids for ids, _ in qs]
            dict(reverse.reverse_answers(rows, prompts[:b], tok, batch_size=b, **kw))       # compile + warm-up
            t = time.perf_counter()
            got = dict(reverse.reverse_answers(rows, prompts, tok, batch_size=b, **kw))
            per[str(b)] = dict(seconds=time.perf_counter() - t, answers=[got[i].text for i in range(len(qs))])
    emit({"seconds": per[next(iter(per))]["seconds"], "per_batch": per,
          "versions": f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
                      f"({torch.get_num_threads()} threads)"})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=1, help="rounds (one jax and one torch process each)")
    p.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)        # child process
    args = p.parse_args(argv)
    if args.side:
        return measure(args)
    common = ["--questions", str(args.questions), "--batch-sizes", *map(str, args.batch_sizes),
              "--new-tokens", str(args.new_tokens), "--layers", str(args.layers)]
    with tempfile.TemporaryDirectory():
        runs = alternate(__file__, common, ("jax", "torch"), args.rounds)
    hf_runs = [r["per_batch"]["1"] for r in runs["torch"]]
    hf_qps = statistics.median(args.questions / r["seconds"] for r in hf_runs)
    print(f"{runs['jax'][0]['versions']}; {args.questions} questions x {args.new_tokens} tokens, "
          f"{args.rounds} round(s), median")
    print(f"transformers generate, one question at a time: {hf_qps:.2f} questions/s")
    print(f"{'batch':>5} {'jax q/s':>8} {'ratio':>6} {'same answers':>12}")
    for b in args.batch_sizes:
        j = [r["per_batch"][str(b)] for r in runs["jax"]]
        ratio = median_ratio([args.questions / x["seconds"] for x in j], [args.questions / x["seconds"] for x in hf_runs])
        same = np.mean([a == h for a, h in zip(j[0]["answers"], hf_runs[0]["answers"])])
        print(f"{b:>5} {statistics.median(args.questions / x['seconds'] for x in j):>8.2f} {ratio:>6.2f} {same:>12.2f}")


if __name__ == "__main__":
    main()
