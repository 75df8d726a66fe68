"""`gpt2 generate [PROMPT]`: continue a prompt, streaming the text as it is sampled."""

from __future__ import annotations

import argparse
import itertools
import sys

NAME = "generate"
HELP = "continue a prompt with GPT-2, streaming the text as it is produced"
# Past the context only with --sliding-window, whose history buffer holds every token;
# samples are rows of one batch (a KV cache each)
MAX_NEW_TOKENS = 10_000_000
MAX_SAMPLES = 4096

EPILOG = """\
The prompt is printed, then the continuation as tokens arrive. A sample ends at
<|endoftext|>, at a --stop string (neither is printed), or after --max-new-tokens.
An empty prompt starts from <|endoftext|>, like OpenAI's unconditional samples.
The speed ("N tokens, X tokens/s") goes to stderr, so stdout holds only text.
--json prints {"prompt_ids", "samples": [{"ids", "text"}], "tokens_per_s"}, where
"prompt_ids" are the tokens the samples continue (an empty prompt's: <|endoftext|>),
"ids" every token the sample generated, including the one that ended it, and
"text" the continuation cut before the stop string.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gpt2.commands._common import add_model_arguments

    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("prompt", nargs="?", default="", metavar="PROMPT",
                        help="text to continue ('-' reads stdin; default: none, i.e. "
                        "start from <|endoftext|>)")
    add_model_arguments(parser)
    parser.add_argument("--max-new-tokens", "-n", type=int, default=50, metavar="N",
                        help="tokens to generate per sample (default: %(default)s)")
    parser.add_argument("--temperature", "-t", type=float, default=1.0, metavar="T",
                        help="sampling temperature; 0 is greedy (default: %(default)s)")
    parser.add_argument("--top-k", type=int, metavar="K",
                        help="sample from the K most likely tokens only")
    parser.add_argument("--top-p", type=float, metavar="P",
                        help="sample from the smallest set of tokens whose probability "
                        "reaches P (nucleus sampling), 0 < P <= 1")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                        help="CTRL-style penalty on tokens already present; > 1 discourages "
                        "repeats (default: %(default)s)")
    parser.add_argument("--stop", action="append", default=[], metavar="STR",
                        help="end a sample before this string (repeatable; in bash, "
                        "$'\\n\\n' is a blank line, while \"\\n\\n\" is backslash-n twice)")
    parser.add_argument("--seed", type=int, metavar="S",
                        help="random seed: the same seed and options give the same text")
    parser.add_argument("--num-samples", type=int, default=1, metavar="N",
                        help="samples to generate, in one batch (default: %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object instead of streaming text")
    parser.add_argument("--sliding-window", action="store_true",
                        help="when prompt + new tokens exceed the context, drop the oldest "
                        "tokens instead of stopping with an error")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="decode with a static KV cache and one CUDA graph per token "
                        "(needs --device cuda; no --repetition-penalty, --sliding-window or "
                        "--stop; a --seed reproduces this path's own samples)")
    parser.add_argument("--compile", action="store_true",
                        help="with --cuda-graph: fuse the step with torch.compile first "
                        "(~20-30 s once per batch size and length; ~40%% more tokens/s at "
                        "batch 1 on an H100 or H200, so worth it for long or many "
                        "generations)")
    parser.add_argument("--interactive", "-i", action="store_true",
                        help="read prompts from stdin, one per line, until EOF or an "
                        "empty line")


def run(args: argparse.Namespace) -> int:
    import torch

    from gpt2.commands._common import load_model, read_text_arg
    from gpt2.errors import GPT2Error
    from gpt2.generate import SamplingOptions, check_seed

    # Check the options before loading a model that may take seconds to read.
    SamplingOptions(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    if args.seed is not None:
        check_seed(args.seed)
    if not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS:
        raise GPT2Error(f"--max-new-tokens must be from 1 to {MAX_NEW_TOKENS:,}, got "
                        f"{args.max_new_tokens}")
    if not 1 <= args.num_samples <= MAX_SAMPLES:
        raise GPT2Error(f"--num-samples must be from 1 to {MAX_SAMPLES:,} (they run as one "
                        f"batch; run the command again for more), got {args.num_samples}")
    if any(s == "" for s in args.stop):
        raise GPT2Error("--stop: a stop string must not be empty")
    if args.compile and not args.cuda_graph:
        raise GPT2Error("--compile applies to --cuda-graph decoding; add --cuda-graph")
    prompt = None if args.interactive and args.prompt == "" else read_text_arg(args.prompt,
                                                                               "prompt")
    model, tokenizer = load_model(args)
    weight = model.wte.weight
    if weight.device.type == "cpu" and weight.dtype == torch.float32:
        from gpt2 import cpu_kernels

        cpu_kernels.fp32_op()  # a first build happens now, not inside the timed decode
    if prompt is not None:
        _sample(model, tokenizer, prompt, args)
    if args.interactive:
        return 1 if _interactive(model, tokenizer, args) else 0
    return 0


def _interactive(model, tokenizer, args: argparse.Namespace) -> bool:
    """Answer each line of stdin until an empty one. A line that fails (too long, not
    UTF-8) is reported on stderr and the session goes on; True if any failed."""
    from gpt2._io import decode_utf8
    from gpt2.errors import GPT2Error

    failed = False
    for number in itertools.count(1):
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        try:
            line = decode_utf8(sys.stdin.buffer.readline(), f"stdin line {number}")
        except GPT2Error as e:
            print(f"gpt2 generate: error: {e}", file=sys.stderr, flush=True)
            failed = True
            continue
        if not line or not line.strip():
            return failed
        try:
            _sample(model, tokenizer, line.rstrip("\r\n"), args)
        except GPT2Error as e:
            print(f"gpt2 generate: error: stdin line {number}: {e}", file=sys.stderr,
                  flush=True)
            failed = True


def _sample(model, tokenizer, prompt: str, args: argparse.Namespace) -> None:
    """Generate --num-samples continuations of one prompt and print them."""
    import json
    import time

    import torch

    from gpt2.commands._common import check_ids_fit
    from gpt2.errors import GPT2Error
    from gpt2.generate import TextStream, sampling_vocab, stream

    prompt_ids = tokenizer.encode(prompt)
    check_ids_fit(prompt_ids, model, "the prompt")
    eot = _eot(tokenizer, model)
    if not prompt_ids and eot is None:
        raise GPT2Error("an empty prompt starts from <|endoftext|>, which this model's "
                        f"{model.config.n_vocab}-token vocabulary does not have; give a prompt")
    start_ids = prompt_ids or [eot]  # an empty prompt starts a new document
    stop_tokens = [] if eot is None else [eot]
    n = args.num_samples
    idx = torch.tensor([start_ids] * n, dtype=torch.long, device=model.wte.weight.device)
    vocab_size = sampling_vocab(model, tokenizer)  # no id the tokenizer cannot decode
    if args.cuda_graph:
        steps = _graph_decoder(model, n, len(start_ids), args).stream(
            idx, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, seed=args.seed, vocab_size=vocab_size,
        )
    else:
        steps = stream(  # validates (e.g. the context length) before anything is printed
            model, idx, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
            stop_tokens=stop_tokens, seed=args.seed, sliding_window=args.sliding_window,
            vocab_size=vocab_size,
        )
    texts = [TextStream(tokenizer, stop_strings=args.stop, stop_tokens=stop_tokens)
             for _ in range(n)]
    live = n == 1 and not args.json
    out = sys.stdout
    if live:
        out.write(prompt)
        out.flush()

    started = time.perf_counter()
    produced = 0
    try:
        for token in steps:
            for text, t in zip(texts, token.tolist(), strict=True):
                if text.done:
                    continue
                produced += 1
                piece = text.push(t)
                if live and piece:
                    out.write(piece)
                    out.flush()
            if all(text.done for text in texts):
                break
    finally:
        steps.close()
    elapsed = time.perf_counter() - started
    for text in texts:
        rest = text.finish()
        if live and rest:
            out.write(rest)
    rate = produced / elapsed if elapsed > 0 else 0.0

    if args.json:
        samples = [{"ids": text.ids, "text": text.text} for text in texts]
        out.write(json.dumps({"prompt_ids": start_ids, "samples": samples,
                              "tokens_per_s": round(rate, 3)}, ensure_ascii=False) + "\n")
    elif live:
        out.write("\n")
    else:
        for i, text in enumerate(texts, 1):
            out.write(f"{'=' * 20} sample {i} of {n} {'=' * 20}\n{prompt}{text.text}\n")
    out.flush()
    print(f"{produced} tokens, {rate:.1f} tokens/s", file=sys.stderr)


_DECODERS: dict = {}  # (batch, max_len) -> CudaGraphDecoder, reused across -i prompts


def _graph_decoder(model, batch: int, prompt_len: int, args: argparse.Namespace):
    """A CUDA-graph decoder sized for this prompt (max_len rounded up to limit recaptures)."""
    from gpt2.errors import GPT2Error
    from gpt2.fast_decode import CudaGraphDecoder

    if args.repetition_penalty != 1.0 or args.sliding_window or args.stop:
        raise GPT2Error("--cuda-graph does not support --repetition-penalty, "
                        "--sliding-window or --stop; drop one of them")
    n_ctx = model.config.n_ctx
    max_len = min(n_ctx, -(-(prompt_len + args.max_new_tokens) // 128) * 128)
    key = (batch, max_len)
    if key not in _DECODERS:
        _DECODERS[key] = CudaGraphDecoder(model, batch_size=batch, max_len=max_len, dtype=None,
                                          compile=args.compile)
    return _DECODERS[key]


def _eot(tokenizer, model) -> int | None:
    """<|endoftext|>'s id, or None for a vocabulary (or model) without it."""
    from gpt2.errors import GPT2Error

    try:
        eot = tokenizer.eot_token
    except GPT2Error:
        return None
    return eot if eot < model.config.n_vocab else None
