"""Sequential calibration: one decoder layer at a time, so peak memory does not grow with depth.

The inputs of decoder layer 0 (hidden states plus the keyword arguments the model passes every
layer: attention mask, position embeddings, ...) are caught with a pre-hook that stops the forward
pass, and kept on the CPU. Each layer is then materialized on the compute device, run over every
cached batch with :func:`smoothrot.calibrate.capture.capture_sites` hooks on that layer's sites, its
outputs replace the cache, and it is released again. Peak memory is one layer's weights, the
cached hidden states and the site records, whatever the number of layers. The records equal
those of the whole-model pass (``capture.capture_splits``): the same hooks see
the same tensors in the same order.

Weights come from a :class:`~smoothrot.calibrate.weights.LayerWeights` source
(:mod:`smoothrot.calibrate.weights`): resident in a loaded model, moved to the device and back,
or streamed layer by layer from a safetensors checkpoint into a model built on ``meta``, so the
model never sits in memory whole.

The same walk serves sequential GPTQ (:func:`gptq_sequential`): each site is rounded on the
inputs of the model quantized so far, and the quantized layer's output feeds the next layer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from smoothrot.arch.sites import ResolvedSite, architecture_of
from smoothrot.calibrate.capture import CaptureSpec, SiteRecord, StopForward, capture_sites
from smoothrot.calibrate.weights import LayerWeights, ResidentWeights, return_freed_memory
from smoothrot.core.gptq import GPTQChoice
from smoothrot.progress import progress
from smoothrot.schema.quant import QuantScheme
from smoothrot.surgery.hooks import transformed
from smoothrot.surgery.plan import SitePlan

log = logging.getLogger(__name__)

@dataclass
class _LayerInput:
    """One batch's input to a decoder layer, on the CPU: hidden states and the other arguments."""

    hidden: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class _LayerInputsCaught(Exception):
    """Raised by the pre-hook on layer 0: its inputs are all that is needed from the model."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.args, self.kwargs = args, kwargs


def _to(value: Any, device: torch.device | str) -> Any:
    """``value`` with every tensor inside (tuples, lists, dicts) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _home(model: nn.Module) -> torch.device:
    """Where the model's weights live (the CPU for a model on ``meta``)."""
    device = next(model.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device


@contextmanager
def _outside_layers(model: nn.Module, layers_path: str) -> Iterator[None]:
    """Detach the decoder layers for a while, so a weight source sees only the rest."""
    parent_name, _, leaf = layers_path.rpartition(".")
    parent = model.get_submodule(parent_name)
    layers = getattr(parent, leaf)
    setattr(parent, leaf, nn.ModuleList())
    try:
        yield
    finally:
        setattr(parent, leaf, layers)


def _check_shared_layer_inputs(model: nn.Module, seq_len: int) -> None:
    """Layer 0's inputs serve every layer only if all layers see the same attention mask."""
    config = model.config.get_text_config()
    kinds = sorted(set(getattr(config, "layer_types", None) or ()))
    window = getattr(config, "sliding_window", None)
    if len(kinds) > 1 and window is not None and seq_len > window:
        raise ValueError(
            f"sequential calibration reuses layer 0's attention mask for every layer, but "
            f"{type(model).__name__} mixes attention types {kinds} and seq_len={seq_len} exceeds "
            f"sliding_window={window}; set calibration.sequential: false or data.seq_len <= "
            f"{window}"
        )


def _catch_layer_inputs(model: nn.Module, layer0: nn.Module, windows: torch.Tensor,
                        batch_size: int, device: torch.device, name: str) -> list[_LayerInput]:
    """Run the model up to layer 0 on every batch; its inputs, offloaded to the CPU."""

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        raise _LayerInputsCaught(args, kwargs)

    cached = []
    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, windows.shape[0], batch_size):
            try:
                model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
            except _LayerInputsCaught as caught:
                args = _to(caught.args, "cpu")
                cached.append(_LayerInput(args[0], args[1:], _to(caught.kwargs, "cpu")))
            else:
                raise RuntimeError(
                    f"{name}.0 never ran in {type(model).__name__}'s forward pass; fix the "
                    "layers path of its table in smoothrot/arch/tables.py"
                )
    finally:
        handle.remove()
    return cached


def _sites_by_layer(sites: Sequence[ResolvedSite]) -> dict[int, list[ResolvedSite]]:
    """The sites of each decoder layer that has any, in table order."""
    by_layer: dict[int, list[ResolvedSite]] = {}
    for rs in sites:
        by_layer.setdefault(rs.layer_index, []).append(rs)
    return by_layer


def _run_layer(layer: nn.Module, batch: _LayerInput, device: torch.device) -> torch.Tensor:
    out = layer(batch.hidden.to(device), *_to(batch.args, device), **_to(batch.kwargs, device))
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def capture_sequential(
    model: nn.Module,
    sites: Sequence[ResolvedSite],
    specs: dict[str, CaptureSpec],
    batch_size: int,
    *,
    device: torch.device | str | None = None,
    weights: LayerWeights | None = None,
) -> dict[str, dict[str, SiteRecord]]:
    """Record every split one decoder layer at a time: ``{split: {site: SiteRecord}}``.

    ``device`` runs the layers (default: where the weights are); ``weights`` says where they
    are between runs (default: resident in the model, moved back after each layer). Layers after
    the last one holding a site never run.
    """
    if not sites:
        return {split: {} for split in specs}
    arch = architecture_of(model)
    layers = model.get_submodule(arch.layers)
    _check_shared_layer_inputs(model, max(spec.windows.shape[1] for spec in specs.values()))
    device = torch.device(device) if device is not None else _home(model)
    weights = weights if weights is not None else ResidentWeights(_home(model))
    by_layer = _sites_by_layer(sites)
    last = max(by_layer)
    log.info("sequential calibration: layers 0-%d of %s on %s, weights %s", last,
             type(model).__name__, device, weights)

    with _outside_layers(model, arch.layers):
        weights.materialize(model, "", device)
    try:
        cache = {split: _catch_layer_inputs(model, layers[0], spec.windows, batch_size, device,
                                            arch.layers)
                 for split, spec in specs.items()}
    finally:
        with _outside_layers(model, arch.layers):
            weights.release(model, "")

    records: dict[str, dict[str, SiteRecord]] = {split: {} for split in specs}
    for index in progress(range(last + 1), desc="sequential calibration"):
        layer, prefix = layers[index], f"{arch.layers}.{index}."
        weights.materialize(layer, prefix, device)
        try:
            for split, spec in specs.items():
                with capture_sites(by_layer.get(index, []), total_tokens=spec.total_tokens,
                                   keep_index=spec.keep_index, quantiles=spec.quantiles,
                                   stop_forward=False) as recorded:
                    for batch in cache[split]:
                        batch.hidden = _run_layer(layer, batch, device).cpu()
                records[split].update(recorded)
        finally:
            weights.release(layer, prefix)
            return_freed_memory()
    return records


@dataclass
class LayerStep:
    """One step of :func:`walk_layers`: a decoder layer, its sites and the cached inputs of the
    model quantized so far, per split. ``done`` is filled by the caller with the plans of the
    layer's sites; the walk then runs the layer with them (``transformed``) into the next one."""

    index: int
    layer: nn.Module
    sites: list[ResolvedSite]
    inputs: dict[str, list[_LayerInput]]
    device: torch.device
    done: dict[str, SitePlan]
    # With ``walk_layers(float_stream=True)``: this layer's input and output as the *float* model
    # computes them (no layer quantized), per split and batch, e.g. to fit a layer against it.
    float_inputs: dict[str, list[_LayerInput]] | None = None
    float_outputs: dict[str, list[torch.Tensor]] | None = None

    def run(self, batch: _LayerInput) -> torch.Tensor:
        """The layer's output on one cached batch, with whatever hooks are active."""
        return _run_layer(self.layer, batch, self.device)


def walk_layers(
    model: nn.Module,
    sites: Sequence[ResolvedSite],
    scheme: QuantScheme,
    specs: dict[str, CaptureSpec],
    batch_size: int,
    desc: str,
    float_stream: bool = False,
) -> Iterator[LayerStep]:
    """Walk the decoder layers in order over cached hidden states of every split, each layer fed
    the output of the ones before it *as quantized*: after the caller has filled
    ``step.done`` with the layer's plans, the layer runs with them applied (weights and
    activations quantized as ``scheme`` says) and its output becomes the next layer's input.
    Layers after the last one holding a site never run. Every rank runs the whole walk.
    ``float_stream`` also carries the float model's hidden states (``step.float_inputs``,
    ``step.float_outputs``)."""
    if not sites:
        return
    arch = architecture_of(model)
    layers = model.get_submodule(arch.layers)
    _check_shared_layer_inputs(model, max(spec.windows.shape[1] for spec in specs.values()))
    device = _home(model)
    by_layer = _sites_by_layer(sites)
    with torch.no_grad():
        cache = {split: _catch_layer_inputs(model, layers[0], spec.windows, batch_size, device,
                                            arch.layers)
                 for split, spec in specs.items()}
    floats = ({split: [replace(batch, hidden=batch.hidden.clone()) for batch in batches]
               for split, batches in cache.items()} if float_stream else {})
    for index in progress(range(max(by_layer) + 1), desc=desc):
        step = LayerStep(index, layers[index], by_layer.get(index, []), cache, device, {})
        if float_stream:  # before the caller touches the layer: its float output
            step.float_inputs = floats
            with torch.no_grad():
                step.float_outputs = {split: [step.run(batch).cpu() for batch in batches]
                                      for split, batches in floats.items()}
        yield step
        for split, outputs in (step.float_outputs or {}).items():
            for batch, hidden in zip(floats[split], outputs, strict=True):
                batch.hidden = hidden
        with torch.no_grad(), transformed(step.sites, step.done, scheme):
            for batches in cache.values():
                for batch in batches:
                    batch.hidden = step.run(batch).cpu()


def _site_rows(step: LayerStep, sites: Sequence[ResolvedSite], specs: dict[str, CaptureSpec],
               inputs: dict[str, list[_LayerInput]]) -> dict[str, dict[str, torch.Tensor]]:
    """Each site's input rows per split (``{site: {split: rows}}``), from one run of the layer
    on ``inputs`` with whatever hooks are active (it stops after the last of ``sites``)."""
    rows: dict[str, dict[str, torch.Tensor]] = {rs.name: {} for rs in sites}
    for split, spec in specs.items():
        with capture_sites(sites, total_tokens=spec.total_tokens,
                           keep_index=spec.keep_index) as recorded:
            for batch in inputs[split]:
                with suppress(StopForward):
                    step.run(batch)
        for rs in sites:
            rows[rs.name][split] = recorded[rs.name].tokens()
    return rows


# round_site(site, calibration rows, selection rows, float rows or None, token weights or None)
RoundSite = Callable[
    [ResolvedSite, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None,
     tuple[torch.Tensor, torch.Tensor] | None],
    GPTQChoice]


@torch.no_grad()
def residual_token_weights(step: LayerStep, specs: dict[str, CaptureSpec]
                           ) -> dict[str, torch.Tensor]:
    """Per split, one weight per kept row: 1 / ||layer output||² of its token, scaled to mean 1
    over the split's tokens (the float layer on the walk's inputs).

    A site whose output stays with its token adds its error to that token's residual stream,
    which the next norm divides by the stream's size: the error that counts is relative to it.
    A few tokens (attention sinks) carry thousands of times the others' squared norm, and
    unweighted they decide a whole Hessian (SmolLM2 layer 11's down_proj: 89 % of its trace
    from the first token of each window).
    """
    weights = {}
    for split, spec in specs.items():
        size = torch.cat([step.run(batch).float().pow(2).sum(dim=-1).reshape(-1).cpu()
                          for batch in step.inputs[split]])
        inverse = 1.0 / size.clamp_min(torch.finfo(size.dtype).tiny)
        inverse = inverse / inverse.mean()
        weights[split] = inverse if spec.keep_index is None else inverse[spec.keep_index]
    return weights


@torch.no_grad()
def gptq_sequential(
    model: nn.Module,
    sites: Sequence[ResolvedSite],
    plans: Mapping[str, SitePlan],
    scheme: QuantScheme,
    specs: dict[str, CaptureSpec],
    batch_size: int,
    round_site: RoundSite,
    float_target: bool = False,
    token_weights: bool = False,
) -> dict[str, GPTQChoice]:
    """GPTQ site by site on the inputs of the model quantized so far (GPTQ's "sequential" mode).

    Per-site GPTQ on the float model's inputs rounds every linear for an input it will never
    see: upstream layers are quantized too, and their error grows with depth. Here the decoder
    layers run one at a time over cached hidden states (:func:`walk_layers`); inside a layer
    each site in turn (table order: q/k/v, o, gate/up, down) is captured with the sites before
    it already quantized (weights *and* activations, as ``scheme`` says), rounded by
    ``round_site(site, calibration rows, selection rows, float rows, token weights)``, and the
    layer's quantized output becomes the next layer's input. ``specs`` holds the ``calibration``
    and ``selection`` splits. With ``float_target`` the float model's rows at the same tokens
    (calibration, selection) are captured too and passed on; otherwise None. With
    ``token_weights`` the sites that do not mix tokens get :func:`residual_token_weights`.
    """
    choices: dict[str, GPTQChoice] = {}
    for step in walk_layers(model, sites, scheme, specs, batch_size, "sequential GPTQ",
                            float_stream=float_target):
        choices.update(round_layer(step, plans, scheme, specs, round_site, float_target,
                                   token_weights))
    return choices


@torch.no_grad()
def round_layer(
    step: LayerStep,
    plans: Mapping[str, SitePlan],
    scheme: QuantScheme,
    specs: dict[str, CaptureSpec],
    round_site: RoundSite,
    float_target: bool = False,
    token_weights: bool = False,
) -> dict[str, GPTQChoice]:
    """GPTQ of one walk step's sites in table order, each captured with the sites before it
    rounded (``step.done`` holds their rounded plans afterwards); with ``float_target`` the float
    model's rows at the same tokens are passed on (the walk must carry the float stream), with
    ``token_weights`` the :func:`residual_token_weights` of sites that keep to their token."""
    choices: dict[str, GPTQChoice] = {}
    weights = residual_token_weights(step, specs) if token_weights and step.sites else None
    float_rows = None
    if float_target:
        if step.float_inputs is None:
            raise ValueError("a float-model target needs the float stream: "
                             "walk_layers(float_stream=True)")
        # the float layer does not change as sites are rounded: one run captures every site
        float_rows = _site_rows(step, step.sites, specs, step.float_inputs)
    for rs in step.sites:
        with transformed(step.sites, step.done, scheme):
            rows = _site_rows(step, [rs], specs, step.inputs)[rs.name]
        floats = None
        if float_rows is not None:
            floats = (float_rows[rs.name]["calibration"], float_rows[rs.name]["selection"])
        site_weights = (None if weights is None or rs.site.mixes_tokens
                        else (weights["calibration"], weights["selection"]))
        choices[rs.name] = round_site(rs, rows["calibration"], rows["selection"], floats,
                                      site_weights)
        step.done[rs.name] = replace(plans[rs.name], weight_q=choices[rs.name].weight_q)
    return choices
