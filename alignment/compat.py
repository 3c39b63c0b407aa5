"""Everything the suite takes from TRL / transformers / peft that moves between releases, kept in one place.

Pinned: trl 1.16, transformers 5.23, peft 0.21. When one of these moves, fix it here only: public names, the private
methods the DPO trainer overrides, the KV-cache layout, the chat-template renderer and TRL's config helpers.
"""

from __future__ import annotations

import importlib

# TRL's names, imported on first use (module __getattr__ below): importing every trainer costs seconds, and most
# commands need one or two of them
_LAZY = {
    **{n: "trl" for n in ("DPOConfig", "DPOTrainer", "GRPOConfig", "GRPOTrainer", "ModelConfig", "RewardConfig", "RewardTrainer",
                          "RLOOConfig", "RLOOTrainer", "SFTConfig", "SFTTrainer", "TrlParser")},
    "get_peft_config": "trl.trainer.utils", "get_quantization_config": "trl.trainer.utils",
    "get_last_checkpoint": "transformers.trainer_utils",
}

# DPO loss types TRL 1.16 implements (DPOConfig.loss_type); checked up front so a typo is a config error, not a
# stack trace in the middle of training.
DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool, **special_tokens):
    """Render one conversation with transformers' jinja renderer: (text, [(start, end) of each generation span])."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, spans = render_jinja_template(conversations=[messages], chat_template=template, return_assistant_tokens_mask=True,
                                            add_generation_prompt=add_generation_prompt, **special_tokens)
    return rendered[0], spans[0]


def numpy_safe_globals():
    """The context in which transformers loads its trainer checkpoints with weights_only=True: numpy arrays and dtypes
    (the RNG state) allowed, nothing that runs code."""
    from transformers.trainer_pt_utils import safe_globals

    return safe_globals()


def cache_layers(past_key_values) -> list[tuple]:
    """(keys, values) per layer of a model's returned KV cache (transformers 5: a Cache with `.layers`)."""
    return [(layer.keys, layer.values) for layer in past_key_values.layers]


def make_cache(layers: list[tuple]):
    """A KV cache from (keys, values) per layer, to pass as `past_key_values`."""
    from transformers import DynamicCache

    return DynamicCache(layers)


def _build(name: str):
    """The suite's subclasses of TRL classes, each defined when first used: a base imports only when it is needed."""
    if name == "StrictTrlParser":
        return _strict_parser()
    if name == "PretokenizedDPOTrainer":
        return _pretokenized_dpo_trainer()
    return _safe_online_trainer(name)


def _pretokenized_dpo_trainer():
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer for rows we already tokenized (special-token safe), with reference log-probs from a disk cache.

        Two overrides of TRL 1.16 private methods: `_prepare_dataset` keeps our token ids (TRL would re-render text with
        the tokenizer, turning a literal "<|im_end|>" in the data into the control token), and `_precompute_ref_logps`
        reads / writes `ref_cache` around TRL's reference pass (TRL keys in-memory datasets by a random fingerprint, and
        its arrow cache of them sits in a per-process temp directory the other processes of a launch cannot read).
        `ref_cache` has load(name, fingerprint) -> (chosen, rejected) | None and save(name, fingerprint, chosen, rejected)."""

        def __init__(self, *args, ref_cache, data_fingerprints: dict[str, str], **kwargs):
            self.ref_cache = ref_cache
            self.data_fingerprints = data_fingerprints
            super().__init__(*args, **kwargs)

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

        def _precompute_ref_logps(self, dataset, name, batch_size):
            fp = self.data_fingerprints[name]
            cached = self.ref_cache.load(name, fp)
            if cached is None or len(cached[0]) != len(dataset):
                cached = self._reference_pass(dataset, batch_size)
                self.ref_cache.save(name, fp, *cached)
            return dataset.add_column("ref_chosen_logps", cached[0].tolist()).add_column("ref_rejected_logps", cached[1].tolist())

        def _reference_pass(self, dataset, batch_size):
            """TRL 1.16's reference pass, kept in memory: each process scores its share of the batches in order, and the
            gathered (chosen, rejected) log-probs, one per row, are the same on every process."""
            import torch
            from torch.utils.data import DataLoader
            from trl.models import prepare_deepspeed

            loader = self.accelerator.prepare(DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False,
                                                         num_workers=self.args.dataloader_num_workers,
                                                         pin_memory=self.args.dataloader_pin_memory))
            model = self.ref_model or self.model
            if self.ref_model is None and self.is_deepspeed_enabled:  # ZeRO-3 weights are sharded: an engine gathers them
                if self._precompute_engine is None:
                    self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
                model = self._precompute_engine
            chosen, rejected = [], []
            for batch in loader:
                c, r = self.accelerator.gather_for_metrics(self.compute_ref_log_probs(model, batch))
                chosen.append(c.cpu())
                rejected.append(r.cpu())
            return torch.cat(chosen), torch.cat(rejected)

    return PretokenizedDPOTrainer


def _safe_online_trainer(name: str):
    import trl

    class _SafePromptIds:
        """Overrides TRL 1.16's private `_tokenize_prompts` of the online trainers: prompt ids come from our
        special-token-safe `encode_chat` (TRL would render data text with apply_chat_template, so a user message holding
        "<|im_start|>assistant" would forge a turn). Prompts are always message lists here (text-only models)."""

        def _tokenize_prompts(self, prompts: list):
            from .tokens import encode_chat

            return [encode_chat(self.processing_class, p, add_generation_prompt=True)["input_ids"] for p in prompts], None, {}

    base = getattr(trl, name.removeprefix("Safe"))  # GRPOTrainer or RLOOTrainer
    return type(name, (_SafePromptIds, base), {"__doc__": f"{base.__name__} whose prompt ids are special-token safe."})


def _strict_parser():
    from trl import TrlParser

    class StrictTrlParser(TrlParser):
        """TrlParser that reports errors as UserError (one line, not argparse's usage and exit) and lets a dataclass field
        carry our own `range` metadata (transformers' parser passes every metadata key on to argparse)."""

        def error(self, message):
            from .errors import UserError

            raise UserError(f"command line: {message}")

        @staticmethod
        def _parse_dataclass_field(parser, field):
            import copy
            import types

            if "range" in field.metadata:
                field = copy.copy(field)
                field.metadata = types.MappingProxyType({k: v for k, v in field.metadata.items() if k != "range"})
            return TrlParser._parse_dataclass_field(parser, field)

    return StrictTrlParser


_SUBCLASSES = ("PretokenizedDPOTrainer", "SafeGRPOTrainer", "SafeRLOOTrainer", "StrictTrlParser")


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBCLASSES:
        value = _build(name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # once
    return value
