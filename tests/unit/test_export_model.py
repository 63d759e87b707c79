"""`ckpt export --model NAME [--hf-config ENTRY]`: one model's weights under its plain state_dict names
(tied weights, DDP and compile prefixes), a from_pretrained folder, and the refusals that write nothing."""

from __future__ import annotations

import base64
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from elastictrain.checkpoint import CheckpointManager
from elastictrain.checkpoint.export import export_model
from elastictrain.checkpoint.weights import strip_wrapper_prefixes
from elastictrain.cli import main
from elastictrain.config import CheckpointConfig, EncryptionConfig
from elastictrain.errors import NotExportable, UnknownStateEntry
from elastictrain.runtime.state import ElasticState
from elastictrain.statetree import flatten_state

KEY = base64.b64encode(bytes(range(32))).decode()


class Tied(torch.nn.Module):
    """A tiny LM whose output layer shares the embedding's weight, as GPT-2 does."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.emb(idx)) * self.scale)


def _trained(seed: int = 0) -> tuple[Tied, torch.optim.Optimizer, object]:
    torch.manual_seed(seed)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    model(torch.arange(6).view(2, 3)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def _save(uri: str, tensors: dict, skeleton, *, step: int = 3, key: bool = False) -> None:
    enc = EncryptionConfig(key="env:ET_TEST_KEY") if key else None
    with CheckpointManager(CheckpointConfig(uri=uri, encryption=enc, async_save=False)) as mgr:
        mgr.save(tensors, skeleton, step=step, term=0)


def _save_state(uri: str, **objects) -> None:
    _save(uri, *ElasticState(objects).flatten())


def test_model_weights_load_into_a_fresh_module_with_ties_kept(tmp_path):
    model, opt, sched = _trained()
    uri = f"file://{tmp_path}/run"
    _save_state(uri, model=model, optimizer=opt, scheduler=sched, tokens=7)
    out = tmp_path / "model.safetensors"
    done = export_model(uri, str(out), "model")
    assert done.step == 3 and not done.folder
    weights = load_file(str(out))
    assert sorted(weights) == sorted(model.state_dict())  # only the model: no optimizer, RNG or step entries
    fresh = Tied()
    fresh.load_state_dict(weights)  # strict: every name, no prefix
    assert fresh.head.weight is fresh.emb.weight  # the module's own tie is untouched by the load
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    idx = torch.arange(8).view(2, 4)
    assert torch.equal(fresh(idx), model(idx))


def test_ddp_and_compile_prefixes_are_removed(tmp_path):
    model, _, _ = _trained()
    wrapped = {f"_orig_mod.module.{k}": v for k, v in model.state_dict().items()}  # compile(DDP(model))
    tensors, skeleton = flatten_state({"step": 5, "objects": {"net": wrapped}})
    uri = f"file://{tmp_path}/run"
    _save(uri, tensors, skeleton, step=5)
    out = tmp_path / "net.safetensors"
    assert main(["ckpt", "export", uri, str(out), "--model", "net"]) == 0
    assert sorted(load_file(str(out))) == sorted(model.state_dict())


def test_strip_wrapper_prefixes_only_when_every_name_has_it():
    t = torch.zeros(1)
    assert list(strip_wrapper_prefixes({"module.a": t, "module.b": t})) == ["a", "b"]
    assert list(strip_wrapper_prefixes({"module.a": t, "b": t})) == ["module.a", "b"]  # a submodule named module
    assert list(strip_wrapper_prefixes({"_orig_mod.module.x.w": t})) == ["x.w"]


def test_refusals_are_one_line_exit_1_and_write_nothing(tmp_path, capsys):
    model, opt, sched = _trained()
    uri = f"file://{tmp_path}/run"
    _save_state(uri, model=model, optimizer=opt, scheduler=sched, hf_config={"no_model_type": 1})
    out = tmp_path / "out"
    cases = [
        (["--model", "nope"], "UnknownStateEntry: the checkpoint has no state entry 'nope' (model): models: model;"),
        (["--model", "optimizer"], "NotExportable: state entry 'optimizer' is an optimizer's state, not a model's"),
        (["--model", "scheduler"], "NotExportable: state entry 'scheduler' is an LR scheduler's state"),
        (["--model", "model", "--hf-config", "hf_config"], "NotExportable: state entry 'hf_config' is not a transf"),
        (["--model", "model", "--hf-config", "cfg"], "UnknownStateEntry: the checkpoint has no state entry 'cfg'"),
        (["--hf-config", "hf_config"], "ValueError: --hf-config goes with --model NAME"),
    ]
    for flags, reason in cases:
        capsys.readouterr()
        assert main(["ckpt", "export", uri, str(out), *flags]) == 1, flags
        err = capsys.readouterr().err
        assert err.startswith(f"elastictrain ckpt: {reason}") and err.count("\n") == 1, (flags, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no OUT, no temporary


def test_a_checkpoint_saved_without_a_state_tree_is_refused(tmp_path):
    uri = f"file://{tmp_path}/run"
    _save(uri, {"w": torch.ones(2)}, None)
    with pytest.raises(NotExportable, match="export it without --model"):
        export_model(uri, str(tmp_path / "o.safetensors"), "model")


def test_existing_out_is_refused_without_force_and_replaced_with_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ET_TEST_KEY", KEY)
    first, _, _ = _trained(0)
    uri = f"file://{tmp_path}/run"
    enc = EncryptionConfig(key="env:ET_TEST_KEY")
    with CheckpointManager(CheckpointConfig(uri=uri, encryption=enc, async_save=False)) as mgr:
        mgr.save(*ElasticState({"model": first}).flatten(), step=1, term=0)
        second, _, _ = _trained(1)
        mgr.save(*ElasticState({"model": second}).flatten(), step=2, term=0)
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="--force"):
        export_model(uri, str(out), "model", keys=["env:ET_TEST_KEY"])
    assert out.read_bytes() == b"precious"
    export_model(uri, str(out), "model", step=1, keys=["env:ET_TEST_KEY"], overwrite=True)
    assert torch.equal(load_file(str(out))["emb.weight"], first.emb.weight)
    assert out.stat().st_mode & 0o777 == 0o600  # plaintext of an encrypted run: its owner's only
    with pytest.raises(UnknownStateEntry):
        export_model(uri, str(out), "nope", keys=["env:ET_TEST_KEY"], overwrite=True)
    assert torch.equal(load_file(str(out))["emb.weight"], first.emb.weight)  # a refusal leaves OUT as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "run"]


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")  # in the `test` extra; CI fails on any skip
    transformers.utils.logging.disable_progress_bar()  # its tqdm monitor thread would outlive the test
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers, transformers.AutoModelForCausalLM.from_config(config)


def test_hf_folder_loads_with_from_pretrained_and_gives_the_same_logits(tmp_path, monkeypatch):
    monkeypatch.setenv("ET_TEST_KEY", KEY)
    transformers, model = _tiny_gpt2()
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # the tied embedding moves too: the export must carry the trained value
    uri = f"file://{tmp_path}/run"
    enc = EncryptionConfig(key="env:ET_TEST_KEY")
    state = ElasticState({"model": model, "hf_config": model.config.to_dict()})
    with CheckpointManager(CheckpointConfig(uri=uri, encryption=enc, async_save=False)) as mgr:
        mgr.save(*state.flatten(), step=4, term=0)
    out = tmp_path / "hf"
    assert main(["ckpt", "export", uri, str(out), "--model", "model", "--hf-config", "hf_config",
                 "--key", "env:ET_TEST_KEY"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert out.stat().st_mode & 0o777 == 0o700 and (out / "model.safetensors").stat().st_mode & 0o777 == 0o600
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()  # re-tied
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx).logits, model(idx).logits, rtol=0, atol=0)
    # an existing folder: refused without --force; replaced with it only when it is an earlier export
    assert main(["ckpt", "export", uri, str(out), "--model", "model", "--hf-config", "hf_config",
                 "--key", "env:ET_TEST_KEY"]) == 1
    assert main(["ckpt", "export", uri, str(out), "--model", "model", "--hf-config", "hf_config",
                 "--key", "env:ET_TEST_KEY", "--force"]) == 0
    (out / "tokenizer.json").write_text("{}")
    assert main(["ckpt", "export", uri, str(out), "--model", "model", "--hf-config", "hf_config",
                 "--key", "env:ET_TEST_KEY", "--force"]) == 1
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]  # no temporary or moved-aside folder


def test_a_config_stored_as_a_json_string_works_too(tmp_path):
    _, model = _tiny_gpt2()
    uri = f"file://{tmp_path}/run"
    _save_state(uri, model=model, cfg=model.config.to_json_string())
    out = tmp_path / "hf"
    done = export_model(uri, str(out), "model", hf_config_entry="cfg")
    assert done.folder and json.loads((out / "config.json").read_text())["n_embd"] == 32


def test_an_out_that_appears_while_the_export_is_written_is_not_replaced(tmp_path):
    from elastictrain.checkpoint.export import install_file, install_folder

    tmp, out = tmp_path / "m.tmp", tmp_path / "m.safetensors"
    tmp.write_bytes(b"new")
    out.write_bytes(b"theirs")
    with pytest.raises(FileExistsError, match="--force"):
        install_file(str(tmp), str(out), overwrite=False)
    assert out.read_bytes() == b"theirs"
    folder = tmp_path / "hf.tmp"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    for theirs in (tmp_path / "a-folder", tmp_path / "a-file"):
        if theirs.name == "a-folder":
            theirs.mkdir()
            (theirs / "notes.txt").write_text("x")
        else:
            theirs.write_text("x")
        with pytest.raises(FileExistsError, match="--force"):
            install_folder(str(folder), str(theirs), overwrite=False)
    assert (tmp_path / "a-folder" / "notes.txt").read_text() == "x" and (tmp_path / "a-file").read_text() == "x"
