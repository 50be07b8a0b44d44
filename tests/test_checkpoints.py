"""Tests for hypertune.checkpoints."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hypertune import checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKS = os.path.join(REPO, "tests", "multidevice_checks.py")


def _env(devices=None):
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    if devices:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    return env


def _state(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "params": {"w": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), "b": jnp.zeros((4,), jnp.bfloat16)},
        "step": jnp.asarray(seed, jnp.int32),
    }


def _assert_tree_equal(a, b):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_periodic_keep_n_async_and_data_state(tmp_path):
    ckpt = checkpoints.Checkpointer(str(tmp_path), save_interval_steps=2, max_to_keep=2, async_save=True)
    assert ckpt.latest_step() is None
    saved = [ckpt.save(s, _state(s), data_state={"index": 10 * s}) for s in range(1, 8)]
    assert saved == [False, True, False, True, False, True, False]  # only multiples of 2
    assert ckpt.save(7, _state(7), data_state={"index": 70}, force=True)  # final save, off-period
    assert ckpt.save(7, _state(7), force=True) is False  # same step twice: no-op
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [6, 7]  # keep-2
    assert ckpt.latest_step() == 7
    state, data = ckpt.restore(target=checkpoints.abstract_state(_state()))
    _assert_tree_equal(state, _state(7))
    assert state["params"]["b"].dtype == jnp.bfloat16
    assert data == {"index": 70}
    state, data = ckpt.restore(step=6, target=_state())
    _assert_tree_equal(state, _state(6))
    assert data == {"index": 60}
    with pytest.raises(FileNotFoundError, match=r"step 2 .*available: \[6, 7\]"):
        ckpt.restore(step=2, target=_state())
    ckpt.close()
    # A new Checkpointer (resume after restart) sees the same steps.
    again = checkpoints.Checkpointer(str(tmp_path))
    assert again.latest_step() == 7
    again.close()


def test_restore_without_data_state_and_empty_dir(tmp_path):
    ckpt = checkpoints.Checkpointer(str(tmp_path / "a"), save_interval_steps=1)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.restore()
    ckpt.save(3, _state(3))
    ckpt.wait_until_finished()
    state, data = ckpt.restore()
    assert data is None
    _assert_tree_equal(state, _state(3))
    ckpt.close()


_KILL_MID_SAVE = textwrap.dedent(
    """
    import os, signal, sys, time
    import jax.numpy as jnp
    from hypertune.checkpoints import Checkpointer
    d = sys.argv[1]
    c = Checkpointer(d, save_interval_steps=1)
    c.save(1, {"w": jnp.ones((4,))}, {"index": 1})
    c.wait_until_finished()
    c.save(2, {"w": jnp.ones((50_000_000,))}, {"index": 2})  # 200 MB, written in the background
    while not any("tmp" in n for n in os.listdir(d)):
        time.sleep(0.0005)
    print("KILLING", sorted(os.listdir(d)), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_partially_written_checkpoint_is_never_picked_up(tmp_path):
    d = str(tmp_path / "ckpt")
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_MID_SAVE, d], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert "KILLING" in proc.stdout and "2.orbax-checkpoint-tmp" in proc.stdout, proc.stdout
    # Killed while step 2 was in its temporary directory: step 1 is the latest.
    ckpt = checkpoints.Checkpointer(d)
    assert ckpt.latest_step() == 1
    state, data = ckpt.restore(target={"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
    np.testing.assert_array_equal(state["w"], np.ones(4))
    assert data == {"index": 1}
    # A stray temporary directory appearing later is ignored as well.
    os.makedirs(os.path.join(d, "9.orbax-checkpoint-tmp", "state"))
    assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
    ckpt.close()


_SIGTERM_CHILD = textwrap.dedent(
    """
    import sys, time
    import jax.numpy as jnp
    from hypertune.checkpoints import Checkpointer, install_sigterm_handler
    ckpt = Checkpointer(sys.argv[1], save_interval_steps=1000)
    current = {"step": 0, "state": {"w": jnp.zeros((3,))}}

    def final_save():
        ckpt.save(current["step"], current["state"], data_state={"index": current["step"]}, force=True)
        ckpt.wait_until_finished()
        print("SAVED", current["step"], flush=True)

    install_sigterm_handler(final_save)
    for step in range(1, 10**6):
        current = {"step": step, "state": {"w": jnp.full((3,), float(step))}}
        if step == 5:
            print("READY", flush=True)
        time.sleep(0.01 if step < 5 else 0.05)
    """
)


def test_sigterm_saves_then_exits(tmp_path):
    d = str(tmp_path / "ckpt")
    proc = subprocess.Popen(
        [sys.executable, "-c", _SIGTERM_CHILD, d], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "READY", line + proc.stderr.read()[-3000:]
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    saved_step = int(out.split("SAVED")[1].split()[0])
    assert saved_step >= 5
    ckpt = checkpoints.Checkpointer(d)
    assert ckpt.latest_step() == saved_step  # save_interval 1000: only the SIGTERM save exists
    state, data = ckpt.restore(target={"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
    np.testing.assert_array_equal(state["w"], np.full(3, float(saved_step)))
    assert data == {"index": saved_step}
    ckpt.close()


def test_sigterm_handler_in_process_runs_callback_once():
    calls = []
    handler = checkpoints.install_sigterm_handler(lambda: calls.append(1), exit_code=None)
    try:
        assert signal.getsignal(signal.SIGTERM) is handler
        handler()
        handler()  # second SIGTERM while/after saving: no second save
        assert calls == [1] and handler.triggered
    finally:
        handler.uninstall()
    assert signal.getsignal(signal.SIGTERM) is not handler
    handler = checkpoints.install_sigterm_handler(lambda: calls.append(2))
    try:
        with pytest.raises(SystemExit) as exc:
            handler()
        assert exc.value.code == 143 and calls == [1, 2]
    finally:
        handler.uninstall()


def test_restore_onto_2x4_mesh_from_single_device_checkpoint(tmp_path):
    rng = np.random.default_rng(1)
    expected = {
        "kernel": rng.normal(size=(8, 16)).astype(np.float32),
        "embedding": rng.normal(size=(12, 6)).astype(np.float32),
        "step": np.asarray(42, np.int32),
    }
    d = str(tmp_path / "ckpt")
    ckpt = checkpoints.Checkpointer(d, save_interval_steps=1)
    ckpt.save(42, {k: jnp.asarray(v) for k, v in expected.items()}, data_state={"index": 7, "seed": 3})
    ckpt.close()
    npz = str(tmp_path / "expected.npz")
    np.savez(npz, **expected)
    proc = subprocess.run(
        [sys.executable, CHECKS, "restore", d, npz], env=_env(devices=8), cwd=REPO,
        capture_output=True, text=True, timeout=300,
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stdout + proc.stderr[-5000:]
    result = json.loads(lines[-1])
    assert result == {"restore_onto_2x4_mesh": "ok"}, result


# ----------------------------------------------------------------------------- assignment maps


def _downstream_and_hypernet():
    source = {
        "downstream": {
            "encoder": {"layer_0": {"kernel": np.full((4, 4), 1.0, np.float32)}, "norm": np.full((4,), 2.0, np.float32)},
            "decoder": {"kernel": np.full((4, 4), 3.0, np.float32)},
        },
        "extra_in_checkpoint": np.zeros((2,), np.float32),
    }
    target = {
        "downstream": {
            "encoder": {"layer_0": {"kernel": jnp.zeros((4, 4))}, "norm": jnp.zeros((4,))},
            "decoder": {"kernel": jnp.zeros((4, 4))},
        },
        "hypernet": {
            "hyper_encoder": {"layer_0": {"kernel": jnp.zeros((4, 4), jnp.bfloat16)}, "norm": jnp.zeros((4,))},
            "head": {"kernel": jnp.full((4, 2), -1.0)},
        },
    }
    return source, target


def test_assignment_map_copies_encoder_into_hyper_encoder():
    source, target = _downstream_and_hypernet()
    new, report = checkpoints.restore_with_assignment_map(
        source, target, [(r"hypernet/hyper_encoder/(.*)", r"downstream/encoder/\1")]
    )
    np.testing.assert_array_equal(new["hypernet"]["hyper_encoder"]["layer_0"]["kernel"], np.ones((4, 4)))
    assert new["hypernet"]["hyper_encoder"]["layer_0"]["kernel"].dtype == jnp.bfloat16  # target dtype kept
    np.testing.assert_array_equal(new["hypernet"]["hyper_encoder"]["norm"], np.full(4, 2.0))
    np.testing.assert_array_equal(new["downstream"]["decoder"]["kernel"], np.full((4, 4), 3.0))  # identity
    np.testing.assert_array_equal(new["hypernet"]["head"]["kernel"], np.full((4, 2), -1.0))  # fresh init kept
    assert report.sources["hypernet/hyper_encoder/layer_0/kernel"] == "downstream/encoder/layer_0/kernel"
    assert report.sources["downstream/decoder/kernel"] == "downstream/decoder/kernel"
    assert report.initialized == ["hypernet/head/kernel"]
    assert report.unused_source == ["extra_in_checkpoint"]
    summary = report.summary()
    assert "restored 5 / 6" in summary and "hypernet/head/kernel" in summary


def test_assignment_map_none_keeps_initialisation_and_first_rule_wins():
    source, target = _downstream_and_hypernet()
    new, report = checkpoints.restore_with_assignment_map(
        source, target, [(r"downstream/decoder/.*", None), (r"downstream/.*/kernel", r"downstream/decoder/kernel")]
    )
    # The decoder matches both rules; the first (None) wins, so it keeps its init.
    np.testing.assert_array_equal(new["downstream"]["decoder"]["kernel"], np.zeros((4, 4)))
    assert report.sources["downstream/decoder/kernel"] is None
    np.testing.assert_array_equal(new["downstream"]["encoder"]["layer_0"]["kernel"], np.full((4, 4), 3.0))
    assert report.sources["downstream/encoder/layer_0/kernel"] == "downstream/decoder/kernel"


def test_assignment_map_errors_name_keys_and_shapes():
    source, target = _downstream_and_hypernet()
    with pytest.raises(ValueError) as exc:
        checkpoints.restore_with_assignment_map(source, target, [(r"hypernet/head/kernel", "downstream/decoder/kernel")])
    msg = str(exc.value)
    assert "'hypernet/head/kernel' (4, 2)" in msg and "'downstream/decoder/kernel' (4, 4)" in msg, msg
    with pytest.raises(KeyError, match=r"'downstream/encoder/layer_9/kernel'.*closest"):
        checkpoints.restore_with_assignment_map(
            source, target, [(r"hypernet/hyper_encoder/layer_0/(.*)", r"downstream/encoder/layer_9/\1")]
        )


def test_assignment_map_with_boxed_flax_params():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "mlp"))
            return nn.Dense(3, kernel_init=init, name="dense")(x)

    target = M().init(jax.random.key(0), jnp.ones((1, 2)))["params"]
    source = {"dense": {"kernel": np.ones((2, 3), np.float32), "bias": np.full((3,), 5.0, np.float32)}}
    new, report = checkpoints.restore_with_assignment_map(source, target)
    assert isinstance(new["dense"]["kernel"], nn.LogicallyPartitioned)
    assert new["dense"]["kernel"].names == ("embed", "mlp")
    np.testing.assert_array_equal(new["dense"]["kernel"].value, np.ones((2, 3)))
    assert report.initialized == []
