"""LoRA/QLoRA: stock mlx-vlm reloads our adapters exactly; adapters_disabled is the base."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from qponder_mlx import generate as gen
from qponder_mlx.images import PixelPolicy, load_image
from qponder_mlx.model import load_model
from qponder_mlx.prompts import chat_messages
from qponder_mlx.testing.sft_sets import CC0_IMAGES
from qponder_mlx.train.config import LoraConfig
from qponder_mlx.train.loop import enable_grad_checkpoint
from qponder_mlx.train.lora import (
    AdapterError,
    adapters_disabled,
    attach_lora,
    base_quantization,
    load_adapter_weights,
    load_adapters,
    lora_layers,
    save_adapters,
    trainable_snapshot,
    weights_swapped,
)


@pytest.fixture(scope="module")
def inputs(tiny_loaded):
    prompt = tiny_loaded.tokenizer.apply_chat_template(chat_messages(), tokenize=False,
                                                       add_generation_prompt=True)
    img = PixelPolicy(56 * 56, 112 * 112).resize(load_image(sorted(CC0_IMAGES.iterdir())[2]))
    return gen.encode(tiny_loaded.processor, [prompt], [img])


def _logits(model, inputs):
    out = model(inputs["input_ids"], inputs["pixel_values"],
                image_grid_thw=inputs["image_grid_thw"]).logits
    mx.eval(out)
    return np.array(out)


def _perturb(model, seed=7):
    """LoRA B starts at zero (adapter = identity); give it values so the test means something."""
    mx.random.seed(seed)
    for _, m in lora_layers(model):
        m.lora_b = mx.random.normal(m.lora_b.shape) * 0.2
    mx.eval(model.parameters())


def _lora_model(path, **kw):
    loaded = load_model(str(path))
    mx.random.seed(0)
    cfg = attach_lora(loaded.model, LoraConfig(rank=4, alpha=8, **kw.pop("lora", {})), **kw)
    _perturb(loaded.model)
    return loaded.model, cfg


def test_targets_all_language_linears_only(tiny_model_dir):
    model, cfg = _lora_model(tiny_model_dir)
    names = [n for n, _ in lora_layers(model)]
    n_layers = len(model.language_model.model.layers)
    assert len(names) == 7 * n_layers
    assert all(n.startswith("language_model.model.layers.") for n in names)
    assert sorted(cfg["lora_parameters"]["keys"]) == sorted(names)
    assert cfg["lora_parameters"]["scale"] == 2.0  # alpha / rank
    # only the LoRA matrices train; the vision tower and base weights are frozen
    trainable = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert trainable and all(k.endswith(("lora_a", "lora_b")) for k in trainable)


def test_train_vision_unfreezes_the_tower(tiny_model_dir):
    model, cfg = _lora_model(tiny_model_dir, lora={"train_vision": True})
    trainable = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert any(k.startswith("vision_tower.") for k in trainable)
    assert cfg["train_vision"] is True


def test_train_merger_unfreezes_the_projector_only_and_reloads(tmp_path, tiny_model_dir,
                                                               inputs):
    model, cfg = _lora_model(tiny_model_dir, lora={"train_merger": True})
    vision = [k for k, _ in tree_flatten(model.trainable_parameters())
              if k.startswith("vision_tower.")]
    assert vision and all(k.startswith("vision_tower.merger.") for k in vision)
    assert cfg["train_merger"] is True and "train_vision" not in cfg
    model.vision_tower.merger.update(tree_map(lambda p: p + 0.01,
                                              model.vision_tower.merger.trainable_parameters()))
    want = _logits(model, inputs)
    save_adapters(model, cfg, tmp_path / "ad")
    again = load_model(str(tiny_model_dir)).model
    load_adapters(again, tmp_path / "ad")               # the projector comes back, trainable
    np.testing.assert_allclose(_logits(again, inputs), want, atol=1e-5)
    assert [k for k, _ in tree_flatten(again.trainable_parameters())
            if k.startswith("vision_tower.")] == vision


def test_adapters_disabled_equals_a_fresh_base(tiny_model_dir, inputs):
    base = _logits(load_model(str(tiny_model_dir)).model, inputs)
    model, _ = _lora_model(tiny_model_dir)
    with_lora = _logits(model, inputs)
    assert np.abs(with_lora - base).max() > 1e-3  # the adapter really changes the output
    with adapters_disabled(model):
        np.testing.assert_array_equal(_logits(model, inputs), base)
    np.testing.assert_array_equal(_logits(model, inputs), with_lora)  # scales restored
    with pytest.raises(RuntimeError), adapters_disabled(model):
        raise RuntimeError("boom")
    np.testing.assert_array_equal(_logits(model, inputs), with_lora)  # also after an error


def test_weights_swapped_is_the_snapshot_policy(tiny_model_dir, inputs):
    """GRPO's "initial" reference: the policy as the run started, not the bare base."""
    model, _ = _lora_model(tiny_model_dir)
    start = _logits(model, inputs)
    snap = trainable_snapshot(model)
    _perturb(model, seed=11)                                  # "training" moves the adapter
    moved = _logits(model, inputs)
    assert np.abs(moved - start).max() > 1e-3
    with weights_swapped(model, snap):
        np.testing.assert_array_equal(_logits(model, inputs), start)
    np.testing.assert_array_equal(_logits(model, inputs), moved)  # current weights restored
    with pytest.raises(RuntimeError), weights_swapped(model, snap):
        raise RuntimeError("boom")
    np.testing.assert_array_equal(_logits(model, inputs), moved)  # also after an error
    with pytest.raises(ValueError, match="snapshot"), weights_swapped(model, {"x": mx.zeros(1)}):
        pass


def test_stock_mlx_vlm_load_reproduces_our_logits(tmp_path, tiny_model_dir, inputs):
    from mlx_vlm import load

    model, cfg = _lora_model(tiny_model_dir)
    ours = _logits(model, inputs)
    out = save_adapters(model, cfg, tmp_path / "adapters")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json",
                                                     "adapters.safetensors"]
    assert json.loads((out / "adapter_config.json").read_text())["fine_tune_type"] == "lora"
    stock, _ = load(str(tiny_model_dir), adapter_path=str(out))
    np.testing.assert_allclose(_logits(stock, inputs), ours, atol=1e-5)


def test_qlora_quantizes_the_language_model_only_and_reloads(tmp_path, tiny_model_dir, inputs):
    from mlx_vlm import load

    base = _logits(load_model(str(tiny_model_dir)).model, inputs)
    model, cfg = _lora_model(tiny_model_dir, quantize_bits=4, group_size=64)
    quant = {k.removesuffix(".linear"): v for k, v in base_quantization(model).items()}
    assert quant and all(k.startswith("language_model.") for k in quant)
    assert "language_model.lm_head" in quant and "language_model.model.embed_tokens" in quant
    # recorded under the base model's names, which is what mlx-vlm re-quantizes on load
    assert cfg["base_quantization"] == quant
    # vision linears stay float (mlx-vlm's own in-memory QLoRA would quantize them too)
    assert not any(isinstance(m, nn.QuantizedLinear) for n, m in model.named_modules()
                   if n.startswith("vision_tower"))
    # LoRA sits on top of quantized linears
    assert all(isinstance(m.linear, nn.QuantizedLinear) for _, m in lora_layers(model))
    ours = _logits(model, inputs)
    with adapters_disabled(model):
        q_base = _logits(model, inputs)
    assert 0 < np.abs(q_base - base).max() < 0.5  # 4-bit is close to, not equal to, float
    out = save_adapters(model, cfg, tmp_path / "qadapters")
    stock, _ = load(str(tiny_model_dir), adapter_path=str(out))  # float base re-quantized
    np.testing.assert_allclose(_logits(stock, inputs), ours, atol=1e-5)


def test_load_adapters_continues_from_a_saved_adapter(tmp_path, tiny_model_dir, inputs):
    model, cfg = _lora_model(tiny_model_dir)
    out = save_adapters(model, cfg, tmp_path / "a")
    fresh = load_model(str(tiny_model_dir)).model
    got = load_adapters(fresh, out)
    assert got["lora_parameters"] == cfg["lora_parameters"]
    np.testing.assert_allclose(_logits(fresh, inputs), _logits(model, inputs), atol=1e-6)
    trainable = [k for k, _ in tree_flatten(fresh.trainable_parameters())]
    assert trainable and all(k.endswith(("lora_a", "lora_b")) for k in trainable)
    with pytest.raises(AdapterError, match="needs adapters.safetensors"):
        load_adapters(load_model(str(tiny_model_dir)).model, tmp_path)


def test_load_adapter_weights_refuses_a_mismatch(tmp_path, tiny_model_dir):
    model, cfg = _lora_model(tiny_model_dir)
    save_adapters(model, cfg, tmp_path / "a")
    other = load_model(str(tiny_model_dir)).model
    attach_lora(other, LoraConfig(rank=8, alpha=16))
    with pytest.raises(AdapterError, match="lora_a has shape|lora_b has shape"):
        load_adapter_weights(other, tmp_path / "a" / "adapters.safetensors")
    fewer = load_model(str(tiny_model_dir)).model
    attach_lora(fewer, LoraConfig(rank=4, alpha=8, target_modules=["q_proj"]))
    with pytest.raises(AdapterError, match="do not match"):
        load_adapter_weights(fewer, tmp_path / "a" / "adapters.safetensors")


def test_attach_refuses_bad_targets_and_double_lora(tiny_model_dir):
    model = load_model(str(tiny_model_dir)).model
    with pytest.raises(AdapterError, match="target_modules"):
        attach_lora(model, LoraConfig(target_modules=["nope_proj"]))
    model = load_model(str(tiny_model_dir)).model
    attach_lora(model, LoraConfig())
    with pytest.raises(AdapterError, match="already has LoRA"):
        attach_lora(model, LoraConfig())


def test_grad_checkpoint_gives_the_same_gradients(tiny_model_dir, inputs):
    def loss_and_grads(model):
        def loss(m):
            return _logits_arr(m).astype(mx.float32).square().mean()

        v, g = nn.value_and_grad(model, loss)(model)
        mx.eval(v, g)
        return v.item(), dict(tree_flatten(g))

    def _logits_arr(m):
        return m(inputs["input_ids"], inputs["pixel_values"],
                 image_grid_thw=inputs["image_grid_thw"]).logits

    plain, _ = _lora_model(tiny_model_dir)
    ckpt, _ = _lora_model(tiny_model_dir)
    other_cls = type(plain.language_model.model.layers[0])
    enable_grad_checkpoint(ckpt.language_model.model.layers)
    # only the given instances change, never the shared class
    assert type(plain.language_model.model.layers[0]) is other_cls
    assert type(ckpt.language_model.model.layers[0]) is not other_cls
    v1, g1 = loss_and_grads(plain)
    v2, g2 = loss_and_grads(ckpt)
    assert v1 == pytest.approx(v2, rel=1e-6)
    assert g1.keys() == g2.keys()
    for k in g1:
        np.testing.assert_allclose(np.array(g2[k]), np.array(g1[k]), rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_stock_mlx_vlm_server_serves_our_adapter(tmp_path, tiny_model_dir):
    """`mlx_vlm.server --adapter-path` loads our adapter and answers like stock `load(...,
    adapter_path)` + `generate` in this process (4-6 s to start: slow mark)."""
    import base64
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from mlx_vlm import generate, load
    from mlx_vlm.prompt_utils import apply_chat_template

    from qponder_mlx.prompts import USER_PROMPT

    model, cfg = _lora_model(tiny_model_dir)
    adapter = save_adapters(model, cfg, tmp_path / "adapters")
    image = sorted(CC0_IMAGES.iterdir())[4]
    stock, processor = load(str(tiny_model_dir), adapter_path=str(adapter))
    prompt = apply_chat_template(processor, stock.config, USER_PROMPT, num_images=1)
    want = generate(stock, processor, prompt, image=[str(image)], max_tokens=12,
                    temperature=0.0, verbose=False).text
    plain, _ = load(str(tiny_model_dir))
    assert generate(plain, processor, prompt, image=[str(image)], max_tokens=12,
                    temperature=0.0, verbose=False).text != want  # the adapter matters

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mlx_vlm.server", "--model",
                             str(tiny_model_dir), "--adapter-path", str(adapter),
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        health = None
        for _ in range(120):
            try:
                health = json.loads(urllib.request.urlopen(f"{url}/health", timeout=1).read())
                break
            except OSError:
                time.sleep(0.5)
        assert health is not None and health["loaded_adapter"] == str(adapter)
        img = base64.b64encode(image.read_bytes()).decode()
        body = {"model": str(tiny_model_dir), "max_tokens": 12, "temperature": 0, "messages": [
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{img}"}},
                {"type": "text", "text": USER_PROMPT}]}]}
        req = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(req, timeout=60).read())
        # The server streams its detokenizer: it strips the leading space and may end on a
        # partial UTF-8 byte (the random model emits odd bytes). Same tokens, same text.
        def norm(text):
            return text.replace("\ufffd", "").strip()

        got = reply["choices"][0]["message"]["content"]
        assert norm(got) == norm(want) and len(norm(want)) > 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)
