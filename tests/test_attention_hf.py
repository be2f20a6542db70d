"""transformers integration: attn_implementation="block_sparse" on tiny GPT-2, Llama (GQA) and BERT from configs."""

import copy

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, BertConfig, GPT2Config, LlamaConfig

from dist_sparse.attention import AttentionConfig
from dist_sparse.attention import hf as bs_hf

VOCAB, SEQ, BLOCK = 97, 48, 16
DENSE = {"implementation": "block_sparse", "block_size": BLOCK, "layout": [{"type": "dense"}]}


def _gpt2():
    return GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=VOCAB, n_positions=128, bos_token_id=0,
                      eos_token_id=0)


def _llama():
    return LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                       intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=128, bos_token_id=0,
                       eos_token_id=0, pad_token_id=0)


def _pair(config, section, auto=AutoModelForCausalLM):
    """The same weights loaded with sdpa and with the implementation `prepare` returns for `section`."""
    torch.manual_seed(0)
    ref = auto.from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    cfg = copy.deepcopy(config)
    impl = bs_hf.prepare(cfg, AttentionConfig.from_dict(section))
    model = auto.from_config(cfg, attn_implementation=impl).eval()
    model.load_state_dict(ref.state_dict())
    return ref, model


def _ids(batch=2, seq=SEQ, seed=1):
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("make", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_decoder_all_ones_layout_matches_sdpa(make):
    ref, model = _pair(make(), DENSE)
    assert model.config._attn_implementation == "block_sparse"
    ids = _ids()
    pad = torch.ones_like(ids)
    pad[1, 35:] = 0  # right padding in the second sequence
    with torch.no_grad():
        assert (model(ids).logits - ref(ids).logits).abs().max().item() <= 1e-5
        got = model(ids, attention_mask=pad).logits
        want = ref(ids, attention_mask=pad).logits
    assert (got[0] - want[0]).abs().max().item() <= 1e-5
    assert (got[1, :35] - want[1, :35]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("make", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_decoder_sparse_layout_equals_sdpa_with_the_same_token_mask(make):
    # Block-diagonal layout (window 0): each block sees only itself, causally. sdpa given the equivalent explicit 4-D
    # mask must agree, and plain causal sdpa must not (the layout really restricts attention).
    section = {"implementation": "block_sparse", "block_size": BLOCK, "layout": [{"type": "local", "window": 0}]}
    ref, model = _pair(make(), section)
    ids = _ids()
    blocks = torch.arange(SEQ) // BLOCK
    allowed = (blocks[:, None] == blocks[None, :]) & torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    with torch.no_grad():
        got = model(ids).logits
        want = ref(ids, attention_mask=allowed.expand(2, 1, SEQ, SEQ)).logits
        causal = ref(ids).logits
    assert (got - want).abs().max().item() <= 1e-5
    assert (got[:, BLOCK:] - causal[:, BLOCK:]).abs().max().item() > 1e-3
    assert (got[:, :BLOCK] - causal[:, :BLOCK]).abs().max().item() <= 1e-5  # block 0 sees the same keys either way


def test_bert_encoder_with_padding_matches_sdpa():
    config = BertConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128,
                        vocab_size=VOCAB, max_position_embeddings=128)
    ref, model = _pair(config, DENSE, auto=AutoModel)
    ids = _ids()
    pad = torch.ones_like(ids)
    pad[0, 20:] = 0
    with torch.no_grad():
        got = model(ids, attention_mask=pad).last_hidden_state
        want = ref(ids, attention_mask=pad).last_hidden_state
        unpadded = model(ids).last_hidden_state
    assert (got[0, :20] - want[0, :20]).abs().max().item() <= 1e-5
    assert (got[1] - want[1]).abs().max().item() <= 1e-5
    # The padding mask reached the kernel: without it the first sequence's real tokens change.
    assert (unpadded[0, :20] - got[0, :20]).abs().max().item() > 1e-3


def test_cached_decoding_matches_full_forward_with_sparse_layout():
    section = {"implementation": "block_sparse", "block_size": BLOCK,
               "layout": [{"type": "local", "window": 0}, {"type": "global", "blocks": [0]}]}
    _, model = _pair(_llama(), section)
    ids = _ids(batch=1, seq=40)
    with torch.no_grad():
        full = model(ids).logits[:, -3:]
        out = model(ids[:, :-3], use_cache=True)
        steps = []
        cache = out.past_key_values
        for t in range(37, 40):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
    assert (torch.stack(steps, 1) - full).abs().max().item() <= 1e-4


def test_generate_matches_sdpa_with_all_ones_layout():
    ref, model = _pair(_gpt2(), DENSE)
    prompt = _ids(batch=1, seq=10)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, **kwargs), ref.generate(prompt, **kwargs))


def test_training_step_backpropagates_through_the_cpu_path():
    section = {"implementation": "block_sparse", "block_size": BLOCK,
               "layout": [{"type": "bigbird", "window": 1, "num_global": 1, "num_random": 1}]}
    ref, model = _pair(_gpt2(), {**section, "layout": [{"type": "dense"}]})
    _, sparse = _pair(_gpt2(), section)
    ids = _ids()
    for m in (ref, model, sparse):
        m.train()
        m.config.attn_pdrop = 0.0
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
    losses = {}
    for name, m in (("ref", ref), ("dense", model), ("sparse", sparse)):
        loss = m(ids, labels=ids).loss
        loss.backward()
        losses[name] = loss.item()
    grad = lambda m: m.transformer.h[0].attn.c_attn.weight.grad
    assert (grad(model) - grad(ref)).abs().max().item() <= 1e-5
    assert torch.isfinite(grad(sparse)).all() and grad(sparse).abs().max().item() > 0
    assert losses["dense"] == pytest.approx(losses["ref"], abs=1e-5)


def test_keep_probabilities_setting_reaches_the_cpu_backward(monkeypatch):
    # `attention.keep_probabilities` decides whether the CPU backward reuses the forward's probabilities; both
    # paths give the same gradients (to rounding), and the model's config carries the choice to every layer.
    import dist_sparse.attention.cpu as cpu

    saved = []
    backward = cpu._BlockSparseCPU.backward

    def spy(ctx, dout):
        saved.append(len(ctx.saved_tensors))
        return backward(ctx, dout)

    monkeypatch.setattr(cpu._BlockSparseCPU, "backward", staticmethod(spy))
    section = {"implementation": "block_sparse", "block_size": BLOCK, "kernel": "cpu",
               "layout": [{"type": "local", "window": 1}, {"type": "global", "blocks": [0]}]}
    grads = {}
    for keep in ("auto", False):
        _, model = _pair(_gpt2(), {**section, "keep_probabilities": keep})
        saved.clear()
        model(_ids(), labels=_ids()).loss.backward()
        assert saved == [7 if keep == "auto" else 5] * 2, (keep, saved)  # one call per layer
        grads[keep] = model.transformer.h[0].attn.c_attn.weight.grad
    assert (grads["auto"] - grads[False]).abs().max().item() <= 1e-5


def test_from_pretrained_keeps_layout_settings(tmp_path):
    section = {"implementation": "block_sparse", "block_size": BLOCK, "seed": 3,
               "layout": [{"type": "bigbird", "window": 0, "num_global": 1, "num_random": 1}]}
    _, model = _pair(_gpt2(), section)
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path)
    bs_hf.register()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="block_sparse").eval()
    assert getattr(loaded.config, bs_hf.SETTINGS_ATTR) == AttentionConfig.from_dict(section).to_dict()
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, before, atol=1e-6)


def test_prepare_and_register():
    cfg = _gpt2()
    assert bs_hf.prepare(cfg, AttentionConfig.from_dict({})) == "sdpa"
    assert not hasattr(cfg, bs_hf.SETTINGS_ATTR)
    assert bs_hf.prepare(cfg, {"implementation": "eager"}) == "eager"
    assert bs_hf.prepare(cfg, {"implementation": "block_sparse"}) == "block_sparse"
    assert getattr(cfg, bs_hf.SETTINGS_ATTR)["layout"] == AttentionConfig().layout
    bs_hf.register()
    bs_hf.register()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert AttentionInterface._global_mapping["block_sparse"] is bs_hf.block_sparse_attention_forward
    assert "block_sparse" in AttentionMaskInterface._global_mapping


def test_settings_default_and_attention_bias_rejected():
    assert bs_hf.settings_for(None).layout == AttentionConfig().layout
    bias = torch.zeros(1, 1, 4, 4)
    bias[..., 0, 1] = 0.5  # a real additive bias, not a mask
    with pytest.raises(ValueError, match="biases"):
        bs_hf._bool_mask(bias, 4)
    additive = torch.zeros(1, 1, 4, 4)
    additive[..., 0, 1] = torch.finfo(torch.float32).min
    assert bs_hf._bool_mask(additive, 4)[0, 0, 0].tolist() == [True, False, True, True]
