"""Would a transform before the rotation, or pairs of coordinates, cut the cache's error? (CPU)

Three probes on SmolLM2's real queries, keys and values (the text's first 1,024 tokens,
statistics from the first 256 as a cache calibrates; the attention-output error of the
last 512 queries, `budget.readback_errors`' measure), each against today's cache:

- `keys`: per RoPE pair, scale keys by 1/s and queries by s (q·k unchanged, and s commutes
  with RoPE), s² = sqrt(E_k / E_q) of the pair's centred key and query energies: the
  quantization error, isotropic after the rotation, then weighs the channels as the
  queries read them; the energy model's bound is (Σ√(E_k E_q))² / (ΣE_k ΣE_q).
- `values`: v -> A v with AᵀA = C^-½ (C^½ M C^½)^½ C^-½ (C: the values' second moment,
  M: the output projection's Gram over the kv head's query heads), undone after the
  attention: the error weighs channels as W_o reads them; bound (tr (C^½ M C^½)^½)² /
  (tr C tr M).
- `pairs`: 2.5-bit values as pairs of rotated coordinates, each the nearest of 32 points
  (Lloyd on a 2-D Gaussian: 0.057 per coordinate, against 0.076 for a blind half-2-bit,
  half-3-bit mix), against the cache's 2.5-bit channel split.
- `norms`: the cache's `norm_fit` (what a stored norm is; no transform, no bits): keys
  and values at each fit against the paper's exact norms, K4 and K3 keys, V2.5 and V3.

    python -m benchmarks.transform_probe [--text T] [--text-lines a:b]
        [--probes keys,values,pairs,norms] [--out DIR]

Writes benchmarks/results/transform_probe_cpu.json.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.key_scaling_quality import pair_energies, pair_scales
from benchmarks.quality_probe import load
from models import evaluation
from turboquant_jax import DenseKVCache, TurboQuantConfig, TurboQuantKVCache
from turboquant_jax.budget import readback_errors

TOKENS, CALIBRATION = 1024, 256


def _psd_sqrt(x: np.ndarray, power: float = 0.5) -> np.ndarray:
  w, u = np.linalg.eigh(x)
  return (u * np.clip(w, 1e-12, None) ** power) @ u.T


def _output_error(q, k, v, vals, scale) -> float:
  """Relative squared error of the last half's attention outputs with values `vals`."""
  b, t, hkv, d = v.shape
  n = t // 2
  kw = dict(q_positions=jnp.broadcast_to(jnp.arange(t - n, t, dtype=jnp.int32), (b, n)),
            scale=scale)

  def out(x):
    return DenseKVCache.create(b, t, hkv, d).update(k, x).attend(q[:, t - n:], **kw)
  ref = out(v)
  return float(jnp.sum((out(vals) - ref) ** 2) / jnp.sum(ref ** 2))


def key_scaling(model, qkv) -> list[dict]:
  rows = []
  for layer, (q, k, v) in enumerate(qkv):
    spec, (b, t, hkv, d), g = model.cfg.layer_rope(layer), k.shape, q.shape[2] // k.shape[2]
    cal = lambda x: x[:, :CALIBRATION]  # noqa: E731
    e_k, e_q = pair_energies(model.cfg, layer, cal(q), cal(k))
    bound = jnp.sqrt(e_k * e_q).sum(-1) ** 2 / (e_k.sum(-1) * e_q.sum(-1))
    def scaled(use_queries):
      s = pair_scales(model.cfg, layer, cal(q), cal(k), use_queries)            # [H, D]
      qs = (q.astype(jnp.float32).reshape(b, t, hkv, g, d) * s[:, None]).reshape(q.shape)
      return qs, k.astype(jnp.float32) / s
    row = dict(layer=layer, bound=np.round(np.asarray(bound), 3).tolist())
    for bits in (3, 4):
      c = TurboQuantConfig(key_bits=bits, value_bits=4, window=0)
      plain, by_both, by_keys = (readback_errors(*x, v, [c], layer=layer, rope=spec,
                                                 scale=model.cfg.scale)[0, 0]
                                 for x in ((q, k), scaled(True), scaled(False)))
      row[f"k{bits}"] = dict(plain=plain, scaled=by_both, ratio=by_both / plain,
                             keys_only=by_keys, keys_only_ratio=by_keys / plain)
    rows.append(row)
    print("keys", row, flush=True)
  return rows


def value_transform(model, qkv, bits: float = 2.5) -> list[dict]:
  rows = []
  for layer, (q, k, v) in enumerate(qkv):
    b, t, hkv, d = v.shape
    g = q.shape[2] // hkv
    wo = np.asarray(model.layers[layer].attn.o_proj.kernel[...], np.float64)  # [Hq·D, E]
    vv = np.asarray(v, np.float64)
    a, a_inv, bounds = [], [], []
    for h in range(hkv):
      c = np.einsum("btd,bte->de", vv[:, :CALIBRATION, h], vv[:, :CALIBRATION, h]) / CALIBRATION
      m = sum(wo[(h * g + j) * d:(h * g + j + 1) * d] @ wo[(h * g + j) * d:(h * g + j + 1) * d].T
              for j in range(g))
      ch, chi = _psd_sqrt(c), _psd_sqrt(c, -0.5)
      root = _psd_sqrt(ch @ m @ ch)
      bounds.append(np.trace(root) ** 2 / (np.trace(c) * np.trace(m)))
      x = _psd_sqrt(chi @ root @ chi)
      a.append(x)
      a_inv.append(np.linalg.inv(x))
    a, a_inv = jnp.asarray(np.stack(a), jnp.float32), jnp.asarray(np.stack(a_inv), jnp.float32)
    k32, v32 = k.astype(jnp.float32), v.astype(jnp.float32)
    cfg = TurboQuantConfig(key_bits=4, value_bits=bits, window=0)

    def readback(vals):
      cache = TurboQuantKVCache.create(b, t, hkv, d, config=cfg, layer=layer).update(k32, vals)
      return jnp.swapaxes(cache.reconstruct()[1], 1, 2)          # [B, T, H, D]
    plain = _output_error(q, k32, v32, readback(v32), model.cfg.scale)
    back = jnp.einsum("bthe,hde->bthd", readback(jnp.einsum("bthd,hed->bthe", v32, a)), a_inv)
    moved = _output_error(q, k32, v32, back, model.cfg.scale)
    rows.append(dict(layer=layer, bound=np.round(bounds, 3).tolist(), plain=plain,
                     transformed=moved, ratio=moved / plain))
    print("values", rows[-1], flush=True)
  return rows


def pair_codebook(seed: int = 0, n: int = 32, samples: int = 300_000) -> np.ndarray:
  """n points for a 2-D standard Gaussian by Lloyd's iterations on samples."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((samples, 2))
  c = x[rng.choice(samples, n, replace=False)]
  for _ in range(60):
    idx = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
    c = np.array([x[idx == j].mean(0) if (idx == j).any() else c[j] for j in range(n)])
  return c


def value_pairs(model, qkv, sinks: int = 4) -> list[dict]:
  points = jnp.asarray(pair_codebook(), jnp.float32)            # 5 bits per 2 coordinates
  rows = []
  for layer, (q, k, v) in enumerate(qkv):
    b, t, hkv, d = v.shape
    k32, v32 = k.astype(jnp.float32), v.astype(jnp.float32)
    cfg = TurboQuantConfig(key_bits=4, value_bits=2.5, window=0, num_sinks=sinks)
    cache = TurboQuantKVCache.create(b, t, hkv, d, config=cfg, layer=layer).update(k32, v32)
    split = jnp.swapaxes(cache.reconstruct()[1], 1, 2)
    u, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(layer), (d, d)))
    norm = jnp.linalg.norm(v32, axis=-1, keepdims=True)
    y = (v32 / jnp.maximum(norm, 1e-30)) @ u.T * jnp.sqrt(d)       # ~N(0, 1) coordinates
    y = y.reshape(*y.shape[:-1], d // 2, 2)
    idx = ((y[..., None, :] - points) ** 2).sum(-1).argmin(-1)
    pairs = (points[idx].reshape(v32.shape) / jnp.sqrt(d)) @ u * norm   # float32 norms
    pairs = pairs.at[:, :sinks].set(v32[:, :sinks])
    mse = lambda x: float(jnp.sum((x - v32)[:, sinks:] ** 2) / jnp.sum(v32[:, sinks:] ** 2))  # noqa: E731
    rows.append(dict(layer=layer, mse_split=mse(split), mse_pairs=mse(pairs),
                     out_split=_output_error(q, k32, v32, split, model.cfg.scale),
                     out_pairs=_output_error(q, k32, v32, pairs, model.cfg.scale)))
    print("pairs", rows[-1], flush=True)
  return rows


def norm_fits(model, qkv) -> list[dict]:
  rows = []
  for layer, (q, k, v) in enumerate(qkv):
    row = dict(layer=layer)
    for side, widths in (("keys", (4, 3)), ("values", (2.5, 3))):
      for bits in widths:
        configs = [TurboQuantConfig(key_bits=bits if side == "keys" else 4,
                                    value_bits=bits if side == "values" else 4, window=0,
                                    norm_fit=fit)
                   for fit in ("exact", "projected", "matched")]
        e = readback_errors(q, k, v, configs, layer=layer, rope=model.cfg.layer_rope(layer),
                            scale=model.cfg.scale)[:, 0 if side == "keys" else 1]
        row[f"{side} {bits}"] = dict(zip(("exact", "projected", "matched"), e.tolist()))
    rows.append(row)
    print("norms", row, flush=True)
  return rows


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--text", default="/usr/share/vim/vim90/doc/usr_03.txt")
  p.add_argument("--text-lines", default=None, help="a:b, only these lines of --text")
  p.add_argument("--probes", default="keys,values,pairs")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  model, tokens = load("smollm2", 2048, text=pathlib.Path(args.text), lines=args.text_lines)
  qkv = evaluation.layer_qkv(model, tokens[:, :TOKENS])
  result = dict(model="smollm2", text=args.text, text_lines=args.text_lines, tokens=TOKENS,
                calibration=CALIBRATION)
  summary = []
  probes = dict(keys=key_scaling, values=value_transform, pairs=value_pairs, norms=norm_fits)
  for name in args.probes.split(","):
    rows = result[name] = probes[name](model, qkv)
    if name == "keys":
      for bits in (3, 4):
        total = [sum(r[f"k{bits}"][x] for r in rows) for x in ("plain", "scaled",
                                                                 "keys_only")]
        summary.append(dict(probe=f"keys {bits} bits", before=total[0], after=total[1],
                            ratio=total[1] / total[0]))
        summary.append(dict(probe=f"keys {bits} bits, s from keys alone", before=total[0],
                            after=total[2], ratio=total[2] / total[0]))
    elif name == "norms":
      for what in [x for x in rows[0] if x != "layer"]:
        total = {fit: sum(r[what][fit] for r in rows) for fit in rows[0][what]}
        for fit in ("projected", "matched"):
          summary.append(dict(probe=f"{what} bits, {fit} norms", before=total["exact"],
                              after=total[fit], ratio=total[fit] / total["exact"]))
    elif name == "values":
      total = [sum(r[x] for r in rows) for x in ("plain", "transformed")]
      summary.append(dict(probe="values 2.5 bits", before=total[0], after=total[1],
                          ratio=total[1] / total[0]))
    else:
      for what in ("mse", "out"):
        total = [sum(r[f"{what}_{x}"] for r in rows) for x in ("split", "pairs")]
        summary.append(dict(probe=f"pairs 2.5 bits ({what})", before=total[0],
                            after=total[1], ratio=total[1] / total[0]))
  result["summary"] = summary
  print(f"wrote {common.write_result('transform_probe', result, args.out)}")
  common.print_table(summary, ["probe", "before", "after", "ratio"])


if __name__ == "__main__":
  main()
