"""Hugging Face export and import of our checkpoints.

``export_checkpoint`` turns a checkpoint into a directory that transformers loads (model.safetensors,
config.json, generation_config.json, tokenizer files). Checkpoints are keyed by global parameter names, so one
saved under any parallel layout exports the same. The architecture follows from the model config:

  ours                                                              Hugging Face
  pre-norm RMSNorm, SwiGLU, dense FFN (LayerNorm Scaling folded     LlamaForCausalLM
    into the norms, structured FFNs pre-merged to dense)
  the same with MoE in every block: top-k softmax router, no        MixtralForCausalLM
    shared experts, dropless (capacity_factor 0)
  the same with shared experts, or MoE on every n-th block          Qwen2MoeForCausalLM
  anything else (post / mix / sandwich, LayerNorm, DyT, GELU,       PretrainForCausalLM: custom code written
    noisy top-k, hash, capacity > 0, keep_structured=True)            into the directory (trust_remote_code)

Every mapping is exact: the exported model computes our logits up to float rounding.

``import_checkpoint`` reads a Llama or Mixtral directory into ``OUT/step_0000000``, a normal checkpoint (fresh
AdamW state, resolved config.yaml) that training resumes from under any layout and ``pretrain.load_model`` reads.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pretrain.api import load_model
from pretrain.config import ModelConfig, RunConfig, load_config
from pretrain.convert import custom, llama, mixtral, qwen2_moe
from pretrain.errors import UserError
from pretrain.models.block import is_moe_block, placement
from pretrain.paths import require_writable_dir
from pretrain.train import checkpoint

EXPORTERS = {"llama": llama.export, "mixtral": mixtral.export, "qwen2_moe": qwen2_moe.export}
IMPORTERS = {"llama": llama.import_model, "mixtral": mixtral.import_model}


def _require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("Hugging Face conversion needs the `transformers` library: pip install -e '.[hf]'.") from None


def architecture(m: ModelConfig, keep_structured: bool = False) -> str:
    """Which export represents this model exactly: llama, mixtral, qwen2_moe or custom."""
    blocks = range(m.num_layers)
    keeps_structured = keep_structured and m.ffn.kind != "dense" and m.ffn.dense_blocks < m.num_layers
    if (m.norm != "rmsnorm" or {placement(m, i) for i in blocks} != {"pre"} or m.ffn.activation != "swiglu"
            or keeps_structured):
        return "custom"
    moe_blocks = [i for i in blocks if is_moe_block(m, i)]
    if not moe_blocks:
        return "llama"
    if m.moe.router != "topk_softmax" or m.moe.capacity_factor > 0:
        return "custom"
    if m.moe.num_shared_experts or len(moe_blocks) < m.num_layers:
        return "qwen2_moe"
    return "mixtral"


class ExportWarning(UserWarning):
    """An export written without something it usually holds (the CLI prints it as one line)."""


EXPORT_FILES = {"model.safetensors", "config.json", "generation_config.json", "tokenizer.model", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "modeling_pretrain.py"}  # what an export writes


def is_export(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds an earlier export and nothing else (a re-export replaces it)."""
    names = {p.name for p in out_dir.iterdir()} if out_dir.is_dir() else set()
    return "model.safetensors" in names and names <= EXPORT_FILES


def replace_export(out_dir: Path, write: Callable[[Path], Path]) -> Path:
    """``write`` an export next to the earlier one in ``out_dir``, then put it in its place: a failed export leaves
    the earlier one whole, and no file of it (say, custom modeling code) stays beside the new one."""
    out_dir = out_dir.resolve()  # (`.` has no name to stage beside)
    fresh = out_dir.with_name(f".{out_dir.name}.new")
    shutil.rmtree(fresh, ignore_errors=True)
    try:
        write(fresh)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    for old in out_dir.iterdir():
        old.unlink()
    for new in fresh.iterdir():
        new.rename(out_dir / new.name)
    fresh.rmdir()
    return out_dir


def require_new_dir(out_dir: str | Path, verb: str) -> None:
    """An output directory must be new or empty: files already there would be overwritten or mixed with ours."""
    out = Path(out_dir)
    if not out.is_dir():
        return  # (missing: created later; a file of that name is refused then)
    names = sorted(p.name for p in out.iterdir())
    if "config.yaml" in names or "checkpoints" in names or checkpoint.complete_checkpoints(out):
        raise UserError(f"'{out}' already holds a run; {verb} into a new directory.")
    if names:
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        again = " (an earlier export alone is replaced)" if verb == "export" else ""
        raise UserError(f"'{out}' already holds files ({shown}); {verb} into a new or empty directory{again}.")


def _keep_structured(model: nn.Module) -> None:
    """Replace each self-guided wrapper by its structured layer, which is all it computes once the guide is gone."""
    from pretrain.models.structured import SelfGuided

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SelfGuided):
                if child.has_guide:
                    raise UserError("this checkpoint is still in its self-guided phase (dense guides present), "
                                    "so its FFN is not the structured layer alone: export it pre-merged "
                                    "(without --keep-structured), or from a checkpoint after the guided steps.")
                setattr(parent, name, child.structured)


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, *, keep_structured: bool = False) -> Path:
    """Write the Hugging Face export of a checkpoint (or of a run directory's newest one) into ``out_dir``."""
    from pretrain.models.structured import premerge

    _require_transformers()
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from pretrain.convert.tokenizer import export_tokenizer
    from pretrain.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, model_path

    step_dir = checkpoint.resolve(Path(checkpoint_dir))
    cfg = load_config(step_dir / "config.yaml")
    tokenizer = _tokenizer_file(step_dir, cfg)
    model = load_model(step_dir)
    kind = architecture(cfg.model, keep_structured)
    with torch.no_grad():
        if kind == "custom" and keep_structured:
            _keep_structured(model)
            config, tensors = custom.export(cfg, model, keep_structured=True)
        else:
            premerge(model)
            config, tensors = (custom.export(cfg, model, keep_structured=False) if kind == "custom"
                               else EXPORTERS[kind](cfg, model))
    out = require_writable_dir(out_dir, "the export's output directory")
    # Copies: tied or sliced tensors share storage, which safetensors refuses to write.
    save_file({name: t.detach().clone().contiguous() for name, t in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    if tokenizer is not None:  # the special ids are the tokenizer's own (an imported Llama tokenizer has no pad)
        ids = export_tokenizer(tokenizer, out, cfg.data.seq_len)
    else:
        ids = {"bos": BOS_ID, "eos": EOS_ID, "pad": PAD_ID}
        warnings.warn(f"'{step_dir}' names no tokenizer that exists ('{model_path(cfg.tokenizer)}'), so {out} holds "
                      "the model without tokenizer files; put the sentencepiece model it goes with at that path and "
                      "export again.", ExportWarning, stacklevel=2)
    special = {f"{name}_token_id": ids.get(name) for name in ("bos", "eos", "pad")}
    config.update(special)
    config.save_pretrained(out)
    if kind == "custom":
        shutil.copyfile(custom.MODELING_FILE, out / custom.MODELING_FILE.name)
    GenerationConfig(**special, **({"use_cache": False} if kind == "custom" else {})).save_pretrained(out)
    return out


def _tokenizer_file(step_dir: Path, cfg: RunConfig) -> Path | None:
    """The tokenizer file the checkpoint's run used, or None when it has none to give (a run on pre-tokenized data,
    a model imported without one, a checkpoint older than the record: exported without, with a warning). A run
    that recorded its tokenizer's digest and whose tokenizer is gone is refused before anything is written."""
    from pretrain.data.tokenizer import model_path

    path = model_path(cfg.tokenizer)
    if path.is_file():
        return path
    if not checkpoint.read_state(step_dir).get("tokenizer"):
        return None
    key = f"tokenizer.name {cfg.tokenizer.name}" if cfg.tokenizer.name else "tokenizer.path"
    fix = ("the path is relative: run the export from the directory the training ran in" if not path.is_absolute()
           else "restore that file and export again")
    raise UserError(f"the tokenizer '{path}' this run trained with ({key} in {step_dir / 'config.yaml'}) does not "
                    f"exist, and the export needs it (tokenizer files, special ids); {fix}.")


def _read_safetensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"'{hf_dir}' holds no *.safetensors weights; re-save the model with transformers' "
                        "save_pretrained (safetensors is its default) and import that directory.")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors.update(load_file(str(file)))
        except SafetensorError as e:
            raise UserError(f"'{file}' is not a readable safetensors file ({e}); save the model again with "
                            "save_pretrained, or copy the file again.") from None
    return tensors


def import_checkpoint(hf_dir: str | Path, out_checkpoint: str | Path) -> Path:
    """Write a Llama or Mixtral directory as ``out_checkpoint/step_0000000`` (model, fresh AdamW state,
    config.yaml, also copied to ``out_checkpoint/config.yaml``); a sentencepiece ``tokenizer.model`` is
    copied along, and tokenizer.path names ``out_checkpoint/tokenizer.model`` (with or without one). Returns the
    step directory."""
    from pretrain.models.transformer import build_model
    from pretrain.train.optim import build_optimizer

    hf_dir, out = Path(hf_dir), Path(out_checkpoint)
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"'{hf_dir}' has no config.json: pass a Hugging Face model directory (save_pretrained).")
    require_new_dir(out, "import")
    try:  # read as plain JSON first: nothing in the directory (custom code, auto_map) is ever run
        model_type = json.loads((hf_dir / "config.json").read_text()).get("model_type")
    except (ValueError, AttributeError) as e:
        raise UserError(f"'{hf_dir / 'config.json'}' is not a JSON object ({e}); pass a Hugging Face model "
                        "directory written by save_pretrained.") from None
    if model_type not in IMPORTERS:
        raise UserError(f"cannot import model_type '{model_type}': supported are {', '.join(IMPORTERS)}. Import never "
                        "runs a model's own code.")
    require_writable_dir(out, "the import's output directory")
    _require_transformers()
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(hf_dir, trust_remote_code=False)
    tensors = _read_safetensors(hf_dir)
    held = {int(name.split(".")[2]) for name in tensors if name.startswith("model.layers.")
            and name.split(".")[2].isdigit()}
    if held and max(held) + 1 > hf.num_hidden_layers:  # the importer reads the config's layers and would drop the rest
        raise UserError(f"the weights of '{hf_dir}' hold {max(held) + 1} layers, but its config.json says "
                        f"num_hidden_layers={hf.num_hidden_layers}; import a directory whose config.json was saved "
                        "with these *.safetensors (save_pretrained writes both).")
    try:
        model_cfg, state = IMPORTERS[hf.model_type](hf, tensors)
    except KeyError as e:
        raise UserError(f"'{hf_dir}' lacks the tensor {e} that its config.json implies; the weights are "
                        "incomplete or from another model.") from None
    # tokenizer.path names OUT/tokenizer.model even when the directory has none: never the default
    # cache/tokenizer.model, which may hold another model's tokenizer
    cfg = RunConfig(model=model_cfg).replace(tokenizer={"path": str((out / "tokenizer.model").resolve())})
    cfg.validate()
    model = build_model(cfg.model, cfg.train.seed)
    try:
        model.load_state_dict({name: t.to(torch.float32) for name, t in state.items()}, strict=True)
    except RuntimeError as e:  # a tensor name or shape that config.json does not imply
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e)).rstrip(".")
        raise UserError(f"the weights of '{hf_dir}' do not match its config.json ({detail}); import a directory "
                        "whose config.json was saved with these *.safetensors (save_pretrained writes both).") from None
    if (hf_dir / "tokenizer.model").is_file():  # (after the checks: a refused import leaves OUT empty)
        shutil.copyfile(hf_dir / "tokenizer.model", out / "tokenizer.model")
    optimizer = build_optimizer(model, cfg.optim)
    (out / "config.yaml").write_text(cfg.to_yaml())
    return checkpoint.save(out, 0, lambda directory: checkpoint.save_dcp(directory, model, optimizer),
                           {"step": 0, "consumed_samples": 0, "tokens": 0}, cfg.to_yaml(), keep=1)
