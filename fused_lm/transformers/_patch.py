"""``apply_fused_lm``: one line to put fused_lm's attention, loss and linear cross-entropy into a
transformers model instance, or into every model of a family built afterwards."""

from __future__ import annotations

import functools
import importlib
import types
from typing import Optional

import torch

from fused_lm.transformers._attention import register
from fused_lm.transformers._compat import transformers as _transformers
from fused_lm.transformers._loss import causal_lm_loss, fused_forward

ATTN_IMPLEMENTATION = "fused_lm"

# model_type -> (modeling module, *PreTrainedModel class, *ForCausalLM class). Each was read and
# tested: attention through AttentionInterface with the keywords attention_forward handles
# (Gemma 2: softcap and sliding_window; Mistral, Qwen 2/3: sliding_window), the loss through
# self.loss_function, and a ForCausalLM.forward of the shape fused_forward replaces
# (base model -> last_hidden_state -> slice by logits_to_keep -> lm_head [-> final softcap]).
SUPPORTED_MODEL_TYPES = {
    "llama": ("llama", "LlamaPreTrainedModel", "LlamaForCausalLM"),
    "mistral": ("mistral", "MistralPreTrainedModel", "MistralForCausalLM"),
    "qwen2": ("qwen2", "Qwen2PreTrainedModel", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3PreTrainedModel", "Qwen3ForCausalLM"),
    "gemma2": ("gemma2", "Gemma2PreTrainedModel", "Gemma2ForCausalLM"),
}


def _unsupported(model_type) -> ValueError:
    return ValueError(
        f"fused_lm.transformers.apply_fused_lm supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; "
        f"got {model_type!r}. For attention alone, any model whose attention goes through "
        "transformers' AttentionInterface can use fused_lm: call fused_lm.transformers.register(), "
        "then model.set_attn_implementation('fused_lm') or from_pretrained(..., "
        "attn_implementation='fused_lm').")


def _classes(model_type: str):
    module_name, base_name, lm_name = SUPPORTED_MODEL_TYPES[model_type]
    module = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    return getattr(module, base_name), getattr(module, lm_name)


def _stock_forward(cls):
    forward = cls.forward
    return getattr(forward, "_fused_lm_stock", forward)


def _set_attention(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name
    if model.config._attn_implementation != name:
        raise RuntimeError(f"{type(model).__name__} did not accept attn_implementation={name!r} "
                           f"(it kept {model.config._attn_implementation!r})")


def _is_ours(loss) -> bool:
    return loss is causal_lm_loss or getattr(loss, "func", None) is causal_lm_loss


def _patch_instance(model, options: dict, *, during_init: bool = False) -> None:
    """Applies ``options`` to one model (and its base model, which shares the config)."""
    if options["attention"]:
        if during_init:
            model.config._attn_implementation = ATTN_IMPLEMENTATION
        else:
            _set_attention(model, ATTN_IMPLEMENTATION)
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return
    _, lm_cls = _classes(model_type)
    if not isinstance(model, lm_cls):
        if options["linear_cross_entropy"] and not during_init:
            raise ValueError(f"apply_fused_lm(linear_cross_entropy=True) needs the causal LM "
                             f"({lm_cls.__name__}), got {type(model).__name__}")
        return
    if options["cross_entropy"]:
        loss = causal_lm_loss if not options["z_loss"] else functools.partial(
            causal_lm_loss, z_loss=options["z_loss"])
        model.loss_function = loss                     # the property setter of PreTrainedModel
    elif _is_ours(vars(model).get("_loss_function")):
        del model._loss_function                       # an earlier apply_fused_lm(cross_entropy=True)
    model._fused_lm_options = dict(options)
    if options["linear_cross_entropy"]:
        stock = _stock_forward(type(model))
        model.forward = types.MethodType(fused_forward(stock), model)
    elif "forward" in vars(model) and hasattr(vars(model)["forward"], "_fused_lm_stock"):
        del model.forward                              # an earlier apply_fused_lm(linear...=True)


# model_type -> options, read by the post_init hook of patched families (so a later call updates them)
_CLASS_OPTIONS: dict[str, dict] = {}


def _patch_family(model_type: str, options: dict) -> None:
    base, _ = _classes(model_type)
    _CLASS_OPTIONS[model_type] = dict(options)
    if getattr(base.post_init, "_fused_lm_hook", False):
        return
    original = base.post_init

    @functools.wraps(original)
    def post_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        opts = _CLASS_OPTIONS.get(getattr(self.config, "model_type", None))
        if opts is not None:
            _patch_instance(self, opts, during_init=True)

    post_init._fused_lm_hook = True
    base.post_init = post_init


def apply_fused_lm(model: Optional[torch.nn.Module] = None, *, model_type: Optional[str] = None,
                   attention: bool = True, cross_entropy: bool = True,
                   linear_cross_entropy: bool = False, z_loss: float = 0.0):
    """Puts fused_lm into a transformers causal LM; returns ``model``.

    With a model instance (Llama, Mistral, Qwen2, Qwen3, Gemma 2) it patches that instance only:

    * ``attention``: its attention implementation becomes ``"fused_lm"`` (``register()`` is done
      here): ``attention_forward`` with the mask function that hands padding to the kernel as a
      2-D key mask (unpadded into packed sequences) and packing as ``cu_seqlens``;
    * ``cross_entropy``: its ``loss_function`` becomes ``causal_lm_loss`` (with ``z_loss``);
    * ``linear_cross_entropy``: its ``forward`` computes the loss with ``linear_cross_entropy``
      from the last hidden states in training when labels are given (``logits=None``; honours
      ``num_items_in_batch``, ``shift_labels``, ``logits_to_keep`` and the config's
      ``final_logit_softcapping``), and is the stock forward otherwise (eval, generation).

    With ``model=None`` and ``model_type`` it patches the family's classes instead, so every model
    of that type built afterwards (``from_config``, ``from_pretrained``) gets the same, like
    Liger's class patching. Calling it again replaces the options. Unsupported model types raise
    ValueError naming the supported ones.
    """
    _transformers()
    options = dict(attention=bool(attention), cross_entropy=bool(cross_entropy),
                   linear_cross_entropy=bool(linear_cross_entropy), z_loss=float(z_loss))
    if z_loss < 0:
        raise ValueError(f"apply_fused_lm: z_loss must be >= 0, got {z_loss}")
    if model is None:
        if model_type is None:
            raise ValueError("apply_fused_lm: pass a model, or model_type= to patch a model family")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise _unsupported(model_type)
        if attention:
            register(ATTN_IMPLEMENTATION)
        _patch_family(model_type, options)
        return None
    config = getattr(model, "config", None)
    actual = getattr(config, "model_type", None)
    if actual not in SUPPORTED_MODEL_TYPES:
        raise _unsupported(actual if actual is not None else type(model).__name__)
    if model_type is not None and model_type != actual:
        raise ValueError(f"apply_fused_lm: model_type={model_type!r} but the model is {actual!r}")
    if attention:
        register(ATTN_IMPLEMENTATION)
    _patch_instance(model, options)
    return model
