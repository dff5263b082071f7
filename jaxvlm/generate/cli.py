"""`jaxvlm generate`: answers for (image, prompt) pairs with a converted checkpoint.

A checkpoint directory is what `jaxvlm convert` writes (`jaxvlm.conversion.converted`): the config,
the params, and `hf_files/` with the tokenizer (and image-processor) files.

    jaxvlm generate --checkpoint ckpt/llava-1.5-7b --image cat.jpg --prompt "What is this?"
    jaxvlm generate --checkpoint ckpt/llava-1.5-7b --questions q.jsonl --image-folder imgs/ \
        --output answers.jsonl --batch-size 8

Batch mode reads JSONL records `{"question_id" | "id", "image", "text" | "prompt", ...}` and writes
`{"question_id" | "id", "prompt", "answer", "model_id", ...}` per record (the eval harness reads it);
other fields of the input record are carried over. Answers are written as they come, so a long run can
be continued with `--resume` (the answers already in `--output` are kept), and split over hosts with
`--shard K/N` (one process per host, each with its own `--output`; `cat` the files for `jaxvlm eval`):
question i samples from its own key whatever the shard, so the answers are the unsplit run's.

Families: LLaVA-1.5 / LLaVA-MORE (CLIP pixels), Qwen2-VL / Qwen2.5-VL (HF's Qwen2-VL image processor
from `hf_files/preprocessor_config.json`, chatml, M-RoPE positions from `qwen2_vl.rope_index`), and
Qwen-VL-Chat read from its original folder (`config.json`, weights, `qwen.tiktoken`): the original
`chat()`'s prompt (`make_context`, chatml, the image path inside `<img>...</img>`, system "You are a
helpful assistant." unless `--system`), its 448 px transform, and stops at `<|im_end|>`,
`<|im_start|>` or `<|endoftext|>`. Batched rows are positioned from their first real token, so each
decodes as `chat()` decodes it alone (the original counts left padding; SC-Tune's loop keeps that).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

DEFAULT_TEMPLATES = {"llava": "vicuna_v1", "llava_llama3": "llama3", "qwen2_vl": "chatml"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="converted jaxvlm checkpoint directory (or an original "
                   "Qwen-VL-Chat folder)")
    p.add_argument("--image", help="image path (single prompt mode)")
    p.add_argument("--prompt", help="question text (single prompt mode)")
    p.add_argument("--questions", help="JSONL of {question_id|id, image, text|prompt} (batch mode)")
    p.add_argument("--image-folder", default="", help="base folder for relative image paths in --questions")
    p.add_argument("--output", help="answers JSONL (batch mode; default: stdout)")
    p.add_argument("--template", help="chat template (default per family: vicuna_v1 for LLaVA-1.5, "
                                      "llama3 for LLaVA-MORE, chatml for Qwen2/2.5-VL)")
    p.add_argument("--system", help="override the template's system message")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--min-new-tokens", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0,
                   help="sampling seed: question i draws from its own key (jaxvlm.generate.question_keys), so a "
                        "sampled answer does not depend on --batch-size")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard", default=None, metavar="K/N|auto",
                   help="answer questions K, K+N, K+2N, ... of --questions (0 <= K < N), e.g. one shard per host; "
                        "'auto': this process's K/N from JAX_PROCESS_ID/JAX_NUM_PROCESSES (launch/gpu_slurm.sh sets "
                        "them) or SLURM_PROCID/SLURM_NTASKS, with --output gaining '.shardK-of-N' before its suffix")
    p.add_argument("--resume", action="store_true",
                   help="keep the answers already in --output (matched by question_id / id; a cut-off last line is "
                        "dropped) and append the rest, instead of starting the file anew")
    p.add_argument("--max-len", type=int, default=None,
                   help="KV-cache slots (default: longest prompt + max-new-tokens, rounded up to 128)")
    p.add_argument("--dtype", default=None, help="compute dtype, e.g. bfloat16 (default: the checkpoint's)")
    p.add_argument("--model-id", default=None, help="model_id written in the answers (default: checkpoint name)")
    p.add_argument("--ue-layers", default=None, metavar="I,J,...",
                   help="decode with UE's layer contrast against these hidden-state indices (0 = embeddings; "
                        "jaxvlm.methods.ue); greedy")
    p.add_argument("--ue-prior", default=None, metavar="W,W,...",
                   help="UE's layer prior, one weight per --ue-layers entry (e.g. its PhD prior for layers 0-7)")
    p.add_argument("--ue-relative-top", type=float, default=0.1, help="UE's plausibility filter alpha (default 0.1)")
    p.add_argument("--reverse", action="store_true",
                   help="REVERSE's retrospective resampling (jaxvlm.methods.reverse; the tokenizer needs <SPAN>, "
                        "</CN>, </UN>): --batch-size questions' loops share each engine call, at --temperature "
                        "(REVERSE: 1.0 for LLaVA, 0 for Qwen2.5-VL, whose threshold was 0.01); answers gain "
                        "'reverse_success' and 'reverse_attempts'")
    p.add_argument("--reverse-threshold", type=float, default=0.003,
                   help="P(</UN>) above which a phrase is resampled (REVERSE: 0.003 captions, 0.5 yes/no)")
    p.add_argument("--reverse-max-attempts", type=int, default=50)
    p.add_argument("--reverse-local-attempts", type=int, default=10)
    p.add_argument("--reverse-assistant-tokens", type=int, default=None,
                   help="prompt tokens the hints go before (the original's 5, ' ASSISTANT:' in LLaVA's tokenizer; "
                        "default: that header's length in this tokenizer for the vicuna_v1/llava_v1 templates, else 5)")
    p.add_argument("--judger", action="store_true",
                   help="JUDGER's perception (LLaVA; jaxvlm.methods.judger): the question's attention over the image "
                        "relative to a general description's picks a square crop, answered with the image and the "
                        "crop (the original uses --template llava_v1); answers gain 'crop_box'")
    p.add_argument("--judger-layer", type=int, default=14,
                   help="LM layer whose attention is read (JUDGER: 14, of Vicuna-7B's 32); negative counts from the "
                        "last layer (-1)")
    p.add_argument("--judger-crop-size", type=int, default=None, metavar="PX",
                   help="the crop's smallest side in image pixels; sides of 1-2x it are tried (default: the model's "
                        "input resolution, as the original's 336 for LLaVA-1.5)")
    p.add_argument("--judger-png", default=None, metavar="DIR",
                   help="also write DIR/<question id>.png: the relative attention over the image and the crop box")
    p.add_argument("--chain-of-spot", action="store_true",
                   help="Chain-of-Spot (LLaVA): ask for the question's region of interest, crop it, answer with the "
                        "image and the crop (jaxvlm.methods.chain_of_spot); answers gain 'roi' and 'roi_cropped'. A "
                        "question's own 'roi' (text such as \"[0.1, 0.2, 0.5, 0.6]\") is used instead of asking")


# ----------------------------------------------------------------------------- loading


def load_model(ckpt: str, dtype: str | None = None):
    """(cfg, model, params, tokenizer, image_processor, family) of a converted checkpoint."""
    from transformers import AutoTokenizer

    from jaxvlm.conversion.converted import load_converted
    from jaxvlm.models.llava import Llava, LlavaConfig

    if is_qwen_vl_folder(ckpt):
        return load_qwen_vl(ckpt, dtype)
    cfg, params = load_converted(ckpt)
    if dtype:
        cfg = cfg.with_dtype(dtype, cfg.text.param_dtype)
    hf_dir = pathlib.Path(ckpt) / "hf_files"
    if not (hf_dir / "tokenizer.json").is_file() and not (hf_dir / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{ckpt}: no tokenizer in {hf_dir}; convert with the tokenizer files kept "
                                f"(save_converted(..., hf_files=[...]))")
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    if isinstance(cfg, LlavaConfig):
        from jaxvlm.data.image_processing import LlavaImageProcessor
        hf_proc = None
        if (hf_dir / "preprocessor_config.json").is_file():
            from transformers import AutoImageProcessor
            hf_proc = AutoImageProcessor.from_pretrained(str(hf_dir))
        family = "llava_llama3" if cfg.text.vocab_size >= 128000 else "llava"
        return cfg, Llava(cfg), params, tok, LlavaImageProcessor.for_llava(cfg, hf_proc), family
    from jaxvlm.models.qwen2_vl import Qwen2VL, Qwen2VLConfig
    if isinstance(cfg, Qwen2VLConfig):
        from jaxvlm.data.qwen2_vl_processing import make_image_processor
        if (hf_dir / "preprocessor_config.json").is_file():
            import transformers   # the PIL processor: HF's Auto class would pick the torchvision one
            proc = transformers.Qwen2VLImageProcessorPil.from_pretrained(str(hf_dir))
        else:
            proc = make_image_processor(patch_size=cfg.vision.patch_size,
                                        temporal_patch_size=cfg.vision.temporal_patch_size,
                                        merge_size=cfg.vision.spatial_merge_size)
        return cfg, Qwen2VL(cfg), params, tok, proc, "qwen2_vl"
    raise NotImplementedError(f"`jaxvlm generate` serves LLaVA, Qwen2/2.5-VL and Qwen-VL-Chat checkpoints; got a "
                              f"{type(cfg).__name__} (decode it with jaxvlm.generate.Engine)")


def is_qwen_vl_folder(ckpt: str) -> bool:
    """An original Qwen-VL(-Chat) folder (its `config.json` has the `visual` dict; no jaxvlm conversion)."""
    d = pathlib.Path(ckpt)
    if (d / "jaxvlm_config.json").is_file() or not (d / "config.json").is_file():
        return False
    try:
        cfg = json.loads((d / "config.json").read_text())
    except json.JSONDecodeError:
        return False
    return cfg.get("model_type") == "qwen" and isinstance(cfg.get("visual"), dict)


def load_qwen_vl(ckpt: str, dtype: str | None = None):
    """Qwen-VL-Chat read straight from its original folder (weights, config.json, qwen.tiktoken)."""
    from jaxvlm.conversion import qwen_vl as conv
    from jaxvlm.data.qwen_vl_processing import preprocess_image
    from jaxvlm.data.qwen_vl_tokenizer import QwenTokenizer
    from jaxvlm.models.qwen_vl import QwenVL
    if not (pathlib.Path(ckpt) / "qwen.tiktoken").is_file():
        raise FileNotFoundError(f"{ckpt}: no qwen.tiktoken (the Qwen-VL-Chat tokenizer) in the folder")
    cfg, params = conv.load_original(ckpt)          # a progress bar: 9.6B weights take a while
    if dtype:
        cfg = cfg.with_dtype(dtype, cfg.text.param_dtype)
    tok = QwenTokenizer.from_dir(ckpt)
    return cfg, QwenVL(cfg), params, tok, functools.partial(preprocess_image, size=cfg.visual.image_size), "qwen_vl"


def question_of(rec: dict) -> str:
    """A question record's text (`text`, else `prompt`; `read_questions` checks that one is there)."""
    return rec.get("text", rec.get("prompt"))


def read_questions(path: str) -> list[dict]:
    """Question records; a missing file, a malformed line or a record without text names the line."""
    from jaxvlm.eval.io import read_jsonl
    out = []
    for n, rec in read_jsonl(path, "questions"):
        if "text" not in rec and "prompt" not in rec:
            raise ValueError(f"{path}:{n}: record has neither 'text' nor 'prompt'")
        out.append(rec)
    return out


def questions_to_answer(records: list[dict], shard: str | None, resume_from: str | None) -> list[int]:
    """Positions in `records` this run answers: those of shard "K/N" (every N-th from K), less those already
    answered in `resume_from` (an answers JSONL this command wrote; a cut-off last line, from a killed run,
    is cut from the file so appending continues it cleanly)."""
    todo = list(range(len(records)))
    if shard is not None:
        try:
            k, n = (int(x) for x in shard.split("/"))
        except ValueError:
            raise SystemExit(f"jaxvlm generate: --shard {shard!r}: expected K/N, e.g. 0/8") from None
        if not 0 <= k < n:
            raise SystemExit(f"jaxvlm generate: --shard {shard}: need 0 <= K < N")
        todo = todo[k::n]
    if resume_from is None:
        return todo
    seen: dict[str, int] = {}
    for i, r in enumerate(records):
        key = json.dumps(_question_key(r, i))
        if key in seen:
            raise SystemExit(f"jaxvlm generate: --resume matches answers to questions by question_id / id, and "
                             f"questions {seen[key]} and {i} share {key}")
        seen[key] = i
    if not os.path.exists(resume_from):
        return todo
    done, good_bytes = set(), 0
    with open(resume_from, "rb") as f:
        data = f.read()
    for line in data.splitlines(keepends=True):
        try:
            row = json.loads(line)
            if not line.endswith(b"\n") or not isinstance(row, dict):
                raise ValueError
        except ValueError:
            break             # a line cut off by a killed run: it and anything after it are redone
        key = json.dumps(row.get("question_id", row.get("id")))
        if key not in seen:
            raise SystemExit(f"jaxvlm generate: --resume: {resume_from} holds an answer to {key}, which is not among "
                             f"the questions: is it another run's file?")
        done.add(seen[key])
        good_bytes += len(line)
    if good_bytes < len(data):
        with open(resume_from, "r+b") as f:
            f.truncate(good_bytes)
    return [i for i in todo if i not in done]


def auto_shard(env: Mapping[str, str], output: str | None) -> tuple[str, str]:
    """`--shard auto`: ("K/N", the output path with '.shardK-of-N' before its suffix) for this process of a
    multi-process launch (JAX_PROCESS_ID / JAX_NUM_PROCESSES, else SLURM_PROCID / SLURM_NTASKS)."""
    for k_var, n_var in (("JAX_PROCESS_ID", "JAX_NUM_PROCESSES"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if env.get(k_var) is not None and env.get(n_var) is not None:
            k, n = int(env[k_var]), int(env[n_var])
            break
    else:
        raise SystemExit("jaxvlm generate: --shard auto cannot tell this process's shard: neither JAX_PROCESS_ID/"
                         "JAX_NUM_PROCESSES nor SLURM_PROCID/SLURM_NTASKS is set; give --shard K/N")
    if not output:
        raise SystemExit("jaxvlm generate: --shard auto needs --output (each shard writes a file of its own)")
    stem, ext = os.path.splitext(output)
    return f"{k}/{n}", f"{stem}.shard{k}-of-{n}{ext}"


def _question_key(rec: dict, index: int):
    """What an answer row is matched by: the record's question_id, else its id, else its position."""
    return rec.get("question_id", rec.get("id", index))


# ----------------------------------------------------------------------------- batching


def encode_request(cfg, tok, proc, template, prompt: str, image=None, system: str | None = None
                   ) -> tuple[np.ndarray, Any]:
    """One user turn (optionally with a PIL image first) -> (ids `[T]`, pixels) for `load_model`'s
    model: LLaVA pixels `[3, H, W]`; Qwen2/2.5-VL `(patches [N, D], grid_thw [3])` from its HF processor."""
    from jaxvlm.data.chat_templates import encode_prompt
    from jaxvlm.models.qwen2_vl import Qwen2VLConfig
    msgs = [] if system is None else [{"role": "system", "content": system}]
    msgs.append({"role": "user", "content": prompt if image is None else "<image>\n" + prompt.replace("<image>", "").strip()})
    pix, counts = None, ()
    if image is not None and isinstance(cfg, Qwen2VLConfig):
        out = proc(images=[image], return_tensors="np")
        grid = np.asarray(out["image_grid_thw"], np.int64)[0]
        pix = (np.asarray(out["pixel_values"], np.float32), grid)
        counts = (int(grid.prod()) // cfg.vision.spatial_merge_size ** 2,)
    elif image is not None:
        img = proc(image)
        pix, counts = img.pixel_values, (img.num_tokens,)
    ids = encode_prompt(template, msgs, tok, image_token_id=cfg.image_token_id, image_token_counts=counts)
    return ids, pix


def _numbers(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"jaxvlm generate: {what} must be comma-separated numbers, got {text!r}") from None


def ue_hooks_from_args(args: argparse.Namespace):
    """The engine hooks `--ue-layers`/`--ue-prior` ask for, or None."""
    if args.ue_layers is None:
        if args.ue_prior is not None:
            raise SystemExit("jaxvlm generate: --ue-prior needs --ue-layers")
        return None
    from jaxvlm.methods.ue import ue_hooks
    if args.temperature > 0:
        raise SystemExit("jaxvlm generate: UE decodes greedily (the argmax of its contrast); drop --temperature")
    layers = [int(x) for x in _numbers(args.ue_layers, "--ue-layers")]
    prior = None if args.ue_prior is None else _numbers(args.ue_prior, "--ue-prior")
    try:
        return ue_hooks(layers, prior=prior, relative_top=args.ue_relative_top)
    except ValueError as e:
        raise SystemExit(f"jaxvlm generate: {e}") from None


class Answerer:
    """Encodes (image, prompt) pairs with a chat template and decodes them in fixed-size batches."""

    def __init__(self, ckpt: str, args: argparse.Namespace):
        from jaxvlm.data.chat_templates import end_tokens, get_template
        from jaxvlm.generate import SamplerConfig

        self.cfg, self.model, self.params, self.tok, self.proc, family = load_model(ckpt, args.dtype)
        self.family = family
        self.qwen2 = family == "qwen2_vl"
        self.qwen_vl = family == "qwen_vl"
        self.system = args.system
        if self.qwen_vl:       # the original chat(): chatml via make_context, stop words im_end / im_start
            if args.template:
                raise SystemExit("jaxvlm generate: Qwen-VL-Chat prompts are its own chatml (make_context); drop --template")
            self.template = None
            eos, stops = {self.tok.eod_id, self.tok.im_end_id, self.tok.im_start_id}, []
            pad = self.tok.eod_id
        else:
            self.template = get_template(args.template or DEFAULT_TEMPLATES[family])
            # one-token end-of-turn strings stop in the compiled loop, longer ones are cut from the text
            eos, stops = end_tokens(self.template, self.tok)
            pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        self.stop_strings = tuple(stops)
        self.sampler = SamplerConfig(top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                                     repetition_penalty=args.repetition_penalty, min_new_tokens=args.min_new_tokens,
                                     eos_token_ids=tuple(sorted(eos)), pad_token_id=pad)
        self.hooks = ue_hooks_from_args(args)
        self.question_index: Sequence[int] | None = None    # the answered questions' positions in --questions
                                                            # (main() sets it for --shard / --resume; see `position`)
        n_layers = getattr(self.cfg, "text", self.cfg).num_layers
        for i in () if self.hooks is None else self.hooks.lens_layers:
            if not 0 <= i <= n_layers:
                raise SystemExit(f"jaxvlm generate: --ue-layers {i} is outside this checkpoint's hidden states "
                                 f"0..{n_layers} (0 = embeddings, i = output of layer i)")
        self.args = args
        self.engine = None

    def build_engine(self, longest_prompt: int, max_patches: int = 0, batch_size: int | None = None,
                     longest_question: int | None = None) -> None:
        """One engine (one compile) for all batches: the cache fits the longest prompt + answer
        (Qwen2-VL: and each batch's patches are padded for `max_patches` per image). longest_question:
        the longest question's own prompt (default `longest_prompt`), which a given --max-len must fit
        with --max-new-tokens, or nothing is decoded."""
        from jaxvlm.generate import Engine
        a = self.args
        self.max_patches = max_patches
        need = (longest_question or longest_prompt) + a.max_new_tokens
        if a.max_len and a.max_len < need:
            raise SystemExit(f"jaxvlm generate: --max-len {a.max_len} is too small: the longest question's prompt "
                             f"takes {need - a.max_new_tokens} tokens and --max-new-tokens {a.max_new_tokens} more "
                             f"({need}); raise --max-len or leave it out (it is then sized to fit)")
        max_len = a.max_len or -(-(longest_prompt + a.max_new_tokens) // 128) * 128
        self.engine = Engine(self.model, batch_size=batch_size or a.batch_size, max_len=max_len, sampler=self.sampler,
                             **({} if self.hooks is None else {"hooks": self.hooks}))

    def position(self, k: int) -> int:
        """This run's question k's position in --questions: its sampling key and, without an id, its id."""
        return k if self.question_index is None else self.question_index[k]

    def encode(self, prompt: str, image_path: str | None, record_id: Any = "?") -> tuple[np.ndarray, Any]:
        """-> (ids [T], pixels): LLaVA pixels `[3, H, W]`, Qwen2-VL `(patches [N, D], grid_thw [3])`.
        record_id names the question in the error for an image that is missing or cannot be decoded."""
        from jaxvlm.data.image_processing import load_image
        image = None if image_path is None else load_image(image_path, str(record_id))
        if self.qwen_vl:      # the original reads the image from the path inside <img>...</img>
            from jaxvlm.data.qwen_vl_tokenizer import DEFAULT_SYSTEM
            items = ([] if image_path is None else [{"image": image_path}]) + [{"text": prompt}]
            _, ids = self.tok.make_context(self.tok.from_list_format(items), system=self.system or DEFAULT_SYSTEM)
            return np.asarray(ids, np.int32), None if image is None else self.proc(image)
        return encode_request(self.cfg, self.tok, self.proc, self.template, prompt, image, self.system)

    def encode_messages(self, messages: list[dict], images: list) -> tuple[np.ndarray, np.ndarray | None]:
        """A whole conversation with its images in order (LLaVA) -> (ids `[T]`, pixels `[n, 3, H, W]`). An
        image is a PIL image (this checkpoint's processor pads it to a square) or an already processed
        `ProcessedImage` (e.g. a crop processed without padding)."""
        from jaxvlm.data.chat_templates import encode_prompt
        from jaxvlm.data.image_processing import ProcessedImage
        if self.qwen2 or self.qwen_vl:
            raise NotImplementedError("multi-image conversations are served for LLaVA checkpoints only")
        msgs = ([] if self.system is None else [{"role": "system", "content": self.system}]) + list(messages)
        procs = [im if isinstance(im, ProcessedImage) else self.proc(im) for im in images]
        ids = encode_prompt(self.template, msgs, self.tok, image_token_id=self.cfg.image_token_id,
                            image_token_counts=[p.num_tokens for p in procs])
        return ids, (np.stack([p.pixel_values for p in procs]) if procs else None)

    def _qwen2_vision(self, batch: dict, items) -> None:
        """Pack the batch's patches into `[batch_size * most patches of one image, D]` (zero rows
        after) and grids into `[batch_size, 3]`, so every batch has one shape (one compile), and add
        the M-RoPE positions."""
        import jax
        import jax.numpy as jnp

        from jaxvlm.models.qwen2_vl import rope_index
        imgs = [p for _, p in items if p is not None]
        if imgs:
            d = imgs[0][0].shape[1]
            n_max = self.args.batch_size * self.max_patches
            pix = np.concatenate([p for p, _ in imgs])
            grid = np.stack([g for _, g in imgs])
            batch["pixel_values"] = np.concatenate([pix, np.zeros((n_max - len(pix), d), np.float32)])
            batch["image_grid_thw"] = np.concatenate([grid, np.zeros((self.args.batch_size - len(grid), 3), np.int64)])
        if not hasattr(self, "_rope_index"):
            self._rope_index = jax.jit(rope_index, static_argnums=0)
        pos, _ = self._rope_index(self.cfg, jnp.asarray(batch["input_ids"]),
                                  None if not imgs else jnp.asarray(batch["image_grid_thw"]),
                                  attention_mask=jnp.asarray(batch["attention_mask"]))
        batch["positions"] = np.asarray(pos)

    def batch_of(self, items: list[tuple[np.ndarray, Any]]) -> dict:
        """items: (ids [T], pixels as `encode` returns them | None) -> the engine's left-padded batch (Qwen2-VL:
        with packed patches, grids and M-RoPE positions)."""
        t = max(len(i) for i, _ in items)
        ids = np.stack([np.pad(i, (t - len(i), 0), constant_values=self.sampler.pad_token_id) for i, _ in items])
        mask = np.stack([np.pad(np.ones(len(i), np.int32), (t - len(i), 0)) for i, _ in items])
        pix = [p for _, p in items if p is not None]
        batch = dict(input_ids=ids, attention_mask=mask)
        if self.qwen2:
            self._qwen2_vision(batch, items)
        elif pix:    # one image `[3, H, W]` or several `[n, 3, H, W]` per item, in order
            batch["pixel_values"] = np.concatenate([p[None] if p.ndim == 3 else p for p in pix])
        return batch

    def answer(self, items: list[tuple[np.ndarray, Any]], seed: int, indices: Sequence[int],
               turn: int = 0) -> list[str]:
        """items: (ids [T], pixels as `encode` returns them | None) of the records `indices` -> decoded answers.
        Each record samples from its own key (`question_keys(seed, i, turn)`, i its position in --questions:
        `question_index`), so a sampled answer depends neither on the batch size nor on --shard / --resume."""
        from jaxvlm.generate import question_keys
        batch = self.batch_of(items)
        keys = question_keys(seed, [self.position(i) for i in indices], turn)
        out = self.engine.generate(self.params, batch, max_new_tokens=self.args.max_new_tokens,
                                   temperature=self.args.temperature, row_keys=keys,
                                   stop_strings=self.stop_strings, tokenizer=self.tok)
        return [self._clean(s) for s in out.texts]

    def _clean(self, text: str) -> str:
        for s in self.stop_strings:
            text = text.split(s)[0]
        return text.strip()


def _batches(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    single = args.prompt is not None
    if single == (args.questions is not None):
        raise SystemExit("jaxvlm generate: give either --prompt (with --image) or --questions JSONL")
    if single:
        records = [{"id": "0", "image": args.image, "text": args.prompt}]
        folder = ""
    else:
        records = read_questions(args.questions)
        folder = args.image_folder
    model_id = args.model_id or pathlib.Path(args.checkpoint).name
    todo = list(range(len(records)))      # positions in --questions of the questions this run answers
    if args.shard == "auto":
        args.shard, args.output = auto_shard(os.environ, args.output)
    if args.shard is not None or args.resume:
        if single:
            raise SystemExit("jaxvlm generate: --shard and --resume apply to --questions runs")
        todo = questions_to_answer(records, args.shard, args.output if args.resume else None)
        if not todo:
            print("jaxvlm generate: nothing left to answer" + (f" in {args.output}" if args.resume else ""),
                  file=sys.stderr)
            return 0
        records = [records[i] for i in todo]

    def image_of(rec):
        im = rec.get("image")
        return None if not im else os.path.join(folder, im)

    if args.reverse + args.chain_of_spot + args.judger > 1:
        raise SystemExit("jaxvlm generate: --reverse, --chain-of-spot and --judger are separate methods; pick one")
    answerer = Answerer(args.checkpoint, args)
    answerer.question_index = todo
    if answerer.qwen_vl and (args.reverse or args.chain_of_spot or args.judger):
        raise SystemExit("jaxvlm generate: --reverse, --chain-of-spot and --judger are not served for Qwen-VL-Chat "
                         "(their originals run LLaVA or Qwen2.5-VL)")
    if args.reverse:
        answers = reverse_answers(answerer, records, image_of, single)
    else:
        if args.judger:
            answer_chunk = judger_answers(answerer, records, image_of, single)
        elif args.chain_of_spot:
            answer_chunk = chain_of_spot_answers(answerer, records, image_of, single)
        else:
            encoded = [answerer.encode(question_of(r), image_of(r), _question_key(r, answerer.position(k)))
                       for k, r in enumerate(tqdm(records, desc="encode", unit="q", disable=single, file=sys.stderr))]
            answerer.build_engine(max(len(i) for i, _ in encoded),
                                  max([len(p[0]) for _, p in encoded if answerer.qwen2 and p is not None] or [0]))

            def answer_chunk(indices, seed):
                return [{"answer": a} for a in answerer.answer([encoded[i] for i in indices], seed, indices)]
        answers = ((i, got) for chunk in _batches(list(range(len(records))), args.batch_size)
                   for i, got in zip(chunk, answer_chunk(chunk, args.seed)))

    out_f = open(args.output, "a" if args.resume else "w") if (args.output and not single) else None
    try:
        bar = tqdm(total=len(records), desc="generate", unit="q", disable=single, file=sys.stderr)
        for i, got in _in_order(answers, bar):
            rec = records[i]
            if single:
                print(got["answer"])
                continue
            row = {k: v for k, v in rec.items() if k not in ("text", "prompt")}
            row["question_id" if "question_id" in rec else "id"] = _question_key(rec, todo[i])
            row.update(prompt=question_of(rec), **got, model_id=model_id)
            line = json.dumps(row)
            if out_f:
                out_f.write(line + "\n")
                out_f.flush()          # what is written survives a killed run (--resume continues it)
            else:
                print(line)
        bar.close()
    finally:
        if out_f:
            out_f.close()
    return 0


def _in_order(answers: Iterable[tuple[int, dict]], bar) -> Iterable[tuple[int, dict]]:
    """(index, answer) pairs as questions finish (REVERSE's loops finish out of order) -> in index order; the
    progress bar moves as each one finishes, not when it is released."""
    ready, nxt = {}, 0
    for i, got in answers:
        bar.update(1)
        ready[i] = got
        while nxt in ready:
            yield nxt, ready.pop(nxt)
            nxt += 1


def chain_of_spot_answers(answerer: Answerer, records: list[dict], image_of, quiet: bool):
    """Chain-of-Spot's two turns for every record (jaxvlm.methods.chain_of_spot): returns
    answer_chunk(indices, seed) -> [{answer, roi, roi_cropped}]. A record's own "roi" (the ROI answer's text:
    an oracle's, another model's) stands for the model's turn-1 answer, which is then not asked. One engine serves both
    turns: its cache fits twice the longest turn-1 prompt (turn 2 repeats it with a second image and the
    question) plus the ROI and the answer."""
    from tqdm import tqdm

    from jaxvlm.methods import chain_of_spot as cos
    if answerer.qwen2:
        raise SystemExit("jaxvlm generate: --chain-of-spot is a LLaVA-1.5 method; this is a Qwen2-VL checkpoint")
    given = [rec.get("roi") for rec in records]
    for n, roi in enumerate(given):
        if roi is not None and not isinstance(roi, str):
            raise SystemExit(f"jaxvlm generate: --chain-of-spot: question {records[n].get('question_id', n)}'s 'roi' "
                             f"must be the ROI answer's text, e.g. \"[0.1, 0.2, 0.5, 0.6]\"; got {roi!r}")
    images = _images_of(records, image_of, "--chain-of-spot")
    questions = [question_of(rec) for rec in records]
    turn1 = [answerer.encode_messages(cos.roi_messages(q), [im])
             for q, im in tqdm(list(zip(questions, images)), desc="encode", unit="q", disable=quiet, file=sys.stderr)]
    answerer.build_engine(2 * max(len(i) for i, _ in turn1) + answerer.args.max_new_tokens)

    def answer_chunk(indices, seed):
        ask = [i for i in indices if given[i] is None]       # a question's own ROI skips turn 1
        asked = dict(zip(ask, answerer.answer([turn1[i] for i in ask], seed, ask) if ask else []))
        rois = [asked[i] if given[i] is None else given[i] for i in indices]
        turn2, cropped = [], []
        for i, roi in zip(indices, rois):
            crop, ok = cos.crop_to_roi(images[i], roi, answerer.proc.fill)
            turn2.append(answerer.encode_messages(cos.answer_messages(questions[i], roi), [images[i], crop]))
            cropped.append(ok)
        answers = answerer.answer(turn2, seed, indices, turn=1)
        return [{"answer": a, "roi": r, "roi_cropped": c} for a, r, c in zip(answers, rois, cropped)]

    return answer_chunk


def reverse_answers(answerer: Answerer, records: list[dict], image_of, quiet: bool):
    """REVERSE for every record (jaxvlm.methods.reverse.reverse_answers over the engine, P(</UN>) tracked):
    `--batch-size` questions' resampling loops share each engine call, a finished question's row going to
    the next one. Yields (index, {answer, reverse_success, reverse_attempts}) in the records' order. Each
    question samples from keys of its own (--seed, its index, the attempt), so its answer does not depend
    on the batch size. The cache fits the longest prompt, the hints (128 tokens) and three answers' worth
    of kept and new text; a question whose kept text outgrows it stops there (success false)."""
    from tqdm import tqdm

    from jaxvlm.generate import Hooks
    from jaxvlm.methods import reverse
    a = answerer.args
    if answerer.hooks is not None:
        raise SystemExit("jaxvlm generate: --reverse does not combine with --ue-layers")
    try:
        un = reverse.tag_ids(answerer.tok)[2]
    except ValueError as e:
        raise SystemExit(f"jaxvlm generate: --reverse: {e}") from None
    encoded = [answerer.encode(question_of(r), image_of(r), _question_key(r, answerer.position(k)))
               for k, r in enumerate(tqdm(records, desc="encode", unit="q", disable=quiet, file=sys.stderr))]
    answerer.hooks = Hooks(track_token_ids=(un,))
    longest = max(len(i) for i, _ in encoded)
    answerer.build_engine(longest + 128 + 2 * a.max_new_tokens,
                          max([len(p[0]) for _, p in encoded if answerer.qwen2 and p is not None] or [0]),
                          longest_question=longest)
    style = {"qwen2_vl": "qwen", "llava_llama3": "llama3"}.get(answerer.family, "llava")
    n_header = a.reverse_assistant_tokens
    if n_header is None:
        n_header = assistant_header_tokens(answerer, encoded[0][0])
    rows = reverse.engine_rows_generator(
        answerer.engine, answerer.params, answerer.tok,
        lambda reqs: answerer.batch_of([(r.prefix, encoded[r.index][1]) for r in reqs]),
        max_new_tokens=a.max_new_tokens, seed=a.seed,
        key_index=[answerer.position(k) for k in range(len(records))])
    results = reverse.reverse_answers(rows, [ids for ids, _ in encoded], answerer.tok,
                                      batch_size=answerer.engine.batch_size, threshold=a.reverse_threshold,
                                      temperature=a.temperature, max_attempts=a.reverse_max_attempts,
                                      local_attempts=a.reverse_local_attempts,
                                      assistant_tokens=n_header, style=style)
    for i, res in results:
        yield i, {"answer": res.text, "reverse_success": res.success, "reverse_attempts": len(res.history)}


def assistant_header_tokens(answerer: Answerer, prompt_ids: np.ndarray) -> int:
    """How many tokens REVERSE's hints go before: the original's 5 is ' ASSISTANT:' in LLaVA's tokenizer, so for
    the templates ending in that header it is the header's length in this tokenizer (2 in the shapes BPE); for
    the others (Llama-3, chatml) the original's 5."""
    template = answerer.template
    if template is None or template.assistant_header != "ASSISTANT:":
        return 5
    for k in range(1, min(len(prompt_ids), 16) + 1):
        if answerer.tok.decode([int(i) for i in prompt_ids[-k:]]).strip() == "ASSISTANT:":
            return k
    return 5


def _images_of(records: list[dict], image_of, method: str) -> list:
    from jaxvlm.data.image_processing import load_image
    images = []
    for n, rec in enumerate(records):
        path = image_of(rec)
        if path is None:
            raise SystemExit(f"jaxvlm generate: {method} needs an image for every question; record {n} "
                             f"({rec.get('question_id', rec.get('id', '?'))}) has none")
        images.append(load_image(path, str(rec.get("question_id", rec.get("id", n)))))
    return images


def judger_answers(answerer: Answerer, records: list[dict], image_of, quiet: bool):
    """JUDGER for every record (jaxvlm.methods.judger): the relative attention map of the question against
    the general-description prompt, the adaptive crop box, then the answer over [image, crop]. Returns
    answer_chunk(indices, seed) -> [{answer, crop_box}]."""
    from tqdm import tqdm

    from jaxvlm.data.image_processing import LlavaImageProcessor
    from jaxvlm.methods import judger
    if answerer.qwen2:
        raise SystemExit("jaxvlm generate: --judger is a LLaVA-1.5 method; this is a Qwen2-VL checkpoint")
    cfg, tok = answerer.cfg, answerer.tok
    try:
        layer = judger.layer_index(answerer.args.judger_layer, cfg.text.num_layers)
    except ValueError as e:
        raise SystemExit(f"jaxvlm generate: --judger-layer {e}") from None
    crop_proc = LlavaImageProcessor(answerer.proc.hf, image_size=cfg.vision.image_size,
                                    tokens_per_image=cfg.tokens_per_image, aspect="crop")   # crops are not padded
    images = _images_of(records, image_of, "--judger")
    crop_size = answerer.args.judger_crop_size
    crop_size = cfg.vision.image_size if crop_size is None else crop_size
    if crop_size <= 0:
        raise SystemExit(f"jaxvlm generate: --judger-crop-size must be a positive number of pixels, got {crop_size}")
    general = judger.raw_prompt_ids(tok, judger.GENERAL_PROMPT, cfg.image_token_id, cfg.tokens_per_image)
    encoded, boxes = [], []
    for rec, image in tqdm(list(zip(records, images)), desc="attention", unit="q", disable=quiet, file=sys.stderr):
        q = question_of(rec)
        full = answerer.proc(image)
        a_rel, box = judger.question_crop(answerer.model, answerer.params, tok, q, full.pixel_values[None], image.size,
                                          layer=layer, bbox_size=crop_size, general_ids=general)
        if answerer.args.judger_png:
            from jaxvlm.viz import save_attention_overlay
            name = str(rec.get("question_id", rec.get("id", len(boxes)))).replace("/", "_")
            save_attention_overlay(np.asarray(image), a_rel.reshape(-1), a_rel.shape,
                                   os.path.join(answerer.args.judger_png, f"{name}.png"),
                                   title="question / general-description attention", box=box)
        crop = image.crop(box)
        encoded.append(answerer.encode_messages(judger.answer_messages(q), [full, crop_proc(crop)]))
        boxes.append([float(v) for v in box])
    answerer.build_engine(max(len(i) for i, _ in encoded))

    def answer_chunk(indices, seed):
        answers = answerer.answer([encoded[i] for i in indices], seed, indices)
        return [{"answer": a, "crop_box": boxes[i]} for a, i in zip(answers, indices)]

    return answer_chunk
