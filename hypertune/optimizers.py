"""Optimizers, schedules and trainability masks (gin-configurable optax factories).

Trainability is decided by regular expressions on '/'-joined parameter paths, e.g.
``downstream/encoder/layers_0/attention/query/kernel``.  Frozen parameters go through
``optax.set_to_zero`` inside ``optax.multi_transform``: their updates are exactly zero and
they get *no* optimizer state (no Adam moments, no Adafactor statistics).

The learning rate is injected with ``optax.inject_hyperparams`` so the value actually
used at a step can be read back from the state (:func:`learning_rate_from_state`) for
logging.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import gin
import jax
import numpy as np
import optax
from flax.core import meta

from hypertune import quantized_adam

__all__ = [
    "constant",
    "linear_warmup_decay",
    "adafactor",
    "adamw",
    "adamw_8bit",
    "param_paths",
    "trainable_mask",
    "make_optimizer",
    "learning_rate_from_state",
    "parameter_table",
]

Schedule = Callable[[Any], Any]
LearningRate = Union[float, Schedule]

TRAINABLE = "trainable"
FROZEN = "frozen"


# --------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------


@gin.configurable
def constant(value: float = 1e-3) -> Schedule:
    """Constant learning rate (HINT's Adafactor uses 1e-3)."""
    return optax.constant_schedule(float(value))


@gin.configurable
def linear_warmup_decay(
    peak_value: float = 1e-3,
    warmup_steps: int = 1000,
    total_steps: int = 10000,
    end_value: float = 0.0,
    init_value: float = 0.0,
) -> Schedule:
    """Linear warm-up from ``init_value`` to ``peak_value`` over ``warmup_steps``, then linear
    decay to ``end_value`` at ``total_steps`` (constant ``end_value`` afterwards)."""
    if total_steps < warmup_steps:
        raise ValueError(f"total_steps ({total_steps}) must be >= warmup_steps ({warmup_steps})")
    warm = optax.linear_schedule(init_value, peak_value, max(int(warmup_steps), 1))
    decay = optax.linear_schedule(peak_value, end_value, max(int(total_steps - warmup_steps), 1))
    if warmup_steps == 0:
        return decay
    return optax.join_schedules([warm, decay], [int(warmup_steps)])


def _as_schedule(lr: LearningRate) -> Schedule:
    return lr if callable(lr) else optax.constant_schedule(float(lr))


# --------------------------------------------------------------------------------------
# Base optimizers
# --------------------------------------------------------------------------------------


@gin.configurable
def adafactor(
    learning_rate: LearningRate = 1e-3,
    multiply_by_parameter_scale: bool = False,
    decay_rate: float = 0.8,
    clipping_threshold: Optional[float] = 1.0,
    momentum: Optional[float] = None,
    weight_decay_rate: Optional[float] = None,
    factored: bool = True,
    min_dim_size_to_factor: int = 128,
) -> optax.GradientTransformation:
    """Adafactor as HINT trains hypernetworks: constant lr 1e-3, no relative step and no
    parameter-scale multiplication (HF ``Adafactor(scale_parameter=False,
    relative_step=False)``); update clipping at RMS 1.0."""
    kwargs = dict(
        multiply_by_parameter_scale=multiply_by_parameter_scale,
        decay_rate=decay_rate,
        clipping_threshold=clipping_threshold,
        momentum=momentum,
        weight_decay_rate=weight_decay_rate,
        factored=factored,
        min_dim_size_to_factor=min_dim_size_to_factor,
    )
    # Only the learning rate is injected: the other arguments drive Python control flow.
    return optax.inject_hyperparams(lambda learning_rate: optax.adafactor(learning_rate, **kwargs))(
        learning_rate=_as_schedule(learning_rate)
    )


@gin.configurable
def adamw(
    learning_rate: LearningRate = 1e-4,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay)."""
    kwargs = dict(b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    return optax.inject_hyperparams(lambda learning_rate: optax.adamw(learning_rate, **kwargs))(
        learning_rate=_as_schedule(learning_rate)
    )


@gin.configurable
def adamw_8bit(
    learning_rate: LearningRate = 1e-4,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    block_size: int = 256,
    min_quantized_size: int = 4096,
) -> optax.GradientTransformation:
    """:func:`adamw` with block-wise 8-bit moments (Dettmers et al. 2022), about a quarter of
    AdamW's optimizer-state memory; parameters and updates stay float32.

    Each moment is stored as 8-bit dynamic-map codes plus one float32 absmax per
    ``block_size`` elements; parameters of fewer than ``min_quantized_size`` elements keep
    float32 moments, as bitsandbytes does (see :mod:`hypertune.quantized_adam`).  In gin::

        train.optimizer = @optimizers.adamw_8bit()
        optimizers.adamw_8bit.learning_rate = @optimizers.linear_warmup_decay()
    """
    def make(learning_rate):
        return optax.chain(
            quantized_adam.scale_by_adam_8bit(b1, b2, eps, block_size, min_quantized_size),
            optax.add_decayed_weights(weight_decay),
            optax.scale_by_learning_rate(learning_rate),
        )

    return optax.inject_hyperparams(make)(learning_rate=_as_schedule(learning_rate))


# --------------------------------------------------------------------------------------
# Trainability
# --------------------------------------------------------------------------------------


def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path) -> str:
    """A jax key path as the '/'-joined string that regex rules match."""
    return "/".join(_key_str(k) for k in path)


def _is_box(x) -> bool:
    return isinstance(x, meta.AxisMetadata)


def param_paths(params: Any) -> Dict[str, Any]:
    """{'/'-joined path: leaf} in flatten order; flax boxes (nn.Partitioned) count as leaves."""
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)[0]
    return {path_str(path): leaf for path, leaf in flat}


def _compile(patterns: Iterable[str], what: str) -> List[Tuple[str, "re.Pattern"]]:
    if isinstance(patterns, str):
        raise TypeError(f"{what} must be a sequence of regexes, got the single string {patterns!r}")
    out = []
    for p in patterns:
        try:
            out.append((p, re.compile(p)))
        except re.error as e:
            raise ValueError(f"invalid regex in {what}: {p!r}: {e}") from None
    return out


def _labels(
    params: Any,
    trainable_patterns: Sequence[str],
    frozen_patterns: Sequence[str],
    strict: bool,
) -> Any:
    """Tree (same structure as params, boxes as leaves) of 'trainable'/'frozen'."""
    train_re = _compile(trainable_patterns, "trainable_patterns")
    frozen_re = _compile(frozen_patterns, "frozen_patterns")
    paths = list(param_paths(params))
    if strict:
        for name, compiled in [("trainable_patterns", r) for r in train_re] + [
            ("frozen_patterns", r) for r in frozen_re
        ]:
            pattern, rx = compiled
            if not any(rx.fullmatch(p) for p in paths):
                examples = ", ".join(paths[:5])
                raise ValueError(
                    f"{name} entry {pattern!r} matches no parameter path (paths are '/'-joined and "
                    f"fully matched, e.g. {examples}); fix the regex or pass strict=False"
                )

    def label(path, _):
        s = path_str(path)
        if any(rx.fullmatch(s) for _, rx in frozen_re):
            return FROZEN
        if any(rx.fullmatch(s) for _, rx in train_re):
            return TRAINABLE
        return FROZEN

    return jax.tree_util.tree_map_with_path(label, params, is_leaf=_is_box)


@gin.configurable
def trainable_mask(
    params: Any,
    trainable_patterns: Sequence[str] = (".*",),
    frozen_patterns: Sequence[str] = (),
    strict: bool = True,
) -> Any:
    """Which parameters train.

    A parameter trains iff its '/'-joined path fully matches some ``trainable_patterns``
    regex and no ``frozen_patterns`` regex (frozen wins).  E.g. freeze the downstream T5
    with ``frozen_patterns=('downstream/.*',)``.

    Args:
      params: parameter tree (plain or flax-boxed; boxes are treated as leaves).
      strict: raise if a pattern matches no parameter (catches typos that would
        silently freeze or train everything).

    Returns:
      Tree of Python bools with the structure of ``params`` (boxes as leaves).
    """
    labels = _labels(params, trainable_patterns, frozen_patterns, strict)
    return jax.tree_util.tree_map(lambda l: l == TRAINABLE, labels)


@gin.configurable
def make_optimizer(
    optimizer: Optional[optax.GradientTransformation] = None,
    trainable_patterns: Sequence[str] = (".*",),
    frozen_patterns: Sequence[str] = (),
    max_grad_norm: Optional[float] = None,
    strict: bool = True,
) -> optax.GradientTransformation:
    """The optimizer applied to trainable parameters only.

    Structure: ``multi_transform({trainable: chain(clip_by_global_norm, optimizer),
    frozen: set_to_zero()})``.  The global norm is over *trainable* gradients only, so
    freezing a module does not change the clipping of the rest.

    Args:
      optimizer: base transformation (default :func:`adafactor` with its gin bindings).
      trainable_patterns, frozen_patterns, strict: see :func:`trainable_mask`.
      max_grad_norm: clip gradients to this global norm (None or <= 0: no clipping).

    Returns:
      An ``optax.GradientTransformation``; labels are computed from the params passed to
      ``init``/``update``, so it works for any parameter tree.
    """
    base = adafactor() if optimizer is None else optimizer
    if max_grad_norm is not None and max_grad_norm > 0:
        base = optax.chain(optax.clip_by_global_norm(float(max_grad_norm)), base)
    return optax.multi_transform(
        {TRAINABLE: base, FROZEN: optax.set_to_zero()},
        lambda params: _labels(params, trainable_patterns, frozen_patterns, strict),
    )


def learning_rate_from_state(opt_state: Any) -> Optional[float]:
    """The learning rate last used by an optimizer from this module (None if not found).

    Reads the ``learning_rate`` hyperparameter of the first ``InjectHyperparamsState`` in
    the state (present for :func:`adafactor` / :func:`adamw`, also inside
    :func:`make_optimizer`).
    """
    found = []

    def visit(x):
        if isinstance(x, optax.InjectHyperparamsState) or (
            hasattr(x, "hyperparams") and isinstance(getattr(x, "hyperparams"), Mapping)
        ):
            if "learning_rate" in x.hyperparams:
                found.append(x.hyperparams["learning_rate"])
            return True
        return False

    jax.tree_util.tree_leaves(opt_state, is_leaf=visit)
    return float(np.asarray(found[0])) if found else None


# --------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------


def format_count(n: int) -> str:
    """1234567 -> "1.23M" (parameter counts in tables and logs)."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


@gin.configurable(denylist=["params", "restored_from"])
def parameter_table(
    params: Any,
    trainable_patterns: Sequence[str] = (".*",),
    frozen_patterns: Sequence[str] = (),
    restored_from: Optional[Mapping[str, Optional[str]]] = None,
    strict: bool = True,
    copied_from: Optional[Mapping[str, str]] = None,
) -> str:
    """Human-readable table of every parameter: shape, size, trainable/frozen, origin.

    Args:
      params: parameter tree (arrays, ShapeDtypeStructs or flax boxes of them).
      restored_from: optional {param path: source checkpoint key, or None if freshly
        initialised}, e.g. ``AssignmentReport.sources`` from :mod:`hypertune.checkpoints`.
      copied_from: optional {param path: path of the parameter it was copied from after
        loading} (HyperT5's hyper encoder from the downstream encoder); overrides the above.

    Returns:
      Multi-line string: one row per parameter, then totals, e.g.::

        path                          shape         params  status     origin
        downstream/encoder/.../kernel (512, 512)   262,144  frozen     checkpoint:...
        ...
        trainable: 1.20M params in 12 arrays; frozen: 60.51M params in 130 arrays
    """
    labels = param_paths(_labels(params, trainable_patterns, frozen_patterns, strict))
    leaves = param_paths(params)
    rows = []
    totals = {TRAINABLE: [0, 0], FROZEN: [0, 0]}
    for path, leaf in leaves.items():
        value = leaf.value if _is_box(leaf) else leaf
        shape = tuple(np.shape(value))
        size = int(np.prod(shape)) if shape else 1
        status = labels[path]
        totals[status][0] += size
        totals[status][1] += 1
        origin = ""
        if copied_from and path in copied_from:
            origin = f"copy of {copied_from[path]}"
        elif restored_from is not None or copied_from:
            src = (restored_from or {}).get(path)
            origin = "fresh init" if src is None else f"checkpoint:{src}"
        rows.append((path, str(shape), f"{size:,}", status, origin))
    show_origin = restored_from is not None or bool(copied_from)
    header = ("path", "shape", "params", "status", "origin" if show_origin else "")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(5)]
    lines = [
        "  ".join(
            (c.rjust(widths[i]) if i == 2 else c.ljust(widths[i])) for i, c in enumerate(r)
        ).rstrip()
        for r in [header] + rows
    ]
    t, f = totals[TRAINABLE], totals[FROZEN]
    lines.append(
        f"trainable: {format_count(t[0])} params in {t[1]} arrays; "
        f"frozen: {format_count(f[0])} params in {f[1]} arrays"
    )
    return "\n".join(lines)
