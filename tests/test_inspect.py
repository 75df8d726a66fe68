"""Looking inside GPT-2: cached activations, hooks, logit lens, ablation, plots, `gpt2 inspect`.

Oracles, none of them our own output:
  * Hugging Face `GPT2LMHeadModel` on the same random weights (eager attention):
    its attention probabilities, hidden states, logits and loss, and its loss
    after zeroing a head's rows of c_proj (HF's Conv1D is (in, out), so a head's
    slice of c_proj's input is rows h*hs:(h+1)*hs);
  * formulas recomputed here from other cached tensors (softmax(q k^T / sqrt(hs)));
  * Hugging Face's tokenizer (tokenizers/Rust) for the ids and pieces;
  * the PNG format itself (signature and IHDR chunk).
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gpt2.config import GPT2Config
from gpt2.errors import GPT2Error
from gpt2.inspect import (
    ablate_heads,
    attention_patterns,
    check_layer_head,
    logit_lens,
    next_tokens,
    render_report,
    report_data,
    token_label,
)
from gpt2.inspect.plots import (
    plot_ablation,
    plot_attention,
    plot_logit_lens,
    png_bytes,
)
from gpt2.model import GPT2

TEXT = "The quick brown fox jumps over the lazy dog because it wanted to."


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(hf_checkpoint):
    """(our model, HF model, ids): 2 layers x 4 heads, width 64, vocabulary 128."""
    ckpt = hf_checkpoint(n_layer=2, n_embd=64, n_head=4, n_vocab=128, n_ctx=32, std=0.4)
    ids = torch.tensor([[5, 17, 99, 3, 64, 64, 2, 127, 0, 45, 8, 13]])
    return GPT2.from_pretrained(ckpt.folder), ckpt.model, ids


@pytest.fixture(scope="module")
def vocab_ckpt(hf_checkpoint, gpt2_vocab_dir):
    """An HF folder with GPT-2's real vocabulary files and a tiny random network."""
    ckpt = hf_checkpoint(n_layer=2, n_embd=32, n_head=4, n_vocab=50257, n_ctx=48, seed=3, std=0.4)
    shutil.copy(gpt2_vocab_dir / "encoder.json", ckpt.folder / "vocab.json")
    shutil.copy(gpt2_vocab_dir / "vocab.bpe", ckpt.folder / "merges.txt")
    return ckpt


@pytest.fixture(scope="module")
def hf_tokenizer(vocab_ckpt):
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(vocab_ckpt.folder)


def hf_run(hf, ids, **kwargs):
    with torch.no_grad():
        return hf(ids, output_attentions=True, output_hidden_states=True, **kwargs)


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


# -- cached activations -----------------------------------------------------------------------


def test_cached_pattern_is_softmax_of_cached_q_k_and_matches_transformers(tiny):
    model, hf, ids = tiny
    L, hs = model.config.n_layer, model.config.head_size
    names = [f"blocks.{i}.attn.{x}" for i in range(L) for x in ("q", "k", "pattern")]
    _, cache = model.run_with_cache(ids, names=names)
    T = ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    hf_out = hf_run(hf, ids)
    for i in range(L):
        q, k = cache[f"blocks.{i}.attn.q"], cache[f"blocks.{i}.attn.k"]  # (1, nh, T, hs)
        scores = q @ k.transpose(-2, -1) / math.sqrt(hs) + torch.where(causal, 0.0, -math.inf)
        pattern = cache[f"blocks.{i}.attn.pattern"]  # (1, nh, T, T)
        # (fp32 products summed in another order by another thread split: a few ulps)
        torch.testing.assert_close(pattern, scores.softmax(-1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pattern, hf_out.attentions[i], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(pattern.sum(-1), torch.ones(1, model.config.n_head, T))
        assert (pattern[..., ~causal] == 0).all(), "a position attends to the future"


def test_residual_stream_identities_and_transformers_hidden_states(tiny):
    model, hf, ids = tiny
    logits, cache = model.run_with_cache(ids)  # every activation
    hf_out = hf_run(hf, ids)
    torch.testing.assert_close(cache["blocks.0.resid_pre"], cache["embed"] + cache["pos_embed"])
    for i in range(model.config.n_layer):
        b = f"blocks.{i}"
        torch.testing.assert_close(
            cache[f"{b}.resid_mid"], cache[f"{b}.resid_pre"] + cache[f"{b}.attn.out"])
        torch.testing.assert_close(
            cache[f"{b}.resid_post"], cache[f"{b}.resid_mid"] + cache[f"{b}.mlp.out"])
        # HF's hidden_states[i] is the stream entering block i
        torch.testing.assert_close(cache[f"{b}.resid_pre"], hf_out.hidden_states[i],
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cache[f"{b}.mlp.post"],
                                   F.gelu(cache[f"{b}.mlp.pre"], approximate="tanh"))
    last = cache[f"blocks.{model.config.n_layer - 1}.resid_post"]
    ln_f = hf.transformer.ln_f
    torch.testing.assert_close(
        cache["ln_final"], F.layer_norm(last, (last.size(-1),), ln_f.weight, ln_f.bias, 1e-5))
    torch.testing.assert_close(cache["ln_final"], hf_out.hidden_states[-1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits, hf_out.logits, atol=1e-4, rtol=1e-4)


def test_run_with_cache_keeps_only_what_was_asked_and_gives_the_forward_logits(tiny):
    model, _, ids = tiny
    with torch.no_grad():
        plain = model(ids)
    names = ["blocks.1.attn.z", "ln_final"]
    logits, cache = model.run_with_cache(ids, names=names)
    assert sorted(cache) == sorted(names)
    assert cache["blocks.1.attn.z"].shape == (1, 4, ids.size(1), 16)
    torch.testing.assert_close(logits, plain, atol=1e-6, rtol=1e-6)
    assert model.run_with_cache(ids, names=[])[1] == {}
    assert len(model.run_with_cache(ids)[1]) == len(model.activation_names())


# -- hooks --------------------------------------------------------------------------------------


def hf_loss(hf, ids) -> float:
    with torch.no_grad():
        return float(hf(ids, labels=ids).loss)


def hf_without_head(hf, layer: int, head: int, hs: int):
    """A copy of the HF model whose c_proj ignores one head's slice of its input."""
    ablated = copy.deepcopy(hf)
    with torch.no_grad():
        ablated.transformer.h[layer].attn.c_proj.weight[head * hs:(head + 1) * hs, :] = 0.0
    return ablated


def test_ablation_equals_zeroing_c_proj_input_slice_in_transformers(tiny):
    model, hf, ids = tiny
    hs = model.config.head_size
    ablation = ablate_heads(model, ids[0])
    assert ablation.base_loss == pytest.approx(hf_loss(hf, ids), abs=1e-5)
    for layer in range(model.config.n_layer):
        for head in range(model.config.n_head):
            expected = hf_loss(hf_without_head(hf, layer, head, hs), ids)
            assert float(ablation.losses[layer, head]) == pytest.approx(expected, abs=1e-5)
    assert float(ablation.deltas.abs().max()) > 1e-3, "no head mattered: the test cannot fail"


def test_hook_zeroing_a_head_equals_zeroing_c_proj_columns_on_a_copy(tiny):
    model, _, ids = tiny
    hs = model.config.head_size
    copy_model = copy.deepcopy(model)
    with torch.no_grad():
        copy_model.h[1].attn.c_proj.weight[:, 2 * hs:3 * hs] = 0.0  # nn.Linear is (out, in)
        expected = copy_model(ids)

    def zero_head_2(z):  # (B, nh, T, hs)
        z = z.clone()
        z[:, 2] = 0.0
        return z

    with torch.no_grad(), model.hooks({"blocks.1.attn.z": zero_head_2}):
        hooked = model(ids)
    torch.testing.assert_close(hooked, expected, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(model(ids), expected), "the hook stayed on"


def test_hooks_are_removed_after_an_exception(tiny):
    model, _, ids = tiny
    with torch.no_grad():
        before = model(ids)

    def ruin(x):
        return torch.zeros_like(x)

    with pytest.raises(RuntimeError, match="boom"), model.hooks({"blocks.0.resid_mid": ruin}):
        raise RuntimeError("boom")

    def explode(x):
        raise ValueError("inside the forward pass")

    with pytest.raises(ValueError), model.hooks({"blocks.1.mlp.post": explode}):
        model(ids)
    with pytest.raises(ValueError), model.hooks({"ln_final": explode}):
        model.run_with_cache(ids, names=["blocks.0.attn.pattern"])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, atol=0, rtol=0)
    assert model.run_with_cache(ids, names=["embed"])[1].keys() == {"embed"}


def test_wrong_activation_names_and_shapes_are_gpt2_errors(tiny):
    model, _, ids = tiny
    with pytest.raises(GPT2Error, match="no activation named 'blocks.7.attn.z'"), \
            model.hooks({"blocks.7.attn.z": lambda z: None}):
        pass
    with pytest.raises(GPT2Error, match="no activation named 'attn.pattern'"):
        model.run_with_cache(ids, names=["attn.pattern"])
    with pytest.raises(GPT2Error, match="returned shape"), \
            model.hooks({"blocks.0.attn.z": lambda z: z[:, :1]}):
        model(ids)


# -- logit lens and next tokens -----------------------------------------------------------------


def test_logit_lens_matches_transformers_at_every_depth(tiny):
    model, hf, ids = tiny
    lens = logit_lens(model, ids[0])
    out = hf_run(hf, ids)
    L = model.config.n_layer
    assert lens.names == ["embed"] + [f"block {i}" for i in range(L)]
    # the last row is the model's own output
    probs = out.logits[0].softmax(-1)  # (T, V)
    assert lens.top_ids[-1].tolist() == probs.argmax(-1).tolist()
    torch.testing.assert_close(lens.top_probs[-1], probs.max(-1).values, atol=1e-5, rtol=1e-4)
    # earlier rows: HF's hidden states through HF's own ln_f and LM head
    for d in range(L):
        h = out.hidden_states[d][0]  # the stream entering block d = leaving block d - 1
        p = hf.lm_head(hf.transformer.ln_f(h)).softmax(-1)
        assert lens.top_ids[d].tolist() == p.argmax(-1).tolist()
        torch.testing.assert_close(lens.top_probs[d], p.max(-1).values, atol=1e-5, rtol=1e-4)
    targets = ids[0, 1:]
    torch.testing.assert_close(lens.target_probs[-1], probs[:-1].gather(1, targets[:, None])[:, 0],
                               atol=1e-6, rtol=1e-4)


def test_next_tokens_match_transformers(tiny):
    model, hf, ids = tiny
    got = next_tokens(model, ids[0], top=5)
    p = hf_run(hf, ids).logits[0, -1].softmax(-1)
    values, indices = p.topk(5)
    assert [g.id for g in got] == indices.tolist()
    assert [g.prob for g in got] == pytest.approx(values.tolist(), abs=1e-6)
    with pytest.raises(GPT2Error):
        next_tokens(model, ids[0], top=0)


def test_attention_patterns_api_checks_layers(tiny):
    model, hf, ids = tiny
    p = attention_patterns(model, ids[0], layers=[1])
    torch.testing.assert_close(p[0], hf_run(hf, ids).attentions[1][0], atol=1e-5, rtol=1e-4)
    with pytest.raises(GPT2Error, match="layer 2 does not exist"):
        attention_patterns(model, ids[0], layers=[2])


# -- plots -----------------------------------------------------------------------------------------


def test_figures_are_pngs_of_the_requested_size(tiny):
    model, _, ids = tiny
    labels = [f"t{i}$" for i in range(ids.size(1))]  # "$" must not start TeX
    patterns = attention_patterns(model, ids[0])
    lens = logit_lens(model, ids[0])
    tops = [[str(i) for i in row] for row in lens.top_ids.tolist()]
    figures = {
        "head": plot_attention(patterns, labels, layer=1, head=3, figsize=(6, 5), dpi=80),
        "layer": plot_attention(patterns, labels, layer=0, figsize=(7, 6), dpi=100),
        "all": plot_attention(patterns, labels, figsize=(5, 4), dpi=120),
        "lens": plot_logit_lens(lens, labels, tops, figsize=(9, 3), dpi=100),
        "ablate": plot_ablation(ablate_heads(model, ids[0]), figsize=(4, 3), dpi=150),
    }
    expected = {"head": (480, 400), "layer": (700, 600), "all": (600, 480),
                "lens": (900, 300), "ablate": (600, 450)}
    for name, fig in figures.items():
        assert png_size(png_bytes(fig)) == expected[name], name


def test_token_labels_make_whitespace_and_broken_bytes_visible():
    assert token_label(b" a\n\tb") == "␣a↵⇥b"
    assert token_label("é".encode()[:1]) == "\\xc3"


# -- the command line ----------------------------------------------------------------------------


def test_cli_tokens_agree_with_transformers_tokenizer(run_cli, vocab_ckpt, hf_tokenizer):
    r = run_cli("inspect", "tokens", TEXT, "--model", vocab_ckpt.folder, "--json")
    assert r.code == 0, r.err
    rows = json.loads(r.out)
    assert [row["id"] for row in rows] == hf_tokenizer.encode(TEXT)
    expected = [t.replace("Ġ", "␣") for t in hf_tokenizer.convert_ids_to_tokens(
        hf_tokenizer.encode(TEXT))]
    assert [row["token"] for row in rows] == expected
    table = run_cli("inspect", "tokens", "hello world", "--model", vocab_ckpt.folder)
    assert table.code == 0 and "31373" in table.out and "␣world" in table.out


def test_cli_tokens_json_with_merges_traces_each_word(run_cli, vocab_ckpt, hf_tokenizer):
    text = "Machine learning isn't magic"
    r = run_cli("inspect", "tokens", text, "--model", vocab_ckpt.folder, "--json", "--merges")
    assert r.code == 0, r.err
    data = json.loads(r.out)
    ids = hf_tokenizer.encode(text)
    assert [row["id"] for row in data["tokens"]] == ids
    assert [i for w in data["words"] for i in w["ids"]] == ids
    assert "".join(w["text"] for w in data["words"]) == text
    # each word ends in transformers' tokens, and every merge is the rank its line in
    # merges.txt gives (line 0 is the "#version" header)
    assert [p for w in data["words"] for p in w["pieces"]] == \
        hf_tokenizer.convert_ids_to_tokens(ids)
    lines = (vocab_ckpt.folder / "merges.txt").read_text("utf-8").splitlines()[1:]
    rank = {tuple(line.split()): k for k, line in enumerate(lines)}
    steps = [s for w in data["words"] for s in w["steps"]]
    assert steps and all(rank[s["left"], s["right"]] == s["rank"] for s in steps)
    assert all(w["steps"][-1]["pieces"] == w["pieces"] for w in data["words"] if w["steps"])


def test_cli_next_and_logit_lens_json_match_transformers(run_cli, vocab_ckpt, hf_tokenizer):
    ids = torch.tensor([hf_tokenizer.encode(TEXT)])
    out = hf_run(vocab_ckpt.model, ids)
    r = run_cli("inspect", "next", TEXT, "-m", vocab_ckpt.folder, "--top", "3", "--json")
    assert r.code == 0, r.err
    p = out.logits[0, -1].softmax(-1)
    assert [row["id"] for row in json.loads(r.out)] == p.topk(3).indices.tolist()
    assert [row["prob"] for row in json.loads(r.out)] == pytest.approx(
        p.topk(3).values.tolist(), abs=1e-6)
    r = run_cli("inspect", "logit-lens", TEXT, "-m", vocab_ckpt.folder, "--json")
    assert r.code == 0, r.err
    lens = json.loads(r.out)
    assert lens["layers"] == ["embed", "block 0", "block 1"]
    assert lens["top_ids"][-1] == out.logits[0].argmax(-1).tolist()
    checked = 0
    for i, label in zip(lens["top_ids"][-1], lens["top_tokens"][-1], strict=True):
        text = hf_tokenizer.decode([i])
        if "\ufffd" not in text:  # part of a character: we show \xNN, HF shows U+FFFD
            assert label == text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")
            checked += 1
    assert checked >= 5


def test_cli_writes_every_picture_as_a_valid_png(run_cli, vocab_ckpt, tmp_path):
    m = vocab_ckpt.folder
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    runs = {
        "all.png": ("attention", TEXT),
        "layer.png": ("attention", TEXT, "--layer", "1"),
        "head.png": ("attention", TEXT, "--layer", "1", "--head", "3"),
        "lens.png": ("logit-lens", TEXT),
        "ablate.png": ("ablate", tmp_path / "text.txt"),
    }
    for name, args in runs.items():
        r = run_cli("inspect", *args, "-m", m, "--out", tmp_path / name)
        assert r.code == 0, (name, r.err)
        data = (tmp_path / name).read_bytes()
        width, height = png_size(data)
        import matplotlib.image

        pixels = matplotlib.image.imread(tmp_path / name)  # decodes every chunk
        assert pixels.shape[:2] == (height, width) and width >= 300 and height >= 250, name


def test_cli_ablate_json_matches_transformers_loss(run_cli, vocab_ckpt, hf_tokenizer, tmp_path):
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    r = run_cli("inspect", "ablate", tmp_path / "text.txt", "-m", vocab_ckpt.folder, "--json")
    assert r.code == 0, r.err
    got = json.loads(r.out)
    ids = torch.tensor([hf_tokenizer.encode(TEXT)])
    assert got["base_loss"] == pytest.approx(hf_loss(vocab_ckpt.model, ids), abs=1e-4)
    hs = vocab_ckpt.config.head_size
    expected = hf_loss(hf_without_head(vocab_ckpt.model, 1, 2, hs), ids)
    assert got["losses"][1][2] == pytest.approx(expected, abs=1e-4)
    # one forward pass a head: the command says how far it has got (the last line here)
    n = vocab_ckpt.config.n_layer * vocab_ckpt.config.n_head
    assert r.err.strip().splitlines()[-1] == f"ablate: {n}/{n} heads"


def test_report_holds_the_models_numbers_and_escapes_the_text(vocab_ckpt, hf_tokenizer):
    from gpt2.tokenizer import Tokenizer

    model = GPT2.from_pretrained(vocab_ckpt.folder)
    text = 'a </script><!-- "quoted" & {{TITLE}} /*REPORT_DATA*/ end'
    page = render_report(report_data(model, Tokenizer.from_pretrained(vocab_ckpt.folder), text))
    assert page.count("</script>") == 2 and "<!--" not in page.split("<body>")[1]
    blob = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page,
                     re.S).group(1)
    data = json.loads(blob)
    assert data["text"] == text
    ids = hf_tokenizer.encode(text)
    assert [t["id"] for t in data["tokens"]] == ids
    attentions = hf_run(vocab_ckpt.model, torch.tensor([ids])).attentions
    import base64

    raw = torch.frombuffer(bytearray(base64.b64decode(data["attention"]["bytes"])),
                           dtype=torch.uint8)
    T = len(ids)
    stored = raw.view(2, 4, T, T).float() / 255
    expected = torch.stack([a[0] for a in attentions])  # (L, nh, T, T)
    assert (stored - expected).abs().max() <= 0.5 / 255 + 1e-6


@pytest.mark.parametrize(
    "args, message",
    [
        (("attention", TEXT, "--layer", "2", "--out", "{tmp}/a.png"), "layer 2 does not exist"),
        (("attention", TEXT, "--layer", "0", "--head", "4", "--out", "{tmp}/a.png"),
         "head 4 does not exist"),
        (("attention", TEXT, "--head", "0", "--out", "{tmp}/a.png"), "--head needs --layer"),
        (("attention", "word " * 60, "--out", "{tmp}/a.png"), "context is 48"),
        (("attention", TEXT, "--out", "{tmp}/missing/a.png"), "does not exist"),
        (("attention", TEXT, "--out", "{tmp}/one.txt/a.png"), "one.txt is a file, not a folder"),
        (("attention", TEXT, "--out", "{tmp}"), "must end in .png"),
        (("report", TEXT, "--out", "{tmp}/sub.html"), "is a folder"),
        (("logit-lens", "", "--out", "{tmp}/a.png"), "empty"),
        (("next", ""), "empty"),
        (("ablate", "{tmp}/one.txt"), "at least 2"),
        (("ablate", "{tmp}/nothing.txt"), "file not found"),
        (("next", TEXT, "--top", "0"), "--top must be >= 1, got 0"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_1(run_cli, vocab_ckpt, tmp_path, args, message):
    (tmp_path / "sub.html").mkdir()
    (tmp_path / "one.txt").write_text("Hello", encoding="utf-8")
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [str(a).replace("{tmp}", str(tmp_path)) for a in args]
    r = run_cli("inspect", *args, "--model", vocab_ckpt.folder)
    assert r.code == 1, r.out + r.err
    assert message in r.err and r.err.count("\n") == 1 and "Traceback" not in r.err, r.err
    assert r.err.startswith(f"gpt2 inspect {args[0]}: error: ")  # names the subcommand
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a file was left behind"


def test_cli_nan_logits_are_one_line_errors_not_nan_tables(run_cli, vocab_ckpt, tmp_path):
    """A damaged model (NaN in a bias here; fp16 overflow does the same) printed "nan%"
    tables, JSON with NaN (not JSON) and a blank report, with exit 0."""
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(vocab_ckpt.folder, bad)
    state = load_file(bad / "model.safetensors")
    state["transformer.h.0.attn.c_attn.bias"][0] = float("nan")
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "t.txt").write_text(TEXT)
    for args in (["next", TEXT, "--json"], ["logit-lens", TEXT],
                 ["attention", TEXT, "--out", tmp_path / "a.png"],
                 ["ablate", tmp_path / "t.txt"], ["report", TEXT, "--out", tmp_path / "r.html"]):
        r = run_cli("inspect", *args, "--model", bad)
        assert r.code == 1 and "are NaN or infinite" in r.err, (args, r.err)
        assert r.err.count("\n") == 1 and r.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "t.txt"]  # nothing written


def test_cli_text_for_a_model_without_its_vocabulary(run_cli, hf_checkpoint):
    r = run_cli("inspect", "next", TEXT, "--model", hf_checkpoint().folder)  # 128 tokens
    assert r.code == 1 and "has no vocabulary files of its own" in r.err, r.err


def test_report_says_why_there_is_no_ablation(vocab_ckpt):
    from gpt2.inspect.report import report_data
    from gpt2.tokenizer import Tokenizer

    model, tok = GPT2.from_pretrained(vocab_ckpt.folder), Tokenizer.from_pretrained()
    assert report_data(model, tok, TEXT, ablate=False)["ablation_skipped"] == "off"
    assert report_data(model, tok, "Hello", ablate=True)["ablation_skipped"] == "one token"
    assert report_data(model, tok, "Hello there", ablate=True)["ablation_skipped"] is None
    page = (Path(__file__).parents[1] / "src/gpt2/inspect/report.html").read_text()
    assert "left out with --no-ablation" in page


def test_cli_report_writes_one_html_file(run_cli, vocab_ckpt, tmp_path):
    out = tmp_path / "r.html"
    r = run_cli("inspect", "report", TEXT, "-m", vocab_ckpt.folder, "--out", out)
    assert r.code == 0, r.err
    page = out.read_text(encoding="utf-8")
    # self-contained: nothing is fetched from anywhere
    assert not re.search(r'\b(src|href)\s*=\s*["\']?(https?:|//)', page)
    assert "<link" not in page and "@import" not in page
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]


def test_report_page_is_package_data():
    import importlib.resources

    page = importlib.resources.files("gpt2.inspect") / "report.html"
    assert page.is_file()
    text = Path(str(page)).read_text(encoding="utf-8")
    assert "/*REPORT_DATA*/" in text and "{{TITLE}}" in text


# -- bad input to the Python API -------------------------------------------------------------


def small(**kw) -> GPT2:
    torch.manual_seed(0)
    return GPT2(GPT2Config(n_layer=1, n_embd=8, n_head=2, n_vocab=16, n_ctx=8, **kw))


INSPECTORS = {
    "attention": lambda m, ids: attention_patterns(m, ids),
    "next": lambda m, ids: next_tokens(m, ids, top=3),
    "lens": lambda m, ids: logit_lens(m, ids),
    "ablate": lambda m, ids: ablate_heads(m, ids),
}


def _numbers(result):
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, list):  # next_tokens' predictions
        return [torch.tensor([[p.id, p.prob] for p in result])]
    return [v for v in vars(result).values() if isinstance(v, torch.Tensor)] + \
        [torch.tensor(getattr(result, "base_loss", 0.0))]


@pytest.mark.parametrize("name", INSPECTORS)
def test_a_model_in_train_mode_is_inspected_without_dropout(name):
    model = small(dropout=0.5).train()
    first = _numbers(INSPECTORS[name](model, [1, 2, 3, 4]))
    assert model.training  # the mode it was in comes back
    again = _numbers(INSPECTORS[name](model, [1, 2, 3, 4]))
    expected = _numbers(INSPECTORS[name](copy.deepcopy(model).eval(), [1, 2, 3, 4]))
    for a, b, c in zip(first, again, expected, strict=True):
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(b, c)


@pytest.mark.parametrize("name", INSPECTORS)
@pytest.mark.parametrize("ids, message", [
    ("1 2 3", "ids must be a list of integer token ids or an integer tensor, got str"),
    (None, "ids must be a list of integer token ids or an integer tensor, got NoneType"),
    ([1.7, 2], "ids must be a list of integer token ids, found 1.7"),
    ([True, 2], "ids must be a list of integer token ids, found True"),
    (torch.tensor([1.0, 2.0]), "ids must be integers, got a tensor of dtype torch.float32"),
    (torch.tensor([True, False]), "ids must be integers, got a tensor of dtype torch.bool"),
    ([1, 16], "token ids must be in [0, 16) for this model, found 1..16"),
    ([-1, 2], "token ids must be in [0, 16) for this model, found -1..2"),
    (list(range(9)), "the text is 9 tokens but this model's context is 8"),
    ([], "expected the ids of one text (a non-empty list)"),
])
def test_bad_ids_are_gpt2_errors(name, ids, message):
    with pytest.raises(GPT2Error, match=re.escape(message)):
        INSPECTORS[name](small(), ids)


def test_integer_ids_of_any_form_are_read():
    model = small()
    expected = next_tokens(model, [1, 2, 3])
    for ids in ([1, 2, 3], (1, 2, 3), torch.tensor([1, 2, 3], dtype=torch.int32),
                torch.tensor([1, 2, 3]).numpy()):
        assert next_tokens(model, ids) == expected


@pytest.mark.parametrize("batch_size", [-1, 0, "2", 1.5, True])
def test_ablation_batch_size_must_be_a_positive_integer(batch_size):
    with pytest.raises(GPT2Error, match="batch_size must be an integer >= 1"):
        ablate_heads(small(), [1, 2, 3, 4], batch_size=batch_size)


def test_ablation_in_batches_of_one_equals_one_batch():
    model = small()
    calls = []
    one = ablate_heads(model, [1, 2, 3, 4], batch_size=1,
                       progress=lambda done, total: calls.append((done, total)))
    torch.testing.assert_close(one.losses, ablate_heads(model, [1, 2, 3, 4]).losses)
    n = model.config.n_layer * model.config.n_head
    assert calls == [(done, n) for done in range(1, n + 1)]  # after every head
    with pytest.raises(GPT2Error, match="progress must be a function"):
        ablate_heads(model, [1, 2, 3], progress="yes")


@pytest.mark.parametrize("top", [0, "3", None, 2.5, True])
def test_next_tokens_top_must_be_a_positive_integer(top):
    with pytest.raises(GPT2Error, match="top must be an integer >= 1"):
        next_tokens(small(), [1, 2, 3], top=top)


@pytest.mark.parametrize("layers, message", [
    ([], "layers must be a non-empty list"),
    (1, "layers must be a non-empty list"),
    ("0", "layers must be a non-empty list"),
    ([0.0], "layer 0.0 does not exist: this model has layers 0..0"),
    ([False], "layer False does not exist"),
    ([-1], "layer -1 does not exist"),
])
def test_attention_layers_must_be_a_list_of_layer_numbers(layers, message):
    with pytest.raises(GPT2Error, match=re.escape(message)):
        attention_patterns(small(), [1, 2, 3], layers=layers)


@pytest.mark.parametrize("where", [{"layer": 0.5}, {"layer": False}, {"head": 0.0},
                                   {"head": True}, {"head": 2}, {"layer": -1}])
def test_check_layer_head_wants_integers_in_range(where):
    with pytest.raises(GPT2Error, match="does not exist"):
        check_layer_head(small().config, **where)


def test_logit_lens_of_an_int8_model_reads_through_its_own_head():
    from gpt2.quantize import quantize_model

    torch.manual_seed(0)
    model = quantize_model(GPT2(GPT2Config(n_layer=1, n_embd=64, n_head=4, n_vocab=96)), "int8")
    ids = [1, 2, 3, 4, 5]
    lens = logit_lens(model, ids)
    with torch.no_grad():
        probs = F.softmax(model(torch.tensor([ids]))[0].float(), dim=-1)  # (T, V)
    p, i = probs.max(dim=-1)
    assert torch.equal(lens.top_ids[-1], i)  # the last depth is the model's own output
    torch.testing.assert_close(lens.top_probs[-1], p)
    assert lens.top_ids.shape == (2, len(ids))


@pytest.fixture(scope="module")
def patterns():
    return torch.softmax(torch.randn(2, 3, 4, 4), -1)  # (L, H, T, T)


@pytest.mark.parametrize("kwargs, message", [
    ({"layer": 5}, "layer 5 does not exist: the patterns have layers 0..1"),
    ({"layer": -1}, "layer -1 does not exist"),
    ({"layer": 1.0}, "layer 1.0 does not exist"),
    ({"layer": 0, "head": 7}, "head 7 does not exist: the patterns have heads 0..2"),
    ({"layer": 0, "head": -1}, "head -1 does not exist"),
    ({"head": 0}, "--head needs --layer too"),
])
def test_plot_attention_checks_layer_and_head(patterns, kwargs, message):
    with pytest.raises(GPT2Error, match=re.escape(message)):
        plot_attention(patterns, list("abcd"), **kwargs)


@pytest.mark.parametrize("bad, labels, message", [
    (torch.zeros(3, 4, 4), list("abcd"), "patterns must be a tensor of shape "
                                         "(n_layer, n_head, T, T), got (3, 4, 4)"),
    (torch.zeros(2, 3, 4, 5), list("abcd"), "got (2, 3, 4, 5)"),
    ([[[[1.0]]]], ["a"], "patterns must be a tensor of shape (n_layer, n_head, T, T), got list"),
    (None, list("abcd"), "got NoneType"),
    (torch.zeros(2, 3, 4, 4), list("abc"), "labels must hold one entry per token (4), got 3"),
    (torch.zeros(2, 3, 4, 4), "abcd", "labels must hold one entry per token (4), got 4"),
])
def test_plot_attention_checks_patterns_and_labels(bad, labels, message):
    with pytest.raises(GPT2Error, match=re.escape(message)):
        plot_attention(bad, labels, layer=0)


def test_bf16_patterns_and_lenses_are_drawn(patterns):
    labels = list("abcd")
    for kw in ({}, {"layer": 1}, {"layer": 1, "head": 2}):
        assert png_bytes(plot_attention(patterns.bfloat16(), labels, **kw))[:4] == b"\x89PNG"
    lens = logit_lens(small(), [1, 2, 3, 4])
    lens16 = copy.copy(lens)
    object.__setattr__(lens16, "top_probs", lens.top_probs.bfloat16())
    tops = [["x"] * 4 for _ in lens.names]
    assert png_bytes(plot_logit_lens(lens16, labels, tops))[:4] == b"\x89PNG"


@pytest.mark.parametrize("inputs, tops, message", [
    (list("abc"), [["x"] * 4] * 2, "input_labels must hold one entry per token (4), got 3"),
    (list("abcd"), [["x"] * 4], "top_labels must hold one entry per depth (2), got 1"),
    (list("abcd"), [["x"] * 4, ["x"] * 3], "each row of top_labels must hold one entry per "
                                           "token (4), got 3"),
])
def test_plot_logit_lens_checks_its_labels(inputs, tops, message):
    lens = logit_lens(small(), [1, 2, 3, 4])
    with pytest.raises(GPT2Error, match=re.escape(message)):
        plot_logit_lens(lens, inputs, tops)


@pytest.mark.parametrize("read_only, why", [(True, "a read-only file system"),
                                            (False, "permission denied")])
def test_an_unwritable_out_folder_says_why(tmp_path, monkeypatch, read_only, why):
    """(Tests run as root here, where os.access always allows: its answer is set.)"""
    import os
    import types

    from gpt2.commands.inspect import _check_out

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    flag = os.ST_RDONLY if read_only else 0
    monkeypatch.setattr(os, "statvfs", lambda path: types.SimpleNamespace(f_flag=flag))
    with pytest.raises(GPT2Error, match=f"cannot write in {tmp_path} \\({why}\\)$"):
        _check_out(str(tmp_path / "r.html"), (".html",))


def test_token_labels_show_invisible_characters_as_escapes():
    """Tokens of GPT-2's vocabulary that print as nothing or as a plain blank: a
    zero-width space (9525), a no-break space (1849), a soft hyphen (3907), a
    left-to-right mark (24398), a lone combining fatha (24333)."""
    from gpt2.inspect import token_labels
    from gpt2.tokenizer import Tokenizer

    labels = token_labels(Tokenizer.from_pretrained(), [9525, 1849, 3907, 24398, 24333])
    assert labels == ["\\u200b", "\\u00a0", "\\u00ad", "␣\\u200e", "\\u064e"]
    assert token_label("café 日本".encode()) == "café␣日本"  # what shows stays as it is
    assert token_label("e\u0301".encode()) == "e\u0301"  # a mark on a letter shows


def test_ablation_that_overflows_is_a_one_line_error(tmp_path):
    """Two identical heads that c_proj subtracts, times 1e38: the model is finite, but
    with either head zeroed the residual overflows. ablate gave NaN losses (not JSON,
    and a blank report); now an error names the head."""
    from gpt2.inspect import ablate_heads

    model = GPT2(GPT2Config(n_layer=1, n_embd=4, n_head=2, n_vocab=16, n_ctx=8)).eval()
    with torch.no_grad():
        w = model.h[0].attn.c_attn.weight  # (3C, C): q, k, v rows, head h at 2h:2h+2
        for part in range(3):
            w[part * 4 + 2: part * 4 + 4] = w[part * 4: part * 4 + 2]  # head 1 = head 0
        model.h[0].attn.c_attn.bias.zero_()
        proj = torch.zeros(4, 4)
        for j in range(4):
            proj[j, j % 2], proj[j, 2 + j % 2] = 1e38, -1e38
        model.h[0].attn.c_proj.weight.copy_(proj)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]]))).all()
    with pytest.raises(GPT2Error, match="with head 0 of layer 0 zeroed, the loss is nan"):
        ablate_heads(model, [1, 2, 3, 4])


def test_report_of_text_with_control_characters_and_a_lone_surrogate(tiny, tmp_path):
    """The page stays valid UTF-8 HTML: no raw control characters, noncharacters or
    surrogates in the title or the data (a lone surrogate raised UnicodeEncodeError);
    the data still holds the text exactly."""
    import unicodedata

    from gpt2.inspect.report import write_report
    from gpt2.tokenizer import Tokenizer

    model = GPT2(GPT2Config(n_layer=1, n_embd=8, n_head=2, n_vocab=50257, n_ctx=64)).eval()
    text = "a\x01b\x7fc\x85d\x00e\ufdd0 \x0c\u202e end \ud800 x"
    data = write_report(model, Tokenizer.from_pretrained(), text, tmp_path / "r.html",
                        ablate=False)
    page = (tmp_path / "r.html").read_bytes().decode("utf-8")  # strict: valid UTF-8
    odd = {c for c in page if unicodedata.category(c)[0] == "C" and c not in "\n\t\r"}
    assert odd == set()
    blob = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page,
                     re.S).group(1)
    assert json.loads(blob)["text"] == text == data["text"]


def test_cli_output_is_utf8_whatever_the_locale(tmp_path):
    """With an ASCII stdout (LANG=C pipes, PYTHONIOENCODING=ascii) the tables' ␣ and the
    text's characters raised UnicodeEncodeError with a traceback; output is UTF-8."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONIOENCODING": "ascii", "GPT2_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "gpt2", "inspect", "tokens", "a é"],
                       capture_output=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr.decode("utf-8", "replace")
    assert r.stdout.decode("utf-8").splitlines()[-1].split() == ["1", "38251", "␣é"]


def test_inspect_tokens_takes_only_the_model_option(capsys):
    """tokens reads a vocabulary: --device, --dtype, --quantize were accepted and
    ignored."""
    from gpt2.cli import main

    for extra in (["--device", "bogus"], ["--quantize", "int8"], ["--dtype", "fp16"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["inspect", "tokens", "a b", *extra])
        assert exit_info.value.code == 2
        assert f"unrecognized arguments: {' '.join(extra)}" in capsys.readouterr().err


def test_logit_lens_table_keeps_long_input_labels_whole(run_cli, vocab_ckpt):
    word = "_" * 32
    r = run_cli("inspect", "logit-lens", f"Hello {word} x", "--model", vocab_ckpt.folder)
    assert r.code == 0, r.err
    assert word in r.out.splitlines()[0]  # (it was cut to the guesses' width)
