"""seqio feature converters for three-input (hyper, inputs, targets) examples.

Encoder-decoder (HyperT5 / HINT)::

    task features                      model features
    hyper_inputs [<=Lh] int32    ->    hyper_encoder_input_tokens [Lh]
    inputs       [<=Li] int32    ->    encoder_input_tokens       [Li]
    targets      [<=Lt] int32    ->    decoder_target_tokens      [Lt]
                                       decoder_input_tokens       [Lt]  targets shifted
                                                                        right, 0 = BOS
                                       decoder_loss_weights       [Lt]  1 on non-pad

Decoder-only (HyperLlama / gisting, prefix-LM downstream)::

    hyper_inputs -> hyper_decoder_input_tokens [Lh]
    inputs+targets concatenated (each unpadded) and padded to Li+Lt:
      decoder_target_tokens, decoder_input_tokens (shifted right, 0 = BOS),
      decoder_loss_weights (1 on the targets part only),
      decoder_causal_attention (1 on the inputs part plus one position, seqio's
      PrefixLM convention: bidirectional attention over the prefix).

Pad id is 0, EOS comes from the task's output features (add_eos=True). As for all
seqio converters, features longer than their length are an error here: trimming is
done before, by `seqio.get_dataset(..., trim_output_features=True)` (the default; the
examples builder counts and warns about downstream inputs that get trimmed). Packing is not supported: the papers do not pack, and a
hypernetwork output is per example.
"""

from __future__ import annotations

from typing import Mapping, Optional

import seqio
import tensorflow as tf

FeatureSpec = seqio.FeatureConverter.FeatureSpec

DEFAULT_TASK_FEATURE_LENGTHS = {"hyper_inputs": 1024, "inputs": 384, "targets": 128}


def _non_padding(x: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.not_equal(x, 0), x.dtype)


class _NoPackMixin:

  def __init__(self, pack: bool = False, **kwargs):
    if pack:
      raise ValueError(f"{type(self).__name__} does not support packing")
    super().__init__(pack=False, **kwargs)

  def __call__(self, ds: tf.data.Dataset,
               task_feature_lengths: Optional[Mapping[str, int]] = None) -> tf.data.Dataset:
    """Converts `ds`; task_feature_lengths defaults to hyper 1024 / 384 / 128."""
    if task_feature_lengths is None:
      task_feature_lengths = dict(DEFAULT_TASK_FEATURE_LENGTHS)
    return super().__call__(ds, task_feature_lengths)


class HyperEncDecFeatureConverter(_NoPackMixin, seqio.FeatureConverter):
  """Three-input encoder-decoder converter (see module docstring)."""

  TASK_FEATURES = {
      "hyper_inputs": FeatureSpec(dtype=tf.int32),
      "inputs": FeatureSpec(dtype=tf.int32),
      "targets": FeatureSpec(dtype=tf.int32),
  }
  MODEL_FEATURES = {
      "hyper_encoder_input_tokens": FeatureSpec(dtype=tf.int32),
      "encoder_input_tokens": FeatureSpec(dtype=tf.int32),
      "decoder_target_tokens": FeatureSpec(dtype=tf.int32),
      "decoder_input_tokens": FeatureSpec(dtype=tf.int32),
      "decoder_loss_weights": FeatureSpec(dtype=tf.int32),
  }
  PACKING_FEATURE_DTYPES = {}

  def _convert_example(self, features):
    d = {
        "hyper_encoder_input_tokens": features["hyper_inputs"],
        "encoder_input_tokens": features["inputs"],
        "decoder_target_tokens": features["targets"],
        "decoder_input_tokens": seqio.utils.make_autoregressive_inputs(
            features["targets"], bos_id=self.bos_id),
        "decoder_loss_weights": _non_padding(features["targets"]),
    }
    d.update({k: features[k] for k in self._passthrough_features})
    return d

  def _convert_features(self, ds, task_feature_lengths):
    ds = seqio.utils.trim_and_pad_dataset(ds, task_feature_lengths)
    return ds.map(self._convert_example, num_parallel_calls=tf.data.AUTOTUNE)

  def get_model_feature_lengths(self, task_feature_lengths):
    lh, li, lt = (task_feature_lengths[k] for k in ("hyper_inputs", "inputs", "targets"))
    lengths = {
        "hyper_encoder_input_tokens": lh,
        "encoder_input_tokens": li,
        "decoder_target_tokens": lt,
        "decoder_input_tokens": lt,
        "decoder_loss_weights": lt,
    }
    for k in self._passthrough_features:
      lengths[k] = task_feature_lengths[k]
    return lengths


class HyperDecoderOnlyFeatureConverter(_NoPackMixin, seqio.FeatureConverter):
  """Three-input decoder-only (prefix-LM) converter (see module docstring).

  Args:
    loss_on_targets_only: if False, the loss also covers the inputs part.
  """

  TASK_FEATURES = HyperEncDecFeatureConverter.TASK_FEATURES
  MODEL_FEATURES = {
      "hyper_decoder_input_tokens": FeatureSpec(dtype=tf.int32),
      "decoder_target_tokens": FeatureSpec(dtype=tf.int32),
      "decoder_input_tokens": FeatureSpec(dtype=tf.int32),
      "decoder_loss_weights": FeatureSpec(dtype=tf.int32),
      "decoder_causal_attention": FeatureSpec(dtype=tf.int32),
  }
  PACKING_FEATURE_DTYPES = {}

  def __init__(self, loss_on_targets_only: bool = True, **kwargs):
    self._loss_on_targets_only = loss_on_targets_only
    super().__init__(**kwargs)

  def _convert_features(self, ds, task_feature_lengths):
    lh, li, lt = (task_feature_lengths[k] for k in ("hyper_inputs", "inputs", "targets"))
    total = li + lt

    def convert(ex):
      hyper = ex["hyper_inputs"][:lh]
      inputs = ex["inputs"][:li]
      targets = ex["targets"][:lt]
      n_in = tf.size(inputs)
      seq = tf.concat([inputs, targets], axis=0)
      n = tf.size(seq)
      positions = tf.range(total)
      is_target = tf.logical_and(positions >= n_in, positions < n)
      pad = lambda x, length: tf.pad(x, [[0, length - tf.size(x)]])
      target_tokens = pad(seq, total)
      loss = is_target if self._loss_on_targets_only else positions < n
      d = {
          "hyper_decoder_input_tokens": tf.ensure_shape(pad(hyper, lh), [lh]),
          "decoder_target_tokens": tf.ensure_shape(target_tokens, [total]),
          "decoder_input_tokens": tf.ensure_shape(
              seqio.utils.make_autoregressive_inputs(target_tokens, bos_id=self.bos_id),
              [total]),
          "decoder_loss_weights": tf.cast(loss, tf.int32),
          # Prefix positions plus the one where the last input token is read and the
          # first target predicted (seqio PrefixLMFeatureConverter convention).
          "decoder_causal_attention": tf.cast(positions <= n_in, tf.int32),
      }
      for k in self._passthrough_features:
        d[k] = pad(ex[k][: task_feature_lengths[k]], task_feature_lengths[k])
      return d

    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

  def get_model_feature_lengths(self, task_feature_lengths):
    lh = task_feature_lengths["hyper_inputs"]
    total = task_feature_lengths["inputs"] + task_feature_lengths["targets"]
    lengths = {
        "hyper_decoder_input_tokens": lh,
        "decoder_target_tokens": total,
        "decoder_input_tokens": total,
        "decoder_loss_weights": total,
        "decoder_causal_attention": total,
    }
    for k in self._passthrough_features:
      lengths[k] = task_feature_lengths[k]
    return lengths
