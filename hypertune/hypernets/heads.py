"""Parameter-generation heads shared by the hypernetworks."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from hypertune.models.layers import dot, param_with_axes


class MLPHead(nn.Module):
  """HyperT5's head: LayerNorm -> Dense(hidden) -> tanh -> Dense(out_features).

  `[..., d_model] -> [..., out_features]`; `out_init_scale` scales the last layer's init so
  generated parameters start small.
  """
  hidden: int
  out_features: int
  out_axis: str = "joined_kv"
  out_init_scale: float = 1.0
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    dt = jnp.dtype(self.dtype)
    scale = param_with_axes(self, "norm_scale", nn.initializers.ones, (d,), ("embed",))
    shift = param_with_axes(self, "norm_bias", nn.initializers.zeros, (d,), ("embed",))
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    x = (x - mean) * jax.lax.rsqrt(var + 1e-6) * scale + shift
    w1 = param_with_axes(self, "hidden_kernel", nn.initializers.normal(d**-0.5),
                         (d, self.hidden), ("embed", "mlp"))
    b1 = param_with_axes(self, "hidden_bias", nn.initializers.zeros, (self.hidden,), ("mlp",))
    h = jnp.tanh(dot("...d,dh->...h", x, w1, jnp.float32) + b1).astype(dt)
    w2 = param_with_axes(self, "out_kernel",
                         nn.initializers.normal(self.out_init_scale * self.hidden**-0.5),
                         (self.hidden, self.out_features), ("mlp", self.out_axis))
    b2 = param_with_axes(self, "out_bias", nn.initializers.zeros, (self.out_features,),
                         (self.out_axis,))
    return dot("...h,ho->...o", h, w2, jnp.float32) + b2


def to_prefix(flat, prefix_len: int, num_layers: int, config):
  """Head output `[..., prefix_len, num_layers * inner_dim]` -> prefixes
  `[..., num_layers, prefix_len, heads, head_dim]` (the PEFT container's layout)."""
  x = flat.reshape(flat.shape[:-2] + (prefix_len, num_layers, config.num_heads, config.d_kv))
  return jnp.moveaxis(x, -3, -4)


class LayerwisePrefixHead(nn.Module):
  """HART's prefix head for one kind (e.g. encoder keys), all layers at once (paper 6.1.2):
  per layer LayerNorm -> Dense(d -> prefix_len * d) shared by the layers -> reshape
  `[prefix_len, d]` -> tanh -> Dense(d -> out_features) of the layer's own.

  `[batch, layers, d]` (one state per layer) -> `[batch, layers, prefix_len, out_features]`;
  layer l's output reads only row l of the input.
  """
  num_layers: int
  prefix_len: int
  out_features: int
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    d, n, p = x.shape[-1], self.num_layers, self.prefix_len
    dt = jnp.dtype(self.dtype)
    scale = param_with_axes(self, "norm_scale", nn.initializers.ones, (n, d), ("layers", "embed"))
    shift = param_with_axes(self, "norm_bias", nn.initializers.zeros, (n, d), ("layers", "embed"))
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    x = (x - mean) * jax.lax.rsqrt(var + 1e-6) * scale + shift
    w1 = param_with_axes(self, "shared_kernel", nn.initializers.normal(d**-0.5), (d, p * d),
                         ("embed", "mlp"))
    b1 = param_with_axes(self, "shared_bias", nn.initializers.zeros, (p * d,), ("mlp",))
    h = dot("bld,dh->blh", x, w1, jnp.float32) + b1
    h = jnp.tanh(h.reshape(h.shape[:-1] + (p, d))).astype(dt)  # [batch, layers, P, d]
    w2 = param_with_axes(self, "layer_kernel", nn.initializers.normal(d**-0.5),
                         (n, d, self.out_features), ("layers", "embed", "joined_kv"))
    b2 = param_with_axes(self, "layer_bias", nn.initializers.zeros, (n, self.out_features),
                         ("layers", "joined_kv"))
    return dot("blpd,ldo->blpo", h, w2, jnp.float32) + b2[:, None]
