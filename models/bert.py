"""A small BERT-style encoder (Devlin et al. 2019) for Q-BERT's setting (Shen et al. 2020).

Token and position embeddings, ``num_layers`` post-LayerNorm encoder layers of multi-head
self-attention and a GELU feed-forward block, a tanh pooler on the first token and a
classifier. Every weight matrix is an ``nn.Dense`` or ``nn.Embed`` with a readable path, so a
BitConfig addresses them directly: ``'embed/token'``, ``'encoder/layer0/attention/query'``,
``'encoder/layer0/ffn/intermediate'``, ``'pooler'``, ``'classifier'``. The model is plain
Flax; quantization is applied from outside (``hqjax.quantize_model`` with
``hqjax.group_wise_weights(head_dim)`` for Q-BERT's per-head groups).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate ``query``/``key``/``value``/``output`` Dense layers.

    The ``(hidden, hidden)`` projection kernels keep each head's ``head_dim`` output columns
    consecutive, which is the row grouping of Q-BERT's group-wise quantization.
    """

    num_heads: int
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, mask, train: bool):
        b, t, d = x.shape
        if d % self.num_heads:
            raise ValueError(f"hidden size {d} is not divisible by num_heads={self.num_heads}")
        hd = d // self.num_heads
        split = lambda y: y.reshape(b, t, self.num_heads, hd)
        q = split(nn.Dense(d, name="query")(x))
        k = split(nn.Dense(d, name="key")(x))
        v = split(nn.Dense(d, name="value")(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(hd).astype(x.dtype)
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
        attn = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.softmax(logits, axis=-1))
        y = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, t, d)
        return nn.Dense(d, name="output")(y)


class FeedForward(nn.Module):
    """``output(gelu(intermediate(x)))``."""

    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(x.shape[-1], name="output")(nn.gelu(nn.Dense(self.mlp_dim, name="intermediate")(x)))


class EncoderLayer(nn.Module):
    """Post-LN transformer layer: ``LN(x + Attn(x))`` then ``LN(h + FFN(h))``."""

    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, mask, train: bool):
        drop = lambda y: nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        h = nn.LayerNorm(name="attention_ln")(x + drop(SelfAttention(self.num_heads, self.dropout_rate,
                                                                       name="attention")(x, mask, train)))
        return nn.LayerNorm(name="ffn_ln")(h + drop(FeedForward(self.mlp_dim, name="ffn")(h)))


class BertTiny(nn.Module):
    """Small BERT encoder + classifier on token ids ``(batch, length)`` (0 is padding).

    Attributes
    ----------
    vocab_size, max_len : embedding table sizes.
    hidden, num_heads, num_layers, mlp_dim : encoder shape (defaults: ~30k parameters).
    num_classes : classifier width.
    dropout_rate : used only when ``train=True`` (needs a ``'dropout'`` PRNG key).
    """

    vocab_size: int = 64
    max_len: int = 32
    hidden: int = 32
    num_heads: int = 4
    num_layers: int = 2
    mlp_dim: int = 64
    num_classes: int = 2
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, ids, train: bool = False):
        if ids.ndim != 2 or ids.shape[1] > self.max_len:
            raise ValueError(f"BertTiny takes token ids of shape (batch, length <= {self.max_len}), got {ids.shape}")
        ids = ids.astype(jnp.int32)
        mask = ids != 0
        pos = jnp.arange(ids.shape[1])[None, :]
        x = nn.Embed(self.vocab_size, self.hidden, name="embed/token")(ids)
        x = x + nn.Embed(self.max_len, self.hidden, name="embed/position")(pos)
        x = nn.LayerNorm(name="embed/ln")(x)
        for i in range(self.num_layers):
            x = EncoderLayer(self.num_heads, self.mlp_dim, self.dropout_rate, name=f"encoder/layer{i}")(x, mask, train)
        pooled = jnp.tanh(nn.Dense(self.hidden, name="pooler")(x[:, 0]))
        return nn.Dense(self.num_classes, name="classifier")(pooled)
