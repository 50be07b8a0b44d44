"""Checkpointing: orbax ``CheckpointManager`` wrapper, SIGTERM handling, assignment maps.

Layout of ``directory`` (one sub-directory per step, written by orbax)::

    directory/
      100/state/...        train state (sharded arrays, OCDBT/zarr)
      100/data/...         JSON of the data iterator position
      200/...

Orbax writes each step into a temporary ``<step>.orbax-checkpoint-tmp-*`` directory and
renames it when complete (a commit-marker file on object stores), so a job killed while
saving leaves no half-written step that a resume could pick up.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
import signal
import sys
import threading
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax.core import meta

from hypertune.optimizers import param_paths, path_str

__all__ = [
    "Checkpointer",
    "abstract_state",
    "install_sigterm_handler",
    "SigtermHandler",
    "AssignmentReport",
    "restore_with_assignment_map",
]

_STATE = "state"
_DATA = "data"


def abstract_state(state: Any, shardings: Any = None) -> Any:
    """``ShapeDtypeStruct`` tree describing ``state`` (for :meth:`Checkpointer.restore`).

    Args:
      state: tree of arrays / ShapeDtypeStructs (e.g. from ``jax.eval_shape``).
      shardings: optional same-structure tree of ``jax.sharding.Sharding`` to restore
        onto (e.g. from ``partitioning.tree_shardings``); default: each leaf's own sharding
        if it is a ``jax.Array``, else unspecified.
    """

    def one(x, s=None):
        if s is None:
            s = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s)

    if shardings is None:
        return jax.tree_util.tree_map(one, state)
    return jax.tree_util.tree_map(one, state, shardings)


@gin.configurable
class Checkpointer:
    """Periodic, keep-N, asynchronous, atomic checkpoints of a train state.

    Args:
      directory: where checkpoints live (``MODEL_DIR/checkpoints`` by convention); local
        path or any ``etils.epath`` URL (gs://...).
      save_interval_steps: :meth:`save` only writes when ``step % save_interval_steps == 0``
        (or ``force=True``).
      max_to_keep: keep the newest N steps (None: keep all).
      async_save: write in a background thread; the train loop only waits for the
        device->host copy.  Call :meth:`wait_until_finished` (or :meth:`close`) before exit.
    """

    def __init__(
        self,
        directory: str,
        save_interval_steps: int = 1000,
        max_to_keep: Optional[int] = 3,
        async_save: bool = True,
    ):
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        self.directory = epath.Path(directory)
        self.save_interval_steps = int(save_interval_steps)
        options = ocp.CheckpointManagerOptions(
            # The periodic decision is made in save() (orbax would also save the first step
            # it sees, whatever its number).
            save_interval_steps=1,
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
            # Remove tmp dirs that a killed job left behind, so they cannot accumulate.
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                _STATE: ocp.StandardCheckpointHandler(),
                _DATA: ocp.JsonCheckpointHandler(),
            },
        )

    # -- saving ----------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: Any,
        data_state: Optional[Mapping[str, Any]] = None,
        force: bool = False,
    ) -> bool:
        """Saves ``state`` (and the data iterator position) at ``step`` if it is due.

        Args:
          step: training step the state corresponds to (number of updates applied).
          state: pytree of ``jax.Array``s / numpy arrays / Python scalars (unboxed).
          data_state: JSON-serialisable dict describing the data position, e.g.
            ``{"epoch": 1, "index": 1234, "seed": 0}``; restored verbatim with the state.
          force: save even if ``step`` is not a multiple of ``save_interval_steps``.

        Returns:
          True if a save was started.  With async saving it completes in the background.
        """
        items = {_STATE: ocp.args.StandardSave(state)}
        if data_state is not None:
            items[_DATA] = ocp.args.JsonSave(dict(data_state))
        if not force and step % self.save_interval_steps:
            return False
        if int(step) in self._manager.all_steps():
            # E.g. the SIGTERM save right after a periodic save of the same step.
            return False
        saved = self._manager.save(int(step), args=ocp.args.Composite(**items), force=force)
        if saved:
            logging.info("checkpoint: saving step %d to %s", step, self.directory)
        return bool(saved)

    def wait_until_finished(self) -> None:
        """Blocks until pending asynchronous saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    # -- inspecting ------------------------------------------------------------------

    def latest_step(self) -> Optional[int]:
        """Newest fully written step (None if there is none); temporary dirs never count."""
        self._manager.reload()
        return self._manager.latest_step()

    def all_steps(self) -> List[int]:
        """All fully written steps, ascending."""
        return sorted(self._manager.all_steps())

    # -- restoring -------------------------------------------------------------------

    def restore(self, step: Optional[int] = None, target: Any = None) -> Tuple[Any, Optional[dict]]:
        """Restores the train state and data position.

        Args:
          step: step to restore (default: :meth:`latest_step`).
          target: tree of ``jax.ShapeDtypeStruct`` (with ``sharding=``) or arrays with the
            structure of the saved state; arrays are restored with those shapes, dtypes and
            shardings -- e.g. onto a different mesh than the one that saved.  See
            :func:`abstract_state`.  None restores as saved (single host only).

        Returns:
          ``(state, data_state)``; ``data_state`` is None if none was saved.

        Raises:
          FileNotFoundError: no checkpoint (at ``step``) in the directory.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        elif step not in self.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; available: {self.all_steps()}"
            )
        if target is not None:
            target = jax.tree_util.tree_map(
                lambda x: x
                if isinstance(x, jax.ShapeDtypeStruct)
                else jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)),
                target,
            )
        items = {_STATE: ocp.args.StandardRestore(target)}
        has_data = (self.directory / str(step) / _DATA).exists()
        if has_data:
            items[_DATA] = ocp.args.JsonRestore()
        restored = self._manager.restore(int(step), args=ocp.args.Composite(**items))
        return restored[_STATE], (restored[_DATA] if has_data else None)


# --------------------------------------------------------------------------------------
# SIGTERM
# --------------------------------------------------------------------------------------


class SigtermHandler:
    """Installed by :func:`install_sigterm_handler`; ``triggered`` tells if SIGTERM arrived."""

    def __init__(self, callback: Callable[[], Any], exit_code: Optional[int]):
        self._callback = callback
        self._exit_code = exit_code
        self._lock = threading.Lock()
        self.triggered = False
        self._previous = signal.getsignal(signal.SIGTERM)

    def __call__(self, signum=signal.SIGTERM, frame=None):
        with self._lock:  # A second SIGTERM during the save must not start another save.
            if self.triggered:
                return
            self.triggered = True
        logging.warning("SIGTERM received: running the final-save callback")
        try:
            self._callback()
        finally:
            if self._exit_code is not None:
                sys.exit(self._exit_code)

    def uninstall(self) -> None:
        """Restores the handler that was installed before."""
        signal.signal(signal.SIGTERM, self._previous)


def install_sigterm_handler(callback: Callable[[], Any], exit_code: Optional[int] = 143) -> SigtermHandler:
    """On SIGTERM (preemption, ``kill``), run ``callback`` once, then exit.

    The callback runs on the main thread between two Python bytecodes, so it should save
    the last *completed* train state (e.g. ``lambda: ckpt.save(step, state, force=True);
    ckpt.wait_until_finished()`` over variables the loop rebinds only after a step
    finishes).  Must be called from the main thread.

    Args:
      callback: the final save.
      exit_code: ``sys.exit`` code after the callback (143 = 128 + SIGTERM, what a
        SIGTERM-killed process reports); None to return to the interrupted code instead
        (the loop then checks ``handler.triggered``).

    Returns:
      The :class:`SigtermHandler` (``.triggered``, ``.uninstall()``).
    """
    handler = SigtermHandler(callback, exit_code)
    signal.signal(signal.SIGTERM, handler)
    return handler


# --------------------------------------------------------------------------------------
# Assignment maps (initial checkpoints)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class AssignmentReport:
    """What :func:`restore_with_assignment_map` did.

    Attributes:
      sources: {target path: source path it was copied from, or None if it kept its fresh
        initialisation}; pass to ``optimizers.parameter_table(restored_from=...)``.
      unused_source: source paths that no target took.
    """

    sources: Dict[str, Optional[str]]
    unused_source: List[str]

    @property
    def restored(self) -> List[str]:
        return [t for t, s in self.sources.items() if s is not None]

    @property
    def initialized(self) -> List[str]:
        return [t for t, s in self.sources.items() if s is None]

    def summary(self) -> str:
        lines = [f"restored {len(self.restored)} / {len(self.sources)} target params from checkpoint"]
        lines += [f"  {t} <- {s}" for t, s in self.sources.items() if s is not None]
        lines.append(f"freshly initialised: {len(self.initialized)}")
        lines += [f"  {t}" for t in self.initialized]
        if self.unused_source:
            lines.append(f"unused checkpoint params: {len(self.unused_source)}")
            lines += [f"  {s}" for s in self.unused_source]
        return "\n".join(lines)


def restore_with_assignment_map(
    source_params: Any,
    target_params: Any,
    assignment_map: Sequence[Tuple[str, Optional[str]]] = (),
    default_identity: bool = True,
) -> Tuple[Any, AssignmentReport]:
    """Fills ``target_params`` from ``source_params`` following t5x-style assignment rules.

    Each rule is ``(target_regex, source_template_or_None)``; the first rule whose regex
    fully matches a target path decides: a template is expanded with the match's groups
    (``re.Match.expand``) to give the source path; None keeps the target's fresh
    initialisation.  Unmatched targets take the same path from the source if it exists
    (``default_identity``), else keep their initialisation.  Example -- initialise the
    hypernetwork's encoder from the downstream T5 encoder::

        [(r"hypernet/hyper_encoder/(.*)", r"downstream/encoder/\\1")]

    Args:
      source_params: tree of arrays from a checkpoint (paths are '/'-joined keys).
      target_params: freshly initialised tree (arrays or flax boxes); restored values are
        cast to the target's dtype and placed with the target array's sharding.
      assignment_map: the rules, first match wins.
      default_identity: copy same-named parameters when no rule matches.

    Returns:
      ``(new_target_params, AssignmentReport)``.

    Raises:
      KeyError: a rule maps a target to a source path that does not exist (names both
        and the closest source paths).
      ValueError: shape mismatch (names both paths and both shapes).
    """
    rules = []
    for rule in assignment_map:
        if len(rule) != 2:
            raise ValueError(f"assignment_map entries must be (target_regex, source_or_None), got {rule!r}")
        try:
            rules.append((re.compile(rule[0]), rule[1]))
        except re.error as e:
            raise ValueError(f"invalid target regex {rule[0]!r} in assignment_map: {e}") from None
    source = param_paths(source_params)
    source = {k: (v.value if isinstance(v, meta.AxisMetadata) else v) for k, v in source.items()}
    used = set()
    sources: Dict[str, Optional[str]] = {}

    def assign(path, leaf):
        tpath = path_str(path)
        src_path: Optional[str] = None
        for rx, template in rules:
            m = rx.fullmatch(tpath)
            if m is None:
                continue
            if template is None:
                break
            src_path = m.expand(template)
            if src_path not in source:
                close = difflib.get_close_matches(src_path, list(source), n=3)
                raise KeyError(
                    f"assignment_map rule ({rx.pattern!r}, {template!r}) maps target {tpath!r} to "
                    f"source {src_path!r}, which is not in the checkpoint; closest: {close}"
                )
            break
        else:
            if default_identity and tpath in source:
                src_path = tpath
        sources[tpath] = src_path
        if src_path is None:
            return leaf
        used.add(src_path)
        target_value = leaf.value if isinstance(leaf, meta.AxisMetadata) else leaf
        value = source[src_path]
        if tuple(np.shape(value)) != tuple(np.shape(target_value)):
            raise ValueError(
                f"shape mismatch restoring target {tpath!r} {tuple(np.shape(target_value))} from "
                f"checkpoint key {src_path!r} {tuple(np.shape(value))}"
            )
        dtype = getattr(target_value, "dtype", None)
        if not isinstance(value, jax.Array):
            value = np.asarray(value)
        new = value.astype(dtype) if dtype is not None else value
        sharding = getattr(target_value, "sharding", None)
        # device_put also reshards a source array living on another mesh.
        new = jax.device_put(new, sharding) if sharding is not None else jax.numpy.asarray(new)
        return leaf.replace_boxed(new) if isinstance(leaf, meta.AxisMetadata) else new

    new_params = jax.tree_util.tree_map_with_path(
        assign, target_params, is_leaf=lambda x: isinstance(x, meta.AxisMetadata)
    )
    report = AssignmentReport(sources=sources, unused_source=[k for k in source if k not in used])
    return new_params, report
