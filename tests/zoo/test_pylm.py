"""nnsqueeze.zoo.pycorpus / pylm: the corpus, its split, the tokenizer, training and the cache.

Only the ``tiny`` size is trained here (seconds); nothing is written outside tmp directories."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (optional extra)")
pytest.importorskip("tokenizers", reason="tokenizers is not installed (optional extra)")

from nnsqueeze.zoo import pycorpus, pylm  # noqa: E402


def test_corpus_is_deterministic_non_empty_and_split_by_name():
    a = pycorpus.documents.__wrapped__("tiny")          # bypass the lru_cache: build it twice
    b = pycorpus.documents.__wrapped__("tiny")
    assert a == b and len(a) > 20
    c = pycorpus.load_corpus("default")
    train, val = ({d.name for d in c[k]} for k in ("train", "validation"))
    assert len(train) > 200 and len(val) > 20 and not train & val
    assert all(pycorpus.split_of(n) == "validation" for n in val)
    assert sum(len(d.text) for d in c["train"]) > 1_000_000     # ~1.5 MB of English/Python text
    assert any(n.startswith("topic:") for n in train) and any(n.startswith("module:") for n in train)
    names = [d.name for d in pycorpus.documents("default")]
    assert names == sorted(names) and len(names) == len(set(names))
    assert all(d.text.strip() for d in pycorpus.documents("default"))
    # the split is a function of the name alone (crc32 % 10), so it does not move when documents change
    assert pycorpus.split_of("module:json") == pycorpus.split_of("module:json")
    with pytest.raises(ValueError, match="size"):
        pycorpus.documents("huge")


def test_tokenizer_round_trip_and_vocab():
    tok = pylm.load_tokenizer("tiny")
    assert len(tok) == pylm.TOKENIZER["tiny"]["vocab_size"]
    for text in ["def f(x):\n    return x ** 2  # square\n", "Übergrößenträger — naïve café ☃ 日本",
                 "  leading spaces\tand\ttabs\r\n", pycorpus.load_corpus("tiny")["validation"][0].text]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids(pylm.EOS) == 0 == tok.eos_token_id


def test_token_stream_windows_and_calibration_are_fixed():
    val = pylm.token_stream("validation", "tiny")
    assert val.dtype == torch.long and val.dim() == 1 and int(val.max()) < 512
    w = pylm.eval_windows("tiny", seq_len=32)
    assert w.shape == (val.numel() // 32, 32) and torch.equal(w.reshape(-1), val[: w.numel()])
    c1, c2 = pylm.calibration(10, 16, "tiny", batch_size=4), pylm.calibration(10, 16, "tiny", batch_size=4)
    assert [b.shape for b in c1] == [(4, 16), (4, 16), (2, 16)]
    assert all(torch.equal(x, y) for x, y in zip(c1, c2))
    train = pylm.token_stream("train", "tiny")
    row = c1[0][0]  # every calibration window is a slice of the train stream
    assert any(torch.equal(train[i:i + 16], row) for i in range(train.numel() - 16))


def test_tiny_model_trains_and_loss_decreases():
    model = pylm.build_model("llama", "tiny", vocab_size=512)
    assert 50_000 < sum(p.numel() for p in model.parameters()) < 500_000
    losses: list[float] = []
    stats = pylm.train(model, pylm.token_stream("train", "tiny"), {**pylm.TRAIN["tiny"], "steps": 30}, losses=losses)
    assert len(losses) == 30 and stats["steps_per_s"] > 0
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 6.0 and last < first - 0.5          # from ~ln(512) = 6.24 down


def test_default_configs_are_in_the_size_range():
    for arch in pylm.ARCHS:
        with torch.device("meta"):
            n = sum(p.numel() for p in pylm.build_model(arch, "default").parameters())
        assert 10e6 <= n <= 30e6, (arch, n)


def test_pretrained_cache_reload_and_deterministic_training(tmp_path, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    cache = tmp_path / "cache"
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    m1 = pylm.pretrained("llama", "tiny", cache_dir=cache)
    m2 = pylm.pretrained("llama", "tiny", cache_dir=cache)            # from the cache
    with torch.no_grad():
        l1, l2 = m1(ids).logits, m2(ids).logits
    assert torch.equal(l1, l2)
    meta = pylm.info("llama", "tiny", cache_dir=cache)
    assert meta["steps_per_s"] > 0 and 1 < meta["validation_ppl"] < 512 and meta["params"] == sum(
        p.numel() for p in m1.parameters())
    d = pylm.model_dir("llama", "tiny", cache)
    assert {p.name for p in d.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json", "pylm.json"}
    assert not list(d.glob("*.bin")) and not list(d.glob("*.pt"))      # no pickle
    m3 = pylm.pretrained("llama", "tiny", cache_dir=cache, force=True)  # retrain: same seeds, same weights
    with torch.no_grad():
        assert torch.allclose(m3(ids).logits, l1, atol=1e-5)
    # nothing outside the cache; no temporary directories left inside it
    assert not os.listdir(home) and not os.listdir(work)
    entries = sorted(p.name for p in (cache / "pylm").iterdir())
    assert [e for e in entries if not e.endswith(".lock")] == sorted([d.name, pylm._tokenizer_key("tiny")])
    json.loads((d / "pylm.json").read_text())


def test_a_crash_while_building_leaves_no_half_cache(tmp_path):
    def boom(tmp):
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        pylm.publish(tmp_path, "llama-tiny-x", boom)
    assert list(tmp_path.iterdir()) == []
    assert not pylm._complete(tmp_path / "llama-tiny-x")


def test_bad_arguments():
    with pytest.raises(ValueError, match="arch"):
        pylm.pretrained("opt", "tiny")
    with pytest.raises(ValueError, match="size"):
        pylm.load_tokenizer("small")
    with pytest.raises(ValueError, match="split"):
        pylm.token_stream("test", "tiny")


@pytest.mark.parametrize("mod", [pycorpus, pylm], ids=["pycorpus", "pylm"])
def test_docstring_examples(mod):
    import doctest

    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
