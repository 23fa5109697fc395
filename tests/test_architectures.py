"""Every architecture family (llama, qwen2, qwen3, nanochat, gemma3; gpt2 has its own tests,
and gemma3's sliding window and GGUF files more in test_gemma3.py) through every path:
parity with transformers both ways, cached / fast / int8 / compiled generation, beam search,
speculative decoding across families, the serving engine, LoRA and PEFT export, attention
maps, info, training from the CLI, and the sentences bad settings earn."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from gptkit import GPT, GPTConfig, GptkitError, Tokenizer
from gptkit.families import family
from gptkit.generate import generate

FAMILIES = ["llama", "qwen2", "qwen3", "nanochat", "gemma3"]
# a family's own settings for `tiny`: gemma3 gets both kinds of layer with a window shorter
# than the 40-token checks, and an untied head (tied to its sqrt(C)-scaled embedding, a
# random model's greedy choice is the last token again and again)
TINY = {"gemma3": dict(layer_types=["sliding_attention", "full_attention"], sliding_window=6,
                       tie_word_embeddings=False)}
HF_CLASSES = {arch: family(arch).hf_class for arch in FAMILIES}
VOCAB = 96
TEXT = "the quick brown fox jumps over the lazy dog. hello world! 0123456789 ,;:?\n"
PROMPT = [[5, 17, 60, 3, 42, 9]]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(arch: str, seed: int = 0, **overrides) -> GPT:
    """A random model of `arch` with grouped-query attention, weights spread out so that
    greedy choices are far apart (nanochat starts with zero projections and head)."""
    torch.manual_seed(seed)
    settings = dict(vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_kv_head=2,
                    n_embd=32, eos_token_id=1, arch=arch, **TINY.get(arch, {}))
    model = GPT(GPTConfig(**{**settings, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn_like(p) * (1.0 if "wte" in name else 0.3))
    return model


def hf_greedy(hf, ids: torch.Tensor, new: int, **kwargs) -> list[list[int]]:
    return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                       eos_token_id=None, pad_token_id=0, **kwargs).tolist()


# -- parity with transformers, both ways --------------------------------------------------

@pytest.mark.parametrize("arch", FAMILIES)
def test_saved_model_opens_in_transformers_with_same_logits_and_tokens(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny(arch)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == family(arch).model_type
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == HF_CLASSES[arch]
    ids = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() < 1e-4
    prompt = torch.tensor(PROMPT)
    ours = generate(model, prompt, max_new_tokens=30, eos_token_id=[])
    assert ours.tolist() == hf_greedy(hf, prompt, 30)
    again = GPT.from_pretrained(tmp_path)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def _hf_model(arch: str):
    """A tiny random transformers model of `arch`: GQA; qwen3 with heads wider than
    hidden / heads; llama with a tied head and llama3 RoPE scaling; gemma3 with a sliding
    window, its own attention scale and linear RoPE scaling of its global layers."""
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  initializer_range=0.3, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(3)
    if arch == "llama":
        config = transformers.LlamaConfig(**common, tie_word_embeddings=True, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=16))
        return transformers.LlamaForCausalLM(config).eval()
    if arch == "qwen3":
        config = transformers.Qwen3Config(**{**common, "num_key_value_heads": 1}, head_dim=16)
        return transformers.Qwen3ForCausalLM(config).eval()
    if arch == "qwen2":  # its q/k/v biases start at zero: give them values that matter
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, rope_theta=1e6)).eval()
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.3)
        return hf
    if arch == "gemma3":  # its norm gains start at 1 + 0: give them values that matter
        config = transformers.Gemma3TextConfig(
            **common, head_dim=16, query_pre_attn_scalar=24, sliding_window=6,
            tie_word_embeddings=False, layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1e6),
                "sliding_attention": dict(rope_type="default", rope_theta=1e4)})
        hf = transformers.Gemma3ForCausalLM(config).eval()
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if name.endswith("norm.weight"):
                    p.normal_(0.0, 0.3)
        return hf
    return transformers.NanoChatForCausalLM(transformers.NanoChatConfig(**common)).eval()


@pytest.mark.parametrize("arch", FAMILIES)
def test_transformers_model_loads_in_gptkit_with_same_logits_and_tokens(arch, tmp_path):
    hf = _hf_model(arch)
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path)
    assert ours.config.arch == arch and ours.config.n_kv_head < ours.config.n_head
    ids = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() < 1e-4
    prompt = torch.tensor(PROMPT)
    assert generate(ours, prompt, max_new_tokens=30, eos_token_id=[]).tolist() == hf_greedy(hf, prompt, 30)


@pytest.mark.parametrize("arch", FAMILIES)
def test_beam_search_matches_transformers(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny(arch, seed=1)
    model.save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompt = torch.tensor(PROMPT)
    kwargs = dict(max_new_tokens=12, num_beams=3, num_return_sequences=2, eos_token_id=[])
    ours = generate(model, prompt, **kwargs)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                         pad_token_id=0, **{**kwargs, "eos_token_id": None})
    assert ours.tolist() == theirs.tolist()


# -- generation paths ------------------------------------------------------------------------

@pytest.mark.parametrize("arch", FAMILIES)
def test_left_padded_batch_equals_single_rows(arch):
    model = tiny(arch, seed=2)
    prompts = [[3, 4], PROMPT[0], [250 % VOCAB], list(range(10, 30))]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = generate(model, ids, attention_mask=mask, max_new_tokens=15, eos_token_id=[])
    for row, prompt in zip(out, prompts, strict=True):
        single = generate(model, torch.tensor([prompt]), max_new_tokens=15, eos_token_id=[])[0]
        assert row[width - len(prompt):].tolist() == single.tolist()


def _uncached_greedy(model: GPT, ids: torch.Tensor, new: int) -> list[int]:
    """The textbook loop: the whole sequence through the model at every step."""
    ids = ids.clone()
    with torch.no_grad():
        for _ in range(new):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0].tolist()


@pytest.mark.parametrize("arch", FAMILIES)
def test_cached_fast_int8_and_compiled_decoding_keep_greedy(arch, exported_decode):
    from gptkit.inference import optimize_for_inference

    model = tiny(arch, seed=3)
    prompt = torch.tensor(PROMPT)
    eager = _uncached_greedy(model, prompt, 20)
    assert generate(model, prompt, max_new_tokens=20, eos_token_id=[])[0].tolist() == eager
    fast = optimize_for_inference(copy.deepcopy(model))
    assert generate(fast, prompt, max_new_tokens=20, eos_token_id=[])[0].tolist() == eager
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a CPU without bf16 instructions decodes in fp32
        bf16 = optimize_for_inference(copy.deepcopy(model), dtype=torch.bfloat16)
    int8 = optimize_for_inference(copy.deepcopy(model), quantize="int8")
    with torch.no_grad():
        reference = model(prompt)[0, -1]
        for other in (bf16, int8):  # rounded weights: the same distribution, not the same bits
            logits = other(prompt)[0, -1].float()
            assert torch.cosine_similarity(logits, reference, dim=0) > 0.99
            assert logits.argmax() == reference.argmax()
    # the exported decode step (what AOTInductor compiles), run by torch's interpreter
    compiled = optimize_for_inference(copy.deepcopy(model), compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback to eager happened
        assert generate(compiled, prompt, max_new_tokens=8, eos_token_id=[])[0].tolist() == eager[:14]
    assert compiled.compiled_decode.runner.calls == 7


def test_speculative_decoding_with_a_draft_of_another_family():
    target, draft = tiny("llama", seed=4), tiny("nanochat", seed=5)
    prompt = torch.tensor(PROMPT)
    greedy = generate(target, prompt, max_new_tokens=25, eos_token_id=[])
    for k in (1, 4):
        out = generate(target, prompt, max_new_tokens=25, eos_token_id=[], draft_model=draft,
                       num_draft_tokens=k)
        assert out.tolist() == greedy.tolist()


@pytest.mark.parametrize("arch", FAMILIES)
def test_serving_engine_matches_offline_greedy(arch):
    from serve_helpers import request, serve_all

    from gptkit.serve.engine import Engine

    tokenizer = Tokenizer.train(texts=[TEXT], vocab_size=64, kind="char")
    model = tiny(arch, seed=6, vocab_size=tokenizer.vocab_size,
                 eos_token_id=tokenizer.eos_token_id)
    with torch.no_grad():  # end-of-text's logit 0 is never the largest: requests run to their length
        model.lm_head.weight[tokenizer.eos_token_id] = 0.0
    prompts, lengths = ["the quick", "hello wor", "0123"], [12, 5, 9]
    expected = []
    for prompt, n in zip(prompts, lengths, strict=True):  # before the engine owns the model
        ids = tokenizer.encode(prompt, return_tensors="pt")
        out = generate(model, ids, max_new_tokens=n, tokenizer=tokenizer)
        expected.append(tokenizer.decode(out[0, ids.size(1):].tolist()))
    engine = Engine(model, tokenizer, max_batch_size=2, prefill_chunk=4)
    results = serve_all(engine, [request(tokenizer, p, n, temperature=0)
                                 for p, n in zip(prompts, lengths, strict=True)])
    assert [text for text, _, _ in results] == expected


# -- fine-tuning adapters, explanations, info -------------------------------------------------

PEFT_NAMES = {"llama": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
              "nanochat": ["fc1", "fc2", "k_proj", "o_proj", "q_proj", "v_proj"]}
PEFT_NAMES["qwen3"] = PEFT_NAMES["qwen2"] = PEFT_NAMES["gemma3"] = PEFT_NAMES["llama"]


@pytest.mark.parametrize("arch", FAMILIES)
def test_lora_adapters_export_to_peft_with_the_family_names(arch, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from gptkit.lora import apply_lora, lora_layers, merged_model, save_peft_adapter

    base = tiny(arch, seed=7)
    model = apply_lora(copy.deepcopy(base), rank=4)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.2)
    base.save_pretrained(tmp_path / "base")
    save_peft_adapter(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter["target_modules"] == PEFT_NAMES[arch] and adapter["fan_in_fan_out"] is False
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    with_adapter = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(ids)
        assert (ours - with_adapter(ids).logits).abs().max() < 1e-4
        assert (ours - base(ids)).abs().max() > 1e-2  # the adapters matter
        merged_model(model).save_pretrained(tmp_path / "merged")
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        assert (ours - merged(ids).logits).abs().max() < 1e-4


@pytest.mark.parametrize("arch", FAMILIES)
def test_attention_map_weights_rebuild_the_layer_output(arch):
    from gptkit.explain import attention_weights

    model = tiny(arch, seed=8)
    ids = torch.tensor(PROMPT)
    attn = model.transformer.h[1].attn
    outputs = []
    handle = attn.register_forward_hook(lambda module, args, out: outputs.append(out))
    weights, values = attention_weights(model, ids, layer=1)
    handle.remove()
    B, nh, T, _ = weights.shape
    assert nh == model.config.n_head and torch.allclose(weights.sum(-1), torch.ones(B, nh, T))
    assert (weights.triu(1) == 0).all()
    y = (weights @ values).transpose(1, 2).reshape(B, T, -1)
    with torch.no_grad():
        assert torch.allclose(attn.c_proj(y), outputs[0], atol=1e-5)


@pytest.mark.parametrize("arch", FAMILIES)
def test_info_shows_the_architecture_and_counts_its_parameters(arch, tmp_path):
    from gptkit.info import directory_info, format_info

    model = tiny(arch)
    model.save_pretrained(tmp_path)
    info = directory_info(tmp_path)
    assert info["parameters"] == model.num_params() == model.config.num_params()
    assert {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "nanochat": "nanochat",
            "gemma3": "Gemma 3"}[arch] in format_info(info)
    assert "(2 key/value)" in format_info(info)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del ours["lm_head.weight"]
    assert model.config.tensor_shapes() == ours


# -- training --------------------------------------------------------------------------------

def test_compiled_training_step_equals_eager():
    """Under the compiler attention is written out, grouped heads included, and the
    soft-capped head + loss is one fused step: same loss and gradients as eager."""
    eager = tiny("nanochat", seed=9, n_kv_head=1).train()
    compiled = copy.deepcopy(eager)
    x = torch.randint(0, VOCAB, (3, 16))
    losses = []
    for model in (eager, torch.compile(compiled, backend="aot_eager", fullgraph=True)):
        loss = model(x[:, :-1], targets=x[:, 1:])
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name


def test_train_command_builds_the_family_transformers_opens(char_data, tmp_path):
    from transformers import AutoModelForCausalLM

    from gptkit.cli import main

    out = tmp_path / "run"
    main(["train", "--data", str(char_data), "--out", str(out), "--arch", "nanochat",
          "--n-kv-head", "1", "--preset", "tiny", "--n-layer", "1", "--n-head", "2",
          "--n-embd", "32", "--block-size", "32", "--batch-size", "4", "--max-steps", "3",
          "--eval-interval", "0", "--device", "cpu"])
    model = GPT.from_pretrained(out)
    assert model.config.arch == "nanochat" and model.config.n_kv_head == 1
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "NanoChatForCausalLM"
    ids = torch.randint(0, model.config.vocab_size, (1, 20))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() < 1e-4


def test_train_command_ties_the_head_when_asked(char_data, tmp_path):
    from transformers import AutoModelForCausalLM

    from gptkit.cli import main

    out = tmp_path / "run"
    main(["train", "--data", str(char_data), "--out", str(out), "--arch", "qwen3",
          "--tie-word-embeddings", "--optimizer", "muon", "--preset", "tiny", "--n-layer", "1",
          "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4",
          "--max-steps", "3", "--eval-interval", "0", "--device", "cpu"])
    model = GPT.from_pretrained(out)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.transformer.wte.weight
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM" and hf.config.tie_word_embeddings
    ids = torch.randint(0, model.config.vocab_size, (1, 20))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() < 1e-4


@pytest.mark.parametrize("lora", [False, True])
def test_finetune_command_keeps_the_family(lora, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from gptkit.cli import main

    tokenizer = Tokenizer.train(texts=[TEXT + "CountO.,"], vocab_size=64, kind="char")
    base = tmp_path / "base"
    tiny("qwen3", vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_token_id).save_pretrained(base)
    tokenizer.save_pretrained(base)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Count to {n}.", "output": "1 2 3"[:2 * n]}) + "\n"
                            for n in range(1, 5)))
    out = tmp_path / "tuned"
    main(["finetune", "--model", str(base), "--task", "instruct", "--data", str(data), "--out", str(out),
          "--batch-size", "2", "--max-steps", "2", "--eval-interval", "0", "--device", "cpu",
          *(["--lora-rank", "2", "--save-adapter"] if lora else [])])
    capsys.readouterr()
    tuned = GPT.from_pretrained(out)
    assert tuned.config.arch == "qwen3" and tuned.config.n_kv_head == 2
    assert not torch.equal(tuned.transformer.h[0].attn.c_attn.weight,
                           GPT.from_pretrained(base).transformer.h[0].attn.c_attn.weight)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, tokenizer.vocab_size, (1, 12))
    with torch.no_grad():
        assert (tuned(ids) - hf(ids).logits).abs().max() < 1e-4
    if lora:
        adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert "q_proj" in adapter["target_modules"]


# -- bad input: one sentence each -------------------------------------------------------------

@pytest.mark.parametrize("values, message", [
    (dict(arch="mamba"), r"arch 'mamba' is unknown.*; expected one of gemma3, gpt2, llama, nanochat, qwen2, qwen3\."),
    (dict(arch="lama"), r"did you mean 'llama'"),
    (dict(arch="llama", n_kv_head=3), r"n_kv_head=3 does not divide n_head=4"),
    (dict(arch="qwen3", n_embd=60), r"head size 15 is odd; rotary positions"),
    (dict(arch="llama", qk_norm=True), r"qk_norm=True does not fit arch 'llama' .*LlamaForCausalLM"),
    (dict(arch="gpt2", n_kv_head=2), r"n_kv_head=2 does not fit arch 'gpt2'"),
    (dict(arch="nanochat", norm="rmsnorm"), r"expected 'rmsnorm_unweighted'"),
    (dict(arch="qwen3", logit_softcap=15.0), r"logit_softcap=15.0 does not fit arch 'qwen3'"),
    (dict(arch="llama", rope_scaling={"rope_type": "yarn", "factor": 4}), r"rope_scaling .* not supported"),
])
def test_bad_architecture_settings_are_one_sentence(values, message):
    with pytest.raises(GptkitError, match=message) as error:
        GPTConfig(**{**dict(n_layer=2, n_head=4, n_embd=32), **values})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("edit, message", [
    (dict(model_type="mamba"), r"model_type 'mamba', which gptkit does not build; it supports "
                               r"gemma3_text, gpt2, llama, nanochat, qwen2, qwen3\."),
    (dict(use_sliding_window=True), r"sliding-window attention"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
     r"rope_type 'yarn', which gptkit does not compute"),
    (dict(hidden_act="gelu"), r"hidden_act='gelu'"),
    (dict(num_key_value_heads=3), r"n_kv_head=3 does not divide n_head=4"),
])
def test_bad_config_json_is_one_sentence(edit, message, tmp_path):
    tiny("qwen3").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(GptkitError, match=message):
        GPT.from_pretrained(tmp_path)


def test_weights_of_another_family_are_refused(tmp_path):
    tiny("llama").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "qwen3"}))
    with pytest.raises(GptkitError, match="lacks tensor 'model.layers.0.self_attn.q_norm.weight'"):
        GPT.from_pretrained(tmp_path)


def test_unknown_arch_flag_exits_2_with_one_sentence(capsys, tmp_path):
    from gptkit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(tmp_path), "--arch", "llama2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--arch 'llama2' is unknown (did you mean 'llama'?); expected one of gemma3, gpt2" in err
