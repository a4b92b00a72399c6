"""`tinylm export`: the folder loads in Hugging Face `transformers` and computes what tinylm computes.

The reference is tinylm's own model and tokenizer: transformers' logits must equal them within 1e-4,
greedy generation must pick the same tokens, and AutoTokenizer must produce the same ids.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, markov_text, tiny_config

from tinylm import rundir
from tinylm.console import QUIET
from tinylm.errors import UserError
from tinylm.export import export
from tinylm.generate import generate
from tinylm.rundir import load as load_run

transformers = pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")

TRICKY = "The cat  sat.\n\n  Naïve café — 東京 🐈\tend<|endoftext|>next"


def quiet(*_: str) -> None:
    pass


def hf_logits(out_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out_dir)).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> tuple[Path, Path]:
    out_dir = tmp_path_factory.mktemp("export") / "hf"
    export(trained_run["run_dir"], out_dir, out=quiet)
    return Path(trained_run["run_dir"]), out_dir


def test_folder_holds_the_files_transformers_reads(exported):
    _, out_dir = exported
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([
        "README.md", "config.json", "generation_config.json", "model.safetensors",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"])
    config = json.loads((out_dir / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["activation_function"] == "gelu_new"


def test_transformers_logits_equal_tinylm(exported):
    run_dir, out_dir = exported
    _, tok, model, _ = load_run(run_dir)
    ids = torch.tensor([tok.encode("The cat sat on the mat. The dog sat on the log.\nA bird")[:32]] * 2)
    with torch.no_grad():
        ours, _ = model(ids)
    theirs = hf_logits(out_dir, ids)
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max().item() < 1e-4


def test_greedy_generation_gives_the_same_tokens(exported):
    run_dir, out_dir = exported
    _, tok, model, _ = load_run(run_dir)
    prompt = tok.encode("The dog")
    ours = list(generate(model, prompt, 25, temperature=0))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(out_dir)).eval()
    theirs = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=25, min_new_tokens=25)
    assert theirs[0, len(prompt):].tolist() == ours


def test_auto_tokenizer_round_trip_equals_tinylm(exported):
    run_dir, out_dir = exported
    _, tok, _, _ = load_run(run_dir)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out_dir))
    ids = hf_tok(TRICKY)["input_ids"]
    assert ids == tok.encode(TRICKY)  # nothing added around the text; <|endoftext|> is one token
    assert tok.eot_id in ids
    assert hf_tok.decode(ids) == TRICKY == tok.decode(ids)
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == tok.eot_id


def test_pipeline_generates_what_tinylm_generates(exported):
    run_dir, out_dir = exported
    _, tok, model, _ = load_run(run_dir)
    pipe = transformers.pipeline("text-generation", model=str(out_dir))
    text = pipe("The cat", do_sample=False, max_new_tokens=20)[0]["generated_text"]
    assert text == "The cat" + tok.decode(generate(model, tok.encode("The cat"), 20, temperature=0))
    sampled = pipe("The", return_tensors=True)[0]["generated_token_ids"]  # the generation config's defaults
    assert sampled[:1] == tok.encode("The") and len(sampled) <= model.cfg.block_size  # stops at the context


def test_model_card_states_config_data_size_and_val_loss(exported, trained_run):
    _, out_dir = exported
    card = (out_dir / "README.md").read_text()
    assert f"{trained_run['parameters']:,}" in card
    assert f"final val loss {trained_run['val_loss']:.4f} at step {trained_run['step']}" in card
    assert "corpus.txt" in card and "vocab_size: 300" in card and "pipeline_tag: text-generation" in card


def test_the_model_card_reads_the_runs_metrics_json(trained_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run["run_dir"], run)
    metrics = json.loads((run / rundir.METRICS).read_text())
    metrics.update(val_loss=1.2345, val_bpb=0.5, eval_step=77, best_val_loss=1.1111)
    (run / rundir.METRICS).write_text(json.dumps(metrics))
    for events in rundir.event_files(run):  # not read back from TensorBoard's log
        events.unlink()
    export(run, tmp_path / "hf", out=quiet)
    assert "| result | final val loss 1.2345 at step 77 (0.500 bits per byte); best 1.1111 |" in (
        tmp_path / "hf" / "README.md").read_text()
    (run / rundir.METRICS).unlink()  # a run from before metrics.json: the checkpoint's best val loss
    best = load_run(run).state["best_val"]
    export(run, tmp_path / "hf2", out=quiet)
    assert f"| result | best val loss {best:.4f} |" in (tmp_path / "hf2" / "README.md").read_text()


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> Path:
    """No biases, an untied head and a character tokenizer: the options GPT-2 expresses differently."""
    from tinylm.loop import train

    tmp = tmp_path_factory.mktemp("plain")
    (tmp / "m.txt").write_text(markov_text(3000) + "\nÆsir ünïcode\n")
    cfg = tiny_config(tmp, [tmp / "m.txt"], data={"tokenizer": "char"}, model={"bias": False, "tie_embeddings": False},
                      train={"max_steps": 20, "sample_tokens": 0, "eval_interval": 10})
    return Path(train(cfg, run_dir=tmp / "run", console=QUIET).run_dir)


def test_no_bias_untied_char_model_exports_exactly(plain_run, tmp_path):
    _, tok, model, _ = load_run(plain_run)
    result = export(plain_run, tmp_path / "hf", out=quiet)
    assert result["max_logit_diff"] < 1e-4
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    ids = torch.tensor([tok.encode("abcdefgh" * 3)])
    with torch.no_grad():
        ours, _ = model(ids)
    assert (hf_logits(tmp_path / "hf", ids) - ours).abs().max().item() < 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ids = tok.encode("hgfe\nÆsir ünïcode") + [tok.eot_id] + tok.encode("ab")
    text = "hgfe\nÆsir ünïcode<|endoftext|>ab"
    assert hf_tok(text)["input_ids"] == ids and hf_tok.decode(ids) == text == tok.decode(ids)


def test_without_transformers_the_files_are_written_with_instructions(trained_run, tmp_path, monkeypatch):
    lines: list[str] = []
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
        result = export(trained_run["run_dir"], tmp_path / "hf", out=lines.append)
    assert result["max_logit_diff"] is None
    assert "transformers is not installed" in lines[-1] and "pip install 'tinylm[hf]'" in lines[-1]
    ids = torch.tensor([[1, 2, 3, 4]])
    _, _, model, _ = load_run(trained_run["run_dir"])
    with torch.no_grad():
        assert (hf_logits(tmp_path / "hf", ids) - model(ids)[0]).abs().max().item() < 1e-4  # loadable all the same


def test_refuses_to_overwrite_an_export_without_force(trained_run, tmp_path):
    export(trained_run["run_dir"], tmp_path / "hf", out=quiet)
    with pytest.raises(UserError, match="already holds an export"):
        export(trained_run["run_dir"], tmp_path / "hf", out=quiet)
    export(trained_run["run_dir"], tmp_path / "hf", force=True, out=quiet)


def test_export_command_end_to_end(trained_run, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def tinylm(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tinylm", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    ok = tinylm("export", trained_run["run_dir"], "out")
    assert ok.returncode == 0, ok.stderr
    assert "as GPT2LMHeadModel" in ok.stdout and "logits match tinylm's" in ok.stdout


def test_export_of_a_missing_run_is_one_line(tmp_path, capsys):
    from tinylm.cli import main

    assert main(["export", str(tmp_path / "no_run"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: run directory not found: {tmp_path / 'no_run'}\n"


# ---------------------------------------------------------------- the Llama family (issue 4's switches)

from tinylm.config import ModelConfig  # noqa: E402

LLAMA = {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False}


def short_run(tmp: Path, model: dict) -> Path:
    from tinylm.loop import train

    (tmp / "m.txt").write_text(markov_text(3000))
    cfg = tiny_config(tmp, [tmp / "m.txt"], data={"tokenizer": "char"}, model=model,
                      train={"max_steps": 10, "sample_tokens": 0, "eval_interval": 10})
    return Path(train(cfg, run_dir=tmp / "run", console=QUIET).run_dir)


@pytest.mark.parametrize("extra", [{"tie_embeddings": False}, {"bias": True, "rope_theta": 500.0}, {"n_kv_head": 1}],
                         ids=["untied", "biases", "gqa"])
def test_llama_style_model_exports_as_llama(tmp_path, extra):
    run_dir = short_run(tmp_path, {**LLAMA, **extra})
    _, tok, model, _ = load_run(run_dir)
    result = export(run_dir, tmp_path / "hf", out=quiet)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert result["architecture"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] == model.cfg.kv_heads and config["num_attention_heads"] == 2
    ids = torch.tensor([tok.encode("abcdefghhgfedcba" * 2)])
    with torch.no_grad():
        ours, _ = model(ids)
    assert (hf_logits(tmp_path / "hf", ids) - ours).abs().max().item() < 1e-4
    prompt = tok.encode("abc")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    theirs = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=25, min_new_tokens=25)
    assert theirs[0, len(prompt):].tolist() == list(generate(model, prompt, 25, temperature=0))


def test_qk_norm_model_exports_as_qwen3_and_imports_back(tmp_path):
    """QK-norm (which the planner chooses) is Qwen3's: transformers' Qwen3ForCausalLM computes the same logits and
    greedy tokens, and `--init_from` reads the folder back into the same weights."""
    from tinylm.hf import read_pretrained

    run_dir = short_run(tmp_path, {**LLAMA, "qk_norm": True, "tie_embeddings": False, "n_kv_head": 1})
    _, tok, model, _ = load_run(run_dir)
    with torch.no_grad():  # gains away from 1, so that a q_norm or k_norm left out or swapped shows
        for block in model.blocks:
            block.attn.q_norm.weight.uniform_(0.5, 1.5)
            block.attn.k_norm.weight.uniform_(0.5, 2.5)
    torch.save({**torch.load(run_dir / rundir.CHECKPOINT, weights_only=False), "model": model.state_dict()},
               run_dir / rundir.CHECKPOINT)
    result = export(run_dir, tmp_path / "hf", out=quiet)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert result["architecture"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
    ids = torch.tensor([tok.encode("abcdefghhgfedcba" * 2)])
    with torch.no_grad():
        ours, _ = model(ids)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(hf_model).__name__ == "Qwen3ForCausalLM"
    assert (hf_logits(tmp_path / "hf", ids) - ours).abs().max().item() < 1e-4
    prompt = tok.encode("abc")
    theirs = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=25, min_new_tokens=25)
    assert theirs[0, len(prompt):].tolist() == list(generate(model, prompt, 25, temperature=0))
    back = read_pretrained(tmp_path / "hf")
    assert back.model.qk_norm and back.model.n_kv_head == 1 and not back.model.tie_embeddings
    assert all(torch.equal(back.state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("model,reason", [
    ({"mlp": "relu2"}, "model.mlp=relu2 (ReLU squared) exists in neither"),
    ({"pos": "learned", "norm": "layernorm", "mlp": "gelu", "qk_norm": True}, "model.qk_norm=true (RMSNorm on queries "
                                                                               "and keys) exists only in Qwen3"),
    ({**LLAMA, "qk_norm": True, "bias": True}, "Qwen3 (the architecture with QK-norm) has no biases in its MLP"),
    ({"pos": "learned", "norm": "rmsnorm", "mlp": "gelu"}, "model.pos=learned, model.norm=rmsnorm, model.mlp=gelu mixes the two"),
    ({**LLAMA, "mlp": "gelu"}, "model.pos=rope, model.norm=rmsnorm, model.mlp=gelu mixes the two"),
    ({"pos": "learned", "norm": "layernorm", "mlp": "gelu", "n_kv_head": 2}, "model.n_kv_head=2 (grouped-query attention) "
                                                                            "does not exist in GPT2LMHeadModel"),
], ids=["relu2", "gpt2+qk_norm", "qk_norm+bias", "learned+rmsnorm", "rope+gelu", "gpt2+gqa"])
def test_what_neither_architecture_expresses_is_refused(model, reason):
    from tinylm.hf import architecture

    with pytest.raises(UserError, match=re.escape(reason)):
        architecture(ModelConfig(**model))


def test_refused_export_writes_nothing(tmp_path, capsys):
    from tinylm.cli import main

    run_dir = short_run(tmp_path, {"mlp": "relu2"})
    assert main(["export", str(run_dir), str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err.startswith("error: cannot export: model.mlp=relu2")
    assert not (tmp_path / "hf").exists()
